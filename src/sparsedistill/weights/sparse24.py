"""Deployable 2:4 sparse Linear layers on cuSPARSELt, and CUDA-graph capture of a whole model.

``Sparse24Linear`` holds a compressed 2:4 weight in fp16, int8 or fp8 (E4M3) and calls
cuSPARSELt through ``torch._cslt_sparse_mm`` with an algorithm searched once per input size.
PyTorch re-creates the cuSPARSELt plan on every call, 0.3-1 ms of host time
(benchmarks/README.md), so a sparse model only pays off when its forward is replayed from a CUDA
graph: ``CUDAGraphed`` captures a module for one input shape and replays it.

Without CUDA, ``Sparse24Linear`` computes the same function densely (masked weights, the same
quantisation of inputs and weights), so a model exported here runs anywhere; ``uses_kernel``
says which path runs.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
import warnings
import weakref
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..timing import time_ms
from .pruning import is_nm_sparse
from .quant import QMAX

__all__ = ["Sparse24Format", "Sparse24Linear", "Sparse24GeluMlp", "fuse_sparse24_mlps", "CUDAGraphed"]

log = logging.getLogger(__name__)

Sparse24Format = Literal["fp16", "int8", "fp8"]
_QDTYPE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
_TOKEN_ALIGN = 16  # cuSPARSELt rejects token counts that are not a multiple of 16
# (fmt, out, in, tokens, bias, device, column-major views, out dtype, alpha in the epilogue) -> (transpose_result, algorithm)
_PLANS: dict[tuple, tuple[bool, int]] = {}


def _quantize(x: Tensor, scale: Tensor, fmt: Sparse24Format) -> Tensor:
    q = (x.float() / scale).clamp(-QMAX[fmt], QMAX[fmt])
    return q.round().to(torch.int8) if fmt == "int8" else q.to(torch.float8_e4m3fn)


def _quant_step(x: Tensor, scale: Tensor, pad: int, fmt: Sparse24Format) -> Tensor:
    return _quantize(F.pad(x, (0, 0, 0, pad)) if pad else x, scale, fmt)


def _dequant_step(y: Tensor, scale: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    y = y.float() * scale
    return (y if bias is None else y + bias.float()).to(dtype)


@functools.cache
def _fused(kind: str):
    """Compiled (Inductor -> one Triton kernel) quantise / dequantise steps around the sparse GEMM.

    Inside a compiled model (``CUDAGraphed(..., compile=True)``) the plain steps are used instead,
    so Inductor can fuse them with the LayerNorm / GELU / residual add next to them.
    """
    # dynamic: one graph for every layer width and token count (per-shape graphs hit dynamo's recompile
    # limit on ViT-L and silently fell back to eager, benchmarks/results/vit_speed.json)
    return torch.compile({"quant": _quant_step, "dequant": _dequant_step}[kind], dynamic=True)


def _epilogue_dtype(dtype: torch.dtype) -> torch.dtype:
    """What an int8 GEMM with the dequantisation in its epilogue writes: the model's 16-bit dtype, else bf16."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.bfloat16


def _residual_rows(residual: Tensor | None, lead: torch.Size, out_features: int, what: str) -> Tensor | None:
    """The residual as (tokens, out) rows, checked against the output's shape."""
    if residual is None:
        return None
    if residual.shape != (*lead, out_features):
        raise ValueError(f"the residual must have {what}'s output shape {(*lead, out_features)}, got {tuple(residual.shape)}")
    return residual.reshape(-1, out_features)


def _add_reference(y: Tensor, residual: Tensor | None, dtype: torch.dtype) -> Tensor:
    """The CPU path's result: fp32 sums plus the residual, rounded once (as the epilogue), in the dtype ``residual +
    layer(x)`` would have."""
    if residual is None:
        return y.to(dtype)
    return (y + residual.float()).to(torch.promote_types(dtype, residual.dtype))


def _step(kind: str):
    return ({"quant": _quant_step, "dequant": _dequant_step}[kind] if torch.compiler.is_compiling() else _fused(kind))


class Sparse24Linear(nn.Module):
    """``y = x W^T + b`` with a 2:4 weight; int8/fp8 quantise ``x`` per tensor and ``W`` per output channel."""

    # Experimental: fp16 results as column-major views, no transposing copy; the ops after read them
    # strided (Inductor fuses the transpose into them). Measured against the copy in fp16_24_probe.py.
    column_major_views: bool = False
    # int8: dequantise and add the bias in cuSPARSELt's epilogue; a separate pass cannot fuse into attention, so qkv
    # paid a read and write of its output (docs/notes/vit-speed.md). fp8 keeps the pass (untested on a GPU).
    epilogue_dequant: bool = True
    # int8 with the dequantisation in the epilogue: a residual passed to forward is added there too (cuSPARSELt's C,
    # beta 1), so the LayerNorm after reads one tensor, not the block's input and the branch's output. Off until its
    # GPU test passes: with a host beta the H100 added nothing (docs/notes/vit-speed.md); beta is now a device vector.
    epilogue_residual: bool = False
    # ... from this many tokens on: at batch 256 (50k tokens) the residual's plan saved 0.56 ms (ViT-B) and 1.6 ms
    # (ViT-L) on an H100; at batch 1 (208 / 272 padded tokens) it cost 0.03 ms (ViT-B) or nothing (ViT-L); between
    # the two, unmeasured (docs/notes/vit-speed.md)
    residual_min_tokens: int = 2048
    # forward(x, residual=r) returns r + self(x): what models/vit.py's blocks look for (a forward hook on this layer then
    # sees the sum)
    takes_residual = True

    def __init__(self, weight_q: Tensor, weight_scale: Tensor, input_scale: Tensor | float, bias: Tensor | None,
                 fmt: Sparse24Format = "fp16") -> None:
        """From already-quantised 2:4 values (what ``sparsedistill.weights.export`` saves); see ``from_dense``."""
        super().__init__()
        if fmt not in ("fp16", "int8", "fp8"):
            raise ValueError(f"unknown 2:4 format {fmt!r}; use 'fp16', 'int8' or 'fp8'")
        want = torch.float16 if fmt == "fp16" else _QDTYPE[fmt]
        if weight_q.dtype != want:
            raise ValueError(f"{fmt} values must be {want}, got {weight_q.dtype}; use Sparse24Linear.from_dense to quantise")
        out_f, in_f = weight_q.shape
        if out_f % 16 or in_f % 16:
            raise ValueError(
                f"cuSPARSELt needs in and out features divisible by 16, got {out_f}x{in_f}; "
                "leave this layer dense or pad it"
            )
        if not is_nm_sparse(weight_q.float(), 2, 4):
            raise ValueError("weight is not 2:4 sparse (more than 2 nonzeros in some group of 4 inputs); prune it first")
        self.fmt, self.in_features, self.out_features = fmt, in_f, out_f
        self.register_buffer("weight_q", weight_q.detach())  # uncompressed 2:4 values: what the CPU path uses
        self.register_buffer("weight_scale", torch.as_tensor(weight_scale, dtype=torch.float32).detach().reshape(1, -1).expand(1, out_f).clone())
        self.register_buffer("input_scale", torch.as_tensor(input_scale, dtype=torch.float32).detach().reshape(()).clone())
        self.register_buffer("bias", None if bias is None else bias.detach().half())
        self._compressed: Tensor | None = None
        # (token count, out dtype, alpha in the epilogue) -> (transpose_result, algorithm)
        self._plans: dict[tuple[int, torch.dtype | None, bool], tuple[bool, int]] = {}
        self._epilogue_ops: dict[torch.dtype, tuple[Tensor, Tensor | None]] = {}  # out dtype -> epilogue_operands
        self._residual_plans = _KernelPlans()  # (token count, out dtype) -> Int8SparseGemm adding the residual
        self.register_load_state_dict_post_hook(_refresh_after_load)

    @classmethod
    def from_dense(cls, weight: Tensor, bias: Tensor | None, fmt: Sparse24Format = "fp16",
                   input_scale: Tensor | float | None = None, weight_scale: Tensor | None = None) -> "Sparse24Linear":
        """Quantise a 2:4-pruned float weight: per output channel (absmax unless ``weight_scale`` is given)."""
        if fmt not in ("fp16", "int8", "fp8"):
            raise ValueError(f"unknown 2:4 format {fmt!r}; use 'fp16', 'int8' or 'fp8'")
        if fmt != "fp16" and input_scale is None:
            raise ValueError(f"{fmt} needs the calibrated input scale (from QAT's QuantLinear.input_scale)")
        if not is_nm_sparse(weight, 2, 4):
            raise ValueError("weight is not 2:4 sparse (more than 2 nonzeros in some group of 4 inputs); prune it first")
        w = weight.detach()
        if fmt == "fp16":
            return cls(w.half(), torch.ones(w.shape[0]), 1.0, bias, fmt)
        if weight_scale is None:
            weight_scale = w.abs().amax(1).float().clamp(min=1e-8) / QMAX[fmt]
        w_scale = weight_scale.detach().reshape(-1).float().to(w.device)
        return cls(_quantize(w, w_scale[:, None], fmt), w_scale, input_scale, bias, fmt)

    @classmethod
    def from_linear(cls, linear: nn.Module, fmt: Sparse24Format = "fp16") -> "Sparse24Linear":
        """From an ``nn.Linear`` (2:4 weights) or a calibrated ``QuantLinear`` (its mask and scales)."""
        from .quant import QuantLinear

        if isinstance(linear, QuantLinear):
            if fmt != linear.fmt:
                raise ValueError(f"this QuantLinear was trained for {linear.fmt}, not {fmt}")
            return cls.from_dense(linear.masked_weight(), linear.bias, fmt, linear.input_scale, linear.weight_scale)
        return cls.from_dense(linear.weight, linear.bias, fmt)

    @property
    def uses_kernel(self) -> bool:
        return self.weight_q.is_cuda

    def _reference(self, x2: Tensor) -> Tensor:
        """Dense computation of exactly what the kernel computes (CPU path and tests)."""
        if self.fmt == "fp16":
            y = x2.half().float() @ self.weight_q.float().t()
        else:
            xq = _quantize(x2, self.input_scale, self.fmt).float()
            y = (xq @ self.weight_q.float().t()) * (self.input_scale * self.weight_scale)
        return y if self.bias is None else y + self.bias.float()

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """``x W^T + b``, plus ``residual`` (shaped as the output) if given: added in the GEMM's epilogue where
        ``fuses_residual_at`` this many tokens, else after it."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with {self.in_features} features, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        r2 = _residual_rows(residual, lead, self.out_features, "this layer")
        x2 = x.reshape(-1, self.in_features)
        if not (x2.is_contiguous() or (self.column_major_views and x2.t().is_contiguous())):  # a view: read in place
            x2 = x2.contiguous()
        if not self.uses_kernel:
            return _add_reference(self._reference(x2), r2, x.dtype).reshape(*lead, self.out_features)
        n = x2.shape[0]
        pad = (-n) % _TOKEN_ALIGN
        if self.fmt == "fp16":
            xk = F.pad(x2.half(), (0, 0, 0, pad)) if pad else x2.half()
        else:  # pad + scale + round + cast in one fused kernel, not four passes over the activations
            xk = _step("quant")(x2, self.input_scale, pad, self.fmt)
        return self.forward_padded(xk, n, x.dtype, r2).reshape(*lead, self.out_features)

    @property
    def fuses_residual(self) -> bool:
        """Whether a residual given to ``forward`` is added by the GEMM (int8 on the kernel, both epilogues on)."""
        return (self.fmt == "int8" and self.epilogue_dequant and self.epilogue_residual and self.uses_kernel
                and not (self.out_features % 32 or self.in_features % 32))  # the int8 epilogue kernels' alignment

    def fuses_residual_at(self, tokens: int) -> bool:
        """Whether ``tokens`` rows with a residual take the epilogue path (``fuses_residual`` and the token-count rule)."""
        return self.fuses_residual and tokens >= self.residual_min_tokens

    def _refresh(self) -> None:
        """New values: compressed again into the same memory, so CUDA graphs captured before read them too."""
        if self._compressed is not None:
            fresh = torch._cslt_compress(self.weight_q)
            if fresh.shape == self._compressed.shape:
                self._compressed.copy_(fresh)
            else:
                self._compressed = fresh
        for alpha, bias in self._epilogue_ops.values():  # the epilogue's operands likewise, in place
            alpha.copy_(self._alpha())
            if bias is not None:  # (load_state_dict never turns a None buffer into a tensor)
                bias.copy_(self.bias)

    def _alpha(self) -> Tensor:
        return (self.input_scale * self.weight_scale).reshape(-1).float().contiguous()

    def epilogue_operands(self, out_dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        """What cuSPARSELt's epilogue computes ``alpha[o] * sum + bias[o]`` from: alpha fp32 per output channel (input
        scale x weight scale), the bias in the output's dtype (the library's rule for int8 inputs with a 16-bit
        output). Built once per dtype and kept: a CUDA graph captured with them reads these tensors."""
        ops = self._epilogue_ops.get(out_dtype)
        if ops is None:
            bias = None if self.bias is None else self.bias.to(out_dtype, copy=True).contiguous()  # never the buffer
            ops = self._epilogue_ops[out_dtype] = (self._alpha(), bias)
        return ops

    @property
    def compressed(self) -> Tensor:
        """The weight as cuSPARSELt holds it (compressed on first use, on the weight's device)."""
        if self._compressed is None:
            self._compressed = torch._cslt_compress(self.weight_q)
        return self._compressed

    def forward_padded(self, xk: Tensor, n: int, dtype: torch.dtype, residual: Tensor | None = None) -> Tensor:
        """The layer from its kernel-ready input: ``xk`` (tokens padded to 16, in features) already in the layer's
        format (fp16, or quantised by ``input_scale``), of which the first ``n`` rows are real; (n, out) in ``dtype``,
        plus ``residual`` ((n, out)) if given."""
        if residual is not None:
            if self.fuses_residual_at(n) and residual.dtype == dtype == _epilogue_dtype(dtype):  # never rounds the stream
                return self._gemm_residual(xk, n, dtype, residual)
            return residual + self.forward_padded(xk, n, dtype)
        alpha = None
        if self.fmt == "fp16":
            out_dtype, bias = None, self.bias  # the bias added in cuSPARSELt's epilogue
        elif self.fmt == "int8" and self.epilogue_dequant:  # rescaled sums: they fit the model's 16-bit dtype
            out_dtype = _epilogue_dtype(dtype)
            alpha, bias = self.epilogue_operands(out_dtype)
        else:
            out_dtype, bias = torch.bfloat16, None  # raw int8/fp8 sums overflow fp16
        plan_key = (xk.shape[0], out_dtype, alpha is not None)
        plan = self._plans.get(plan_key)
        if plan is None:  # chosen once per layer shape and token count, outside graph capture (a warm-up call does it)
            key = (self.fmt, self.out_features, self.in_features, xk.shape[0], bias is not None, xk.device,
                   self.column_major_views, out_dtype, alpha is not None)
            if key not in _PLANS:  # layers of one shape share it: ViT-B's 48 sparse layers have 4 shapes
                _PLANS[key] = self._choose_plan(xk, bias, out_dtype, alpha)
            plan = self._plans[plan_key] = _PLANS[key]
        y = self._gemm(xk, bias, out_dtype, *plan, alpha=alpha)[:n]
        if self.fmt != "fp16" and alpha is None:  # dequantise, add the bias and cast back in one fused kernel
            y = _step("dequant")(y, self.input_scale * self.weight_scale, self.bias, dtype)
        return y.to(dtype)

    def _gemm_residual(self, xk: Tensor, n: int, dtype: torch.dtype, residual: Tensor) -> Tensor:
        """``alpha * sums + residual + bias`` by our own cuSPARSELt plan (PyTorch's binding takes no C operand);
        ``residual`` already in ``dtype``, 16-bit."""
        out_dtype = dtype
        r = (F.pad(residual, (0, 0, 0, xk.shape[0] - n)) if xk.shape[0] > n else residual).contiguous()

        def build():
            from .cusparselt import Int8SparseGemm

            alpha, bias = self.epilogue_operands(out_dtype)  # refreshed in place by load_state_dict
            plan = Int8SparseGemm(self.compressed, self.out_features, self.in_features, xk.shape[0], alpha, bias,
                                  out_dtype=out_dtype, residual=True)
            log.info("cuSPARSELt plan with the residual for int8 %dx%d, %d tokens: algorithm %d", self.out_features,
                     self.in_features, xk.shape[0], plan.search(xk, r))
            return plan

        gemm = self._residual_plans.id_for((xk.shape[0], out_dtype), build)
        return _int8_sparse_mm(xk, r, self.out_features, out_dtype, gemm)[:n]

    def _gemm(self, xk: Tensor, bias: Tensor | None, out_dtype: torch.dtype | None, transposed: bool, alg: int,
              alpha: Tensor | None = None) -> Tensor:
        return _cslt_mm(self.compressed, xk, bias, self.out_features, transposed, alg, out_dtype,
                        self.column_major_views and not transposed, alpha)

    def _choose_plan(self, xk: Tensor, bias: Tensor | None, out_dtype: torch.dtype | None,
                     alpha: Tensor | None = None) -> tuple[bool, int]:
        """How to run this token count: cuSPARSELt's algorithm search, plus a timing where it cannot decide.

        int8/fp8: the searched algorithm with a transposed (row-major) result. fp16: the search fails
        with a transposed result on the H100, and its only working algorithm (0) is pathologically
        slow eagerly at narrow layers (benchmarks/probes/first_call_probe_h100.txt), so it is timed against
        the searched plain layout plus one transposing copy, and the faster one is kept. Timed only in a
        CUDA graph, as deployed: eager timing adds host time per call and picked the copy, 3x slower on
        the H200 at ViT-B batch 256 (benchmarks/probes/fp16_24_probe.py; ``_pick_by_graphed_time``).
        """
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"no cuSPARSELt plan for {xk.shape[0]} tokens yet: run the module once outside the CUDA graph capture")
        t0 = time.perf_counter()
        shape = f"{self.fmt} {self.out_features}x{self.in_features} weight, {xk.shape[0]} tokens"
        if self.fmt != "fp16":
            plan = True, torch._cslt_sparse_mm_search(self.compressed, xk.t(), bias=bias, alpha=alpha, out_dtype=out_dtype,
                                                      transpose_result=True)
            log.info("cuSPARSELt plan for %s: %s (search %.2f s)", shape, plan, time.perf_counter() - t0)
            return plan
        candidates = [(True, 0), (False, torch._cslt_sparse_mm_search(self.compressed, xk.t(), transpose_result=False))]
        t_search = time.perf_counter() - t0
        graphed = _pick_by_graphed_time(candidates, lambda c, calls, reps: time_ms(
            lambda: self._gemm(xk, bias, out_dtype, *c), graph=True, calls=calls, reps=reps, warmup=0))
        plan = min(graphed, key=graphed.get)
        log.info("cuSPARSELt plan for %s: %s (search %.2f s; graphed ms %s; %.2f s in all)", shape, plan, t_search,
                 {c: round(v, 3) for c, v in graphed.items()}, time.perf_counter() - t0)
        return plan

    def _apply(self, fn, recurse=True):
        """Devices move, dtypes stay: ``model.half()`` converts the dense layers, never these values or scales."""
        if fn(torch.empty(0, device=self.weight_q.device)).device == self.weight_q.device:
            return self  # a dtype change: nothing here changes, plans and graphs captured with them stay valid
        self._compressed, self._plans, self._epilogue_ops = None, {}, {}  # a new device needs a fresh compression
        self._residual_plans.retire()
        for k, b in self._buffers.items():
            if b is not None:  # only the device comes from fn: a round trip through fn's dtype would round the values
                self._buffers[k] = b.to(fn(torch.empty(0, device=b.device)).device)
        return self

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, fmt={self.fmt}, kernel={'cuSPARSELt' if self.uses_kernel else 'dense reference'}"


class Sparse24GeluMlp(nn.Module):
    """``fc2(gelu(fc1(x)))`` of two int8 2:4 layers, fc1's result never leaving int8 (issue 24).

    cuSPARSELt's epilogue does what a separate kernel did between the GEMMs (dequantise fc1's int32 sums, add its bias,
    GELU, quantise by fc2's input scale): fc1 writes fc2's int8 input, a third of the traffic between them (bf16
    written and read, int8 written and read, against int8 written and read). The plans hold the scales and bias:
    ``load_state_dict`` updates them in place (``_refresh``), moving the module builds new ones.
    GELU is the tanh form (the kernel's); the trained model's erf form differs by < 1e-3, far under an int8 step.
    Without CUDA the same function runs densely (``_reference``). ``fuse_sparse24_mlps`` swaps these in.
    """

    def __init__(self, fc1: Sparse24Linear, fc2: Sparse24Linear) -> None:
        super().__init__()
        if fc1.fmt != "int8" or fc2.fmt != "int8":
            raise ValueError(f"the fused MLP takes two int8 layers, got {fc1.fmt} and {fc2.fmt}")
        if fc1.out_features != fc2.in_features:
            raise ValueError(f"fc1 gives {fc1.out_features} features, fc2 takes {fc2.in_features}")
        self.fc1, self.fc2 = fc1, fc2
        self._gelu_plans = _KernelPlans()  # padded token count -> Int8SparseGemm with the GELU epilogue
        self.register_load_state_dict_post_hook(_refresh_after_load)

    takes_residual = True  # forward(x, residual=r): fc2 adds r (in its epilogue where it can)

    def _refresh(self) -> None:
        """New weights loaded: the plans' scales and bias are updated in place (graphs captured before see them);
        a plan whose baked-in GELU scale changed is replaced at the next call, the old one kept alive."""
        alpha, bias, scale = self._epilogue()
        for tokens, plan in list(self._gelu_plans.plans.items()):
            plan.alpha.copy_(alpha)
            if plan.bias is not None and bias is not None:
                plan.bias.copy_(bias)
            if plan.gelu_scale != scale or (plan.bias is None) != (bias is None):
                self._gelu_plans.retire(tokens)

    def _epilogue(self) -> tuple[Tensor, Tensor | None, float]:
        """fc1's per-channel dequantisation, its fp32 bias and the scale into fc2's int8 input."""
        alpha = self.fc1._alpha()
        bias = None if self.fc1.bias is None else self.fc1.bias.float().contiguous()
        return alpha, bias, float(1.0 / self.fc2.input_scale)

    def _reference(self, x2: Tensor) -> Tensor:
        from .cusparselt import int8_sparse_gemm_reference

        alpha, bias, scale = self._epilogue()
        h = int8_sparse_gemm_reference(_quantize(x2, self.fc1.input_scale, "int8"), self.fc1.weight_q, alpha, bias,
                                       gelu_scale=scale)
        y = (h.float() @ self.fc2.weight_q.float().t()) * (self.fc2.input_scale * self.fc2.weight_scale)
        return y if self.fc2.bias is None else y + self.fc2.bias.float()

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        if x.shape[-1] != self.fc1.in_features:
            raise ValueError(f"expected inputs with {self.fc1.in_features} features, got {tuple(x.shape)}")
        lead, x2 = x.shape[:-1], x.reshape(-1, self.fc1.in_features).contiguous()
        r2 = _residual_rows(residual, lead, self.fc2.out_features, "the MLP")
        if not self.fc1.uses_kernel:
            return _add_reference(self._reference(x2), r2, x.dtype).reshape(*lead, self.fc2.out_features)
        n = x2.shape[0]
        xk = _step("quant")(x2, self.fc1.input_scale, (-n) % _TOKEN_ALIGN, "int8")

        def build():  # one plan per token count, built and searched outside graph capture (a warm-up call does it)
            from .cusparselt import Int8SparseGemm

            alpha, bias, scale = self._epilogue()
            plan = Int8SparseGemm(self.fc1.compressed, self.fc1.out_features, self.fc1.in_features, xk.shape[0], alpha,
                                  bias, scale)
            log.info("fused GELU plan for %s tokens of %dx%d: algorithm %d", xk.shape[0], self.fc1.out_features,
                     self.fc1.in_features, plan.search(xk))
            return plan

        h = _int8_sparse_mm(xk, None, self.fc1.out_features, torch.int8, self._gelu_plans.id_for(xk.shape[0], build))
        return self.fc2.forward_padded(h, n, x.dtype, r2).reshape(*lead, self.fc2.out_features)

    def _apply(self, fn, recurse=True):
        device = self.fc1.weight_q.device
        super()._apply(fn, recurse)
        if self.fc1.weight_q.device != device:
            self._gelu_plans.retire()  # plans hold device pointers: a move needs new ones
        return self


def fuse_sparse24_mlps(model: nn.Module) -> list[str]:
    """Swap every MLP block made of int8 ``Sparse24Linear`` ``fc1``, a GELU ``act`` and ``fc2`` (timm's ``Mlp``, with
    no norm between and dropout off) for a ``Sparse24GeluMlp``; returns the names of the blocks swapped."""
    swapped = []
    for name, module in list(model.named_modules()):
        fc1, act, fc2 = (getattr(module, a, None) for a in ("fc1", "act", "fc2"))
        plain = all(isinstance(getattr(module, a, nn.Identity()), (nn.Identity, nn.Dropout)) and
                    getattr(getattr(module, a, None), "p", 0.0) == 0.0 for a in ("norm", "drop1", "drop2", "drop"))
        if not (isinstance(fc1, Sparse24Linear) and isinstance(fc2, Sparse24Linear) and isinstance(act, nn.GELU)
                and fc1.fmt == fc2.fmt == "int8" and plain and name):
            continue
        if fc1.out_features % 32 or fc1.in_features % 32:  # the int8 epilogue kernels' alignment
            warnings.warn(f"{name} stays unfused: its fc1 ({fc1.out_features}x{fc1.in_features}) is not a multiple of "
                          "32 wide", stacklevel=2)
            continue
        parent, _, attr = name.rpartition(".")
        fused = Sparse24GeluMlp(fc1, fc2).train(module.training)  # in the mode of the block it replaces
        setattr(model.get_submodule(parent) if parent else model, attr, fused)
        swapped.append(name)
    return swapped


def _refresh_after_load(module: nn.Module, incompatible_keys) -> None:  # a module-level function: modules stay picklable
    module._refresh()


# id -> Int8SparseGemm (custom ops take no Python objects); weak: the modules own their plans
_GEMM_PLANS: weakref.WeakValueDictionary[int, object] = weakref.WeakValueDictionary()
_GEMM_IDS = itertools.count()


class _KernelPlans:
    """A module's ``Int8SparseGemm`` plans by key (the padded token count, ...), each registered for the custom op.
    Replaced plans stay alive (a CUDA graph captured before may still launch them); a copy or a pickle starts empty
    (plans hold device pointers: each copy builds its own)."""

    def __init__(self) -> None:
        self.plans: dict = {}
        self.ids: dict = {}  # key -> the plan's id in _GEMM_PLANS (the op's argument)
        self.retired: list = []

    def id_for(self, key, build) -> int:
        gemm = self.ids.get(key)
        if gemm is None:
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"no cuSPARSELt plan for {key} yet: run the module once outside the CUDA graph capture")
            plan = self.plans[key] = build()
            gemm = self.ids[key] = next(_GEMM_IDS)  # never reused, unlike id()
            _GEMM_PLANS[gemm] = plan
        return gemm

    def retire(self, key=None) -> None:
        """Drop one plan (or all): the next call builds a new one."""
        for k in list(self.plans) if key is None else [key]:
            self.retired.append(self.plans.pop(k))
            self.ids.pop(k)

    def __reduce__(self):  # deepcopy and pickle alike
        return _KernelPlans, ()


@torch.library.custom_op("sparsedistill::int8_sparse_mm", mutates_args=())
def _int8_sparse_mm(x: Tensor, residual: Tensor | None, out_features: int, out_dtype: torch.dtype, gemm: int) -> Tensor:
    """An op of our own so Inductor compiles around the ctypes call (it fuses the quantisation before it)."""
    return _GEMM_PLANS[gemm](x, residual)


@_int8_sparse_mm.register_fake
def _(x, residual, out_features, out_dtype, gemm):
    return x.new_empty(x.shape[0], out_features, dtype=out_dtype)


def _pick_by_graphed_time(candidates: list[tuple[bool, int]], graphed_ms, slower: float = 10.0,
                          floor_ms: float = 5.0) -> dict[tuple[bool, int], float]:
    """Each candidate's graphed ms per call: one replay each, then a longer timing of those still in the race.

    ``graphed_ms(candidate, calls, reps)`` times the candidate replayed from a CUDA graph, as it is
    deployed. Never screen by an eager call: PyTorch re-creates the cuSPARSELt plan on every eager
    call, and an earlier eager screen (one call each, drop > 10x and > 5 ms) dropped algorithm 0 with
    a transposed result at every ViT-B shape although its kernel is the faster one in a graph
    (0.14-0.53 ms, benchmarks/probes/fp16_24_probe_h200.json): ViT-B b256 2:4 fp16 went from
    27.6 to 47.9 ms (issue 24's measurement). One replay is cheap even for a candidate that is slow
    (an eager call took ~270 ms at narrow layers, benchmarks/probes/first_call_probe_h100.txt; the two
    eager warm-up calls before capture cost that twice); only candidates within
    ``slower`` x the fastest (or under ``floor_ms``) get the 15-call timing that separates close ones.
    """
    once = {c: graphed_ms(c, 1, 1) for c in candidates}
    if len(once) < 2:
        return once
    best = min(once.values())
    close = [c for c in candidates if once[c] <= slower * best or once[c] <= floor_ms]
    if len(close) < 2:
        return once
    return {**once, **{c: graphed_ms(c, 3, 5) for c in close}}


@torch.library.custom_op("sparsedistill::cslt_mm", mutates_args=())
def _cslt_mm(compressed: Tensor, x: Tensor, bias: Tensor | None, out_features: int, transposed: bool, alg: int,
             out_dtype: torch.dtype | None, view: bool = False, alpha: Tensor | None = None) -> Tensor:
    """``alpha * x W^T (+ bias)`` as (tokens, out), row-major: a column-major result would slow every later op more than
    the GEMM saves. ``alpha``: fp32, one per output feature (cuSPARSELt's alpha-vector scaling), or None for 1.

    An op of our own because the compressed weight is a flat buffer: PyTorch's shape rule for
    ``_cslt_sparse_mm`` reads the output width from it and gets it wrong under ``torch.compile``.
    """
    y = torch._cslt_sparse_mm(compressed, x.t(), bias=bias, alpha=alpha, out_dtype=out_dtype,
                              transpose_result=transposed, alg_id=alg)
    return y if transposed else (y.t() if view else y.t().contiguous())


@_cslt_mm.register_fake
def _(compressed, x, bias, out_features, transposed, alg, out_dtype, view=False, alpha=None):
    if view and not transposed:
        return x.new_empty(out_features, x.shape[0], dtype=out_dtype or x.dtype).t()
    return x.new_empty(x.shape[0], out_features, dtype=out_dtype or x.dtype)


class CUDAGraphed(nn.Module):
    """Replay ``module`` from a CUDA graph captured for inputs of one shape and dtype.

    The output is a static buffer overwritten by the next call; clone it to keep it. With
    ``compile``, the module is first run eagerly (cuSPARSELt plans are chosen then), then compiled
    by Inductor, which fuses the quantise / dequantise steps into the LayerNorm, GELU and residual
    kernels around each sparse GEMM, and the compiled module is captured.
    """

    def __init__(self, module: nn.Module, example: Tensor, warmup: int = 3, compile: bool = False) -> None:
        super().__init__()
        if not example.is_cuda:
            raise ValueError("CUDA graphs need a CUDA input; on the CPU call the module directly")
        self.static_in = example.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(stream):
            module(self.static_in)  # every cuSPARSELt plan is chosen here, outside capture and compilation
            if compile:
                module = torch.compile(module, dynamic=False)  # default mode: max-autotune took minutes per shape
            for _ in range(warmup):
                module(self.static_in)
        torch.cuda.current_stream().wait_stream(stream)
        self.module = module
        self.graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(self.graph):
            self.static_out = module(self.static_in)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape != self.static_in.shape or x.dtype != self.static_in.dtype:
            raise ValueError(f"graph captured for {tuple(self.static_in.shape)} {self.static_in.dtype}, got {tuple(x.shape)} {x.dtype}")
        self.static_in.copy_(x)
        self.graph.replay()
        return self.static_out

