"""N-MNIST event streams (Orchard et al. 2015) as token sequences with timestamps (spec section 4.4).

Files: ``$SEQPLAT_DATA/nmnist/Train.zip`` and ``Test.zip``, the canonical archives holding
``Train/<digit>/<id>.bin`` (``Test/...``). Each event is 5 bytes: ``x``, ``y``, then polarity in bit 7
of byte 2 and a 23-bit timestamp in microseconds (bits 6-0 of byte 2, bytes 3-4), big-endian.

Encoding (the paper's event input, as the spec recalls it): every event becomes one step whose token is
its address ``polarity * 34 * 34 + y * 34 + x`` (2,312 addresses, looked up in a learned embedding) and
whose timestamp is the event time in ms. A fraction ``rho`` of events is kept at random (``event_rate``
in training, ``eval_event_rate`` at evaluation). Sequences are left-padded; padded steps have timestamp
NaN, so a time-aware cell holds its state there.

Zip reading is defensive: members are read in memory (never extracted), names must match the
canonical pattern, sizes are bounded before and while reading, and event fields are range-checked.
"""

from __future__ import annotations

import re
import stat
import zipfile
from collections.abc import Iterator
from typing import Literal

import fsspec
import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from seqplat import Batch, DataError, Task, TaskConfig
from seqplat.core.data import resolve

SENSOR = 34
NUM_ADDRESSES = 2 * SENSOR * SENSOR
MAX_MEMBER_BYTES = 4 * 1024 * 1024  # canonical files are < 100 kB; refuse anything absurd
_SPLIT_CODE = {"train": 0, "valid": 1, "test": 2}
#: canonical archives (Mendeley Data 468j46mzdv, as Tonic downloads them) and their md5 digests. They are
#: not passed to ``resolve`` yet: both URLs end in ``file_downloaded``, the name the cache would store
#: them under, so Train and Test would collide (see the plugin docs). Offline copies via SEQPLAT_DATA work.
SOURCES = {
    "Train.zip": ("https://data.mendeley.com/public-files/datasets/468j46mzdv/files/"
                  "39c25547-014b-4137-a934-9d29fa53c7a0/file_downloaded", "md5:20959b8e626244a1b502305a9e6e2031"),
    "Test.zip": ("https://data.mendeley.com/public-files/datasets/468j46mzdv/files/"
                 "05a4d654-7e03-4c15-bdfa-9bb2bcbea494/file_downloaded", "md5:69ca8762b2fe404d9b9bad1103e97832"),
}


def decode_events(raw: bytes, name: str = "<bytes>") -> tuple[np.ndarray, np.ndarray]:
    """Addresses (int16) and timestamps in us (int32) of one ``.bin`` file; raises DataError if malformed."""
    if len(raw) % 5:
        raise DataError(f"N-MNIST file {name}: {len(raw)} bytes is not a whole number of 5-byte events")
    ev = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 5).astype(np.int64)
    x, y = ev[:, 0], ev[:, 1]
    if ev.size and (x.max() >= SENSOR or y.max() >= SENSOR):
        raise DataError(f"N-MNIST file {name}: coordinates outside the 34x34 sensor (max x={x.max()}, y={y.max()})")
    polarity = ev[:, 2] >> 7
    ts = ((ev[:, 2] & 0x7F) << 16) | (ev[:, 3] << 8) | ev[:, 4]
    ids = polarity * SENSOR * SENSOR + y * SENSOR + x
    return ids.astype(np.int16), ts.astype(np.int32)  # compact: the full set holds ~250M events


def encode_events(x: np.ndarray, y: np.ndarray, polarity: np.ndarray, ts: np.ndarray) -> bytes:
    """Inverse of :func:`decode_events` (used to build test fixtures)."""
    ev = np.stack([x, y, (polarity << 7) | ((ts >> 16) & 0x7F), (ts >> 8) & 0xFF, ts & 0xFF], axis=1)
    return ev.astype(np.uint8).tobytes()


def read_archive(url: str, folder: str, limit: int | None = None) -> list[tuple[int, int, bytes]]:
    """``(label, id, raw bytes)`` of every ``<folder>/<digit>/<id>.bin`` in a zip, sorted by id."""
    pattern = re.compile(rf"^{folder}/([0-9])/([0-9]{{1,6}})\.bin$")
    out: list[tuple[int, int, bytes]] = []
    try:
        with fsspec.open(url, "rb") as f, zipfile.ZipFile(f) as zf:
            for info in zf.infolist():
                name = info.filename
                if info.is_dir() or name.startswith("__MACOSX/") or name.rsplit("/", 1)[-1].startswith("."):
                    continue
                if name.startswith(("/", "\\")) or ".." in name.split("/") or "\\" in name:
                    raise DataError(f"N-MNIST archive {url}: unsafe member name {name!r}")
                m = pattern.match(name)
                if m is None:
                    continue
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise DataError(f"N-MNIST archive {url}: member {name} is a symbolic link; refusing it")
                if info.file_size > MAX_MEMBER_BYTES:
                    raise DataError(f"N-MNIST archive {url}: member {name} declares {info.file_size} bytes, "
                                    f"more than the {MAX_MEMBER_BYTES} allowed")
                with zf.open(info) as member:
                    raw = member.read(MAX_MEMBER_BYTES + 1)
                if len(raw) > MAX_MEMBER_BYTES:
                    raise DataError(f"N-MNIST archive {url}: member {name} inflates beyond {MAX_MEMBER_BYTES} bytes")
                out.append((int(m.group(1)), int(m.group(2)), raw))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, RuntimeError, NotImplementedError, OSError) as exc:
        raise DataError(f"N-MNIST archive {url} cannot be read ({type(exc).__name__}: {exc})") from exc
    if not out:
        raise DataError(f"N-MNIST archive {url} holds no '{folder}/<digit>/<id>.bin' files")
    out.sort(key=lambda r: r[1])
    return out[:limit] if limit is not None else out


def archive_url(folder: Literal["Train", "Test"]) -> str:
    """Path of ``Train.zip``/``Test.zip`` under ``SEQPLAT_DATA/nmnist`` (or the cache); DataError if absent."""
    return resolve("nmnist", (f"{folder}.zip", f"{folder.lower()}.zip"))


class NMNISTConfig(TaskConfig):
    """Options of the ``nmnist`` task."""

    event_rate: float = Field(
        0.75, gt=0.0, le=1.0, description="rho in training: each event is kept with this probability"
    )
    eval_event_rate: float | None = Field(
        None, gt=0.0, le=1.0, description="rho at evaluation (None: event_rate; the paper also tests 0.4 and 1.0)"
    )
    max_events: int | None = Field(
        None, ge=1, description="keep at most this many events per sample, evenly spaced (None: all; CPU runs cap it)"
    )
    time_unit_us: float = Field(1000.0, gt=0.0, description="timestamps are us / time_unit_us (1000: milliseconds)")
    valid_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of Train.zip held out for validation")
    split_seed: int = Field(0, ge=0, description="seed of the train/valid split")
    eval_seed: int = Field(1, ge=0, description="seed of the event subsampling at evaluation")
    max_train_samples: int | None = Field(None, ge=1, description="read only the first N samples of Train.zip")
    max_test_samples: int | None = Field(None, ge=1, description="read only the first N samples of Test.zip")
    embedding_size: int = Field(40, ge=1, description="address embedding width when model.embedding_size is unset")
    times_as_feature: bool = Field(
        False, description="append the timestamp (ms * time_feature_scale) to the embedding (cells that ignore times)"
    )
    time_feature_scale: float = Field(0.01, gt=0.0, description="scale of the time feature (0.01: ~0-3.4 for 340 ms)")


class EventEncoder(nn.Module):
    """Address embedding, optionally followed by the timestamp as one more feature.

    Input ``[b,t]`` addresses, or ``[b,t,2]`` (address, time in us, -1 on padding) with the time feature.
    """

    def __init__(self, embedding_size: int, time_feature_scale: float | None):
        super().__init__()
        self.embedding = nn.Embedding(NUM_ADDRESSES, embedding_size)
        self.time_feature_scale = time_feature_scale

    def forward(self, inputs: Tensor) -> Tensor:
        if self.time_feature_scale is None:
            return self.embedding(inputs)
        ids, us = inputs[..., 0], inputs[..., 1]
        emb = self.embedding(ids)
        feature = (us.clamp_min(0).to(emb.dtype) / 1000.0 * self.time_feature_scale).unsqueeze(-1)
        return torch.cat([emb, feature], dim=-1)


class NMNISTTask(Task):
    """N-MNIST digit classification from raw event streams (address tokens + timestamps)."""

    config_class = NMNISTConfig
    provides_times = True
    head_kind = "last_step"
    output_kind = "classification"
    primary_metric = "accuracy"
    primary_mode = "max"
    baseline = 0.1

    config: NMNISTConfig

    def __init__(self, config: NMNISTConfig):
        super().__init__(config)
        self._samples: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] | None = None

    @property
    def vocab_size(self) -> int:
        return NUM_ADDRESSES

    @property
    def input_features(self) -> int:
        return 1

    @property
    def num_outputs(self) -> int:
        return 10

    # -- data ---------------------------------------------------------------------------------------
    def prepare(self) -> None:
        self.samples("train")

    def samples(self, split: str) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """``(label, addresses, timestamps_us)`` of every sample of ``split``."""
        if self._samples is None:
            cfg = self.config
            train = [(lab, *decode_events(raw, f"Train/{lab}/{i:05d}.bin"))
                     for lab, i, raw in read_archive(archive_url("Train"), "Train", cfg.max_train_samples)]
            test = [(lab, *decode_events(raw, f"Test/{lab}/{i:05d}.bin"))
                    for lab, i, raw in read_archive(archive_url("Test"), "Test", cfg.max_test_samples)]
            perm = np.random.default_rng(cfg.split_seed).permutation(len(train))
            n_valid = int(round(cfg.valid_fraction * len(train)))
            valid_idx = set(perm[:n_valid].tolist())
            self._samples = {
                "train": [s for i, s in enumerate(train) if i not in valid_idx],
                "valid": [s for i, s in enumerate(train) if i in valid_idx],
                "test": test,
            }
        return self._samples[split]

    def encode(self, samples: list[tuple[int, np.ndarray, np.ndarray]], rate: float,
               rng: np.random.Generator) -> Batch:
        """Subsample events (rate rho, then the ``max_events`` cap) and left-pad into one batch."""
        cfg = self.config
        kept = []
        for _, ids, ts in samples:
            keep = rng.random(len(ids)) < rate if rate < 1.0 else np.ones(len(ids), dtype=bool)
            if not keep.any() and len(ids):
                keep[rng.integers(len(ids))] = True  # never an empty sequence
            ids_k, ts_k = ids[keep], ts[keep]
            if cfg.max_events is not None and len(ids_k) > cfg.max_events:
                sel = np.linspace(0, len(ids_k) - 1, cfg.max_events).round().astype(np.int64)
                ids_k, ts_k = ids_k[sel], ts_k[sel]
            kept.append((ids_k, ts_k))
        n = max(1, max(len(i) for i, _ in kept))
        b = len(samples)
        tokens = np.zeros((b, n), dtype=np.int64)
        us = np.full((b, n), -1, dtype=np.int64)
        for row, (ids_k, ts_k) in enumerate(kept):
            if len(ids_k):
                tokens[row, n - len(ids_k):] = ids_k
                us[row, n - len(ids_k):] = ts_k
        times = torch.from_numpy(np.where(us >= 0, us / cfg.time_unit_us, np.nan).astype(np.float32))
        inputs = torch.from_numpy(np.stack([tokens, us], axis=-1) if cfg.times_as_feature else tokens)
        targets = torch.tensor([lab for lab, _, _ in samples], dtype=torch.long)
        return Batch(inputs=inputs, targets=targets, times=times)

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, len(self.samples("train")) // batch_size)

    def train_batch(self, step: int, batch_size: int, seed: int) -> Batch:
        data = self.samples("train")
        per_epoch = self.steps_per_epoch(batch_size)
        epoch, pos = divmod(step, per_epoch)
        order = np.random.default_rng([seed, epoch, 17]).permutation(len(data))
        idx = order[(pos * batch_size) % len(data):][:batch_size]
        if len(idx) < batch_size:  # fewer samples than one batch: wrap around
            idx = np.resize(order, batch_size)
        rng = np.random.default_rng([seed, step, _SPLIT_CODE["train"]])
        return self.encode([data[i] for i in idx], self.config.event_rate, rng)

    def eval_batches(self, split: Literal["valid", "test"], batch_size: int) -> Iterator[Batch]:
        cfg = self.config
        data = self.samples(split)
        rate = cfg.eval_event_rate if cfg.eval_event_rate is not None else cfg.event_rate
        for i, first in enumerate(range(0, len(data), batch_size)):
            rng = np.random.default_rng([cfg.eval_seed, i, _SPLIT_CODE[split]])
            yield self.encode(data[first : first + batch_size], rate, rng)

    # -- model pieces --------------------------------------------------------------------------------
    def build_encoder(self, embedding_size: int | None) -> tuple[nn.Module, int]:
        size = embedding_size or self.config.embedding_size
        scale = self.config.time_feature_scale if self.config.times_as_feature else None
        return EventEncoder(size, scale), size + (1 if scale is not None else 0)

