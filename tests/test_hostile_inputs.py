"""Hostile input, as a new user and a hostile user would type it: every case must end in one
``Error:`` line naming the problem (exit 1) on the command line, or a ``SorakitError`` subclass
(also ValueError/TypeError where natural) from Python — no traceback, nothing half-written,
nothing overwritten. The error contract is docs/errors.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sorakit.bundle.io import sha256_file
from sorakit.errors import (
    BudgetError,
    BundleError,
    InvalidArgument,
    InvalidArgumentType,
    NumericalError,
    OutputError,
    SorakitError,
)
from tests.conftest import copy_bundle

SENTINEL = b"an earlier video that must survive"


def run_cli(*args, cwd: Path, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if k != "SORAKIT_DEBUG"}
    full_env = {**base, "SORAKIT_CACHE": str(cwd / "cache"), "COLUMNS": "200", **(env or {})}
    return subprocess.run([sys.executable, "-m", "sorakit", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=full_env)


def assert_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 1, exactly one Error: line holding every needle, no traceback anywhere."""
    out = res.stdout + res.stderr
    assert res.returncode == 1, f"exit {res.returncode}\n{out[-3000:]}"
    assert "Traceback" not in out and 'File "' not in out, out[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, res.stderr[-3000:]
    for n in needles:
        assert n in errors[0], f"{n!r} not in {errors[0]!r}"
    return errors[0]


@pytest.fixture()
def workdir(tmp_path):
    """A directory holding an earlier output (which must survive) and a directory named like a video."""
    (tmp_path / "old.mp4").write_bytes(SENTINEL)
    (tmp_path / "dir.mp4").mkdir()
    return tmp_path


def assert_untouched(workdir: Path, before: set[str]) -> None:
    assert (workdir / "old.mp4").read_bytes() == SENTINEL
    now = {p.name for p in workdir.iterdir()} - {"cache"}
    assert now == before, f"left behind: {now - before}"
    cache = workdir / "cache"
    assert not cache.exists() or not any(cache.rglob("*.partial*"))


# ------------------------------------------------------------------------------------------------
# sorakit generate: every bad option fails before anything is loaded
# ------------------------------------------------------------------------------------------------
GENERATE_CASES = [
    (["--steps", "0"], ["--steps", "at least 1", "0"]),
    (["--steps", "-3"], ["--steps", "-3"]),
    (["--steps", "abc"], ["--steps"]),
    (["--steps", "100000"], ["--steps", "at most"]),
    (["--cfg", "nan"], ["--cfg", "finite", "nan"]),
    (["--cfg", "inf"], ["--cfg", "finite"]),
    (["--cfg", "1e30"], ["--cfg", "at most"]),
    (["--cfg", "-2"], ["--cfg", "at least 0"]),
    (["--cfg-max-t", "0"], ["--cfg-max-t", "positive timestep", "got 0"]),
    (["--cfg-max-t", "nan"], ["--cfg-max-t", "positive timestep", "nan"]),
    (["--seed", "-1"], ["--seed", "at least 0"]),
    (["--seed", str(2**64)], ["--seed", "at most"]),
    (["--lpl", "²"], ["LPL", "'²'"]),
    (["--lpl", "fixed:x"], ["fixed", "'fixed:x'"]),
    (["--lpl", "99", "--steps", "10"], ["leap_at=99", "10 steps"]),
    (["--lpl", "dynamic:start=99", "--steps", "10"], ["start=99", "10 steps"]),
    (["--lpl", "dynamic:tol=nan"], ["tol", "'nan'"]),
    (["--lpl", "dynamic:start=-1"], ["start", "'-1'"]),
    (["--tdtm-steps", "-1"], ["--tdtm-steps", "at least 0"]),
    (["--tdtm-steps", "40", "--steps", "30"], ["--tdtm-steps", "at most 30"]),
    (["--memory-budget", "1000%"], ["--memory-budget", "1000%", "at most 100%"]),
    (["--memory-budget", "1e999"], ["--memory-budget", "1e999", "finite"]),
    (["--memory-budget", "100TB"], ["--memory-budget", "100TB", "physical memory"]),
    (["--memory-budget", "-5GB"], ["--memory-budget", "-5GB"]),
    (["--memory-budget", "lots"], ["--memory-budget", "'lots'"]),
    (["--threads", "0"], ["--threads", "at least 1"]),
    (["--threads", "-4"], ["--threads", "-4"]),
    (["--fps", "0"], ["--fps", "at least 1"]),
    (["--fps", "-5"], ["--fps", "-5"]),
    (["--out", "dir.mp4"], ["dir.mp4", "existing directory"]),
    (["--out", "missing/x.mp4"], ["missing", "does not exist"]),
    (["--out", "x.avi"], ["x.avi", ".mp4 or .gif"]),
    (["--out", "old.mp4/x.mp4"], ["old.mp4", "not a directory"]),
    (["--device", "toaster"], ["toaster"]),
    (["--bogus"], ["--bogus"]),
]


@pytest.mark.parametrize("args,needles", GENERATE_CASES, ids=[" ".join(c[0]) for c in GENERATE_CASES])
def test_generate_refuses_bad_options_before_work(workdir, args, needles):
    before = {p.name for p in workdir.iterdir()}
    cmd = ["generate", "a red circle moving right"]
    if "--out" not in args:
        cmd += ["--out", "new.mp4"]
    res = run_cli(*cmd, *args, cwd=workdir)
    assert_error(res, *needles)
    assert_untouched(workdir, before)
    assert not (workdir / "cache").exists(), "the default model was assembled before the options were checked"


@pytest.mark.parametrize("prompt,needle", [
    ("", "empty"), ("   \t ", "empty"), ("\u200b\u200b\u200d", "invisible"), ("\u2060\ufeff", "invisible"),
])
def test_generate_refuses_empty_prompts(workdir, prompt, needle):
    before = {p.name for p in workdir.iterdir()}
    assert_error(run_cli("generate", prompt, "--out", "new.mp4", cwd=workdir), "prompt", needle)
    assert_untouched(workdir, before)


def test_generate_refuses_a_prompt_of_undecodable_bytes(workdir):
    before = {p.name for p in workdir.iterdir()}
    env = {**{k: x for k, x in os.environ.items() if k != "SORAKIT_DEBUG"}, "SORAKIT_CACHE": str(workdir / "cache"),
           "LC_ALL": "C.UTF-8"}
    res = subprocess.run([sys.executable, "-m", "sorakit", "generate", b"a red \xff circle", "--out", "new.mp4"],
                         capture_output=True, text=True, timeout=120, cwd=workdir, env=env)
    assert_error(res, "prompt is not valid text", "not UTF-8")
    assert_untouched(workdir, before)


def test_generate_missing_prompt_is_a_usage_error(workdir):
    res = run_cli("generate", cwd=workdir)
    assert_error(res, "prompt")
    assert "sorakit generate --help" in res.stderr


@pytest.mark.parametrize("bundle,needles", [
    ("old.mp4", ["old.mp4", "is a file, not a bundle directory"]),
    ("nowhere", ["nowhere", "does not exist"]),
    ("dir.mp4", ["dir.mp4", "not a sorakit bundle"]),
])
def test_generate_and_inspect_name_a_bad_bundle_path(workdir, bundle, needles):
    before = {p.name for p in workdir.iterdir()}
    assert_error(run_cli("generate", "a red circle", "--bundle", bundle, "--out", "new.mp4", cwd=workdir), *needles)
    assert_error(run_cli("inspect", bundle, cwd=workdir), *needles)
    assert_untouched(workdir, before)


def test_markup_in_prompts_paths_and_hints_is_printed_as_is(tiny_bundle, workdir):
    """A prompt holding rich markup ([/] used to crash the CLI after the video was written)."""
    out = workdir / "a [b] c.gif"
    res = run_cli("generate", "[/] a [bold]red[/bold] circle [", "--bundle", tiny_bundle[0], "--steps", "1",
                  "--out", out.name, cwd=workdir)
    assert res.returncode == 0, res.stderr[-3000:]
    assert out.is_file() and out.stat().st_size > 0
    assert "Traceback" not in res.stderr and "a [b] c.gif" in res.stdout.replace("\n", "")
    # and a hint holding brackets survives: the export hint names the extra to install
    script = ("from sorakit.cli.main import app, main\n"
              "from sorakit.errors import SorakitError\n"
              "@app.command('boom')\n"
              "def boom():\n"
              "    raise SorakitError('needs [/] torch', hint=\"pip install 'sorakit[export]'\")\n"
              "main(['boom'])\n")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1
    assert "Error: needs [/] torch" in res.stderr and "Hint: pip install 'sorakit[export]'" in res.stderr


def test_unexpected_errors_are_one_line_unless_debugging(workdir):
    script = ("import sys\nfrom sorakit.cli.main import app, main\n"
              "@app.command('boom')\n"
              "def boom():\n"
              "    {}['missing key']\n"
              "main(sys.argv[1:])\n")
    res = subprocess.run([sys.executable, "-c", script, "boom"], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if k != "SORAKIT_DEBUG"})
    line = assert_error(res, "unexpected KeyError", "'missing key'")
    assert "--debug" in res.stderr and "SORAKIT_DEBUG=1" in res.stderr and line
    for args, env in ((["boom", "--debug"], {}), (["--debug", "boom"], {}), (["boom"], {"SORAKIT_DEBUG": "1"})):
        dbg = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120,
                             env={**os.environ, **env})
        assert dbg.returncode == 1 and "Traceback" in dbg.stderr and "Error: unexpected KeyError" in dbg.stderr


def test_debug_flag_shows_the_traceback_of_a_sorakit_error(workdir):
    res = run_cli("generate", "x", "--steps", "0", "--debug", cwd=workdir)
    assert res.returncode == 1 and "Traceback" in res.stderr and "Error: --steps must be at least 1" in res.stderr


# ------------------------------------------------------------------------------------------------
# the other commands
# ------------------------------------------------------------------------------------------------
OTHER_CASES = [
    (["export", "--preset", "tiny", "--random-weights", "--frames", "0", "--out", "b"], ["--frames", "at least 1"]),
    (["export", "--preset", "tiny", "--random-weights", "--resolution", "0x0", "--out", "b"], ["--resolution"]),
    (["export", "--preset", "tiny", "--random-weights", "--resolution", "64by64", "--out", "b"], ["'64by64'"]),
    (["export", "--preset", "tiny", "--random-weights", "--resolution", "60x64", "--out", "b"], ["multiple of"]),
    (["export", "--preset", "tiny", "--random-weights", "--opset", "5", "--out", "b"], ["--opset", "at least 17"]),
    (["export", "--preset", "tiny", "--random-weights", "--granularity", "0", "--out", "b"], ["--granularity"]),
    (["export", "--preset", "tiny", "--random-weights", "--seed", "-1", "--out", "b"], ["--seed"]),
    (["export", "--preset", "tiny", "--random-weights", "--components", "unet", "--out", "b"], ["unet"]),
    (["export", "--preset", "tiny", "--random-weights", "--out", "old.mp4"], ["old.mp4", "existing file"]),
    (["export", "--preset", "nope", "--random-weights", "--out", "b"], ["'nope'"]),
    (["bench", "--rounds", "0", "--out", "b"], ["--rounds"]),
    (["bench", "--threads", "0", "--out", "b"], ["--threads"]),
    (["bench", "--steps", "0", "--out", "b"], ["--steps"]),
    (["bench", "--out", "old.mp4"], ["old.mp4", "existing file"]),
    (["eval", "--seeds", "0", "--out", "b"], ["--seeds", "at least 1"]),
    (["eval", "--prompts", "9", "--out", "b"], ["--prompts", "at most"]),
    (["eval", "--steps", "10", "--lpl", "15", "--out", "b"], ["leap_at=15"]),
    (["eval", "--steps", "10", "--tdtm", "20", "--out", "b"], ["--tdtm", "at most 10"]),
    (["eval", "--cfg-max-t", "-1", "--out", "b"], ["--cfg-max-t"]),
    (["eval", "--repeats", "0", "--out", "b"], ["--repeats"]),
    (["cache", "--verify", "--clear"], ["--verify", "--clear"]),
    (["nosuchcommand"], ["nosuchcommand"]),
]


@pytest.mark.parametrize("args,needles", OTHER_CASES, ids=[" ".join(c[0][:4]) for c in OTHER_CASES])
def test_other_commands_refuse_bad_options_before_work(workdir, args, needles):
    before = {p.name for p in workdir.iterdir()}
    assert_error(run_cli(*args, cwd=workdir), *needles)
    assert_untouched(workdir, before)
    assert not (workdir / "b").exists() and not (workdir / "b.partial").exists()


def test_optimize_refuses_bad_options_before_work(tiny_bundle, workdir):
    before = {p.name for p in workdir.iterdir()}
    for args, needles in (
        (["--passes", "int8", "--gate", "int8=nan"], ["--gate", "int8=nan"]),
        (["--passes", "int8", "--gate", "int8=2"], ["--gate", "int8=2"]),
        (["--passes", "int8", "--gate-steps", "0"], ["--gate-steps"]),
        (["--passes", "pin", "--resolution", "0x64", "--frames", "17"], ["--resolution"]),
        (["--passes", "pin", "--resolution", "64x64", "--frames", "-1"], ["--frames"]),
    ):
        assert_error(run_cli("optimize", tiny_bundle[0], "--out", "opt", *args, cwd=workdir), *needles)
    assert_error(run_cli("optimize", tiny_bundle[0], "--out", "old.mp4", "--passes", "prune", cwd=workdir),
                 "old.mp4")
    assert_untouched(workdir, before)


def test_package_and_export_coreml_check_their_outputs(tiny_bundle, workdir):
    before = {p.name for p in workdir.iterdir()}
    assert_error(run_cli("package", tiny_bundle[0], "--out", "old.mp4", "--device", "cpu", cwd=workdir), "old.mp4")
    assert_error(run_cli("package", tiny_bundle[0], "--out", "p", "--style", "fast", cwd=workdir), "--style", "'fast'")
    assert_error(run_cli("export-coreml", "--out", "c", "--random-weights", "--precision", "int3", cwd=workdir),
                 "--precision")
    assert_untouched(workdir, before)


# ------------------------------------------------------------------------------------------------
# damaged bundles: named, never a traceback, in generate and inspect
# ------------------------------------------------------------------------------------------------
def _damage(bundle: Path, kind: str) -> None:
    mf = bundle / "manifest.json"
    m = json.loads(mf.read_text())

    def relist(rel):
        p = bundle / rel
        m["files"][rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}

    if kind == "files as a list":
        m["files"] = list(m["files"])
    elif kind == "record without bytes":
        del m["files"]["null_caption.npy"]["bytes"]
    elif kind == "geometry without height":
        del m["geometry"]["height"]
    elif kind == "pickled null caption":
        np.save(bundle / "null_caption.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
        relist("null_caption.npy")
    elif kind == "null caption of the wrong shape":
        np.save(bundle / "null_caption.npy", np.zeros((3, 3), np.float32))
        relist("null_caption.npy")
    elif kind == "corrupt graph, matching checksum":
        g = bundle / "transformer" / "epilogue.onnx"
        g.write_bytes(g.read_bytes()[: g.stat().st_size // 2])
        relist("transformer/epilogue.onnx")
    elif kind == "flipped weight byte":
        p = bundle / "vae" / "spatial_tail.onnx.data"
        data = bytearray(p.read_bytes())
        data[5] ^= 0x40
        p.write_bytes(bytes(data))
    elif kind == "truncated weight file":
        p = bundle / "vae" / "spatial_tail.onnx.data"
        p.write_bytes(p.read_bytes()[:-7])
    elif kind == "not JSON":
        mf.write_text("{ nope")
        return
    mf.write_text(json.dumps(m))


DAMAGE = {
    "files as a list": "files must be an object",
    "record without bytes": "files['null_caption.npy'] lacks 'bytes'",
    "geometry without height": "geometry lacks 'height'",
    "pickled null caption": "null_caption.npy is not a plain numeric .npy array",
    "null caption of the wrong shape": "null_caption.npy has shape [3, 3]",
    "corrupt graph, matching checksum": "transformer/epilogue.onnx is not a valid ONNX model",
    "flipped weight byte": "vae/spatial_tail.onnx.data is corrupt",
    "truncated weight file": "vae/spatial_tail.onnx.data has",
    "not JSON": "is not valid JSON",
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_bundles_are_named(tiny_bundle, workdir, kind):
    b = copy_bundle(tiny_bundle[0], workdir / "bundle")
    _damage(b, kind)
    before = {p.name for p in workdir.iterdir()}
    assert_error(run_cli("generate", "a red circle", "--bundle", "bundle", "--out", "old.mp4", "--steps", "1",
                         cwd=workdir), DAMAGE[kind])
    assert_untouched(workdir, before)
    if kind == "flipped weight byte":  # found by hashing
        assert_error(run_cli("inspect", "bundle", "--verify", cwd=workdir), DAMAGE[kind])
    elif "null caption" not in kind:  # inspect does not read the null caption
        assert_error(run_cli("inspect", "bundle", cwd=workdir), DAMAGE[kind])


def test_checkpoint_with_a_bad_safetensors_header(workdir):
    ckpt = workdir / "ckpt"
    ckpt.mkdir()
    header = json.dumps({"w": {"dtype": "F32", "data_offsets": [0, 16]}}).encode()
    (ckpt / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(16))
    res = run_cli("export", "--preset", "tiny", "--transformer", "ckpt", "--components", "transformer", "--out", "b",
                  "--no-verify", cwd=workdir)
    assert_error(res, "model.safetensors", "'w'", "shape")
    assert not (workdir / "b").exists()


def test_pickle_checkpoint_refusal_is_worded_for_sorakit(workdir):
    import torch

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > pwned.txt",))

    ckpt = workdir / "ckpt"
    ckpt.mkdir()
    torch.save({"w": torch.zeros(2), "x": Evil()}, ckpt / "pytorch_model.bin")
    res = run_cli("export", "--preset", "tiny", "--transformer", "ckpt", "--components", "transformer", "--out", "b",
                  "--no-verify", cwd=workdir)
    line = assert_error(res, "pytorch_model.bin", "refuses to unpickle", "posix.system")
    assert "will likely succeed" not in res.stderr and "weights_only=False" not in res.stderr and line
    assert "Warning" not in res.stderr
    assert not (workdir / "pwned.txt").exists() and not (workdir / "b").exists()


# ------------------------------------------------------------------------------------------------
# the Python API
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe(tiny_bundle):
    from sorakit.runtime import Pipeline

    p = Pipeline.from_bundle(tiny_bundle[0])
    yield p
    p.close()


OPEN_CASES = [
    (dict(path=None), InvalidArgumentType, "path is None"),
    (dict(path=123), InvalidArgumentType, "bundle path must be a path"),
    (dict(path=b"/tmp"), InvalidArgumentType, "bundle path must be a path"),
    (dict(path=""), InvalidArgument, "bundle path is empty"),
    (dict(path="bundle\0x"), InvalidArgument, "NUL character"),
    (dict(threads=0), InvalidArgument, "threads must be at least 1"),
    (dict(threads=2.5), InvalidArgumentType, "threads must be an integer"),
    (dict(memory_budget="1000%"), InvalidArgument, "1000%"),
    (dict(memory_budget=10**15), InvalidArgument, "physical memory"),
    (dict(memory_budget=float("nan")), InvalidArgument, "finite"),
    (dict(memory_budget=[1]), InvalidArgumentType, "memory size must be"),
    (dict(strict="yes"), InvalidArgumentType, "strict must be True or False"),
    (dict(device=3), InvalidArgumentType, "device must be a profile name"),
    (dict(device="toaster"), SorakitError, "unknown device 'toaster'"),
]


@pytest.mark.parametrize("kwargs,exc,message", OPEN_CASES, ids=[str(c[0]) for c in OPEN_CASES])
def test_from_bundle_checks_its_arguments(tiny_bundle, kwargs, exc, message):
    from sorakit.runtime import Pipeline

    args = {"path": tiny_bundle[0], **kwargs}
    with pytest.raises(exc) as e:
        Pipeline.from_bundle(args.pop("path"), **args)
    assert message in str(e.value)
    assert isinstance(e.value, SorakitError)
    if exc is InvalidArgumentType:
        assert isinstance(e.value, TypeError)
    if exc is InvalidArgument:
        assert isinstance(e.value, ValueError)


def test_budget_over_physical_memory_can_be_forced(tiny_bundle):
    from sorakit.memory import total_memory
    from sorakit.runtime import Pipeline

    p = Pipeline.from_bundle(tiny_bundle[0], memory_budget=2 * total_memory(), force_budget=True)
    assert p.budget == 2 * total_memory()
    p.close()


CALL_CASES = [
    (dict(prompt=None), InvalidArgumentType, "prompt must be text (str), got NoneType"),
    (dict(prompt=123), InvalidArgumentType, "prompt must be text (str), got int"),
    (dict(prompt=b"a red circle"), InvalidArgumentType, "got bytes; decode it first"),
    (dict(prompt=[]), InvalidArgument, "prompt list is empty"),
    (dict(prompt=["a red circle", "  "]), InvalidArgument, "prompt[1] is empty"),
    (dict(prompt="\u200b"), InvalidArgument, "only invisible characters"),
    (dict(prompt="a \udcff circle"), InvalidArgument, "prompt is not valid text"),
    (dict(steps="10"), InvalidArgumentType, "steps must be an integer, got str '10'"),
    (dict(steps=2.5), InvalidArgumentType, "steps must be an integer, got float"),
    (dict(steps=True), InvalidArgumentType, "steps must be an integer, got bool"),
    (dict(steps=0), InvalidArgument, "steps must be at least 1, got 0"),
    (dict(cfg=float("nan")), InvalidArgument, "cfg must be a finite number"),
    (dict(cfg=float("inf")), InvalidArgument, "cfg must be a finite number"),
    (dict(cfg=1e30), InvalidArgument, "cfg must be at most 100"),
    (dict(cfg="7"), InvalidArgumentType, "cfg must be a number, got str"),
    (dict(cfg_max_t=0), InvalidArgument, "cfg_max_t must be a positive timestep"),
    (dict(seed="abc"), InvalidArgumentType, "seed must be an integer, got str 'abc'"),
    (dict(seed=-1), InvalidArgument, "seed must be at least 0"),
    (dict(seed=2**64), InvalidArgument, "seed must be at most"),
    (dict(seed=1.0), InvalidArgumentType, "seed must be an integer"),
    (dict(lpl=-1), InvalidArgument, "lpl -1 must be a step count"),
    (dict(lpl=2.5), InvalidArgumentType, "lpl must be a string"),
    (dict(lpl="dynamic", steps=10), InvalidArgument, "cannot leap within 10 steps"),
    (dict(lpl="dynamic:tol=-1", steps=30), InvalidArgument, "tol=-1.0 must be in [0, 2]"),
    (dict(lpl="fixed:4", steps=4), InvalidArgument, "leap_at=4 must be in [0, 3]"),
    (dict(tdtm_steps=-1), InvalidArgument, "tdtm_steps must be at least 0"),
    (dict(tdtm_steps=2, steps=4), SorakitError, "TDTM variants"),
    (dict(callback="x"), InvalidArgumentType, "callback must be a function"),
    (dict(height=0), InvalidArgument, "height must be at least 1"),
    (dict(width="64"), InvalidArgumentType, "width must be an integer"),
    (dict(num_frames=-1), InvalidArgument, "num_frames must be at least 1"),
    (dict(height=128, width=128), SorakitError, "static shapes for 64x64"),
    (dict(noise=[0.0]), InvalidArgumentType, "noise must be a numpy array"),
    (dict(noise=np.zeros((1, 4, 5, 8, 9), np.float32)), InvalidArgument, "noise has shape (1, 4, 5, 8, 9), expected"),
]


@pytest.mark.parametrize("kwargs,exc,message", CALL_CASES, ids=[str(c[0])[:60] for c in CALL_CASES])
def test_pipeline_call_checks_arguments_before_any_work(pipe, kwargs, exc, message):
    calls = []
    kwargs = dict(kwargs)
    prompt = kwargs.pop("prompt", "a red circle moving right")
    kwargs.setdefault("callback", calls.append)
    loads = pipe.scheduler.stats.loads
    with pytest.raises(exc) as e:
        pipe(prompt, **kwargs)
    assert message in str(e.value)
    assert isinstance(e.value, SorakitError)
    assert isinstance(e.value, TypeError if exc is InvalidArgumentType else ValueError) or exc is SorakitError
    assert calls == [] and pipe.scheduler.stats.loads == loads  # nothing ran


def test_nan_noise_is_refused_and_int_lpl_accepted(pipe):
    shape = (1, pipe.preset.stdit.in_channels, *pipe.preset.latent_size(17, 64, 64))
    noise = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    bad = noise.copy()
    bad[0, 0, 0, 0, 0] = np.nan
    with pytest.raises(InvalidArgument, match="noise holds 1 NaN or infinite"):
        pipe("a red circle", noise=bad, steps=2)
    r = pipe("a red circle", steps=4, lpl=2, noise=noise, seed=np.int64(3))  # ints (numpy too) accepted
    assert r.sampling.model_calls == 3 and r.sampling.leap_step == [2]
    same = pipe("a red circle", steps=4, lpl="2", noise=noise)
    assert np.array_equal(r.frames, same.frames)


def test_nan_in_the_latent_stops_sampling_naming_the_step():
    from sorakit.presets import SamplerConfig
    from sorakit.runtime.sampler import rflow_sample, timestep_schedule

    z = np.random.default_rng(0).standard_normal((1, 2, 3, 2, 2)).astype(np.float32)
    ts = timestep_schedule(SamplerConfig(), 10, 64, 64, 3)

    def model(z_in, t, step, active):
        out = np.concatenate([z_in, z_in], axis=1)
        return out * (np.float32(np.inf) if step == 3 else np.float32(0.5))

    seen = []
    with pytest.raises(NumericalError, match="at denoising step 4 of 10") as e:
        rflow_sample(model, z, ts, 7.0, on_step=lambda i, r: seen.append(i))
    assert seen == [0, 1, 2] and isinstance(e.value, ArithmeticError) and "cfg" in e.value.hint


def test_non_finite_weights_stop_generation_with_an_error(tiny_bundle, tmp_path):
    """A bundle whose weights are NaN (checksums consistent): an error naming the step, not a black video."""
    from sorakit.runtime import Pipeline

    b = copy_bundle(tiny_bundle[0], tmp_path / "b")
    rel = "transformer/epilogue.onnx.data"
    p = b / rel
    p.write_bytes(np.full(p.stat().st_size // 4, np.nan, np.float32).tobytes())
    m = json.loads((b / "manifest.json").read_text())
    m["files"][rel] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
    (b / "manifest.json").write_text(json.dumps(m))
    with Pipeline.from_bundle(b) as pipe, pytest.raises(NumericalError, match="denoising step 1 of 3"):
        pipe("a red circle", steps=3)


def test_output_checks(tmp_path):
    from sorakit.validate import output_dir, output_file

    (tmp_path / "f.mp4").write_bytes(b"x")
    (tmp_path / "d.gif").mkdir()
    with pytest.raises(OutputError, match="existing directory"):
        output_file(tmp_path / "d.gif", (".gif",))
    with pytest.raises(OutputError, match="does not exist"):
        output_file(tmp_path / "no" / "x.gif", (".gif",))
    with pytest.raises(OutputError, match="ending in .mp4 or .gif"):
        output_file(tmp_path / "x.webm", (".mp4", ".gif"))
    with pytest.raises(OutputError, match="existing file"):
        output_dir(tmp_path / "f.mp4")
    with pytest.raises(OutputError, match="is a file, not a directory"):
        output_dir(tmp_path / "f.mp4" / "sub" / "deeper")
    assert output_file(tmp_path / "f.mp4", (".mp4",)) == tmp_path / "f.mp4"  # overwriting a file is fine
    assert output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(OutputError, match="not writable"):
            output_file(ro / "x.mp4", (".mp4",))
        ro.chmod(0o700)


def test_budget_error_is_still_a_budget_error(tiny_bundle):
    from sorakit.runtime import Pipeline

    with pytest.raises(BudgetError, match="smallest workable budget"):
        Pipeline.from_bundle(tiny_bundle[0], memory_budget="1MB")
    with pytest.raises(BundleError, match="is a file, not a bundle directory"):
        Pipeline.from_bundle(tiny_bundle[0] / "manifest.json")


def test_file_size_limit_during_export_is_one_error_line(workdir):
    """EFBIG (a `ulimit -f` reached mid-export) is reported like a full disk, not as a traceback."""
    env = {**{k: x for k, x in os.environ.items() if k != "SORAKIT_DEBUG"}, "SORAKIT_CACHE": str(workdir / "cache")}
    res = subprocess.run(["sh", "-c", f"ulimit -f 64 && exec {sys.executable} -m sorakit export --preset tiny "
                                      "--random-weights --components transformer --out b --no-verify"],
                         capture_output=True, text=True, timeout=600, cwd=workdir, env=env)
    assert_error(res)
    assert "file-size limit" in res.stderr
    assert not (workdir / "b").exists()  # only the resumable staging directory b.partial
