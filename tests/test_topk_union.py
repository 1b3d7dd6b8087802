"""Group-union top-k attention (P2) against the per-query PyTorch reference; on the CPU through Triton's interpreter."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined

from sparsedistill.attention import topk_union as tu  # noqa: E402
from sparsedistill.attention.topk import topk_attention, topk_attention_reference  # noqa: E402
from sparsedistill.attention.topk_union import group_union, topk_attention_union, union_ratio  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float32 if DEV == "cpu" else torch.float16
TOL = 1e-4 if DEV == "cpu" else 2e-2


@pytest.fixture
def poisoned(monkeypatch):
    """Outputs the kernel allocates start as NaN, so a row it forgets to write fails the test."""
    empty_like = torch.empty_like
    monkeypatch.setattr(torch, "empty_like", lambda t, **kw: empty_like(t, **kw).fill_(float("nan")))


def _inputs(b, h, hkv, sq, sk, d, g, cache=None):
    q = torch.randn(b, h, sq, d, generator=g).to(DEV, DTYPE)
    k = torch.randn(b, hkv, cache or sk, d, generator=g).to(DEV, DTYPE)
    v = torch.randn(b, hkv, cache or sk, d, generator=g).to(DEV, DTYPE)
    return q, k, v


def _local_indices(b, sq, sk, n, g, window=32, pad=0.1):
    """Distinct indices per query, mostly near its position (some in the future), with -1 padding anywhere."""
    pos = torch.arange(sq) + (sk - sq)
    near = (torch.arange(sk)[None, :] - pos[:, None]).abs() < window
    score = torch.rand(b, sq, sk, generator=g) + 2.0 * near
    idx = score.topk(min(n, sk), -1).indices.to(torch.int32)
    return torch.where(torch.rand(idx.shape, generator=g) < pad, -1, idx)


def _naive_union(indices, group):
    """One group at a time in Python: sorted distinct indices and, per entry, the bits of the queries that chose it."""
    b, sq, _ = indices.shape
    out = []
    for bi in range(b):
        for start in range(0, sq, group):
            lists = [set(row.tolist()) - {-1} for row in indices[bi, start:start + group]]
            union = sorted(set().union(*lists))
            out.append((union, [sum(1 << g for g, s in enumerate(lists) if x in s) for x in union]))
    return out


@pytest.mark.parametrize("group,sq,offset,method", [
    (1, 5, 0, "sort"), (8, 37, 0, "sort"), (16, 16, 0, "sort"), (32, 70, 0, "sort"), (32, 70, 2**26 - 128, "sort"),
    (32, 70, 2**26, "sort"),  # keys just below 2^31 / 32 (int32 sort keys), and past it (int64)
    (1, 5, 0, "scatter"), (8, 37, 0, "scatter"), (16, 16, 0, "scatter"), (32, 70, 0, "scatter"),
    (32, 70, 3000, "scatter")])  # keys past several of the compaction's blocks
def test_group_union_matches_a_naive_per_group_construction(group, sq, offset, method, monkeypatch):
    if method == "scatter":
        monkeypatch.setattr(tu, "_SCATTER_SCRATCH_BYTES", 4 * 200 * 3)  # small chunks of groups: several of them
    g = torch.Generator().manual_seed(group + sq)
    idx = _local_indices(2, sq, 100, 12, g, pad=0.3)
    idx = torch.where(idx >= 0, idx + offset, idx)
    u = group_union(idx.to(DEV), group, method=method)
    ng = -(-sq // group)
    assert u.union.shape == u.membership.shape and u.union.shape[:2] == (2, ng) and u.union.shape[2] % 64 == 0
    assert u.union.dtype == u.membership.dtype == u.union_len.dtype == torch.int32
    union, member, length = u.union.cpu().flatten(0, 1), u.membership.cpu().flatten(0, 1), u.union_len.cpu().flatten()
    for i, (want, bits) in enumerate(_naive_union(idx, group)):
        n = len(want)
        assert int(length[i]) == n and union[i, :n].tolist() == want and (union[i, n:] == -1).all()
        assert [m & 0xFFFFFFFF for m in member[i, :n].tolist()] == bits and (member[i, n:] == 0).all()


def test_union_ratio_is_one_for_shared_selections_and_group_for_disjoint_ones():
    same = torch.arange(8, dtype=torch.int32).expand(1, 32, 8)
    disjoint = torch.arange(32 * 8, dtype=torch.int32).view(1, 32, 8)
    assert union_ratio(same, 16) == 1.0 and union_ratio(disjoint, 16) == 16.0
    assert union_ratio(disjoint, 64) == 32.0  # one partial group of 32 queries; any power of two is accepted
    per = union_ratio(disjoint[:, :24], 16, per_group=True, chunk=1)  # chunks of one group give the same
    assert per.tolist() == [[16.0, 8.0]]
    padded = torch.cat([same[:, :, :4], torch.full((1, 32, 4), -1, dtype=torch.int32)], -1)
    assert union_ratio(padded, 16) == 0.5  # |union| = 4 of k = 8 columns


def test_sampled_union_ratio_estimates_from_whole_groups():
    from sparsedistill.attention.topk_union import sampled_union_ratio

    disjoint = torch.arange(4096 * 8, dtype=torch.int32).view(1, 4096, 8)
    shared = (torch.arange(4096)[:, None] // 16 * 8 + torch.arange(8)).to(torch.int32)[None]  # one key set a group
    assert sampled_union_ratio(disjoint, 16, groups=32) == 16.0 and sampled_union_ratio(shared, 16, groups=32) == 1.0
    # half the groups shared, half disjoint, alternating: the evenly spaced sample sees both kinds
    mixed = torch.where((torch.arange(4096) // 16 % 2 == 0)[None, :, None], shared, disjoint)
    assert sampled_union_ratio(mixed, 16, groups=64) == pytest.approx(union_ratio(mixed, 16), rel=0.1)
    assert sampled_union_ratio(disjoint[:, :40], 16, groups=64) == union_ratio(disjoint[:, :40], 16)  # few: all


# (b, h, hkv, sq, sk, cache, d, group, n, max_rows): GQA 1/4/8/3, D 64/128, groups 8/16/32,
# Sq not a multiple of the group, a KV cache longer than the queries, a preallocated cache past kv_len
CASES = [
    (2, 2, 2, 37, 37, None, 64, 8, 16, 64),
    (1, 8, 2, 40, 90, None, 128, 16, 24, 64),
    (1, 8, 1, 21, 64, None, 64, 16, 20, 64),  # 128 rows: the 8 query heads split over two programs
    (2, 8, 1, 19, 40, 96, 128, 8, 12, 64),
    (1, 2, 1, 40, 60, None, 64, 32, 8, 64),  # membership bit 31 is int32's sign bit
    (1, 6, 2, 20, 30, None, 64, 8, 10, 16),  # GQA 3 in programs of 2 heads: the last one half empty
]


@pytest.mark.parametrize("b,h,hkv,sq,sk,cache,d,group,n,max_rows", CASES)
def test_union_kernel_matches_the_reference(b, h, hkv, sq, sk, cache, d, group, n, max_rows, poisoned):
    g = torch.Generator().manual_seed(sq + sk + d + group)
    q, k, v = _inputs(b, h, hkv, sq, sk, d, g, cache)
    if cache:  # garbage past kv_len must not matter
        k[:, :, sk:], v[:, :, sk:] = 1e4, float("nan")
    idx = _local_indices(b, sq, sk, n, g)
    idx[0, 0] = -1  # the first query sees nothing: zeros
    future = torch.arange(sk - sq + 1, sk, dtype=torch.int32)[:n]
    idx[0, 0, : len(future)] = future  # ... all of its indices are after it
    idx = idx.to(DEV)
    out = topk_attention_union(q, k, v, idx, group=group, kv_len=sk, dispatch="union", max_rows=max_rows)
    ref = topk_attention_reference(q, k, v, idx, kv_len=sk)
    assert torch.isfinite(out).all() and out.shape == ref.shape
    assert (out[0, :, 0] == 0).all()
    assert (out.float() - ref.float()).abs().max() < TOL


def test_a_reused_union_and_the_dispatch(monkeypatch):
    g = torch.Generator().manual_seed(0)
    q, k, v = _inputs(1, 4, 1, 48, 256, 64, g)
    local = _local_indices(1, 48, 256, 8, g, window=4, pad=0).to(DEV)
    ref = topk_attention_reference(q, k, v, local)
    u = group_union(local, 16)
    assert torch.equal(topk_attention_union(q, k, v, local, union=u, dispatch="union"),
                       topk_attention_union(q, k, v, local, dispatch="union"))
    calls = []
    monkeypatch.setattr(tu, "topk_attention", lambda *a, **kw: calls.append(1) or topk_attention(*a, **kw))
    assert (topk_attention_union(q, k, v, local).float() - ref.float()).abs().max() < TOL and not calls  # u small
    rand = torch.stack([torch.randperm(256, generator=g)[:8] for _ in range(48)])[None].int().to(DEV)
    assert union_ratio(rand, 16) > 8  # random selections barely overlap: the per-token kernel is cheaper
    out = topk_attention_union(q, k, v, rand)
    assert calls and (out.float() - topk_attention_reference(q, k, v, rand).float()).abs().max() < TOL
    with pytest.raises(ValueError, match="built for group 16"):
        topk_attention_union(q, k, v, local, group=8, union=u)


def test_bad_input_is_refused_with_what_is_allowed():
    g = torch.Generator().manual_seed(0)
    q, k, v = _inputs(1, 4, 2, 8, 32, 64, g)
    idx = torch.zeros(1, 8, 4, dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError, match=r"power of two \(1, 2, 4, \.\.\., 32\), got 12"):
        topk_attention_union(q, k, v, idx, group=12)
    with pytest.raises(ValueError, match="power of two"):
        group_union(idx, 64)
    with pytest.raises(ValueError, match="use 64 or 128"):
        topk_attention_union(q[..., :32], k[..., :32], v[..., :32], idx)
    with pytest.raises(ValueError, match="H a multiple of Hkv"):
        topk_attention_union(q[:, :3], k, v, idx)
    for bad in (32, -2):
        with pytest.raises(ValueError, match=r"\[-1, 32\)"):
            topk_attention_union(q, k, v, torch.full((1, 8, 4), bad, dtype=torch.int32, device=DEV))
    with pytest.raises(ValueError, match=r"\[-1, 20\)"):
        topk_attention_union(q, k, v, torch.full((1, 8, 4), 25, dtype=torch.int32, device=DEV), kv_len=20)
    with pytest.raises(ValueError, match="appears twice"):
        topk_attention_union(q, k, v, idx)  # zeros: index 0 four times in each list
    with pytest.raises(ValueError, match=r"\(B, Sq, n\)"):
        topk_attention_union(q, k, v, idx[:, :5])
    with pytest.raises(ValueError, match="dispatch must be"):
        topk_attention_union(q, k, v, idx, dispatch="fast")
    with pytest.raises(ValueError, match="method must be"):
        group_union(idx, 16, method="radix")
    with pytest.raises(ValueError, match="indices below"):
        group_union(torch.full((1, 8, 4), tu.SCATTER_MAX_KEYS, dtype=torch.int32, device=DEV), 16, method="scatter")
    for method in ("sort", "scatter"):
        with pytest.raises(ValueError, match="appears twice"):
            group_union(idx, 16, method=method)
    empty = group_union(torch.empty(1, 0, 4, dtype=torch.int32, device=DEV), 16)  # no queries: empty groups, no error
    assert empty.union.shape == (1, 0, 64) and empty.union_len.shape == (1, 0)


@pytest.mark.gpu
def test_realistic_prefill_matches_the_per_token_kernel():
    """Sq 4096, k 512, 16 query heads over 4 KV heads, D 128, bf16, selections with locality (small union)."""
    g = torch.Generator().manual_seed(0)
    b, h, hkv, sq, d, n = 1, 16, 4, 4096, 128, 512
    q = torch.randn(b, h, sq, d, generator=g).to(DEV, torch.bfloat16)
    k = torch.randn(b, hkv, sq, d, generator=g).to(DEV, torch.bfloat16)
    v = torch.randn(b, hkv, sq, d, generator=g).to(DEV, torch.bfloat16)
    pos = torch.arange(sq, device=DEV)
    sinks = torch.arange(64, device=DEV).expand(sq, 64)  # shared by everyone
    window = (pos[:, None] - torch.arange(256, device=DEV)).clamp(min=-1)  # the last 256 positions
    far = (pos[:, None] // 16 * 7 + torch.arange(192, device=DEV) * 13) % sq  # shared within a group of 16
    idx = torch.cat([sinks, window, far], 1).sort(-1).values  # far ones may be in the future: skipped
    idx[:, 1:] = torch.where(idx[:, 1:] == idx[:, :-1], -1, idx[:, 1:])  # each index once per query
    idx = idx.int()[None]
    u = union_ratio(idx, 16)
    print(f"union ratio u = {u:.2f} (G = 16)")
    assert u < 4
    out = topk_attention_union(q, k, v, idx, group=16, dispatch="union")
    want = topk_attention(q, k, v, idx)
    assert (out.float() - want.float()).abs().max() < 2e-2
    tail = topk_attention_reference(q[:, :, -128:], k, v, idx[:, -128:])  # the reference on the last queries
    assert (out[:, :, -128:].float() - tail.float()).abs().max() < 2e-2


@pytest.mark.gpu
def test_scatter_union_equals_the_sorted_one_at_a_real_size():
    """8K queries choosing 2,048 of up to 8K keys (half local, half random): the two builds agree bit for bit."""
    g = torch.Generator().manual_seed(3)
    idx = _local_indices(1, 8192, 8192, 2048, g, window=1024, pad=0.02).cuda()
    for group in (16, 32):
        sort, scatter = group_union(idx, group, method="sort"), group_union(idx, group, method="scatter")
        for name in ("union", "union_len", "membership"):
            assert torch.equal(getattr(sort, name), getattr(scatter, name)), (group, name)
