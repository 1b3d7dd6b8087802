"""cuSPARSELt through ctypes, for the one epilogue PyTorch's binding lacks: an INT8 2:4 GEMM whose result goes
through GELU and leaves as INT8, so fc1 of an MLP writes fc2's quantised input directly (issue 24):

    out[t, o] = sat_int8(round(gelu_scale * gelu_tanh(alpha[o] * sum_k W[o, k] x[t, k] + bias[o])))

``W`` is the weight as ``torch._cslt_compress`` compressed it: the structured descriptor here is PyTorch's (rows =
out features, row-major, alignment 16), and compression depends on nothing else, so one compressed weight serves
both paths. ``alpha`` is per output channel (the dequantisation), ``bias`` fp32 (what the INT8-output kernels take).
The library is the copy PyTorch loaded. A plan is built once per (weight, token count) and reused, where PyTorch
builds one per call (0.3-1 ms of host time); launches go on torch's current stream, so CUDA graphs capture them.

Enum values and opaque-struct sizes are NVIDIA's ``cusparseLt.h`` (0.6-0.8; the structs are 13,072 bytes in 0.6.3,
1,024 in 0.7, 512 in 0.8). The sm90 INT8 kernels exist only with both operands K-contiguous ("TN"): A = W with
op N, B = x (tokens x K, row-major) with op T, and a column-major (out x tokens) result is the row-major
(tokens x out) one.
"""

from __future__ import annotations

import ctypes as C
import functools
import sys
import threading

import torch
from torch import Tensor

__all__ = ["CuSparseLtError", "GeluInt8Gemm", "gelu_int8_reference", "loaded_library"]

_OPAQUE_BYTES = 16 * 1024  # room for every version's opaque structs
_R_32F, _R_8I = 0, 3  # cudaDataType
_ORDER_COL, _ORDER_ROW = 1, 2
_OP_N, _OP_T = 0, 1
_COMPUTE_32I = 0  # cusparseComputeType since 0.5
_SPARSITY_50 = 0
_GELU, _GELU_SCALING, _ALPHA_VECTOR_SCALING, _BIAS_POINTER = 3, 4, 5, 8  # cusparseLtMatmulDescAttribute_t
_ALG_DEFAULT, _ALG_CONFIG_ID = 0, 0
_ALIGN = 16  # bytes; PyTorch's choice too


class CuSparseLtError(RuntimeError):
    pass


def _loaded_path() -> str:
    """The libcusparseLt this process runs (PyTorch's, or one put first with LD_PRELOAD: the same SONAME)."""
    if not torch.cuda.is_available():
        raise RuntimeError("cuSPARSELt needs a CUDA device; on the CPU use gelu_int8_reference")
    torch._cslt_compress(torch.zeros(32, 32, dtype=torch.half, device="cuda"))  # PyTorch loads its copy on first use
    with open("/proc/self/maps") as maps:
        paths = [line.split()[-1] for line in maps if "libcusparseLt" in line]
    if not paths:
        raise RuntimeError("PyTorch did not load libcusparseLt: this build has no cuSPARSELt (torch._cslt_* are missing)")
    return paths[0]


def loaded_library() -> dict[str, str]:
    """Path and version of the cuSPARSELt in use. ``torch.backends.cusparselt.version()`` is the version PyTorch was
    built against, not necessarily the one loaded (0.8.1 fixed an H100 slowdown of 0.8.0: worth knowing which ran)."""
    lib, parts = _lib(), []
    for prop in (0, 1, 2):  # libraryPropertyType: major, minor, patch
        value = C.c_int()
        _check(lib.cusparseLtGetProperty(prop, C.byref(value)), "cusparseLtGetProperty")
        parts.append(str(value.value))
    return {"path": _loaded_path(), "version": ".".join(parts)}


@functools.cache
def _lib() -> C.CDLL:
    lib = C.CDLL(_loaded_path())
    vp, i64, u32, i32 = C.c_void_p, C.c_int64, C.c_uint32, C.c_int
    lib.cusparseLtGetErrorString.restype = C.c_char_p
    lib.cusparseLtGetProperty.argtypes = [i32, C.POINTER(C.c_int)]
    lib.cusparseLtDenseDescriptorInit.argtypes = [vp, vp, i64, i64, i64, u32, i32, i32]
    lib.cusparseLtStructuredDescriptorInit.argtypes = [vp, vp, i64, i64, i64, u32, i32, i32, i32]
    lib.cusparseLtMatmulDescriptorInit.argtypes = [vp, vp, i32, i32, vp, vp, vp, vp, i32]
    lib.cusparseLtMatmulDescSetAttribute.argtypes = [vp, vp, i32, vp, C.c_size_t]
    lib.cusparseLtMatmulAlgSelectionInit.argtypes = [vp, vp, vp, i32]
    lib.cusparseLtMatmulAlgSetAttribute.argtypes = [vp, vp, i32, vp, C.c_size_t]
    lib.cusparseLtMatmulAlgGetAttribute.argtypes = [vp, vp, i32, vp, C.c_size_t]
    lib.cusparseLtMatmulPlanInit.argtypes = [vp, vp, vp, vp]
    lib.cusparseLtMatmulGetWorkspace.argtypes = [vp, vp, C.POINTER(C.c_size_t)]
    for fn in (lib.cusparseLtMatmul, lib.cusparseLtMatmulSearch):
        fn.argtypes = [vp, vp, vp, vp, vp, vp, vp, vp, vp, vp, i32]
    return lib


def _check(status: int, what: str) -> None:
    if status:
        msg = _lib().cusparseLtGetErrorString(status).decode()
        raise CuSparseLtError(f"cuSPARSELt {what} failed: {msg} (status {status}; CUSPARSELT_LOG_LEVEL=5 says why)")


class _Opaque:
    """One opaque cuSPARSELt struct at a fixed, 64-byte aligned address (a handle must not move once initialised)."""

    def __init__(self) -> None:
        self._buf = C.create_string_buffer(_OPAQUE_BYTES + 64)
        self.ptr = C.c_void_p((C.addressof(self._buf) + 63) // 64 * 64)


_HANDLES: dict[int, _Opaque] = {}
_HANDLES_LOCK = threading.Lock()


def _handle(device: torch.device) -> _Opaque:
    index = device.index if device.index is not None else torch.cuda.current_device()
    with _HANDLES_LOCK:
        if index not in _HANDLES:
            handle = _Opaque()
            with torch.cuda.device(index):  # a handle belongs to the device current at its init
                _check(_lib().cusparseLtInit(handle.ptr), "init")
            _HANDLES[index] = handle
    return _HANDLES[index]


def gelu_int8_reference(x: Tensor, weight: Tensor, alpha: Tensor, bias: Tensor | None, gelu_scale: float) -> Tensor:
    """What ``GeluInt8Gemm`` computes, densely in fp32 (any device): ``x`` int8 (tokens, in), ``weight`` int8 2:4."""
    pre = (x.float() @ weight.float().t()) * alpha.float()
    if bias is not None:
        pre = pre + bias.float()
    out = torch.nn.functional.gelu(pre, approximate="tanh") * torch.tensor(gelu_scale, dtype=torch.float32)
    return out.round().clamp(-128, 127).to(torch.int8)


class GeluInt8Gemm:
    """One cuSPARSELt plan: ``tokens`` int8 rows against a compressed int8 2:4 weight, a GELU epilogue, int8 out.

    ``alpha`` (fp32, one per output feature) and ``bias`` (fp32 or None) are read at every call from the tensors given
    here: update them in place, never rebind them. ``search`` picks the fastest algorithm (before any graph capture).
    """

    def __init__(self, compressed: Tensor, out_features: int, in_features: int, tokens: int, alpha: Tensor,
                 bias: Tensor | None, gelu_scale: float, alg: int = 0) -> None:
        if not compressed.is_cuda:
            raise ValueError("the compressed weight must be on a CUDA device (torch._cslt_compress of an int8 2:4 weight)")
        if out_features % 32 or in_features % 32 or tokens % 16:
            raise ValueError(f"cuSPARSELt's int8 kernels need in and out features divisible by 32 and tokens by 16, "
                             f"got {out_features} x {in_features} and {tokens} tokens; pad them")
        dev = compressed.device
        if alpha.dtype != torch.float32 or alpha.shape != (out_features,) or alpha.device != dev:
            raise ValueError(f"alpha must be fp32 of shape ({out_features},) on {dev}, got {alpha.dtype} {tuple(alpha.shape)} on {alpha.device}")
        if bias is not None and (bias.dtype != torch.float32 or bias.shape != (out_features,) or bias.device != dev):
            raise ValueError(f"bias must be fp32 of shape ({out_features},) on {dev} (int8 output takes an fp32 bias)")
        self._planned = False
        lib, self._h = _lib(), _handle(dev)
        self.compressed, self.alpha, self.bias, self.gelu_scale = compressed, alpha.contiguous(), bias, gelu_scale
        self.out_features, self.in_features, self.tokens, self.device = out_features, in_features, tokens, dev
        self._weight, self._input, self._output, self._matmul, self._alg_sel, self._plan = (_Opaque() for _ in range(6))
        h = self._h.ptr
        with torch.cuda.device(dev):
            _check(lib.cusparseLtStructuredDescriptorInit(h, self._weight.ptr, out_features, in_features, in_features,
                                                          _ALIGN, _R_8I, _ORDER_ROW, _SPARSITY_50), "weight descriptor")
            _check(lib.cusparseLtDenseDescriptorInit(h, self._input.ptr, tokens, in_features, in_features, _ALIGN, _R_8I,
                                                     _ORDER_ROW), "input descriptor")
            _check(lib.cusparseLtDenseDescriptorInit(h, self._output.ptr, out_features, tokens, out_features, _ALIGN,
                                                     _R_8I, _ORDER_COL), "output descriptor")
            _check(lib.cusparseLtMatmulDescriptorInit(h, self._matmul.ptr, _OP_N, _OP_T, self._weight.ptr,
                                                      self._input.ptr, self._output.ptr, self._output.ptr, _COMPUTE_32I),
                   "matmul descriptor")
            self._set(_GELU, C.c_int(1))
            self._set(_GELU_SCALING, C.c_float(gelu_scale))
            self._set(_ALPHA_VECTOR_SCALING, C.c_int(1))
            if bias is not None:
                self._set(_BIAS_POINTER, C.c_void_p(bias.data_ptr()))
            _check(lib.cusparseLtMatmulAlgSelectionInit(h, self._alg_sel.ptr, self._matmul.ptr, _ALG_DEFAULT), "algorithm selection")
            alg_id = C.c_int(alg)
            _check(lib.cusparseLtMatmulAlgSetAttribute(h, self._alg_sel.ptr, _ALG_CONFIG_ID, C.byref(alg_id),
                                                       C.sizeof(alg_id)), f"algorithm {alg}")
            _check(lib.cusparseLtMatmulPlanInit(h, self._plan.ptr, self._matmul.ptr, self._alg_sel.ptr), "plan")
            self._planned = True
        self._workspace = torch.empty(0, dtype=torch.uint8, device=dev)
        self._fit_workspace()
        self._beta = C.c_float(0.0)

    def _fit_workspace(self) -> None:
        """The plan's workspace, grown to what its algorithm needs (the search may pick one that needs more)."""
        size = C.c_size_t()
        _check(_lib().cusparseLtMatmulGetWorkspace(self._h.ptr, self._plan.ptr, C.byref(size)), "workspace size")
        if size.value > self._workspace.numel() or self._workspace.numel() == 0:
            self._workspace = torch.empty(max(size.value, 1), dtype=torch.uint8, device=self.device)

    def _set(self, attribute: int, value) -> None:
        _check(_lib().cusparseLtMatmulDescSetAttribute(self._h.ptr, self._matmul.ptr, attribute, C.byref(value),
                                                       C.sizeof(value)), f"attribute {attribute}")

    def _args(self, x: Tensor, out: Tensor) -> list:
        stream = C.c_void_p(torch.cuda.current_stream(self.device).cuda_stream)
        self._stream = stream  # alive for the call
        return [self._h.ptr, self._plan.ptr, C.c_void_p(self.alpha.data_ptr()), C.c_void_p(self.compressed.data_ptr()),
                C.c_void_p(x.data_ptr()), C.byref(self._beta), C.c_void_p(out.data_ptr()), C.c_void_p(out.data_ptr()),
                C.c_void_p(self._workspace.data_ptr()), C.byref(stream), 1]

    def _checked(self, x: Tensor, out: Tensor | None) -> Tensor:
        if x.dtype != torch.int8 or x.shape != (self.tokens, self.in_features) or not x.is_contiguous() or x.device != self.device:
            raise ValueError(f"this plan takes contiguous int8 ({self.tokens}, {self.in_features}) on {self.device}, "
                             f"got {x.dtype} {tuple(x.shape)} on {x.device}")
        if out is None:
            return torch.empty(self.tokens, self.out_features, dtype=torch.int8, device=self.device)
        if out.dtype != torch.int8 or out.shape != (self.tokens, self.out_features) or not out.is_contiguous():
            raise ValueError(f"out must be contiguous int8 ({self.tokens}, {self.out_features})")
        return out

    def __call__(self, x: Tensor, out: Tensor | None = None) -> Tensor:
        out = self._checked(x, out)
        with torch.cuda.device(self.device):
            _check(_lib().cusparseLtMatmul(*self._args(x, out)), "matmul")
        return out

    def search(self, x: Tensor) -> int:
        """Time cuSPARSELt's algorithms on ``x`` (synchronises: not inside a graph capture), keep the fastest, return it."""
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("search times kernels: run it before the CUDA graph capture")
        out = self._checked(x, None)
        with torch.cuda.device(self.device):
            _check(_lib().cusparseLtMatmulSearch(*self._args(x, out)), "algorithm search")
            alg = C.c_int()
            _check(_lib().cusparseLtMatmulAlgGetAttribute(self._h.ptr, self._alg_sel.ptr, _ALG_CONFIG_ID, C.byref(alg),
                                                          C.sizeof(alg)), "reading the algorithm")
            self._fit_workspace()
        return alg.value

    def __copy__(self):
        raise TypeError("a cuSPARSELt plan holds device pointers and cannot be copied: build another")

    def __deepcopy__(self, memo):
        return self.__copy__()

    def __del__(self) -> None:
        if not getattr(self, "_planned", False) or sys.is_finalizing():
            return
        try:
            lib = _lib()
            lib.cusparseLtMatmulPlanDestroy(self._plan.ptr)
            if hasattr(lib, "cusparseLtMatmulAlgSelectionDestroy"):  # 0.8 and later
                lib.cusparseLtMatmulAlgSelectionDestroy(self._alg_sel.ptr)
            for descriptor in (self._weight, self._input, self._output):
                lib.cusparseLtMatDescriptorDestroy(descriptor.ptr)
        except Exception:  # noqa: BLE001  (a destructor must not raise)
            pass
