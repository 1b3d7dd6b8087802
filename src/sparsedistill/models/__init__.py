"""Models, registered by name: ``create_model("mlp", hidden=[512, 512])``, ``create_model("smollm2_135m")``."""

from . import coop_detector as _coop_detector  # noqa: F401  (registers)
from . import efficientnet_lite as _efficientnet_lite  # noqa: F401  (registers)
from . import llama as _llama  # noqa: F401  (registers)
from . import mlp as _mlp  # noqa: F401  (registers)
from . import video_dit as _video_dit  # noqa: F401  (registers)
from . import vit as _vit  # noqa: F401  (registers)
from .registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
