"""Model presets: frozen, typed configurations for every component.

Pure Python (no torch) so that the CLI, the bundle writer and the runtime can name and
describe presets without importing the export layer.

Three presets exist:

* ``opensora-v1.2`` - the released Open-Sora 1.2 sizes (STDiT3-XL/2, VAE v1.2, T5-v1.1-XXL).
* ``tiny`` - the same classes at toy widths and depths, for fast tests.
* ``shapes`` - the small model the project trains on its moving-shapes data set and ships.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from sorakit.errors import SorakitError


@dataclass(frozen=True)
class STDiT3Config:
    depth: int = 28  # 28 spatial + 28 temporal blocks
    hidden_size: int = 1152
    num_heads: int = 16  # head dim 72
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (T, H, W)
    in_channels: int = 4
    pred_sigma: bool = True  # doubles the output channels; the sampler keeps the first half
    caption_channels: int = 4096  # T5-XXL d_model
    model_max_length: int = 300  # text tokens
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    input_sq_size: int = 512  # reference side of the position-embedding scale
    class_dropout_prob: float = 0.1  # training only: caption dropout for CFG
    # Not in Open-Sora: add a pooled caption embedding to the timestep embedding, so the text
    # also drives the adaLN modulation. Only the small shipped model may turn it on; the
    # Open-Sora presets keep it off so their classes and keys stay exactly the released ones.
    caption_to_time: bool = False
    # Not in Open-Sora either, small models only: add a fixed sinusoidal embedding of the latent
    # frame index to the tokens. Open-Sora's blocks only see relative frame offsets (temporal
    # RoPE), so a frame must infer where it sits in the clip from its neighbours; a small model
    # with little training does not, and cannot lay out a motion.
    temporal_pos_embed: bool = False
    # Small models only: a per-frame vector computed from the pooled caption and the frame index,
    # added to every token of that frame. A motion word ("left") changes where the object is in
    # each frame, a product of text, frame and position; this gives the first block's MLP a
    # position threshold that moves with frame and text, which a small model otherwise learns
    # only very slowly (measured: direction at chance after 1,500 steps without it).
    caption_frame_embed: bool = False

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.pred_sigma else self.in_channels

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass(frozen=True)
class SpatialVAEConfig:
    """diffusers ``AutoencoderKL`` arguments (SDXL layout for Open-Sora 1.2)."""

    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    norm_num_groups: int = 32
    in_channels: int = 3
    out_channels: int = 3
    scaling_factor: float = 0.18215  # hard-coded by Open-Sora, not SDXL's 0.13025
    micro_batch_size: int = 4  # frames per spatial decoder call

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


@dataclass(frozen=True)
class TemporalVAEConfig:
    in_out_channels: int = 4
    latent_embed_dim: int = 4
    embed_dim: int = 4
    filters: int = 128
    num_res_blocks: int = 4
    channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    num_groups: int = 32

    @property
    def time_downsample(self) -> int:
        return 2 ** sum(self.temporal_downsample)


@dataclass(frozen=True)
class VAEConfig:
    spatial: SpatialVAEConfig = field(default_factory=SpatialVAEConfig)
    temporal: TemporalVAEConfig = field(default_factory=TemporalVAEConfig)
    micro_frame_size: int = 17  # pixel frames per temporal chunk -> 5 latent frames
    shift: tuple[float, ...] = (-0.10, 0.34, 0.27, 0.98)
    scale: tuple[float, ...] = (3.85, 2.32, 2.33, 3.06)

    @property
    def micro_z_frame_size(self) -> int:
        return latent_frames_of_chunk(self.micro_frame_size, self.temporal.time_downsample)


@dataclass(frozen=True)
class T5Config:
    """transformers ``T5Config`` fields for an encoder-only T5 v1.1."""

    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    max_length: int = 300  # tokens; padded and truncated to this
    pad_token_id: int = 0
    eos_token_id: int = 1


@dataclass(frozen=True)
class SamplerConfig:
    num_steps: int = 30
    cfg_scale: float = 7.0
    num_timesteps: int = 1000
    use_timestep_transform: bool = True
    # timestep transform: r = sqrt(H*W / base_resolution) * sqrt(T_lat / base_num_frames)
    transform_base_resolution: int = 512 * 512
    transform_base_num_frames: int = 1
    transform_scale: float = 1.0
    fps: int = 24
    # guidance interval: CFG is applied at steps whose (transformed) timestep is <= this; above
    # it the prompt's velocity is used alone. None: every step (Open-Sora 1.2's sampler).
    guidance_max_t: float | None = None

    def guidance_at(self, t: float, cfg_scale: float) -> float:
        return guidance_scale(t, cfg_scale, self.guidance_max_t)


def guidance_scale(t: float, cfg_scale: float, guidance_max_t: float | None) -> float:
    """The CFG scale used at timestep t: cfg_scale inside the guidance interval, 1.0 (the
    prompt's velocity alone) above it."""
    if guidance_max_t is not None and float(t) > guidance_max_t:
        return 1.0
    return float(cfg_scale)


@dataclass(frozen=True)
class ModelPreset:
    name: str
    description: str
    stdit: STDiT3Config
    vae: VAEConfig
    t5: T5Config
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    resolution: tuple[int, int] = (256, 256)  # default (height, width) in pixels
    num_frames: int = 68
    prompt_suffix: str = ""  # appended to every prompt before tokenisation

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @staticmethod
    def from_dict(data: dict[str, Any]) -> ModelPreset:
        def build(cls, values):
            kwargs = {}
            for f in dataclasses.fields(cls):
                if f.name not in values:
                    continue
                v = values[f.name]
                if isinstance(v, list):
                    v = tuple(v)
                kwargs[f.name] = v
            return cls(**kwargs)

        vae = data["vae"]
        return ModelPreset(
            name=data["name"],
            description=data.get("description", ""),
            stdit=build(STDiT3Config, data["stdit"]),
            vae=VAEConfig(
                spatial=build(SpatialVAEConfig, vae["spatial"]),
                temporal=build(TemporalVAEConfig, vae["temporal"]),
                micro_frame_size=vae["micro_frame_size"],
                shift=tuple(vae["shift"]),
                scale=tuple(vae["scale"]),
            ),
            t5=build(T5Config, data["t5"]),
            sampler=build(SamplerConfig, data.get("sampler", {})),
            resolution=tuple(data.get("resolution", (256, 256))),
            num_frames=data.get("num_frames", 68),
            prompt_suffix=data.get("prompt_suffix", ""),
        )

    # -- geometry -------------------------------------------------------------------------
    def latent_size(self, num_frames: int, height: int, width: int) -> tuple[int, int, int]:
        """Latent (T, H, W) for a video of the given pixel size (Open-Sora's get_latent_size)."""
        check_geometry(self, num_frames, height, width)
        down = self.vae.spatial.downsample
        return (
            latent_frames(num_frames, self.vae.micro_frame_size, self.vae.temporal.time_downsample),
            height // down,
            width // down,
        )


def latent_frames_of_chunk(num_frames: int, time_downsample: int) -> int:
    """Latent frames of one temporal chunk: front-pad to a multiple of the factor, divide."""
    return -(-num_frames // time_downsample)


def latent_frames(num_frames: int, micro_frame_size: int = 17, time_downsample: int = 4) -> int:
    """Open-Sora 1.2 frame mapping: 5 latents per full chunk of 17, plus the remainder's."""
    full, rest = divmod(num_frames, micro_frame_size)
    z = full * latent_frames_of_chunk(micro_frame_size, time_downsample)
    if rest:
        z += latent_frames_of_chunk(rest, time_downsample)
    return z


def decode_chunks(num_frames: int, micro_frame_size: int = 17, time_downsample: int = 4) -> list[tuple[int, int]]:
    """(latent frames, pixel frames) of every temporal decode chunk, in order."""
    chunks = []
    remaining = num_frames
    while remaining > 0:
        n = min(micro_frame_size, remaining)
        chunks.append((latent_frames_of_chunk(n, time_downsample), n))
        remaining -= micro_frame_size
    return chunks


def check_geometry(preset: ModelPreset, num_frames: int, height: int, width: int) -> None:
    """Raise a SorakitError naming the problem if the model cannot produce this video size."""
    down = preset.vae.spatial.downsample
    if num_frames < 1:
        raise SorakitError(f"frame count must be at least 1, got {num_frames}")
    if height < down or width < down:
        raise SorakitError(f"resolution {height}x{width} is below the VAE's minimum of {down}x{down} pixels")
    if height % down or width % down:
        raise SorakitError(
            f"resolution {height}x{width} is not a multiple of {down} (the VAE's spatial factor); "
            f"try {height // down * down}x{width // down * down}"
        )


def tiny_preset() -> ModelPreset:
    return ModelPreset(
        name="tiny",
        description="toy widths and depths of the Open-Sora 1.2 classes, random weights, for tests",
        stdit=STDiT3Config(depth=2, hidden_size=64, num_heads=4, caption_channels=32, model_max_length=16),
        vae=VAEConfig(
            spatial=SpatialVAEConfig(block_out_channels=(16, 16, 32, 32), layers_per_block=1, norm_num_groups=8),
            temporal=TemporalVAEConfig(filters=16, num_res_blocks=1, num_groups=8),
        ),
        t5=T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, max_length=16),
        resolution=(64, 64),
        num_frames=17,
    )


def opensora_v12_preset() -> ModelPreset:
    return ModelPreset(
        name="opensora-v1.2",
        description="Open-Sora 1.2: STDiT3-XL/2 (1.21 B), VAE v1.2 (393 M), T5-v1.1-XXL (4.76 B)",
        stdit=STDiT3Config(),  # 973 tensors, 1,208,872,772 elements
        vae=VAEConfig(),  # 393,341,015 elements
        t5=T5Config(),  # 4,762,310,656 parameters
        resolution=(256, 256),
        num_frames=68,
        prompt_suffix=" aesthetic score: 6.5.",
    )


def shapes_preset() -> ModelPreset:
    """The shipped model: Open-Sora classes at small sizes, trained on generated moving shapes."""
    return ModelPreset(
        name="shapes",
        description="small Open-Sora-architecture model trained by sorakit on generated moving shapes",
        stdit=STDiT3Config(
            depth=4,
            hidden_size=192,
            num_heads=6,
            in_channels=8,
            caption_channels=128,
            model_max_length=24,
            caption_to_time=True,
            temporal_pos_embed=True,
            caption_frame_embed=True,
        ),
        vae=VAEConfig(
            spatial=SpatialVAEConfig(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8),
            temporal=TemporalVAEConfig(
                latent_embed_dim=8,
                embed_dim=8,
                filters=16,
                num_res_blocks=1,
                channel_multipliers=(1, 2, 2, 2),
                num_groups=8,
            ),
            # per-channel mean/std of the trained VAE's latents (measured by the recipe, see docs/training.md);
            # the mean is 0 because the recipe folds a centring and whitening map into the temporal VAE
            shift=(0.0,) * 8,
            scale=(0.9911, 0.9129, 0.9521, 0.8872, 0.9914, 0.9101, 0.8841, 0.9228),
        ),
        t5=T5Config(vocab_size=512, d_model=128, d_kv=32, d_ff=256, num_layers=3, num_heads=4, max_length=24),
        # guidance interval: CFG 7 only at t <= 400, the last 6 of 30 steps, chosen on the selection prompts
        # (docs/training.md, "Guidance at high noise"; 800 before: more ghosts and background flicker)
        sampler=SamplerConfig(transform_base_resolution=64 * 64, guidance_max_t=400.0),
        resolution=(64, 64),
        num_frames=17,
    )


PRESETS = {
    "opensora-v1.2": opensora_v12_preset,
    "tiny": tiny_preset,
    "shapes": shapes_preset,
}


def get_preset(name: str) -> ModelPreset:
    try:
        return PRESETS[name]()
    except KeyError:
        raise SorakitError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
