"""The video writer (pure numpy H.264 I_PCM in MP4; GIF through Pillow) and reader.

The MP4 files are checked against independent decoders: FFmpeg's native H.264 decoder and Cisco's OpenH264
(both from the ffmpeg binary that imageio-ffmpeg ships, a dev-only dependency), with FFmpeg's strictest
error detection, and FFmpeg's own header parser (the trace_headers bitstream filter).
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from fractions import Fraction

import numpy as np
import pytest

from sorakit.errors import SorakitError
from sorakit.metrics import psnr
from sorakit.runtime import mp4
from sorakit.runtime.video import read_video, save_video

imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")
FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
ACCURATE = ["-sws_flags", "neighbor+accurate_rnd+full_chroma_int"]  # exact YCbCr->RGB, chroma repeated 2x2
SIZES = [(64, 64), (17, 31), (144, 256), (1, 1)]
COLOURS = np.array([[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [128, 128, 128],
                    [12, 200, 99], [250, 128, 3], [1, 2, 254], [77, 77, 78], [200, 30, 160], [16, 235, 128]], np.uint8)


def _frames(n: int, h: int, w: int, seed: int = 0) -> tuple[np.ndarray, int]:
    """Frames whose left part (an even number of columns) is one flat colour per frame and whose
    right part is noise; returns the frames and the width of the flat part."""
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    flat = max(2, (w // 2) & ~1) if w > 1 else 1
    frames[:, :, :flat] = COLOURS[np.arange(n) % len(COLOURS)][:, None, None]
    return frames, flat


def _smooth(n: int, h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    t = np.arange(n)[:, None, None] / max(n, 1)
    r = 128 + 100 * np.sin(2 * np.pi * (xx + t))
    g = 128 + 100 * np.cos(2 * np.pi * (yy - t))
    b = 128 + 100 * np.sin(2 * np.pi * (xx + yy))
    return np.clip(np.stack(np.broadcast_arrays(r, g, b), -1), 0, 255).round().astype(np.uint8)


def _ideal_420(frames: np.ndarray) -> np.ndarray:
    """What an exact (unrounded) BT.601 4:2:0 round trip gives: each 2x2 block keeps its own luma and
    shares the mean chroma (float, written independently of the code under test)."""
    f = frames.astype(np.float64) / 255
    f = np.pad(f, ((0, 0), (0, f.shape[1] % 2), (0, f.shape[2] % 2), (0, 0)), mode="edge")
    to_ycc = np.array([[0.299, 0.587, 0.114], [-0.299 / 1.772, -0.587 / 1.772, 0.5], [0.5, -0.587 / 1.402, -0.114 / 1.402]])
    ycc = f @ to_ycc.T
    n, h, w, _ = ycc.shape
    c = ycc[..., 1:].reshape(n, h // 2, 2, w // 2, 2, 2).mean(axis=(2, 4))
    ycc[..., 1:] = np.repeat(np.repeat(c, 2, axis=1), 2, axis=2)
    return np.clip(ycc @ np.linalg.inv(to_ycc).T * 255, 0, 255)


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(((a.astype(np.float64) - b) ** 2).mean())


def _ffmpeg_rgb(path, params=None) -> tuple[dict, np.ndarray]:
    gen = imageio_ffmpeg.read_frames(str(path), output_params=params)
    meta = next(gen)
    w, h = meta["size"]
    return meta, np.stack([np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in gen])


def _ffmpeg_yuv(path, decoder: str, h: int, w: int):
    """Decode with FFmpeg's `decoder`, failing on any bitstream error; the raw yuv420p planes."""
    res = subprocess.run([FFMPEG, "-hide_banner", "-v", "error", "-xerror", "-err_detect", "explode", "-c:v", decoder,
                          "-i", str(path), "-f", "rawvideo", "-pix_fmt", "yuv420p", "-"], capture_output=True)
    assert res.returncode == 0 and not res.stderr, res.stderr.decode()[-2000:]
    ch, cw = (h + 1) // 2, (w + 1) // 2
    raw = np.frombuffer(res.stdout, np.uint8).reshape(-1, h * w + 2 * ch * cw)
    return (raw[:, :h * w].reshape(-1, h, w), raw[:, h * w:h * w + ch * cw].reshape(-1, ch, cw),
            raw[:, h * w + ch * cw:].reshape(-1, ch, cw))


def _decoders() -> list[str]:
    out = subprocess.run([FFMPEG, "-hide_banner", "-decoders"], capture_output=True, text=True).stdout
    return ["h264"] + (["libopenh264"] if re.search(r"\slibopenh264\s", out) else [])


def _stream_info(path) -> str:
    res = subprocess.run([FFMPEG, "-hide_banner", "-i", str(path)], capture_output=True, text=True)
    return next(line for line in res.stderr.splitlines() if "Video:" in line)


@pytest.mark.parametrize("h,w", SIZES)
def test_mp4_round_trip_through_ffmpeg(tmp_path, h, w):
    n = 17
    frames, flat = _frames(n, h, w)
    path = save_video(frames, tmp_path / "v.mp4", fps=24)
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]  # no temporary file left
    H, W = h + h % 2, w + w % 2  # 4:2:0 H.264 cannot crop to an odd size: one repeated row/column

    meta, rgb = _ffmpeg_rgb(path, ACCURATE)
    assert meta["codec"] == "h264" and meta["fps"] == 24.0 and meta["size"] == (W, H)
    assert meta["pix_fmt"].startswith("yuv420p(tv, smpte170m/bt709/bt709")
    assert rgb.shape == (n, H, W, 3)
    info = _stream_info(path)
    assert "h264 (Constrained Baseline) (avc1" in info and "SAR 1:1" in info and "24 fps" in info, info
    assert abs(meta["duration"] - n / 24) < 0.01

    got = rgb[:, :h, :w].astype(int)
    err_flat = np.abs(got[:, :, :flat] - frames[:, :, :flat]).max()
    assert err_flat <= 2, err_flat  # flat colours: only the YCbCr rounding
    if (H, W) != (h, w):  # the padding repeats the last row / column
        assert np.array_equal(rgb[:, h:], rgb[:, h - 1:h]) and np.array_equal(rgb[:, :, w:], rgb[:, :, w - 1:w])
    ideal = _ideal_420(frames)
    err_ideal = np.abs(rgb - ideal).max()
    assert err_ideal < 2.5, err_ideal  # everywhere, noise too: the error is the rounding of Y, Cb, Cr and RGB
    noise, noise_ideal = psnr(frames, rgb[:, :h, :w]), psnr(frames, ideal[:, :h, :w])
    print(f"{h}x{w}: max abs error {err_flat} on flat colours, {err_ideal:.2f} from exact 4:2:0; PSNR on noise "
          f"{noise:.2f} dB (exact 4:2:0: {noise_ideal:.2f} dB); {path.stat().st_size} bytes")
    # noise loses most of its chroma to 4:2:0 (~16 dB; unrelated noise would be 7.8 dB); rounding adds < 1 to the MSE
    assert _mse(frames, rgb[:, :h, :w]) < _mse(frames, ideal[:, :h, :w]) + 1

    smooth = _smooth(n, h, w)
    save_video(smooth, path, fps=24)
    _, rgb = _ffmpeg_rgb(path, ACCURATE)
    ideal = _ideal_420(smooth)
    p, p_ideal = psnr(smooth, rgb[:, :h, :w]), psnr(smooth, ideal[:, :h, :w])
    print(f"{h}x{w}: PSNR on colour gradients {p:.2f} dB (exact 4:2:0: {p_ideal:.2f} dB)")
    assert _mse(smooth, rgb[:, :h, :w]) < _mse(smooth, ideal[:, :h, :w]) + 1 and np.abs(rgb - ideal).max() < 2.5

    _, default = _ffmpeg_rgb(path)  # imageio's default conversion (FFmpeg's fast fixed-point one)
    assert np.abs(default.astype(int) - rgb).max() <= 3


@pytest.mark.parametrize("h,w", SIZES)
def test_own_reader_matches_independent_decoders(tmp_path, h, w):
    frames, _ = _frames(9, h, w, seed=1)
    path = save_video(frames, tmp_path / "v.mp4", fps=12)
    ours = mp4.read_mp4(path)
    assert ours.fps == 12 and ours.frames.shape == (9, h + h % 2, w + w % 2, 3)
    assert np.array_equal(read_video(path), ours.frames)
    for decoder in _decoders():  # the decoded YCbCr samples are exactly the ones written
        y, cb, cr = _ffmpeg_yuv(path, decoder, *ours.y.shape[1:])
        assert np.array_equal(y, ours.y) and np.array_equal(cb, ours.cb) and np.array_equal(cr, ours.cr), decoder
    _, rgb = _ffmpeg_rgb(path, ACCURATE)
    assert np.abs(rgb.astype(int) - ours.frames).max() <= 1
    _, rgb = _ffmpeg_rgb(path)
    assert np.abs(rgb.astype(int) - ours.frames).max() <= 3  # FFmpeg's default fast conversion rounds coarser


def test_headers_as_ffmpeg_parses_them(tmp_path):
    """FFmpeg's syntax parser reads back the fields the writer means to set, in every NAL unit."""
    path = save_video(_frames(3, 17, 31)[0], tmp_path / "v.mp4", fps=30000 / 1001)
    res = subprocess.run([FFMPEG, "-hide_banner", "-i", str(path), "-c", "copy", "-bsf:v", "trace_headers",
                          "-f", "null", "-"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    fields: dict[str, list[int]] = {}
    for m in re.finditer(r"\]\s+\d+\s+(\w+)\s+[01]+ = (-?\d+)", res.stderr):
        fields.setdefault(m.group(1), []).append(int(m.group(2)))
    one = {k: v[0] for k, v in fields.items()}
    assert one["profile_idc"] == 66 and one["constraint_set0_flag"] == one["constraint_set1_flag"] == 1
    assert one["level_idc"] == 10 and one["pic_order_cnt_type"] == 2
    assert (one["pic_width_in_mbs_minus1"], one["pic_height_in_map_units_minus1"]) == (1, 1)
    assert (one["frame_crop_right_offset"], one["frame_crop_bottom_offset"]) == (0, 7)  # 32x32 -> 32x18
    assert (one["colour_primaries"], one["transfer_characteristics"], one["matrix_coefficients"]) == (1, 1, 6)
    assert one["video_full_range_flag"] == 0 and one["chroma_sample_loc_type_top_field"] == 1
    assert (one["num_units_in_tick"], one["time_scale"], one["fixed_frame_rate_flag"]) == (1001, 60000, 1)
    assert one["entropy_coding_mode_flag"] == 0 and one["deblocking_filter_control_present_flag"] == 1
    assert fields["nal_unit_type"] == [7, 8, 5, 5, 5]
    assert fields["idr_pic_id"] == [0, 1, 0] and fields["disable_deblocking_filter_idc"] == [1, 1, 1]
    assert mp4.read_mp4(path).fps == pytest.approx(30000 / 1001, abs=1e-9)
    sps = mp4.sps_nal(mp4.Geometry.for_frames(17, 31), Fraction(24))  # num_units_in_tick 1: 31 zero bits
    assert b"\x00\x00\x03" in sps and not re.search(b"\x00\x00[\x00-\x02]", sps)


def test_64_bit_boxes(tmp_path, monkeypatch):
    """co64 chunk offsets, a 64-bit mdat size and version-1 durations (normally past 4 GiB) still decode."""
    frames = _frames(5, 32, 48)[0]
    small = save_video(frames, tmp_path / "small.mp4")
    monkeypatch.setattr(mp4, "LIMIT_32", 0)
    big = save_video(frames, tmp_path / "big.mp4")
    data = big.read_bytes()
    assert b"co64" in data and b"stco" not in data and data[data.index(b"mdat") - 4:data.index(b"mdat")] == b"\0\0\0\1"
    assert b"co64" not in small.read_bytes()
    ours = mp4.read_mp4(big)
    assert np.array_equal(ours.frames, mp4.read_mp4(small).frames) and ours.fps == 24
    y, _, _ = _ffmpeg_yuv(big, "h264", 32, 48)
    assert np.array_equal(y, ours.y)
    meta, rgb = _ffmpeg_rgb(big, ACCURATE)
    assert meta["fps"] == 24.0 and len(rgb) == 5


def test_colour_conversion():
    """BT.601 limited range, rounded once: the textbook values of the primaries; flat colours come back
    within 2; 4:2:0 chroma is the rounded mean of each 2x2 block."""
    def yuv(rgb):
        y, cb, cr = mp4.rgb_to_yuv420(np.broadcast_to(np.array(rgb, np.uint8), (2, 2, 3)))
        return int(y[0, 0]), int(cb[0, 0]), int(cr[0, 0])

    assert yuv([0, 0, 0]) == (16, 128, 128) and yuv([255, 255, 255]) == (235, 128, 128)
    assert yuv([255, 0, 0]) == (81, 90, 240) and yuv([0, 255, 0]) == (145, 54, 34) and yuv([0, 0, 255]) == (41, 240, 110)
    c = np.mgrid[0:256:5, 0:256:5, 0:256:5].reshape(3, -1).T.astype(np.uint8)  # 132,651 colours
    flat = np.repeat(np.repeat(c[None], 2, 0), 2, 1)  # every colour a flat 2x2 block
    y, cb, cr = mp4.rgb_to_yuv420(flat)
    assert y.min() >= 16 and y.max() <= 235 and min(cb.min(), cr.min()) >= 16 and max(cb.max(), cr.max()) <= 240
    back = mp4.yuv420_to_rgb(y, cb, cr)[0, ::2]
    assert np.abs(back.astype(int) - c).max() == 2
    two = np.array([[[255, 0, 0], [0, 0, 255]], [[255, 0, 0], [0, 0, 255]]], np.uint8)  # red | blue
    _, cb, cr = mp4.rgb_to_yuv420(two)
    assert (int(cb[0, 0]), int(cr[0, 0])) == (165, 175)  # round(128 + (-37.8 + 112) / 2), round(128 + (112 - 18.2) / 2)


def test_emulation_prevention():
    assert mp4.escape(b"\x00\x00\x00\x00\x01") == b"\x00\x00\x03\x00\x00\x03\x01"
    assert mp4.escape(b"\x00\x00\x02\x00\x00\x03\x00\x00\x04") == b"\x00\x00\x03\x02\x00\x00\x03\x03\x00\x00\x04"
    assert mp4.escape(b"\x05\x00\x00") == b"\x05\x00\x00\x03"
    rng = np.random.default_rng(0)
    for i in range(200):
        raw = rng.choice([0, 0, 0, 1, 2, 3, 4, 255], rng.integers(1, 60)).astype(np.uint8).tobytes()
        raw += b"\x80" + b"\x00\x00" * (i % 3)  # an RBSP ends in its stop bit and, with CABAC, cabac_zero_words
        esc = mp4.escape(raw)
        assert not re.search(b"\x00\x00[\x00-\x02]", esc) and not re.search(b"\x00\x00\x03(?![\x00-\x03]|\\Z)", esc)
        assert mp4.unescape(esc) == raw


@pytest.mark.parametrize("fps,rate", [(24, (24, 1)), (30000 / 1001, (30000, 1001)), (12.5, (25, 2)), (0.5, (1, 2)),
                                      (np.float32(15), (15, 1)), (np.int64(8), (8, 1))])
def test_frame_rates(tmp_path, fps, rate):
    assert mp4.fps_fraction(fps) == Fraction(*rate)
    path = save_video(np.zeros((3, 4, 6, 3), np.uint8), tmp_path / "v.mp4", fps=fps)
    assert mp4.read_mp4(path).fps == pytest.approx(fps, rel=1e-12)
    meta, _ = _ffmpeg_rgb(path)
    assert meta["fps"] == pytest.approx(fps, rel=1e-3)


def test_levels():
    g = mp4.Geometry.for_frames
    assert mp4.level_for(g(64, 64), 24) == 10
    assert mp4.level_for(g(144, 256), 24) == 12  # 144 MBs, 3,456 MBs/s
    assert mp4.level_for(g(144, 256), 10) == 11
    assert mp4.level_for(g(720, 1280), 30) == 31
    assert mp4.level_for(g(1080, 1920), 30) == 40
    assert mp4.level_for(g(16, 16 * 100), 1) == 22  # a strip 100 MBs wide needs MaxFS >= 100^2 / 8


BAD_FPS = [0, -1, float("nan"), float("inf"), True, "24", None, 1e6]


@pytest.mark.parametrize("fps", BAD_FPS)
def test_bad_fps(tmp_path, fps, monkeypatch):
    monkeypatch.setattr(mp4, "write_mp4", lambda *a: pytest.fail("wrote before checking the input"))
    with pytest.raises(SorakitError, match="fps must be"):
        save_video(np.zeros((2, 4, 4, 3), np.uint8), tmp_path / "v.mp4", fps=fps)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("frames,message", [
    (np.zeros((2, 4, 4, 3), np.float32), r"expected uint8 frames \[F, H, W, 3\], got float32"),
    (np.zeros((4, 4, 3), np.uint8), r"expected uint8 frames \[F, H, W, 3\], got uint8 \(4, 4, 3\)"),
    (np.zeros((2, 4, 4, 4), np.uint8), r"expected uint8 frames \[F, H, W, 3\]"),
    (np.zeros((0, 4, 4, 3), np.uint8), "no frames to write"),
    (np.zeros((2, 0, 4, 3), np.uint8), "height and width must be at least 1"),
    (np.zeros((2, 4, 0, 3), np.uint8), "height and width must be at least 1"),
    (np.zeros((1, 1, 70000, 3), np.uint8), "too large"),
    ([np.zeros((4, 4, 3), np.uint8), np.zeros((4, 6, 3), np.uint8)], "of one size"),
])
@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_bad_frames(tmp_path, frames, message, suffix):
    with pytest.raises(SorakitError, match=message):
        save_video(frames, tmp_path / f"v{suffix}")
    assert list(tmp_path.iterdir()) == []


def test_bad_paths(tmp_path):
    frames = np.zeros((2, 4, 4, 3), np.uint8)
    (tmp_path / "d.mp4").mkdir()
    with pytest.raises(SorakitError, match="is a directory"):
        save_video(frames, tmp_path / "d.mp4")
    with pytest.raises(SorakitError, match="output directory .*missing does not exist"):
        save_video(frames, tmp_path / "missing" / "v.mp4")
    with pytest.raises(SorakitError, match=r"cannot write v\.avi: use a \.mp4 or \.gif file name"):
        save_video(frames, tmp_path / "v.avi")
    (tmp_path / "f").write_bytes(b"")
    with pytest.raises(SorakitError, match="f is not a directory"):
        save_video(frames, tmp_path / "f" / "v.mp4")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.mp4", "f"] and not any((tmp_path / "d.mp4").iterdir())
    with pytest.raises(SorakitError, match="no such file"):
        read_video(tmp_path / "nothing.mp4")


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = save_video(np.zeros((2, 4, 4, 3), np.uint8), tmp_path / "v.mp4")
    before = path.read_bytes()

    def broken(frame, geom, idr_pic_id):
        raise OSError("disk full")

    monkeypatch.setattr(mp4, "encode_frame", broken)
    with pytest.raises(OSError, match="disk full"):
        save_video(np.full((2, 4, 4, 3), 9, np.uint8), path)
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"] and path.read_bytes() == before


def test_gif_round_trip(tmp_path):
    from PIL import Image

    frames = _smooth(6, 20, 30)
    frames[:, :8, :8] = [255, 0, 0]
    path = save_video(frames, tmp_path / "v.gif", fps=10)
    got = read_video(path)
    assert got.shape == (6, 20, 30, 3)
    assert np.array_equal(got[:, :8, :8], frames[:, :8, :8])  # a palette colour survives exactly
    assert psnr(frames, got) > 25
    with Image.open(path) as im:
        assert im.n_frames == 6 and im.info["duration"] == 100 and im.info["loop"] == 0


def test_foreign_mp4_falls_back_to_imageio(tmp_path):
    imageio = pytest.importorskip("imageio.v2")
    path = tmp_path / "x264.mp4"
    frames = _smooth(4, 32, 32)
    imageio.mimwrite(path, list(frames), fps=8, codec="libx264", macro_block_size=1, ffmpeg_log_level="error")
    with pytest.raises(mp4.NotOurMp4):
        mp4.read_mp4(path)
    got = read_video(path)
    assert got.shape == (4, 32, 32, 3) and psnr(frames, got) > 25
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all")
    with pytest.raises(SorakitError, match="cannot read junk.mp4 as a video"):
        read_video(tmp_path / "junk.mp4")


def test_truncated_file_is_an_error_not_a_partial_video(tmp_path):
    path = save_video(_frames(4, 16, 16)[0], tmp_path / "v.mp4")
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(SorakitError, match=r"v.mp4: the file is truncated or damaged \(frame 4 of 4 lies past"):
        read_video(path)
    path.write_bytes(data[:300])  # inside the moov box
    with pytest.raises(SorakitError, match="truncated or damaged"):
        read_video(path)


BLOCK_IMAGING = textwrap.dedent("""
    import sys, importlib.abc
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split('.')[0] in ('imageio', 'imageio_ffmpeg', 'PIL'):
                raise ImportError('blocked in this test: ' + name)
    sys.meta_path.insert(0, _Block())
""")


def test_mp4_needs_neither_imageio_nor_pillow(tmp_path):
    """MP4 writing and reading our own files work without imageio, imageio-ffmpeg and Pillow; GIF and
    other tools' MP4 files fail with the package to install, leaving nothing behind."""
    foreign = tmp_path / "x264.mp4"
    # the foreign file is written here, where imageio-ffmpeg is available
    writer = imageio_ffmpeg.write_frames(str(foreign), (16, 16), fps=8, codec="libx264", ffmpeg_log_level="error")
    writer.send(None)
    writer.send(np.zeros((16, 16, 3), np.uint8).tobytes())
    writer.close()
    script = BLOCK_IMAGING + textwrap.dedent(f"""
        import numpy as np
        from pathlib import Path
        from sorakit.errors import SorakitError
        from sorakit.runtime import read_video, save_video
        d = Path({str(tmp_path)!r})
        frames = np.random.default_rng(0).integers(0, 256, (3, 10, 12, 3), dtype=np.uint8)
        save_video(frames, d / 'ok.mp4', fps=24)
        assert read_video(d / 'ok.mp4').shape == (3, 10, 12, 3)
        try:
            save_video(frames, d / 'no.gif')
            raise SystemExit('gif written without Pillow')
        except SorakitError as e:
            print('gif:', e, '|', e.hint)
        try:
            read_video(d / 'x264.mp4')
            raise SystemExit('foreign mp4 read without imageio')
        except SorakitError as e:
            print('foreign:', e, '|', e.hint)
        loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('imageio', 'imageio_ffmpeg', 'PIL'))
        assert not loaded, loaded
        print('ok')
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.endswith("ok\n"), res.stdout + res.stderr[-2000:]
    assert "gif: writing .gif files needs Pillow" in res.stdout and "pip install pillow" in res.stdout
    assert "foreign: reading x264.mp4 needs imageio and imageio-ffmpeg" in res.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.mp4", "x264.mp4"]


def test_cli_checks_the_output_before_generating(tmp_path):
    """`sorakit generate` rejects a bad --fps or --out before it looks for a model."""
    (tmp_path / "d.mp4").mkdir()
    for args, message in [(["--fps", "0"], "--fps must be at least 1, got 0"),
                          (["--out", str(tmp_path / "v.webm")], "use a file name ending in .mp4 or .gif"),
                          (["--out", str(tmp_path / "d.mp4")], "it is an existing directory")]:
        res = subprocess.run([sys.executable, "-m", "sorakit", "generate", "a red circle", "--bundle",
                              str(tmp_path / "no-bundle"), "--out", str(tmp_path / "v.mp4"), *args],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 1 and message in " ".join(res.stderr.split()), res.stderr[-2000:]
    assert [p.name for p in tmp_path.iterdir()] == ["d.mp4"]
