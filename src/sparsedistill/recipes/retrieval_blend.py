"""``retrieval blend``: a finished ``retrieval train`` run's documents plus BM25 impacts of their own tokens, one index.

For each trained model of the run (``models/<variant>-s<seed>``) and each support (``retrieval/lexical.py``), the
lexical weight is chosen on the supervised collection's **train** queries (the run's cached document vectors of that
collection), then every evaluated collection is scored again by ``evaluate_collection`` with the blended vectors
(float scores, the served index, one-thread latency against bm25s): nothing is encoded again. Beside them, the
impacts alone (BM25 over the encoder's tokens). Writes ``blend/blend.json``, ``blend.md`` and ``blend.png`` in the run;
each (model, support, collection) result is kept as it finishes, so a cut command resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import time
import tomllib
from pathlib import Path
from typing import Any

import torch

from ..data.beir import load_beir
from ..report import command_line, markdown_table, plt, save_figure
from ..runs import Run, atomic_write_bytes, environment

__all__ = ["DEFAULT_WEIGHTS", "run_retrieval_blend"]

DEFAULT_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)


def _doc_vectors(run_dir: Path, label: str, collection: str, max_length: int, model_dir: Path) -> tuple[list[str], torch.Tensor]:
    """The run's cached vectors of a collection under a trained model, checked against the corpus's documents."""
    from ..retrieval.collection import weights_sha256
    from ..retrieval.evaluation import doc_vectors_file, load_doc_vectors

    f = doc_vectors_file(run_dir, label, collection, max_length, weights_sha256(model_dir))
    if not f.exists():
        raise FileNotFoundError(f"{f} is missing: finish the run's evaluation first (`sparsedistill retrieval train ... "
                                f"--run-dir {run_dir} --resume`), which caches every collection's document vectors")
    ids, docs, _, _ = load_doc_vectors(f)
    return ids, docs


def _collection_path(run_dir: Path, result: dict[str, Any]) -> str:
    sub = run_dir / "eval-data" / result["collection"]  # a subsampled collection (eval.max_queries / max_docs)
    return str(sub) if sub.is_dir() else result["source"]


class _Tokenized:
    """What ``evaluate_collection`` needs of an encoder when the document vectors are given: its tokenizer."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer


def _save(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=1).encode())


def run_retrieval_blend(run_dir: str | Path, weights: tuple[float, ...] = DEFAULT_WEIGHTS,
                        supports: tuple[str, ...] = ("student", "union"), labels: list[str] | None = None,
                        progress: bool = True, command: str = "") -> Path:
    """Blend, choose, evaluate and report (``blend/blend.md``); returns the report's path."""
    from transformers import AutoTokenizer

    from ..retrieval import IDFTable, QueryEncoder
    from ..retrieval.evaluation import EvalSettings, evaluate_collection
    from ..retrieval.lexical import SUPPORTS, blend_documents, choose_lexical_weight, density, lexical_impacts, relevance_matrix
    from ..retrieval.collection import weights_sha256
    from ..retrieval.term_weights import QUERY_WEIGHTS_FILE, QueryTermWeights
    from ..retrieval.train_data import held_out_queries

    run_dir = Path(run_dir)
    if not (run_dir / "config.toml").exists():
        raise FileNotFoundError(f"{run_dir} is not a `retrieval train` run directory (no config.toml)")
    bad = [s for s in supports if s not in SUPPORTS]
    if bad or not supports:
        raise ValueError(f"unknown support {bad or supports}; choose from {SUPPORTS}")
    cfg = tomllib.loads((run_dir / "config.toml").read_text())
    ev, student = cfg.get("eval", {}), cfg.get("student", {})
    max_length = ev.get("max_length") or student.get("max_length", 256)
    supervised = cfg.get("data", {}).get("supervised", "")
    if not supervised:
        raise ValueError(f"{run_dir}: the run has no supervised collection (data.supervised) whose train queries could choose the weight")
    run = Run.open(run_dir)
    evals = [json.loads(f.read_text()) for f in sorted((run_dir / "results").glob("eval-*.json"))]
    trained = list(dict.fromkeys(r["label"] for r in evals if r["label"] != "base"))
    labels = labels or trained
    missing = [lab for lab in labels if lab not in trained]
    if missing or not labels:
        raise ValueError(f"{run_dir}: no finished evaluation of {missing or 'any trained model'}; evaluated: {trained}")
    order = {Path(c).name: i for i, c in enumerate(ev.get("collections", []))}  # the run's order, not the files'
    evals = sorted((r for r in evals if r["label"] in labels), key=lambda r: order.get(r["collection"], len(order)))
    if Path(supervised).name not in {r["collection"] for r in evals}:
        raise ValueError(f"{run_dir}: the run did not evaluate {supervised}, whose train queries choose the weight "
                         "(its cached document vectors are needed); add it to eval.collections and resume the run")
    out_dir = run_dir / "blend"
    (out_dir / "results").mkdir(parents=True, exist_ok=True)
    ecfg = EvalSettings(max_length=max_length, batch_size=ev.get("batch_size", 32), latency_queries=ev.get("latency_queries", 100))
    rows: list[dict[str, Any]] = []
    impacts_of: dict[str, torch.Tensor] = {}
    for label in labels:
        model_dir = run_dir / "models" / label
        tok = AutoTokenizer.from_pretrained(str(model_dir))
        term_weights = QueryTermWeights.find(model_dir, tok)
        qw_file = model_dir / QUERY_WEIGHTS_FILE
        # what a kept choice or evaluation was made from: reused only if all of it is the same
        made_from = {"model": weights_sha256(model_dir), "max_length": max_length,
                     "query_weights": hashlib.sha256(qw_file.read_bytes()).hexdigest()[:16] if qw_file.exists() else ""}
        # the weight, on the supervised collection's train queries, served as the evaluation serves them
        sup = load_beir(supervised, split="train")
        ids, docs = _doc_vectors(run_dir, label, Path(supervised).name, max_length, model_dir)

        def impacts(collection: str, texts: list[str], vocab: int = docs.shape[1]) -> torch.Tensor:
            """A collection's impacts in corpus order (the order of its cached vectors), computed once a command."""
            if collection not in impacts_of:
                impacts_of[collection] = lexical_impacts(texts, tok, vocab)
            return impacts_of[collection]

        texts = [sup.corpus[i] for i in ids]
        idf = IDFTable.from_corpus(texts, tok)
        guard = held_out_queries(ev.get("collections", []))  # a train query with a test query's text never chooses
        qids = [q for q in sup.qrels if q in sup.queries and sup.queries[q] not in guard
                and any(g > 0 for g in sup.qrels[q].values())]
        queries = QueryEncoder(tok, term_weights.apply(idf) if term_weights else idf)([sup.queries[q] for q in qids])
        gains = relevance_matrix(qids, ids, sup.qrels)
        for support in supports:
            choice_file = out_dir / "results" / f"choice-{label}-{support}.json"
            grid = [str(w) for w in sorted(set(float(x) for x in weights))]
            choice = json.loads(choice_file.read_text()) if choice_file.exists() else None
            if choice is None or list(choice["train_ndcg@10"]) != grid or choice.get("made_from") != made_from:
                best, curve = choose_lexical_weight(docs, impacts(Path(supervised).name, texts), queries, gains, weights, support)
                choice = {"label": label, "support": support, "weight": best, "train_queries": len(qids), "made_from": made_from,
                          "train_ndcg@10": {str(w): v for w, v in curve.items()}}
                _save(choice_file, choice)
            for r in (r for r in evals if r["label"] == label):
                f = out_dir / "results" / f"eval-{label}-{support}-{r['collection']}.json"
                kept = json.loads(f.read_text()) if f.exists() else {}
                if kept.get("weight") != choice["weight"] or kept.get("made_from") != made_from:
                    col_ids, col_docs = _doc_vectors(run_dir, label, r["collection"], max_length, model_dir)
                    col = load_beir(_collection_path(run_dir, r))
                    lex = impacts(r["collection"], [col.corpus[i] for i in col_ids])
                    blended = blend_documents(col_docs, lex, choice["weight"], support)
                    res = evaluate_collection(_collection_path(run_dir, r), ecfg, _Tokenized(tok), progress, docs=blended,
                                              term_weights=term_weights)
                    _save(f, {"label": label, "support": support, "weight": choice["weight"], "made_from": made_from, **res,
                              "nnz_student": density(col_docs), "nnz_impacts": density(lex)})
                rows.append(json.loads(f.read_text()))
    for r in {r["collection"]: r for r in evals}.values():  # BM25 over the encoder's tokens: the impacts alone
        f = out_dir / "results" / f"eval-impacts-{r['collection']}.json"
        if not f.exists():
            col = load_beir(_collection_path(run_dir, r))
            lex = impacts(r["collection"], list(col.corpus.values()))
            _save(f, {"label": "impacts", **evaluate_collection(_collection_path(run_dir, r), ecfg, _Tokenized(tok),
                                                                 progress, docs=lex)})
        rows.append(json.loads(f.read_text()))
    return _write_report(run, out_dir, evals, rows, labels, supports, command, max_length)


def _served(r: dict[str, Any]) -> dict[str, Any]:
    """A trained model's figures served with IDF queries (+ its learned weights): a binary-query model's IDF serving."""
    return r.get("ours_idf_queries", r["ours"])


def _write_report(run: Run, out_dir: Path, evals: list[dict[str, Any]], rows: list[dict[str, Any]], labels: list[str],
                  supports: tuple[str, ...], command: str, max_length: int) -> Path:
    cols = list(dict.fromkeys(r["collection"] for r in evals if r["label"] in labels))
    bm25 = {r["collection"]: 100 * r["bm25"]["ndcg@10"] for r in evals if r["label"] in labels}
    table: list[list[str]] = [["BM25 (bm25s)", "", *[f"{bm25[c]:.2f}" for c in cols], ""]]

    bars: dict[str, list[float]] = {"BM25 (bm25s)": [bm25[c] for c in cols]}  # NDCG@10 per collection, for the figure

    def cells(get, name: str) -> list[str]:
        out, diffs = [], []
        bars[name] = [float("nan")] * len(cols)
        for i, c in enumerate(cols):
            got = get(c)
            if got is None:
                out.append("-")
                continue
            ndcg, nnz, served = got
            bars[name][i] = ndcg
            diffs.append(ndcg - bm25[c])
            out.append(f"{ndcg:.2f} ({ndcg - bm25[c]:+.2f}) / {nnz:.0f}" + (f" / {served:.2f}" if served is not None else ""))
        return out + [f"{sum(diffs) / len(diffs):+.2f}" if len(diffs) == len(cols) else ""]

    imp = {r["collection"]: r for r in rows if r["label"] == "impacts"}
    name = "BM25 over the encoder's tokens (the impacts alone)"
    table.append([name, "", *cells(lambda c: (100 * imp[c]["ours"]["ndcg@10"], imp[c]["nnz_per_doc"],
                                              100 * imp[c]["ours_index"]["ndcg@10"]) if c in imp else None, name)])
    choices: dict[tuple[str, str], dict[str, Any]] = {}
    for label in labels:
        ev = {r["collection"]: r for r in evals if r["label"] == label}
        name = f"{label} as trained and served"
        table.append([name, "", *cells(lambda c: (100 * _served(ev[c])["ndcg@10"], ev[c]["nnz_per_doc"], None)
                                       if c in ev else None, name)])
        for support in supports:
            got = {r["collection"]: r for r in rows if r["label"] == label and r.get("support") == support}
            choices[(label, support)] = json.loads((out_dir / "results" / f"choice-{label}-{support}.json").read_text())
            w = choices[(label, support)]["weight"]
            name = f"{label} + impacts on the {'student' if support == 'student' else 'union of both'}'s terms"
            table.append([name, f"{w:g}", *cells(lambda c: (100 * got[c]["ours"]["ndcg@10"], got[c]["nnz_per_doc"],
                                                            100 * got[c]["ours_index"]["ndcg@10"]) if c in got else None, name)])
    lat = [r for r in rows if r["label"] in labels]
    here = {**environment(), "command": command, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    lines = [
        "# Learned documents plus BM25 impacts of their own tokens, in one index",
        "",
        command_line(here),
        "",
        f"Of the run `{run.path}`: {command_line(run.environment())}",
        "",
        "A query is its tokens times IDF (times the model's learned query-term weights where it has them), as the run "
        "serves it; a document is the trained model's vector plus `weight` x BM25's saturated term frequencies of its "
        "own tokens (k1 1.2, b 0.75), on the model's nonzero terms only (no new postings) or on the union (the "
        "document's tokens the model dropped come back). The weight is chosen on the supervised collection's train "
        "queries (NDCG@10, below), never on a test set. Each cell: NDCG@10 (difference to BM25) / nonzeros per "
        "document / the served index's NDCG@10 (uint8 impacts).",
        "",
        markdown_table(["documents", "weight", *cols, "mean diff"], table),
        "",
        "Weight chosen on the train queries (NDCG@10 x 100 at each weight):",
        "",
        markdown_table(["model", "support", "train queries", *[str(w) for w in choices[next(iter(choices))]["train_ndcg@10"]]],
                       [[lab, sup, str(ch["train_queries"]), *[f"{100 * v:.2f}" for v in ch["train_ndcg@10"].values()]]
                        for (lab, sup), ch in choices.items()]),
        "",
        "One-thread query latency, p50 ms (ours / bm25s, same process): "
        + "; ".join(f"{r['label']} {r['support']} {r['collection']} {r['latency_ms']['ours_p50']:.2f} / "
                    f"{r['latency_ms']['bm25_p50']:.2f}" for r in lat),
        "",
        "To serve a row (`--max-length` as the run's evaluation): "
        + "; ".join(f"`sparsedistill retrieval index --collection C --index-dir IX --encoder {run.path / 'models' / lab} "
                    f"--max-length {max_length} --lexical-weight {ch['weight']:g} --lexical-support {sup}`"
                    for (lab, sup), ch in choices.items()),
        "",
        "![blend](blend.png)",
        "",
    ]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(bars)
    for i, (name, ys) in enumerate(bars.items()):
        bx.bar([j + i * width for j in range(len(cols))], ys, width, label=name)
    bx.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))], cols)
    bx.set_ylabel("NDCG@10, test queries")
    lowest = min(v for ys in bars.values() for v in ys if v == v)  # (nan: a collection not evaluated)
    bx.set_ylim(max(0.0, lowest - 5), None)  # differences of a point or two show
    bx.legend(fontsize=7)
    bx.set_title("Test sets (the weight chosen on train queries)")
    for (lab, sup), ch in choices.items():
        xs = [float(w) for w in ch["train_ndcg@10"]]
        ax.plot(xs, [100 * v for v in ch["train_ndcg@10"].values()], marker="o", label=f"{lab}, {sup}")
    ax.set_xlabel("lexical weight")
    ax.set_ylabel("NDCG@10, supervised train queries")
    ax.set_xscale("symlog", linthresh=0.25)
    ax.legend(fontsize=8)
    ax.set_title("Choosing the weight of BM25 impacts")
    save_figure(fig, out_dir / "blend.png")
    _save(out_dir / "blend.json", {"environment": here, "run": str(run.path), "choices": list(choices.values()),
                                   "results": rows})
    report = out_dir / "blend.md"
    atomic_write_bytes(report, "\n".join(lines).encode())
    return report
