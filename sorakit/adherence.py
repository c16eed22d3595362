"""Prompt adherence for the moving-shapes domain, measured from the frames alone (numpy only).

Used by the training recipe (periodic evaluation), the tests and ``sorakit eval``. For one
video and its prompt it answers two questions a person watching the clip would ask:

* **colour**: is the moving object the prompt's colour? The background of every frame is
  its per-channel median (the object covers well under half of the frame); object pixels are
  the ones far from it; the object's colour is the median of its clearly-inside pixels over
  all frames, named by the nearest palette colour. The neutral colours (black, grey, white)
  are in the naming palette too, so a washed-out or grey blob does not pass as "red".
* **direction**: does the object's centroid move the prompt's way? A least-squares line is
  fitted to the centroid's x and y over the frames. The motion passes only if the dominant
  axis and sign are the prompt's, the displacement over the clip is at least
  ``MIN_DISPLACEMENT`` pixels, the other axis moves at most half as much, and the line
  explains most of the motion (R^2 >= ``MIN_LINEARITY``), so jittering or jumping blobs fail.

Both scores look at the clip as a whole, so they tolerate defects a viewer notices. Three
steadiness measures (reported, not part of the pass/fail) count them frame by frame:
``colour_consistency`` (frames whose object has the clip's colour), ``background_consistency``
(frames whose background has the clip's background colour) and ``single_object`` (frames that
show exactly one object rather than a doubled one). ``background_ok`` says whether the
background is the one the prompt names, when it names one.

The vocabulary of the domain (colours, shapes, directions, backgrounds and their synonyms)
lives here rather than in ``sorakit.train.data`` so that this module stays free of torch
and the data generator can share it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# -- the domain's vocabulary --------------------------------------------------------------
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 190, 60),
    "blue": (40, 80, 235),
    "yellow": (240, 220, 40),
    "magenta": (220, 50, 220),
    "cyan": (40, 215, 230),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (10, 10, 10),
    "gray": (120, 120, 120),
    "white": (245, 245, 245),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
DIRECTIONS: dict[str, tuple[int, int]] = {  # (dx, dy) in image coordinates (y grows downwards)
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
}
# words a prompt may use for each attribute (the caption grammar uses all of them)
COLOUR_WORDS = {c: (c,) for c in COLOURS}
BACKGROUND_WORDS = {"black": ("black",), "gray": ("gray", "grey"), "white": ("white",)}
SHAPE_WORDS = {
    "circle": ("circle", "ball", "disc"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "diamond": ("diamond",),
}
DIRECTION_WORDS = {
    "left": ("left", "leftwards", "leftward"),
    "right": ("right", "rightwards", "rightward"),
    "up": ("up", "upwards", "upward"),
    "down": ("down", "downwards", "downward"),
}

# -- the shapes' geometry (the data generator draws them, the scorer matches them) --------
# area of each shape in units of its half size squared (circle radius h; square half side
# 0.9 h; diamond |x| + |y| <= 1.3 h; equilateral triangle with inradius 0.65 h)
SHAPE_AREA = {"circle": np.pi, "square": 1.8**2, "triangle": 3 * np.sqrt(3) * 0.65**2, "diamond": 2 * 1.3**2}


def shape_coverage(shape: str, px: np.ndarray, py: np.ndarray, cx: float, cy: float, half: float) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] from a signed distance (one-pixel soft edge).

    Every shape is centred on (cx, cy) and axis-aligned; the triangle points up and is
    centred on its incentre (which is its centroid)."""
    dx, dy = px - cx, py - cy
    if shape == "circle":
        sdf = np.hypot(dx, dy) - half
    elif shape == "square":
        sdf = np.maximum(np.abs(dx), np.abs(dy)) - half * 0.9
    elif shape == "diamond":
        sdf = (np.abs(dx) + np.abs(dy) - half * 1.3) / np.sqrt(2.0)
    elif shape == "triangle":  # pointing up, centred on its incentre
        r_in = half * 0.65
        n1 = dy  # bottom edge, outward normal (0, 1)
        n2 = -0.5 * dy + 0.8660254 * dx
        n3 = -0.5 * dy - 0.8660254 * dx
        sdf = np.maximum(np.maximum(n1, n2), n3) - r_in
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.clip(0.5 - sdf, 0.0, 1.0)


# -- thresholds (pixels on a 64 x 64 clip scale with the frame size) ----------------------
OBJECT_DISTANCE = 60.0  # RGB distance from the background that makes a pixel "object"
CORE_DISTANCE = 110.0  # pixels this far out are inside the object (no edge blending)
MIN_AREA_FRACTION = 0.002  # fewer object pixels than this fraction of the frame: no object
MIN_DISPLACEMENT_FRACTION = 0.125  # the move must cover 1/8 of the frame side (8 px at 64)
MAX_CROSS_RATIO = 0.5  # the other axis may move at most half as far
MIN_LINEARITY = 0.7  # R^2 of the straight-line fit along the dominant axis
MIN_TRACKED_FRACTION = 0.6  # the object must be visible in this share of the frames
SHAPE_RIM = 2  # pixels around an object's mask that still count as its (soft, possibly blurred) edge
BACKGROUND_STEADY_DISTANCE = 30.0  # RGB distance a frame's background may stray from the clip's

NEUTRALS = {"black": (10, 10, 10), "gray": (120, 120, 120), "white": (245, 245, 245)}


@dataclass(frozen=True)
class PromptIntent:
    colour: str | None
    direction: str | None
    shape: str | None = None
    background: str | None = None


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def _find(words: list[str], table: dict[str, tuple[str, ...]], skip: set[int] | None = None) -> tuple[str | None, int]:
    for i, w in enumerate(words):
        if skip and i in skip:
            continue
        for name, synonyms in table.items():
            if w in synonyms:
                return name, i
    return None, -1


def parse_prompt(prompt: str) -> PromptIntent:
    """The colour, direction, shape and background a prompt asks for (None if it names none).

    The object's colour is the first colour word; the background is the colour word right
    before "background" (so "a white square on a black background" is white on black).
    """
    words = _words(prompt)
    background, bg_at = None, -1
    for i, w in enumerate(words):
        if w in ("background", "backdrop") and i > 0:
            background, _ = _find([words[i - 1]], BACKGROUND_WORDS | {c: (c,) for c in COLOURS})
            bg_at = i - 1 if background else -1
    colour, _ = _find(words, {c: COLOUR_WORDS[c] for c in COLOURS}, skip={bg_at})
    shape, _ = _find(words, SHAPE_WORDS)
    direction, _ = _find(words, DIRECTION_WORDS)
    return PromptIntent(colour, direction, shape, background)


# -- measuring a video --------------------------------------------------------------------
def background_colours(frames: np.ndarray) -> np.ndarray:
    """Per-frame background colour [F, 3]: the per-channel median over the frame."""
    flat = frames.reshape(frames.shape[0], -1, 3).astype(np.float32)
    return np.median(flat, axis=1)


def object_masks(frames: np.ndarray, threshold: float = OBJECT_DISTANCE) -> tuple[np.ndarray, np.ndarray]:
    """(mask [F,H,W] of object pixels, distance [F,H,W] of every pixel from its background)."""
    bg = background_colours(frames)
    dist = np.linalg.norm(frames.astype(np.float32) - bg[:, None, None, :], axis=-1)
    return dist > threshold, dist


def name_colour(rgb: np.ndarray) -> str:
    """Nearest palette colour name, neutrals included (so grey blobs are not "red")."""
    palette = COLOURS | NEUTRALS
    names = list(palette)
    ref = np.array([palette[n] for n in names], dtype=np.float32)
    return names[int(np.argmin(np.linalg.norm(ref - np.asarray(rgb, np.float32)[None], axis=1)))]


def centroid_track(mask: np.ndarray) -> np.ndarray:
    """Object centroid (x, y) per frame [F, 2]; NaN where the frame shows no object."""
    F, H, W = mask.shape
    min_area = max(4, int(MIN_AREA_FRACTION * H * W))
    ys, xs = np.mgrid[0:H, 0:W]
    track = np.full((F, 2), np.nan, dtype=np.float64)
    for f in range(F):
        m = mask[f]
        n = int(m.sum())
        if n >= min_area:
            track[f] = (xs[m].mean(), ys[m].mean())
    return track


def _line_fit(t: np.ndarray, v: np.ndarray) -> tuple[float, float]:
    """(slope, R^2) of a least-squares line v ~ a t + b."""
    a, b = np.polyfit(t, v, 1)
    resid = v - (a * t + b)
    total = float(((v - v.mean()) ** 2).sum())
    r2 = 1.0 - float((resid**2).sum()) / total if total > 1e-9 else 0.0
    return float(a), r2


def measure_motion(mask: np.ndarray) -> dict:
    """Direction of the centroid's motion with the evidence behind it."""
    F, H, W = mask.shape
    track = centroid_track(mask)
    ok = ~np.isnan(track[:, 0])
    out = {"direction": None, "displacement": (0.0, 0.0), "linearity": 0.0, "tracked": float(ok.mean())}
    if ok.mean() < MIN_TRACKED_FRACTION or ok.sum() < 3:
        return out
    t = np.arange(F, dtype=np.float64)[ok]
    (ax, r2x), (ay, r2y) = _line_fit(t, track[ok, 0]), _line_fit(t, track[ok, 1])
    dx, dy = ax * (F - 1), ay * (F - 1)
    out["displacement"] = (dx, dy)
    horizontal = abs(dx) >= abs(dy)
    main, cross, r2 = (dx, dy, r2x) if horizontal else (dy, dx, r2y)
    out["linearity"] = r2
    side = min(H, W)
    if abs(main) < MIN_DISPLACEMENT_FRACTION * side or abs(cross) > MAX_CROSS_RATIO * abs(main) or r2 < MIN_LINEARITY:
        return out
    if horizontal:
        out["direction"] = "right" if main > 0 else "left"
    else:
        out["direction"] = "down" if main > 0 else "up"
    return out


def _named_colour(frames: np.ndarray, core: np.ndarray, mask: np.ndarray) -> str | None:
    """Name of the median colour of the clearly-inside pixels (the object mask if too few)."""
    pixels = core if core.sum() >= 4 else mask
    if pixels.sum() < 4:
        return None
    return name_colour(np.median(frames[pixels].astype(np.float32), axis=0))


def measure_colour(frames: np.ndarray, dist: np.ndarray, mask: np.ndarray) -> str | None:
    return _named_colour(frames, dist > CORE_DISTANCE, mask)


def colour_consistency(frames: np.ndarray, dist: np.ndarray, mask: np.ndarray, colour: str | None) -> float | None:
    """Share of the frames showing an object whose own colour is the clip's colour.

    The clip's colour is a median over all frames, so a clip that turns magenta for a few
    frames still scores as red; this says how steady the colour is (None: no object).
    """
    if colour is None:
        return None
    core = dist > CORE_DISTANCE
    named = [n for f in range(frames.shape[0]) if (n := _named_colour(frames[f], core[f], mask[f])) is not None]
    return sum(n == colour for n in named) / len(named) if named else None


def blob_labels(mask: np.ndarray) -> np.ndarray:
    """4-connected parts of the object mask [F,H,W]: one label per part (0: background)."""
    F, H, W = mask.shape
    ids = np.arange(1, H * W + 1, dtype=np.int64).reshape(1, H, W)
    labels = np.where(mask, ids, 0)
    while True:  # every pixel takes the largest label among its object neighbours until nothing changes
        pad = np.pad(labels, ((0, 0), (1, 1), (1, 1)))
        grown = np.maximum.reduce(
            [labels, pad[:, :-2, 1:-1], pad[:, 2:, 1:-1], pad[:, 1:-1, :-2], pad[:, 1:-1, 2:]]
        )
        grown = np.where(mask, grown, 0)
        if np.array_equal(grown, labels):
            break
        labels = grown
    return labels


def blob_counts(mask: np.ndarray, labels: np.ndarray | None = None) -> np.ndarray:
    """Per frame, the number of separate objects: 4-connected parts of the object mask [F,H,W]
    with at least the minimum object area (specks and edge noise do not count). Parts one pixel
    apart count as one object: a video file's 4:2:0 chroma leaves a sharp edge's row of pixels
    close to the background's colour, which cuts that edge's outer row off the object.
    ``labels`` is not used (kept for callers that computed ``blob_labels(mask)``)."""
    F, H, W = mask.shape
    min_area = max(4, int(MIN_AREA_FRACTION * H * W))
    pad = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
    bridged = mask | pad[:, :-2, 1:-1] | pad[:, 2:, 1:-1] | pad[:, 1:-1, :-2] | pad[:, 1:-1, 2:]
    joined = np.where(mask, blob_labels(bridged), 0)
    counts = np.zeros(F, dtype=np.int64)
    for f in range(F):
        _, sizes = np.unique(joined[f][joined[f] > 0], return_counts=True)
        counts[f] = int((sizes >= min_area).sum())
    return counts


def single_object_share(mask: np.ndarray, labels: np.ndarray | None = None) -> float | None:
    """Share of the frames showing an object that show exactly one (None: no object anywhere)."""
    counts = blob_counts(mask, labels)
    shown = counts[counts > 0]
    return float((shown == 1).mean()) if len(shown) else None


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """Grow a [H,W] mask by ``steps`` pixels (4-neighbourhood)."""
    for _ in range(steps):
        pad = np.pad(mask, 1)
        mask = mask | pad[:-2, 1:-1] | pad[2:, 1:-1] | pad[1:-1, :-2] | pad[1:-1, 2:]
    return mask


def object_coverage(dist: np.ndarray, part: np.ndarray) -> np.ndarray:
    """Soft coverage [H,W] in [0, 1] of one object part (``part``: its mask) of a frame.

    A pixel's distance from the background grows linearly with how much of it the object
    covers (anti-aliased edges and blur are blends of the two colours), so the distance
    divided by that of the object's inside is the coverage. Only pixels within
    ``SHAPE_RIM`` of the part count, so other objects and specks stay out."""
    core = part & (dist > CORE_DISTANCE)
    inside = float(np.median(dist[core])) if core.sum() >= 4 else float(np.percentile(dist[part], 90))
    return np.where(_dilate(part, SHAPE_RIM), np.clip(dist / max(inside, 1e-6), 0.0, 1.0), 0.0)


def classify_shape(coverage: np.ndarray) -> tuple[str, dict[str, float]]:
    """The shape whose outline fits the coverage [H,W] best, and each shape's fit.

    Each shape of the domain is drawn at the coverage's centroid with the coverage's area
    (its half size follows from ``SHAPE_AREA``); the fit is the soft intersection over union
    sum(min(a, b)) / sum(max(a, b)). Position and size come from the object itself, so only
    the outline decides."""
    H, W = coverage.shape
    py, px = np.mgrid[0:H, 0:W].astype(np.float32) + 0.5
    area = float(coverage.sum())
    cx, cy = float((coverage * px).sum()) / area, float((coverage * py).sum()) / area
    fits = {}
    for shape in SHAPES:
        drawn = shape_coverage(shape, px, py, cx, cy, float(np.sqrt(area / SHAPE_AREA[shape])))
        fits[shape] = float(np.minimum(coverage, drawn).sum() / np.maximum(coverage, drawn).sum())
    return max(fits, key=fits.__getitem__), fits


def frame_shapes(dist: np.ndarray, mask: np.ndarray, labels: np.ndarray | None = None) -> list[str | None]:
    """Per frame, the shape of its largest object part (None: the frame shows no object)."""
    F, H, W = mask.shape
    min_area = max(4, int(MIN_AREA_FRACTION * H * W))
    labels = blob_labels(mask) if labels is None else labels
    shapes: list[str | None] = []
    for f in range(F):
        ids, sizes = np.unique(labels[f][labels[f] > 0], return_counts=True)
        if not len(sizes) or sizes.max() < min_area:
            shapes.append(None)
            continue
        shapes.append(classify_shape(object_coverage(dist[f], labels[f] == ids[np.argmax(sizes)]))[0])
    return shapes


def measure_shape(
    dist: np.ndarray, mask: np.ndarray, labels: np.ndarray | None = None
) -> tuple[str | None, float | None]:
    """(the clip's shape: the one most frames show, share of the frames showing an object
    whose outline is that shape); (None, None) if no frame shows an object."""
    named = [s for s in frame_shapes(dist, mask, labels) if s is not None]
    if not named:
        return None, None
    counts = {s: named.count(s) for s in SHAPES}
    clip = max(SHAPES, key=counts.__getitem__)
    return clip, counts[clip] / len(named)


def measure_background(frames: np.ndarray) -> tuple[str, float]:
    """(the clip's background colour name, share of the frames whose own background has it).

    Named over the palette, neutrals included; a background that turns from grey to white
    halfway through keeps its median name but loses steadiness.
    """
    per_frame = background_colours(frames)
    clip = name_colour(np.median(per_frame, axis=0))
    return clip, float(np.mean([name_colour(c) == clip for c in per_frame]))


def background_is_steady(frames: np.ndarray) -> bool:
    """Does every frame's background stay within ``BACKGROUND_STEADY_DISTANCE`` of the clip's
    (the per-channel median over the frames)? A background that flickers between grey and
    white, or fades, fails."""
    per_frame = background_colours(frames)
    drift = np.linalg.norm(per_frame - np.median(per_frame, axis=0)[None], axis=1)
    return bool(drift.max() <= BACKGROUND_STEADY_DISTANCE)


def score_video(frames: np.ndarray, prompt: str) -> dict:
    """Score one video [F,H,W,3] uint8 against its prompt.

    Returns colour_ok, direction_ok, the measured colour and direction, the prompt's intent
    and the motion evidence (displacement in pixels over the clip, R^2, tracked share).
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames [F,H,W,3], got {frames.shape}")
    intent = parse_prompt(prompt)
    mask, dist = object_masks(frames)
    colour = measure_colour(frames, dist, mask)
    motion = measure_motion(mask)
    consistency = colour_consistency(frames, dist, mask, colour)
    background, background_share = measure_background(frames)
    labels = blob_labels(mask)
    single = single_object_share(mask, labels)
    shape, shape_share = measure_shape(dist, mask, labels)
    steady = background_is_steady(frames)
    return {
        "prompt": prompt,
        "want_colour": intent.colour,
        "want_direction": intent.direction,
        "want_shape": intent.shape,
        "colour": colour,
        "direction": motion["direction"],
        "shape": shape,
        "colour_ok": intent.colour is not None and colour == intent.colour,
        "direction_ok": intent.direction is not None and motion["direction"] == intent.direction,
        "shape_ok": intent.shape is not None and shape == intent.shape,
        "background_steady": steady,
        "displacement": [round(float(v), 2) for v in motion["displacement"]],
        "linearity": round(float(motion["linearity"]), 3),
        "tracked": round(float(motion["tracked"]), 3),
        "colour_consistency": consistency if consistency is None else round(consistency, 3),
        "background": background,
        "background_ok": None if intent.background is None else background == intent.background,
        "background_consistency": round(background_share, 3),
        "single_object": single if single is None else round(single, 3),
        "shape_consistency": shape_share if shape_share is None else round(shape_share, 3),
    }


def score_set(videos: Sequence[np.ndarray] | np.ndarray, prompts: Sequence[str]) -> dict:
    """Score videos [n,F,H,W,3] against their prompts: accuracies and per-prompt results."""
    if len(videos) != len(prompts):
        raise ValueError(f"{len(videos)} videos for {len(prompts)} prompts")
    per = [score_video(v, p) for v, p in zip(videos, prompts)]
    n = max(len(per), 1)

    def mean_of(key: str) -> float | None:  # over the prompts where the measure applies
        vals = [float(r[key]) for r in per if r[key] is not None]
        return float(np.mean(vals)) if vals else None

    return {
        "colour_acc": sum(r["colour_ok"] for r in per) / n,
        "direction_acc": sum(r["direction_ok"] for r in per) / n,
        "both_acc": sum(r["colour_ok"] and r["direction_ok"] for r in per) / n,
        "shape_acc": sum(r["shape_ok"] for r in per) / n,
        "background_steady_acc": sum(r["background_steady"] for r in per) / n,
        "shape_consistency": mean_of("shape_consistency"),
        "colour_consistency": mean_of("colour_consistency"),
        "background_acc": mean_of("background_ok"),
        "background_consistency": mean_of("background_consistency"),
        "single_object": mean_of("single_object"),
        "n": len(per),
        "per_prompt": per,
    }


# -- the fixed evaluation set -------------------------------------------------------------
def _eval_prompts() -> list[str]:
    """24 prompts: every colour with every direction, shapes and wordings rotating."""
    colours = list(COLOURS)
    directions = list(DIRECTIONS)
    backgrounds = [None, "black", "gray", "white"]
    prompts = []
    for i in range(24):
        colour, direction = colours[i // 4], directions[i % 4]
        shape = SHAPES[(i + i // 4) % len(SHAPES)]
        bg = backgrounds[(i // 4 + i) % len(backgrounds)]
        text = f"a {colour} {shape} moving {direction}"
        if bg is not None:
            text += f" on a {bg} background"
        prompts.append(text)
    return prompts


def _selection_prompts() -> list[str]:
    """24 prompts for choices (settings, checkpoints): every colour with every direction, but
    other shapes, backgrounds and wording than the evaluation prompts, so that the evaluation
    set is never used to choose anything."""
    colours, directions = list(COLOURS), list(DIRECTIONS)
    backgrounds = ["white", None, "black", "gray"]
    shape_words = {"circle": "ball", "square": "box", "triangle": "triangle", "diamond": "diamond"}
    prompts = []
    for i in range(24):
        colour, direction = colours[i // 4], directions[i % 4]
        shape = SHAPES[(i + 2 * (i // 4) + 1) % len(SHAPES)]
        bg = backgrounds[(i + 3 * (i // 4)) % len(backgrounds)]
        text = f"the {colour} {shape_words[shape]} moves {direction}"
        if bg is not None:
            text += f" against a {bg} background"
        prompts.append(text)
    return prompts


EVAL_PROMPTS: tuple[str, ...] = tuple(_eval_prompts())
SELECTION_PROMPTS: tuple[str, ...] = tuple(_selection_prompts())
SELECTION_SEEDS = (10, 11, 12, 13)  # noise seeds for choices (the evaluation uses 0 .. 3)
EVAL_SEED = 0  # the 24 prompts are generated as one batch from this seed
EVAL_STEPS = 30
EVAL_CFG = 7.0
# the measures score_set reports beside the pass/fail score: (its key, what it counts)
STEADINESS = (
    ("colour_consistency", "colour consistency (frames whose object has the clip's own colour)"),
    ("background_acc", "background as the prompt names it (prompts that name one)"),
    ("background_consistency", "background consistency (frames whose background has the clip's colour)"),
    ("single_object", "single object (frames showing exactly one object)"),
)
# What the shipped model is held to, on EVAL_PROMPTS x EVAL_SEEDS (96 videos, 30 steps):
# (score_set key, name, target with the model's own sampler). single_object is a share of
# frames; the others are shares of videos.
ATTRIBUTES = (
    ("colour_acc", "colour", 0.90),
    ("shape_acc", "shape", 0.80),
    ("direction_acc", "direction", 0.95),
    ("single_object", "single object", 0.90),
    ("background_steady_acc", "background steady", 0.95),
)
TARGETS_CFG_EVERY_STEP = {"colour_acc": 0.85, "shape_acc": 0.75}  # with CFG 7 at every step (Open-Sora's sampler)
EVAL_SEEDS = (0, 1, 2, 3)
MAX_SEED_GAP = 0.10  # per attribute, the lowest seed may be at most this far below the mean over the seeds


def describe(scores: dict) -> str:
    """One line naming every attribute's score, e.g. "colour 92%, shape 83%, ..." (— where none)."""
    return ", ".join(f"{name} " + ("—" if scores.get(key) is None else f"{scores[key]:.0%}") for key, name, _ in ATTRIBUTES)


def seed_summary(by_seed: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Per attribute: the mean over the seeds' scores, the lowest seed's score and the gap."""
    out = {}
    for key, _, _ in ATTRIBUTES:
        vals = [float(s[key] or 0.0) for s in by_seed]
        out[key] = {"mean": float(np.mean(vals)), "lowest": min(vals), "gap": float(np.mean(vals)) - min(vals)}
    return out


def target_misses(by_seed: Sequence[dict], every_step: Sequence[dict] | None = None) -> list[str]:
    """The targets the scores miss, one line each (empty: every target met).

    ``by_seed``: score_set results of the evaluation prompts per noise seed with the model's
    sampler; ``every_step``: the same with CFG 7 at every step."""
    misses = []
    summary = seed_summary(by_seed)
    for key, name, target in ATTRIBUTES:
        m = summary[key]
        if m["mean"] < target:
            misses.append(f"{name} {m['mean']:.1%} < {target:.0%}")
        if m["gap"] > MAX_SEED_GAP + 1e-9:
            misses.append(f"{name}: lowest seed {m['lowest']:.1%} is {m['gap']:.1%} below the mean")
    if every_step is not None:
        summary = seed_summary(every_step)
        for key, target in TARGETS_CFG_EVERY_STEP.items():
            if summary[key]["mean"] < target:
                misses.append(f"{key.removesuffix('_acc')} with CFG at every step {summary[key]['mean']:.1%} < {target:.0%}")
    return misses
