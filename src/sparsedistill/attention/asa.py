"""ASA, adaptive block-sparse attention (Video-BLADE): choose each query block's key blocks from pooled scores.

Per block, queries and keys are pooled (the mean of the block, or of ``samples`` evenly spaced
tokens as BLADE does); block scores ``softmax(pool(q) pool(k)^T / sqrt(d))`` are sorted and key
blocks are kept until their cumulative mass reaches ``tau``, within [``min_keep``, ``max_keep``]
of the allowed blocks. The diagonal block (where causality allows it) and ``global_blocks``
leading blocks are always kept, so no query row is left empty. Pooling is a Triton kernel with
``pool_reference`` beside it; selection is a sort and a cumulative sum, O(blocks^2), far below
the attention's O(tokens^2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor, nn

from ._runtime import triton_can_run
from .block_mask import SUPPORTED_BLOCKS, BlockMask, causal_blocks

__all__ = ["pool_blocks", "pool_reference", "asa_mask", "ASAConfig", "AdaptiveBlockSparseAttention"]


@triton.jit
def _pool_kernel(X, OUT, sxb, sxs, sob, sos, seq, stride_tokens,
                 BLOCK: tl.constexpr, N: tl.constexpr, D: tl.constexpr):
    blk, bh = tl.program_id(0), tl.program_id(1)
    rows = blk * BLOCK + tl.arange(0, N) * stride_tokens
    dims = tl.arange(0, D)
    ok = rows < seq
    x = tl.load(X + bh * sxb + rows[:, None] * sxs + dims[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    n = tl.maximum(tl.sum(ok.to(tl.float32), 0), 1.0)
    tl.store(OUT + bh * sob + blk * sos + dims, tl.sum(x, 0) / n)


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


def pool_blocks(x: Tensor, block: int, samples: int = 0) -> Tensor:
    """Triton version of ``pool_reference`` (CUDA tensors, or the interpreter)."""
    b, h, s, d = x.shape
    if d < 16 or d & (d - 1):
        raise ValueError(f"the pooling kernel needs a power-of-two head dim >= 16, got {d} (use pool_reference)")
    if samples and (block % samples or samples & (samples - 1)):
        raise ValueError(f"samples must be a power of two dividing the block size {block}, got {samples}")
    n = samples or block
    x = x.contiguous()
    out = torch.empty(b, h, -(-s // block), d, device=x.device, dtype=torch.float32)
    _pool_kernel[(out.shape[2], b * h)](x, out, s * d, d, out.shape[2] * d, d, s, block // n, BLOCK=block, N=n, D=d)
    return out


def asa_mask(q: Tensor, k: Tensor, block: int = 64, tau: float = 0.9, min_keep: float = 0.0, max_keep: float = 1.0,
             global_blocks: int = 0, causal: bool = False, samples: int = 0, use_kernel: bool | None = None) -> BlockMask:
    """The ASA block mask for q (B, H, Sq, D) and k (B, Hkv, Sk, D); GQA keys are shared by their query heads.

    Built without gradients: training recomputes it every step and back-propagates through the
    kept blocks only (the attention kernel's gradient).
    """
    if block not in SUPPORTED_BLOCKS:
        raise ValueError(f"block size {block} is not supported; use one of {SUPPORTED_BLOCKS}")
    if not 0.0 < tau <= 1.0 or not 0.0 <= min_keep <= max_keep <= 1.0:
        raise ValueError(f"need 0 < tau <= 1 and 0 <= min_keep <= max_keep <= 1, got tau={tau}, min_keep={min_keep}, max_keep={max_keep}")
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    if h % hkv:
        raise ValueError(f"query heads {h} must be a multiple of key/value heads {hkv}")
    if use_kernel is None:
        use_kernel = triton_can_run(q)
    pool = pool_blocks if use_kernel else pool_reference
    with torch.no_grad():
        pq = pool(q, block, samples)
        pk = pool(k, block, samples).repeat_interleave(h // hkv, 1)
        nq, nk = pq.shape[2], pk.shape[2]
        allowed = causal_blocks(nq, nk, block, sq, sk, q.device) if causal else torch.ones(nq, nk, dtype=torch.bool, device=q.device)
        scores = (pq @ pk.transpose(-1, -2)) / math.sqrt(d)
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), -1)
        order = probs.argsort(-1, descending=True)
        mass_before = probs.gather(-1, order).cumsum(-1) - probs.gather(-1, order)
        n_allowed = allowed.sum(-1)  # (nq,)
        rank = torch.arange(nk, device=q.device)
        lo = torch.ceil(min_keep * n_allowed).clamp(min=1)
        hi = torch.floor(max_keep * n_allowed).clamp(min=1)
        keep_sorted = ((mass_before < tau) | (rank < lo[:, None])) & (rank < hi[:, None])
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted) & allowed
        # always: the diagonal block (so no row is empty) and the leading global blocks
        offset_blocks = (torch.arange(nq, device=q.device) * block + (sk - sq)).clamp(min=0) // block
        keep[..., torch.arange(nq, device=q.device), offset_blocks.clamp(max=nk - 1)] = True
        if global_blocks:
            keep[..., :global_blocks] |= allowed[:, :global_blocks]
    return BlockMask.from_block_bool(keep, block, sq, sk)


@dataclass
class ASAConfig:
    block: int = 64
    tau: float = 0.9  # cumulative block-score mass to keep
    min_keep: float = 0.0  # share of the allowed key blocks always kept
    max_keep: float = 1.0  # ... and never exceeded (besides the diagonal and global blocks)
    global_blocks: int = 0
    samples: int = 16  # tokens pooled per block (BLADE); 0 = the mean of the whole block
    causal: bool = False


class AdaptiveBlockSparseAttention(nn.Module):
    """ASA in place of ``scaled_dot_product_attention`` on (B, H, S, D) tensors.

    Training: the mask is rebuilt from the current q and k at every call and gradients flow
    through the kept blocks. Inference: ``reuse`` > 1 keeps a mask for that many calls of the same
    shape (e.g. adjacent denoising steps), saving the pooling and selection. ``last_mask`` holds the
    mask of the latest call (for density logging).
    """

    def __init__(self, cfg: ASAConfig | None = None, reuse: int = 1) -> None:
        super().__init__()
        self.cfg, self.reuse = cfg or ASAConfig(), reuse
        self.last_mask: BlockMask | None = None
        self._uses = 0

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        from .block_sparse import block_sparse_attention

        c = self.cfg
        stale = (self.training or self.last_mask is None or self._uses >= self.reuse
                 or (self.last_mask.seq_q, self.last_mask.seq_k) != (q.shape[2], k.shape[2])
                 or tuple(self.last_mask.kv_counts.shape[:2]) != tuple(q.shape[:2]))
        if stale:
            self.last_mask = asa_mask(q, k, c.block, c.tau, c.min_keep, c.max_keep, c.global_blocks, c.causal, c.samples)
            self._uses = 0
        self._uses += 1
        return block_sparse_attention(q, k, v, self.last_mask, causal=c.causal)
