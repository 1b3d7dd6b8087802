"""Top-k attention prefill over the union of a query group's selections (design "P2 group-union").

``topk_attention`` runs one program per query token: every token gathers its own k key/value rows,
so a prefill of Sq tokens reads Sq x k rows per KV head even though neighbouring queries select
mostly the same keys (local windows, sinks, shared topics). Here G consecutive queries form a
group; the group's index lists are merged once into their ascending union U (padded to 64) and a
membership word per union entry (bit g: query g of the group selected it). One program then
covers (group, KV head) with M = G x (H / Hkv) rows (G = 16, four query heads per KV head: 64
rows, a full MMA tile), gathers each union tile of 64 keys once for all M rows, and masks each
row by its membership bit and causality (an index after the row's own position is skipped, since
a selection made by an earlier layer may be reused). Bytes drop from G x k to |U| rows per group;
FLOPs grow from G x k to M x |U| / (H / Hkv) per head, so the union pays off while u = |U| / k is
well below G (random selections give u ~ G and are left to the per-token kernel, see ``dispatch``).

``group_union`` builds the union with sorts in PyTorch; its result can be passed back in
(``union=``) by every layer reusing the same selection (IndexCache). ``union_ratio`` reports u.
The result equals ``topk_attention_reference`` (softmax over each query's own visible indices).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from ._online_softmax import online_softmax_step
from ._runtime import triton_can_run
from .topk import check_topk_inputs, topk_attention, topk_attention_reference

__all__ = ["GroupUnion", "TopkSelection", "group_union", "topk_attention_union", "union_ratio", "sampled_union_ratio",
           "MAX_UNION_RATIO"]

BN = 64  # keys per union tile; the union is padded to a multiple of it
MAX_GROUP = 32  # membership is one int32 word per union entry
# the union kernel pays while u <= this x group: it reads |union| rows per group but scores every row of the group
# against all of them
MAX_UNION_RATIO = 0.5


class GroupUnion(NamedTuple):
    """The merged selections of groups of ``group`` consecutive queries (the last group may be partial).

    union      (B, NG, U) int32: each group's distinct valid indices, ascending, then -1; U a multiple of 64.
    union_len  (B, NG) int32: how many entries of ``union`` are valid.
    membership (B, NG, U) int32: bit g set where query ``group * i + g`` selected ``union[..., i, j]``.
    """

    union: Tensor
    union_len: Tensor
    membership: Tensor
    group: int


class TopkSelection(NamedTuple):
    """A selection with its group union built once: what a selector hands to every layer that reuses it (IndexCache),
    so the union is merged once per Full layer, not once per layer."""

    indices: Tensor
    union: GroupUnion


def _check_group(group: int, limit: int | None = None) -> None:
    if not isinstance(group, int) or group < 1 or group & (group - 1) or (limit and group > limit):
        allowed = f"1, 2, 4, ..., {limit}" if limit else "1, 2, 4, 8, ..."
        raise ValueError(f"group must be a power of two ({allowed}), got {group}")


def _sorted_groups(indices: Tensor, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """Each group's (index, query) pairs sorted by index then query: (value, owner, valid), each (B, NG, group * n).

    Pairs are sorted as one key ``index * group + query``, so duplicates of a pair sit side by side
    and -1 padding (key = int64 max) sorts to the end.
    """
    b, sq, n = indices.shape
    ng = -(-sq // group)
    # int32 keys while index * group fits (any context below 2^31 / 32 tokens): a radix sort of half the passes
    small = int(indices.max()) < (2**31 - 1) // group if indices.numel() else True
    dtype = torch.int32 if small else torch.int64
    idx = F.pad(indices.clamp(min=-1).to(dtype), (0, 0, 0, ng * group - sq), value=-1).view(b, ng, group * n)
    owner = torch.arange(group, device=indices.device, dtype=dtype).repeat_interleave(n)
    big = torch.iinfo(dtype).max
    key = torch.where(idx >= 0, idx * group + owner, big).sort(-1).values
    valid = key != big
    return torch.where(valid, key // group, -1), key % group, valid


def group_union(indices: Tensor, group: int = 16, method: str = "auto") -> GroupUnion:
    """Per group of ``group`` consecutive queries, the ascending union of their indices and who selected what.

    ``indices`` (B, Sq, n), -1 padded; negative entries are padding wherever they sit, and an index
    may appear once per query (the reference would count a repeat twice: rejected). See ``GroupUnion`` for the layout.
    ``method`` "sort": one sort of each group's (index, query) pairs in PyTorch (two device syncs: the largest
    index, which picks 32- or 64-bit keys, and the padded width U). "scatter": Triton kernels that OR each pair's
    query bit into a per-group word per key, then compact the nonzero words in key order (no sort; two syncs: the
    largest index, then the width and the repeat check; keys below ``SCATTER_MAX_KEYS``). "auto": scatter where
    Triton runs and the keys allow it.
    """
    _check_group(group, MAX_GROUP)
    if indices.ndim != 3 or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices must be (B, Sq, n) int32 or int64, got {tuple(indices.shape)} {indices.dtype}")
    if method not in ("auto", "sort", "scatter"):
        raise ValueError(f"method must be 'auto', 'sort' or 'scatter', got {method!r}")
    if method != "sort":
        keys = int(indices.max()) + 1 if indices.numel() else 0
        fits = keys <= SCATTER_MAX_KEYS
        if method == "scatter" and not (fits and triton_can_run(indices)):
            raise ValueError(f"method 'scatter' needs CUDA tensors (or TRITON_INTERPRET=1) and indices below "
                             f"{SCATTER_MAX_KEYS}; got {indices.device} tensors with keys up to {keys - 1}: use 'sort'")
        if fits and triton_can_run(indices) and indices.numel():  # empty input: the sort method's (B, 0, 64) shapes
            return _group_union_scatter(indices, group, keys)
    b, sq, n = indices.shape
    ng = -(-sq // group)
    val, owner, valid = _sorted_groups(indices, group)
    first = torch.ones_like(valid)
    first[..., 1:] = val[..., 1:] != val[..., :-1]  # the first pair of each distinct index
    repeat = valid[..., 1:] & ~first[..., 1:] & (owner[..., 1:] == owner[..., :-1])
    union_len = (first & valid).sum(-1, dtype=torch.int32)
    longest, repeats = torch.stack([union_len.amax() if union_len.numel() else union_len.new_zeros(()),
                                    repeat.any().to(torch.int32)]).tolist()
    if repeats:
        raise ValueError("an index appears twice in one query's list; each query's indices must be distinct")
    width = max(BN, -(-longest // BN) * BN)
    slot = torch.where(valid, first.long().cumsum(-1) - 1, width)  # invalid pairs go to a spare last column
    union = torch.full((b, ng, width + 1), -1, dtype=torch.int32, device=indices.device)
    union.scatter_(-1, slot, val.to(torch.int32))  # every pair of an index writes the same value
    member = torch.zeros((b, ng, width + 1), dtype=torch.int64, device=indices.device)
    member.scatter_add_(-1, slot, torch.where(valid, 1 << owner.long(), 0))  # pairs are distinct, so sum == or
    member = torch.where(member >= 2**31, member - 2**32, member).to(torch.int32)  # bit 31 as int32's sign bit
    return GroupUnion(union[..., :width].contiguous(), union_len, member[..., :width].contiguous(), group)


SCATTER_MAX_KEYS = 1 << 22  # the scatter method's per-group word per key: 16 MB a group at most
_SCATTER_SCRATCH_BYTES = 256 << 20  # groups are taken in chunks whose words fit this


@triton.jit
def _union_scatter_kernel(IDX, WORDS, DUPS, ENDS, s_b, s_q, seq_q, n, keys, groups_done,
                          G: tl.constexpr, BLOCK: tl.constexpr):
    """ORs bit r into WORDS[group, key] for each valid key of query r of each group of the chunk; counts repeats;
    ENDS[group]: one past the group's largest key (causal selections: about the group's position, not the context)."""
    cg, blk = tl.program_id(0).to(tl.int64), tl.program_id(1)
    grp = groups_done + cg  # over (batch, group): batch-major
    ng = (seq_q + G - 1) // G
    b, g = grp // ng, grp % ng
    p = blk * BLOCK + tl.arange(0, BLOCK)  # the (query, slot) pairs of the group
    r, slot = p // n, p % n
    t = g * G + r
    ok = (p < G * n) & (t < seq_q)
    idx = tl.load(IDX + b * s_b + t * s_q + slot, mask=ok, other=-1).to(tl.int64)
    ok = ok & (idx >= 0)
    # relaxed: the compaction after it is ordered by the stream, no fence per atomic is needed
    old = tl.atomic_or(WORDS + cg * keys + tl.where(ok, idx, 0), (1 << r).to(tl.int32), mask=ok, sem="relaxed")
    repeats = tl.sum((ok & (((old >> r) & 1) != 0)).to(tl.int32), 0)
    tl.atomic_add(DUPS, repeats, sem="relaxed")
    tl.atomic_max(ENDS + cg, tl.max(tl.where(ok, idx + 1, 0), 0).to(tl.int32), sem="relaxed")


@triton.jit
def _union_compact_kernel(WORDS, ENDS, UNION, MEMB, ULEN, keys, width, groups_done, BLOCK: tl.constexpr):
    """Writes each group's nonzero words in key order (keys to UNION, words to MEMB) up to its end, their count to
    ULEN, and clears the words and the end for the next chunk."""
    cg = tl.program_id(0).to(tl.int64)
    end = tl.load(ENDS + cg)
    count = 0
    for k0 in range(0, end, BLOCK):
        offs = k0 + tl.arange(0, BLOCK)
        words = tl.load(WORDS + cg * keys + offs, mask=offs < keys, other=0)
        hit = words != 0
        pos = count + tl.cumsum(hit.to(tl.int32), 0) - 1
        tl.store(UNION + cg * width + pos, offs.to(tl.int32), mask=hit)
        tl.store(MEMB + cg * width + pos, words, mask=hit)
        tl.store(WORDS + cg * keys + offs, tl.zeros([BLOCK], tl.int32), mask=hit)
        count += tl.sum(hit.to(tl.int32), 0)
    tl.store(ULEN + groups_done + cg, count)
    tl.store(ENDS + cg, 0)


def _group_union_scatter(indices: Tensor, group: int, keys: int) -> GroupUnion:
    """``group_union`` by the scatter kernels; the same result as the sort method, bit for bit."""
    b, sq, n = indices.shape
    ng = -(-sq // group)
    total, dev = b * ng, indices.device
    idx = indices.contiguous()
    keys = max(keys, 1)
    chunk = max(1, min(total, _SCATTER_SCRATCH_BYTES // (4 * keys)))
    words = torch.zeros(chunk, keys, dtype=torch.int32, device=dev)
    dups = torch.zeros(1, dtype=torch.int32, device=dev)
    ends = torch.zeros(chunk, dtype=torch.int32, device=dev)
    union_len = torch.empty(total, dtype=torch.int32, device=dev)
    width = min(group * n, keys)  # a chunk's union can be no longer
    block = 1024
    parts = []
    for done in range(0, total, chunk):
        c = min(chunk, total - done)
        u = torch.full((c, width), -1, dtype=torch.int32, device=dev)
        m = torch.zeros((c, width), dtype=torch.int32, device=dev)
        _union_scatter_kernel[(c, triton.cdiv(group * n, block))](
            idx, words, dups, ends, idx.stride(0), idx.stride(1), sq, n, keys, done, G=group, BLOCK=block)
        _union_compact_kernel[(c,)](words, ends, u, m, union_len, keys, width, done, BLOCK=block)
        parts.append((u, m))
    longest, repeats = torch.stack([union_len.amax() if total else union_len.new_zeros(()), dups[0]]).tolist()
    if repeats:
        raise ValueError("an index appears twice in one query's list; each query's indices must be distinct")
    out_w = max(BN, -(-longest // BN) * BN)
    union = torch.cat([F.pad(u[:, :out_w], (0, max(0, out_w - u.shape[1])), value=-1) for u, _ in parts])
    member = torch.cat([F.pad(m[:, :out_w], (0, max(0, out_w - m.shape[1]))) for _, m in parts])
    return GroupUnion(union.view(b, ng, out_w), union_len.view(b, ng), member.view(b, ng, out_w), group)


def union_ratio(indices: Tensor, group: int = 16, per_group: bool = False, chunk: int = 1 << 24) -> float | Tensor:
    """u = |union of a group's indices| / n, averaged over groups (``per_group``: the (B, NG) float tensor).

    n = indices.shape[-1] (k). u = 1 when a group's queries chose the same keys, u = group when they
    share none (a partial last group is at most its size). Groups are processed about ``chunk``
    pairs at a time, so dumps of long contexts fit in memory. Any power-of-two group is accepted.
    """
    _check_group(group)
    if indices.ndim != 3:
        raise ValueError(f"indices must be (B, Sq, n), got {tuple(indices.shape)}")
    b, sq, n = indices.shape
    step = max(1, chunk // max(1, b * group * n)) * group  # whole groups per chunk
    sizes = []
    for start in range(0, sq, step):
        val, _, valid = _sorted_groups(indices[:, start:start + step], group)
        first = torch.ones_like(valid)
        first[..., 1:] = val[..., 1:] != val[..., :-1]
        sizes.append((first & valid).sum(-1))
    u = torch.cat(sizes, 1).float() / max(n, 1)
    return u if per_group else float(u.mean()) if u.numel() else 0.0


@triton.jit
def _union_attn_kernel(Q, K, V, O, UNION, MEMB, ULEN, sqb, sqh, sqt, skb, skh, sks, sub, sug, sob, soh, sot,
                       HKV, GQA, seq_q, seq_k, qk_scale,
                       G: tl.constexpr, HP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr):
    """One group of G queries x HP query heads of one KV head (BM >= G * HP rows) over the group's union.

    Row r is query ``r // HP`` of the group and query head ``r % HP`` of this program's heads. Each
    union tile's K/V rows are gathered once and shared by all rows; a row keeps a key when its query
    selected it (membership bit) and it is not after the query's position. PyTorch twin:
    ``topk_attention_reference`` (per query, over its own list).
    """
    grp, bhk, hc = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64), tl.program_id(2)
    b, hk = bhk // HKV, bhk % HKV  # int64: offsets pass 2^31 at long context
    r = tl.arange(0, BM)
    qi = r // HP  # query within the group (the membership bit)
    t = grp * G + qi
    head_local = hc * HP + r % HP
    row_ok = (r < G * HP) & (t < seq_q) & (head_local < GQA)
    heads = hk * GQA + head_local
    dims = tl.arange(0, D)
    q = tl.load(Q + b * sqb + heads[:, None] * sqh + t[:, None] * sqt + dims[None, :], mask=row_ok[:, None], other=0.0)
    pos = t + (seq_k - seq_q)  # each row's query position among the keys (queries are the cache's last Sq)
    m = tl.full([BM], float("-inf"), tl.float32)
    l = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    base = b * sub + grp * sug
    n_u = tl.load(ULEN + b * tl.num_programs(0) + grp)  # visible prefix of the union (trimmed by the wrapper)
    kv = K + b * skb + hk * skh
    vv = V + b * skb + hk * skh
    for n0 in range(0, n_u, BN):
        offs = n0 + tl.arange(0, BN)
        idx = tl.load(UNION + base + offs, mask=offs < n_u, other=-1)
        bits = tl.load(MEMB + base + offs, mask=offs < n_u, other=0)
        col_ok = (idx >= 0) & (idx < seq_k)
        safe = tl.where(col_ok, idx, 0)
        k = tl.load(kv + safe[:, None] * sks + dims[None, :], mask=col_ok[:, None], other=0.0)
        v = tl.load(vv + safe[:, None] * sks + dims[None, :], mask=col_ok[:, None], other=0.0)
        chosen = (((bits[None, :] >> tl.minimum(qi, G - 1)[:, None]) & 1) != 0) & row_ok[:, None]  # padding rows: no shift past 31
        ok = chosen & col_ok[None, :] & (idx[None, :] <= pos[:, None])
        s = tl.where(ok, tl.dot(q, tl.trans(k)) * qk_scale, float("-inf"))
        m, l, acc = online_softmax_step(s, v, m, l, acc)
    out = acc / tl.where(l > 0, l, 1.0)[:, None]  # nothing visible: zeros, as the reference
    o_ptr = O + b * sob + heads[:, None] * soh + t[:, None] * sot + dims[None, :]
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=row_ok[:, None])


def _visible_lengths(u: GroupUnion, sq: int, sk: int) -> Tensor:
    """Per group, how many union entries are not after the group's last query position (a prefix: the union is sorted)."""
    starts = torch.arange(u.union.shape[1], device=u.union.device) * u.group
    last = torch.clamp(starts + u.group, max=sq) - 1 + (sk - sq)
    return ((u.union >= 0) & (u.union <= last[:, None])).sum(-1, dtype=torch.int32)


def sampled_union_ratio(indices: Tensor, group: int = 16, groups: int = 256) -> float:
    """``union_ratio`` over ``groups`` evenly spaced whole groups (all of them when there are fewer): the estimate
    that decides whether a union is worth building (at 128K tokens and k = 2048, building every group's union
    took longer on an H100 than the attention it feeds)."""
    _check_group(group)
    if indices.ndim != 3:
        raise ValueError(f"indices must be (B, Sq, n), got {tuple(indices.shape)}")
    whole = indices.shape[1] // group
    if whole <= groups:
        return union_ratio(indices, group)
    picks = torch.linspace(0, whole - 1, groups).round().long().unique()
    rows = (picks[:, None] * group + torch.arange(group)).flatten().to(indices.device)
    return union_ratio(indices[:, rows], group)


def topk_attention_union(q: Tensor, k: Tensor, v: Tensor, indices: Tensor, group: int = 16, scale: float | None = None,
                         kv_len: int | None = None, union: GroupUnion | None = None, dispatch: str = "auto",
                         max_union_ratio: float = MAX_UNION_RATIO, max_rows: int = 64, check_indices: bool = True,
                         allow_reference: bool = False) -> Tensor:
    """``topk_attention`` computed per group of ``group`` queries over the union of their indices (same contract).

    q (B, H, Sq, D), k and v (B, Hkv, Sk, D), indices (B, Sq, n) int32/int64, -1 padded; the
    queries are the last Sq of ``kv_len`` valid cache entries; indices after a query's position are
    skipped. ``union``: ``group_union(indices, group)`` computed once and reused by later layers.
    ``dispatch``: "union" always runs this kernel, "per_token" runs ``topk_attention``, "auto" runs
    the union kernel while u = |union| / n <= ``max_union_ratio`` x group (it reads |union| rows per
    group instead of group x n, but computes every row against the whole union), else the per-token
    one. ``max_rows`` caps the rows per program (group x query heads): above it the query heads of a
    KV head are split over programs, which gather the same K/V tile (from L2).
    """
    b, h, sq, d = q.shape if q.ndim == 4 else (0, 0, 0, 0)
    sk = check_topk_inputs(q, k, v, indices, kv_len, check_indices)
    _check_group(group, MAX_GROUP)
    if dispatch not in ("auto", "union", "per_token"):
        raise ValueError(f"dispatch must be 'auto', 'union' or 'per_token', got {dispatch!r}")
    if max_rows < 16 or max_rows & (max_rows - 1):
        raise ValueError(f"max_rows must be a power of two >= 16, got {max_rows}")
    scale = 1 / math.sqrt(d) if scale is None else scale
    if not triton_can_run(q):
        if allow_reference:
            return topk_attention_reference(q, k, v, indices, scale, kv_len)
        raise RuntimeError("topk_attention_union runs a Triton kernel and needs CUDA tensors; pass allow_reference=True "
                           "to use the PyTorch reference instead")
    per_token = lambda: topk_attention(q, k, v, indices, scale, kv_len, check_indices=False)  # noqa: E731
    if dispatch == "per_token":
        return per_token()
    if union is None:
        union = group_union(indices, group)
    elif union.group != group or union.union.shape[:2] != (b, -(-sq // group)):
        raise ValueError(f"union was built for group {union.group} and shape {tuple(union.union.shape[:2])}; "
                         f"expected group {group} and (B, NG) = ({b}, {-(-sq // group)})")
    n_vis = _visible_lengths(union, sq, sk)
    n = indices.shape[2]
    if dispatch == "auto" and n and float(n_vis.float().mean()) > max_union_ratio * group * n:
        return per_token()
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    hkv = k.shape[1]
    gqa = h // hkv
    hp = max(1, min(gqa, max_rows // group))  # query heads per program
    bm = max(16, triton.next_power_of_2(group * hp))
    o = torch.empty_like(q)
    u, mem = union.union, union.membership
    grid = (u.shape[1], b * hkv, -(-gqa // hp))
    _union_attn_kernel[grid](
        q, k, v, o, u, mem, n_vis, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        u.stride(0), u.stride(1), o.stride(0), o.stride(1), o.stride(2),
        hkv, gqa, sq, sk, scale * 1.4426950408889634,
        G=group, HP=hp, BM=bm, BN=BN, D=d, num_warps=4 if bm <= 64 else 8, num_stages=2)
    return o
