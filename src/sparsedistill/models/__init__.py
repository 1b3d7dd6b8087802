"""Models, registered by name: ``create_model("mlp", hidden=[512, 512])``."""

from . import mlp as _mlp  # noqa: F401  (registers)
from . import vit as _vit  # noqa: F401  (registers)
from .registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
