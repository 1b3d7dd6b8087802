"""Dense 8-bit Linear layers: what a user without 2:4 would deploy instead (the baselines our sparse students must beat).

``Dense8Linear`` keeps the weight dense in FP8 E4M3 or INT8 and quantises its input on the fly. ``granularity``
"row": one weight scale per output row and, unless a calibrated ``input_scale`` is given, a dynamic input
scale per row (each call's absmax; torchao's float8 "rowwise" recipe); "tensor": one scale each, the input's
calibrated (FP8's fastest kernel: per-tensor scales, fp16 out, bias in the epilogue). The GEMM is PyTorch's own:
``torch._scaled_mm`` for FP8, ``torch._int_mm`` (int32 out, then dequantised) for INT8. Under ``torch.compile``
Inductor fuses the quantisation with the neighbouring LayerNorm / GELU / residual kernels; whether it also folds
INT8's dequantisation into the GEMM depends on the mm template autotuning picks (check with TORCH_LOGS=output_code).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Dense8Linear", "FORMATS"]

FORMATS = {"fp8": (torch.float8_e4m3fn, 448.0), "int8": (torch.int8, 127.0)}


class Dense8Linear(nn.Module):
    """``y = x W^T + b`` with W in 8 bits (per-row or per-tensor scales) and x quantised per call (a calibrated
    per-tensor scale, or each row's absmax)."""

    def __init__(self, weight: Tensor, bias: Tensor | None, fmt: str, input_scale: float | None = None,
                 granularity: str = "row") -> None:
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"format {fmt!r}; use one of {list(FORMATS)}")
        if granularity not in ("row", "tensor"):
            raise ValueError(f"granularity {granularity!r}; use 'row' or 'tensor'")
        if input_scale is not None and not input_scale > 0:
            raise ValueError(f"input_scale must be > 0 (the inputs' calibrated absmax), got {input_scale}")
        if granularity == "tensor" and input_scale is None:
            raise ValueError("per-tensor scales need a calibrated input_scale (the inputs' absmax)")
        dtype, qmax = FORMATS[fmt]
        w = weight.detach().float()
        w_scale = (w.abs().amax(1, keepdim=True) if granularity == "row" else w.abs().amax().reshape(1, 1))
        w_scale = w_scale.clamp(min=1e-12) / qmax  # (N, 1) or (1, 1)
        q = w / w_scale
        q = q.round().clamp(-qmax, qmax) if fmt == "int8" else q
        # (K, N) column-major, as both GEMMs want their second operand
        self.register_buffer("weight_q", q.to(dtype).t())
        self.register_buffer("weight_scale", w_scale.t().contiguous())  # (1, N) or (1, 1)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        # the input's step size, kept on the layer's device (no tensor built per call)
        self.register_buffer("input_step", None if input_scale is None
                             else torch.tensor([[input_scale / qmax]], device=weight.device))
        self.fmt, self.granularity, self.input_scale, self.out_features = fmt, granularity, input_scale, weight.shape[0]

    @classmethod
    def from_linear(cls, lin: nn.Linear, fmt: str, input_scale: float | None = None, granularity: str = "row") -> "Dense8Linear":
        return cls(lin.weight, lin.bias, fmt, input_scale, granularity)

    def forward(self, x: Tensor) -> Tensor:
        dtype, qmax = FORMATS[self.fmt]
        lead, x2 = x.shape[:-1], x.reshape(-1, x.shape[-1])
        if self.input_step is None:  # dynamic: each row's absmax
            sx = x2.abs().amax(1, keepdim=True).float().clamp(min=1e-12) / qmax  # (M, 1)
        else:
            sx = self.input_step
        xq = x2.float() / sx
        xq = (xq.round().clamp(-qmax, qmax) if self.fmt == "int8" else xq.clamp(-qmax, qmax)).to(dtype)
        if self.fmt == "fp8" and self.granularity == "tensor" and x.dtype != torch.float32:
            # one kernel: scales, bias and the 16-bit output (CUDA takes no bias with an fp32 output)
            y = torch._scaled_mm(xq, self.weight_q, scale_a=sx.reshape(()), scale_b=self.weight_scale.reshape(()),
                                 bias=None if self.bias is None else self.bias.to(x.dtype), out_dtype=x.dtype)
            return y.reshape(*lead, self.out_features)
        if self.fmt == "fp8" and self.granularity == "tensor":
            y = torch._scaled_mm(xq, self.weight_q, scale_a=sx.reshape(()), scale_b=self.weight_scale.reshape(()),
                                 out_dtype=torch.float32)
            y = y if self.bias is None else y + self.bias.float()
            return y.reshape(*lead, self.out_features)
        if self.fmt == "fp8":
            # row-wise scales need a bf16 output in PyTorch's kernel; the cast back fuses under compile
            y = torch._scaled_mm(xq, self.weight_q, scale_a=sx.expand(len(x2), 1).contiguous(), scale_b=self.weight_scale,
                                 out_dtype=torch.bfloat16)
        else:
            rows = len(xq)
            if xq.is_cuda and rows <= 16:  # CUDA's int8 GEMM wants more than 16 rows: pad with zeros, drop them after
                acc = torch._int_mm(torch.cat([xq, xq.new_zeros(17 - rows, xq.shape[1])]), self.weight_q)[:rows]
            else:
                acc = torch._int_mm(xq, self.weight_q)
            # int32 times the fp32 scales (no cast between: the pattern Inductor can fold into the GEMM's epilogue)
            y = acc * (sx * self.weight_scale)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        scale = "dynamic per-row" if self.input_scale is None else f"static {self.input_scale:.4g}"
        return (f"fmt={self.fmt}, in={self.weight_q.shape[0]}, out={self.out_features}, {self.granularity} weight scales, "
                f"input scale {scale}")
