"""Block-sparse attention kernels against the PyTorch reference; on the CPU through Triton's interpreter."""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined

from sparsedistill.attention import BlockMask, attention_reference, block_sparse_attention  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 inputs: the interpreter multiplies in fp32; on a GPU Triton's dot runs in TF32 (about 1e-3 relative)
FP32_DOT_TOL = 1e-3 if DEV == "cpu" else 1e-2


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
    assert torch.equal(causal.to_block_bool()[0, 0].cpu(), torch.ones(10, 10, dtype=torch.bool).tril())
    sparse = asa_mask(q, k, 64, tau=0.5, max_keep=0.3, causal=True)
    keep = sparse.to_block_bool()
    assert (sparse.kv_counts >= 1).all() and not keep.triu(1).any()
    assert sparse.density() < causal.density()
    # at most max_keep of the allowed blocks, plus the always-kept diagonal
    allowed = torch.arange(1, 11)
    assert (sparse.kv_counts[0].cpu() <= torch.floor(0.3 * allowed).clamp(min=1) + 1).all()
    assert (asa_mask(q, k, 64, tau=0.01, min_keep=0.5).kv_counts >= 5).all()
    assert asa_mask(q, k, 64, tau=0.01, global_blocks=2).to_block_bool()[..., :2].all()
    # the kernel-built mask drives the kernel
    out = block_sparse_attention(q, k, v, sparse, causal=True)
    ref = attention_reference(q, k, v, sparse, causal=True)
    assert torch.allclose(out.float(), ref.float(), atol=FP32_DOT_TOL)


def test_indexer_kernel_and_topk_match_the_reference():
    from sparsedistill.attention.topk import indexer_scores, indexer_scores_reference, indexer_topk

    g = torch.Generator().manual_seed(0)
    b, sq, sk, hi, di = 2, 70, 150, 4, 32
    q = torch.randn(b, sq, hi, di, generator=g).to(DEV)
    w = torch.randn(b, sq, hi, generator=g).to(DEV)
    k = torch.randn(b, sk, di, generator=g).to(DEV)
    ref = indexer_scores_reference(q, w, k)
    out = indexer_scores(q, w, k)
    finite = torch.isfinite(ref)
    assert torch.equal(finite, torch.isfinite(out)) and torch.allclose(out[finite], ref[finite], rtol=FP32_DOT_TOL, atol=FP32_DOT_TOL)
    idx = indexer_topk(q, w, k, topk=16, chunk=32)
    ref_idx = indexer_topk(q, w, k, topk=16, use_kernel=False)
    pos = torch.arange(sq) + sk - sq
    assert idx.shape == (b, sq, 16) and ((idx <= pos[None, :, None].to(DEV)) | (idx == -1)).all()
    # the same selected scores (ReLU makes ties at 0, so the indices themselves may differ there)
    picked = lambda i: ref.gather(-1, i.long().clamp(min=0)).masked_fill(i < 0, float("-inf")).sort(-1).values  # noqa: E731
    assert torch.allclose(picked(idx), picked(ref_idx), rtol=FP32_DOT_TOL, atol=FP32_DOT_TOL)
    with pytest.raises(ValueError, match="context length"):
        indexer_topk(q, w, k, topk=200)


def test_indexer_pads_with_minus_one_where_fewer_keys_are_visible():
    from sparsedistill.attention.topk import indexer_topk

    q, w, k = torch.randn(1, 8, 2, 16).to(DEV), torch.rand(1, 8, 2).to(DEV), torch.randn(1, 8, 16).to(DEV)
    idx = indexer_topk(q, w, k, topk=4)
    assert (idx[0, 0, 1:] == -1).all() and idx[0, 0, 0] == 0 and (idx[0, 3:] >= 0).all()


@pytest.mark.parametrize("h,hkv,sq,sk,d", [(4, 1, 33, 33, 64), (4, 2, 1, 300, 128), (2, 2, 40, 100, 64)])
def test_topk_attention_matches_the_reference_for_prefill_and_decode(h, hkv, sq, sk, d, poisoned):
    from sparsedistill.attention.topk import topk_attention, topk_attention_reference

    g = torch.Generator().manual_seed(h + sq + d)
    dtype = torch.float32 if DEV == "cpu" else torch.float16
    q, k, v = _inputs(2, h, hkv, sq, sk, d, dtype, g)
    n = 24
    idx = torch.randint(-1, sk, (2, sq, n), generator=g, dtype=torch.int32)  # some -1, some in the future
    idx = idx.to(DEV)
    out = topk_attention(q, k, v, idx)
    ref = topk_attention_reference(q, k, v, idx)
    assert torch.isfinite(out).all()
    assert (out.float() - ref.float()).abs().max() < (1e-4 if dtype == torch.float32 else 2e-2)


def test_decode_with_a_preallocated_cache_ignores_entries_past_kv_len():
    from sparsedistill.attention.topk import topk_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = _inputs(1, 2, 2, 1, 128, 64, torch.float32, g)
    idx = torch.arange(50, dtype=torch.int32).view(1, 1, 50).to(DEV)
    out = topk_attention(q, k, v, idx, kv_len=50)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 50:] = 1e4  # garbage beyond the valid length must not matter
    v2[:, :, 50:] = float("nan")
    assert torch.allclose(topk_attention(q, k2, v2, idx, kv_len=50), out)


def test_topk_attention_refuses_bad_indices_and_shapes():
    from sparsedistill.attention.topk import topk_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = _inputs(1, 2, 1, 4, 32, 64, torch.float32, g)
    with pytest.raises(ValueError, match=r"\[-1, 32\)"):
        topk_attention(q, k, v, torch.full((1, 4, 8), 32, dtype=torch.int32).to(DEV))
    with pytest.raises(ValueError, match=r"\(B, Sq, n\)"):
        topk_attention(q, k, v, torch.zeros(1, 3, 8, dtype=torch.int32).to(DEV))
    with pytest.raises(ValueError, match="int32 or int64"):
        topk_attention(q, k, v, torch.zeros(1, 4, 8).to(DEV))


def test_asa_module_trains_through_kept_blocks_and_reuses_masks_in_eval():
    from sparsedistill.attention import AdaptiveBlockSparseAttention, ASAConfig

    g = torch.Generator().manual_seed(0)
    q, k, v = _inputs(1, 2, 2, 256, 256, 64, torch.float32, g)
    asa = AdaptiveBlockSparseAttention(ASAConfig(block=64, tau=0.5, max_keep=0.5, samples=16), reuse=3)
    q.requires_grad_(True)
    out = asa(q, k, v)
    (grad,) = torch.autograd.grad(out.square().sum(), q)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0 and asa.last_mask.density() < 1.0
    asa.eval()
    with torch.no_grad():
        asa(q, k, v)
        first = asa.last_mask
        asa(q * 5, k, v)
        assert asa.last_mask is first  # reused
        asa(q, k, v)
        asa(q, k, v)
        assert asa.last_mask is not first  # rebuilt after 3 uses


def test_indexer_chunks_see_every_key_without_causality_and_refuse_more_queries_than_keys():
    from sparsedistill.attention.topk import indexer_topk

    g = torch.Generator().manual_seed(0)
    q, w, k = torch.randn(1, 64, 2, 16, generator=g), torch.rand(1, 64, 2, generator=g), torch.randn(1, 64, 16, generator=g)
    q, w, k = q.to(DEV), w.to(DEV), k.to(DEV)
    assert torch.equal(indexer_topk(q, w, k, 8, causal=False, chunk=16), indexer_topk(q, w, k, 8, causal=False, chunk=64))
    with pytest.raises(ValueError, match="64 queries but only 40 keys"):
        indexer_topk(q, w, k[:, :40], 8)


@pytest.mark.parametrize("block,d", [(128, 64), (128, 128), (64, 64)])
def test_every_forward_tile_candidate_computes_the_same_attention(block, d, poisoned):
    """The forward's tile shape is picked by timing on a GPU: each candidate must be correct, not only the winner."""
    from sparsedistill.attention import block_sparse as bs

    g = torch.Generator().manual_seed(block + d)
    dtype = torch.float32 if DEV == "cpu" else torch.float16
    q, k, v = _inputs(1, 2, 1, 200, 200, d, dtype, g)
    mask = _random_mask(1, 2, 200, 200, block, 0.6, g)
    ref = attention_reference(q.float(), k.float(), v.float(), mask, causal=True)
    tiles = {c[:2] for c in bs._FWD_CANDIDATES[d] if c[0] <= block and c[1] <= block}
    assert len(tiles) >= (2 if block == 128 else 1)
    for bm, bn in sorted(tiles):
        o, lse = torch.empty_like(q), torch.empty(1, 2, 200, device=DEV)
        bs._launch_fwd((bm, bn, 4, 2), q, k, v, o, lse, mask, True, d**-0.5)
        err = (o.float() - ref).abs().max().item()
        assert err < (1e-4 if dtype == torch.float32 else 2e-2), (bm, bn, err)


@pytest.mark.parametrize("splits", [2, 5])
def test_split_decode_merges_to_the_reference(splits, poisoned):
    """Decode cuts the index list over several programs (flash-decoding); pieces with nothing visible weigh 0."""
    from sparsedistill.attention.topk import topk_attention, topk_attention_reference

    g = torch.Generator().manual_seed(splits)
    dtype = torch.float32 if DEV == "cpu" else torch.float16
    q, k, v = _inputs(2, 4, 2, 1, 400, 64, dtype, g)
    idx = torch.randint(0, 400, (2, 1, 300), generator=g, dtype=torch.int32)
    idx[:, :, 64:192] = -1  # the second piece (at least) sees nothing
    idx = idx.to(DEV)
    out = topk_attention(q, k, v, idx, splits=splits)
    ref = topk_attention_reference(q, k, v, idx)
    assert torch.isfinite(out).all() and out.shape == ref.shape
    assert (out.float() - ref.float()).abs().max() < (1e-4 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("block,d", [(128, 64), (128, 128), (64, 128), (64, 64)])
def test_every_backward_tile_candidate_computes_the_same_gradients(block, d, poisoned):
    from sparsedistill.attention import block_sparse as bs

    g = torch.Generator().manual_seed(block * d)
    dtype = torch.float32 if DEV == "cpu" else torch.float16
    q, k, v = _inputs(1, 2, 1, 150, 150, d, dtype, g)
    mask = _random_mask(1, 2, 150, 150, block, 0.7, g)
    do = torch.randn(q.shape, generator=g).to(DEV, dtype)
    scale = d**-0.5
    o, lse = torch.empty_like(q), torch.empty(1, 2, 150, device=DEV)
    bs._launch_fwd(bs._FWD_DEFAULT[d], q, k, v, o, lse, mask, True, scale)
    delta = (do.float() * o.float()).sum(-1)
    qr, kr, vr = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    ref = torch.autograd.grad(attention_reference(qr, kr, vr, mask, causal=True), (qr, kr, vr), do.float())
    tiles = {c[:2] for c in bs._BWD_CANDIDATES[d] if c[0] <= block and c[1] <= block}
    assert len(tiles) >= 2
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for bm, bn in sorted(tiles):
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        bs._launch_dq((bm, bn, 4, 2), q, k, v, do, lse, delta, dq, mask, True, scale)
        bs._launch_dkdv((bm, bn, 4, 2), q, k, v, do, lse, delta, dk, dv, mask, True, scale)
        for name, a, r in [("dq", dq, ref[0]), ("dk", dk, ref[1]), ("dv", dv, ref[2])]:
            err = (a.float() - r).abs().max().item()
            assert err <= tol * max(1.0, r.abs().max().item()), (bm, bn, name, err)


def test_tuner_drops_a_fast_candidate_whose_output_disagrees_with_the_default(monkeypatch):
    import types

    import triton.testing

    from sparsedistill.attention import block_sparse as bs

    out, last = torch.zeros(8), {}
    speed = {(64, 64, 4, 2): 3.0, (32, 64, 4, 2): 1.0, (64, 32, 4, 2): 2.0}  # the fastest computes garbage

    def launch(cfg):
        last["cfg"] = cfg
        out.fill_(99.0 if cfg == (32, 64, 4, 2) else 1.0)

    def fake_bench(fn, **_):
        fn()
        return speed[last["cfg"]]

    monkeypatch.setattr(triton.testing, "do_bench", fake_bench)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(bs, "_chosen", {})
    q = types.SimpleNamespace(is_cuda=True, shape=(1, 1, 8, 64), dtype=torch.float16)  # tuning runs on CUDA inputs only
    with pytest.warns(RuntimeWarning, match=r"tile \(32, 64, 4, 2\) disagrees"):
        bs._run_tuned("bwd_dkdv", q, 64, False, list(speed), (64, 64, 4, 2), launch, (out,))
    assert bs._chosen[("bwd_dkdv", 64, 64, False, torch.float16)] == (64, 32, 4, 2) and (out == 1).all()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sq,block,samples,passes", [(640, 64, 16, 1), (640, 64, 16, 2), (300, 64, 16, 1),
                                                     (300, 64, 16, 2), (512, 128, 32, 1), (256, 64, 0, 2)])
def test_asa_mask_kernel_selects_exactly_what_the_reference_does(causal, sq, block, samples, passes):
    from sparsedistill.attention import asa_mask, asa_mask_reference

    g = torch.Generator().manual_seed(sq + block)
    q, k, _ = _inputs(2, 4, 2, sq, sq, 64, torch.float32, g)
    args = dict(tau=0.6, max_keep=0.5, causal=causal, samples=samples, global_blocks=1)
    mask = asa_mask(q * 3, k, block, passes=passes, **args)
    ref = asa_mask_reference(q * 3, k, block, **args)
    assert torch.equal(mask.to_block_bool(), ref)
    assert mask.q_indices is None  # the transposed lists wait for a backward
    counts = ref.sum(-1)
    assert torch.equal(mask.kv_counts.long(), counts)
    nq, nk = ref.shape[-2:]
    # within the cap (half the allowed blocks) plus the diagonal and the one global block
    allowed = torch.ones(nq, nk, dtype=torch.bool, device=DEV)
    if causal:
        from sparsedistill.attention.block_mask import causal_blocks

        allowed = causal_blocks(nq, nk, block, sq, sq, DEV)
    assert (counts <= torch.floor(0.5 * allowed.sum(-1)).clamp(min=1) + 2).all()
    assert not (ref & ~allowed).any() and ref.any(-1).all()


def test_asa_kernels_read_heads_split_off_a_projection_in_place():
    """A model's q, k, v are (B, S, H, D) projections viewed as (B, H, S, D): same results as contiguous copies."""
    from sparsedistill.attention import asa_attention, asa_mask, pool_blocks, pool_reference

    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 256, 3, 2, 64, generator=g).to(DEV)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # strided views, head dim contiguous
    assert not q.is_contiguous()
    assert torch.allclose(pool_blocks(k, 64), pool_reference(k, 64), atol=1e-5)
    mask = asa_mask(q * 3, k, 64, tau=0.6, max_keep=0.5)
    same = asa_mask((q * 3).contiguous(), k.contiguous(), 64, tau=0.6, max_keep=0.5)
    assert torch.equal(mask.to_block_bool(), same.to_block_bool())
    qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
    qc, kc, vc = (t.contiguous().requires_grad_() for t in (q, k, v))
    out = block_sparse_attention(qs, ks, vs, mask)
    want = block_sparse_attention(qc, kc, vc, mask)
    assert torch.allclose(out, want, atol=1e-5)
    out.square().sum().backward()
    want.square().sum().backward()
    for a, b in ((qs, qc), (ks, kc), (vs, vc)):
        assert torch.allclose(a.grad, b.grad, atol=1e-4)
    ref = asa_attention(q, k, v, mask, pooled_kv=True, reference=True)
    assert torch.allclose(asa_attention(q, k, v, mask, pooled_kv=True), ref, atol=FP32_DOT_TOL)  # TF32 dots on CUDA


def test_asa_block_scores_follow_the_token_softmax_max_pool_definition():
    from sparsedistill.attention.asa import _sample_offsets, asa_block_scores_reference

    offsets = _sample_offsets(64, 16)
    assert len(set(offsets.tolist())) == 16  # distinct, and over a 1 x 8 x 8 tile they reach every row and column
    assert sorted(set((offsets // 8).tolist())) == list(range(8)) and sorted(set((offsets % 8).tolist())) == list(range(8))
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 128, 16, generator=g), torch.randn(1, 1, 128, 16, generator=g)
    scores = asa_block_scores_reference(q, k, 64, samples=16)
    pk = k.view(2, 64, 16).mean(1)  # mean key per block
    for qb in range(2):
        tokens = q[0, 0, qb * 64 + offsets]
        per_token = torch.softmax(tokens @ pk.T / 4.0, -1)
        want = per_token.amax(0)
        assert torch.allclose(scores[0, 0, qb], want / want.sum(), atol=1e-6)


def test_asa_mask_ties_keep_the_best_block_and_tau_one_keeps_all():
    from sparsedistill.attention import asa_mask, asa_mask_reference

    # key blocks 0 and 1 are identical (tied scores), block 2 scores higher: 0.42 / 0.29 / 0.29 of the mass
    d, u = 64, torch.zeros(64)
    u[0] = 1.0
    q = u.expand(1, 1, 192, d).clone()
    k = torch.zeros(1, 1, 192, d)
    k[..., 128:, :] = 3.0 * u  # logit 3 / sqrt(64) = 0.375 above the zero keys
    for fn in (asa_mask_reference, lambda *a, **kw: asa_mask(*a, **kw).to_block_bool()):
        keep = fn(q.to(DEV), k.to(DEV), 64, tau=0.6, samples=16)[0, 0].cpu()
        assert keep[0].tolist() == [True, False, True]  # the best block and one of the tied, not both tied ones
    # tau = 1 keeps every block, even where the running sum reaches 1 in fp32 before the last ones
    g = torch.Generator().manual_seed(0)
    q, k, _ = _inputs(1, 2, 1, 1024, 1024, 64, torch.float32, g)
    assert asa_mask(q * 20, k * 20, 64, tau=1.0).density() == 1.0
    assert asa_mask_reference(q * 20, k * 20, 64, tau=1.0).all()


def test_asa_mask_kept_lists_fit_their_width_when_fp32_rounds_the_cap_up():
    from sparsedistill.attention import asa_mask, asa_mask_reference

    # max_keep * 100 blocks = 28.999... in float64 but 29 in fp32: the list needs its spare place
    g = torch.Generator().manual_seed(0)
    q, k, _ = _inputs(1, 1, 1, 6400, 6400, 64, torch.float32, g)
    mask = asa_mask(q, k, 64, tau=1.0, max_keep=0.29)
    ref = asa_mask_reference(q, k, 64, tau=1.0, max_keep=0.29)
    assert mask.kv_indices.shape[-1] >= int(mask.kv_counts.max())
    assert torch.equal(mask.to_block_bool(), ref) and int(ref.sum(-1).max()) == 30  # 29 + the diagonal


def test_block_sparse_lse_and_its_gradient_match_the_reference():
    g = torch.Generator().manual_seed(0)
    q, k, v = _inputs(1, 2, 1, 192, 192, 64, torch.float32, g)
    mask = _random_mask(1, 2, 192, 192, 64, 0.6, g)
    mask = BlockMask.from_block_bool(mask.to_block_bool() | torch.eye(3, dtype=torch.bool, device=DEV), 64, 192)
    w = torch.randn(1, 2, 192, generator=g).to(DEV)
    grads = []
    for fn in (block_sparse_attention, lambda *a, **kw: attention_reference(*a, **kw)):
        qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))
        o, lse = fn(qq, kk, vv, mask, return_lse=True)
        grads.append((o, lse, *torch.autograd.grad((o.sum(-1) * w).sum() + (lse * w).sum(), (qq, kk, vv))))
    for a, b in zip(*grads):
        assert torch.allclose(a.float(), b.float(), atol=2 * FP32_DOT_TOL), (a - b).abs().max()


def test_pooled_kv_branch_is_attention_over_kept_tokens_and_dropped_block_means():
    from sparsedistill.attention import asa_attention, pooled_kv_attention

    g = torch.Generator().manual_seed(0)
    b, h, hkv, s, d, block = 1, 2, 1, 256, 64, 64
    q, k, v = _inputs(b, h, hkv, s, s, d, torch.float32, g)
    keep = torch.rand(b, h, 4, 4, generator=g) < 0.5
    keep |= torch.eye(4, dtype=torch.bool)
    mask = BlockMask.from_block_bool(keep.to(DEV), block, s)
    # the definition: every query sees its kept blocks' tokens and one key per dropped block
    # (the block's mean key and value, its logit raised by log(block) for the tokens it stands for)
    pk, pv = k.view(b, hkv, 4, block, d).mean(3), v.view(b, hkv, 4, block, d).mean(3)
    kk, vv = torch.cat([k, pk], 2).repeat_interleave(h // hkv, 1), torch.cat([v, pv], 2).repeat_interleave(h // hkv, 1)
    logits = q @ kk.transpose(-1, -2) / math.sqrt(d)
    logits[..., s:] += math.log(block)
    token_keep = mask.to_dense()
    block_dropped = (~keep.to(DEV)).repeat_interleave(block, 2)
    visible = torch.cat([token_keep, block_dropped], -1)
    want = torch.softmax(logits.masked_fill(~visible, float("-inf")), -1) @ vv
    got = asa_attention(q, k, v, mask, pooled_kv=True)
    assert torch.allclose(got, want, atol=FP32_DOT_TOL)
    # nothing dropped: exact attention, and the pooled branch gets no weight (and no NaN)
    full = BlockMask.full(b, h, s, block, device=DEV)
    q.requires_grad_(True)
    out = asa_attention(q, k, v, full, pooled_kv=True)
    assert torch.allclose(out, attention_reference(q, k, v), atol=FP32_DOT_TOL)
    (grad,) = torch.autograd.grad(out.sum(), q)
    assert torch.isfinite(grad).all()
    with pytest.raises(ValueError, match="multiples of the block"):
        pooled_kv_attention(q[:, :, :200], k[:, :, :200], v[:, :, :200], BlockMask.full(b, h, 200, block, device=DEV))


def test_tile_order_makes_each_block_one_spatiotemporal_tile():
    from sparsedistill.attention import from_tile_order, tile_order, to_tile_order

    grid, tile = (4, 8, 8), (2, 4, 8)  # 256 tokens, tiles of 64
    f, y, x = torch.meshgrid(torch.arange(4), torch.arange(8), torch.arange(8), indexing="ij")
    coords = torch.stack([f, y, x], -1).reshape(1, 256, 3)
    tiled = to_tile_order(coords, grid, tile, dim=1)
    for blk in tiled[0].view(4, 64, 3):  # each block spans one 2 x 4 x 8 box
        assert (blk.amax(0) - blk.amin(0)).tolist() == [1, 3, 7]
    assert torch.equal(from_tile_order(tiled, grid, tile, dim=1), coords)
    assert sorted(tile_order(grid, tile).tolist()) == list(range(256))
    with pytest.raises(ValueError, match="rows 8 is not a multiple of 3"):
        tile_order(grid, (1, 3, 8))


@pytest.mark.parametrize("block,hkv", [(64, 2), (128, 1)])
def test_pooled_kv_kernel_matches_the_differentiable_path(block, hkv):
    from sparsedistill.attention import pooled_kv_attention

    g = torch.Generator().manual_seed(block)
    q, k, v = _inputs(1, 2, hkv, 512, 512, 64, torch.float32, g)
    keep = torch.rand(1, 2, 512 // block, 512 // block, generator=g) < 0.4
    keep[..., 0, :] = True  # a query block that dropped nothing: no weight on its pooled part
    mask = BlockMask.from_block_bool(keep.to(DEV), block, 512)
    with torch.no_grad():
        o_kernel, lse_kernel = pooled_kv_attention(q, k, v, mask, use_kernel=True)
    q.requires_grad_(True)
    o_torch, lse_torch = pooled_kv_attention(q, k, v, mask, use_kernel=False)
    with torch.no_grad():  # the automatic choice: the kernel without gradients, PyTorch with them
        assert torch.equal(pooled_kv_attention(q, k, v, mask)[0], o_kernel)
    assert pooled_kv_attention(q, k, v, mask)[0].requires_grad
    assert torch.allclose(o_kernel, o_torch.detach(), atol=FP32_DOT_TOL)
    live = lse_torch.detach() > -1e29
    assert torch.equal(live, lse_kernel > -1e29) and not live[..., :block].any()
    assert torch.allclose(lse_kernel[live], lse_torch.detach()[live], atol=1e-4)
