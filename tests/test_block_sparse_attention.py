"""Block-sparse attention kernels against the PyTorch reference; on the CPU through Triton's interpreter."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined

from sparsedistill.attention import BlockMask, attention_reference, block_sparse_attention  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _random_mask(b, h, sq, sk, block, density, g):
    nq, nk = -(-sq // block), -(-sk // block)
    keep = torch.rand(b, h, nq, nk, generator=g) < density
    return BlockMask.from_block_bool(keep.to(DEV), block, sq, sk)


def _inputs(b, h, hkv, sq, sk, d, dtype, g):
    q = torch.randn(b, h, sq, d, generator=g).to(DEV, dtype)
    k = torch.randn(b, hkv, sk, d, generator=g).to(DEV, dtype)
    v = torch.randn(b, hkv, sk, d, generator=g).to(DEV, dtype)
    return q, k, v


def test_mask_lists_round_trip_and_transpose():
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(2, 3, 5, 7, generator=g) < 0.4
    keep[0, 0, 2] = False  # an empty query block
    m = BlockMask.from_block_bool(keep, 64, 300, 420)
    assert torch.equal(m.to_block_bool(), keep)
    assert int(m.kv_counts[0, 0, 2]) == 0 and (m.kv_indices[0, 0, 2] == -1).all()
    assert torch.equal(m.q_counts, keep.sum(2, dtype=torch.int32))
    assert m.to_dense().shape == (2, 3, 300, 420)
    assert abs(m.density() - keep.float().mean().item()) < 1e-6


def test_mask_errors_name_what_is_supported():
    with pytest.raises(ValueError, match="block size 32"):
        BlockMask.from_block_bool(torch.ones(1, 1, 4, 4, dtype=torch.bool), 32, 128)
    with pytest.raises(ValueError, match=r"\(B, H, 2, 2\)"):
        BlockMask.from_block_bool(torch.ones(1, 1, 3, 2, dtype=torch.bool), 64, 128)
    with pytest.raises(ValueError, match="bool"):
        BlockMask.from_block_bool(torch.ones(1, 1, 2, 2), 64, 128)


# (batch, heads, kv heads, Sq, Sk, head dim, block, density, causal): odd lengths, GQA, both block sizes
CASES = [
    (1, 2, 2, 130, 130, 64, 64, 0.6, False),
    (2, 4, 2, 100, 100, 64, 64, 0.5, True),
    (1, 2, 1, 64, 200, 64, 64, 0.7, True),  # a query chunk at the end of a longer key sequence
    (1, 1, 1, 150, 150, 128, 128, 1.0, False),
]


@pytest.fixture
def poisoned(monkeypatch):
    """Outputs the kernels allocate start as NaN, so a row or gradient they forget to write fails the test."""
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: empty_like(t, **kw).fill_(float("nan")))


@pytest.mark.parametrize("b,h,hkv,sq,sk,d,block,density,causal", CASES)
def test_forward_and_backward_match_the_reference(b, h, hkv, sq, sk, d, block, density, causal, poisoned):
    g = torch.Generator().manual_seed(sq + sk + d)
    dtype = torch.float32 if DEV == "cpu" else torch.float16
    q, k, v = _inputs(b, h, hkv, sq, sk, d, dtype, g)
    mask = _random_mask(b, h, sq, sk, block, density, g)
    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
    out = block_sparse_attention(q, k, v, mask, causal=causal)
    do = torch.randn(out.shape, generator=g).to(DEV, dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    qr, kr, vr = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    ref = attention_reference(qr, kr, vr, mask, causal=causal)
    rq, rk, rv = torch.autograd.grad(ref, (qr, kr, vr), do.float())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for name, a, r in [("out", out, ref), ("dq", dq, rq), ("dk", dk, rk), ("dv", dv, rv)]:
        err = (a.float() - r).abs().max().item()
        assert err <= tol * max(1.0, r.abs().max().item()), f"{name}: max error {err}"


def test_rows_that_see_nothing_give_zeros_and_no_nans(poisoned):
    g = torch.Generator().manual_seed(0)
    q, k, v = _inputs(1, 1, 1, 128, 128, 64, torch.float32 if DEV == "cpu" else torch.float16, g)
    keep = torch.zeros(1, 1, 2, 2, dtype=torch.bool)
    keep[0, 0, 1, 0] = True  # query block 0 keeps nothing
    mask = BlockMask.from_block_bool(keep.to(DEV), 64, 128)
    q.requires_grad_(True)
    out = block_sparse_attention(q, k, v, mask)
    assert torch.isfinite(out).all() and (out[0, 0, :64] == 0).all()
    (grad,) = torch.autograd.grad(out.sum(), q)
    assert torch.isfinite(grad).all() and (grad[0, 0, :64] == 0).all()


def test_single_token():
    g = torch.Generator().manual_seed(0)
    q, k, v = _inputs(1, 2, 1, 1, 1, 64, torch.float32 if DEV == "cpu" else torch.float16, g)
    mask = BlockMask.full(1, 2, 1, block=64, device=DEV)
    out = block_sparse_attention(q, k, v, mask, causal=True)
    assert torch.allclose(out.float(), v.float().expand(1, 2, 1, 64), atol=1e-3)  # softmax over one key is 1


def test_bad_inputs_are_refused():
    g = torch.Generator().manual_seed(0)
    q, k, v = _inputs(1, 2, 2, 64, 64, 32, torch.float32, g)
    mask = BlockMask.full(1, 2, 64, device=DEV)
    with pytest.raises(ValueError, match="head dim 32"):
        block_sparse_attention(q, k, v, mask)
    q, k, v = _inputs(1, 3, 2, 64, 64, 64, torch.float32, g)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        block_sparse_attention(q, k, v, mask)
    q, k, v = _inputs(1, 2, 2, 128, 128, 64, torch.float32, g)
    with pytest.raises(ValueError, match="mask built for 64x64"):
        block_sparse_attention(q, k, v, mask)


@pytest.mark.parametrize("samples", [0, 16])
def test_pooling_kernel_matches_the_reference(samples):
    from sparsedistill.attention import pool_blocks, pool_reference

    x = torch.randn(2, 3, 150, 64).to(DEV)  # a partial last block
    assert torch.allclose(pool_blocks(x, 64, samples), pool_reference(x, 64, samples), atol=1e-5)


def test_asa_keeps_mass_within_bounds_and_never_leaves_a_row_empty():
    from sparsedistill.attention import asa_mask

    g = torch.Generator().manual_seed(0)
    q, k, v = _inputs(1, 4, 2, 640, 640, 64, torch.float32, g)
    q = q * 3  # peaked block scores
    full = asa_mask(q, k, 64, tau=1.0)
    assert full.density() == 1.0
    causal = asa_mask(q, k, 64, tau=1.0, causal=True)
    assert torch.equal(causal.to_block_bool()[0, 0], torch.ones(10, 10, dtype=torch.bool).tril())
    sparse = asa_mask(q, k, 64, tau=0.5, max_keep=0.3, causal=True)
    keep = sparse.to_block_bool()
    assert (sparse.kv_counts >= 1).all() and not keep.triu(1).any()
    assert sparse.density() < causal.density()
    # at most max_keep of the allowed blocks, plus the always-kept diagonal
    allowed = torch.arange(1, 11)
    assert (sparse.kv_counts[0] <= torch.floor(0.3 * allowed).clamp(min=1) + 1).all()
    assert (asa_mask(q, k, 64, tau=0.01, min_keep=0.5).kv_counts >= 5).all()
    assert asa_mask(q, k, 64, tau=0.01, global_blocks=2).to_block_bool()[..., :2].all()
    # the kernel-built mask drives the kernel
    out = block_sparse_attention(q, k, v, sparse, causal=True)
    ref = attention_reference(q, k, v, sparse, causal=True)
    assert torch.allclose(out.float(), ref.float(), atol=1e-3)
