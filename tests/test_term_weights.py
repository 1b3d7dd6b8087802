"""Learned query-term weights: the fit moves the right entries, held-out queries choose the step, files round-trip."""

import pytest
import torch

from sparsedistill.retrieval.idf import IDFTable
from sparsedistill.retrieval.term_weights import QueryTermWeights, QuerySet, TermWeightFit, fit_term_weights, ndcg_at_10


def _toy(first: int, n_queries: int, vocab: int = 12) -> QuerySet:
    """Query r has tokens 0, 1 and its own token 2 + first + r. Its relevant document holds tokens 1 and its own;
    a distractor holds token 0 at twice the weight and its own: under plain IDF the distractor wins, once
    g_1 > g_0 + log 2 the relevant document does."""
    docs, pos, queries = [], [], []
    for r in range(n_queries):
        own = 2 + first + r
        rel, dis, q = torch.zeros(vocab), torch.zeros(vocab), torch.zeros(vocab)
        rel[1], rel[own], dis[0], dis[own] = 1.0, 1.0, 2.0, 1.0
        q[0], q[1], q[own] = 1.0, 1.0, 1.0
        docs += [rel, dis]
        queries.append(q)
        pos.append([2 * r])
    return QuerySet("toy", torch.stack(docs).to_sparse(), torch.stack(queries), pos)


def test_ndcg_at_10_binary_gains():
    scores = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    pos = torch.tensor([[True, False, False], [True, False, False]])
    want = (1.0 + (1 / torch.log2(torch.tensor(4.0)))) / 2  # rank 1, then rank 3
    assert float(ndcg_at_10(scores, pos)) == pytest.approx(float(want))


def test_fit_raises_the_weight_that_ranks_positives_first():
    fit, dev = _toy(0, 6), _toy(6, 2)  # tokens 2-7 are the fit queries' own, 8-9 the held-out ones', 10-11 unused
    w, hist = fit_term_weights([fit], [dev], "fp", TermWeightFit(steps=60, lr=0.1, l2=1e-4, eval_every=5), progress=False)
    assert hist["dev_ndcg@10_plain_idf"] < 0.7 and hist["dev_ndcg@10_chosen"] == pytest.approx(1.0)
    assert w.log_scale[1] - w.log_scale[0] > torch.log(torch.tensor(2.0))
    assert not w.log_scale[8:].any()  # no fit query has them: no gradient, they stay plain IDF
    assert hist["chosen_step"] > 0 and hist["entries_moved"] == 8


def test_a_fit_that_does_not_help_keeps_plain_idf():
    """Held-out queries that the learned direction hurts: step 0 (plain IDF) stays the choice."""
    fit = _toy(0, 4)
    dev = _toy(4, 2)
    dev.positives = [[1], [3]]  # here the token-0 documents are the relevant ones
    w, hist = fit_term_weights([fit], [dev], "fp", TermWeightFit(steps=20, lr=0.1, l2=0.0, eval_every=5), progress=False)
    assert hist["chosen_step"] == 0 and w.stats()["entries_moved"] == 0


def test_weights_apply_save_load_and_refuse_other_tokenizers(tmp_path):
    g = torch.tensor([0.0, 0.5, -0.25, 0.0])
    w = QueryTermWeights(g, "fp")
    idf = IDFTable(torch.tensor([1.0, 2.0, 3.0, 0.0]), "fp")
    assert torch.allclose(w.apply(idf).weights, idf.weights * g.exp())
    w.save(tmp_path / "qw.json")
    back = QueryTermWeights.load(tmp_path / "qw.json")
    assert torch.equal(back.log_scale, g) and back.fingerprint == "fp"
    assert QueryTermWeights.find(tmp_path) is None  # no query_weights.json there: plain IDF
    with pytest.raises(ValueError, match="different tokenizers"):
        w.apply(IDFTable(torch.ones(4), "other"))
    (tmp_path / "bad.json").write_text('{"vocab": 4}')
    with pytest.raises(ValueError, match="not a query-term weights file"):
        QueryTermWeights.load(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text('{"vocab": 4, "fingerprint": "fp", "log_scale": {"-1": 0.5}}')
    with pytest.raises(ValueError, match="outside the vocabulary"):
        QueryTermWeights.load(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="relevant document"):
        QuerySet("x", torch.zeros(2, 4).to_sparse(), torch.zeros(1, 4), [[]])


def test_teacher_targets_pull_toward_the_teachers_choice():
    """The same toy with a teacher's distribution (0.9 on the relevant document, 0.1 on the distractor) in place of labels."""
    fit, dev = _toy(0, 6), _toy(6, 2)
    for s in (fit, dev):
        n = len(s.positives)
        s.soft = (torch.tensor([[2 * r, 2 * r + 1] for r in range(n)]), torch.tensor([[0.9, 0.1]] * n))
    w, hist = fit_term_weights([fit], [dev], "fp", TermWeightFit(steps=40, lr=0.1, l2=1e-4, eval_every=5), progress=False)
    assert w.log_scale[1] - w.log_scale[0] > torch.log(torch.tensor(2.0))
    assert hist["dev_ndcg@10_chosen"] > hist["dev_ndcg@10_plain_idf"]  # graded gains: the teacher's probabilities
    with pytest.raises(ValueError, match="one row per query"):
        QuerySet("x", fit.docs, fit.queries, fit.positives, (torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3)))
