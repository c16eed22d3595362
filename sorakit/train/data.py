"""The moving-shapes data set: deterministic clips and captions from a seed (numpy only).

Every clip shows one flat-coloured shape on a plain background, crossing most of the frame
in a straight line (left, right, up or down). Large moves are deliberate: a 64 x 64 clip that
moves only a few pixels is squeezed by the VAE into 5 latent frames of 8 x 8, where a small
motion is a fraction of one latent pixel and the DiT sees almost no signal to tie to the
word "left" or "right". Crossing the frame (32-40 px) makes direction visible in every latent
frame as well as across them: a "moving right" clip has its object in the left half early on
and in the right half late.

Clip ``index`` of data set ``seed`` is a pure function of (seed, index); directions and
colours rotate with the index, so any run of 24 consecutive indices holds every
(colour, direction) pair exactly once and batches can be balanced by index arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sorakit.adherence import (
    BACKGROUND_WORDS,
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    SHAPE_WORDS,
    SHAPES,
    shape_coverage,
)

NUM_FRAMES = 17
SIZE = 64
# Half size of the shapes (pixels at 64 x 64). Half sizes of 7-10 px (objects 2 latent pixels
# across) came back from the VAE as round blobs: every shape a circle (docs/training.md,
# "Shape"); at 11-15 px the outline survives the VAE.
HALF_SIZE = (11.0, 15.0)

# Caption templates; {c} colour, {s} shape word, {d} direction phrase, {b} background word.
TEMPLATES_WITH_BACKGROUND = (
    "a {c} {s} moving {d} on a {b} background",
    "a {c} {s} moves {d} on a {b} background",
    "a {c} {s} sliding {d} across a {b} background",
    "a {c} {s} travelling {d} over a {b} background",
    "{c} {s} going {d}, {b} background",
    "the {c} {s} moves {d} against a {b} background",
)
TEMPLATES_PLAIN = (
    "a {c} {s} moving {d}",
    "a {c} {s} moves {d}",
    "the {c} {s} is moving {d}",
    "{c} {s} going {d}",
)
PLAIN_SHARE = 0.3  # captions that do not name the background
DIRECTION_PHRASES = {
    "left": ("left", "to the left", "leftwards"),
    "right": ("right", "to the right", "rightwards"),
    "up": ("up", "upwards", "upward"),
    "down": ("down", "downwards", "downward"),
}


@dataclass(frozen=True)
class MotionSpec:
    """Geometry of one clip, in pixels of a ``size`` x ``size`` frame."""

    half_size: float  # half extent of the shape
    travel: float  # distance covered from the first to the last frame
    start: tuple[float, float]  # centre (x, y) in the first frame


def caption_for(rng: np.random.Generator, colour: str, shape: str, direction: str, background: str) -> str:
    """One caption from the grammar, wording drawn from rng."""
    words = {
        "c": colour,
        "s": str(rng.choice(SHAPE_WORDS[shape])),
        "d": str(rng.choice(DIRECTION_PHRASES[direction])),
        "b": str(rng.choice(BACKGROUND_WORDS[background])),
    }
    templates = TEMPLATES_PLAIN if rng.random() < PLAIN_SHARE else TEMPLATES_WITH_BACKGROUND
    return str(rng.choice(templates)).format(**words)


def all_caption_words() -> list[str]:
    """Every caption the grammar can produce, one per word combination (tokenizer training)."""
    out = []
    for template in TEMPLATES_WITH_BACKGROUND + TEMPLATES_PLAIN:
        for colour in COLOURS:
            for shape in SHAPES:
                for s in SHAPE_WORDS[shape]:
                    for direction in DIRECTIONS:
                        for d in DIRECTION_PHRASES[direction]:
                            for bg in BACKGROUNDS:
                                for b in BACKGROUND_WORDS[bg]:
                                    out.append(template.format(c=colour, s=s, d=d, b=b))
    return sorted(set(out))


def sample_motion(rng: np.random.Generator, direction: str, size: int = SIZE) -> MotionSpec:
    """A straight move that crosses most of the frame and stays fully inside it."""
    scale = size / 64.0
    half = float(rng.uniform(*HALF_SIZE)) * scale
    margin = half + 1.5 * scale
    travel = float(rng.uniform(32.0, 40.0)) * scale
    travel = min(travel, size - 2 * margin)
    dx, dy = DIRECTIONS[direction]
    along_lo = margin if (dx + dy) > 0 else margin + travel
    along = along_lo + float(rng.uniform(0.0, size - 2 * margin - travel))
    across = float(rng.uniform(margin, size - margin))
    start = (along, across) if dx != 0 else (across, along)
    return MotionSpec(half, travel, start)


def render(
    colour: str,
    shape: str,
    direction: str,
    background: str,
    motion: MotionSpec,
    num_frames: int = NUM_FRAMES,
    size: int = SIZE,
) -> np.ndarray:
    """Video uint8 [F, H, W, 3] of the shape moving in a straight line at constant speed."""
    py, px = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    fg = np.array(COLOURS[colour], np.float32)
    bg = np.array(BACKGROUNDS[background], np.float32)
    dx, dy = DIRECTIONS[direction]
    video = np.empty((num_frames, size, size, 3), np.uint8)
    for f in range(num_frames):
        step = motion.travel * f / max(num_frames - 1, 1)
        cx, cy = motion.start[0] + dx * step, motion.start[1] + dy * step
        alpha = shape_coverage(shape, px, py, cx, cy, motion.half_size)[..., None]
        video[f] = np.round(bg * (1 - alpha) + fg * alpha).astype(np.uint8)
    return video


def clip_attributes(index: int, seed: int = 0) -> tuple[dict, np.random.Generator]:
    """Attributes of clip ``index``; the returned rng continues the clip's own stream."""
    rng = np.random.default_rng([seed, index])
    colours, directions = list(COLOURS), list(DIRECTIONS)
    attrs = {
        "direction": directions[index % len(directions)],
        "colour": colours[(index // len(directions)) % len(colours)],
        "shape": SHAPES[int(rng.integers(len(SHAPES)))],
        "background": list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))],
    }
    return attrs, rng


def make_clip(
    index: int, seed: int = 0, num_frames: int = NUM_FRAMES, size: int = SIZE
) -> tuple[np.ndarray, str, dict]:
    """(video uint8 [F,H,W,3], caption, attributes) of clip ``index`` of data set ``seed``."""
    attrs, rng = clip_attributes(index, seed)
    motion = sample_motion(rng, attrs["direction"], size)
    caption = caption_for(rng, attrs["colour"], attrs["shape"], attrs["direction"], attrs["background"])
    video = render(attrs["colour"], attrs["shape"], attrs["direction"], attrs["background"], motion, num_frames, size)
    attrs = attrs | {
        "half_size": round(motion.half_size, 3),
        "travel": round(motion.travel, 3),
        "start": [round(v, 3) for v in motion.start],
    }
    return video, caption, attrs


def make_dataset(
    num_clips: int, seed: int = 0, num_frames: int = NUM_FRAMES, size: int = SIZE, start: int = 0
) -> tuple[np.ndarray, list[str], list[dict]]:
    """Clips ``start .. start+num_clips-1``: videos uint8 [N,F,H,W,3], captions, attributes."""
    videos = np.empty((num_clips, num_frames, size, size, 3), np.uint8)
    captions, attrs = [], []
    for i in range(num_clips):
        videos[i], caption, a = make_clip(start + i, seed, num_frames, size)
        captions.append(caption)
        attrs.append(a)
    return videos, captions, attrs


def direction_balanced_indices(rng: np.random.Generator, num_clips: int, batch_size: int) -> np.ndarray:
    """A batch with the same number of clips of each direction (direction = index % 4)."""
    k = len(DIRECTIONS)
    per = batch_size // k
    groups = [np.arange(d, num_clips, k) for d in range(k)]
    picks = [rng.choice(g, size=per, replace=False) for g in groups]
    rest = batch_size - per * k
    if rest:
        picks.append(rng.choice(num_clips, size=rest, replace=False))
    return np.concatenate(picks)
