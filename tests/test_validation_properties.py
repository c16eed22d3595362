"""Property-based checks of the CLI's numeric options and the budget parser: for any value, the
validation either returns a value inside the documented range or raises InvalidArgument naming
the option — never another exception. The checks are called directly (they are what the CLI
calls before any work); a few cases go through a real `sorakit` process."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sorakit import validate as v
from sorakit.errors import InvalidArgument, SorakitError
from sorakit.runtime.sampler import LPL
from sorakit.runtime.validate import cli_options, memory_budget
from sorakit.units import parse_bytes

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

anything = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12), st.binary(max_size=6),
    st.lists(st.integers(), max_size=2),
)
numbers = st.one_of(st.integers(min_value=-(2**80), max_value=2**80), st.floats(allow_nan=True, allow_infinity=True))

# option -> (keyword of cli_options, accepted range)
INT_OPTIONS = {
    "--steps": ("steps", 1, v.MAX_STEPS),
    "--seed": ("seed", 0, v.SEED_MAX),
    "--threads": ("threads", 1, v.MAX_THREADS),
    "--fps": ("fps", 1, v.MAX_FPS),
    "--tdtm-steps": ("tdtm_steps", 0, v.MAX_STEPS),
}
FLOAT_OPTIONS = {"--cfg": ("cfg", 0.0, 100.0), "--cfg-max-t": ("cfg_max_t", 0.0, 1e6)}


def _call(key: str, value):
    return cli_options(**{key: value})


@FAST
@given(st.sampled_from(sorted(INT_OPTIONS)), st.one_of(numbers, anything))
@example("--steps", 0)
@example("--seed", -1)
@example("--seed", 2**64)
@example("--fps", 0)
@example("--threads", -4)
def test_integer_options(flag, value):
    key, lo, hi = INT_OPTIONS[flag]
    try:
        got = _call(key, value)[key]
        if value is None and key in ("steps", "threads"):  # None: the bundle's or device's default
            assert got is None
            return
    except InvalidArgument as e:
        assert str(e).startswith(flag + " "), str(e)
        ok = isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi
        assert not ok, f"{value!r} is valid for {flag} but was refused: {e}"
        return
    assert isinstance(got, int) and lo <= got <= hi and got == value and not isinstance(value, bool)


@FAST
@given(st.sampled_from(sorted(FLOAT_OPTIONS)), st.one_of(numbers, anything))
@example("--cfg", float("nan"))
@example("--cfg", float("inf"))
@example("--cfg", 1e30)
@example("--cfg-max-t", 0.0)
@example("--cfg", 10**400)
def test_float_options(flag, value):
    key, lo, hi = FLOAT_OPTIONS[flag]
    try:
        got = _call(key, value)[key]
    except InvalidArgument as e:
        assert str(e).startswith(flag + " "), str(e)
        return
    if value is None:
        assert got is None
        return
    assert isinstance(got, float) and math.isfinite(got) and lo <= got <= hi
    assert not (key == "cfg_max_t" and got == 0)


@FAST
@given(st.text(max_size=30))
@example("²")
@example("dynamic:start=1e3")
@example("dynamic:tol=nan")
@example("fixed:")
@example("٣")
def test_lpl_text(spec):
    try:
        lpl = LPL.parse(spec)
    except InvalidArgument as e:
        assert "lpl" in str(e).lower()
        return
    assert lpl.mode in ("off", "fixed", "dynamic")
    for steps in (1, 5, 30):
        try:
            lpl.validate(steps)
        except InvalidArgument as e:
            assert "LPL" in str(e)
        else:
            if lpl.mode == "fixed":
                assert 0 <= lpl.leap_at < steps
            if lpl.mode == "dynamic":
                assert 1 <= lpl.start and lpl.start + lpl.patience <= steps and 0 <= lpl.tolerance <= 2


UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@FAST
@given(st.one_of(st.text(max_size=16), numbers, anything))
@example("1e999")
@example("1000%")
@example("-5GB")
@example("0.0001")
@example("nan")
@example("2GB ")
def test_budget_parser_never_fails_otherwise(spec):
    try:
        n = parse_bytes(spec, available=8 * 10**9)
    except InvalidArgument as e:
        assert "memory size" in str(e)
        return
    assert isinstance(n, int) and 1 <= n <= 2**62


@FAST
@given(st.integers(min_value=1, max_value=10**6), st.sampled_from(sorted(UNITS)))
def test_budget_parser_reads_sizes(count, unit):
    assert parse_bytes(f"{count}{unit.upper() if count % 2 else unit}") == count * UNITS[unit]


@FAST
@given(st.floats(min_value=0.001, max_value=100.0))
def test_budget_percentages(pct):
    n = parse_bytes(f"{pct!r}%", available=10**9)
    assert 1 <= n <= 10**9 and abs(n - pct / 100 * 10**9) <= 1


@FAST
@given(st.one_of(st.text(max_size=16), numbers))
def test_memory_budget_option_stays_below_physical_memory(spec):
    from sorakit.memory import total_memory

    try:
        got = memory_budget(spec, name="--memory-budget")
    except InvalidArgument as e:
        assert str(e).startswith("--memory-budget")
        return
    assert got in (None, "unlimited") or 1 <= got <= total_memory()


@FAST
@given(st.text(max_size=16))
@example("0x0")
@example("64x64x")
@example("٦٤x64")
def test_resolution_text(text):
    try:
        h, w = v.resolution(text, "--resolution")
    except InvalidArgument as e:
        assert str(e).startswith("--resolution")
        return
    assert 1 <= h <= v.MAX_SIDE and 1 <= w <= v.MAX_SIDE


@FAST
@given(anything)
def test_prompt_check(value):
    try:
        p = v.prompt(value)
    except InvalidArgument as e:
        assert "prompt" in str(e)
        return
    assert isinstance(p, str) and p.strip()


@settings(max_examples=4, deadline=None, derandomize=True)
@given(st.sampled_from(["--cfg", "--steps", "--fps", "--threads", "--seed"]),
       st.sampled_from(["nan", "-inf", "-1", "1e400", "", "99999999999999999999999"]))
def test_cli_numeric_options_in_a_real_process(tmp_path_factory, flag, text):
    d = tmp_path_factory.mktemp("cli")
    env = {**{k: x for k, x in os.environ.items() if k != "SORAKIT_DEBUG"}, "SORAKIT_CACHE": str(d / "cache")}
    res = subprocess.run([sys.executable, "-m", "sorakit", "generate", "a red circle", flag, text, "--out",
                          str(d / "v.mp4")], capture_output=True, text=True, timeout=120, env=env)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and flag in errors[0], res.stderr
    assert not (d / "v.mp4").exists() and not (d / "cache").exists()


def test_validation_errors_are_value_errors():
    with pytest.raises(ValueError):
        v.steps(0)
    with pytest.raises(TypeError):
        v.steps("3")
    assert issubclass(InvalidArgument, SorakitError)
