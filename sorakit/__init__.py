"""sorakit: Open-Sora 1.2 from PyTorch to small devices through ONNX.

Layers: ``sorakit.export`` (torch: models, checkpoints, exporters), ``sorakit.graph_passes``
(ONNX rewrites), ``sorakit.runtime`` (ONNX Runtime, no torch), ``sorakit.devices`` (profiles,
audit, packaging), ``sorakit.bundle`` (the on-disk contract).
"""

__version__ = "0.1.0"
