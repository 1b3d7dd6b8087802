"""HTTP search service over a ``SparseIndex``: the FastAPI app behind ``sparsedistill retrieval serve``.

``create_app(index_dir)`` opens the index (checking every checksum, so a damaged index refuses to
start and names the file) and returns the app; the CLI only hands it to uvicorn, and tests drive it
in-process with FastAPI's ``TestClient``.

Why it is shaped this way:

- Search is inference-free (tokenizer + IDF lookup + exact top-k), so it needs no model; the SPLADE
  document encoder is loaded on the first ``POST /documents`` only.
- Readers take no lock: each search runs on one immutable index snapshot. Writes (id checks + the
  index write) are serialized by one lock, and a write is acknowledged only after the index's
  manifest is durable, so it is visible to every later search and survives a restart.
- One process per index directory: the index's writer ``flock`` keeps a second writing process out,
  and another process would not see this one's writes without ``SparseIndex.refresh``.

Endpoints: ``GET /health``, ``POST /search``, ``POST /search/batch``, ``POST /documents``,
``DELETE /documents`` (ids in the body), ``DELETE /documents/{id}``, ``GET /documents/{id}``. Every
error is JSON with a human-readable ``"detail"`` string. Text fields (queries, document texts, ids) take
any well-formed Unicode; a lone UTF-16 surrogate gets 422, and a body or URL id that is not UTF-8 gets 400.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Callable
from urllib.parse import unquote_to_bytes

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException as StarletteHTTPException

from .index import IndexLockedError, SparseIndex

__all__ = ["create_app", "ServiceLimits", "SearchService", "MAX_K"]

log = logging.getLogger("sparsedistill.retrieval.service")

MAX_K = 1000
MAX_ID_CHARS = 512

Encoder = Callable[[list[str]], Any]  # texts -> (len(texts), vocab) matrix (torch, numpy or scipy)


class _DocIdConvertor(Convertor[str]):
    """The rest of the URL path, newlines included, for ``/documents/{doc_id:doc_id}``.

    Starlette's ``path`` convertor is ``.*``, which stops at a newline, and its pattern ends in ``$``, which
    also matches just before a final newline: ``/documents/d1%0A`` would name (and delete) ``d1``.
    """

    regex = "(?s:.*)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("doc_id", _DocIdConvertor())  # a named entry in Starlette's registry; no existing one changes


@dataclass(frozen=True)
class ServiceLimits:
    max_query_chars: int = 4096  # longer queries get 413 (the tokenizer would truncate them anyway)
    max_body_bytes: int = 1 << 20  # any request body above this gets 413 before it is parsed
    max_batch_docs: int = 256  # documents per POST /documents
    max_batch_queries: int = 256  # queries per POST /search/batch
    encode_batch_size: int = 16  # documents per encoder call (the MLM's logits are batch x tokens x 30,522)
    max_segments: int = 16  # compact after a write leaves more segments than this (each costs search time)

    def __post_init__(self) -> None:
        bad = [f"{k}={v!r}" for k, v in asdict(self).items() if not (isinstance(v, int) and v >= 1)]
        if bad:
            raise ValueError(f"service limits must be positive integers: {', '.join(bad)}")


# ------------------------------------------------------------------------------------------------
# request and response bodies


def _unicode_problem(text: str) -> str | None:
    """Why ``text`` is not valid Unicode, or None if it is.

    JSON may spell a lone UTF-16 surrogate (``"\\ud800"``), and Python's JSON decoder also lets one
    through from surrogate-encoded bytes (``ED A0 80``), but it is no character: the tokenizer raises
    on it (a 500) and so does anything that writes it as UTF-8. So validation refuses it, with a message.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return (f"contains an unpaired UTF-16 surrogate (U+{ord(text[e.start]):04X} at character {e.start}), which is not "
                "valid Unicode: send well-formed UTF-8 text (in a JSON \\u escape, a high surrogate \\uD800-\\uDBFF "
                "must be followed by a low one \\uDC00-\\uDFFF)")
    return None


def _well_formed(value: Any) -> Any:
    # runs before the str schema: its length check would fail on a surrogate with a message naming no cause
    if isinstance(value, str) and (problem := _unicode_problem(value)):
        raise ValueError(problem)
    return value  # a non-string is left to the strict str check ("Input should be a valid string")


def _non_empty(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty or only whitespace")
    return text


Text = Annotated[str, Field(strict=True), BeforeValidator(_well_formed), AfterValidator(_non_empty)]
DocId = Annotated[str, Field(strict=True, min_length=1, max_length=MAX_ID_CHARS), BeforeValidator(_well_formed),
                  AfterValidator(_non_empty)]
K = Annotated[int, Field(strict=True, ge=1, le=MAX_K, description=f"number of results, 1..{MAX_K}")]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field ("top_k") is an error, not silently ignored

    @model_validator(mode="before")
    @classmethod
    def _well_formed_keys(cls, data: Any) -> Any:
        # a surrogate in a field name would otherwise fail inside pydantic as "body: unable to parse raw data"
        if isinstance(data, dict):
            for key in data:
                if isinstance(key, str) and (problem := _unicode_problem(key)):
                    raise ValueError(f"field name {key!r} {problem}")
        return data


class SearchRequest(_Body):
    query: Text
    k: K = 10


class BatchSearchRequest(_Body):
    queries: Annotated[list[Text], Field(min_length=1)]
    k: K = 10


class Document(_Body):
    id: DocId
    text: Text


class AddRequest(_Body):
    documents: Annotated[list[Document], Field(min_length=1)]


class DeleteRequest(_Body):
    ids: Annotated[list[DocId], Field(min_length=1)]


class Hit(BaseModel):
    id: str
    score: float


class SearchResponse(BaseModel):
    results: list[Hit]
    took_ms: float


class BatchSearchResponse(BaseModel):
    results: list[list[Hit]]
    took_ms: float


class ServiceError(Exception):
    """An error with its HTTP status, a readable detail, and optional extra JSON fields."""

    def __init__(self, status: int, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.status, self.detail, self.extra = status, detail, extra


def _first_more(ids: list[str]) -> str:
    return f"{ids[0]!r}" + (f" (and {len(ids) - 1} more)" if len(ids) > 1 else "")


# ------------------------------------------------------------------------------------------------
# the service state


class SearchService:
    """The index, the query side, the lazily loaded document encoder, and the write lock."""

    def __init__(self, index_dir: str | Path, encoder: Encoder | str | Path | None = None,
                 query_encoder: Encoder | None = None, limits: ServiceLimits = ServiceLimits(), verify: bool = True) -> None:
        self.index_dir, self.limits = Path(index_dir), limits
        self.index = SparseIndex.open(self.index_dir, verify=verify)  # IndexCorruptError names the damaged file
        self._encoder_spec = encoder
        self._doc_encoder: Encoder | None = encoder if callable(encoder) else None
        try:
            self.query_encoder = query_encoder or self._default_query_encoder()
        except BaseException:
            self.index.close()
            raise
        self._write_lock = threading.Lock()  # id checks + index writes, one request at a time
        self._encode_lock = threading.Lock()  # one encoder load / forward at a time (it uses every core anyway)
        # HF fast tokenizers can raise "Already borrowed" when two threads call one instance at once
        self._query_lock = threading.Lock()

    # model side ----------------------------------------------------------------------------------
    def _tokenizer_path(self) -> Path:
        from .encoders import splade_tiny_path

        candidates = []
        if isinstance(self._encoder_spec, (str, Path)):
            candidates.append(Path(self._encoder_spec))
        if self.index.metadata.get("encoder"):
            candidates.append(Path(self.index.metadata["encoder"]))
        for c in candidates:
            if c.is_dir():
                return c
        return splade_tiny_path()  # the index's tokenizer fingerprint is checked against whatever this gives

    def _default_query_encoder(self) -> Encoder:
        from .collection import query_encoder_for

        return query_encoder_for(self.index, self.index_dir, self._tokenizer_path())

    def _load_doc_encoder(self) -> Encoder:
        if self._doc_encoder is not None:
            return self._doc_encoder
        with self._encode_lock:
            if self._doc_encoder is None:
                from .encoders import SparseDocEncoder

                path = Path(self._encoder_spec) if self._encoder_spec else None
                if path is None and self.index.metadata.get("encoder") and Path(self.index.metadata["encoder"]).is_dir():
                    path = Path(self.index.metadata["encoder"])
                t = time.perf_counter()
                try:
                    enc = SparseDocEncoder(path, max_length=int(self.index.metadata.get("max_length", 256))).eval()
                    self.index.check_tokenizer(enc.tokenizer)
                except (OSError, ValueError) as e:
                    raise ServiceError(503, f"the document encoder could not be loaded ({e}); searches still work") from e
                log.info("document encoder %s loaded in %.1f s", path or "SPLADE-tiny", time.perf_counter() - t)
                self._doc_encoder = enc
        return self._doc_encoder

    @property
    def encoder_loaded(self) -> bool:
        return self._doc_encoder is not None

    def encode_queries(self, texts: list[str]) -> Any:
        with self._query_lock:
            return self.query_encoder(texts)

    def encode_documents(self, texts: list[str]):
        """A scipy CSR matrix of document vectors, encoded in batches of ``encode_batch_size``."""
        import scipy.sparse as sp
        import torch

        enc = self._load_doc_encoder()
        parts = []
        b = self.limits.encode_batch_size
        with self._encode_lock, torch.no_grad():
            for s in range(0, len(texts), b):
                out = enc(texts[s:s + b])
                if isinstance(out, torch.Tensor):
                    out = out.detach().cpu().float()
                    out = out.to_dense() if out.layout != torch.strided else out
                    out = out.numpy()
                parts.append(sp.csr_matrix(out))
        return sp.vstack(parts, format="csr")

    # index side ----------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        # stats() stats the files of one snapshot; a write finishing meanwhile may remove them
        for _ in range(3):
            try:
                return self.index.stats()
            except FileNotFoundError:
                continue
        with self._write_lock:
            return self.index.stats()

    def missing(self, ids: list[str]) -> list[str]:
        return [d for d in ids if d not in self.index]

    def add(self, docs: list[Document]) -> dict[str, Any]:
        ids = [d.id for d in docs]
        if len(ids) > self.limits.max_batch_docs:
            raise ServiceError(413, f"{len(ids)} documents in one request; this service takes at most "
                                    f"{self.limits.max_batch_docs} (max_batch_docs): split the batch")
        seen: set[str] = set()
        repeated = [d for d in ids if d in seen or seen.add(d)]
        if repeated:
            raise ServiceError(422, f"document id {_first_more(repeated)} appears more than once in this request; "
                                    "ids must be unique", duplicates=sorted(set(repeated)))
        if self.index.metadata.get("lexical"):
            raise ServiceError(409, "this index holds documents blended with BM25 impacts (retrieval index --lexical-weight), "
                                    "which this service does not compute for new documents: rebuild the index with the "
                                    "new documents in its collection instead")
        self._check_new(ids)  # fail fast, before the encoder runs
        t = time.perf_counter()
        vectors = self.encode_documents([d.text for d in docs])
        encode_ms = (time.perf_counter() - t) * 1e3
        t = time.perf_counter()
        with self._write_lock:
            self._check_new(ids)  # authoritative: another request may have added one of them while we encoded
            self.index.add(ids, vectors)
            compacted = self._maybe_compact()
        return {"added": len(ids), "docs": len(self.index), "encode_ms": encode_ms,
                "index_ms": (time.perf_counter() - t) * 1e3, "compacted": compacted}

    def _check_new(self, ids: list[str]) -> None:
        existing = [d for d in ids if d in self.index]
        if existing:
            raise ServiceError(409, f"document id {_first_more(existing)} is already in the index; "
                                    "delete it first to replace it (nothing was added)", conflicts=existing)

    def delete(self, ids: list[str]) -> dict[str, Any]:
        ids = list(dict.fromkeys(ids))
        t = time.perf_counter()
        with self._write_lock:
            unknown = self.missing(ids)
            if unknown:
                raise ServiceError(404, f"document id {_first_more(unknown)} is not in the index; nothing was deleted",
                                   missing=unknown)
            n = self.index.delete(ids)
            compacted = self._maybe_compact()
        return {"deleted": n, "docs": len(self.index), "index_ms": (time.perf_counter() - t) * 1e3, "compacted": compacted}

    def _maybe_compact(self) -> bool:
        """Merge segments once there are too many (each add makes one; each costs a pass per search)."""
        segments = self.index.stats()["segments"]
        if segments <= self.limits.max_segments:
            return False
        t = time.perf_counter()
        self.index.compact()
        log.info("compacted %d segments into one in %.0f ms", segments, (time.perf_counter() - t) * 1e3)
        return True

    def close(self) -> None:
        self.index.close()


# ------------------------------------------------------------------------------------------------
# middleware and error handlers


def _json_response(status: int, detail: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"detail": detail, **extra}, status_code=status)


class BodySizeLimit:
    """Answer 413 to any request body over ``max_bytes``, declared (Content-Length) or streamed (chunked).

    The body is read here (it is at most ``max_bytes``) and replayed to the app, so the app never
    parses an oversized one.
    """

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self, size: str) -> JSONResponse:
        return _json_response(413, f"request body is {size} bytes; this service accepts at most {self.max_bytes} "
                                   "(max_body_bytes)")

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await _json_response(400, f"invalid Content-Length header {length.decode(errors='replace')!r}")(
                    scope, receive, send)
            if declared > self.max_bytes:
                return await self._too_large(str(declared))(scope, receive, send)
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            total += len(chunks[-1])
            if total > self.max_bytes:
                return await self._too_large(f"more than {self.max_bytes}")(scope, receive, send)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _printable(x: Any) -> str:
    """``str(x)`` with any lone surrogate escaped, so that echoing client input can never fail the UTF-8 response."""
    return str(x).encode("utf-8", "backslashreplace").decode("utf-8")


def _validation_detail(errors: list[dict]) -> tuple[str, list[dict]]:
    parts, clean = [], []
    for e in errors:
        loc = ".".join(_printable(x) for x in e.get("loc", ()) if x != "body") or "body"
        if e.get("type") == "json_invalid":
            msg = f"the request body is not valid JSON ({e.get('ctx', {}).get('error', e.get('msg'))})"
            loc = "body"
        elif e.get("type") == "missing" and loc == "body":
            msg = "a JSON request body is required"
        elif e.get("type") == "model_attributes_type" and loc == "body":
            msg = "the request body must be a JSON object, sent with Content-Type: application/json"
        else:
            msg = f"{loc}: {_printable(e.get('msg')).removeprefix('Value error, ')}"
        parts.append(msg)
        clean.append({"loc": [_printable(x) for x in e.get("loc", ())], "msg": _printable(e.get("msg")),
                      "type": str(e.get("type"))})
    return "; ".join(dict.fromkeys(parts)), clean


def _unreadable_body_detail(cause: BaseException) -> str:
    """What is wrong with a JSON body that could not even be decoded (FastAPI only says "error parsing the body")."""
    if isinstance(cause, UnicodeDecodeError):
        return (f"the request body is not valid UTF-8 (byte 0x{cause.object[cause.start]:02X} at offset {cause.start}: "
                f"{cause.reason}); send the JSON encoded as UTF-8")
    if isinstance(cause, RecursionError):
        return "the request body's JSON is nested too deeply to parse; send a JSON object shaped as documented"
    # e.g. an integer over Python's 4300-digit limit; its advice to call sys.set_int_max_str_digits is for the server
    reason = _printable(cause).split("; use sys.")[0]
    return f"the request body could not be parsed as JSON ({reason}); send a JSON object encoded as UTF-8"


def _install_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail, errors = _validation_detail(list(exc.errors()))
        return _json_response(422, detail, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # FastAPI answers 400 "There was an error parsing the body" for a body json.loads raised on other than
        # JSONDecodeError (invalid UTF-8, nesting past the recursion limit, an over-long integer): say which
        if exc.status_code == 400 and isinstance(exc.__cause__, (ValueError, RecursionError)):
            return _json_response(400, _unreadable_body_detail(exc.__cause__))
        return await http_exception_handler(request, exc)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return _json_response(exc.status, exc.detail, **exc.extra)

    @app.exception_handler(IndexLockedError)
    async def _locked(request: Request, exc: IndexLockedError) -> JSONResponse:
        return _json_response(503, f"{exc}; this service cannot write until that process stops")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _json_response(500, f"internal error: {type(exc).__name__}: {exc}")


# ------------------------------------------------------------------------------------------------
# the app


def create_app(index_dir: str | Path, encoder: Encoder | str | Path | None = None, query_encoder: Encoder | None = None,
               *, verify: bool = True, **limits: Any) -> FastAPI:
    """The search service over the index in ``index_dir`` (raises at once if the index is missing or damaged).

    ``encoder``: the document encoder for ``POST /documents``: a callable ``texts -> (n, vocab)``
    matrix, or a model folder for ``SparseDocEncoder``; by default the encoder the index was built with
    (its metadata), else SPLADE-tiny. Loaded on the first add. ``query_encoder``: a callable
    ``texts -> (n, vocab)``; by default IDF lookup with the index's ``idf.json`` and its encoder's
    tokenizer. ``limits``: fields of ``ServiceLimits``.
    """
    service = SearchService(index_dir, encoder, query_encoder, ServiceLimits(**limits), verify=verify)
    lim = service.limits

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.close()  # releases the index's writer lock, so a restarted service can write

    app = FastAPI(title="sparsedistill retrieval", version="1", lifespan=lifespan,
                  description="Inference-free learned sparse retrieval over an on-disk SparseIndex.")
    app.state.service = service
    app.add_middleware(BodySizeLimit, max_bytes=lim.max_body_bytes)
    _install_handlers(app)

    def check_query(q: str, where: str = "query") -> None:
        if len(q) > lim.max_query_chars:
            raise ServiceError(413, f"{where} is {len(q)} characters; this service takes at most {lim.max_query_chars} "
                                    "(max_query_chars)")

    def path_id(request: Request, doc_id: str) -> str:
        # Starlette percent-decodes the path with errors="replace": "%FF" would silently become U+FFFD and could
        # name a different document (one whose id has a real U+FFFD), so refuse an id that is not UTF-8
        raw = request.scope.get("raw_path")
        if raw is not None:
            try:
                unquote_to_bytes(raw).decode("utf-8")
            except UnicodeDecodeError as e:
                raise ServiceError(400, "the document id in the URL is not valid UTF-8 once percent-decoded "
                                        f"(byte 0x{e.object[e.start]:02X}: {e.reason}); percent-encode the UTF-8 bytes "
                                        "of the id") from e
        return doc_id

    def hits(pairs: list[tuple[str, float]]) -> list[dict[str, Any]]:
        return [{"id": d, "score": s} for d, s in pairs]

    @app.get("/health")
    def health() -> dict[str, Any]:
        st = service.stats()
        return {"status": "ok", "docs": st["docs"], "index": st, "index_dir": str(service.index_dir),
                "tokenizer_fingerprint": service.index.tokenizer_fingerprint, "metadata": service.index.metadata,
                "document_encoder_loaded": service.encoder_loaded, "limits": asdict(lim)}

    # Plain `def` endpoints run in the threadpool: a slow search or an encoder call never blocks the event loop.
    @app.post("/search", response_model=SearchResponse)
    def search(req: SearchRequest) -> dict[str, Any]:
        check_query(req.query)
        t = time.perf_counter()
        result = service.index.search(service.encode_queries([req.query]), k=req.k)
        return {"results": hits(result), "took_ms": (time.perf_counter() - t) * 1e3}

    @app.post("/search/batch", response_model=BatchSearchResponse)
    def search_batch(req: BatchSearchRequest) -> dict[str, Any]:
        if len(req.queries) > lim.max_batch_queries:
            raise ServiceError(413, f"{len(req.queries)} queries in one request; this service takes at most "
                                    f"{lim.max_batch_queries} (max_batch_queries)")
        for i, q in enumerate(req.queries):
            check_query(q, f"queries.{i}")
        t = time.perf_counter()
        results = service.index.search_batch(service.encode_queries(req.queries), k=req.k)
        return {"results": [hits(r) for r in results], "took_ms": (time.perf_counter() - t) * 1e3}

    @app.post("/documents", status_code=201)
    def add_documents(req: AddRequest) -> dict[str, Any]:
        return service.add(req.documents)

    @app.delete("/documents")
    def delete_documents(req: DeleteRequest) -> dict[str, Any]:
        return service.delete(req.ids)

    # `:doc_id` (the rest of the path) so that ids containing "/" or a newline work (URL-encode reserved characters)
    @app.delete("/documents/{doc_id:doc_id}")
    def delete_document(doc_id: str, request: Request) -> dict[str, Any]:
        return service.delete([path_id(request, doc_id)])

    @app.get("/documents/{doc_id:doc_id}")
    def get_document(doc_id: str, request: Request) -> dict[str, Any]:
        doc_id = path_id(request, doc_id)
        if doc_id not in service.index:
            raise ServiceError(404, f"document id {doc_id!r} is not in the index")
        return {"id": doc_id, "exists": True}

    return app

