"""The online-softmax step both attention kernels share (FlashAttention-2's running max, sum and output)."""

import triton
import triton.language as tl


@triton.jit
def online_softmax_step(s, v, m, l, acc):
    """Fold one tile of scores ``s`` (log2 units, -inf where hidden) and its values ``v`` into (m, l, acc)."""
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m - m_safe)
    l = l * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l, acc
