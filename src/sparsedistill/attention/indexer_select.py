"""Exact lightning-indexer top-k without a query x key score matrix: the group-max prefilter.

``indexer_topk`` scores a chunk of queries into a chunk x Sk fp32 matrix and runs ``torch.topk`` on it;
at long context that matrix is most of the time and memory. Here the scores are computed twice and
never stored (docs/notes/dsa-kernels-design.md, section 4.1, mode R), in four kernels per query chunk:

- K1 ``_group_keys_kernel``: score tiles; per query and group of G keys, keep only the group maximum as
  a 16-bit key (the order-preserving int32 of the fp32 score, shifted right: a floor, so never above it).
- K2 ``_threshold_kernel``: per query, tau = the exact k-th largest group key (bisection on 16 bits).
  k groups reach tau, so k distinct scores do, so every score of the true top-k has key16 >= tau.
- K3 ``_candidates_kernel``: score the tiles again and append every (score, key index) with key16 >= tau
  to the query's buffer (one program walks a query tile's keys: offsets by ``tl.cumsum``, no atomics).
- K4 ``_exact_select_kernel``: per query, bisection on the full 32-bit key for the exact k-th score, a
  second bisection on the key index to break ties at it, then the winners sorted ascending.

Exactness rule: the selection is the first k of a stable descending sort of the kernels' own fp32
scores (ties go to the lower key index; -0.0 ties with +0.0), returned in ascending index order,
-1 padded (``select_topk_sorted`` is its PyTorch definition). A query whose candidates overflow the
buffer (many equal scores, e.g. an untrained indexer whose ReLUs are all zero) is redone on the host
from that query's fp32 scores; ``stats`` counts them. NaN scores are not supported.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._runtime import triton_can_run
from .topk import _indexer_score_tile, _indexer_visible, indexer_scores, indexer_scores_reference

__all__ = ["indexer_topk_prefilter", "indexer_topk_sorted_reference", "select_topk_sorted"]

# The tile of ``indexer_scores``: the same tl.dot shape gives the same fp32 bits, which the host fallback relies on.
BM, BN = 64, 64
KEY16_MIN = tl.constexpr(-32768)  # below every 16-bit key of a non-NaN score
INT32_MAX = tl.constexpr(2147483647)
MAX_GROUP_BLOCK = 8192  # group keys K2 holds in registers at once; longer rows are counted block by block
_CANDIDATE_BYTES = 1 << 30  # the default chunk's candidate buffers, and its first group-key buffer
_MAX_CHUNK = 16384


def select_topk_sorted(scores: Tensor, n_visible: Tensor, topk: int) -> Tensor:
    """The exactness rule in PyTorch: scores (..., Sk) fp32 whose first ``n_visible`` (...) keys are visible
    -> (..., topk) int32 indices of a stable descending sort's first k, ascending, -1 padded."""
    sk = scores.shape[-1]
    cols = torch.arange(sk, device=scores.device)
    s = scores.float().masked_fill(cols >= n_visible[..., None], float("-inf"))
    s = torch.where(s == 0, 0.0, s)  # -0.0 ties with +0.0, as in the kernels' keys
    picked = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :topk]
    rank = torch.arange(picked.shape[-1], device=scores.device)
    picked = torch.where(rank < n_visible[..., None], picked, sk).sort(-1).values  # hidden keys sort last
    picked = torch.where(picked == sk, -1, picked).to(torch.int32)
    return torch.nn.functional.pad(picked, (0, topk - picked.shape[-1]), value=-1)


def _visible_counts(sq: int, sk: int, causal: bool, device: torch.device) -> Tensor:
    """Keys each query sees: the queries are the last ``sq`` of ``sk`` positions."""
    if not causal:
        return torch.full((sq,), sk, device=device)
    return torch.arange(sq, device=device) + (sk - sq + 1)


def indexer_topk_sorted_reference(q: Tensor, w: Tensor, k: Tensor, topk: int, causal: bool = True,
                                  kv_len: int | None = None) -> Tensor:
    """``indexer_topk_prefilter``'s result from ``indexer_scores_reference`` (the full Sq x Sk matrix)."""
    sk = kv_len if kv_len is not None else k.shape[1]
    s = indexer_scores_reference(q, w, k, causal, kv_len)
    return select_topk_sorted(s, _visible_counts(q.shape[1], sk, causal, q.device).expand(q.shape[0], -1), topk)


@triton.jit
def _order_key(s):
    """fp32 -> int32 whose signed order is the float order (-0.0 folded into +0.0)."""
    bits = tl.where(s == 0.0, 0, s.to(tl.int32, bitcast=True))
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip the magnitude bits so larger magnitude sorts lower


@triton.jit
def _tile_is_visible(mt, nt, row0, seq_q, seq_k, BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr):
    """Whether key tile ``nt`` holds any key that query tile ``mt`` of the chunk sees (tiles past the diagonal: none)."""
    last_key = (row0 + mt * BM + BM - 1 + seq_k - seq_q) if CAUSAL else seq_k
    return nt * BN <= last_key


@triton.jit
def _tile_rows_cols(mt, nt, row0, BM: tl.constexpr, BN: tl.constexpr):
    """(chunk-local query rows, their global positions, key columns) of tile (mt, nt); int64 rows: local x row
    stride passes 2^31 at large chunks."""
    local = (mt * BM + tl.arange(0, BM)).to(tl.int64)
    return local, row0 + local, nt * BN + tl.arange(0, BN)


@triton.jit
def _group_keys_kernel(Q, W, K, GK, sqb, sqt, sqh, swb, swt, skb, sks, sgb, sgr,
                       row0, n_rows, n_groups, seq_q, seq_k, HI,
                       BM: tl.constexpr, BN: tl.constexpr, DI: tl.constexpr, G: tl.constexpr, CAUSAL: tl.constexpr):
    """K1. GK[b, r, g] = key16(max of row0 + r's visible scores in keys [g G, (g + 1) G)); groups it cannot see are junk."""
    mt, nt, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    if _tile_is_visible(mt, nt, row0, seq_q, seq_k, BM, BN, CAUSAL):
        local, rows, cols = _tile_rows_cols(mt, nt, row0, BM, BN)
        s = _indexer_score_tile(Q, W, K, b, rows, cols, sqb, sqt, sqh, swb, swt, skb, sks, seq_q, seq_k, HI, BM, BN, DI)
        s = tl.where(_indexer_visible(rows, cols, seq_q, seq_k, CAUSAL), s, float("-inf"))
        group_max = tl.max(tl.reshape(s, [BM, BN // G, G]), 2)  # the key is monotone, so max first
        key16 = (_order_key(group_max) >> 16).to(tl.int16)
        groups = nt * (BN // G) + tl.arange(0, BN // G)
        tl.store(GK + b * sgb + local[:, None] * sgr + groups[None, :], key16,
                 mask=(local[:, None] < n_rows) & (groups[None, :] < n_groups))


@triton.jit
def _threshold_kernel(GK, TAU, sgb, sgr, stb, row0, seq_q, seq_k, topk,
                      G: tl.constexpr, GB: tl.constexpr, ONE_BLOCK: tl.constexpr, CAUSAL: tl.constexpr):
    """K2. TAU[b, r] = the k-th largest of the row's visible group keys (KEY16_MIN: keep all, the row has <= k keys).

    Bisection keeps count(keys >= lo) >= k > count(keys >= hi); 16 halvings of [-2^15, 2^15) end at hi = lo + 1.
    """
    r, b = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    n_visible = (row0 + r + seq_k - seq_q + 1) if CAUSAL else seq_k
    n_groups = tl.cdiv(n_visible, G)
    row = GK + b * sgb + r * sgr
    lane = tl.arange(0, GB)
    lo = tl.full([], KEY16_MIN, tl.int32)
    if n_visible > topk:
        hi = tl.full([], -KEY16_MIN, tl.int32)
        if ONE_BLOCK:  # the whole row in registers
            keys = tl.load(row + lane, mask=lane < n_groups, other=KEY16_MIN).to(tl.int32)
        for _ in range(16):
            mid = (lo + hi) >> 1  # > KEY16_MIN, so the padding never counts
            if ONE_BLOCK:
                n_ge = tl.sum((keys >= mid).to(tl.int32), 0)
            else:
                n_ge = tl.zeros([], tl.int32)
                for g0 in range(0, n_groups, GB):
                    block = tl.load(row + g0 + lane, mask=g0 + lane < n_groups, other=KEY16_MIN).to(tl.int32)
                    n_ge += tl.sum((block >= mid).to(tl.int32), 0)
            lo = tl.where(n_ge >= topk, mid, lo)
            hi = tl.where(n_ge >= topk, hi, mid)
    tl.store(TAU + b * stb + r, lo)


@triton.jit
def _candidates_kernel(Q, W, K, TAU, COUNT, CV, CI, sqb, sqt, sqh, swb, swt, skb, sks, stb, scb, scr,
                       row0, n_rows, n_tiles_m, seq_q, seq_k, HI,
                       BM: tl.constexpr, BN: tl.constexpr, DI: tl.constexpr, CAP: tl.constexpr, CAUSAL: tl.constexpr):
    """K3. Append each visible (score, key) with key16 >= TAU to its row's buffer, in key order; COUNT keeps counting
    past CAP.

    Row-stationary: one program owns BM queries and walks their visible key tiles, so each row's count stays in
    registers. (One program per (query tile, key tile) with an atomic per row and tile made ~2,400 atomics a query
    at 128K, 4x the score kernel's own time on an H100.) Programs go longest rows first (causal: the last tiles).
    """
    mt, b = n_tiles_m - 1 - tl.program_id(0), tl.program_id(1).to(tl.int64)
    local = (mt * BM + tl.arange(0, BM)).to(tl.int64)
    rows = row0 + local
    row_ok = local < n_rows
    tau = tl.load(TAU + b * stb + local, mask=row_ok, other=INT32_MAX)
    count = tl.zeros([BM], tl.int32)
    n_keys = tl.minimum(row0 + mt * BM + BM + seq_k - seq_q, seq_k) if CAUSAL else seq_k  # the tile's last row sees most
    for nt in range(0, tl.cdiv(n_keys, BN)):
        cols = nt * BN + tl.arange(0, BN)
        s = _indexer_score_tile(Q, W, K, b, rows, cols, sqb, sqt, sqh, swb, swt, skb, sks, seq_q, seq_k, HI, BM, BN, DI)
        keep = _indexer_visible(rows, cols, seq_q, seq_k, CAUSAL) & ((_order_key(s) >> 16) >= tau[:, None])
        keep = (keep & row_ok[:, None]).to(tl.int32)
        slot = count[:, None] + tl.cumsum(keep, 1) - keep
        where = b * scb + local[:, None] * scr + slot
        store = (keep > 0) & (slot < CAP)
        tl.store(CV + where, s, mask=store)
        tl.store(CI + where, tl.broadcast_to(cols[None, :], [BM, BN]), mask=store)
        count += tl.sum(keep, 1)
    tl.store(COUNT + b * stb + local, count, mask=row_ok)


@triton.jit
def _exact_select_kernel(CV, CI, COUNT, OUT, scb, scr, stb, sob, sot, row0, topk,
                         CAP: tl.constexpr, KP: tl.constexpr):
    """K4. OUT row = the k best candidates by (score desc, key index asc), written ascending, -1 padded.

    Rows that overflowed CAP are garbage here; the host redoes them.
    """
    r, b = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    n_cand = tl.minimum(tl.load(COUNT + b * stb + r), CAP)
    slot = tl.arange(0, CAP)
    live = slot < n_cand
    buf = b * scb + r * scr + slot
    key = _order_key(tl.load(CV + buf, mask=live, other=0.0))
    idx = tl.load(CI + buf, mask=live, other=0)
    take = live
    if n_cand > topk:
        # kth = the k-th largest key: count(key >= lo) >= k > count(key >= hi); int64 so hi - lo cannot overflow
        lo = tl.min(tl.where(live, key, INT32_MAX), 0).to(tl.int64)
        hi = tl.max(tl.where(live, key, -INT32_MAX - 1), 0).to(tl.int64) + 1
        while hi - lo > 1:
            mid = lo + ((hi - lo) >> 1)
            n_ge = tl.sum((live & (key >= mid.to(tl.int32))).to(tl.int32), 0)
            lo = tl.where(n_ge >= topk, mid, lo)
            hi = tl.where(n_ge >= topk, hi, mid)
        kth = lo.to(tl.int32)
        tie = live & (key == kth)
        need = topk - tl.sum((live & (key > kth)).to(tl.int32), 0)  # >= 1 ties to take, the lowest indices
        # last = the smallest index with count(tie & idx <= last) >= need: count(<= lo_i) < need <= count(<= last)
        last = tl.max(tl.where(tie, idx, -1), 0)
        lo_i = tl.min(tl.where(tie, idx, INT32_MAX), 0) - 1
        if tl.sum(tie.to(tl.int32), 0) == need:
            lo_i = last - 1  # every tie is taken
        while last - lo_i > 1:
            mid_i = lo_i + ((last - lo_i) >> 1)
            n_le = tl.sum((tie & (idx <= mid_i)).to(tl.int32), 0)
            last = tl.where(n_le >= need, mid_i, last)
            lo_i = tl.where(n_le >= need, lo_i, mid_i)
        take = live & ((key > kth) | (tie & (idx <= last)))
    # compact the winners into the output row, then read them back and sort them ascending
    out_row = OUT + b * sob + (row0 + r) * sot
    tl.store(out_row + tl.cumsum(take.to(tl.int32), 0) - 1, idx, mask=take)
    n_take = tl.minimum(n_cand, topk)
    tl.debug_barrier()  # the stores above come from other threads of this program
    lane = tl.arange(0, KP)
    picked = tl.sort(tl.load(out_row + lane, mask=lane < n_take, other=INT32_MAX))
    tl.store(out_row + lane, tl.where(lane < n_take, picked, -1), mask=lane < topk)


def _default_chunk(b: int, sq: int, sk: int, topk: int, cap: int, causal: bool) -> int:
    """Queries a chunk: at most 16,384 (256 candidate-kernel programs), within 1 GiB of candidate buffers (a score and
    a key index a slot) and 1 GiB of group keys for the first chunk (its group size is the smallest: with a small k
    at long context, one chunk of every query would hold an Sq x Sk int16 matrix), whole query tiles."""
    chunk = min(_MAX_CHUNK, max(BM, _CANDIDATE_BYTES // (b * cap * 8)))
    offset = sk - sq
    first_group = _group_size(offset + 1 if causal else sk, topk)
    while chunk > BM:
        first_groups = triton.cdiv(min(chunk, sq) + offset if causal else sk, first_group)
        if b * chunk * first_groups * 2 <= _CANDIDATE_BYTES:
            break
        chunk //= 2
    return max(BM, chunk // BM * BM)


def _group_size(min_visible: int, topk: int) -> int:
    """Largest power of two <= BN that leaves every row of the chunk >= 2k groups (1 if none does)."""
    g = 1
    while 2 * g <= BN and min_visible // (2 * g) >= 2 * topk:
        g *= 2
    return g


def _check_inputs(q: Tensor, w: Tensor, k: Tensor, topk: int, sk: int, cap: int, chunk: int) -> None:
    b, sq, hi, di = q.shape
    if w.shape != (b, sq, hi) or k.ndim != 3 or k.shape[0] != b or k.shape[2] != di:
        raise ValueError(f"indexer shapes do not fit: q {tuple(q.shape)} (B, Sq, Hi, Di), w {tuple(w.shape)} (B, Sq, Hi), "
                         f"k {tuple(k.shape)} (B, Sk, Di)")
    if di < 16 or di & (di - 1):
        raise ValueError(f"indexer head dim must be a power of two >= 16, got {di}")
    if not sq <= sk <= k.shape[1]:
        raise ValueError(f"kv_len {sk} must be between the query count {sq} (the queries are the last positions of the "
                         f"keys) and the number of keys {k.shape[1]}")
    if not 0 < topk <= sk:
        raise ValueError(f"k = {topk} must be between 1 and the context length ({sk} tokens); "
                         "for contexts shorter than k use dense attention")
    if cap < topk or cap & (cap - 1):
        raise ValueError(f"candidates = {cap} must be a power of two >= k = {topk}")
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of queries, got {chunk}")


def _redo_overflowed(q: Tensor, w: Tensor, k: Tensor, out: Tensor, rows: Tensor, topk: int, causal: bool, sk: int,
                     piece: int = 256) -> None:
    """Rows (n, 2) of (batch, query) whose candidates overflowed: their fp32 scores, selected in PyTorch."""
    sq = q.shape[1]
    for b in rows[:, 0].unique().tolist():
        ts = rows[rows[:, 0] == b, 1]
        for i in range(0, len(ts), piece):
            t = ts[i:i + piece]
            s = indexer_scores(q[b, t][None], w[b, t][None], k[b:b + 1], causal=False, kv_len=sk)[0]
            n_visible = _visible_counts(sq, sk, causal, q.device)[t]
            out[b, t] = select_topk_sorted(s, n_visible, topk)


def indexer_topk_prefilter(q: Tensor, w: Tensor, k: Tensor, topk: int, causal: bool = True, kv_len: int | None = None,
                           chunk: int | None = None, candidates: int | None = None, stats: dict | None = None) -> Tensor:
    """Indices (B, Sq, topk) int32 of each query's ``topk`` best visible keys, ascending, -1 where fewer are visible.

    q (B, Sq, Hi, Di), w (B, Sq, Hi), k (B, Sk, Di) as in ``indexer_scores``; the queries are the last Sq of the
    ``kv_len`` valid keys. Exact under the module's rule (ties to the lower key index). ``chunk`` queries are
    done at a time (default ``_default_chunk``: up to 16,384 within 1 GiB of buffers; a chunk's query tiles are the
    candidate kernel's programs, so more fill the GPU better); ``candidates`` (a power of two >= topk, default
    next_pow2(4 topk)) is each query's buffer.
    ``stats``, if given, gets "rows", "fallback_rows" (queries redone on the host), "candidates_max" and
    "candidates_total" added to it. Reading the chunk's largest candidate count syncs with the device once per chunk
    (not graph-capturable).
    """
    b, sq, hi, di = q.shape
    sk = kv_len if kv_len is not None else k.shape[1]
    cap = candidates if candidates is not None else triton.next_power_of_2(4 * topk)
    if chunk is None:
        chunk = _default_chunk(b, sq, sk, topk, cap, causal)
    _check_inputs(q, w, k, topk, sk, cap, chunk)
    if not triton_can_run(q):
        raise RuntimeError("indexer_topk_prefilter runs Triton kernels and needs CUDA tensors (or TRITON_INTERPRET=1); "
                           "use indexer_topk_sorted_reference on the CPU")
    q, w, k = q.contiguous(), w.contiguous(), k.contiguous()
    out = torch.empty(b, sq, topk, dtype=torch.int32, device=q.device)
    n_chunk = min(chunk, sq)
    tau = torch.empty(b, n_chunk, dtype=torch.int32, device=q.device)
    count = torch.empty(b, n_chunk, dtype=torch.int32, device=q.device)
    cand_score = torch.empty(b, n_chunk, cap, dtype=torch.float32, device=q.device)
    cand_index = torch.empty(b, n_chunk, cap, dtype=torch.int32, device=q.device)
    qs = (q.stride(0), q.stride(1), q.stride(2), w.stride(0), w.stride(1), k.stride(0), k.stride(1))
    offset = sk - sq
    for row0 in range(0, sq, chunk):
        n_rows = min(chunk, sq - row0)
        min_visible = row0 + offset + 1 if causal else sk
        max_visible = row0 + n_rows + offset if causal else sk
        g = _group_size(min_visible, topk)
        n_groups = triton.cdiv(max_visible, g)
        group_keys = torch.empty(b, n_rows, n_groups, dtype=torch.int16, device=q.device)
        tiles = (triton.cdiv(n_rows, BM), triton.cdiv(max_visible, BN), b)
        _group_keys_kernel[tiles](q, w, k, group_keys, *qs, group_keys.stride(0), group_keys.stride(1),
                                  row0, n_rows, n_groups, sq, sk, hi, BM=BM, BN=BN, DI=di, G=g, CAUSAL=causal)
        gb = min(triton.next_power_of_2(n_groups), MAX_GROUP_BLOCK)
        _threshold_kernel[(n_rows, b)](group_keys, tau, group_keys.stride(0), group_keys.stride(1), tau.stride(0),
                                       row0, sq, sk, topk, G=g, GB=gb, ONE_BLOCK=n_groups <= gb, CAUSAL=causal,
                                       num_warps=8 if gb >= 4096 else 4)
        _candidates_kernel[(tiles[0], b)](q, w, k, tau, count, cand_score, cand_index, *qs, tau.stride(0),
                                          cand_score.stride(0), cand_score.stride(1), row0, n_rows, tiles[0], sq, sk,
                                          hi, BM=BM, BN=BN, DI=di, CAP=cap, CAUSAL=causal)
        counts = count[:, :n_rows]
        n_max = int(counts.max()) if counts.numel() else 0  # the chunk's one host sync: K4 reads no more slots than
        # the fullest row filled
        width = max(16, min(cap, triton.next_power_of_2(max(n_max, 1))))
        _exact_select_kernel[(n_rows, b)](cand_score, cand_index, count, out, cand_score.stride(0), cand_score.stride(1),
                                          count.stride(0), out.stride(0), out.stride(1), row0, topk,
                                          CAP=width, KP=triton.next_power_of_2(topk), num_warps=8 if width >= 4096 else 4)
        overflowed = (counts > cap).nonzero() if n_max > cap else counts.new_empty(0, 2)
        if len(overflowed):
            overflowed[:, 1] += row0
            _redo_overflowed(q, w, k, out, overflowed, topk, causal, sk)
        if stats is not None:
            stats["rows"] = stats.get("rows", 0) + b * n_rows
            stats["fallback_rows"] = stats.get("fallback_rows", 0) + len(overflowed)
            stats["candidates_max"] = max(stats.get("candidates_max", 0), n_max)
            stats["candidates_total"] = stats.get("candidates_total", 0) + int(counts.sum())
    return out
