"""Top-k token attention (DeepSeek Sparse Attention): a lightning indexer picks k keys per query, attention visits only those.

Indexer: ``I(t, s) = sum_j w[t, j] * ReLU(q[t, j] . k[s])`` over a few indexer heads ``j`` that
share one small key per token; causal (``s <= t``, bottom-right aligned when a query chunk sits
at the end of a KV cache). The Triton kernel fuses the per-head products, the ReLU and the
weighted sum over heads into one pass over each (query tile, key tile); the top-k runs on each
chunk of queries (``torch.topk``), so the full score matrix never exists at long context.

Attention: every query token attends to its own ``indices`` (B, Sq, k), -1 padded, shared by
the query's heads, which is what lets a later layer reuse an earlier layer's selection
(IndexCache). The same kernel serves prefill (many queries) and decode (one query, a KV cache of
``kv_len`` valid tokens); when there are too few tokens to fill the GPU (decode), each token's
index list is split over several programs and the pieces are merged by their log-sum-exps.
Forward only; ``topk_attention_reference`` is the PyTorch definition.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._online_softmax import online_softmax_step
from ._runtime import triton_can_run

__all__ = ["indexer_scores_reference", "indexer_scores", "indexer_topk", "topk_attention", "topk_attention_reference"]


def indexer_scores_reference(q: Tensor, w: Tensor, k: Tensor, causal: bool = True, kv_len: int | None = None) -> Tensor:
    """q (B, Sq, Hi, Di), w (B, Sq, Hi), k (B, Sk, Di) -> scores (B, Sq, Sk) fp32; hidden keys at -inf."""
    sk = kv_len if kv_len is not None else k.shape[1]
    k = k[:, :sk]
    s = torch.relu(torch.einsum("bqhd,bkd->bqhk", q.float(), k.float()))
    s = (s * w.float()[..., None]).sum(2)
    if causal:
        sq = q.shape[1]
        visible = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
        s = s.masked_fill(~visible, float("-inf"))
    return s


@triton.jit
def _indexer_score_tile(Q, W, K, b, rows, cols, sqb, sqt, sqh, swb, swt, skb, sks, seq_q, seq_k, HI,
                        BM: tl.constexpr, BN: tl.constexpr, DI: tl.constexpr):
    """fp32 scores of query ``rows`` x key ``cols``, before masking: sum_j w[row, j] * ReLU(q[row, j] . k[col]).

    Shared by every kernel that scores (here and in ``indexer_select``), so they all see the same fp32 bits.
    """
    dims = tl.arange(0, DI)
    k = tl.load(K + b * skb + cols[:, None] * sks + dims[None, :], mask=cols[:, None] < seq_k, other=0.0)
    acc = tl.zeros([BM, BN], tl.float32)
    for j in range(0, HI):
        q = tl.load(Q + b * sqb + rows[:, None] * sqt + j * sqh + dims[None, :], mask=rows[:, None] < seq_q, other=0.0)
        wj = tl.load(W + b * swb + rows * swt + j, mask=rows < seq_q, other=0.0).to(tl.float32)
        acc += wj[:, None] * tl.maximum(tl.dot(q, tl.trans(k)), 0.0)
    return acc


@triton.jit
def _indexer_visible(rows, cols, seq_q, seq_k, CAUSAL: tl.constexpr):
    """Which (row, col) pairs a query sees: keys < seq_k, and causally the queries are the last seq_q positions."""
    ok = cols[None, :] < seq_k
    if CAUSAL:
        ok = ok & (cols[None, :] <= rows[:, None] + (seq_k - seq_q))
    return ok


@triton.jit
def _indexer_kernel(Q, W, K, S, sqb, sqt, sqh, swb, swt, skb, sks, ssb, sst,
                    seq_q, seq_k, HI, BM: tl.constexpr, BN: tl.constexpr, DI: tl.constexpr, CAUSAL: tl.constexpr):
    mt, nt, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)  # int64: offsets pass 2^31 at long context
    rows = mt * BM + tl.arange(0, BM)
    cols = nt * BN + tl.arange(0, BN)
    acc = _indexer_score_tile(Q, W, K, b, rows, cols, sqb, sqt, sqh, swb, swt, skb, sks, seq_q, seq_k, HI, BM, BN, DI)
    acc = tl.where(_indexer_visible(rows, cols, seq_q, seq_k, CAUSAL), acc, float("-inf"))
    tl.store(S + b * ssb + rows[:, None] * sst + cols[None, :], acc.to(S.dtype.element_ty), mask=(rows[:, None] < seq_q) & (cols[None, :] < seq_k))


def indexer_scores(q: Tensor, w: Tensor, k: Tensor, causal: bool = True, kv_len: int | None = None,
                   out_dtype: torch.dtype = torch.float32) -> Tensor:
    """The Triton version of ``indexer_scores_reference`` (CUDA tensors, or the interpreter).

    ``out_dtype`` bf16 halves the bytes the scores take and the top-k reads (ranking ties may differ).
    """
    b, sq, hi, di = q.shape
    sk = kv_len if kv_len is not None else k.shape[1]
    if w.shape != (b, sq, hi) or k.shape[0] != b or k.shape[2] != di:
        raise ValueError(f"indexer shapes do not fit: q {tuple(q.shape)} (B, Sq, Hi, Di), w {tuple(w.shape)} (B, Sq, Hi), "
                         f"k {tuple(k.shape)} (B, Sk, Di)")
    if di < 16 or di & (di - 1):
        raise ValueError(f"indexer head dim must be a power of two >= 16, got {di}")
    q, w, k = q.contiguous(), w.contiguous(), k.contiguous()
    s = torch.empty(b, sq, sk, device=q.device, dtype=out_dtype)
    bm, bn = 64, 64
    _indexer_kernel[(triton.cdiv(sq, bm), triton.cdiv(sk, bn), b)](
        q, w, k, s, q.stride(0), q.stride(1), q.stride(2), w.stride(0), w.stride(1), k.stride(0), k.stride(1),
        s.stride(0), s.stride(1), sq, sk, hi, BM=bm, BN=bn, DI=di, CAUSAL=causal)
    return s


def indexer_topk(q: Tensor, w: Tensor, k: Tensor, topk: int, causal: bool = True, kv_len: int | None = None,
                 chunk: int | None = None, use_kernel: bool | None = None, score_dtype: torch.dtype = torch.float32,
                 method: str = "topk") -> Tensor:
    """Indices (B, Sq, topk) int32 of each query's ``topk`` highest-scoring visible keys, -1 where fewer are visible.

    ``method`` "topk": queries are scored ``chunk`` (default 1024) at a time and ``torch.topk`` picks, so memory
    is chunk x Sk floats, not Sq x Sk; indices come in descending score order. ``score_dtype`` is the kernel's
    score precision (bf16: half the bytes for the top-k to read).
    ``method`` "prefilter": ``indexer_select.indexer_topk_prefilter`` (exact, fp32, no chunk x Sk score matrix;
    indices ascending, ties to the lower key index); without a kernel, its PyTorch reference.
    """
    if method not in ("topk", "prefilter"):
        raise ValueError(f"method must be 'topk' (chunked torch.topk) or 'prefilter' (exact group-max prefilter "
                         f"kernels), got {method!r}")
    sk = kv_len if kv_len is not None else k.shape[1]
    if not 0 < topk <= sk:
        raise ValueError(f"k = {topk} must be between 1 and the context length ({sk} tokens); "
                         "for contexts shorter than k use dense attention")
    use_kernel = triton_can_run(q) if use_kernel is None else use_kernel
    if method == "prefilter":
        from .indexer_select import indexer_topk_prefilter, indexer_topk_sorted_reference  # lazy: it imports this module

        if score_dtype != torch.float32:
            raise ValueError(f"method 'prefilter' scores in float32 only, got score_dtype {score_dtype}")
        if not use_kernel:
            return indexer_topk_sorted_reference(q, w, k, topk, causal, kv_len)
        return indexer_topk_prefilter(q, w, k, topk, causal, kv_len, **({} if chunk is None else {"chunk": chunk}))
    chunk = 1024 if chunk is None else chunk
    if use_kernel:
        score = lambda *a: indexer_scores(*a, out_dtype=score_dtype)  # noqa: E731
    else:
        score = indexer_scores_reference
    sq = q.shape[1]
    if sq > sk:
        raise ValueError(f"{sq} queries but only {sk} keys: the queries must be the last positions of the key sequence")
    out = torch.empty(q.shape[0], sq, topk, dtype=torch.int32, device=q.device)
    offset = sk - sq
    for start in range(0, sq, chunk):
        stop = min(sq, start + chunk)
        # causal: the chunk's queries are the last ones of keys[:stop + offset]; otherwise every key is visible
        s = score(q[:, start:stop], w[:, start:stop], k[:, : stop + offset if causal else sk], causal, None)
        vals, idx = s.topk(min(topk, s.shape[-1]), dim=-1)
        idx = torch.where(torch.isfinite(vals), idx, -1).to(torch.int32)
        out[:, start:stop, : idx.shape[-1]] = idx
        out[:, start:stop, idx.shape[-1]:] = -1
    return out


def topk_attention_reference(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, scale: float | None = None,
                             kv_len: int | None = None) -> Tensor:
    """q (B, H, Sq, D) attends to k, v (B, Hkv, Sk, D) at ``indices`` (B, Sq, n), causally; fp32 math, zeros where nothing is visible."""
    b, h, sq, d = q.shape
    hkv = k.shape[1]
    sk = kv_len if kv_len is not None else k.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    pos = torch.arange(sq, device=q.device) + (sk - sq)
    valid = (indices >= 0) & (indices < sk) & (indices <= pos[None, :, None])  # (B, Sq, n)
    idx = indices.clamp(min=0).long()
    kk = k.repeat_interleave(h // hkv, 1).float()
    vv = v.repeat_interleave(h // hkv, 1).float()
    gather = lambda t: t[torch.arange(b)[:, None, None, None], torch.arange(h)[None, :, None, None], idx[:, None]]  # noqa: E731
    ks, vs = gather(kk), gather(vv)  # (B, H, Sq, n, D)
    s = (q.float()[..., None, :] * ks).sum(-1) * scale
    s = s.masked_fill(~valid[:, None], float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    return (p[..., None] * vs).sum(-2).to(q.dtype)


@triton.jit
def _topk_attn_kernel(Q, K, V, O, LSE, IDX, sqb, sqh, sqt, skb, skh, sks, sib, sit, sos, sob, soh, sot, sls,
                      HKV, GROUP, seq_q, seq_k, n_idx, per_split, qk_scale,
                      GP: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, SPLIT: tl.constexpr):
    """One query token, all query heads of one KV head (padded to GP rows), over one split of that token's indices.

    With ``SPLIT`` the output is this split's normalised partial result plus its log-sum-exp (log2
    units), combined afterwards (flash-decoding: a single decode token still fills the GPU).
    """
    t, bhk = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)  # int64: offsets pass 2^31 at long context
    split = tl.program_id(2).to(tl.int64)
    b, hk = bhk // HKV, bhk % HKV
    heads = hk * GROUP + tl.arange(0, GP)
    head_ok = tl.arange(0, GP) < GROUP
    dims = tl.arange(0, D)
    q_ptr = Q + b * sqb + heads[:, None] * sqh + t * sqt + dims[None, :]
    q = tl.load(q_ptr, mask=head_ok[:, None], other=0.0)
    last = t + (seq_k - seq_q)  # this query's position among the keys
    m = tl.full([GP], float("-inf"), tl.float32)
    l = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    lo = split * per_split
    hi = tl.minimum(lo + per_split, n_idx)
    for n0 in range(lo, hi, BN):
        offs = n0 + tl.arange(0, BN)
        idx = tl.load(IDX + b * sib + t * sit + offs, mask=offs < hi, other=-1)
        ok = (idx >= 0) & (idx < seq_k) & (idx <= last)
        safe = tl.where(ok, idx, 0)
        k = tl.load(K + b * skb + hk * skh + safe[:, None] * sks + dims[None, :], mask=ok[:, None], other=0.0)
        v = tl.load(V + b * skb + hk * skh + safe[:, None] * sks + dims[None, :], mask=ok[:, None], other=0.0)
        s = tl.where(ok[None, :], tl.dot(q, tl.trans(k)) * qk_scale, float("-inf"))
        m, l, acc = online_softmax_step(s, v, m, l, acc)
    has = l > 0
    out = acc / tl.where(has, l, 1.0)[:, None]
    o_ptr = O + split * sos + b * sob + heads[:, None] * soh + t * sot + dims[None, :]
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=head_ok[:, None])
    if SPLIT:
        lse = tl.where(has, m + tl.math.log2(tl.where(has, l, 1.0)), float("-inf"))
        tl.store(LSE + split * sls + (b * HKV * GROUP + heads) * seq_q + t, lse, mask=head_ok)


@triton.jit
def _combine_kernel(OP, LSE, O, n_splits, rows, D: tl.constexpr, SP: tl.constexpr):
    """Merge the splits of one (batch, head, token) row: partial outputs weighted by exp2(lse - max lse)."""
    r = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, SP)
    dims = tl.arange(0, D)
    ok = sp < n_splits
    lse = tl.load(LSE + sp * rows + r, mask=ok, other=float("-inf"))
    top = tl.max(lse, 0)
    w = tl.math.exp2(lse - tl.where(top == float("-inf"), 0.0, top))  # splits that saw nothing weigh 0
    part = tl.load(OP + (sp[:, None] * rows + r) * D + dims[None, :], mask=ok[:, None], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(w[:, None] * part, 0) / tl.where(total > 0, total, 1.0)
    tl.store(O + r * D + dims, out.to(O.dtype.element_ty))


def _decode_splits(n_idx: int, programs: int, device: torch.device) -> int:
    """How many pieces to cut each token's index list into, so that few tokens still fill the GPU's SMs."""
    if device.type != "cuda" or n_idx <= 256:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    if programs >= sms:
        return 1
    return max(1, min(-(-n_idx // 128), -(-2 * sms // programs)))


def check_topk_inputs(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, kv_len: int | None,
                      check_indices: bool) -> int:
    """The checks every top-k attention kernel's wrapper makes (errors say what is allowed); returns kv_len."""
    b, h, sq, d = q.shape if q.ndim == 4 else (0, 0, 0, 0)
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape or k.shape[0] != b or k.shape[3] != d or h % k.shape[1]:
        raise ValueError(f"expected q (B, H, Sq, D), k and v (B, Hkv, Sk, D) with H a multiple of Hkv; "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if indices.ndim != 3 or indices.shape[:2] != (b, sq):
        raise ValueError(f"indices must be (B, Sq, n) = ({b}, {sq}, n), got {tuple(indices.shape)}")
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be int32 or int64, got {indices.dtype}")
    sk = kv_len if kv_len is not None else k.shape[2]
    if not sq <= sk <= k.shape[2]:
        raise ValueError(f"kv_len {sk} must be between the query count {sq} and the cache size {k.shape[2]}")
    if d not in (64, 128):
        raise ValueError(f"head dim {d} is not supported by the kernel; use 64 or 128 (or topk_attention_reference)")
    if check_indices and indices.numel():
        lo, hi = torch.stack([indices.min(), indices.max()]).tolist()  # one device sync
        if lo < -1 or hi >= sk:
            raise ValueError(f"indices must lie in [-1, {sk}) (-1 = padding), got values from {lo} to {hi}")
    return sk


def topk_attention(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, scale: float | None = None,
                   kv_len: int | None = None, allow_reference: bool = False, check_indices: bool = True,
                   splits: int | None = None) -> Tensor:
    """q (B, H, Sq, D) over k, v (B, Hkv, Sk, D) at ``indices`` (B, Sq, n) int32; prefill or decode (Sq = 1).

    ``kv_len`` is the number of valid cache entries when k, v are a preallocated KV cache; the
    queries are its last ``Sq`` positions. -1 marks padding; indices of future positions are
    skipped (causality), so a selection made by an earlier layer can be reused as it is.
    ``check_indices`` rejects indices outside [-1, kv_len) (one device sync: turn it off inside
    CUDA graphs). ``splits`` cuts each token's index list into that many pieces (None: enough to
    fill the GPU when there are few tokens, as in decode).
    """
    b, h, sq, d = q.shape
    sk = check_topk_inputs(q, k, v, indices, kv_len, check_indices)
    scale = 1 / math.sqrt(d) if scale is None else scale
    if not triton_can_run(q):
        if allow_reference:
            return topk_attention_reference(q, k, v, indices, scale, kv_len)
        raise RuntimeError("topk_attention runs a Triton kernel and needs CUDA tensors; pass allow_reference=True "
                           "to use the PyTorch reference instead")
    q, k, v, indices = q.contiguous(), k.contiguous(), v.contiguous(), indices.to(torch.int32).contiguous()
    hkv, n_idx = k.shape[1], indices.shape[2]
    group = h // hkv
    splits = splits or _decode_splits(n_idx, sq * b * hkv, q.device)
    per_split = -(-n_idx // splits)
    per_split = -(-per_split // 64) * 64  # whole BN tiles per split
    splits = max(1, -(-n_idx // per_split))
    if splits == 1:
        o = torch.empty_like(q)
        lse = o  # unused
    else:
        o = torch.empty(splits, b, h, sq, d, device=q.device, dtype=torch.float32)
        lse = torch.empty(splits, b, h, sq, device=q.device, dtype=torch.float32)
    so = (0, *q.stride()[:3]) if splits == 1 else o.stride()[:4]
    _topk_attn_kernel[(sq, b * hkv, splits)](
        q, k, v, o, lse, indices, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        indices.stride(0), indices.stride(1), *so, lse.stride(0) if splits > 1 else 0,
        hkv, group, sq, sk, n_idx, per_split, scale * 1.4426950408889634,
        GP=max(16, triton.next_power_of_2(group)), BN=64, D=d, SPLIT=splits > 1)
    if splits == 1:
        return o
    out = torch.empty_like(q)  # (B, H, Sq, D) contiguous: row r = (b, h, t) as the partials are laid out
    _combine_kernel[(b * h * sq,)](o, lse, out, splits, b * h * sq, D=d, SP=max(2, triton.next_power_of_2(splits)))
    return out
