"""The group-max prefilter top-k (indexer_select): exact against a stable sort of the kernels' own fp32 scores."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined

from sparsedistill.attention import indexer_select, indexer_topk_prefilter, indexer_topk_sorted_reference  # noqa: E402
from sparsedistill.attention.indexer_select import select_topk_sorted  # noqa: E402
from sparsedistill.attention.topk import indexer_scores, indexer_scores_reference, indexer_topk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _integer_inputs(b, sq, sk, hi=2, di=16, seed=0):
    """Small integers: every score is exact in fp32, so the PyTorch reference and the kernels agree bit for bit."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-3, 4, (b, sq, hi, di), generator=g).float()
    w = torch.randint(-2, 4, (b, sq, hi), generator=g).float()
    k = torch.randint(-3, 4, (b, sk, di), generator=g).float()
    return q.to(DEVICE), w.to(DEVICE), k.to(DEVICE)


def _kernel_oracle(q, w, k, topk, causal=True, kv_len=None):
    """The exactness rule on the Triton kernel's own scores (the full matrix, for checking only)."""
    sq = q.shape[1]
    sk = kv_len if kv_len is not None else k.shape[1]
    s = indexer_scores(q, w, k, causal, kv_len)
    n_visible = torch.arange(sq, device=q.device) + (sk - sq + 1) if causal else torch.full((sq,), sk, device=q.device)
    return select_topk_sorted(s, n_visible.expand(q.shape[0], -1), topk)


def test_select_topk_sorted_is_a_stable_descending_sort_then_ascending():
    s = torch.tensor([[1.0, 3.0, 3.0, -0.0, 0.0, 2.0], [5.0, 0.0, -1.0, 7.0, 9.0, 9.0]])
    out = select_topk_sorted(s, torch.tensor([6, 3]), 4)
    assert out.tolist() == [[0, 1, 2, 5], [0, 1, 2, -1]]  # ties to the lower index; the second row sees 3 keys
    assert select_topk_sorted(torch.zeros(1, 5), torch.tensor([5]), 2).tolist() == [[0, 1]]
    assert select_topk_sorted(torch.tensor([[0.0, -0.0, 0.0]]), torch.tensor([3]), 2).tolist() == [[0, 1]]  # -0 == +0


@pytest.mark.parametrize("causal", [True, False])
def test_exact_on_a_cache_with_several_chunks_and_batches(causal):
    # kv_len < cache size, queries at the end of it; chunk 24 gives two chunks, with group sizes 16 and 32 (causal)
    q, w, k = _integer_inputs(2, 40, 320, seed=1)
    stats = {}
    out = indexer_topk_prefilter(q, w, k, 4, causal=causal, kv_len=300, chunk=24, stats=stats)
    ref = indexer_topk_sorted_reference(q, w, k, 4, causal=causal, kv_len=300)
    assert out.dtype == torch.int32 and out.shape == (2, 40, 4)
    assert torch.equal(out, ref)
    assert torch.equal(out, _kernel_oracle(q, w, k, 4, causal, kv_len=300))
    assert stats["rows"] == 80 and stats["candidates_max"] >= 4


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk,candidates", [(None, 16), (70, 256)])
def test_query_tiles_past_the_first_and_overflowing_rows_beside_exact_ones(causal, chunk, candidates):
    """Chunks of more than one query tile (the candidate kernel walks each tile's keys, last tiles first), rows whose
    candidates overflow (all-zero weights: every score ties) beside rows that do not, and the exact select at a width
    below the buffer (candidates 256)."""
    q, w, k = _integer_inputs(2, 140, 170, seed=7)
    w[0, ::3] = 0  # every third query of the first batch: all scores 0, overflow with 16 candidates
    stats = {}
    out = indexer_topk_prefilter(q, w, k, 5, causal=causal, kv_len=160, chunk=chunk, candidates=candidates, stats=stats)
    assert torch.equal(out, _kernel_oracle(q, w, k, 5, causal, kv_len=160))
    assert (stats["fallback_rows"] > 0) == (candidates == 16)


def test_default_chunks_keep_the_buffers_near_a_gibibyte():
    from sparsedistill.attention.indexer_select import _default_chunk, _group_size

    for topk in (256, 2048):  # a small k at 128K: one chunk of every query would be an Sq x Sk int16 matrix (32 GiB)
        cap = 4 * topk
        chunk = _default_chunk(1, 131072, 131072, topk, cap, causal=True)
        assert 64 <= chunk <= 16384 and chunk % 64 == 0
        assert chunk * cap * 8 <= 1 << 30 and chunk * -(-chunk // _group_size(1, topk)) * 2 <= 1 << 30
    assert _default_chunk(4, 131072, 131072, 2048, 8192, causal=True) <= 4096  # the budget covers the batch


def test_rows_with_at_most_k_visible_keys_return_them_all_then_minus_one():
    q, w, k = _integer_inputs(1, 24, 24, seed=2)
    out = indexer_topk_prefilter(q, w, k, 8)
    assert torch.equal(out, indexer_topk_sorted_reference(q, w, k, 8))
    for t in range(8):  # query t sees keys 0..t
        assert out[0, t].tolist() == list(range(t + 1)) + [-1] * (7 - t)
    assert (out[0, 8:] >= 0).all() and (out[0, 8:].diff(dim=-1) > 0).all()  # ascending, no padding


def test_random_float_scores_match_the_kernels_own_scores_without_fallback():
    torch.manual_seed(3)
    q, w = torch.randn(1, 32, 4, 32, device=DEVICE), torch.rand(1, 32, 4, device=DEVICE)
    k = torch.randn(1, 200, 32, device=DEVICE)
    stats = {}
    out = indexer_topk_prefilter(q, w, k, 6, kv_len=180, stats=stats)
    assert torch.equal(out, _kernel_oracle(q, w, k, 6, kv_len=180))
    assert stats["fallback_rows"] == 0  # distinct scores: the prefilter keeps few candidates
    assert stats["candidates_max"] <= 4 * 6


def test_ties_at_the_kth_score_go_to_the_lowest_indices(monkeypatch):
    q = torch.zeros(1, 8, 1, 16, device=DEVICE)
    q[0, :, 0, 0] = torch.arange(1, 9, dtype=torch.float32)  # each row scales the same key order
    k = torch.zeros(1, 64, 16, device=DEVICE)
    k[0, :, 0] = torch.arange(64) % 7  # scores 6 at 6, 13, ..., 62 (nine keys), then 5 at 5, 12, ...
    w = torch.ones(1, 8, 1, device=DEVICE)
    want = sorted(list(range(6, 64, 7)) + [5])
    monkeypatch.setattr(indexer_select, "MAX_GROUP_BLOCK", 16)  # 32 groups: K2 counts them block by block
    stats = {}
    out = indexer_topk_prefilter(q, w, k, 10, causal=False, stats=stats)
    assert out.tolist() == [[want] * 8] and stats["fallback_rows"] == 0  # the tie is broken inside K4


def test_all_zero_and_all_equal_rows_overflow_and_fall_back_exactly():
    q = torch.full((1, 16, 2, 16), -1.0, device=DEVICE)  # ReLU(q . k) = 0 for every key: an untrained indexer's worst case
    w = torch.ones(1, 16, 2, device=DEVICE)
    k = torch.ones(1, 64, 16, device=DEVICE)
    stats = {}
    out = indexer_topk_prefilter(q, w, k, 4, candidates=16, stats=stats)
    assert out.tolist() == [[[0, 1, 2, 3]] * 16]  # all tied: the lowest indices win
    assert stats["fallback_rows"] == 16 and stats["candidates_max"] == 64  # every row sees 49..64 > 16 equal candidates
    q = q.abs()
    stats = {}
    out = indexer_topk_prefilter(q, w, k, 4, causal=True, kv_len=40, candidates=16, stats=stats)
    assert torch.equal(out, indexer_topk_sorted_reference(q, w, k, 4, kv_len=40))
    assert stats["fallback_rows"] == 16  # rows see 25..40 keys, all with score 32


def test_negative_weights_and_signed_zeros():
    q, w, k = _integer_inputs(1, 32, 96, seed=4)
    w = -w.abs()  # scores <= 0; a row whose ReLUs are all zero holds -0.0, which must tie with +0.0
    w[0, ::3] = 0.0
    out = indexer_topk_prefilter(q, w, k, 5, causal=False, candidates=32)
    assert torch.equal(out, indexer_topk_sorted_reference(q, w, k, 5, causal=False))


def test_magnitudes_outside_the_fp16_range():
    torch.manual_seed(5)
    q = torch.randn(1, 24, 2, 16, device=DEVICE) * 2.0 ** torch.randint(-60, 60, (1, 24, 2, 1), device=DEVICE)
    w = torch.randn(1, 24, 2, device=DEVICE)
    k = torch.randn(1, 80, 16, device=DEVICE) * 2.0 ** torch.randint(-30, 30, (1, 80, 1), device=DEVICE)
    out = indexer_topk_prefilter(q, w, k, 5, chunk=16)
    assert torch.equal(out, _kernel_oracle(q, w, k, 5))


def test_indexer_topk_method_switch():
    q, w, k = _integer_inputs(1, 20, 70, seed=6)
    pre = indexer_topk(q, w, k, 6, method="prefilter")
    assert torch.equal(pre, indexer_topk_prefilter(q, w, k, 6))
    assert torch.equal(indexer_topk(q, w, k, 6, method="prefilter", use_kernel=False), pre)
    classic = indexer_topk(q, w, k, 6, use_kernel=False)  # descending score order, ties in no fixed order
    s = indexer_scores_reference(q, w, k)
    assert torch.equal(s.gather(-1, classic.long()).sort(-1).values, s.gather(-1, pre.long()).sort(-1).values)
    with pytest.raises(ValueError, match="'topk' .* or 'prefilter'"):
        indexer_topk(q, w, k, 6, method="radix")
    with pytest.raises(ValueError, match="float32 only"):
        indexer_topk(q, w, k, 6, method="prefilter", score_dtype=torch.bfloat16)


def test_bad_input_is_refused_with_what_is_allowed():
    q, w, k = _integer_inputs(1, 8, 16)
    with pytest.raises(ValueError, match="between 1 and the context length"):
        indexer_topk_prefilter(q, w, k, 17)
    with pytest.raises(ValueError, match="between 1 and the context length"):
        indexer_topk_prefilter(q, w, k, 12, kv_len=10)
    with pytest.raises(ValueError, match="power of two >= 16"):
        indexer_topk_prefilter(q[..., :12], w, k[..., :12], 4)
    with pytest.raises(ValueError, match="shapes do not fit"):
        indexer_topk_prefilter(q, w[:, :4], k, 4)
    with pytest.raises(ValueError, match="between the query count"):
        indexer_topk_prefilter(q, w, k, 4, kv_len=20)
    with pytest.raises(ValueError, match="power of two >= k"):
        indexer_topk_prefilter(q, w, k, 4, candidates=24)


@pytest.mark.gpu
def test_realistic_size_on_the_gpu():
    """Sq = Sk = 8192, 4 indexer heads x 32, k = 2048: exact on the kernel's scores, the reference's set up to rounding."""
    torch.manual_seed(7)
    s, topk = 8192, 2048
    q = torch.randn(1, s, 4, 32, device="cuda", dtype=torch.bfloat16)
    w = torch.rand(1, s, 4, device="cuda") / 2
    k = torch.randn(1, s, 32, device="cuda", dtype=torch.bfloat16)
    stats = {}
    out = indexer_topk_prefilter(q, w, k, topk, chunk=4096, stats=stats)
    assert torch.equal(out, _kernel_oracle(q, w, k, topk))
    assert stats["fallback_rows"] == 0
    ref_scores = indexer_scores_reference(q, w, k)
    ref = select_topk_sorted(ref_scores, torch.arange(1, s + 1, device="cuda")[None], topk)
    picked = torch.zeros_like(ref_scores, dtype=torch.bool).scatter_(-1, out.clamp(min=0).long(), out >= 0)
    wanted = torch.zeros_like(picked).scatter_(-1, ref.clamp(min=0).long(), ref >= 0)
    assert (picked != wanted).sum() <= 2e-4 * picked.sum()  # differences only where fp32 rounding reorders near-ties
    kth = ref_scores.gather(-1, ref.clamp(min=0).long()).min(-1, keepdim=True).values
    assert torch.allclose(ref_scores[picked != wanted], kth.expand_as(ref_scores)[picked != wanted], rtol=1e-3, atol=1e-4)
