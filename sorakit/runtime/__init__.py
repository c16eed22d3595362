"""The sorakit runtime: bundles on ONNX Runtime, without torch.

    from sorakit.runtime import Pipeline, save_video
"""

from sorakit.runtime.pipeline import GenerationResult, Pipeline, Progress, Timings
from sorakit.runtime.sampler import LPL
from sorakit.runtime.video import read_video, save_video

__all__ = ["Pipeline", "GenerationResult", "Progress", "Timings", "LPL", "save_video", "read_video"]
