"""Deployable 2:4 models: swap trained Linears for ``Sparse24Linear``, save them compressed, load them back.

A saved model is one safetensors file. Each 2:4 layer is stored the way the sparse kernel holds
it: the 2 kept values of every group of 4 (``<layer>.values``, fp16 / int8 / fp8) and their
positions, two 2-bit indices per group packed two groups to a byte (``<layer>.index``), plus
the scales and the fp16 bias. Everything else (embeddings, norms, head) is fp16. The header
names the architecture (a registry key and its keyword arguments), so ``load_sparse24`` needs
neither the training code nor the recipe's config: the file size is the deployed size.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .pruning import is_nm_sparse
from .quant import QuantLinear, swap_linears
from .sparse24 import Sparse24Format, Sparse24Linear

__all__ = ["to_sparse24", "pack_24", "unpack_24", "save_sparse24", "load_sparse24", "deployed_bytes"]

FORMAT = "sparsedistill-2:4/1"
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32}  # gather/scatter on raw bits, any dtype


def to_sparse24(model: nn.Module, fmt: Sparse24Format, include: Callable[[str, nn.Module], bool]) -> list[str]:
    """Replace the 2:4 Linears (plain, or QAT-trained ``QuantLinear``) that ``include`` accepts; returns their names.

    A layer whose sizes the kernel cannot take (not multiples of 16) stays dense, with a warning naming it.
    """
    def make(name: str, lin: nn.Linear) -> nn.Module | None:
        if not include(name, lin):
            return None
        if lin.in_features % 16 or lin.out_features % 16:
            warnings.warn(f"{name} ({lin.out_features}x{lin.in_features}) stays dense: cuSPARSELt needs both sizes "
                          "to be multiples of 16", stacklevel=3)
            return None
        weight = lin.masked_weight() if isinstance(lin, QuantLinear) else lin.weight
        if not is_nm_sparse(weight.detach(), 2, 4):
            raise ValueError(f"layer {name} is not 2:4 sparse; prune it (NMSparsifier) before export")
        return Sparse24Linear.from_linear(lin, fmt)

    swapped = swap_linears(model, make)
    if not swapped:
        raise ValueError("no layer was converted: the include filter matched no Linear")
    return swapped


def pack_24(weight: Tensor) -> tuple[Tensor, Tensor]:
    """``(values (out, in/2), index (out, in/8) uint8)`` of a 2:4 weight; ``unpack_24`` inverts it."""
    out_f, in_f = weight.shape
    if in_f % 8:
        raise ValueError(f"packing needs the input dimension to be a multiple of 8, got {in_f}")
    if not is_nm_sparse(weight.float(), 2, 4):
        raise ValueError("weight is not 2:4 sparse")
    bits = weight.view(_INT_VIEW[weight.element_size()]).reshape(out_f, in_f // 4, 4)
    # The 2 nonzero positions of each group (groups with fewer nonzeros fill up with their first zeros).
    nonzero = (weight.float() != 0).reshape(out_f, in_f // 4, 4).float() - torch.arange(4) * 1e-3
    idx = nonzero.topk(2, dim=-1).indices.sort(-1).values
    values = bits.gather(-1, idx).reshape(out_f, in_f // 2).view(weight.dtype)
    code = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.uint8).reshape(out_f, in_f // 8, 2)  # 4 bits per group
    return values, code[..., 0] | (code[..., 1] << 4)


def unpack_24(values: Tensor, index: Tensor) -> Tensor:
    out_f, half = values.shape
    if index.shape != (out_f, half // 4) or index.dtype != torch.uint8:
        raise ValueError(f"index must be uint8 of shape {(out_f, half // 4)}, got {index.dtype} {tuple(index.shape)}")
    code = torch.stack([index & 0xF, index >> 4], -1).reshape(out_f, half // 2).long()
    idx = torch.stack([code & 3, code >> 2], -1)
    bits = torch.zeros(out_f, half // 2, 4, dtype=_INT_VIEW[values.element_size()])
    bits.scatter_(-1, idx, values.view(bits.dtype).reshape(out_f, half // 2, 2))
    return bits.reshape(out_f, half * 2).view(values.dtype)


def _tensors(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    tensors: dict[str, Tensor] = {}
    layers: dict[str, str] = {}
    sparse = {n: m for n, m in model.named_modules() if isinstance(m, Sparse24Linear)}
    for name, m in sparse.items():
        values, index = pack_24(m.weight_q.cpu())
        tensors |= {f"{name}.values": values, f"{name}.index": index,
                    f"{name}.weight_scale": m.weight_scale.cpu(), f"{name}.input_scale": m.input_scale.cpu()}
        if m.bias is not None:
            tensors[f"{name}.bias"] = m.bias.cpu()
        layers[name] = m.fmt
    for key, t in model.state_dict().items():
        if key.rpartition(".")[0] not in sparse:
            tensors[key] = t.detach().cpu().half() if t.is_floating_point() else t.detach().cpu()
    return tensors, layers


def deployed_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of what ``save_sparse24`` stores: 2:4 values, their index metadata, and the rest."""
    tensors, _ = _tensors(model)
    size = {"values": 0, "index": 0, "rest": 0}
    for k, t in tensors.items():
        kind = k.rpartition(".")[2]
        size[kind if kind in ("values", "index") else "rest"] += t.numel() * t.element_size()
    return {**size, "total": sum(size.values())}


def save_sparse24(model: nn.Module, path: str | Path, arch: str, arch_kwargs: dict[str, Any] | None = None,
                  extra: dict[str, Any] | None = None) -> int:
    """Write ``model`` (after ``to_sparse24``) to ``path`` atomically; ``arch`` is its registry key. Returns bytes written."""
    from safetensors.torch import save

    from ..runs import atomic_write_bytes

    tensors, layers = _tensors(model)
    if not layers:
        raise ValueError("the model has no Sparse24Linear layers; convert it with to_sparse24 first")
    meta = {"format": FORMAT, "arch": arch, "arch_kwargs": json.dumps(arch_kwargs or {}), "layers": json.dumps(layers),
            "extra": json.dumps(extra or {})}
    data = save(tensors, metadata=meta)
    atomic_write_bytes(Path(path), data)
    return len(data)


def load_sparse24(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a saved 2:4 model; on a GPU its dense parts run in fp16, on the CPU in fp32 (same 2:4 numerics)."""
    from safetensors import SafetensorError, safe_open

    from ..models import create_model

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no exported model at {path}")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e}); re-export it") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a sparsedistill 2:4 export (format {meta.get('format')!r}, expected {FORMAT!r})")
    model = create_model(meta["arch"], **json.loads(meta["arch_kwargs"]))
    layers: dict[str, str] = json.loads(meta["layers"])

    def make(name: str, lin: nn.Linear) -> nn.Module | None:
        if name not in layers:
            return None
        weight = unpack_24(tensors.pop(f"{name}.values"), tensors.pop(f"{name}.index"))
        if weight.shape != lin.weight.shape:
            raise ValueError(f"{path}: layer {name} is {tuple(weight.shape)} but {meta['arch']} has {tuple(lin.weight.shape)}")
        return Sparse24Linear(weight, tensors.pop(f"{name}.weight_scale"), tensors.pop(f"{name}.input_scale"),
                              tensors.pop(f"{name}.bias", None), layers[name])

    missing = set(layers) - set(swap_linears(model, make))
    if missing:
        raise ValueError(f"{path} has 2:4 layers that {meta['arch']} lacks: {sorted(missing)[:5]}")
    res = model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}, strict=False)
    absent = [k for k in res.missing_keys if k.rpartition(".")[0] not in layers]  # 2:4 layers were filled above
    if absent or res.unexpected_keys:
        raise ValueError(f"{path} does not match {meta['arch']}: missing {absent[:5]}, unexpected {res.unexpected_keys[:5]}")
    model = model.to(device).eval()
    return model.half() if torch.device(device).type == "cuda" else model
