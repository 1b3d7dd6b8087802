"""Block-sparse attention in Triton: forward and backward, causal or not, GQA, fp16 / bf16 (fp32 for tests).

Each program owns a 64-row tile of one query block and visits only the key blocks its
``BlockMask`` lists, in 64-column tiles (FlashAttention-2's online softmax over those blocks);
the backward recomputes the probabilities from the saved log-sum-exp: one kernel for dK/dV (per
key tile, over the query blocks that visited its block, for every query head of its GQA group)
and one for dQ. Each kernel's tile shape, warps and pipeline stages are picked on its first
CUDA call per (block, head dim, causal, dtype) by timing a few candidates on the real inputs
(``tuned_configs``). ``attention_reference`` beside
it is the plain PyTorch definition the kernels are tested against.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._online_softmax import online_softmax_step
from ._runtime import triton_can_run
from .block_mask import BlockMask

__all__ = ["block_sparse_attention", "attention_reference", "forward_config", "tuned_configs", "SUPPORTED_HEAD_DIMS"]

SUPPORTED_HEAD_DIMS = (64, 128)
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453


def attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: BlockMask | None = None, causal: bool = False,
                        scale: float | None = None, return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """softmax(q k^T * scale + masks) v in fp32; q (B, H, Sq, D), k/v (B, Hkv, Sk, D). Fully masked rows give 0.

    ``return_lse`` also returns the rows' log-sum-exp (fp32, -inf for fully masked rows).
    """
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    k, v = k.repeat_interleave(h // hkv, 1), v.repeat_interleave(h // hkv, 1)
    s = (q.float() @ k.float().transpose(-1, -2)) * (scale if scale is not None else 1 / math.sqrt(d))
    allowed = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if causal:
        allowed = torch.ones_like(allowed).tril(sk - sq)
    if mask is not None:
        allowed = allowed & mask.to_dense().to(q.device)
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)  # all-masked rows: 0, as in the kernel
    o = (p @ v.float()).to(q.dtype)
    return (o, torch.logsumexp(s, -1)) if return_lse else o


@triton.jit
def _scores(q, k, rows, cols, seq_q, seq_k, qk_scale, CAUSAL: tl.constexpr):
    """q k^T in log2 units, with out-of-range and (optionally) causal entries at -inf."""
    s = tl.dot(q, tl.trans(k)) * qk_scale
    ok = (rows[:, None] < seq_q) & (cols[None, :] < seq_k)
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None] + (seq_k - seq_q))
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, KV_IDX, KV_CNT,
                sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, sob, soh, sos,
                sib, sih, siq, scb, sch,
                H, GROUP, seq_q, seq_k, qk_scale,
                BLOCK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr):
    """One BM-row tile of a query block; the key blocks it visits are walked in BN-column tiles."""
    tile, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # int64: B*H*S*D passes 2^31 at long context
    if CAUSAL:  # the last query tiles visit the most key blocks: launch them first, so no long one runs alone at the end
        tile = tl.num_programs(0) - 1 - tile
    qb = tile // (BLOCK // BM)
    b, h = bh // H, bh % H
    hk = h // GROUP
    rows = tile * BM + tl.arange(0, BM)
    dims = tl.arange(0, D)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqs + dims[None, :], mask=rows[:, None] < seq_q, other=0.0)
    m = tl.full([BM], float("-inf"), tl.float32)
    l = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    count = tl.load(KV_CNT + b * scb + h * sch + qb)
    idx_base = KV_IDX + b * sib + h * sih + qb * siq
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    for j in range(0, count):
        kb = tl.load(idx_base + j)
        for c in range(0, BLOCK, BN):
            cols = kb * BLOCK + c + tl.arange(0, BN)
            kv_mask = cols[:, None] < seq_k
            k = tl.load(k_base + cols[:, None] * sks + dims[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_base + cols[:, None] * svs + dims[None, :], mask=kv_mask, other=0.0)
            s = _scores(q, k, rows, cols, seq_q, seq_k, qk_scale, CAUSAL)
            m, l, acc = online_softmax_step(s, v, m, l, acc)
    has = l > 0
    out = acc / tl.where(has, l, 1.0)[:, None]
    tl.store(O + b * sob + h * soh + rows[:, None] * sos + dims[None, :], out.to(O.dtype.element_ty), mask=rows[:, None] < seq_q)
    # log-sum-exp in log2 units; +inf for rows that saw nothing, so the backward's probabilities are 0
    lse = tl.where(has, m + tl.math.log2(tl.where(has, l, 1.0)), float("inf"))
    tl.store(LSE + bh * seq_q + rows, lse, mask=rows < seq_q)


@triton.jit
def _query_rows(Q, DO, LSE, DELTA, qo_off, row_off, rows, dims, sqs, seq_q):
    """A tile's queries, output gradients, log-sum-exps and rowsum(dO * O): what both backward kernels read per query tile."""
    ok = rows < seq_q
    q = tl.load(Q + qo_off + rows[:, None] * sqs + dims[None, :], mask=ok[:, None], other=0.0)
    do = tl.load(DO + qo_off + rows[:, None] * sqs + dims[None, :], mask=ok[:, None], other=0.0)
    lse = tl.load(LSE + row_off + rows, mask=ok, other=float("inf"))
    delta = tl.load(DELTA + row_off + rows, mask=ok, other=0.0)
    return q, do, lse, delta


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, KV_IDX, KV_CNT,
                   sqb, sqh, sqs, skb, skh, sks,
                   sib, sih, siq, scb, sch,
                   H, GROUP, seq_q, seq_k, qk_scale, sm_scale,
                   BLOCK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr):
    tile, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    if CAUSAL:  # longest query tiles first, as in the forward
        tile = tl.num_programs(0) - 1 - tile
    qb = tile // (BLOCK // BM)
    b, h = bh // H, bh % H
    hk = h // GROUP
    rows = tile * BM + tl.arange(0, BM)
    dims = tl.arange(0, D)
    row_ok = rows[:, None] < seq_q
    q, do, lse, delta = _query_rows(Q, DO, LSE, DELTA, b * sqb + h * sqh, bh * seq_q, rows, dims, sqs, seq_q)
    dq = tl.zeros([BM, D], tl.float32)
    count = tl.load(KV_CNT + b * scb + h * sch + qb)
    for j in range(0, count):
        kb = tl.load(KV_IDX + b * sib + h * sih + qb * siq + j)
        for c in range(0, BLOCK, BN):
            cols = kb * BLOCK + c + tl.arange(0, BN)
            kv_mask = cols[:, None] < seq_k
            k = tl.load(K + b * skb + hk * skh + cols[:, None] * sks + dims[None, :], mask=kv_mask, other=0.0)
            v = tl.load(V + b * skb + hk * skh + cols[:, None] * sks + dims[None, :], mask=kv_mask, other=0.0)
            p = tl.math.exp2(_scores(q, k, rows, cols, seq_q, seq_k, qk_scale, CAUSAL) - lse[:, None])
            ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)
    tl.store(DQ + b * sqb + h * sqh + rows[:, None] * sqs + dims[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, Q_IDX, Q_CNT,
                     sqb, sqh, sqs, skb, skh, sks,
                     sib, sih, siq, scb, sch,
                     H, HKV, GROUP, seq_q, seq_k, qk_scale, sm_scale,
                     BLOCK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr):
    """One BN-row tile of a key block, over the query blocks that visit it (BM-row tiles), for every query head of its group."""
    tile, bhk = tl.program_id(0), tl.program_id(1).to(tl.int64)
    kb = tile // (BLOCK // BN)
    b, hk = bhk // HKV, bhk % HKV
    cols = tile * BN + tl.arange(0, BN)
    dims = tl.arange(0, D)
    kv_mask = cols[:, None] < seq_k
    k = tl.load(K + b * skb + hk * skh + cols[:, None] * sks + dims[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + b * skb + hk * skh + cols[:, None] * sks + dims[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BN, D], tl.float32)
    dv = tl.zeros([BN, D], tl.float32)
    for g in range(0, GROUP):  # every query head that shares this key/value head
        h = hk * GROUP + g
        bh = b * H + h
        count = tl.load(Q_CNT + b * scb + h * sch + kb)
        for i in range(0, count):
            qb = tl.load(Q_IDX + b * sib + h * sih + kb * siq + i)
            for r in range(0, BLOCK, BM):
                rows = qb * BLOCK + r + tl.arange(0, BM)
                q, do, lse, delta = _query_rows(Q, DO, LSE, DELTA, b * sqb + h * sqh, bh * seq_q, rows, dims, sqs, seq_q)
                p = tl.math.exp2(_scores(q, k, rows, cols, seq_q, seq_k, qk_scale, CAUSAL) - lse[:, None])
                dv += tl.dot(tl.trans(p).to(do.dtype), do)
                ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
                dk += tl.dot(tl.trans(ds).to(q.dtype), q)
    tl.store(DK + b * skb + hk * skh + cols[:, None] * sks + dims[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * skb + hk * skh + cols[:, None] * sks + dims[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


# Candidates (BM, BN, warps, stages) per head dim; BM and BN must not exceed the mask's block.
# The forward's (128, 128, 8, 3) won on the H100 at D = 128, 32K ((128, 32, 4, 3) before it was offered).
_FWD_CANDIDATES = {
    64: [(64, 64, 4, 3), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 4), (64, 64, 4, 4)],
    128: [(64, 64, 8, 3), (64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (128, 64, 8, 2), (128, 64, 8, 4),
          (128, 128, 8, 3), (128, 128, 8, 2)],
}
_BWD_CANDIDATES = {  # BM: query rows per tile, BN: key rows per tile (both backward kernels)
    # 4-5 stages: Flex's fastest backward tiles at blocks of 64 on the H200 use them.
    64: [(64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 8, 2), (32, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2),
         (64, 64, 4, 4), (64, 64, 4, 5), (32, 64, 4, 4)],
    # (32, 64, 4, 2) is left out at D = 128: on the H200 (Triton 3.6) it computed a wrong dK with blocks of 64.
    128: [(64, 64, 8, 2), (64, 64, 4, 2), (64, 64, 8, 3), (64, 32, 4, 2), (128, 64, 8, 2),
          (64, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 4), (64, 64, 8, 4)],
}
_FWD_DEFAULT = {64: (64, 64, 4, 3), 128: (64, 64, 8, 3)}
_BWD_DEFAULT = {64: (64, 64, 4, 2), 128: (64, 64, 8, 2)}
_chosen: dict[tuple, tuple[int, int, int, int]] = {}


def forward_config(block: int, d: int, causal: bool, dtype: torch.dtype) -> tuple[int, int, int, int] | None:
    """The forward's (BM, BN, warps, stages) picked for this case so far in this process, if any."""
    return _chosen.get(("fwd", block, d, causal, dtype))


def tuned_configs() -> dict[tuple, tuple[int, int, int, int]]:
    """Every (kernel, block, head dim, causal, dtype) -> (BM, BN, warps, stages) picked so far."""
    return dict(_chosen)


def _run_tuned(kind: str, q: Tensor, block: int, causal: bool, candidates, default, launch,
               outputs: tuple[Tensor, ...] = ()) -> None:
    """Launch with the configuration picked for this case; on the first CUDA call, time each candidate first.

    Every kernel here writes its outputs whole (no accumulation), so timing candidates on the real
    tensors is harmless. A candidate whose ``outputs`` differ from the default configuration's is
    dropped with a warning (one tile shape computed a wrong dK on the H200). No tuning under graph
    capture, in the interpreter, or with SPARSEDISTILL_ATTN_TUNE=0: the default configuration runs then.
    """
    key = (kind, block, q.shape[-1], causal, q.dtype)
    cfg = _chosen.get(key)
    if cfg is None:
        tune = (q.is_cuda and os.environ.get("SPARSEDISTILL_ATTN_TUNE", "1") != "0"
                and not torch.cuda.is_current_stream_capturing())
        if not tune:
            return launch(default)
        from triton.testing import do_bench

        launch(default)
        expected = [t.clone().float() for t in outputs]  # the candidates overwrite the outputs
        timings = {}
        for cand in candidates:
            if cand[0] > block or cand[1] > block:
                continue
            try:
                timings[cand] = do_bench(lambda: launch(cand), warmup=5, rep=20, return_mode="median")
            except Exception:  # noqa: BLE001  (a candidate that does not compile here, e.g. out of shared memory)
                continue
            for i, (t, e) in enumerate(zip(outputs, expected)):
                err = float((t.float() - e).abs().max())
                if not err <= 2e-2 * max(1.0, float(e.abs().max())):
                    warnings.warn(f"block-sparse {kind}: tile {cand} disagrees with the default {default} "
                                  f"(max difference {err:.3g} in output {i}); not used", RuntimeWarning, stacklevel=3)
                    del timings[cand]
                    break
        cfg = _chosen[key] = min(timings, key=timings.get) if timings else default
    launch(cfg)


def _launch_fwd(cfg, q, k, v, o, lse, mask: BlockMask, causal: bool, scale: float) -> None:
    bm, bn, warps, stages = cfg
    b, h, sq, d = q.shape
    ki, kc = mask.kv_indices, mask.kv_counts
    _fwd_kernel[(ki.shape[2] * (mask.block // bm), b * h)](
        q, k, v, o, lse, ki, kc,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2), ki.stride(0), ki.stride(1), ki.stride(2), kc.stride(0), kc.stride(1),
        h, h // k.shape[1], sq, k.shape[2], scale * _LOG2E,
        BLOCK=mask.block, BM=bm, BN=bn, D=d, CAUSAL=causal, num_warps=warps, num_stages=stages,
    )


def _launch_dq(cfg, q, k, v, do, lse, delta, dq, mask: BlockMask, causal: bool, scale: float) -> None:
    bm, bn, warps, stages = cfg
    b, h, sq, d = q.shape
    ki, kc = mask.kv_indices, mask.kv_counts
    _bwd_dq_kernel[(ki.shape[2] * (mask.block // bm), b * h)](
        q, k, v, do, lse, delta, dq, ki, kc,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        ki.stride(0), ki.stride(1), ki.stride(2), kc.stride(0), kc.stride(1),
        h, h // k.shape[1], sq, k.shape[2], scale * _LOG2E, scale,
        BLOCK=mask.block, BM=bm, BN=bn, D=d, CAUSAL=causal, num_warps=warps, num_stages=stages,
    )


def _launch_dkdv(cfg, q, k, v, do, lse, delta, dk, dv, mask: BlockMask, causal: bool, scale: float) -> None:
    bm, bn, warps, stages = cfg
    b, h, sq, d = q.shape
    hkv = k.shape[1]
    mask = mask.with_transposed()
    qi, qc = mask.q_indices, mask.q_counts
    _bwd_dkdv_kernel[(qi.shape[2] * (mask.block // bn), b * hkv)](
        q, k, v, do, lse, delta, dk, dv, qi, qc,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        qi.stride(0), qi.stride(1), qi.stride(2), qc.stride(0), qc.stride(1),
        h, hkv, h // hkv, sq, k.shape[2], scale * _LOG2E, scale,
        BLOCK=mask.block, BM=bm, BN=bn, D=d, CAUSAL=causal, num_warps=warps, num_stages=stages,
    )


def _check(q: Tensor, k: Tensor, v: Tensor, mask: BlockMask) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"expected q (B, H, Sq, D) and k, v (B, Hkv, Sk, D) of equal shape; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    b, h, sq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or h % k.shape[1]:
        raise ValueError(f"k/v {tuple(k.shape)} do not fit q {tuple(q.shape)}: same batch and head dim, and query heads "
                         "a multiple of key/value heads (GQA)")
    if d not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"head dim {d} is not supported by the kernel; use one of {SUPPORTED_HEAD_DIMS} "
                         "(or attention_reference)")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one of fp16 / bf16 / fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if (mask.seq_q, mask.seq_k) != (sq, k.shape[2]):
        raise ValueError(f"mask built for {mask.seq_q}x{mask.seq_k} tokens, inputs are {sq}x{k.shape[2]}")
    mb, mh = mask.kv_counts.shape[:2]
    if (mb, mh) != (b, h):
        raise ValueError(f"mask is for batch x heads {mb}x{mh}, inputs have {b}x{h} (expand the mask to match)")
    if mask.kv_indices.device != q.device:
        raise ValueError(f"mask is on {mask.kv_indices.device}, inputs on {q.device}: move it with mask.to(device)")


class _BlockSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask: BlockMask, causal: bool, scale: float):
        b, h, sq, d = q.shape
        # the forward reads strided views (heads split off a (B, S, H, D) projection) in place; the backward
        # kernels share one stride set for q / o / dO and one for k / v, so it makes them contiguous
        q, k, v = (t if t.stride(3) == 1 else t.contiguous() for t in (q, k, v))
        o = torch.empty_like(q)  # q's memory layout where it is dense: the caller's merge of heads then copies nothing
        lse = torch.empty(b, h, sq, device=q.device, dtype=torch.float32)
        _run_tuned("fwd", q, mask.block, causal, _FWD_CANDIDATES[d], _FWD_DEFAULT[d],
                   lambda cfg: _launch_fwd(cfg, q, k, v, o, lse, mask, causal, scale), (o,))
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.mask, ctx.causal, ctx.scale = mask, causal, scale
        # natural-log log-sum-exp of the visited scores (the kernel keeps log2 units; -inf where a row saw nothing)
        lse_out = torch.where(torch.isinf(lse), float("-inf"), lse * _LN2)
        return o, lse_out

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        q, k, v, o = q.contiguous(), k.contiguous(), v.contiguous(), o.contiguous()
        mask, causal, scale = ctx.mask, ctx.causal, ctx.scale
        d = q.shape[-1]
        do = do.contiguous()
        delta = (do.float() * o.float()).sum(-1)  # rowsum(dO * O), (B, H, Sq)
        if dlse is not None:  # d lse / d s_ij = p_ij, so dS = P * (dP - delta + dlse): fold it into delta
            delta = delta - dlse.float()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        cands, default = _BWD_CANDIDATES[d], _BWD_DEFAULT[d]
        _run_tuned("bwd_dq", q, mask.block, causal, cands, default,
                   lambda cfg: _launch_dq(cfg, q, k, v, do, lse, delta, dq, mask, causal, scale), (dq,))
        _run_tuned("bwd_dkdv", q, mask.block, causal, cands, default,
                   lambda cfg: _launch_dkdv(cfg, q, k, v, do, lse, delta, dk, dv, mask, causal, scale), (dk, dv))
        return dq, dk, dv, None, None, None


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, mask: BlockMask, causal: bool = False,
                           scale: float | None = None, allow_reference: bool = False,
                           return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of q (B, H, Sq, D) over k, v (B, Hkv, Sk, D), visiting only the blocks ``mask`` keeps.

    ``causal`` adds the token-level causal mask (bottom-right aligned when Sq < Sk). Query rows
    that see no key return zeros. Differentiable in q, k and v. ``return_lse`` also returns each
    row's log-sum-exp of its visited scores (B, H, Sq) fp32, -inf where it saw nothing,
    differentiable too: what merging with another attention over other keys needs. Without CUDA
    the Triton kernel cannot run (except under ``TRITON_INTERPRET=1``); ``allow_reference`` then
    falls back to ``attention_reference`` instead of raising.
    """
    _check(q, k, v, mask)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    if not triton_can_run(q):
        if allow_reference:
            return attention_reference(q, k, v, mask, causal, scale, return_lse=return_lse)
        raise RuntimeError("block_sparse_attention runs a Triton kernel and needs CUDA tensors; pass allow_reference=True "
                           "to compute it with the PyTorch reference instead (slow, O(S^2) memory)")
    o, lse = _BlockSparseAttention.apply(q, k, v, mask, causal, scale)
    return (o, lse) if return_lse else o
