"""Whole-model weights as bf16 safetensors: small files that travel between machines (e.g. back from a GPU run)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

__all__ = ["save_bf16", "load_weights"]


def save_bf16(model: nn.Module, path: Path) -> None:
    """The model's state dict in bf16 safetensors, written atomically (temporary file, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # a temporary name of its own: processes sharing a run directory may export the same model at once
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_file({k: v.detach().to(torch.bfloat16).contiguous().cpu() for k, v in model.state_dict().items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_weights(model: nn.Module, path: Path) -> nn.Module:
    """Load ``path`` into ``model`` (each tensor cast to the model's dtype); a file of another architecture is refused
    with the first mismatching keys."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    state = load_file(str(path))
    mine = model.state_dict()
    wrong = sorted(set(state) ^ set(mine)) or [k for k in state if state[k].shape != mine[k].shape]
    if wrong:
        raise ValueError(f"{path} holds another architecture than {type(model).__name__} "
                         f"{getattr(model, 'cfg', '')} (first mismatching keys: {wrong[:4]})")
    model.load_state_dict({k: v.to(mine[k].dtype) for k, v in state.items()})
    return model
