"""The shapes model: data generator, tokenizer, adherence score, training recipe, shipped weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sorakit.adherence import COLOURS, EVAL_PROMPTS, parse_prompt, score_set, score_video
from sorakit.train.data import make_clip, make_dataset

SHIPPED_LIMIT_BYTES = 25 * 1024 * 1024


# -- data generator ----------------------------------------------------------------------
def test_generator_is_deterministic():
    a, cap_a, attr_a = make_clip(7, seed=3)
    b, cap_b, attr_b = make_clip(7, seed=3)
    assert np.array_equal(a, b) and cap_a == cap_b and attr_a == attr_b
    c, _, _ = make_clip(7, seed=4)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, make_clip(8, seed=3)[0])


def test_generator_geometry_and_balance():
    videos, captions, attrs = make_dataset(48, seed=0)
    assert videos.shape == (48, 17, 64, 64, 3) and videos.dtype == np.uint8
    assert len(set(a["colour"] for a in attrs)) >= 6
    assert {a["direction"] for a in attrs} == {"left", "right", "up", "down"}
    assert len(set(a["shape"] for a in attrs)) >= 4
    # any 24 consecutive clips hold every (colour, direction) pair once
    assert len({(a["colour"], a["direction"]) for a in attrs[:24]}) == 24
    assert len(set(captions)) > 40  # wording varies


def test_captions_parse_back_to_attributes():
    _, captions, attrs = make_dataset(96, seed=1)
    for caption, a in zip(captions, attrs):
        intent = parse_prompt(caption)
        assert (intent.colour, intent.direction, intent.shape) == (a["colour"], a["direction"], a["shape"]), caption
        assert intent.background in (None, a["background"]), caption


# -- adherence score ---------------------------------------------------------------------
def test_adherence_is_perfect_on_ground_truth_clips():
    videos, captions, _ = make_dataset(48, seed=2)
    s = score_set(videos, captions)
    assert s["colour_acc"] == 1.0 and s["direction_acc"] == 1.0
    assert s["colour_consistency"] == 1.0
    assert s["background_acc"] == 1.0 and s["background_consistency"] == 1.0 and s["single_object"] == 1.0


def _object_pixels(video: np.ndarray) -> np.ndarray:
    """[F,H,W] pixels far from their frame's median colour: the generated clip's object."""
    bg = np.median(video.reshape(len(video), -1, 3), axis=1)
    return np.abs(video.astype(int) - bg[:, None, None]).max(axis=-1) > 60


def test_steadiness_sees_a_switched_background_and_a_doubled_object():
    """Background switching for a few frames and a second copy of the object are counted per frame."""
    videos, captions, _ = make_dataset(6, seed=6)
    for video, caption in zip(videos, captions):
        obj = _object_pixels(video)
        other = (245, 245, 245) if np.median(video[0].reshape(-1, 3), axis=0).mean() < 200 else (10, 10, 10)
        switched = video.copy()
        for f in range(12, 17):  # the last 5 of 17 frames change background, the object stays
            switched[f][~obj[f]] = other
        r = score_video(switched, caption)
        assert r["background_consistency"] == pytest.approx(12 / 17, abs=0.01), (caption, r)
        assert r["colour_ok"] and r["direction_ok"] and r["single_object"] == 1.0, (caption, r)

        doubled = video.copy()
        for f in range(0, 17, 2):  # every other frame gets a second copy
            ys, xs = np.nonzero(obj[f])
            # half a frame away diagonally (objects are at most 31 px across: a gap in both axes);
            # what leaves the frame is cut off
            dy = 32 if ys.mean() < 32 else -32
            dx = 32 if xs.mean() < 32 else -32
            inside = (ys + dy >= 0) & (ys + dy < 64) & (xs + dx >= 0) & (xs + dx < 64)
            doubled[f, ys[inside] + dy, xs[inside] + dx] = video[f, ys[inside], xs[inside]]
        r = score_video(doubled, caption)
        assert r["single_object"] == pytest.approx(8 / 17, abs=0.01), (caption, r)
        assert r["background_consistency"] == 1.0, (caption, r)


def test_background_named_by_the_prompt_is_checked():
    videos, captions, attrs = make_dataset(24, seed=7)
    wrong = {"black": "white", "gray": "black", "white": "gray"}
    for video, a in zip(videos, attrs):
        right = f"a {a['colour']} {a['shape']} moving {a['direction']} on a {a['background']} background"
        assert score_video(video, right)["background_ok"] is True
        r = score_video(video, f"a {a['colour']} {a['shape']} moving {a['direction']} on a {wrong[a['background']]} background")
        assert r["background_ok"] is False and r["colour_ok"] and r["direction_ok"]
        assert score_video(video, f"a {a['colour']} {a['shape']} moving {a['direction']}")["background_ok"] is None


def test_colour_consistency_sees_frames_of_another_colour():
    """A clip that turns another colour for a few frames keeps its median colour but loses consistency."""
    from sorakit.adherence import COLOURS as PALETTE

    videos, captions, attrs = make_dataset(6, seed=4)
    for video, caption, a in zip(videos, captions, attrs):
        other = next(c for c in PALETTE if c != a["colour"])
        obj = _object_pixels(video)
        recoloured = video.copy()
        for f in range(0, 5):  # 5 of 17 frames: the median colour stays the clip's
            recoloured[f][obj[f]] = PALETTE[other]
        r = score_video(recoloured, caption)
        assert r["colour_ok"] and r["colour_consistency"] == pytest.approx(12 / 17, abs=0.07), (caption, r)
        assert score_video(video, caption)["colour_consistency"] == 1.0


def test_adherence_rejects_wrong_direction_and_colour():
    videos, captions, attrs = make_dataset(24, seed=5)
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    turn = {"left": "up", "up": "right", "right": "down", "down": "left"}
    for video, a in zip(videos, attrs):
        good = f"a {a['colour']} {a['shape']} moving {a['direction']}"
        assert score_video(video, good)["direction_ok"]
        assert not score_video(video, f"a {a['colour']} {a['shape']} moving {opposite[a['direction']]}")["direction_ok"]
        assert not score_video(video, f"a {a['colour']} {a['shape']} moving {turn[a['direction']]}")["direction_ok"]
        assert not score_video(video[::-1], good)["direction_ok"]  # time-reversed
        other = next(c for c in COLOURS if c != a["colour"])
        assert not score_video(video, f"a {other} {a['shape']} moving {a['direction']}")["colour_ok"]


def test_adherence_rejects_static_and_empty_videos():
    video, caption, _ = make_clip(0, seed=0)
    still = np.repeat(video[:1], len(video), axis=0)
    assert not score_video(still, caption)["direction_ok"]
    blank = np.zeros_like(video)
    r = score_video(blank, caption)
    assert not r["colour_ok"] and not r["direction_ok"]


def test_eval_prompts_cover_every_colour_and_direction():
    assert len(EVAL_PROMPTS) == 24
    pairs = {(parse_prompt(p).colour, parse_prompt(p).direction) for p in EVAL_PROMPTS}
    assert len(pairs) == 24


# -- tokenizer ---------------------------------------------------------------------------
def test_tokenizer_has_t5_ids_and_unknown_words(tmp_path):
    from sorakit.tokenizer import PromptTokenizer
    from sorakit.train.data import all_caption_words
    from sorakit.train.tokenizer import train_tokenizer

    path = train_tokenizer(all_caption_words(), tmp_path / "tokenizer.json")
    tok = PromptTokenizer(path, 24)
    assert (tok.tok.token_to_id("<pad>"), tok.tok.token_to_id("</s>"), tok.tok.token_to_id("<unk>")) == (0, 1, 2)
    batch = tok(["a red circle moving right", "a crimson zeppelin drifting sideways"])
    assert batch.ids[0, batch.lengths[0] - 1] == 1 and batch.unknown[0] == 0
    assert batch.unknown[1] == 4 and batch.ids[1, 0] == tok.tok.token_to_id("a")


# -- the recipe --------------------------------------------------------------------------
def test_recipe_runs_end_to_end_on_a_tiny_config(tmp_path):
    from sorakit.train.config import tiny_config, tiny_shapes_preset
    from sorakit.train.recipe import run
    from sorakit.train.weights import load_trained

    preset = tiny_shapes_preset()
    record = run(tmp_path, tiny_config(), preset, quiet=True)
    for name in ("transformer", "vae", "text_encoder"):
        assert (tmp_path / name / "model.safetensors").is_file()
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "training.json").is_file()
    assert len(record["velocity_cosine_mean"]) == tiny_config().eval_steps - 1
    models = load_trained(tmp_path, preset)  # strict
    assert models.vae.scale.flatten().tolist() == pytest.approx(record["vae_scale"])


# -- the shipped model -------------------------------------------------------------------
@pytest.fixture(scope="module")
def shipped():
    from sorakit.train.report import SHIPPED_DIR, load_shipped

    if not (SHIPPED_DIR / "transformer" / "model.safetensors").is_file():
        pytest.fail(f"the shipped shapes model is missing from {SHIPPED_DIR}")
    return load_shipped()


def test_shipped_files_within_size_limit():
    from sorakit.train.report import SHIPPED_DIR

    files = [p for p in SHIPPED_DIR.rglob("*") if p.is_file()]
    names = {p.relative_to(SHIPPED_DIR).as_posix() for p in files}
    for need in (
        "transformer/model.safetensors",
        "vae/model.safetensors",
        "text_encoder/model.safetensors",
        "tokenizer.json",
    ):
        assert need in names
    assert sum(p.stat().st_size for p in files) <= SHIPPED_LIMIT_BYTES


def test_shipped_weights_load_strictly(shipped):
    from sorakit.export.models import load
    from sorakit.presets import shapes_preset
    from sorakit.train.report import SHIPPED_DIR

    preset = shapes_preset()
    for name in ("transformer", "vae", "text_encoder"):
        load(name, SHIPPED_DIR / name, preset)
    # the preset states the latent normalisation the weights were trained with
    assert shipped.vae.shift.flatten().tolist() == pytest.approx(list(preset.vae.shift), abs=1e-6)
    assert shipped.vae.scale.flatten().tolist() == pytest.approx(list(preset.vae.scale), abs=1e-6)


def _shipped_record() -> dict:
    import json

    from sorakit.train.report import SHIPPED_DIR

    try:
        return json.loads((SHIPPED_DIR / "training.json").read_text())
    except (OSError, ValueError):
        return {}


def test_shipped_vae_keeps_colour_shape_and_direction():
    """The VAE alone is not the limit: held-out clips of the data generator, encoded, decoded
    and read back through .mp4 like generated videos, keep every attribute the prompts name
    (the model shipped before turned every shape into a round blob here)."""
    from sorakit.train.report import SHIPPED_DIR, vae_roundtrip

    out = vae_roundtrip(SHIPPED_DIR / "vae", clips=48)
    for key in ("colour_acc", "shape_acc", "direction_acc"):
        assert out[key] >= 0.95, (key, out)
    assert out["psnr"] >= 25.0, out


def _shipped_misses() -> list[str]:
    """The targets the shipped model's recorded figures (96 videos per sampler) miss."""
    from sorakit.adherence import ATTRIBUTES, target_misses

    m = _shipped_record().get("measured", {})
    by_seed = m.get("by_seed") or []
    if not by_seed or any(key not in by_seed[0] for key, _, _ in ATTRIBUTES):
        return ["no figures over seeds for every attribute recorded"]
    return target_misses(by_seed, m.get("by_seed_cfg_every_step"))


@pytest.fixture(scope="module")
def shipped_eval(shipped):
    """The 24 evaluation prompts sampled from the shipped model (seed 0, 30 steps, CFG 7 with
    the model's guidance interval, and CFG 7 at every step), scored."""
    from sorakit.adherence import EVAL_CFG, EVAL_SEED, EVAL_STEPS
    from sorakit.export.reference import ReferencePipeline
    from sorakit.train.report import with_sampler

    prompts = list(EVAL_PROMPTS)
    out = {}
    for name, models in (("default", shipped), ("every_step", with_sampler(shipped, guidance_max_t=None))):
        res = ReferencePipeline(models)(prompts, seed=EVAL_SEED, steps=EVAL_STEPS, cfg_scale=EVAL_CFG)
        out[name] = score_set(res.video, prompts)
    return out


def test_shipped_adherence_is_what_its_record_says(shipped_eval):
    """The seed-0 figures in training.json (and docs/training.md) are reproduced by sampling
    the files, every attribute, with the model's sampler and with CFG at every step."""
    from sorakit.adherence import ATTRIBUTES

    m = _shipped_record()["measured"]
    recorded = {"default": m["by_seed"][0], "every_step": (m.get("by_seed_cfg_every_step") or [None])[0]}
    for name, s in shipped_eval.items():
        if recorded[name] is None:
            continue
        for key, _, _ in ATTRIBUTES:
            assert s[key] == pytest.approx(recorded[name][key], abs=1.5 / 24), (name, key, s["per_prompt"])


def test_training_doc_shows_the_shipped_figures():
    """docs/training.md's figures block is what report renders from the shipped training.json."""
    from sorakit.train.figures import DOC_BEGIN, DOC_END, figures_markdown

    doc = (Path(__file__).resolve().parent.parent / "docs" / "training.md").read_text()
    block = doc.split(DOC_BEGIN, 1)[1].split(DOC_END, 1)[0].strip()
    assert block == figures_markdown(_shipped_record()).strip()


@pytest.mark.xfail(
    bool(_shipped_misses()),
    reason="the shipped shapes model misses adherence targets (its training.json records the figures, "
    "docs/training.md says why); this test turns strict once a model that meets them is shipped",
    strict=False,
)
def test_default_generation_follows_the_prompt(shipped_eval):
    """Every target of the 96-video evaluation is met by the recorded figures, which the test
    above reproduces at seed 0; and at seed 0 no attribute is far below its target."""
    from sorakit.adherence import ATTRIBUTES, MAX_SEED_GAP

    assert _shipped_misses() == []
    for key, name, target in ATTRIBUTES:
        assert shipped_eval["default"][key] >= target - MAX_SEED_GAP, (name, shipped_eval["default"]["per_prompt"])


def test_prompt_outside_the_vocabulary_still_generates(shipped):
    from sorakit.export.reference import ReferencePipeline

    res = ReferencePipeline(shipped)(["a crimson zeppelin drifting sideways!"], seed=1, steps=4, cfg_scale=7.0)
    assert res.video.shape == (1, 17, 64, 64, 3) and np.isfinite(res.video_float).all()


def test_recipe_continues_a_previous_dit_and_ships_a_checkpoint(tmp_path):
    """--vae-from/--dit-from: the VAE is reused as is and T5 + DiT training resumes from the
    saved weights; a checkpoint of that run is then shipped with report.ship."""
    import dataclasses
    import json

    from sorakit.export.models import save_checkpoint
    from sorakit.train.config import tiny_config, tiny_shapes_preset
    from sorakit.train.recipe import run
    from sorakit.train.report import ship
    from sorakit.train.weights import load_trained, save_fp16

    preset = tiny_shapes_preset()
    run(tmp_path / "a", tiny_config(), preset, quiet=True)
    first = load_trained(tmp_path / "a", preset)
    # move a's weights well away from the recipe's (seeded) initialisation, so that continuing
    # from them and starting afresh cannot look alike
    g = torch.Generator().manual_seed(5)
    for name in ("transformer", "text_encoder"):
        module = getattr(first, name)
        with torch.no_grad():
            for prm in module.parameters():
                prm.add_(0.1 * torch.randn(prm.shape, generator=g).to(prm.dtype))
        save_checkpoint(module.half(), tmp_path / "a" / name, name)
    first = load_trained(tmp_path / "a", preset)
    cfg = dataclasses.replace(tiny_config(), decoder_steps=0, dit_steps=1, dit_lr=1e-7)
    record = run(tmp_path / "b", cfg, preset, quiet=True, vae_from=tmp_path / "a", dit_from=tmp_path / "a")
    second = load_trained(tmp_path / "b", preset)
    assert record["reused"]["dit_from"] == str(tmp_path / "a")
    va, vb = first.vae.state_dict(), second.vae.state_dict()
    assert all(torch.equal(va[k], vb[k]) for k in va)  # the VAE is untouched with decoder_steps=0
    # one step at a tiny learning rate from the loaded weights leaves them where they were; a
    # re-initialised model (xavier, zeroed outputs) would be far from them
    for name, (ta, tb) in {
        "transformer": (first.transformer.state_dict(), second.transformer.state_dict()),
        "text_encoder": (first.text_encoder.state_dict(), second.text_encoder.state_dict()),
    }.items():
        worst = max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta)
        assert worst < 5e-3, name
    assert first.transformer.state_dict()["final_layer.linear.weight"].abs().max() > 1e-3  # not vacuous

    measured = {"per_prompt": [], "colour_acc": 0.5, "direction_acc": 0.25, "both_acc": 0.25}

    def measure(d):  # what the report measures; here: the staged copy must load strictly
        load_trained(d, preset)
        return measured

    dest = tmp_path / "shipped"
    rec = ship(tmp_path / "b", measure, "step1", dest=dest)
    ck = tmp_path / "b" / "checkpoints" / "step1"
    for name, src in (("transformer", ck), ("text_encoder", ck), ("vae", tmp_path / "b")):
        assert (dest / name / "model.safetensors").read_bytes() == (src / name / "model.safetensors").read_bytes()
    on_disk = json.loads((dest / "training.json").read_text())
    assert on_disk["shipped_from"] == {"run": "b", "checkpoint": "step1", "vae": None} and on_disk["dit_steps_done"] == 1
    assert on_disk["adherence"]["direction_acc"] == 0.25 and rec["measured"] == measured
    assert not dest.with_name("shipped.partial").exists() and not dest.with_name("shipped.old").exists()

    # a VAE whose decoder was tuned further may replace the run's; one with another encoder may not
    tuned = load_trained(tmp_path / "b", preset).vae
    with torch.no_grad():
        tuned.spatial_vae.module.decoder.conv_out.weight.add_(0.05)
    save_fp16(tuned, tmp_path / "tuned", "vae", ("shift", "scale"))
    ship(tmp_path / "b", measure, "step1", dest=dest, vae_dir=tmp_path / "tuned")
    assert (dest / "vae" / "model.safetensors").read_bytes() == (tmp_path / "tuned" / "model.safetensors").read_bytes()
    assert json.loads((dest / "training.json").read_text())["shipped_from"]["vae"] == str(tmp_path / "tuned")
    with torch.no_grad():
        tuned.spatial_vae.module.encoder.conv_in.weight.add_(0.05)
    save_fp16(tuned, tmp_path / "bad", "vae", ("shift", "scale"))
    before = (dest / "vae" / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="encoder.conv_in.weight differs"):
        ship(tmp_path / "b", measure, "step1", dest=dest, vae_dir=tmp_path / "bad")
    assert (dest / "vae" / "model.safetensors").read_bytes() == before  # the shipped copy is untouched


def test_latent_object_mask_follows_the_object():
    from sorakit.train.dit import latent_object_mask

    videos, _, attrs = make_dataset(8, seed=3)
    mask = latent_object_mask(videos, (5, 8, 8))
    assert mask.shape == (8, 1, 5, 8, 8) and set(np.unique(mask)) <= {0.0, 1.0}
    assert 0.02 < mask.mean() < 0.4  # a small object, not the frame
    step = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
    ys, xs = np.mgrid[:8, :8]
    for m, a in zip(mask[:, 0], attrs):
        cx = [(f * xs).sum() / f.sum() for f in m]
        cy = [(f * ys).sum() / f.sum() for f in m]
        dx, dy = cx[-1] - cx[0], cy[-1] - cy[0]
        sx, sy = step[a["direction"]]
        assert (dx * sx + dy * sy) > 2, (a, dx, dy)  # the marked cells travel the way the object does


def test_caption_labels_read_what_the_caption_says():
    from sorakit.train.text_encoder import CAPTION_ATTRIBUTES, caption_labels

    labels = caption_labels(["a red circle moving left on a black background", "green box going upwards"])
    names = [n for n, _ in CAPTION_ATTRIBUTES]
    values = dict(CAPTION_ATTRIBUTES)
    first, second = (dict(zip(names, row)) for row in labels.tolist())
    assert first == {
        "colour": values["colour"].index("red"),
        "shape": values["shape"].index("circle"),
        "direction": values["direction"].index("left"),
        "background": values["background"].index("black"),
    }
    assert second["shape"] == values["shape"].index("square") and second["direction"] == values["direction"].index("up")
    assert second["background"] == len(values["background"])  # not said


def test_text_pretraining_makes_direction_readable_from_the_pooled_caption(tmp_path):
    """The stage exists because jointly trained T5s kept direction on one token; after it, the
    pooled output of held-out captions tells every attribute apart, and so do the raw features
    (a nearest-mean readout, no trained head)."""
    import dataclasses

    from sorakit.export.models import build
    from sorakit.export.stdit3 import masked_mean
    from sorakit.tokenizer import PromptTokenizer
    from sorakit.train import data as shapes_data
    from sorakit.train.common import Logger
    from sorakit.train.config import tiny_config, tiny_shapes_preset
    from sorakit.train.text_encoder import caption_labels, encode_captions, pretrain_text_encoder
    from sorakit.train.tokenizer import train_tokenizer

    torch.manual_seed(0)
    preset = tiny_shapes_preset()
    _, captions, _ = make_dataset(320, seed=5, num_frames=1, size=16)
    tok = PromptTokenizer(train_tokenizer(shapes_data.all_caption_words(), tmp_path / "tok.json", 128), 24)
    batch = tok(captions)
    labels = caption_labels(captions)
    t5 = build("text_encoder", preset).float()
    y0 = encode_captions(t5, batch.ids, batch.mask)
    cfg = dataclasses.replace(tiny_config(), text_steps=400, text_batch=32, text_lr=3e-3, log_every=50)
    rec = pretrain_text_encoder(t5, batch.ids, batch.mask, labels, cfg, Logger(tmp_path / "log.json", quiet=True))
    assert min(rec["heldout_pooled_accuracy"].values()) > 0.9, rec

    def direction_separation(y: np.ndarray) -> float:
        pooled = masked_mean(torch.from_numpy(y), torch.from_numpy(batch.mask)).numpy()
        d = labels[:, 2]
        means = np.stack([pooled[d == k].mean(0) for k in range(4)])
        within = np.mean([np.linalg.norm(pooled[d == k] - means[k], axis=1).mean() for k in range(4)])
        between = np.mean([np.linalg.norm(means[a] - means[b]) for a in range(4) for b in range(a + 1, 4)])
        return between / within

    after = direction_separation(encode_captions(t5, batch.ids, batch.mask))
    assert after > 1.5 * direction_separation(y0)


def test_latent_whitening_changes_coordinates_not_videos():
    """Folding the whitening map into the temporal VAE leaves decode(encode(.)) as it was and
    returns the coordinates the re-encoded VAE produces, with identity covariance above the floor."""
    from sorakit.export.models import build
    from sorakit.train.config import tiny_shapes_preset
    from sorakit.train.vae import encode_temporal, whiten_latents

    torch.manual_seed(0)
    vae = build("vae", tiny_shapes_preset()).float().eval()
    tvae = vae.temporal_vae
    with torch.no_grad():  # seeded values everywhere, and a posterior std that is not the init's
        for p in tvae.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        tvae.quant_conv.conv.weight[tvae.cfg.embed_dim :] = 0.0  # a narrow posterior (log-variance -20)
        tvae.quant_conv.conv.bias[tvae.cfg.embed_dim :] = -20.0
    C_in = tvae.cfg.latent_embed_dim
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(C_in, C_in)) * np.array([3.0, 1.0, 0.3, 0.1][:C_in])  # correlated channels
    s = np.einsum("ij,njthw->nithw", mix, rng.normal(size=(48, C_in, 17, 4, 4))).astype(np.float32)
    with torch.no_grad():
        before = tvae.decode(tvae.encode(torch.from_numpy(s[:4]), sample=False), 17)
    z_mean, z_std = encode_temporal(vae, s)
    C = z_mean.shape[1]
    cells = z_mean.transpose(0, 2, 3, 4, 1).reshape(-1, C)
    assert np.abs(np.corrcoef(cells.T) - np.eye(C)).max() > 0.3  # there is something to whiten

    zw, sw, record = whiten_latents(vae, z_mean, z_std, floor=1e-6)
    with torch.no_grad():
        after = tvae.decode(tvae.encode(torch.from_numpy(s[:4]), sample=False), 17)
    assert (after - before).abs().max().item() < 1e-4 * before.abs().max().item()
    again, _ = encode_temporal(vae, s)
    np.testing.assert_allclose(again, zw, atol=1e-4)
    cells_w = zw.transpose(0, 2, 3, 4, 1).reshape(-1, C).astype(np.float64)
    post = (sw.astype(np.float64) ** 2).transpose(0, 2, 3, 4, 1).reshape(-1, C).mean(axis=0)
    np.testing.assert_allclose(np.cov(cells_w.T) + np.diag(post), np.eye(C), atol=0.02)
    assert len(record["gain"]) == C and min(record["gain"]) > 0


def test_latent_whitening_floor_caps_the_gain():
    from sorakit.export.models import build
    from sorakit.train.config import tiny_shapes_preset
    from sorakit.train.vae import whiten_latents

    vae = build("vae", tiny_shapes_preset()).float().eval()
    rng = np.random.default_rng(1)
    C = vae.temporal_vae.cfg.embed_dim
    z = rng.normal(size=(32, C, 5, 4, 4)).astype(np.float32) * np.array([1.0] + [1e-3] * (C - 1))[None, :, None, None, None]
    std = np.full_like(z, 0.01)
    _, _, record = whiten_latents(vae, z.astype(np.float32), std, floor=4.0)
    cap = 1 / np.sqrt(4.0 * 1e-4)
    assert max(record["gain"]) == pytest.approx(cap, rel=1e-3)  # the noise-level directions stop at the floor
    assert record["gain"][0] == pytest.approx(1 / np.sqrt(1.0 + 1e-4), rel=0.1)  # the strong one goes to unit variance


def test_remeasure_rewrites_the_figures_and_keeps_the_run_record(tmp_path):
    """report --remeasure: new adherence/measured from the files, the old measurement kept
    beside them, the run's own record untouched, nothing half-written left behind."""
    import json

    from sorakit.train.report import SHIPPED_DIR, remeasure

    dest = tmp_path / "shapes"
    dest.mkdir()
    before = json.loads((SHIPPED_DIR / "training.json").read_text())
    (dest / "training.json").write_text(json.dumps(before))
    seen = []

    def measure(d):
        seen.append(d)
        return {"colour_acc": 0.5, "direction_acc": 0.25, "both_acc": 0.125, "guidance_max_t": 640.0, "per_prompt": []}

    rec = remeasure(measure, dest=dest)
    assert seen == [dest]
    on_disk = json.loads((dest / "training.json").read_text())
    assert on_disk == rec and [p.name for p in dest.iterdir()] == ["training.json"]
    assert rec["adherence"]["colour_acc"] == 0.5 and rec["adherence"]["guidance_max_t"] == 640.0
    assert rec["adherence"]["steps"] == before["adherence"]["steps"]  # the protocol fields stay
    assert rec["measured"]["direction_acc"] == 0.25
    assert rec["measured_before"]["colour_acc"] == before["measured"]["colour_acc"]
    assert rec["evals"] == before["evals"] and rec["config"] == before["config"]
