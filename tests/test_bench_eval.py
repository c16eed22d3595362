"""bench and eval run on the small preset and produce well-formed tables, JSON and PNGs;
the metrics are checked against values known in closed form."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from sorakit.metrics import flicker, psnr, ssim, video_ssim


def test_psnr_known_values():
    a = np.zeros((8, 8, 3), np.uint8)
    b = np.full((8, 8, 3), 10, np.uint8)
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 100))
    assert psnr(a, a) == math.inf


def test_ssim_known_values():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    assert ssim(x, x) == pytest.approx(1.0)
    # two constant images: sigma = 0, so SSIM = (2 m1 m2 + C1) / (m1^2 + m2^2 + C1)
    c1 = (0.01 * 255) ** 2
    a, b = np.full((32, 32), 50.0), np.full((32, 32), 200.0)
    assert ssim(a, b) == pytest.approx((2 * 50 * 200 + c1) / (50**2 + 200**2 + c1))
    # an inverted image is strongly dissimilar; noise lowers SSIM monotonically
    assert ssim(x, 255 - x) < 0.1
    noisy1 = np.clip(x + rng.normal(0, 10, x.shape), 0, 255)
    noisy2 = np.clip(x + rng.normal(0, 40, x.shape), 0, 255)
    assert 1 > ssim(x, noisy1) > ssim(x, noisy2) > 0
    assert video_ssim(np.stack([x, x]), np.stack([x, x])) == pytest.approx(1.0)


def test_flicker():
    still = np.zeros((5, 4, 4, 3))
    assert flicker(still) == 0
    blink = np.stack([np.zeros((4, 4, 3)), np.full((4, 4, 3), 100.0)] * 2)
    assert flicker(blink) == pytest.approx(100.0)


def _cli(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "sorakit", *args], capture_output=True, text=True, timeout=timeout)


def test_bench_on_the_small_preset(tiny_bundle, tmp_path):
    out = tmp_path / "bench"
    res = _cli("bench", "--bundle", str(tiny_bundle[0]), "--out", str(out), "--steps", "4",
               "--work", str(tmp_path / "work"), "--rounds", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((out / "bench.json").read_text())
    rows = data["rows"]
    assert list(rows) == ["torch eager fp32", "ORT fp32 (all resident)", "+LPL", "+TDTM", "+CI-DL", "+int8",
                          "all (LPL+TDTM+CI-DL+int8/bf16+text tokens+step cache)"]
    assert rows["+LPL"]["transformer_calls"] == 3  # leap after 2 of 4 steps: 2 + 1 calls
    assert rows["ORT fp32 (all resident)"]["transformer_calls"] == 4
    assert rows["+CI-DL"]["loads"] > rows["ORT fp32 (all resident)"]["loads"]
    for r in rows.values():
        assert r["seconds"]["total"] > 0 and r["peak_rss_bytes"] > 0 and 0 <= r["ssim_vs_ort_fp32"] <= 1.0001
        assert r["speedup_vs_torch"] > 0
        assert len(r["rounds_total_s"]) == 2 and r["seconds"]["total"] == min(r["rounds_total_s"])  # fastest kept
    assert rows["+CI-DL"]["ssim_vs_ort_fp32"] == pytest.approx(1.0)  # streaming changes nothing numerically
    md = (out / "bench.md").read_text()
    assert md.count("\n| ") >= 14 and "Table 5" in md and "Command: `sorakit bench" in md
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["machine"]["cores"] >= 1
    bad = _cli("bench", "--bundle", str(tiny_bundle[0]), "--out", str(tmp_path / "bad"), "--rounds", "0")
    assert bad.returncode != 0 and "--rounds" in bad.stderr and not (tmp_path / "bad").exists()


def test_best_settings_name_every_pass_they_need():
    """The best rows build their bundle from BEST["passes"]: each setting that needs a pass's
    output names that pass (eval's best row once lacked the TDTM variants it runs)."""
    from sorakit.evaluation.best import BEST
    from sorakit.graph_passes.registry import known

    assert set(BEST["passes"]) <= set(known())
    assert (BEST["tdtm_steps"] > 0) <= ("tdtm" in BEST["passes"])
    assert set(BEST["pass_settings"]) <= set(BEST["passes"])


def test_eval_on_the_small_preset(tiny_bundle, tmp_path):
    out = tmp_path / "eval"
    res = _cli("eval", "--bundle", str(tiny_bundle[0]), "--out", str(out), "--steps", "4", "--prompts", "2",
               "--lpl", "2,dynamic:start=1", "--tdtm", "2", "--precisions", "int8", "--work", str(tmp_path / "work"),
               "--repeats", "2", "--step-cache", "0.2")
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads((out / "eval.json").read_text())
    assert data["timing_repeats"] == 2 and "fastest of 2 runs, taken in rounds" in (out / "eval.md").read_text()
    assert data["rows"]["reference"]["transformer_speedup"] == 1.0
    rows = data["rows"]
    assert set(rows) == {"reference", "lpl 2", "lpl dynamic:start=1", "tdtm 2", "int8", "cache 0.2"}
    assert rows["reference"]["ssim"] == pytest.approx(1.0)
    assert rows["lpl 2"]["transformer_calls"] == 3  # 2 steps then the leap (both prompts in each call)
    assert 0 < rows["tdtm 2"]["ssim"] < 1 and 0 < rows["int8"]["ssim"] <= 1
    assert all(r["flicker"] >= 0 for r in rows.values())
    cos = data["velocity_cosine"]
    assert len(cos) == 4 and cos[0] is None and all(-1 <= c <= 1 for c in cos[1:])
    assert "adherence" not in data  # not the shipped model
    for png in ("velocity_cosine.png", "quality_vs_speed.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert "| LPL 2 |" in (out / "eval.md").read_text()
    bad = _cli("eval", "--bundle", str(tiny_bundle[0]), "--out", str(tmp_path / "bad"), "--repeats", "0")
    assert bad.returncode != 0 and "--repeats" in bad.stderr and not (tmp_path / "bad").exists()


def test_eval_bad_input(tiny_bundle, tmp_path):
    res = _cli("eval", "--bundle", str(tiny_bundle[0]), "--out", str(tmp_path), "--precisions", "int4")
    assert res.returncode == 1 and "unknown precision 'int4'" in res.stderr
    res = _cli("eval", "--bundle", str(tiny_bundle[0]), "--out", str(tmp_path / "e"), "--cfg-max-t", "-5")
    assert res.returncode == 1 and "--cfg-max-t must be a positive timestep" in res.stderr
    assert not (tmp_path / "e").exists()
    video = tmp_path / "v.mp4"
    res = _cli("generate", "a red circle", "--bundle", str(tiny_bundle[0]), "--out", str(video), "--cfg-max-t", "0")
    assert res.returncode == 1 and "--cfg-max-t must be a positive timestep" in res.stderr and not video.exists()


def test_variant_bundles_are_reused_only_for_the_same_source(tiny_bundle, tmp_path):
    """A kept --work directory must not hand a variant of one model to the evaluation of another."""
    import shutil

    from sorakit.evaluation.common import variant_bundle

    src = tiny_bundle[0]
    work = tmp_path / "work"
    first = variant_bundle(src, work, ["prune"])
    stamp = (first / "manifest.json").stat().st_mtime_ns
    assert variant_bundle(src, work, ["prune"]) == first  # same source: reused, not rebuilt
    assert (first / "manifest.json").stat().st_mtime_ns == stamp
    other = tmp_path / "other"
    shutil.copytree(src, other)
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))  # another model's manifest
    second = variant_bundle(other, work, ["prune"])
    assert second != first and (second / "manifest.json").is_file()


def test_eval_markdown_shows_adherence_and_steadiness():
    """The adherence table carries the steadiness measures scored on real frames."""
    from sorakit.adherence import SHAPES, score_set
    from sorakit.evaluation.report import eval_markdown
    from sorakit.train.data import make_dataset

    videos, captions, attrs = make_dataset(8, seed=3)
    broken = videos.copy()
    broken[:, 9:] = broken[:, 9:, :, ::-1]  # mirrored halfway: a jump, and a doubled/moved object mid-clip
    other_shape = [f"a {a['colour']} {SHAPES[(SHAPES.index(a['shape']) + 1) % 4]} moving {a['direction']}" for a in attrs]
    res = {"preset": "shapes", "prompts": captions, "seeds": [0], "steps": 30, "cfg": 7.0, "rows": {},
           "velocity_cosine": [], "adherence": {"truth": score_set(videos, captions),
                                                "broken": score_set(broken, captions),
                                                "other shape": score_set(videos, other_shape)}}
    md = eval_markdown(res, "sorakit eval")
    keys = ("colour_acc", "shape_acc", "direction_acc", "both_acc", "background_steady_acc", "colour_consistency",
            "background_acc", "background_consistency", "single_object")
    for name, s in res["adherence"].items():
        row = next(line for line in md.splitlines() if line.startswith(f"| {name} |"))
        assert row == f"| {name} | " + " | ".join("-" if s[k] is None else f"{s[k]:.0%}" for k in keys) + " |"
    assert res["adherence"]["truth"]["single_object"] == 1.0 > res["adherence"]["broken"]["direction_acc"]
    assert res["adherence"]["truth"]["shape_acc"] == 1.0 and res["adherence"]["other shape"]["shape_acc"] == 0.0
