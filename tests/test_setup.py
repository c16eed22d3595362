"""The README's set-up commands are the ones CI and the demo use; the layer boundaries hold."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```sh\n(.*?)```", setup, re.S)]


def test_readme_has_exactly_two_setup_commands():
    cmds = readme_commands()
    assert len(cmds) == 2 and all("\n" not in c for c in cmds)
    main_job, tests = cmds
    assert "pip install -c constraints.txt" in main_job and "sorakit generate" in main_job and ".mp4" in main_job
    assert "pip install -c constraints.txt" in tests and "pytest" in tests and "ruff check" in tests


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert readme_commands()[1] in [line.strip() for line in ci]


def test_make_demo_matches_readme_main_job():
    demo = (ROOT / "Makefile").read_text().split("demo:", 1)[1].splitlines()[1].strip()
    assert demo.replace(".venv/bin/", "") in readme_commands()[0].replace(".venv/bin/", "")


def test_torch_pinned_to_the_cpu_build():
    pins = (ROOT / "constraints.txt").read_text().splitlines()
    assert "torch==2.13.0" in pins
    meta = (ROOT / "pyproject.toml").read_text()
    assert "torch==" not in meta  # the library's own range stays open; the install path pins it


def test_layer_boundaries_are_linted():
    res = subprocess.run([sys.executable, "-m", "ruff", "check", "--select", "TID", str(ROOT / "sorakit")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout
    # and the rule really bites: a torch import in the runtime is reported (checked via stdin)
    res = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--select", "TID251", "--stdin-filename",
         str(ROOT / "sorakit" / "runtime" / "probe.py"), "-"],
        input="import torch  # noqa: F401\n", capture_output=True, text=True, cwd=ROOT,
    )
    assert res.returncode != 0 and "torch" in res.stdout


def test_base_install_generates_with_the_default_model(tmp_path):
    """The runtime-only install: the package without extras in a fresh venv generates a video
    with the shipped model, and holds neither torch, onnx nor an ffmpeg binary."""
    import json
    import os

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    res = subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", "-c",
                          str(ROOT / "constraints.txt"), str(ROOT)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    listed = subprocess.run([str(py), "-m", "pip", "list", "--format", "json"], capture_output=True, text=True)
    installed = {p["name"].lower() for p in json.loads(listed.stdout)}
    assert not installed & {"torch", "onnx", "imageio-ffmpeg", "transformers", "diffusers", "coremltools"}, installed
    out = tmp_path / "red.mp4"
    env = {**os.environ, "SORAKIT_CACHE": str(tmp_path / "cache")}
    env.pop("PYTHONPATH", None)
    res = subprocess.run([str(venv / "bin" / "sorakit"), "generate", "a red circle moving right", "--steps", "6",
                          "--out", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert out.is_file() and out.stat().st_size > 10_000
    # the video decodes, with the model's frame count and size
    probe = subprocess.run([str(py), "-c", "from sorakit.runtime.video import read_video; import sys; "
                            "v = read_video(sys.argv[1]); print(*v.shape)", str(out)], capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.split() == ["17", "64", "64", "3"]
