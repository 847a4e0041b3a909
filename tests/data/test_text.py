"""`text`: real English text for causal LMs with no download, split by the seed, tokenized by bytes or a local BPE."""

import math
from collections import Counter

import pytest
import torch

from compresspipe.data import DATASETS
from compresspipe.data.sources import load_data
from compresspipe.data.text import TextData, read_corpus, split_paragraphs, tokenizer, unigram_perplexity
from compresspipe.errors import InputError

SMALL = {"dataset": "text", "max_chars": 30_000, "seq_len": 32}


def _load(seed=0, **changes):
    return load_data(TextData(**{**SMALL, **changes}), seed, None, "language_modeling")


def test_registered_and_torch_free():
    import subprocess
    import sys

    assert DATASETS.get("text") is TextData
    code = "import sys; import compresspipe.data.text; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_splits_are_deterministic_from_the_seed():
    a, b, other = _load(), _load(), _load(seed=1)
    assert a.fingerprint() == b.fingerprint() != other.fingerprint()
    assert len(a.calibration) > 0 and len(a.train) > 3 * len(a.val) > 0


def test_train_and_validation_hold_different_paragraphs():
    corpus = read_corpus(TextData(**SMALL))
    train, val = split_paragraphs(corpus, 0.2, seed=0)
    train_p, val_p = Counter(p for d in train for p in d), Counter(p for d in val for p in d)
    assert train_p + val_p == Counter(p for d in corpus.documents for p in d)  # each paragraph in one split
    held = sum(len(p) * n for p, n in val_p.items()) / sum(len(p) for d in corpus.documents for p in d)
    assert 0.19 < held < 0.25
    assert split_paragraphs(corpus, 0.2, seed=0) == (train, val) != split_paragraphs(corpus, 0.2, seed=1)


def test_windows_target_the_next_token_and_the_mask_spans_0_and_1():
    data = _load()
    ids, labels = data.train.inputs["input_ids"], data.train.labels
    assert ids.shape[1:] == (32,) and torch.equal(labels[:, :-1], ids[:, 1:])
    assert torch.equal(labels[:-1, -1], ids[1:, 0])  # windows follow each other in the stream
    assert data.num_classes == 257 and int(ids.max()) <= 256
    spec = {s.name: s for s in data.inputs}
    assert spec["attention_mask"].range == (0, 2) and spec["input_ids"].range == (0, 257)  # [low, high)
    assert spec["input_ids"].dynamic == {0: "sequence"}
    text = bytes(int(i) for i in ids[0] if i < 256).decode("utf-8", errors="replace")
    assert text.isprintable() or "\n" in text


def test_unigram_perplexity_is_reported_and_correct():
    assert unigram_perplexity([0, 1, 2, 3] * 10, [0, 1, 2, 3], vocab=4) == pytest.approx(4.0)
    data = _load()
    note = next(n for n in data.notes if "unigram" in n)
    assert float(note.split("perplexity ")[1].split(" ")[0]) == pytest.approx(data.preprocessing["unigram_perplexity"],
                                                                              abs=0.01)
    assert 5 < data.preprocessing["unigram_perplexity"] < 60
    assert "PSF License" in data.preprocessing["corpus"] and len(data.preprocessing["corpus_sha256"]) == 64


def test_bpe_is_trained_here_deterministically():
    data = _load(tokenizer="bpe", vocab_size=300)
    again = _load(tokenizer="bpe", vocab_size=300)
    assert data.fingerprint() == again.fingerprint() and data.num_classes == 300
    info = data.preprocessing["tokenizer"]
    assert info["kind"] == "bpe" and info["eos_token_id"] == 0
    rebuilt = tokenizer(TextData(**SMALL, tokenizer="bpe", vocab_size=300), 0)
    assert rebuilt.vocab_size == 300 and rebuilt.decode(rebuilt.encode("The assert statement")) == \
        "The assert statement"
    assert int(data.train.labels.max()) < 300


def test_a_text_file_of_your_own(tmp_path):
    doc = "\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(60))
    path = tmp_path / "book.txt"
    path.write_text(doc + "\n\n\n" + doc.upper(), encoding="utf-8")
    data = load_data(TextData(dataset="text", path=str(path), seq_len=16), 0, None, "language_modeling")
    assert str(path) in data.preprocessing["corpus"] and len(data.val) > 0
    path.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(InputError, match="not UTF-8"):
        load_data(TextData(dataset="text", path=str(path), seq_len=16), 0, None, "language_modeling")


def test_too_little_text_is_an_input_error():
    with pytest.raises(InputError, match="fewer than one window"):
        _load(max_chars=300, seq_len=512)


def test_a_trained_bigram_beats_the_unigram():
    """The data carries learnable structure: bigram counts from training beat unigram counts on validation."""
    data = _load(max_chars=60_000)
    train, val = data.train.inputs["input_ids"].flatten(), data.val.inputs["input_ids"].flatten()
    pairs = torch.zeros(257, 257)
    pairs.index_put_((train[:-1], train[1:]), torch.ones(len(train) - 1), accumulate=True)
    probs = (pairs + 0.1) / (pairs + 0.1).sum(1, keepdim=True)
    bigram = math.exp(-probs[val[:-1], val[1:]].log().mean().item())
    assert bigram < 0.6 * data.preprocessing["unigram_perplexity"]
