"""Import ONNX Runtime's Python tools without pulling in torch.

``onnxruntime/tools/__init__.py`` imports its PyTorch export helpers (and so torch, seconds
of start-up and hundreds of MB) whenever torch is installed. The devices layer needs only
the torch-free submodules (the mobile usability checker, the ORT-format config writer), so
the package object is created without running that ``__init__``; its one export,
``infer_input_info``, stays available on first access.
"""

from __future__ import annotations

import importlib.util
import sys

_NAME = "onnxruntime.tools"


def ensure_ort_tools_without_torch() -> None:
    if _NAME in sys.modules:
        return
    import onnxruntime

    spec = importlib.util.find_spec(_NAME)
    if spec is None or spec.submodule_search_locations is None:  # pragma: no cover - a stripped ORT install
        return
    module = importlib.util.module_from_spec(spec)

    def __getattr__(attr: str):
        if attr == "have_torch":
            return importlib.util.find_spec("torch")
        if attr == "infer_input_info":
            from onnxruntime.tools.pytorch_export_helpers import infer_input_info

            return infer_input_info
        raise AttributeError(f"module {_NAME!r} has no attribute {attr!r}")

    module.__getattr__ = __getattr__  # type: ignore[attr-defined]
    sys.modules[_NAME] = module
    onnxruntime.tools = module  # type: ignore[attr-defined]
