"""A pure numpy/stdlib MP4 writer (H.264, every macroblock I_PCM) and a reader for the files it writes.

**Bitstream.** H.264 Constrained Baseline (profile 66, constraint_set0/1 flags), CAVLC. Every frame is one
IDR picture in one slice, and every macroblock is I_PCM (mb_type 25 in an I slice): the 8-bit Y, Cb, Cr
samples of the macroblock stored raw after byte alignment, so no transform, prediction or entropy coding
is involved and the decoded samples are exactly the encoded ones. The only loss is the colour conversion:
RGB to BT.601 limited-range YCbCr with 4:2:0 chroma (the 2x2 mean). Sizes that are not multiples of 16 are
padded by edge replication and cropped in the SPS; H.264's 4:2:0 crop works in steps of 2, so an odd width
or height is padded by one replicated column or row (a 17x31 video is stored and decoded as 18x32).

Details:

- SPS: ``pic_order_cnt_type`` 2 (output order = decoding order), 4-bit ``frame_num`` (always 0: every picture
  is an IDR), one reference frame; the level is the smallest whose frame size, dimensions and macroblock rate
  fit (Table A-1; level 6.2 if none does). I_PCM's bit rate (~3,100 bits per macroblock) is far above the
  chosen level's MaxBR and MinCR limits (64x64 at 24 fps: 1.2 Mbit/s at level 1, whose MaxBR is 64 kbit/s);
  decoders do not enforce those limits, and a level chosen by bit rate would claim a much larger decoder.
- VUI: square pixels; limited range; matrix BT.601 (``matrix_coefficients`` 6), the matrix used below;
  primaries and transfer BT.709 (1/1): the frames are sRGB, whose primaries are BT.709's, and the BT.709
  and BT.601 transfer functions are the same, so this describes the pixels exactly; chroma sited at the
  centre of each 2x2 block (``chroma_sample_loc_type`` 1, what the 2x2 mean produces); the frame rate
  (``fixed_frame_rate_flag``); no reordering (``max_num_reorder_frames`` 0).
- PPS: CAVLC, ``deblocking_filter_control_present_flag`` 1; every slice sets ``disable_deblocking_filter_idc``
  1 (with I_PCM's QP of 0 the filter would change nothing anyway).
- Slices: IDR (``nal_unit_type`` 5), ``idr_pic_id`` alternating 0/1 so that consecutive IDRs differ.
- PCM samples are never 0 (the first, 2003, edition of H.264 did not allow PCM samples of 0; later editions
  appear to have dropped the rule, but 16..240 complies with either): limited range keeps every
  sample in 16..240, which also means the PCM bytes can never form a start-code prefix. Emulation
  prevention is applied to every NAL unit all the same.

**Container.** ISO BMFF: ``ftyp`` (isom, iso2, avc1, mp41), then ``moov`` before ``mdat`` so that players can
start before the whole file has arrived. One track, ``avc1`` sample entry with ``avcC`` (SPS and PPS
out of band, 4-byte NAL lengths), ``colr`` (nclx, the same colour description as the VUI) and ``pasp``;
``stts`` (one entry), ``stsc`` (one sample per chunk), ``stsz``, ``stco`` (``co64`` past 4 GiB). No ``stss``:
every sample is a sync sample. Frames are converted and written one at a time; a sample's size does not
depend on its pixels, so the sample table is written first.
"""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import numpy as np

# BT.601 luma weights as exact integers over 1000
_KR, _KG, _KB = 299, 587, 114

PROFILE_IDC = 66  # Baseline; with constraint_set0_flag and constraint_set1_flag: Constrained Baseline
CONSTRAINT_FLAGS = 0xC0  # constraint_set0_flag = constraint_set1_flag = 1
COLOUR_PRIMARIES = 1  # BT.709 primaries (= sRGB)
TRANSFER_CHARACTERISTICS = 1  # BT.709 (the same function as BT.601's 6)
MATRIX_COEFFICIENTS = 6  # BT.601 (SMPTE 170M)
MB_TYPE_I_PCM = 25
NAL_LENGTH_SIZE = 4
# 32-bit fields (durations, chunk offsets, the mdat size) switch to their 64-bit forms at this size;
# a module constant so that tests can exercise the 64-bit forms with small files
LIMIT_32 = 1 << 32
MAX_DIMENSION = 65534  # the MP4 sample entry stores the (even-rounded) width and height as 16-bit numbers

# Table A-1: level_idc, MaxMBPS (macroblocks/s), MaxFS (macroblocks), MaxDpbMbs
_LEVELS = (
    (10, 1485, 99, 396), (11, 3000, 396, 900), (12, 6000, 396, 2376), (13, 11880, 396, 2376),
    (20, 11880, 396, 2376), (21, 19800, 792, 4752), (22, 20250, 1620, 8100), (30, 40500, 1620, 8100),
    (31, 108000, 3600, 18000), (32, 216000, 5120, 20480), (40, 245760, 8192, 32768),
    (41, 245760, 8192, 32768), (42, 522240, 8704, 34816), (50, 589824, 22080, 110400),
    (51, 983040, 36864, 184320), (52, 2073600, 36864, 184320), (60, 4177920, 139264, 696320),
    (61, 8355840, 139264, 696320), (62, 16711680, 139264, 696320),
)


class NotOurMp4(Exception):
    """The file is not an MP4 this module can read (not I_PCM H.264, or not an MP4 at all)."""


class DamagedMp4(Exception):
    """The file is an MP4 whose boxes or samples run past its end (a truncated or damaged file)."""


# ----------------------------------------------------------------------------------------------------------------
# colour conversion


def rgb_to_yuv420(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 RGB [H, W, 3] with even H and W -> BT.601 limited-range Y [H, W], Cb and Cr [H/2, W/2] (uint8).

    Exact integer arithmetic with one rounding (half up): Y = 16 + 219 E'Y, Cb = 128 + 224 E'Pb,
    Cr = 128 + 224 E'Pr with E'Y = 0.299 R + 0.587 G + 0.114 B (R, G, B / 255), E'Pb = (B - E'Y) / 1.772,
    E'Pr = (R - E'Y) / 1.402. Chroma is computed from the mean of each 2x2 block of RGB (the conversion is
    linear, so this is the mean of the full-resolution chroma, rounded once).
    """
    h, w, _ = frame.shape
    rgb = frame.astype(np.int64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 16 + _div_round(219 * (_KR * r + _KG * g + _KB * b), 255 * 1000)
    s = rgb.reshape(h // 2, 2, w // 2, 2, 3).sum(axis=(1, 3))  # 4x the 2x2 mean
    r, g, b = s[..., 0], s[..., 1], s[..., 2]
    cb = 128 + _div_round(224 * ((1000 - _KB) * b - _KR * r - _KG * g), 2 * (1000 - _KB) * 255 * 4)
    cr = 128 + _div_round(224 * ((1000 - _KR) * r - _KG * g - _KB * b), 2 * (1000 - _KR) * 255 * 4)
    return y.astype(np.uint8), cb.astype(np.uint8), cr.astype(np.uint8)


def _div_round(num: np.ndarray, den: int) -> np.ndarray:
    """num / den rounded half up, exactly (floor division floors negative numbers too)."""
    return (2 * num + den) // (2 * den)


_MATRICES = {1: (0.2126, 0.0722), 5: (0.299, 0.114), 6: (0.299, 0.114), 7: (0.212, 0.087)}


def yuv420_to_rgb(y: np.ndarray, cb: np.ndarray, cr: np.ndarray, matrix: int = MATRIX_COEFFICIENTS,
                  full_range: bool = False) -> np.ndarray:
    """Y [H, W] and Cb, Cr [ceil(H/2), ceil(W/2)] -> uint8 RGB [H, W, 3]; chroma upsampled by repeating each
    sample over its 2x2 block (the block it is the mean of)."""
    kr, kb = _MATRICES.get(matrix, _MATRICES[6])
    h, w = y.shape
    cb = np.repeat(np.repeat(cb, 2, axis=0), 2, axis=1)[:h, :w].astype(np.float64)
    cr = np.repeat(np.repeat(cr, 2, axis=0), 2, axis=1)[:h, :w].astype(np.float64)
    if full_range:
        ey, pb, pr = y / 255.0, (cb - 128) / 255.0, (cr - 128) / 255.0
    else:
        ey, pb, pr = (y - 16.0) / 219.0, (cb - 128) / 224.0, (cr - 128) / 224.0
    r = ey + 2 * (1 - kr) * pr
    b = ey + 2 * (1 - kb) * pb
    g = (ey - kr * r - kb * b) / (1 - kr - kb)
    rgb = np.stack([r, g, b], axis=-1) * 255.0
    return np.clip(np.floor(rgb + 0.5), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# H.264 bitstream


class _BitWriter:
    def __init__(self):
        self._bits: list[str] = []

    def u(self, n: int, v: int) -> None:
        if not 0 <= v < 1 << n:
            raise ValueError(f"{v} does not fit in {n} bits")
        self._bits.append(format(v, f"0{n}b"))

    def ue(self, v: int) -> None:
        s = format(v + 1, "b")
        self._bits.append("0" * (len(s) - 1) + s)

    def se(self, v: int) -> None:
        self.ue(2 * v - 1 if v > 0 else -2 * v)

    def align_zero(self) -> None:
        n = -sum(map(len, self._bits)) % 8
        self._bits.append("0" * n)

    def trailing(self) -> None:
        """rbsp_trailing_bits: a stop bit, then zero bits to the byte boundary."""
        self._bits.append("1")
        self.align_zero()

    def bytes(self) -> bytes:
        s = "".join(self._bits)
        assert len(s) % 8 == 0
        return int(s, 2).to_bytes(len(s) // 8, "big") if s else b""


_EMULATION = re.compile(b"\x00\x00(?=[\x00-\x03])")
_EPB = re.compile(b"\x00\x00\x03")


def escape(rbsp: bytes) -> bytes:
    """RBSP -> NAL payload: an emulation_prevention_three_byte after every 00 00 followed by 00..03 (7.4.1)."""
    out = _EMULATION.sub(b"\x00\x00\x03", rbsp)
    return out + b"\x03" if out.endswith(b"\x00") else out


def unescape(payload: bytes) -> bytes:
    """NAL payload -> RBSP: drop each emulation_prevention_three_byte."""
    return _EPB.sub(b"\x00\x00", payload)


def _nal(ref_idc: int, nal_type: int, rbsp: bytes) -> bytes:
    return bytes([ref_idc << 5 | nal_type]) + escape(rbsp)


@dataclass(frozen=True)
class Geometry:
    """Frame layout: the coded (cropped) size, which is the even-rounded frame size, and the macroblock grid."""

    width: int  # coded width after cropping (even)
    height: int
    mb_width: int
    mb_height: int

    @classmethod
    def for_frames(cls, height: int, width: int) -> Geometry:
        w, h = width + width % 2, height + height % 2
        return cls(w, h, -(-w // 16), -(-h // 16))

    @property
    def mbs(self) -> int:
        return self.mb_width * self.mb_height

    @property
    def crop_right(self) -> int:  # in units of 2 luma samples (CropUnitX for 4:2:0)
        return (16 * self.mb_width - self.width) // 2

    @property
    def crop_bottom(self) -> int:
        return (16 * self.mb_height - self.height) // 2


def level_for(geom: Geometry, fps: float) -> int:
    """The smallest level_idc whose frame size, frame dimensions, macroblock rate and DPB fit (Table A-1)."""
    for level, max_mbps, max_fs, max_dpb_mbs in _LEVELS:
        if (geom.mbs <= max_fs and max(geom.mb_width, geom.mb_height) ** 2 <= 8 * max_fs
                and geom.mbs * fps <= max_mbps and geom.mbs <= max_dpb_mbs):
            return level
    return _LEVELS[-1][0]


def fps_fraction(fps: float) -> Fraction:
    """The frame rate as a fraction: 24 -> 24/1, 29.97002997 (30000/1001) -> 30000/1001, 12.5 -> 25/2."""
    f = Fraction(float(fps)).limit_denominator(1001)  # float(): numpy floats other than float64 are no Rational
    if f <= 0 or f.numerator * 2 >= 1 << 32:
        raise ValueError(f"frame rate {fps} cannot be stored")
    return f


def sps_nal(geom: Geometry, rate: Fraction) -> bytes:
    bw = _BitWriter()
    bw.u(8, PROFILE_IDC)
    bw.u(8, CONSTRAINT_FLAGS)
    bw.u(8, level_for(geom, float(rate)))
    bw.ue(0)  # seq_parameter_set_id
    bw.ue(0)  # log2_max_frame_num_minus4
    bw.ue(2)  # pic_order_cnt_type
    bw.ue(1)  # max_num_ref_frames
    bw.u(1, 0)  # gaps_in_frame_num_value_allowed_flag
    bw.ue(geom.mb_width - 1)
    bw.ue(geom.mb_height - 1)  # pic_height_in_map_units_minus1
    bw.u(1, 1)  # frame_mbs_only_flag
    bw.u(1, 1)  # direct_8x8_inference_flag
    crop = geom.crop_right or geom.crop_bottom
    bw.u(1, 1 if crop else 0)  # frame_cropping_flag
    if crop:
        for v in (0, geom.crop_right, 0, geom.crop_bottom):  # left, right, top, bottom
            bw.ue(v)
    bw.u(1, 1)  # vui_parameters_present_flag
    bw.u(1, 1)  # aspect_ratio_info_present_flag
    bw.u(8, 1)  # aspect_ratio_idc: 1:1
    bw.u(1, 0)  # overscan_info_present_flag
    bw.u(1, 1)  # video_signal_type_present_flag
    bw.u(3, 5)  # video_format: unspecified
    bw.u(1, 0)  # video_full_range_flag: limited range
    bw.u(1, 1)  # colour_description_present_flag
    bw.u(8, COLOUR_PRIMARIES)
    bw.u(8, TRANSFER_CHARACTERISTICS)
    bw.u(8, MATRIX_COEFFICIENTS)
    bw.u(1, 1)  # chroma_loc_info_present_flag
    bw.ue(1)  # chroma_sample_loc_type_top_field: centre
    bw.ue(1)  # chroma_sample_loc_type_bottom_field
    bw.u(1, 1)  # timing_info_present_flag
    bw.u(32, rate.denominator)  # num_units_in_tick
    bw.u(32, 2 * rate.numerator)  # time_scale: a frame is two ticks
    bw.u(1, 1)  # fixed_frame_rate_flag
    bw.u(1, 0)  # nal_hrd_parameters_present_flag
    bw.u(1, 0)  # vcl_hrd_parameters_present_flag
    bw.u(1, 0)  # pic_struct_present_flag
    bw.u(1, 1)  # bitstream_restriction_flag
    bw.u(1, 1)  # motion_vectors_over_pic_boundaries_flag
    bw.ue(0)  # max_bytes_per_pic_denom: no limit
    bw.ue(0)  # max_bits_per_mb_denom: no limit
    bw.ue(15)  # log2_max_mv_length_horizontal (there are no motion vectors)
    bw.ue(15)  # log2_max_mv_length_vertical
    bw.ue(0)  # max_num_reorder_frames
    bw.ue(1)  # max_dec_frame_buffering
    bw.trailing()
    return _nal(3, 7, bw.bytes())


def pps_nal() -> bytes:
    bw = _BitWriter()
    bw.ue(0)  # pic_parameter_set_id
    bw.ue(0)  # seq_parameter_set_id
    bw.u(1, 0)  # entropy_coding_mode_flag: CAVLC
    bw.u(1, 0)  # bottom_field_pic_order_in_frame_present_flag
    bw.ue(0)  # num_slice_groups_minus1
    bw.ue(0)  # num_ref_idx_l0_default_active_minus1
    bw.ue(0)  # num_ref_idx_l1_default_active_minus1
    bw.u(1, 0)  # weighted_pred_flag
    bw.u(2, 0)  # weighted_bipred_idc
    bw.se(0)  # pic_init_qp_minus26
    bw.se(0)  # pic_init_qs_minus26
    bw.se(0)  # chroma_qp_index_offset
    bw.u(1, 1)  # deblocking_filter_control_present_flag
    bw.u(1, 0)  # constrained_intra_pred_flag
    bw.u(1, 0)  # redundant_pic_cnt_present_flag
    bw.trailing()
    return _nal(3, 8, bw.bytes())


def _slice_head(idr_pic_id: int) -> bytes:
    """The slice header and the first macroblock's mb_type and pcm_alignment_zero_bits, as RBSP bytes."""
    bw = _BitWriter()
    bw.ue(0)  # first_mb_in_slice
    bw.ue(7)  # slice_type: I, and all slices of the picture are I
    bw.ue(0)  # pic_parameter_set_id
    bw.u(4, 0)  # frame_num (log2_max_frame_num = 4); 0 in an IDR picture
    bw.ue(idr_pic_id)
    bw.u(1, 0)  # no_output_of_prior_pics_flag
    bw.u(1, 0)  # long_term_reference_flag
    bw.se(0)  # slice_qp_delta
    bw.ue(1)  # disable_deblocking_filter_idc: off
    bw.ue(MB_TYPE_I_PCM)
    bw.align_zero()  # pcm_alignment_zero_bit
    return bw.bytes()


# Every macroblock after the first: mb_type ue(25) = 000011010, then 7 pcm_alignment_zero_bits.
_MB_PREFIX = bytes([0b00001101, 0b00000000])


def slice_nal(y: np.ndarray, cb: np.ndarray, cr: np.ndarray, geom: Geometry, idr_pic_id: int) -> bytes:
    """One IDR slice holding the whole picture as I_PCM macroblocks; planes already padded to the MB grid."""
    mbh, mbw = geom.mb_height, geom.mb_width
    mb = np.empty((mbh, mbw, 2 + 384), np.uint8)
    mb[..., 0], mb[..., 1] = _MB_PREFIX
    mb[..., 2:258] = y.reshape(mbh, 16, mbw, 16).transpose(0, 2, 1, 3).reshape(mbh, mbw, 256)
    mb[..., 258:322] = cb.reshape(mbh, 8, mbw, 8).transpose(0, 2, 1, 3).reshape(mbh, mbw, 64)
    mb[..., 322:] = cr.reshape(mbh, 8, mbw, 8).transpose(0, 2, 1, 3).reshape(mbh, mbw, 64)
    rbsp = _slice_head(idr_pic_id) + mb.tobytes()[2:] + b"\x80"  # rbsp_slice_trailing_bits
    return _nal(3, 5, rbsp)


def slice_nal_size(geom: Geometry, idr_pic_id: int) -> int:
    """The size of ``slice_nal``'s result without building it: PCM samples are 16..240, so no byte of the
    macroblock data takes part in an emulation-prevention sequence (``encode_frame`` checks this)."""
    return 1 + len(escape(_slice_head(idr_pic_id))) + 386 * geom.mbs - 2 + 1


def encode_frame(frame: np.ndarray, geom: Geometry, idr_pic_id: int) -> bytes:
    """uint8 RGB [H, W, 3] -> one IDR slice NAL unit."""
    h, w, _ = frame.shape
    frame = np.pad(frame, ((0, 16 * geom.mb_height - h), (0, 16 * geom.mb_width - w), (0, 0)), mode="edge")
    nal = slice_nal(*rgb_to_yuv420(frame), geom, idr_pic_id)
    if len(nal) != slice_nal_size(geom, idr_pic_id):  # cannot happen with limited-range samples
        raise AssertionError("I_PCM slice size differs from the size in the sample table")
    return nal


# ----------------------------------------------------------------------------------------------------------------
# MP4 (ISO BMFF) muxer


def _box(kind: bytes, *payload: bytes) -> bytes:
    data = b"".join(payload)
    return struct.pack(">I4s", 8 + len(data), kind) + data


def _full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    return _box(kind, struct.pack(">I", version << 24 | flags), *payload)


_UNITY_MATRIX = struct.pack(">9i", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)


def _avcc(sps: bytes, pps: bytes) -> bytes:
    return _box(b"avcC", bytes([1, sps[1], sps[2], sps[3], 0xFC | (NAL_LENGTH_SIZE - 1), 0xE0 | 1]),
                struct.pack(">H", len(sps)), sps, b"\x01", struct.pack(">H", len(pps)), pps)


def _moov(geom: Geometry, sps: bytes, pps: bytes, timescale: int, delta: int, sizes: list[int],
          offsets: list[int], co64: bool) -> bytes:
    n = len(sizes)
    duration = n * delta
    v = 1 if duration >= LIMIT_32 else 0
    times = struct.pack(">QQIQ", 0, 0, timescale, duration) if v else struct.pack(">IIII", 0, 0, timescale, duration)
    mvhd = _full_box(b"mvhd", v, 0, times, struct.pack(">iH10x", 0x10000, 0x0100), _UNITY_MATRIX,
                     bytes(24), struct.pack(">I", 2))  # rate 1.0, volume 1.0, pre_defined, next_track_ID
    tk_times = struct.pack(">QQI4xQ", 0, 0, 1, duration) if v else struct.pack(">III4xI", 0, 0, 1, duration)
    tkhd = _full_box(b"tkhd", v, 3, tk_times, struct.pack(">8xhhH2x", 0, 0, 0), _UNITY_MATRIX,
                     struct.pack(">II", geom.width << 16, geom.height << 16))
    md_times = struct.pack(">QQIQ", 0, 0, timescale, duration) if v else struct.pack(">IIII", 0, 0, timescale, duration)
    mdhd = _full_box(b"mdhd", v, 0, md_times, struct.pack(">HH", 0x55C4, 0))  # language 'und'
    hdlr = _full_box(b"hdlr", 0, 0, struct.pack(">I4s12x", 0, b"vide"), b"VideoHandler\x00")
    vmhd = _full_box(b"vmhd", 0, 1, bytes(8))
    dinf = _box(b"dinf", _full_box(b"dref", 0, 0, struct.pack(">I", 1), _full_box(b"url ", 0, 1)))
    colr = _box(b"colr", b"nclx", struct.pack(">HHHB", COLOUR_PRIMARIES, TRANSFER_CHARACTERISTICS,
                                                 MATRIX_COEFFICIENTS, 0))  # full_range_flag 0
    pasp = _box(b"pasp", struct.pack(">II", 1, 1))
    avc1 = _box(b"avc1", bytes(6), struct.pack(">H", 1), bytes(16), struct.pack(">HH", geom.width, geom.height),
                struct.pack(">III", 0x480000, 0x480000, 0), struct.pack(">H", 1), bytes(32),
                struct.pack(">Hh", 0x18, -1), _avcc(sps, pps), colr, pasp)
    stsd = _full_box(b"stsd", 0, 0, struct.pack(">I", 1), avc1)
    stts = _full_box(b"stts", 0, 0, struct.pack(">III", 1, n, delta))
    stsc = _full_box(b"stsc", 0, 0, struct.pack(">IIII", 1, 1, 1, 1))  # every chunk holds one sample
    stsz = _full_box(b"stsz", 0, 0, struct.pack(f">II{n}I", 0, n, *sizes))
    if co64:
        stco = _full_box(b"co64", 0, 0, struct.pack(f">I{n}Q", n, *offsets))
    else:
        stco = _full_box(b"stco", 0, 0, struct.pack(f">I{n}I", n, *offsets))
    stbl = _box(b"stbl", stsd, stts, stsc, stsz, stco)
    minf = _box(b"minf", vmhd, dinf, stbl)
    mdia = _box(b"mdia", mdhd, hdlr, minf)
    return _box(b"moov", mvhd, _box(b"trak", tkhd, mdia))


def _timescale(rate: Fraction) -> tuple[int, int]:
    """Media timescale and frame duration: like ffmpeg, the rate's numerator doubled up to at least 10,000."""
    k = 1
    while rate.numerator * k < 10000:
        k *= 2
    return rate.numerator * k, rate.denominator * k


FTYP = _box(b"ftyp", b"isom", struct.pack(">I", 0x200), b"isom", b"iso2", b"avc1", b"mp41")


def write_mp4(frames: np.ndarray, f: BinaryIO, fps: float) -> None:
    """Write uint8 RGB frames [F, H, W, 3] (validated by the caller) to the binary file ``f``."""
    n, h, w, _ = frames.shape
    geom = Geometry.for_frames(h, w)
    rate = fps_fraction(fps)
    sps, pps = sps_nal(geom, rate), pps_nal()
    timescale, delta = _timescale(rate)
    sizes = [NAL_LENGTH_SIZE + slice_nal_size(geom, i % 2) for i in range(n)]
    payload = sum(sizes)
    mdat_head = struct.pack(">I4s", 8 + payload, b"mdat") if 8 + payload < LIMIT_32 else \
        struct.pack(">I4sQ", 1, b"mdat", 16 + payload)
    co64 = False
    while True:
        size = len(_moov(geom, sps, pps, timescale, delta, sizes, [0] * n, co64))
        offsets = np.cumsum([len(FTYP) + size + len(mdat_head)] + sizes[:-1]).tolist()
        if co64 or offsets[-1] < LIMIT_32:
            break
        co64 = True
    f.write(FTYP)
    f.write(_moov(geom, sps, pps, timescale, delta, sizes, offsets, co64))
    f.write(mdat_head)
    for i, frame in enumerate(frames):
        nal = encode_frame(frame, geom, i % 2)
        f.write(struct.pack(">I", len(nal)))
        f.write(nal)


# ----------------------------------------------------------------------------------------------------------------
# reader for the files written above (and other CAVLC, all-I_PCM, 8-bit 4:2:0 H.264 in MP4)


class _BitReader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def u(self, n: int) -> int:
        v = 0
        for _ in range(n):
            i = self.pos >> 3
            if i >= len(self.data):
                raise NotOurMp4("truncated H.264 header")
            v = v << 1 | (self.data[i] >> (7 - (self.pos & 7))) & 1
            self.pos += 1
        return v

    def ue(self, limit: int = 1 << 20) -> int:
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
            if zeros > 31:
                raise NotOurMp4("bad exp-Golomb code")
        v = (1 << zeros) - 1 + self.u(zeros)
        if v > limit:
            raise NotOurMp4(f"H.264 value {v} out of range")
        return v

    def se(self) -> int:
        k = self.ue(1 << 32)
        return (k + 1) // 2 if k % 2 else -(k // 2)

    def align(self) -> None:
        if self.pos & 7 and self.u(8 - (self.pos & 7)):
            raise NotOurMp4("nonzero pcm_alignment_zero_bit")


@dataclass
class _Sps:
    log2_max_frame_num: int
    poc_type: int
    log2_max_poc_lsb: int = 0
    delta_pic_order_always_zero: int = 0
    mb_width: int = 0
    mb_height: int = 0
    crop: tuple[int, int, int, int] = (0, 0, 0, 0)  # left, right, top, bottom in luma samples
    matrix: int = 2
    full_range: bool = False


@dataclass
class _Pps:
    sps_id: int
    bottom_field_pic_order: int
    redundant_pic_cnt_present: int
    deblocking_control: int


_HIGH_PROFILES = {100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135}


def _parse_sps(rbsp: bytes) -> tuple[int, _Sps]:
    br = _BitReader(rbsp)
    profile = br.u(8)
    br.u(16)  # constraint flags, level_idc
    sps_id = br.ue(31)
    if profile in _HIGH_PROFILES:
        if br.ue() != 1:
            raise NotOurMp4("only 4:2:0 chroma is supported")
        if br.ue() or br.ue():
            raise NotOurMp4("only 8-bit samples are supported")
        br.u(1)  # qpprime_y_zero_transform_bypass_flag
        if br.u(1):
            raise NotOurMp4("scaling matrices are not supported")
    sps = _Sps(log2_max_frame_num=br.ue(12) + 4, poc_type=br.ue(2))
    if sps.poc_type == 0:
        sps.log2_max_poc_lsb = br.ue(12) + 4
    elif sps.poc_type == 1:
        sps.delta_pic_order_always_zero = br.u(1)
        br.se(), br.se()
        for _ in range(br.ue(255)):
            br.se()
    br.ue()  # max_num_ref_frames
    br.u(1)  # gaps_in_frame_num_value_allowed_flag
    sps.mb_width, sps.mb_height = br.ue() + 1, br.ue() + 1
    if not br.u(1):
        raise NotOurMp4("interlaced H.264 is not supported")
    br.u(1)  # direct_8x8_inference_flag
    if br.u(1):
        sps.crop = tuple(2 * br.ue() for _ in range(4))
    if br.u(1):  # VUI: only the colour description is needed
        if br.u(1) and br.u(8) == 255:
            br.u(32)  # sar_width, sar_height
        if br.u(1):
            br.u(1)  # overscan_appropriate_flag
        if br.u(1):
            br.u(3)
            sps.full_range = bool(br.u(1))
            if br.u(1):
                br.u(16)
                sps.matrix = br.u(8)
    return sps_id, sps


def _parse_pps(rbsp: bytes) -> tuple[int, _Pps]:
    br = _BitReader(rbsp)
    pps_id, sps_id = br.ue(255), br.ue(31)
    if br.u(1):
        raise NotOurMp4("CABAC is not supported")
    bottom = br.u(1)
    if br.ue():
        raise NotOurMp4("slice groups are not supported")
    br.ue(), br.ue(), br.u(3)  # num_ref_idx defaults, weighted prediction
    br.se(), br.se(), br.se()  # pic_init_qp, pic_init_qs, chroma_qp_index_offset
    deblocking = br.u(1)
    br.u(1)  # constrained_intra_pred_flag
    return pps_id, _Pps(sps_id, bottom, br.u(1), deblocking)


@dataclass
class Mp4Video:
    """What ``read_mp4`` found: RGB frames, the YCbCr planes they came from, and the frame rate."""

    frames: np.ndarray  # uint8 [F, H, W, 3]
    fps: float
    y: np.ndarray = field(repr=False)  # uint8 [F, H, W] (cropped)
    cb: np.ndarray = field(repr=False)  # uint8 [F, H/2, W/2]
    cr: np.ndarray = field(repr=False)


class _Decoder:
    def __init__(self):
        self.sps: dict[int, _Sps] = {}
        self.pps: dict[int, _Pps] = {}
        self.pictures: list[tuple[_Sps, np.ndarray]] = []  # (sps, [mbs, 384]) per picture
        self._filled: np.ndarray | None = None

    def nal(self, nal: bytes) -> None:
        if not nal or nal[0] & 0x80:
            raise NotOurMp4("bad NAL unit header")
        ref_idc, kind = nal[0] >> 5 & 3, nal[0] & 0x1F
        if kind == 7:
            sps_id, sps = _parse_sps(unescape(nal[1:]))
            self.sps[sps_id] = sps
        elif kind == 8:
            pps_id, pps = _parse_pps(unescape(nal[1:]))
            self.pps[pps_id] = pps
        elif kind in (1, 5):
            self._slice(unescape(nal[1:]), ref_idc, kind == 5)
        elif kind in (2, 3, 4, 20, 21):
            raise NotOurMp4(f"NAL unit type {kind} is not supported")

    def _slice(self, rbsp: bytes, ref_idc: int, idr: bool) -> None:
        br = _BitReader(rbsp)
        first_mb = br.ue()
        if br.ue(9) % 5 != 2:
            raise NotOurMp4("not an I slice")
        pps_id = br.ue(255)
        if pps_id not in self.pps or self.pps[pps_id].sps_id not in self.sps:
            raise NotOurMp4("slice without a parameter set")
        pps = self.pps[pps_id]
        sps = self.sps[pps.sps_id]
        br.u(sps.log2_max_frame_num)  # frame_num
        if idr:
            br.ue(65535)  # idr_pic_id
        if sps.poc_type == 0:
            br.u(sps.log2_max_poc_lsb)
            if pps.bottom_field_pic_order:
                br.se()
        elif sps.poc_type == 1 and not sps.delta_pic_order_always_zero:
            br.se()
            if pps.bottom_field_pic_order:
                br.se()
        if pps.redundant_pic_cnt_present and br.ue():
            return  # a redundant slice: the primary one carries the same macroblocks
        if ref_idc:
            if idr:
                br.u(2)
            elif br.u(1):  # adaptive_ref_pic_marking_mode_flag
                while (op := br.ue(6)) != 0:
                    if op in (1, 3):
                        br.ue()
                    if op == 2:
                        br.ue()
                    if op in (3, 6):
                        br.ue()
                    if op == 4:
                        br.ue()
        br.se()  # slice_qp_delta
        if pps.deblocking_control and br.ue(2) != 1:
            br.se(), br.se()
        if br.ue(48) != MB_TYPE_I_PCM:
            raise NotOurMp4("not an I_PCM macroblock")
        br.align()
        # from here on the slice is byte aligned: [384 PCM bytes] + n x ([0x0D 0x00] + 384 PCM bytes) + 0x80
        start = br.pos >> 3
        rest = len(rbsp) - start - 384 - 1
        if rest < 0 or rest % 386 or rbsp[-1] != 0x80:
            raise NotOurMp4("slice data is not all I_PCM macroblocks")
        data = np.frombuffer(rbsp, np.uint8, len(rbsp) - start - 1, start)
        mbs = np.concatenate([_MB_PREFIX_ARRAY, data]).reshape(-1, 386)
        if (mbs[:, :2] != _MB_PREFIX_ARRAY).any():
            raise NotOurMp4("slice data is not all I_PCM macroblocks")
        total = sps.mb_width * sps.mb_height
        if first_mb == 0:
            self._finish_picture()
            self.pictures.append((sps, np.zeros((total, 384), np.uint8)))
            self._filled = np.zeros(total, bool)
        if self._filled is None or first_mb + len(mbs) > total or self._filled[first_mb:first_mb + len(mbs)].any():
            raise NotOurMp4("slices do not tile the picture")
        self.pictures[-1][1][first_mb:first_mb + len(mbs)] = mbs[:, 2:]
        self._filled[first_mb:first_mb + len(mbs)] = True

    def _finish_picture(self) -> None:
        if self._filled is not None and not self._filled.all():
            raise NotOurMp4("a picture is missing macroblocks")

    def planes(self) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], _Sps]:
        self._finish_picture()
        if not self.pictures:
            raise NotOurMp4("no pictures")
        ys, cbs, crs = [], [], []
        sps0 = self.pictures[0][0]
        for sps, mbs in self.pictures:
            if (sps.mb_width, sps.mb_height, sps.crop) != (sps0.mb_width, sps0.mb_height, sps0.crop):
                raise NotOurMp4("the frame size changes")
            mbh, mbw = sps.mb_height, sps.mb_width
            grid = mbs.reshape(mbh, mbw, 384)
            left, right, top, bottom = sps.crop
            y = grid[..., :256].reshape(mbh, mbw, 16, 16).transpose(0, 2, 1, 3).reshape(16 * mbh, 16 * mbw)
            cb = grid[..., 256:320].reshape(mbh, mbw, 8, 8).transpose(0, 2, 1, 3).reshape(8 * mbh, 8 * mbw)
            cr = grid[..., 320:].reshape(mbh, mbw, 8, 8).transpose(0, 2, 1, 3).reshape(8 * mbh, 8 * mbw)
            ys.append(y[top:16 * mbh - bottom, left:16 * mbw - right])
            cbs.append(cb[top // 2:8 * mbh - bottom // 2, left // 2:8 * mbw - right // 2])
            crs.append(cr[top // 2:8 * mbh - bottom // 2, left // 2:8 * mbw - right // 2])
        return ys, cbs, crs, sps0


_MB_PREFIX_ARRAY = np.frombuffer(_MB_PREFIX, np.uint8)


def _boxes(buf: memoryview, start: int, end: int):
    """Yield (type, payload start, payload end) of the boxes in buf[start:end]."""
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", buf, pos)
        head = 8
        if size == 1:
            if pos + 16 > end:
                raise DamagedMp4("a box runs past the end of the file")
            size, head = struct.unpack_from(">Q", buf, pos + 8)[0], 16
        elif size == 0:
            size = end - pos
        if size < head or pos + size > end:
            raise DamagedMp4("a box runs past the end of the file" if pos + size > end else "a malformed box")
        yield kind, pos + head, pos + size
        pos += size


def _child(buf: memoryview, start: int, end: int, kind: bytes) -> tuple[int, int]:
    for k, s, e in _boxes(buf, start, end):
        if k == kind:
            return s, e
    raise NotOurMp4(f"no {kind.decode()} box")


def read_mp4(path: str | Path) -> Mp4Video:
    """Decode an MP4 whose video is CAVLC H.264 made of I_PCM macroblocks (what ``write_mp4`` writes).

    Raises NotOurMp4 for anything else (the caller falls back to a general decoder) and DamagedMp4 for a
    truncated file."""
    try:
        return _read_mp4(path)
    except (struct.error, IndexError, ValueError) as e:  # a field or table cut short
        raise NotOurMp4(f"malformed MP4: {e}") from e


def _read_mp4(path: str | Path) -> Mp4Video:
    with open(path, "rb") as fh:
        buf = memoryview(fh.read())
    if len(buf) < 8 or struct.unpack_from(">4s", buf, 4)[0] not in (b"ftyp", b"moov", b"mdat", b"free", b"wide"):
        raise NotOurMp4("not an MP4 file")
    moov = _child(buf, 0, len(buf), b"moov")
    for kind, s, e in _boxes(buf, *moov):
        if kind != b"trak":
            continue
        mdia = _child(buf, s, e, b"mdia")
        hdlr = _child(buf, *mdia, b"hdlr")
        if bytes(buf[hdlr[0] + 8:hdlr[0] + 12]) == b"vide":
            break
    else:
        raise NotOurMp4("no video track")
    mdhd_s, _ = _child(buf, *mdia, b"mdhd")
    timescale = struct.unpack_from(">I", buf, mdhd_s + (20 if buf[mdhd_s] == 1 else 12))[0]
    stbl = _child(buf, *_child(buf, *mdia, b"minf"), b"stbl")
    stsd_s, stsd_e = _child(buf, *stbl, b"stsd")
    entries = list(_boxes(buf, stsd_s + 8, stsd_e))
    if len(entries) != 1 or entries[0][0] not in (b"avc1", b"avc3"):
        raise NotOurMp4("the video track is not H.264")
    _, es, ee = entries[0]
    avcc_s, avcc_e = _child(buf, es + 78, ee, b"avcC")
    avcc = bytes(buf[avcc_s:avcc_e])
    length_size = (avcc[4] & 3) + 1
    decoder = _Decoder()
    pos, count = 5, 0
    for group in range(2):  # SPS, then PPS
        count = avcc[pos] & (0x1F if group == 0 else 0xFF)
        pos += 1
        for _ in range(count):
            (n,) = struct.unpack_from(">H", avcc, pos)
            decoder.nal(avcc[pos + 2:pos + 2 + n])
            pos += 2 + n
    stts_s, _ = _child(buf, *stbl, b"stts")
    (n_stts,) = struct.unpack_from(">I", buf, stts_s + 4)
    stts = np.frombuffer(buf, ">u4", 2 * n_stts, stts_s + 8).reshape(-1, 2).astype(np.int64)
    stsz_s, _ = _child(buf, *stbl, b"stsz")
    const_size, n_samples = struct.unpack_from(">II", buf, stsz_s + 4)
    sizes = np.full(n_samples, const_size, np.int64) if const_size else \
        np.frombuffer(buf, ">u4", n_samples, stsz_s + 12).astype(np.int64)
    stsc_s, _ = _child(buf, *stbl, b"stsc")
    (n_stsc,) = struct.unpack_from(">I", buf, stsc_s + 4)
    stsc = np.frombuffer(buf, ">u4", 3 * n_stsc, stsc_s + 8).reshape(-1, 3).astype(np.int64)
    kinds = {k: (s, e) for k, s, e in _boxes(buf, *stbl)}
    if b"stco" in kinds:
        s = kinds[b"stco"][0]
        chunks = np.frombuffer(buf, ">u4", struct.unpack_from(">I", buf, s + 4)[0], s + 8).astype(np.int64)
    elif b"co64" in kinds:
        s = kinds[b"co64"][0]
        chunks = np.frombuffer(buf, ">u8", struct.unpack_from(">I", buf, s + 4)[0], s + 8).astype(np.int64)
    else:
        raise NotOurMp4("no chunk offsets")
    sample = 0
    for c, chunk_offset in enumerate(chunks.tolist()):
        row = np.searchsorted(stsc[:, 0], c + 1, side="right") - 1
        if row < 0:
            raise NotOurMp4("bad stsc box")
        off = chunk_offset
        for _ in range(int(stsc[row, 1])):
            if sample >= n_samples:
                break
            end = off + int(sizes[sample])
            if end > len(buf):
                raise DamagedMp4(f"frame {sample + 1} of {n_samples} lies past the end of the file")
            p = off
            while p < end:
                n = int.from_bytes(buf[p:p + length_size], "big")
                if p + length_size + n > end:
                    raise NotOurMp4("a NAL unit runs past its sample")
                decoder.nal(bytes(buf[p + length_size:p + length_size + n]))
                p += length_size + n
            off, sample = end, sample + 1
    if sample != n_samples:
        raise NotOurMp4("the chunk table does not hold every sample")
    ys, cbs, crs, sps = decoder.planes()
    if len(ys) != n_samples:
        raise NotOurMp4("samples and pictures do not match")
    frames = np.stack([yuv420_to_rgb(y, cb, cr, sps.matrix, sps.full_range) for y, cb, cr in zip(ys, cbs, crs)])
    duration = int((stts[:, 0] * stts[:, 1]).sum())
    fps = n_samples * timescale / duration if duration else math.nan
    return Mp4Video(frames, fps, np.stack(ys), np.stack(cbs), np.stack(crs))
