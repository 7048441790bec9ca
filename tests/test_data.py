import pytest
import torch

from shrinklib import data
from shrinklib.data import Corpus, CorpusNotFoundError, Document, load_corpus, sample_windows
from shrinklib.models import load_model


@pytest.fixture(scope="module")
def corpus():
    return load_corpus("pydoc")


@pytest.fixture(scope="module")
def tok():
    return load_model()[1]


def test_parts_never_overlap(corpus):
    keys = {s: {(d.source, d.name) for d in docs} for s, docs in corpus.parts.items()}
    texts = {s: {d.text for d in docs} for s, docs in corpus.parts.items()}
    for a, b in [("calib", "train"), ("calib", "eval"), ("train", "eval")]:
        assert not keys[a] & keys[b]
        assert not texts[a] & texts[b]


def test_both_sources_in_every_part(corpus):
    for docs in corpus.parts.values():
        assert {d.source for d in docs} == {"topics", "docstrings"}


def test_about_250k_tokens(corpus, tok):
    total = sum(corpus.tokens(tok, s).numel() for s in data.SPLITS)
    assert 200_000 < total < 300_000
    assert corpus.tokens(tok, "eval").numel() > 8 * 1024


def test_split_assignment_is_stable():
    # a hash of the name decides, so the same document always lands in the same part
    assert [data.bucket(f"topics/{n}") for n in ("assert", "lambda", "with")] == [data.bucket(f"topics/{n}") for n in ("assert", "lambda", "with")]
    counts = {s: 0 for s in data.SPLITS}
    for i in range(2000):
        counts[data.bucket(f"doc{i}")] += 1
    assert 0.07 < counts["eval"] / 2000 < 0.13 and 0.07 < counts["calib"] / 2000 < 0.13


def test_tokens_of_one_source_and_truncation(corpus, tok):
    ids = corpus.tokens(tok, "calib", source="topics", max_tokens=100)
    assert ids.shape == (100,) and ids.dtype == torch.long
    with pytest.raises(ValueError, match="split must be one of"):
        corpus.tokens(tok, "test")


def test_sample_windows_reproducible_and_in_range():
    ids = torch.arange(1000)
    a, b = sample_windows(ids, 8, 64, seed=3), sample_windows(ids, 8, 64, seed=3)
    assert torch.equal(a, b) and a.shape == (8, 64)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 63, dtype=torch.long))  # contiguous windows
    assert not torch.equal(a, sample_windows(ids, 8, 64, seed=4))
    with pytest.raises(ValueError, match="Need more than"):
        sample_windows(torch.arange(10), 1, 64)


def test_empty_or_short_corpus_files_name_the_file_and_the_split(tmp_path, tok):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match=f"corpus file {empty} is empty"):
        load_corpus(str(empty))
    short = tmp_path / "short.txt"
    short.write_text("One paragraph.\n\nAnother paragraph.\n")
    c = load_corpus(str(short))
    empty_split = next(s for s in data.SPLITS if not c.parts[s])
    with pytest.raises(ValueError, match=f"the '{empty_split}' split of corpus 'short' \\({short}, 2 documents in all\\) "
                                         "has no documents"):
        c.tokens(tok, empty_split)
    c.parts["calib"] = c.parts["calib"] or c.parts["train"]
    with pytest.raises(ValueError, match=f"Need more than seq_len=64 tokens, the 'calib' split of corpus 'short'"):
        data.calibration_batch(c, tok, 1, 64)


def test_local_text_file_through_datasets(tmp_path):
    paragraphs = [f"Paragraph number {i} says something distinct." for i in range(60)]
    path = tmp_path / "notes.txt"
    path.write_text("\n\n".join(paragraphs))
    c = load_corpus(str(path))
    got = sorted(d.text.strip() for docs in c.parts.values() for d in docs)
    assert got == sorted(paragraphs)
    assert all(c.parts[s] for s in data.SPLITS)


def test_wikitext2_maps_its_splits(monkeypatch):
    import datasets

    fixture = datasets.DatasetDict({s: datasets.Dataset.from_dict({"text": [f"{s} line {i}" for i in range(3)] + [" "]})
                                    for s in ("train", "validation", "test")})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: fixture)
    c = load_corpus("wikitext2")
    assert [d.text for d in c.parts["eval"]] == ["test line 0", "test line 1", "test line 2"]
    assert c.parts["calib"][0].text == "validation line 0" and len(c.parts["train"]) == 3


def test_missing_dataset_offline_says_what_and_how(monkeypatch):
    import datasets

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach the hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(CorpusNotFoundError, match="wikitext.*load_dataset"):
        load_corpus("wikitext2")


def test_unknown_corpus_and_missing_file():
    with pytest.raises(CorpusNotFoundError, match="Unknown corpus"):
        load_corpus("imaginary")
    with pytest.raises(CorpusNotFoundError, match="No text file"):
        load_corpus("/no/such/file.txt")


def test_calibration_batch_comes_from_the_calibration_part(tok):
    c = Corpus("t", {"calib": [Document("s", "a", "alpha beta gamma " * 200)], "train": [], "eval": []})
    batch = data.calibration_batch(c, tok, n=4, seq_len=16)
    calib_ids = c.tokens(tok, "calib").tolist()
    assert batch.shape == (4, 16)
    for row in batch.tolist():
        assert any(calib_ids[i : i + 16] == row for i in range(len(calib_ids) - 15))
