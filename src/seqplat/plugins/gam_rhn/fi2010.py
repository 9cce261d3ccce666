"""FI-2010 limit-order-book mid-price trend (``fi2010``), as the GAM-RHN authors set it up.

Data: the FI-2010 benchmark (Ntakaris et al. 2018), 5 Finnish stocks over 10 trading days, no
auction period. Every canonical file is a text matrix of 149 rows x N columns, one column per
order-book event: rows 1-40 are 10 levels x (ask price, ask volume, bid price, bid volume), rows
41-144 hand-crafted features (unused), rows 145-149 the labels for horizons 10, 20, 30, 50 and 100
events (1 up, 2 stationary, 3 down). Inside a file the stocks follow one another.

"Setup 2" (the authors' and DeepLOB's): train on days 1-7 (``Train_Dst_NoAuction_DecPre_CF_7.txt``),
test on days 8, 9 and 10 (``Test_Dst_NoAuction_DecPre_CF_{7,8,9}.txt``). As the authors do, volumes
are taken from the decimal-precision (DecPre) files, scaled back to share counts (x 1e5), turned into
``log10(v + 1)`` and used alone: 10 ask + 10 bid volumes = 20 features per event, no z-scoring. The
files are cut into one sequence per stock (the 4 largest jumps of the level-1 ask price mark the
stock changes); a stock's three test days form one test sequence. Validation uses the training days
themselves (the authors' choice) unless ``valid_fraction`` holds out the end of each stock.

The model sees at each event the window of the last ``window`` events (zero before a sequence
starts), a ``window x 20`` matrix, by default through the bilinear front-end (see ``bilinear.py``),
and predicts the label of every event. Training draws ``batch_size`` sub-sequences of ``subseq_len``
events at random positions (a new draw every ``subseq_len / bptt`` steps) and reads them in BPTT
chunks of ``bptt`` events, carrying the state across chunks. Metrics: accuracy and macro-F1 (mean of
the three per-class F1 scores, the primary metric).

Files are found under ``SEQPLAT_DATA/fi2010/`` (or ``task.data_dir``), flat or in the
``BenchmarkDatasets/NoAuction/3.NoAuction_DecPre/...`` layout of the official archive, plain or
gzip/xz/bzip2 compressed. The archive is not downloaded automatically: get ``BenchmarkDatasets.zip``
from https://etsin.fairdata.fi/dataset/73eb48d7-4dbc-4a10-a52a-da745b47a649 and unpack it there.
"""

from __future__ import annotations

import hashlib
import math
import posixpath
from collections.abc import Iterator
from functools import lru_cache
from typing import Literal

import fsspec
import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from seqplat import Batch, DataError, Task, TaskConfig
from seqplat.core.data import compressed_names, resolve

from .bilinear import PAPER_SHAPES, BilinearEncoder

HORIZONS = (10, 20, 30, 50, 100)
ROWS = 149
LEVELS = 10
STOCKS = 5
SOURCE = "https://etsin.fairdata.fi/dataset/73eb48d7-4dbc-4a10-a52a-da745b47a649"
_DECPRE = "BenchmarkDatasets/NoAuction/3.NoAuction_DecPre/NoAuction_DecPre_{}"
TRAIN_FILE = "Train_Dst_NoAuction_DecPre_CF_7.txt"
TEST_FILES = tuple(f"Test_Dst_NoAuction_DecPre_CF_{k}.txt" for k in (7, 8, 9))


class FI2010Config(TaskConfig):
    """Options of the ``fi2010`` task."""

    horizon: Literal[10, 20, 30, 50, 100] = Field(
        50, description="prediction horizon k in events: which of the five label rows is the target"
    )
    volume_only: bool = Field(
        True, description="use the 20 volumes (10 ask + 10 bid levels) only, as the authors; False adds the "
        "20 prices as stored in the file (40 features)"
    )
    volume_scale: float = Field(
        1e5, gt=0.0, description="multiplier that turns the DecPre file's volumes back into share counts "
        "(the authors' 100000)"
    )
    log_volumes: bool = Field(True, description="transform volumes by log10(v + 1), as the authors")
    window: int = Field(
        15, ge=1, description="events per input step: each step sees the last `window` events (zeros before "
        "a sequence starts), the authors' Conveyor(15)"
    )
    encoder: Literal["bilinear", "default"] = Field(
        "bilinear", description="input encoder: the bilinear front-end of BL-GAM-RHN, or the core default "
        "(a linear map to model.embedding_size, or the flattened window itself)"
    )
    bilinear_shapes: list[tuple[int, int]] = Field(
        default_factory=lambda: [tuple(s) for s in PAPER_SHAPES],
        description="output shape (rows, cols) of every bilinear layer; ReLU after all but the last (tanh)",
    )
    bilinear_dropout: float = Field(0.2, ge=0.0, lt=1.0, description="dropout after every ReLU bilinear layer")
    max_norm: float | None = Field(
        2.5, gt=0.0, description="max L2 norm of every column of the bilinear W1/W2 (None: unconstrained)"
    )
    subseq_len: int = Field(5000, ge=1, description="events per training sub-sequence (state carried within)")
    bptt: int = Field(10, ge=1, description="truncated-BPTT window: events per training chunk")
    eval_bptt: int = Field(1000, ge=1, description="events per evaluation chunk (state carried across chunks)")
    valid_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="hold out this final fraction of every training stock for validation; "
        "0: validate on the training days themselves, as the authors"
    )
    split_stocks: bool = Field(
        True, description="cut each file into its 5 stocks (one sequence each); False: one sequence per file"
    )
    data_dir: str | None = Field(
        None, description="folder (or fsspec URL) holding the files; None: SEQPLAT_DATA/fi2010 or the cache"
    )

    @model_validator(mode="after")
    def _check(self) -> FI2010Config:
        if self.encoder == "bilinear" and not self.bilinear_shapes:
            raise ValueError("bilinear_shapes: the bilinear encoder needs at least one layer")
        if any(r < 1 or c < 1 for r, c in self.bilinear_shapes):
            raise ValueError(f"bilinear_shapes: every (rows, cols) must be >= 1, got {self.bilinear_shapes}")
        return self


# -- reading the canonical files -------------------------------------------------------------------

def _candidates(name: str, folder: str) -> tuple[str, ...]:
    nested = posixpath.join(_DECPRE.format(folder), name)
    return compressed_names(name) + compressed_names(nested)


def locate(name: str, data_dir: str | None) -> str:
    """Path/URL of one FI-2010 file, from ``data_dir`` or ``SEQPLAT_DATA/fi2010`` (or the cache)."""
    folder = "Training" if name.startswith("Train") else "Testing"
    candidates = _candidates(name, folder)
    if data_dir is not None:
        fs, root = fsspec.core.url_to_fs(data_dir)
        for cand in candidates:
            path = posixpath.join(root.rstrip("/"), cand)
            if fs.isfile(path):
                return fs.unstrip_protocol(path)
        raise DataError(
            f"No FI-2010 file {name} under task.data_dir={data_dir} (tried {', '.join(candidates)}); download "
            f"BenchmarkDatasets.zip from {SOURCE} and unpack it there."
        )
    try:
        return resolve("fi2010", candidates)
    except DataError as exc:
        raise DataError(
            f"{exc} FI-2010 is not downloaded automatically: get BenchmarkDatasets.zip from {SOURCE}, unpack it "
            f"into <SEQPLAT_DATA>/fi2010/ (or set task.data_dir)."
        ) from exc


def read_matrix_rows(url: str, rows: tuple[int, ...]) -> dict[int, Tensor]:
    """The wanted rows (0-based) of a 149-row FI-2010 text matrix, as float64 tensors; other rows are
    skipped unparsed. Checks that there are 149 rows of equal length."""
    import numpy as np

    wanted = set(rows)
    out: dict[int, Tensor] = {}
    width = None
    count = 0
    try:
        with fsspec.open(url, "rt", compression="infer", encoding="ascii") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                count = i + 1
                if i in wanted or width is None:
                    try:
                        values = np.array(line.split(), dtype=np.float64)
                    except ValueError as exc:
                        raise DataError(f"Data file {url} row {i + 1} holds a non-number ({exc}).") from exc
                    if width is None:
                        width = values.size
                    elif values.size != width:
                        raise DataError(
                            f"Data file {url} row {i + 1} has {values.size} columns, row 1 has {width}; "
                            f"the file is truncated or not an FI-2010 matrix."
                        )
                    if i in wanted:
                        out[i] = torch.from_numpy(values)
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise DataError(f"Data file {url} cannot be read ({type(exc).__name__}: {exc}).") from exc
    if count != ROWS:
        raise DataError(f"Data file {url} has {count} rows, an FI-2010 matrix has {ROWS} (one column per event).")
    return out


def stock_boundaries(ask_price: Tensor, stocks: int = STOCKS, min_jump: float = 0.02) -> list[int]:
    """Start indices of stocks 2..``stocks`` in a file: the ``stocks - 1`` largest relative jumps of the
    level-1 ask price. Raises DataError when one of them is under ``min_jump`` (2%): then the file
    does not look like ``stocks`` concatenated stocks."""
    if ask_price.numel() < stocks:
        raise DataError(f"an FI-2010 file with {ask_price.numel()} events cannot hold {stocks} stocks")
    if (ask_price <= 0).any():
        raise DataError("FI-2010 level-1 ask prices must be positive to find the stock boundaries")
    jumps = (ask_price[1:].log() - ask_price[:-1].log()).abs()
    top = torch.topk(jumps, stocks - 1)
    if float(top.values.min()) < min_jump:
        raise DataError(
            f"cannot find {stocks} stocks in the FI-2010 file: the {stocks - 1} largest price jumps include "
            f"{float(top.values.min()):.4f} (< {min_jump}); set task.split_stocks=false"
        )
    return sorted(int(i) + 1 for i in top.indices)


@lru_cache(maxsize=8)
def load_file(url: str, horizon: int, volume_only: bool, volume_scale: float, log_volumes: bool,
              split_stocks: bool) -> tuple[tuple[Tensor, Tensor], ...]:
    """One file as ``((features [n, F] float32, labels [n] int64), ...)``, one pair per stock."""
    label_row = 4 * LEVELS + 104 + HORIZONS.index(horizon)
    rows = read_matrix_rows(url, tuple(range(4 * LEVELS)) + (label_row,))
    lob = torch.stack([rows[i] for i in range(4 * LEVELS)], dim=1)  # [n, 40]: P_a, V_a, P_b, V_b per level
    volumes = lob[:, 1::2] * volume_scale
    if log_volumes:
        volumes = torch.log10(volumes.clamp_min(0.0) + 1.0)
    features = volumes if volume_only else torch.cat([lob[:, 0::2], volumes], dim=1)
    raw = rows[label_row]
    if not torch.isin(raw, torch.tensor([1.0, 2.0, 3.0], dtype=raw.dtype)).all():
        raise DataError(f"Data file {url}: labels of horizon {horizon} must be 1, 2 or 3")
    labels = raw.long() - 1
    cuts = stock_boundaries(lob[:, 0]) if split_stocks else []
    bounds = [0, *cuts, labels.numel()]
    return tuple((features[a:b].float().contiguous(), labels[a:b].contiguous())
                 for a, b in zip(bounds[:-1], bounds[1:], strict=True))


# -- the task --------------------------------------------------------------------------------------

class FI2010Task(Task):
    """FI-2010 limit-order-book mid-price movement (up/stationary/down) at every event, setup 2."""

    config_class = FI2010Config
    stream = True
    head_kind = "per_step"
    output_kind = "classification"
    primary_metric = "macro_f1"
    primary_mode = "max"

    def __init__(self, config: FI2010Config):
        super().__init__(config)
        self.config: FI2010Config = config
        self._splits: dict[str, list[tuple[Tensor, Tensor]]] | None = None

    # -- shapes ---------------------------------------------------------------------------------
    @property
    def event_features(self) -> int:
        """Features per event: 20 volumes (40 with prices)."""
        return 2 * LEVELS if self.config.volume_only else 4 * LEVELS

    @property
    def input_features(self) -> int:
        return self.config.window * self.event_features

    @property
    def num_outputs(self) -> int:
        return 3

    def build_encoder(self, embedding_size: int | None) -> tuple[nn.Module, int]:
        cfg = self.config
        if cfg.encoder == "bilinear":
            enc = BilinearEncoder(cfg.window, self.event_features, cfg.bilinear_shapes, cfg.bilinear_dropout,
                                  cfg.max_norm)
            return enc, enc.output_size
        return super().build_encoder(embedding_size)

    # -- data -----------------------------------------------------------------------------------
    def _load(self, name: str) -> list[tuple[Tensor, Tensor]]:
        c = self.config
        url = locate(name, c.data_dir)
        return list(load_file(url, c.horizon, c.volume_only, c.volume_scale, c.log_volumes, c.split_stocks))

    def splits(self) -> dict[str, list[tuple[Tensor, Tensor]]]:
        """``{"train", "valid", "test"}`` -> list of ``(features [n, F], labels [n])`` sequences."""
        if self._splits is None:
            train = self._load(TRAIN_FILE)
            days = [self._load(name) for name in TEST_FILES]
            if len({len(d) for d in days}) != 1:
                raise DataError(f"FI-2010 test files hold different numbers of stocks: {[len(d) for d in days]}")
            test = [(torch.cat([d[k][0] for d in days]), torch.cat([d[k][1] for d in days]))
                    for k in range(len(days[0]))]
            f = self.config.valid_fraction
            if f > 0:
                cut = [max(1, int(round(x.shape[0] * (1.0 - f)))) for x, _ in train]
                valid = [(x[c:], y[c:]) for (x, y), c in zip(train, cut, strict=True) if c < x.shape[0]]
                train = [(x[:c], y[:c]) for (x, y), c in zip(train, cut, strict=True)]
            else:
                valid = train
            self._splits = {"train": train, "valid": valid, "test": test}
        return self._splits

    def prepare(self) -> None:
        self.splits()

    def windows(self, features: Tensor, start: int, length: int) -> Tensor:
        """Inputs ``[length, window*F]`` of events ``start .. start+length-1`` of one sequence (zeros
        before its first event and past its last)."""
        w, n, nf = self.config.window, features.shape[0], features.shape[1]
        lo, hi = start - w + 1, start + length
        a, b = max(lo, 0), min(hi, n)
        if a == lo and b == hi:
            seg = features[a:b]
        else:
            seg = features.new_zeros(hi - lo, nf)
            if a < b:
                seg[a - lo : b - lo] = features[a:b]
        return seg.unfold(0, w, 1).transpose(1, 2).reshape(length, w * nf)

    def _chunk(self, rows: list[tuple[int, int]], seqs: list[tuple[Tensor, Tensor]], length: int,
               reset: bool) -> Batch:
        """A batch from ``(sequence index or -1 for padding, start)`` per row."""
        nf = self.input_features
        inputs = torch.zeros(len(rows), length, nf)
        targets = torch.zeros(len(rows), length, dtype=torch.long)
        mask = torch.zeros(len(rows), length)
        for r, (k, start) in enumerate(rows):
            if k < 0:
                continue
            x, y = seqs[k]
            inputs[r] = self.windows(x, start, length)
            valid = max(0, min(length, y.numel() - start))
            targets[r, :valid] = y[start : start + valid]
            mask[r, :valid] = 1.0
        return Batch(inputs, targets, mask=mask, reset=reset)

    def steps_per_epoch(self, batch_size: int) -> int:
        events = sum(y.numel() for _, y in self.splits()["train"])
        return max(1, math.ceil(events / (batch_size * self.config.bptt)))

    def train_batch(self, step: int, batch_size: int, seed: int) -> Batch:
        c = self.config
        seqs = self.splits()["train"]
        chunks = math.ceil(c.subseq_len / c.bptt)
        draw, chunk = divmod(step, chunks)
        g = torch.Generator().manual_seed(hash_seed(seed, draw))
        starts = torch.tensor([max(1, y.numel() - c.subseq_len + 1) for _, y in seqs], dtype=torch.float64)
        which = torch.multinomial(starts, batch_size, replacement=True, generator=g)
        offsets = (torch.rand(batch_size, generator=g, dtype=torch.float64) * starts[which]).long()
        first = chunk * c.bptt
        length = min(c.bptt, c.subseq_len - first)
        rows = [(int(k), int(o) + first) for k, o in zip(which, offsets, strict=True)]
        return self._chunk(rows, seqs, length, reset=chunk == 0)

    def eval_batches(self, split: Literal["valid", "test"], batch_size: int) -> Iterator[Batch]:
        """Every sequence of the split read from its start in chunks of ``eval_bptt``; groups of
        ``batch_size`` sequences, padded with fully masked rows to ``batch_size`` rows."""
        seqs = self.splits()[split]
        step = self.config.eval_bptt
        for g0 in range(0, len(seqs), batch_size):
            group = list(range(g0, min(len(seqs), g0 + batch_size)))
            longest = max(seqs[k][1].numel() for k in group)
            group += [-1] * (batch_size - len(group))
            for i in range(0, longest, step):
                length = min(step, longest - i)
                yield self._chunk([(k, i) for k in group], seqs, length, reset=i == 0)


def hash_seed(seed: int, draw: int) -> int:
    """A 63-bit seed for training draw ``draw`` of run seed ``seed`` (stable across platforms)."""
    digest = hashlib.blake2b(f"fi2010/{seed}/{draw}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)

