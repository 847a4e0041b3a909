"""`text`: English text for causal language models, tokenized here, never downloaded.

The builtin corpus is the Python documentation that ships inside every CPython installation (`pydoc_data.topics`:
the language reference's topics, about 465,000 characters of English prose with code examples; PSF License), or a
UTF-8 text file of your own (`path`). Paragraphs are split between training and validation by a seeded
permutation (about `val_fraction` of the characters held out; calibration is drawn from the training split), each
split's text is tokenized, an end-of-text token closes each document, and the token stream is cut into windows of
`seq_len` + 1 tokens: the input is a window's first `seq_len` tokens, the target the next token at every position.

Tokenizers: `byte` (UTF-8 bytes 0..255 and <|endoftext|> = 256: nothing to train, nothing to ship) or `bpe` (a
byte-level BPE of `vocab_size` tokens trained here on the training split with Hugging Face `tokenizers`;
deterministic, and rebuilt by `tokenizer(config, seed)`).

The config class is torch-free (the recipe layer imports it); the loader imports torch when it runs.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, PositiveInt

from compresspipe.errors import InputError
from compresspipe.recipe.spec import DataConfig, RecipeFile

if TYPE_CHECKING:
    from compresspipe.data.sources import LoadedData

EOS = "<|endoftext|>"
BYTE_VOCAB = 257  # 256 byte values and <|endoftext|>
MAX_FILE_BYTES = 256 * 2**20
CORPUS_LICENCE = ("Python documentation (pydoc_data.topics, shipped with CPython): Copyright Python Software "
                  "Foundation, PSF License Version 2")


class TextData(DataConfig):
    """English text for causal language models, no download: the Python documentation every CPython ships
    (pydoc_data.topics, PSF License) or a UTF-8 file of yours; paragraphs split by the seed, tokenized by bytes or
    a BPE trained here, cut into windows whose target is the next token."""

    dataset: Literal["text"]
    corpus: Literal["python-docs"] = Field(
        "python-docs", description="builtin corpus: python-docs (the Python documentation in pydoc_data, "
                                   "~465k characters of English, PSF License); ignored when path is given")
    path: RecipeFile | None = Field(None, description="a UTF-8 text file of your own instead (documents separated "
                                                      "by blank lines twice, paragraphs by one blank line)")
    tokenizer: Literal["byte", "bpe"] = Field(
        "byte", description="byte: UTF-8 bytes (vocabulary 257: 256 bytes and <|endoftext|> = 256); bpe: a "
                            "byte-level BPE of vocab_size tokens trained here on the training split (<|endoftext|> = 0)")
    vocab_size: int = Field(512, ge=260, le=65536, description="bpe: tokens in its vocabulary (byte: 257, fixed)")
    seq_len: int = Field(128, ge=4, le=65536, description="tokens per sample (each target is the next token)")
    max_chars: PositiveInt | None = Field(
        None, description="use only the first max_chars characters of the corpus (smoke runs)")
    loader: ClassVar[str] = "compresspipe.data.text:load_text"
    preprocessing: ClassVar[str] = ("token ids of the text (int64; tokenizer byte: UTF-8 bytes, <|endoftext|> = 256; "
                                    "bpe: see preprocessing.tokenizer) and an attention mask (1 = token, 0 = padding)")


@dataclass(frozen=True)
class Corpus:
    """Documents (each a list of paragraphs), where they come from and their sha256."""

    documents: list[list[str]]
    source: str
    sha256: str


def read_corpus(config: TextData) -> Corpus:
    """The documents of the corpus (sorted topics of pydoc_data, or a file's blank-line-separated parts)."""
    if config.path is not None:
        path = Path(config.path)
        try:
            size = path.stat().st_size
            if size > MAX_FILE_BYTES:
                raise InputError(f"{path}: {size} bytes; a text corpus may have at most {MAX_FILE_BYTES}")
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"{path}: not UTF-8 text ({exc})") from None
        except OSError as exc:
            raise InputError(f"{path}: cannot read ({exc})") from None
        raw = text.replace("\r\n", "\n").split("\n\n\n")
        source = str(path)
    else:
        from pydoc_data.topics import topics

        raw = [topics[k] for k in sorted(topics)]
        source = f"python-docs ({CORPUS_LICENCE})"
    if config.max_chars is not None:
        kept, total = [], 0
        for doc in raw:
            if total >= config.max_chars:
                break
            kept.append(doc[: config.max_chars - total])
            total += len(kept[-1])
        raw = kept
    documents = [[p.strip("\n") for p in doc.split("\n\n") if p.strip()] for doc in raw]
    documents = [d for d in documents if d]
    digest = hashlib.sha256("\x00".join("\n\n".join(d) for d in documents).encode("utf-8")).hexdigest()
    if sum(len(p) for d in documents for p in d) == 0:
        raise InputError(f"{source}: no text")
    return Corpus(documents, source, digest)


def split_paragraphs(corpus: Corpus, val_fraction: float, seed: int) -> tuple[list[list[str]], list[list[str]]]:
    """(train, val) documents: paragraphs go to validation in a seeded random order until it holds val_fraction of
    the characters; each split keeps the documents' order and the paragraphs' order within them."""
    import random

    where = [(i, j) for i, doc in enumerate(corpus.documents) for j in range(len(doc))]
    if len(where) < 2:
        raise InputError(f"{corpus.source}: {len(where)} paragraph(s); at least 2 are needed to split training "
                         "and validation")
    order = list(range(len(where)))
    random.Random(seed).shuffle(order)
    total = sum(len(corpus.documents[i][j]) for i, j in where)
    val: set[int] = set()
    held = 0
    for k in order[:-1]:  # at least one paragraph stays for training
        if held >= val_fraction * total and val:
            break
        val.add(k)
        held += len(corpus.documents[where[k][0]][where[k][1]])
    train_docs: list[list[str]] = [[] for _ in corpus.documents]
    val_docs: list[list[str]] = [[] for _ in corpus.documents]
    for k, (i, j) in enumerate(where):
        (val_docs if k in val else train_docs)[i].append(corpus.documents[i][j])
    return [d for d in train_docs if d], [d for d in val_docs if d]


class Tokenizer:
    """Text to token ids and back: bytes, or a byte-level BPE (Hugging Face `tokenizers`)."""

    def __init__(self, kind: str, bpe: Any = None):
        self.kind, self.bpe = kind, bpe

    @property
    def vocab_size(self) -> int:
        return BYTE_VOCAB if self.bpe is None else int(self.bpe.get_vocab_size())

    @property
    def eos_id(self) -> int:
        return BYTE_VOCAB - 1 if self.bpe is None else int(self.bpe.token_to_id(EOS))

    def encode(self, text: str) -> list[int]:
        if self.bpe is None:
            return list(text.encode("utf-8"))
        return list(self.bpe.encode(text).ids)

    def decode(self, ids: list[int]) -> str:
        if self.bpe is None:
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        return str(self.bpe.decode(ids))

    def to_json(self) -> str | None:
        return None if self.bpe is None else str(self.bpe.to_str())

    def to_hf(self) -> Any:
        """The same tokenizer as a Hugging Face `tokenizers.Tokenizer` (what a saved model folder ships): the BPE
        itself, or for bytes a byte-level BPE without merges whose ids are the byte values, <|endoftext|> = 256."""
        if self.bpe is not None:
            return self.bpe
        from tokenizers import AddedToken, decoders, models, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        chars = _byte_chars()
        vocab = {chars[b]: b for b in range(256)}
        vocab[EOS] = BYTE_VOCAB - 1
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(EOS, special=True)])
        return tok


def _byte_chars() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (byte-level BPE vocabularies are written in these)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = dict(zip(printable, printable, strict=True)), 0
    for b in range(256):
        if b not in codes:
            codes[b] = 256 + extra
            extra += 1
    return {b: chr(c) for b, c in codes.items()}


def train_bpe(documents: list[list[str]], vocab_size: int) -> Tokenizer:
    """A byte-level BPE trained on these documents (deterministic: one thread of input, in order)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    bpe = HFTokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(("\n\n".join(d) for d in documents), trainer=trainer)
    return Tokenizer("bpe", bpe)


def tokenizer(config: TextData, seed: int) -> Tokenizer:
    """The tokenizer a run with this config and seed uses (the BPE is trained on that run's training split)."""
    if config.tokenizer == "byte":
        return Tokenizer("byte")
    train, _ = split_paragraphs(read_corpus(config), config.val_fraction, seed)
    return train_bpe(train, config.vocab_size)


def token_stream(documents: list[list[str]], tok: Tokenizer) -> list[int]:
    """Every document's tokens (its paragraphs joined by a blank line), each followed by <|endoftext|>."""
    ids: list[int] = []
    for doc in documents:
        ids += tok.encode("\n\n".join(doc))
        ids.append(tok.eos_id)
    return ids


def unigram_perplexity(train: list[int], val: list[int], vocab: int) -> float:
    """Perplexity on `val` of token frequencies counted on `train` (add-one smoothing): what a model that ignores
    context scores, and so the figure a language model must beat."""
    from collections import Counter

    counts = Counter(train)
    total = len(train) + vocab
    nll = -sum(math.log((counts[t] + 1) / total) for t in val)
    return math.exp(nll / max(len(val), 1))


def load_text(config: TextData, seed: int, input_shape: tuple[int, ...] | None = None) -> LoadedData:
    """Train and validation windows of the corpus; see the module docstring."""
    import torch

    from compresspipe.data.sources import DictTensorDataset, LoadedData
    from compresspipe.recipe.spec import InputTensor

    corpus = read_corpus(config)
    train_docs, val_docs = split_paragraphs(corpus, config.val_fraction, seed)
    tok = train_bpe(train_docs, config.vocab_size) if config.tokenizer == "bpe" else Tokenizer("byte")
    length = config.seq_len
    splits = {}
    streams = {}
    for name, docs in (("train", train_docs), ("val", val_docs)):
        ids = token_stream(docs, tok)
        streams[name] = ids
        n = (len(ids) - 1) // length
        if n < 1:
            raise InputError(f"{corpus.source}: the {name} split holds {len(ids)} tokens, fewer than one window of "
                             f"seq_len + 1 = {length + 1}; lower seq_len or val_fraction, or give more text")
        t = torch.tensor(ids[: n * length + 1], dtype=torch.int64)
        inputs = t[:-1].view(n, length)
        labels = t[1:].view(n, length)
        splits[name] = DictTensorDataset({"input_ids": inputs.clone(), "attention_mask": torch.ones_like(inputs)},
                                         labels.clone())
    vocab = tok.vocab_size
    unigram = unigram_perplexity(streams["train"], streams["val"][1: len(splits["val"]) * length + 1], vocab)
    hints = [InputTensor(name="input_ids", shape=[length], dtype="int64", dynamic={0: "sequence"}, range=(0, vocab)),
             # [low, high): the mask holds 0 (padding) and 1 (token)
             InputTensor(name="attention_mask", shape=[length], dtype="int64", dynamic={0: "sequence"}, range=(0, 2))]
    tokenizer_info: dict[str, Any] = {"kind": config.tokenizer, "vocab_size": vocab, "eos_token": EOS,
                                      "eos_token_id": tok.eos_id}
    if tok.bpe is not None:
        tokenizer_info["sha256"] = hashlib.sha256((tok.to_json() or "").encode()).hexdigest()
        tokenizer_info["rebuild"] = "compresspipe.data.text.tokenizer(recipe.data, recipe.seed)"
    preprocessing = {"description": config.preprocessing, "seq_len": length, "vocab_size": vocab,
                     "tokenizer": tokenizer_info, "corpus": corpus.source, "corpus_sha256": corpus.sha256,
                     "unigram_perplexity": round(unigram, 3)}
    notes = [f"text: {corpus.source}; {len(splits['train'])} training and {len(splits['val'])} validation windows "
             f"of {length} tokens ({config.tokenizer} tokenizer, vocabulary {vocab})",
             f"text: a unigram model (token frequencies of the training split) scores perplexity {unigram:.2f} on "
             "the validation split: a language model must do clearly better"]
    return LoadedData(train=splits["train"], val=splits["val"], num_classes=vocab, inputs=hints,
                      preprocessing=preprocessing, notes=notes)
