"""Checking arguments before any work: numbers, seeds, prompts, callbacks, output paths.

Every check returns the value it accepted (normalised: numpy scalars become Python numbers)
or raises ``InvalidArgument`` (a ``ValueError``) / ``InvalidArgumentType`` (a ``TypeError``)
whose message names the argument as the caller spells it: ``"steps"`` from Python,
``"--steps"`` from the command line. The runtime's generation arguments are checked in
``sorakit.runtime.validate``; the CLI calls both before it loads anything.
"""

from __future__ import annotations

import math
import numbers
import os
import unicodedata
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from sorakit.errors import InvalidArgument, InvalidArgumentType, NumericalError, OutputError

SEED_MAX = 2**64 - 1  # numpy's SeedSequence takes any non-negative int; torch.manual_seed takes < 2**64
MAX_THREADS = 1024
MAX_STEPS = 1000  # the sampler's timestep range: more steps than timesteps repeat timesteps
MAX_FPS = 240
MAX_FRAMES = 4096
MAX_SIDE = 16384
CFG_RANGE = (0.0, 100.0)  # 1 = no guidance; Open-Sora samples at 7


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(value: Any) -> str:
    return type(value).__name__


def integer(name: str, value: Any, *, min: int | None = None, max: int | None = None) -> int:
    """An int (Python or numpy; not bool, not float, not str) inside [min, max]."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise InvalidArgumentType(f"{name} must be an integer, got {_kind(value)} {_show(value)}")
    value = int(value)
    if min is not None and value < min:
        raise InvalidArgument(f"{name} must be at least {min}, got {value}")
    if max is not None and value > max:
        raise InvalidArgument(f"{name} must be at most {max}, got {value}")
    return value


def number(name: str, value: Any, *, min: float | None = None, max: float | None = None,
           min_open: bool = False) -> float:
    """A finite real number (int or float, Python or numpy; not bool, not str) inside [min, max]
    (``(min, max]`` with ``min_open``)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise InvalidArgumentType(f"{name} must be a number, got {_kind(value)} {_show(value)}")
    try:
        value = float(value)
    except OverflowError:  # an int beyond float's range
        raise InvalidArgument(f"{name} must be a finite number, got {_show(value)}") from None
    if not math.isfinite(value):
        raise InvalidArgument(f"{name} must be a finite number, got {value}")
    if min is not None and (value <= min if min_open else value < min):
        raise InvalidArgument(f"{name} must be {'above' if min_open else 'at least'} {min:g}, got {value:g}")
    if max is not None and value > max:
        raise InvalidArgument(f"{name} must be at most {max:g}, got {value:g}")
    return value


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InvalidArgumentType(f"{name} must be True or False, got {_kind(value)} {_show(value)}")
    return bool(value)


def seed(value: Any, name: str = "seed") -> int:
    """A noise seed: an integer in [0, 2**64 - 1]."""
    return integer(name, value, min=0, max=SEED_MAX)


def steps(value: Any, name: str = "steps") -> int:
    return integer(name, value, min=1, max=MAX_STEPS)


def threads(value: Any, name: str = "threads") -> int:
    return integer(name, value, min=1, max=MAX_THREADS)


def fps(value: Any, name: str = "fps") -> int:
    return integer(name, value, min=1, max=MAX_FPS)


def frames(value: Any, name: str = "frames") -> int:
    return integer(name, value, min=1, max=MAX_FRAMES)


def cfg(value: Any, name: str = "cfg") -> float:
    """A classifier-free guidance scale: finite, in CFG_RANGE (1 = the prompt alone)."""
    return number(name, value, min=CFG_RANGE[0], max=CFG_RANGE[1])


def timestep_bound(value: Any, name: str = "cfg_max_t") -> float:
    """The top of a guidance interval: a positive timestep (1000 or more = every step)."""
    try:
        return number(name, value, min=0.0, min_open=True, max=1e6)
    except InvalidArgumentType:
        raise
    except InvalidArgument:
        raise InvalidArgument(f"{name} must be a positive timestep (1000 = guidance at every step, at most 1e6), "
                              f"got {_show(value)}") from None


def resolution(value: Any, name: str = "resolution") -> tuple[int, int]:
    """'256x256' or (256, 256) -> (height, width), each in [1, MAX_SIDE]."""
    if isinstance(value, str):
        text = value.strip().lower()
        h, sep, w = text.partition("x")
        if not sep or not (h.isascii() and h.isdigit() and w.isascii() and w.isdigit()):
            raise InvalidArgument(f"{name} {value!r} is not HEIGHTxWIDTH in pixels, e.g. 256x256")
        value = (int(h), int(w))
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise InvalidArgumentType(f"{name} must be HEIGHTxWIDTH or a (height, width) pair, got {_show(value)}")
    return (integer(f"{name} height", value[0], min=1, max=MAX_SIDE),
            integer(f"{name} width", value[1], min=1, max=MAX_SIDE))


def choice(name: str, value: Any, options: Iterable[str]) -> str:
    options = list(options)
    if not isinstance(value, str):
        raise InvalidArgumentType(f"{name} must be one of {', '.join(options)}, got {_kind(value)} {_show(value)}")
    if value not in options:
        raise InvalidArgument(f"{name} {value!r} is not one of {', '.join(options)}")
    return value


def callback(value: Any, name: str = "callback") -> Callable | None:
    if value is not None and not callable(value):
        raise InvalidArgumentType(f"{name} must be a function (or None), got {_kind(value)} {_show(value)}")
    return value


def _visible(text: str) -> bool:
    """True if the text has a character that is not whitespace, a control or a format character
    (zero-width spaces, joiners, marks of direction)."""
    return any(not ch.isspace() and unicodedata.category(ch) not in ("Cc", "Cf", "Zs", "Zl", "Zp", "Co", "Cn", "Cs")
               for ch in text)


def prompt(value: Any, name: str = "prompt") -> str:
    """A prompt: text with at least one visible character."""
    if isinstance(value, (bytes, bytearray)):
        raise InvalidArgumentType(f"{name} must be text (str), got {_kind(value)}; decode it first, "
                                  "e.g. prompt.decode('utf-8')")
    if not isinstance(value, str):
        raise InvalidArgumentType(f"{name} must be text (str), got {_kind(value)} {_show(value)}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # lone surrogates: bytes that were not UTF-8 on the command line
        raise InvalidArgument(f"the {name} is not valid text: character {e.start + 1} is not UTF-8 "
                              "(check the terminal's encoding)") from None
    if not _visible(value):
        what = "empty" if not value.strip() else "only invisible characters"
        raise InvalidArgument(f"the {name} is {what}; describe the video to generate")
    return value


def prompts(value: Any, name: str = "prompt") -> list[str]:
    """A prompt or a non-empty list/tuple of prompts -> a list of prompts."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise InvalidArgument(f"the {name} list is empty; give at least one prompt")
        return [prompt(p, f"{name}[{i}]") for i, p in enumerate(value)]
    return [prompt(value, name)]


def path_like(name: str, value: Any) -> Path:
    if not isinstance(value, (str, os.PathLike)) or isinstance(value, bytes):
        raise InvalidArgumentType(f"{name} must be a path (str or pathlib.Path), got {_kind(value)} {_show(value)}")
    text = os.fspath(value)
    if not isinstance(text, str) or not text.strip():
        raise InvalidArgument(f"{name} is empty; give a path")
    if "\0" in text:
        raise InvalidArgument(f"{name} {text!r} contains a NUL character")
    return Path(text)


def _writable_dir(d: Path) -> bool:
    return os.access(d, os.W_OK | os.X_OK)


def output_file(value: Any, suffixes: Iterable[str], name: str = "output") -> Path:
    """A file about to be written: a known extension, an existing writable parent directory,
    not itself a directory, writable if it exists. Checked before the work that produces it."""
    path = path_like(name, value)
    suffixes = [s.lower() for s in suffixes]
    if path.suffix.lower() not in suffixes:
        raise OutputError(f"cannot write {name} {path}: use a file name ending in {' or '.join(suffixes)}")
    parent = path.parent
    if not parent.exists():
        raise OutputError(f"cannot write {name} {path}: directory {parent} does not exist")
    if not parent.is_dir():
        raise OutputError(f"cannot write {name} {path}: {parent} is not a directory")
    if path.is_dir():
        raise OutputError(f"cannot write {name} {path}: it is an existing directory",
                          hint="choose a file name, e.g. " + str(path / ("video" + suffixes[0])))
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"cannot write {name} {path}: the existing file is not writable")
    if not _writable_dir(parent):
        raise OutputError(f"cannot write {name} {path}: directory {parent} is not writable")
    return path


def output_dir(value: Any, name: str = "output directory") -> Path:
    """A directory about to be created or filled: not an existing file, and its nearest
    existing ancestor a writable directory."""
    path = path_like(name, value)
    if path.exists() and not path.is_dir():
        raise OutputError(f"cannot write {name} {path}: it is an existing file, not a directory")
    probe = path if path.exists() else path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"cannot write {name} {path}: {probe} is a file, not a directory")
    if not _writable_dir(probe):
        raise OutputError(f"cannot write {name} {path}: directory {probe} is not writable")
    return path


def finite_array(name: str, value: Any, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A float array (-> float32) of ``shape`` with no NaN or infinity."""
    if not isinstance(value, np.ndarray):
        raise InvalidArgumentType(f"{name} must be a numpy array, got {_kind(value)}")
    if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)) \
            or value.dtype == np.bool_:
        raise InvalidArgumentType(f"{name} must hold real numbers, got dtype {value.dtype}")
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise InvalidArgument(f"{name} has shape {tuple(value.shape)}, expected {tuple(shape)}")
    out = value.astype(np.float32)
    if not np.isfinite(out).all():
        bad = int(np.size(out) - np.count_nonzero(np.isfinite(out)))
        raise InvalidArgument(f"{name} holds {bad} NaN or infinite value(s) (or values beyond float32)")
    return out


def finite_latent(z: np.ndarray, step: int, num_steps: int, t: float) -> None:
    """Stop sampling when the latent stops being finite (a cheap sum per step)."""
    if not np.isfinite(np.sum(z, dtype=np.float64)):
        raise NumericalError(
            f"the latent became NaN or infinite at denoising step {step + 1} of {num_steps} (t={t:.1f}); "
            "the video would be garbage, so generation stopped",
            hint="lower cfg (the guidance scale) or check the bundle's weights (sorakit inspect BUNDLE --verify)",
        )
