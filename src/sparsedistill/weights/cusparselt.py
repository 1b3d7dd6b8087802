"""cuSPARSELt through ctypes, for the epilogues PyTorch's binding lacks: an INT8 2:4 GEMM whose result goes through
GELU and leaves as INT8, so fc1 of an MLP writes fc2's quantised input directly, or one that adds the residual
stream to its dequantised result, so proj and fc2 of a transformer block write the block's output (issue 24):

    sums[t, o] = alpha[o] * sum_k W[o, k] x[t, k]
    out[t, o] = sat_int8(round(gelu_scale * gelu_tanh(sums[t, o] + bias[o])))    (gelu_scale given: int8 out)
    out[t, o] = sums[t, o] + residual[t, o] + bias[o] in fp16 / bf16              (otherwise; the residual optional)

``W`` is the weight as ``torch._cslt_compress`` compressed it: the structured descriptor here is PyTorch's (rows =
out features, row-major, alignment 16), and compression depends on nothing else, so one compressed weight serves
both paths. ``alpha`` is per output channel (the dequantisation); ``bias`` fp32 for int8 output, else the output's
dtype (the library's rules); ``residual`` is cuSPARSELt's C with beta 1, in the output's dtype and layout.
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
import os
import sys
import threading

import torch
from torch import Tensor

__all__ = ["CuSparseLtError", "Int8SparseGemm", "int8_sparse_gemm_reference", "loaded_library"]

_OPAQUE_BYTES = 16 * 1024  # room for every version's opaque structs
_R_32F, _R_16F, _R_8I, _R_16BF = 0, 2, 3, 14  # cudaDataType
_DATA_TYPE = {torch.int8: _R_8I, torch.float16: _R_16F, torch.bfloat16: _R_16BF}
_ORDER_COL, _ORDER_ROW = 1, 2
_OP_N, _OP_T = 0, 1
_COMPUTE_32I = 0  # cusparseComputeType since 0.5
_SPARSITY_50 = 0
_GELU, _GELU_SCALING, _ALPHA_VECTOR_SCALING, _BETA_VECTOR_SCALING, _BIAS_POINTER = 3, 4, 5, 6, 8  # cusparseLtMatmulDescAttribute_t
_ALG_DEFAULT, _ALG_CONFIG_ID = 0, 0
_ALIGN = 16  # bytes; PyTorch's choice too


class CuSparseLtError(RuntimeError):
    pass


class _DlInfo(C.Structure):
    _fields_ = [("dli_fname", C.c_char_p), ("dli_fbase", C.c_void_p), ("dli_sname", C.c_char_p), ("dli_saddr", C.c_void_p)]


def _global_symbol_file(symbol: str) -> str | None:
    """The file that defines ``symbol`` in the process's global scope (LD_PRELOAD first), or None where no library
    there defines it (PyTorch opens its CUDA libraries locally, so its own copy is usually not there; where it is, it
    is also the one that runs)."""
    scope = C.CDLL(None)
    try:
        address = C.cast(getattr(scope, symbol), C.c_void_p)
    except AttributeError:
        return None
    dladdr = getattr(scope, "dladdr", None) or C.CDLL("libdl.so.2").dladdr  # in libc since glibc 2.34, libdl before
    info = _DlInfo()
    if not dladdr(address, C.byref(info)) or not info.dli_fname:
        return None
    return os.path.realpath(os.fsdecode(info.dli_fname))


def _choose_library(mapped: list[str], global_copy: str | None) -> str:
    """Which mapped libcusparseLt runs: the one in the global scope (a preload binds every caller's symbols, PyTorch's
    too), else PyTorch's, the only copy."""
    if global_copy is not None and global_copy in mapped:  # (a shim exporting the name is not a cuSPARSELt)
        return global_copy
    if not mapped:
        raise RuntimeError("PyTorch did not load libcusparseLt: this build has no cuSPARSELt (torch._cslt_* are missing)")
    if len(set(mapped)) > 1:
        raise RuntimeError(f"several libcusparseLt copies are mapped and none binds globally: {sorted(set(mapped))}")
    return mapped[0]


def _mapped_paths() -> list[str]:
    with open("/proc/self/maps") as maps:
        return list(dict.fromkeys(os.path.realpath(line.split()[-1]) for line in maps if "libcusparseLt" in line))


def _loaded_path() -> str:
    """The libcusparseLt this process runs (PyTorch's, or one put first with LD_PRELOAD: the same SONAME)."""
    if not torch.cuda.is_available():
        raise RuntimeError("cuSPARSELt needs a CUDA device; on the CPU use int8_sparse_gemm_reference")
    torch._cslt_compress(torch.zeros(32, 32, dtype=torch.half, device="cuda"))  # PyTorch loads its copy on first use
    return _choose_library(_mapped_paths(), _global_symbol_file("cusparseLtMatmul"))


def _version(lib: C.CDLL) -> str:
    parts = []
    for prop in (0, 1, 2):  # libraryPropertyType: major, minor, patch
        value = C.c_int()
        _check(lib.cusparseLtGetProperty(prop, C.byref(value)), "cusparseLtGetProperty")
        parts.append(str(value.value))
    return ".".join(parts)


def loaded_library() -> dict[str, object]:
    """Path and version of the cuSPARSELt in use, and every copy mapped (path: version).
    ``torch.backends.cusparselt.version()`` is the version PyTorch was built against, not necessarily the one that
    runs (0.8.1 fixed an H100 slowdown of 0.8.0: worth knowing which ran)."""
    path = _loaded_path()
    mapped = {p: _version(C.CDLL(p)) for p in _mapped_paths()}
    return {"path": path, "version": mapped.get(path) or _version(_lib()), "mapped": mapped}


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


def int8_sparse_gemm_reference(x: Tensor, weight: Tensor, alpha: Tensor, bias: Tensor | None, *,
                               gelu_scale: float | None = None, out_dtype: torch.dtype = torch.int8,
                               residual: Tensor | None = None) -> Tensor:
    """What ``Int8SparseGemm`` computes, densely in fp32 (any device): ``x`` int8 (tokens, in), ``weight`` int8 2:4."""
    if (gelu_scale is not None) != (out_dtype == torch.int8):
        raise ValueError("int8 output comes with a GELU epilogue (gelu_scale) and 16-bit output without one")
    pre = (x.float() @ weight.float().t()) * alpha.float()
    if residual is not None:  # the epilogue's order: alpha, then beta * C, then the bias, then the activation
        pre = pre + residual.float()
    if bias is not None:
        pre = pre + bias.float()
    if gelu_scale is None:
        return pre.to(out_dtype)
    out = torch.nn.functional.gelu(pre, approximate="tanh") * torch.tensor(gelu_scale, dtype=torch.float32)
    return out.round().clamp(-128, 127).to(torch.int8)


class Int8SparseGemm:
    """One cuSPARSELt plan: ``tokens`` int8 rows against a compressed int8 2:4 weight, alpha per output channel.

    Either ``gelu_scale`` (a GELU epilogue, int8 out: fc1 writing fc2's quantised input) or a 16-bit ``out_dtype``,
    with ``residual=True`` adding a (tokens, out) tensor of that dtype given at each call (proj / fc2 writing the
    block's output). ``alpha`` (fp32, one per output feature) and ``bias`` are read at every call from the tensors
    given here: update them in place, never rebind them. ``search`` picks the fastest algorithm (before any graph
    capture).
    """

    def __init__(self, compressed: Tensor, out_features: int, in_features: int, tokens: int, alpha: Tensor,
                 bias: Tensor | None, gelu_scale: float | None = None, alg: int = 0, *,
                 out_dtype: torch.dtype = torch.int8, residual: bool = False) -> None:
        if not compressed.is_cuda:
            raise ValueError("the compressed weight must be on a CUDA device (torch._cslt_compress of an int8 2:4 weight)")
        if out_features % 32 or in_features % 32 or tokens % 16:
            raise ValueError(f"cuSPARSELt's int8 kernels need in and out features divisible by 32 and tokens by 16, "
                             f"got {out_features} x {in_features} and {tokens} tokens; pad them")
        if out_dtype not in _DATA_TYPE:
            raise ValueError(f"out_dtype must be int8, float16 or bfloat16, got {out_dtype}")
        if (gelu_scale is not None) != (out_dtype == torch.int8):
            raise ValueError("int8 output comes with a GELU epilogue (gelu_scale) and 16-bit output without one")
        if residual and out_dtype == torch.int8:
            raise ValueError("the residual is added to 16-bit outputs only")
        dev = compressed.device
        if alpha.dtype != torch.float32 or alpha.shape != (out_features,) or alpha.device != dev:
            raise ValueError(f"alpha must be fp32 of shape ({out_features},) on {dev}, got {alpha.dtype} {tuple(alpha.shape)} on {alpha.device}")
        bias_dtype = torch.float32 if out_dtype == torch.int8 else out_dtype
        if bias is not None and (bias.dtype != bias_dtype or bias.shape != (out_features,) or bias.device != dev):
            raise ValueError(f"bias must be {bias_dtype} of shape ({out_features},) on {dev} (with {out_dtype} output), "
                             f"got {bias.dtype} {tuple(bias.shape)} on {bias.device}")
        self._planned = False
        lib, self._h = _lib(), _handle(dev)
        self.compressed, self.alpha, self.bias, self.gelu_scale = compressed, alpha.contiguous(), bias, gelu_scale
        self.out_features, self.in_features, self.tokens, self.device = out_features, in_features, tokens, dev
        self.out_dtype, self.residual = out_dtype, residual
        self._weight, self._input, self._output, self._matmul, self._alg_sel, self._plan = (_Opaque() for _ in range(6))
        h = self._h.ptr
        with torch.cuda.device(dev):
            _check(lib.cusparseLtStructuredDescriptorInit(h, self._weight.ptr, out_features, in_features, in_features,
                                                          _ALIGN, _R_8I, _ORDER_ROW, _SPARSITY_50), "weight descriptor")
            _check(lib.cusparseLtDenseDescriptorInit(h, self._input.ptr, tokens, in_features, in_features, _ALIGN, _R_8I,
                                                     _ORDER_ROW), "input descriptor")
            _check(lib.cusparseLtDenseDescriptorInit(h, self._output.ptr, out_features, tokens, out_features, _ALIGN,
                                                     _DATA_TYPE[out_dtype], _ORDER_COL), "output descriptor")
            _check(lib.cusparseLtMatmulDescriptorInit(h, self._matmul.ptr, _OP_N, _OP_T, self._weight.ptr,
                                                      self._input.ptr, self._output.ptr, self._output.ptr, _COMPUTE_32I),
                   "matmul descriptor")
            if gelu_scale is not None:
                self._set(_GELU, C.c_int(1))
                self._set(_GELU_SCALING, C.c_float(gelu_scale))
            self._set(_ALPHA_VECTOR_SCALING, C.c_int(1))
            if residual:  # beta as a device vector of ones: a host beta of 1 beside the alpha vector added nothing (H100)
                self._set(_BETA_VECTOR_SCALING, C.c_int(1))
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
        self._beta = C.c_float(0.0)  # no C; beside the alpha vector the library ignores a host beta anyway
        self._beta_ones = torch.ones(out_features, dtype=torch.float32, device=dev) if residual else None

    def _fit_workspace(self) -> None:
        """The plan's workspace, grown to what its algorithm needs (the search may pick one that needs more)."""
        size = C.c_size_t()
        _check(_lib().cusparseLtMatmulGetWorkspace(self._h.ptr, self._plan.ptr, C.byref(size)), "workspace size")
        if size.value > self._workspace.numel() or self._workspace.numel() == 0:
            self._workspace = torch.empty(max(size.value, 1), dtype=torch.uint8, device=self.device)

    def _set(self, attribute: int, value) -> None:
        _check(_lib().cusparseLtMatmulDescSetAttribute(self._h.ptr, self._matmul.ptr, attribute, C.byref(value),
                                                       C.sizeof(value)), f"attribute {attribute}")

    def _args(self, x: Tensor, residual: Tensor | None, out: Tensor) -> list:
        stream = C.c_void_p(torch.cuda.current_stream(self.device).cuda_stream)
        self._stream = stream  # alive for the call
        c = out if residual is None else residual
        return [self._h.ptr, self._plan.ptr, C.c_void_p(self.alpha.data_ptr()), C.c_void_p(self.compressed.data_ptr()),
                C.c_void_p(x.data_ptr()),
                C.byref(self._beta) if self._beta_ones is None else C.c_void_p(self._beta_ones.data_ptr()),
                C.c_void_p(c.data_ptr()), C.c_void_p(out.data_ptr()),
                C.c_void_p(self._workspace.data_ptr()), C.byref(stream), 1]

    def _checked(self, x: Tensor, residual: Tensor | None, out: Tensor | None) -> Tensor:
        if x.dtype != torch.int8 or x.shape != (self.tokens, self.in_features) or not x.is_contiguous() or x.device != self.device:
            raise ValueError(f"this plan takes contiguous int8 ({self.tokens}, {self.in_features}) on {self.device}, "
                             f"got {x.dtype} {tuple(x.shape)} on {x.device}")
        shape = (self.tokens, self.out_features)
        if (residual is not None) != self.residual:
            raise ValueError("this plan adds a residual: pass one" if self.residual else "this plan was built without a residual")
        if residual is not None and (residual.dtype != self.out_dtype or residual.shape != shape
                                     or not residual.is_contiguous() or residual.device != self.device):
            raise ValueError(f"residual must be contiguous {self.out_dtype} {shape} on {self.device}, "
                             f"got {residual.dtype} {tuple(residual.shape)} on {residual.device}")
        if out is None:
            return torch.empty(shape, dtype=self.out_dtype, device=self.device)
        if out.dtype != self.out_dtype or out.shape != shape or not out.is_contiguous():
            raise ValueError(f"out must be contiguous {self.out_dtype} {shape}")
        return out

    def __call__(self, x: Tensor, residual: Tensor | None = None, out: Tensor | None = None) -> Tensor:
        out = self._checked(x, residual, out)
        with torch.cuda.device(self.device):
            _check(_lib().cusparseLtMatmul(*self._args(x, residual, out)), "matmul")
        return out

    def search(self, x: Tensor, residual: Tensor | None = None) -> int:
        """Time cuSPARSELt's algorithms on ``x`` (synchronises: not inside a graph capture), keep the fastest, return it."""
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("search times kernels: run it before the CUDA graph capture")
        out = self._checked(x, residual, None)
        with torch.cuda.device(self.device):
            _check(_lib().cusparseLtMatmulSearch(*self._args(x, residual, out)), "algorithm search")
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
