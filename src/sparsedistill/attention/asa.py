"""ASA, adaptive block-sparse attention (Video-BLADE): each query block keeps the key blocks its sampled queries favour.

Block scores, as BLADE computes them: ``samples`` query tokens of each query block, spread over it
(``_sample_offsets``), score every key block's mean key; each token's scores go through a softmax over the key blocks,
and the block's score for a key block is the maximum over its tokens (one strongly attending token
is enough to keep a block). Each row of block scores is normalised to sum 1, sorted, and key
blocks are kept until their cumulative mass reaches ``tau``, then clamped to [``min_keep``,
``max_keep``] of the allowed blocks (ties at the threshold go to the lowest block indices; ``tau = 1``
keeps every allowed block). The diagonal block (where causality allows it) and
``global_blocks`` leading blocks are always kept, so no query row is left empty.

Mask building is two Triton kernels: mean-pooling of the keys, then one program per (batch, head,
query block) that scores, selects and writes the kept-block list straight into ``BlockMask``'s
layout; no dense (blocks x blocks) tensor, no sort outside registers, no host sync (so it can
sit in a CUDA graph). ``asa_mask_reference`` beside it is the PyTorch definition the kernels are
tested against.

``pooled_kv``: the blocks a query block drops are not ignored but seen through their mean key and
value, each standing for its ``block`` tokens (a +log(block) logit), merged with the sparse part by
log-sum-exp. BLADE's pooled branch attends to pooled groups of *all* tokens (kept ones counted
twice); here it covers exactly the dropped blocks, so that ``tau = 1`` gives exact attention and
small ``tau`` a coarse, block-level approximation of the rest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor, nn

from ._online_softmax import online_softmax_step
from ._runtime import triton_can_run
from .block_mask import SUPPORTED_BLOCKS, BlockMask, causal_blocks

__all__ = ["pool_blocks", "pool_reference", "asa_mask", "asa_mask_reference", "asa_block_scores_reference",
           "pooled_kv_attention", "merge_by_lse", "asa_attention", "ASAConfig", "AdaptiveBlockSparseAttention"]

_MAX_KEY_BLOCKS = 4096  # the selection sorts one row of key blocks in registers
# pooled-key elements (key blocks x head dim) scored at once in one program's registers. H100, fd827f6: one pass
# beat two at 64 key blocks x D 64 (0.065 vs 0.070 ms, the recipe's shape at batch 16) and lost from 128 blocks on
# (0.025 vs 0.023 ms; at 256 blocks 0.090 vs 0.051), where 4 or 8 warps hold too much at once
_ONE_PASS_MAX = 4096


@triton.jit
def _pool_kernel(X, OUT, sxb, sxh, sxs, sob, soh, sos, H, seq, stride_tokens,
                 BLOCK: tl.constexpr, N: tl.constexpr, D: tl.constexpr):
    blk, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    rows = blk * BLOCK + tl.arange(0, N) * stride_tokens
    dims = tl.arange(0, D)
    ok = rows < seq
    x = tl.load(X + b * sxb + h * sxh + rows[:, None] * sxs + dims[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    n = tl.maximum(tl.sum(ok.to(tl.float32), 0), 1.0)
    tl.store(OUT + b * sob + h * soh + blk * sos + dims, (tl.sum(x, 0) / n).to(OUT.dtype.element_ty))


def pool_reference(x: Tensor, block: int, samples: int = 0) -> Tensor:
    """(B, H, S, D) -> (B, H, ceil(S / block), D) fp32: the mean over each block (or over ``samples`` spaced tokens)."""
    b, h, s, d = x.shape
    nb = -(-s // block)
    pos = torch.arange(nb * block, device=x.device).view(nb, block)
    if samples:
        pos = pos[:, :: block // samples]
    ok = pos < s
    g = x.float()[:, :, pos.clamp(max=s - 1)] * ok[..., None]
    return g.sum(3) / ok.sum(1).clamp(min=1)[:, None].float()


def pool_blocks(x: Tensor, block: int, samples: int = 0, dtype: torch.dtype = torch.float32) -> Tensor:
    """Triton version of ``pool_reference`` (CUDA tensors, or the interpreter), summed in fp32 and stored as
    ``dtype``. ``x`` may be a strided view (e.g. heads split off a (B, S, H, D) projection): no copy is made."""
    b, h, s, d = x.shape
    if d < 16 or d & (d - 1):
        raise ValueError(f"the pooling kernel needs a power-of-two head dim >= 16, got {d} (use pool_reference)")
    if samples and (block % samples or samples & (samples - 1)):
        raise ValueError(f"samples must be a power of two dividing the block size {block}, got {samples}")
    n = samples or block
    if x.stride(3) != 1:
        x = x.contiguous()
    out = torch.empty(b, h, -(-s // block), d, device=x.device, dtype=dtype)
    _pool_kernel[(out.shape[2], b * h)](x, out, x.stride(0), x.stride(1), x.stride(2), out.stride(0), out.stride(1),
                                        out.stride(2), h, s, block // n, BLOCK=block, N=n, D=d)
    return out


@triton.jit
def _allowed_cols(cols, qb, nk, seq_q, seq_k, BLOCK: tl.constexpr, CAUSAL: tl.constexpr):
    ok = cols < nk
    if CAUSAL:  # a key block holding at least one key <= the block's last query (bottom-right aligned)
        last_q = tl.minimum(qb * BLOCK + BLOCK - 1, seq_q - 1)
        ok = ok & (cols * BLOCK <= last_q + (seq_k - seq_q))
    return ok


@triton.jit
def _token_scores(qs, kp_base, sks, c0, qb, nk, seq_q, seq_k, qk_scale,
                  KC: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """Logits (log2 units) of the sampled queries against pooled key blocks c0 .. c0 + KC, -inf where not allowed."""
    cols = c0 + tl.arange(0, KC)
    ok = _allowed_cols(cols, qb, nk, seq_q, seq_k, BLOCK, CAUSAL)
    kp = tl.load(kp_base + cols[:, None] * sks + tl.arange(0, D)[None, :], mask=(cols < nk)[:, None], other=0.0)
    s = tl.dot(qs, tl.trans(kp.to(qs.dtype)), input_precision=PRECISION).to(tl.float32) * qk_scale
    return tl.where(ok[None, :], s, float("-inf")), ok


@triton.jit
def _asa_mask_kernel(Q, KP, SCORE, KV_IDX, KV_CNT,
                     sqb, sqh, sqs, skb, skh, sks,
                     H, GROUP, seq_q, seq_k, nq, nk, width, global_blocks, qk_scale, tau, min_keep, max_keep,
                     BLOCK: tl.constexpr, NS: tl.constexpr, SPREAD: tl.constexpr, D: tl.constexpr, KC: tl.constexpr,
                     NK_PAD: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, ONE_PASS: tl.constexpr):
    """One query block: score its sampled queries against every pooled key block, select, write the kept list.

    ``ONE_PASS`` (every pooled key block fits the registers at once, KC = NK_PAD): the token softmax and the
    block scores stay in registers. Otherwise two passes over KC-block chunks (softmax statistics, then the
    scores, through a scratch row in global memory)."""
    qb, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    hk = h // GROUP
    rows = qb * BLOCK + (tl.arange(0, NS) * SPREAD) % BLOCK  # see _sample_offsets
    row_ok = rows < seq_q
    qs = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqs + tl.arange(0, D)[None, :], mask=row_ok[:, None], other=0.0)
    kp_base = KP + b * skb + hk * skh
    ranks = tl.arange(0, NK_PAD)
    allowed = _allowed_cols(ranks, qb, nk, seq_q, seq_k, BLOCK, CAUSAL)
    if ONE_PASS:
        s, ok = _token_scores(qs, kp_base, sks, 0, qb, nk, seq_q, seq_k, qk_scale, NK_PAD, D, BLOCK, CAUSAL, PRECISION)
        m = tl.max(s, 1)
        e = tl.math.exp2(s - m[:, None])
        p = tl.where(row_ok[:, None] & ok[None, :], e / tl.sum(e, 1)[:, None], 0.0)
        p = tl.max(p, 0)  # the block score is the largest of its tokens' probabilities
    else:
        # pass 1: each sampled token's softmax statistics over the allowed key blocks (log2 units)
        m = tl.full([NS], float("-inf"), tl.float32)
        l = tl.zeros([NS], tl.float32)
        for c0 in range(0, nk, KC):
            s, ok = _token_scores(qs, kp_base, sks, c0, qb, nk, seq_q, seq_k, qk_scale, KC, D, BLOCK, CAUSAL, PRECISION)
            m_new = tl.maximum(m, tl.max(s, 1))
            l = l * tl.math.exp2(m - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), 1)
            m = m_new
        # pass 2: the block score is the largest of its tokens' probabilities
        row_base = SCORE + (bh * nq + qb) * NK_PAD
        for c0 in range(0, nk, KC):
            s, ok = _token_scores(qs, kp_base, sks, c0, qb, nk, seq_q, seq_k, qk_scale, KC, D, BLOCK, CAUSAL, PRECISION)
            p = tl.where(row_ok[:, None] & ok[None, :], tl.math.exp2(s - m[:, None]) / l[:, None], 0.0)
            cols = c0 + tl.arange(0, KC)
            tl.store(row_base + cols, tl.max(p, 0), mask=cols < nk)
        tl.debug_barrier()  # the row written above is read back by other threads of this program
        p = tl.load(row_base + ranks, mask=allowed, other=0.0)
    # selection: keep the largest blocks until their mass reaches tau, within [lo, hi] blocks
    p = p / tl.sum(p, 0)
    n_allowed = tl.sum(allowed.to(tl.int32), 0)
    desc = tl.sort(p, descending=True)
    before = tl.cumsum(desc, 0) - desc
    n_mass = tl.sum(((before < tau) & (ranks < n_allowed)).to(tl.int32), 0)
    n_mass = tl.where(tau >= 1.0, n_allowed, n_mass)  # tau = 1 keeps all (the running sum rounds to 1 early)
    lo = tl.maximum(tl.math.ceil(min_keep * n_allowed.to(tl.float32)).to(tl.int32), 1)
    hi = tl.maximum(tl.math.floor(max_keep * n_allowed.to(tl.float32)).to(tl.int32), 1)
    n_keep = tl.minimum(tl.maximum(n_mass, lo), hi)
    theta = tl.sum(tl.where(ranks == n_keep - 1, desc, 0.0), 0)
    above = allowed & (p > theta)
    tied = allowed & (p == theta)  # ties at the threshold fill the remaining places, lowest block index first
    top = above | (tied & (tl.cumsum(tied.to(tl.int32), 0) <= n_keep - tl.sum(above.to(tl.int32), 0)))
    diag = tl.minimum(tl.maximum(qb * BLOCK + (seq_k - seq_q), 0) // BLOCK, nk - 1)
    keep = top | (ranks == diag) | (allowed & (ranks < global_blocks))
    pos = tl.cumsum(keep.to(tl.int32), 0) - 1
    count = tl.minimum(tl.sum(keep.to(tl.int32), 0), width)  # width has a spare place: never clipped in practice
    out = KV_IDX + (bh * nq + qb) * width
    tl.store(out + pos, ranks, mask=keep & (pos < width))
    tl.store(out + ranks, -1, mask=(ranks >= count) & (ranks < width))
    tl.store(KV_CNT + bh * nq + qb, count)


def _spread(block: int, samples: int) -> int:
    """An odd step near block / golden ratio: (i * step) % block for i < samples are distinct and spread over a tile."""
    if samples == block:
        return 1
    step = round(block * 0.618)
    return step if step % 2 else step + 1


def _sample_offsets(block: int, samples: int) -> Tensor:
    """Positions in a block of the query tokens that are scored. Evenly strided tokens (i * block / samples)
    would hit only columns 0 and 4 of a 1 x 8 x 8 tile; an odd, golden-ratio step spreads them over its
    rows and columns, and stays deterministic (reproducible masks, graph-capturable)."""
    return (torch.arange(samples) * _spread(block, samples)) % block


def _check_asa_args(q: Tensor, k: Tensor, block: int, tau: float, min_keep: float, max_keep: float, samples: int) -> None:
    if block not in SUPPORTED_BLOCKS:
        raise ValueError(f"block size {block} is not supported; use one of {SUPPORTED_BLOCKS}")
    if not 0.0 < tau <= 1.0 or not 0.0 <= min_keep <= max_keep <= 1.0:
        raise ValueError(f"need 0 < tau <= 1 and 0 <= min_keep <= max_keep <= 1, got tau={tau}, min_keep={min_keep}, max_keep={max_keep}")
    if q.ndim != 4 or k.ndim != 4 or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(f"expected q (B, H, Sq, D) and k (B, Hkv, Sk, D) with H a multiple of Hkv, got {tuple(q.shape)}, {tuple(k.shape)}")
    if samples and (samples < 16 or block % samples or samples & (samples - 1)):
        raise ValueError(f"samples must be 0 (every token) or a power of two >= 16 dividing the block size {block}, got {samples}")


def asa_block_scores_reference(q: Tensor, k: Tensor, block: int, samples: int = 16, causal: bool = False) -> Tensor:
    """(B, H, nq, nk) fp32 block scores, each row summing to 1 over its allowed key blocks (the kernel's definition)."""
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    nq, nk = -(-sq // block), -(-sk // block)
    ns = samples or block
    pk = pool_reference(k, block).repeat_interleave(h // hkv, 1)  # (B, H, nk, D)
    rows = torch.arange(nq, device=q.device)[:, None] * block + _sample_offsets(block, ns).to(q.device)
    row_ok = rows < sq
    qs = q.float()[:, :, rows.clamp(max=sq - 1)]  # (B, H, nq, ns, D)
    allowed = causal_blocks(nq, nk, block, sq, sk, q.device) if causal else torch.ones(nq, nk, dtype=torch.bool, device=q.device)
    s = (qs @ pk[:, :, None].transpose(-1, -2)) / math.sqrt(d)  # (B, H, nq, ns, nk)
    p = torch.softmax(s.masked_fill(~allowed[:, None], float("-inf")), -1) * row_ok[..., None]
    score = p.amax(3) * allowed
    return score / score.sum(-1, keepdim=True)


def asa_mask_reference(q: Tensor, k: Tensor, block: int = 64, tau: float = 0.9, min_keep: float = 0.0,
                       max_keep: float = 1.0, global_blocks: int = 0, causal: bool = False, samples: int = 16) -> Tensor:
    """The (B, H, nq, nk) bool block mask the kernel selects, in PyTorch (for tests and CPUs)."""
    _check_asa_args(q, k, block, tau, min_keep, max_keep, samples)
    sq, sk = q.shape[2], k.shape[2]
    nq, nk = -(-sq // block), -(-sk // block)
    with torch.no_grad():
        p = asa_block_scores_reference(q, k, block, samples, causal)
        allowed = causal_blocks(nq, nk, block, sq, sk, q.device) if causal else torch.ones(nq, nk, dtype=torch.bool, device=q.device)
        desc = p.sort(-1, descending=True).values
        before = desc.cumsum(-1) - desc
        n_allowed = allowed.sum(-1)
        rank = torch.arange(nk, device=q.device)
        n_mass = ((before < tau) & (rank < n_allowed[:, None])).sum(-1)
        if tau >= 1.0:
            n_mass = n_allowed.expand_as(n_mass)
        lo = torch.ceil(min_keep * n_allowed.float()).long().clamp(min=1)
        hi = torch.floor(max_keep * n_allowed.float()).long().clamp(min=1)
        n_keep = torch.minimum(torch.maximum(n_mass, lo), hi)
        theta = desc.gather(-1, (n_keep - 1)[..., None])
        above = allowed & (p > theta)
        tied = allowed & (p == theta)
        top = above | (tied & (tied.long().cumsum(-1) <= (n_keep - above.sum(-1))[..., None]))
        diag = ((torch.arange(nq, device=q.device) * block + (sk - sq)).clamp(min=0) // block).clamp(max=nk - 1)
        forced = rank[None, :] == diag[:, None]
        if global_blocks:
            forced |= allowed & (rank[None, :] < global_blocks)
        return top | forced


def asa_mask(q: Tensor, k: Tensor, block: int = 64, tau: float = 0.9, min_keep: float = 0.0, max_keep: float = 1.0,
             global_blocks: int = 0, causal: bool = False, samples: int = 16, use_kernel: bool | None = None,
             passes: int | None = None) -> BlockMask:
    """The ASA block mask for q (B, H, Sq, D) and k (B, Hkv, Sk, D); GQA keys are shared by their query heads.

    ``samples`` query tokens per block are scored (0: all of them). Built without gradients:
    training recomputes it every step and back-propagates through the kept blocks only. q and k may be
    strided views (heads split off a projection) as long as the head dim is contiguous. ``passes``: 1 scores
    every key block at once in registers, 2 in chunks through a scratch row (the same mask, up to the last bit of
    a normalisation in bf16); by default 1 where the pooled keys and the token scores fit (``_ONE_PASS_MAX``).
    """
    _check_asa_args(q, k, block, tau, min_keep, max_keep, samples)
    if use_kernel is None:
        use_kernel = triton_can_run(q)
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    nq, nk = -(-sq // block), -(-sk // block)
    if not use_kernel or d < 16 or d & (d - 1):
        return BlockMask.from_block_bool(asa_mask_reference(q, k, block, tau, min_keep, max_keep, global_blocks, causal, samples),
                                         block, sq, sk)
    if nk > _MAX_KEY_BLOCKS:
        raise ValueError(f"{nk} key blocks exceed the selection kernel's {_MAX_KEY_BLOCKS}; use a larger block")
    nk_pad = max(16, triton.next_power_of_2(nk))
    if passes is None:  # one pass holds the pooled keys and two (samples x key blocks) fp32 tiles in registers
        passes = 1 if nk_pad * d <= _ONE_PASS_MAX and (samples or block) * nk_pad <= _ONE_PASS_MAX // 4 else 2
    if passes not in (1, 2):
        raise ValueError(f"passes must be 1 or 2 (or None to choose), got {passes}")
    # the most a row can keep: the cap, the diagonal, the global blocks, and one spare place because the
    # kernel rounds max_keep * n in fp32 (e.g. 0.29 * 100 -> 29, not 28)
    width = min(nk, max(1, math.floor(max_keep * nk)) + 2 + global_blocks)
    with torch.no_grad():
        if q.stride(3) != 1:
            q = q.contiguous()
        # the kernel rounds the pooled keys to q's dtype before its dot product: store them so (half the reads)
        pk = pool_blocks(k, block, dtype=q.dtype)  # (B, Hkv, nk, D), contiguous
        scratch = torch.empty(b * h * nq * nk_pad if passes == 2 else 1, device=q.device, dtype=torch.float32)
        kv_indices = torch.empty(b, h, nq, width, device=q.device, dtype=torch.int32)
        kv_counts = torch.empty(b, h, nq, device=q.device, dtype=torch.int32)
        _asa_mask_kernel[(nq, b * h)](
            q, pk, scratch, kv_indices, kv_counts,
            q.stride(0), q.stride(1), q.stride(2), pk.stride(0), pk.stride(1), pk.stride(2),
            h, h // hkv, sq, sk, nq, nk, width, global_blocks, 1.4426950408889634 / math.sqrt(d), tau, min_keep, max_keep,
            BLOCK=block, NS=samples or block, SPREAD=_spread(block, samples or block), D=d,
            KC=nk_pad if passes == 1 else 64, NK_PAD=nk_pad, CAUSAL=causal,
            PRECISION="ieee" if q.dtype == torch.float32 else "tf32", ONE_PASS=passes == 1,
            num_warps=8 if passes == 1 and nk_pad * d > 8192 else 4,
        )
    return BlockMask.from_kv_lists(kv_indices, kv_counts, block, sq, sk)


@triton.jit
def _pooled_fwd_kernel(Q, PK, PV, DROP, O, LSE, sqb, sqh, sqs, skb, skh, sks,
                       H, GROUP, seq_q, nq, nk, qk_scale, log2_block,
                       BLOCK: tl.constexpr, BM: tl.constexpr, KC: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr):
    """One BM-row query tile against the mean keys / values of the key blocks its query block dropped."""
    tile, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = bh // H, bh % H
    hk = h // GROUP
    rows = tile * BM + tl.arange(0, BM)
    qb = (tile * BM) // BLOCK
    dims = tl.arange(0, D)
    q = tl.load(Q + b * sqb + h * sqh + rows[:, None] * sqs + dims[None, :])
    m = tl.full([BM], float("-inf"), tl.float32)
    l = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    for c0 in range(0, nk, KC):
        cols = c0 + tl.arange(0, KC)
        ok = cols < nk
        dropped = tl.load(DROP + (bh * nq + qb) * nk + cols, mask=ok, other=0) != 0
        kv_off = b * skb + hk * skh + cols[:, None] * sks + dims[None, :]
        pk = tl.load(PK + kv_off, mask=ok[:, None], other=0.0)
        pv = tl.load(PV + kv_off, mask=ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(pk), input_precision=PRECISION) * qk_scale + log2_block
        s = tl.where(dropped[None, :], s, float("-inf"))
        m, l, acc = online_softmax_step(s, pv, m, l, acc)
    has = l > 0
    out = acc / tl.where(has, l, 1.0)[:, None]
    tl.store(O + b * sqb + h * sqh + rows[:, None] * sqs + dims[None, :], out.to(O.dtype.element_ty))
    lse = tl.where(has, (m + tl.math.log2(tl.where(has, l, 1.0))) * 0.6931471805599453, -1e30)
    tl.store(LSE + bh * seq_q + rows, lse)


def _pooled_kv_kernel(q: Tensor, k: Tensor, v: Tensor, mask: BlockMask, scale: float) -> tuple[Tensor, Tensor]:
    b, h, sq, d = q.shape
    nq, nk = sq // mask.block, k.shape[2] // mask.block
    q = q.contiguous()
    pk, pv = pool_blocks(k, mask.block, dtype=q.dtype), pool_blocks(v, mask.block, dtype=q.dtype)  # (B, Hkv, nk, D)
    dropped = (~mask.to_block_bool()).to(torch.uint8).contiguous()
    out = torch.empty_like(q)
    lse = torch.empty(b, h, sq, device=q.device, dtype=torch.float32)
    _pooled_fwd_kernel[(sq // 64, b * h)](
        q, pk, pv, dropped, out, lse, q.stride(0), q.stride(1), q.stride(2), pk.stride(0), pk.stride(1), pk.stride(2),
        h, h // k.shape[1], sq, nq, nk, scale * 1.4426950408889634, math.log2(mask.block),
        BLOCK=mask.block, BM=64, KC=64, D=d, PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=4)
    return out, lse


def pooled_kv_attention(q: Tensor, k: Tensor, v: Tensor, mask: BlockMask, scale: float | None = None,
                        use_kernel: bool | None = None) -> tuple[Tensor, Tensor]:
    """Attention of every query to the mean key / value of each key block its row of ``mask`` dropped.

    Each pooled key stands for the ``block`` tokens it averages (a +log(block) logit). Returns the
    output (B, H, Sq, D) in q's dtype and its log-sum-exp (B, H, Sq) fp32 (-1e30 where a row dropped
    nothing, so that merging gives it no weight and no NaN gradient);
    differentiable in q, k, v. Without gradients (sampling) a Triton kernel computes it with an
    online softmax over the pooled keys; with them, PyTorch does (memory grows as Sq x key blocks).
    """
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    block = mask.block
    if sk % block or sq % block:
        raise ValueError(f"the pooled-KV branch needs sequence lengths that are multiples of the block {block}, "
                         f"got {sq} queries and {sk} keys (pad, or order tokens in tiles of the block size)")
    scale = 1 / math.sqrt(d) if scale is None else scale
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if use_kernel is None:
        use_kernel = triton_can_run(q) and not needs_grad and d in (64, 128)
    if use_kernel:
        return _pooled_kv_kernel(q, k, v, mask, scale)
    nq, nk = sq // block, sk // block
    pk = k.float().view(b, hkv, nk, block, d).mean(3).repeat_interleave(h // hkv, 1)
    pv = v.float().view(b, hkv, nk, block, d).mean(3).repeat_interleave(h // hkv, 1)
    dropped = ~mask.to_block_bool()  # (B, H, nq, nk)
    s = (q.float().view(b, h, nq, block, d) @ pk[:, :, None].transpose(-1, -2)) * scale + math.log(block)
    s = s.masked_fill(~dropped[:, :, :, None], float("-inf"))  # (B, H, nq, block, nk)
    m = s.amax(-1, keepdim=True).detach()
    m = torch.where(torch.isinf(m), 0.0, m)  # rows that dropped nothing: no NaN, zero weight (below)
    e = torch.exp(s - m)
    total = e.sum(-1).clamp(min=1e-30)
    out = ((e @ pv[:, :, None]) / total[..., None]).view(b, h, sq, d)
    lse = m.squeeze(-1) + torch.log(total)
    lse = torch.where(dropped.any(-1)[..., None], lse, -1e30).view(b, h, sq)  # as the kernel: no weight, no NaN
    return out.to(q.dtype), lse


def merge_by_lse(o1: Tensor, lse1: Tensor, o2: Tensor, lse2: Tensor) -> Tensor:
    """Softmax attention over the union of two disjoint key sets, from each part's output and log-sum-exp."""
    w1 = torch.sigmoid(lse1 - lse2)[..., None]
    return (w1 * o1.float() + (1 - w1) * o2.float()).to(o1.dtype)


def asa_attention(q: Tensor, k: Tensor, v: Tensor, mask: BlockMask, causal: bool = False, pooled_kv: bool = False,
                  reference: bool = False) -> Tensor:
    """Block-sparse attention over ``mask``'s kept blocks, plus (``pooled_kv``) the dropped blocks' means.

    ``reference``: compute with the PyTorch references instead of the Triton kernels (CPU checks;
    O(S^2) memory).
    """
    from .block_sparse import attention_reference, block_sparse_attention

    if pooled_kv and causal:
        raise ValueError("the pooled-KV branch is for non-causal attention (video); pass pooled_kv=False with causal=True")
    sparse = attention_reference if reference else block_sparse_attention
    if not pooled_kv:
        return sparse(q, k, v, mask, causal=causal)
    o1, lse1 = sparse(q, k, v, mask, return_lse=True)
    o2, lse2 = pooled_kv_attention(q, k, v, mask, use_kernel=False if reference else None)
    return merge_by_lse(o1, lse1, o2, lse2)


@dataclass
class ASAConfig:
    block: int = 64
    tau: float = 0.9  # cumulative block-score mass to keep
    min_keep: float = 0.0  # share of the allowed key blocks always kept
    max_keep: float = 1.0  # ... and never exceeded (besides the diagonal and global blocks)
    global_blocks: int = 0
    samples: int = 16  # query tokens scored per block (BLADE: 16-32); 0 = all of them
    causal: bool = False
    pooled_kv: bool = False  # the dropped blocks through their mean key / value (BLADE's pooled branch)


class AdaptiveBlockSparseAttention(nn.Module):
    """ASA in place of ``scaled_dot_product_attention`` on (B, H, S, D) tensors.

    Training: the mask is rebuilt from the current q and k at every call and gradients flow
    through the kept blocks (and the pooled branch). Inference: ``reuse`` > 1 keeps a mask for
    that many calls of the same shape (e.g. adjacent denoising steps), saving its building.
    ``last_mask`` holds the mask of the latest call (for density logging). ``reference``: build the
    mask and attend with the PyTorch references, not the Triton kernels (CPU checks of whole models).
    """

    def __init__(self, cfg: ASAConfig | None = None, reuse: int = 1, reference: bool = False) -> None:
        super().__init__()
        self.cfg, self.reuse, self.reference = cfg or ASAConfig(), reuse, reference
        self.last_mask: BlockMask | None = None
        self._uses = 0

    # Left out of torch.compile's graphs: Inductor fails to rebuild the mask kernel (a subprocess error on the
    # H100, torch 2.11), and the reuse counter is Python state a graph would guard on. The model around it still
    # compiles; under CUDA graphs the break costs nothing at replay.
    @torch.compiler.disable
    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        c = self.cfg
        stale = (self.training or self.last_mask is None or self._uses >= self.reuse
                 or (self.last_mask.seq_q, self.last_mask.seq_k) != (q.shape[2], k.shape[2])
                 or tuple(self.last_mask.kv_counts.shape[:2]) != tuple(q.shape[:2]))
        if stale:
            self.last_mask = asa_mask(q, k, c.block, c.tau, c.min_keep, c.max_keep, c.global_blocks, c.causal, c.samples,
                                      use_kernel=False if self.reference else None)
            self._uses = 0
        self._uses += 1
        return asa_attention(q, k, v, self.last_mask, causal=c.causal, pooled_kv=c.pooled_kv, reference=self.reference)
