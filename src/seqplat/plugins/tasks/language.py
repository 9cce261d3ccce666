"""Language-modelling tasks: character level (ptb_char, text8, enwik8, char_text) and word level
(ptb_word).

Each turns its files into one long stream of token ids per split; the core's
:class:`~seqplat.LanguageModelTask` cuts a stream into parallel rows read in consecutive BPTT
chunks. Files come through :mod:`seqplat.core.data` (``SEQPLAT_DATA`` offline, else download and
cache) and parsed streams are kept per process, so building a task twice reads the files once.

Symbol conventions:

* ptb_char: Mikolov's ``ptb.char.*.txt`` (every symbol followed by a space, ``_`` between words,
  ``<unk>`` spelled out); the separating spaces are dropped and each line end is a newline symbol:
  50 symbols, the fixed :data:`PTB_CHARS` (known without reading data, checked against train).
* text8: the 27 symbols ``" abcdefghijklmnopqrstuvwxyz"``; enwik8: raw bytes, vocabulary the
  distinct bytes of the training split (``vocab="train"``) or all 256 (``vocab="bytes"``).
* ptb_word: whitespace tokens plus ``<eos>`` per line, vocabulary of the 10,000 training types
  ordered by frequency (ties: first appearance).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from functools import lru_cache
from typing import ClassVar, Literal

import fsspec
import torch
from pydantic import Field, model_validator
from torch import Tensor

from seqplat import Batch, DataError, LanguageModelTask, StreamLMConfig
from seqplat.core.data import DataFile, compressed_names, data_root, read_bytes, read_text

logger = logging.getLogger(__name__)

PTB_URL = "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"
#: sha256 of the canonical (uncompressed) PTB files, from the shared data README
PTB_SHA256 = {
    "ptb.train.txt": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
    "ptb.valid.txt": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
    "ptb.test.txt": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
    "ptb.char.train.txt": "e313d91425e06c4f0a8fb6e881dcce0c291f2a0e9f4dda54833069b122f91da9",
    "ptb.char.valid.txt": "21661f63ec355085879458b6524644d4add5573541b4be14fb52ab2e2e995eb8",
    "ptb.char.test.txt": "1ef5607ac3c463b16e38bfe7900dd3bfc91de5a96e0f21e7eab5188b465b8ebe",
}
TEXT8_URL = "http://mattmahoney.net/dc/text8.zip"
ENWIK8_URL = "http://mattmahoney.net/dc/enwik8.zip"

#: the 50 symbols of Mikolov's character-level PTB, in code-point order (newline = end of sentence)
PTB_CHARS = "\n#$&'*-./0123456789<>N\\_abcdefghijklmnopqrstuvwxyz"
TEXT8_CHARS = " abcdefghijklmnopqrstuvwxyz"
PTB_WORD_VOCAB = 10_000
#: the canonical text8/enwik8 length and split: 90M train, 5M valid, 5M test symbols
HUTTER_LENGTH = 100_000_000
HUTTER_SPLIT = (90_000_000, 95_000_000, 100_000_000)


def ptb_file(name: str) -> DataFile:
    """One of Mikolov's PTB files: ``<SEQPLAT_DATA>/ptb/<name>[.gz|.xz|.bz2]`` or simple-examples.tgz."""
    return DataFile("ptb", compressed_names(name), url=PTB_URL, member=f"simple-examples/data/{name}",
                    member_checksum=f"sha256:{PTB_SHA256[name]}")


TEXT8_FILE = DataFile("text8", compressed_names("text8") + ("text8.zip", "text8*"), url=TEXT8_URL)
ENWIK8_FILE = DataFile("enwik8", compressed_names("enwik8") + ("enwik8.zip", "enwik8*"), url=ENWIK8_URL)


# -- encoding helpers -------------------------------------------------------------------------------

def compact(ids: Tensor) -> Tensor:
    """Token ids in the smallest integer type that holds them (uint8 for up to 256 symbols).

    Streams stay compact in memory (100M symbols take 100 MB, not 800 MB); batches are widened
    to int64 as they are cut.
    """
    top = int(ids.max()) if ids.numel() else 0
    return ids.to(torch.uint8 if top < 256 else torch.int32)


def encode_bytes(data: bytes | Tensor, symbols: bytes, url: str, chunk: int = 1 << 24) -> Tensor:
    """uint8 ids of ``data``'s bytes in the sorted alphabet ``symbols``; an unknown byte is a DataError."""
    raw = data if isinstance(data, Tensor) else torch.frombuffer(bytearray(data), dtype=torch.uint8)
    alphabet = sorted(symbols)
    if len(alphabet) == 256:
        return raw.clone()
    lut = torch.full((256,), 255, dtype=torch.uint8)
    lut[torch.tensor(alphabet, dtype=torch.long)] = torch.arange(len(alphabet), dtype=torch.uint8)
    out = torch.empty_like(raw)
    for i in range(0, raw.numel(), chunk):
        torch.index_select(lut, 0, raw[i : i + chunk].int(), out=out[i : i + chunk])
    bad = (out == 255).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise DataError(
            f"Data file {url} has symbol {bytes([int(raw[i])])!r} (offset {i}) outside the vocabulary of "
            f"{len(alphabet)} symbols; check that it is the right file."
        )
    return out


def encode_text(text: str, alphabet: str, url: str) -> Tensor:
    """Ids of ``text``'s characters in the sorted ``alphabet`` (any Unicode)."""
    if text.isascii() and alphabet.isascii():
        return encode_bytes(text.encode("ascii"), alphabet.encode("ascii"), url)
    codes = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32).long()
    table = torch.tensor(sorted(map(ord, alphabet)), dtype=torch.long)
    ids = torch.searchsorted(table, codes).clamp_max(len(table) - 1)
    bad = (table[ids] != codes).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise DataError(f"Data file {url} has character {text[i]!r} (offset {i}) outside the vocabulary; "
                        f"check that it is the right file.")
    return compact(ids)


@lru_cache(maxsize=8)
def hutter_bounds(n: int, name: str, url: str) -> tuple[int, int, int]:
    """End offsets of train/valid/test for text8/enwik8: 90M/5M/5M, or 90/5/5 % of a shorter file
    (warned about once per file and process)."""
    if n >= HUTTER_LENGTH:
        if n > HUTTER_LENGTH:
            logger.warning("%s file %s has %d symbols; using the standard split of the first %d.",
                           name, url, n, HUTTER_LENGTH)
        return HUTTER_SPLIT
    a, b = n * 90 // 100, n * 95 // 100
    logger.warning(
        "%s file %s has %d symbols, fewer than the canonical %d: using a proportional 90/5/5 split "
        "(train %d, valid %d, test %d); numbers from it are not comparable with published %s results.",
        name, url, n, HUTTER_LENGTH, a, b - a, n - b, name,
    )
    return a, b, n


@lru_cache(maxsize=8)
def _ptb_char_stream(url: str) -> Tensor:
    text = read_text(url).replace("\r\n", "\n")
    odd = text[1::2]
    if odd.count(" ") != len(odd):
        raise DataError(
            f"Data file {url} is not in Mikolov's character format (every symbol followed by a space); "
            f"for word-level text use task ptb_word or char_text."
        )
    return encode_text(text.replace(" ", ""), PTB_CHARS, url)


@lru_cache(maxsize=4)
def _bytes_stream(url: str) -> Tensor:
    return torch.frombuffer(bytearray(read_bytes(url)), dtype=torch.uint8)


@lru_cache(maxsize=4)
def _ptb_words(url: str) -> tuple[str, ...]:
    words: list[str] = []
    for line in read_text(url).splitlines():
        words.extend(line.split())
        words.append("<eos>")
    return tuple(words)


def _widen(batch: Batch) -> Batch:
    """A batch cut from a compact stream, with int64 ids (what embeddings and losses take)."""
    return replace(batch, inputs=batch.inputs.long(), targets=batch.targets.long())


# -- character level -------------------------------------------------------------------------------

class CharLMTask(LanguageModelTask):
    """A character-level task with a memoryless (unigram) baseline in bits per character."""

    unit = "bpc"
    primary_metric = "bpc"

    def train_batch(self, step: int, batch_size: int, seed: int) -> Batch:
        return _widen(super().train_batch(step, batch_size, seed))

    def eval_batches(self, split: Literal["valid", "test"], batch_size: int) -> Iterator[Batch]:
        return map(_widen, super().eval_batches(split, batch_size))

    @property
    def baseline(self) -> float:  # type: ignore[override]
        """Entropy of the training split's symbol frequencies (bits per symbol, or perplexity)."""
        counts = torch.bincount(self.split("train").long(), minlength=self.vocab_size).double()
        p = counts[counts > 0] / counts.sum()
        nats = float(-(p * p.log()).sum())
        return nats / math.log(2) if self.unit == "bpc" else math.exp(nats)


class PTBCharConfig(StreamLMConfig):
    """Penn Treebank, character level (Mikolov's ptb.char.*.txt)."""


class PTBCharTask(CharLMTask):
    """Penn Treebank characters (50 symbols, ~5.0M/393k/442k); bits per character."""

    config_class = PTBCharConfig

    @property
    def vocab(self) -> list[str]:
        return list(PTB_CHARS)

    def load_split(self, split: str) -> Tensor:
        return _ptb_char_stream(ptb_file(f"ptb.char.{split}.txt").resolve())


class HutterConfig(StreamLMConfig):
    """A 100M-symbol Hutter-prize file split 90M/5M/5M."""


class Text8Task(CharLMTask):
    """text8 (27 symbols, 90M/5M/5M; a shorter file is split 90/5/5 % with a warning)."""

    config_class = HutterConfig
    dataset_name: ClassVar[str] = "text8"

    @property
    def vocab(self) -> list[str]:
        return list(TEXT8_CHARS)

    def load_split(self, split: str) -> Tensor:
        url = TEXT8_FILE.resolve()
        ids = _text8_stream(url)
        a, b, c = hutter_bounds(ids.numel(), "text8", url)
        return {"train": ids[:a], "valid": ids[a:b], "test": ids[b:c]}[split]


@lru_cache(maxsize=2)
def _text8_stream(url: str) -> Tensor:
    return encode_bytes(read_bytes(url), TEXT8_CHARS.encode(), url)


class Enwik8Config(StreamLMConfig):
    """enwik8 (bytes)."""

    vocab: Literal["train", "bytes"] = Field(
        "train", description="train: the distinct bytes of the training split (205 on the full file); bytes: all 256"
    )


class Enwik8Task(CharLMTask):
    """enwik8 raw bytes (90M/5M/5M; a shorter file is split 90/5/5 % with a warning)."""

    config_class = Enwik8Config
    config: Enwik8Config

    def _load(self) -> tuple[Tensor, bytes, str, tuple[int, int, int]]:
        url = ENWIK8_FILE.resolve()
        ids = _bytes_stream(url)
        bounds = hutter_bounds(ids.numel(), "enwik8", url)
        return ids, _train_bytes(url, bounds[0]), url, bounds

    @property
    def vocab(self) -> list[str]:
        if self.config.vocab == "bytes":
            return [chr(b) for b in range(256)]
        return [chr(b) for b in self._load()[1]]

    def load_split(self, split: str) -> Tensor:
        ids, alphabet, url, (a, b, c) = self._load()
        part = {"train": ids[:a], "valid": ids[a:b], "test": ids[b:c]}[split]
        if self.config.vocab == "bytes":
            return part
        try:
            return encode_bytes(part, alphabet, url)
        except DataError as exc:
            raise DataError(f"The {split} split of {url} has bytes that never occur in its train split; "
                            f"set task.vocab=bytes.") from exc


@lru_cache(maxsize=4)
def _train_bytes(url: str, end: int) -> bytes:
    return bytes(torch.unique(_bytes_stream(url)[:end]).tolist())


class CharTextConfig(StreamLMConfig):
    """Any text file, character level, split into contiguous train/valid/test parts."""

    path: str = Field(
        ..., description="text file: a local path, an fsspec URL, or a path relative to SEQPLAT_DATA "
        "(gzip/xz/bz2/zip are read transparently)"
    )
    valid_fraction: float = Field(
        0.05, gt=0.0, lt=1.0, description="share of the text (after train) used for validation"
    )
    test_fraction: float = Field(0.05, gt=0.0, lt=1.0, description="share of the text (at the end) used for test")
    encoding: str = Field("utf-8", description="text encoding of the file")

    @model_validator(mode="after")
    def _fractions(self) -> CharTextConfig:
        if self.valid_fraction + self.test_fraction >= 1.0:
            raise ValueError(f"valid_fraction + test_fraction must be below 1 (got {self.valid_fraction} + "
                             f"{self.test_fraction}); nothing would be left to train on")
        return self


@lru_cache(maxsize=4)
def _char_text(url: str, encoding: str) -> tuple[Tensor, str]:
    text = read_text(url, encoding)
    alphabet = "".join(sorted(set(text)))
    return encode_text(text, alphabet, url), alphabet


class CharTextTask(CharLMTask):
    """Character LM on any text file; vocabulary = the file's distinct characters."""

    config_class = CharTextConfig
    config: CharTextConfig

    def url(self) -> str:
        path = self.config.path
        root = data_root()
        if root is not None and "://" not in path and not path.startswith("/"):
            fs, _ = fsspec.core.url_to_fs(path)
            if not fs.exists(path):
                return f"{root.rstrip('/')}/{path}"
        return path

    @property
    def vocab(self) -> list[str]:
        return list(_char_text(self.url(), self.config.encoding)[1])

    def load_split(self, split: str) -> Tensor:
        ids, _ = _char_text(self.url(), self.config.encoding)
        n = ids.numel()
        test_start = n - int(n * self.config.test_fraction)
        valid_start = test_start - int(n * self.config.valid_fraction)
        return {"train": ids[:valid_start], "valid": ids[valid_start:test_start], "test": ids[test_start:]}[split]


# -- word level ------------------------------------------------------------------------------------

class PTBWordConfig(StreamLMConfig):
    """Penn Treebank, word level (Mikolov's ptb.*.txt, <eos> per line)."""

    bptt: int = Field(35, ge=1, description="truncated-BPTT window: time steps per training chunk")


class PTBWordTask(LanguageModelTask):
    """Penn Treebank words (10k vocabulary, 929k/73k/82k tokens); perplexity."""

    config_class = PTBWordConfig
    unit = "perplexity"
    primary_metric = "perplexity"

    def __init__(self, config: PTBWordConfig):
        super().__init__(config)
        self._vocab: list[str] | None = None

    @property
    def vocab_size(self) -> int:
        """10,000, known without reading data (the loader checks that the file agrees)."""
        return PTB_WORD_VOCAB

    @property
    def num_outputs(self) -> int:
        return PTB_WORD_VOCAB

    @property
    def vocab(self) -> list[str]:
        if self._vocab is None:
            url = ptb_file("ptb.train.txt").resolve()
            words = _ptb_words(url)
            counts = Counter(words)
            first: dict[str, int] = {}
            for i, w in enumerate(words):
                first.setdefault(w, i)
            vocab = sorted(counts, key=lambda w: (-counts[w], first[w]))
            if len(vocab) != PTB_WORD_VOCAB:
                raise DataError(f"Data file {url} has {len(vocab)} word types, expected {PTB_WORD_VOCAB} "
                                f"(Mikolov's ptb.train.txt); check that it is the right file.")
            self._vocab = vocab
        return self._vocab

    @property
    def baseline(self) -> float:  # type: ignore[override]
        """Perplexity of the training unigram distribution."""
        counts = torch.bincount(self.split("train").long(), minlength=self.vocab_size).double()
        p = counts[counts > 0] / counts.sum()
        return math.exp(float(-(p * p.log()).sum()))

    def load_split(self, split: str) -> Tensor:
        index = {w: i for i, w in enumerate(self.vocab)}
        url = ptb_file(f"ptb.{split}.txt").resolve()
        unk = index.get("<unk>")
        words = _ptb_words(url)
        try:
            ids = [index[w] for w in words]
        except KeyError:
            if unk is None:
                missing = next(w for w in words if w not in index)
                raise DataError(f"Data file {url} has word {missing!r} that is not in the training vocabulary; "
                                f"check that it is the right file.") from None
            ids = [index.get(w, unk) for w in words]
        return torch.tensor(ids, dtype=torch.long)
