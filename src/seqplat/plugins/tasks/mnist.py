"""Sequential MNIST (``smnist``) and permuted sequential MNIST (``psmnist``).

The 784 pixels of a 28x28 digit are read row-major (psmnist: in the order of one fixed random
permutation), ``pixels_per_step`` at a time, as values in [0, 1] (pixel / 255); the class (10) is
predicted at the last step. Files are the four canonical IDX files (gzip'ed or not) from
``SEQPLAT_DATA/mnist/`` or downloaded into the cache. The validation set is the *first*
``valid_size`` training images (as in TensorFlow's 55k/5k split used by the GAM-RHN and Dilated
RNN authors); training uses the rest, in an order reshuffled every epoch from ``(seed, epoch)``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from functools import lru_cache
from typing import Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor

from seqplat import Batch, DataError, Task, TaskConfig
from seqplat.core.data import DataFile, compressed_names, read_bytes

from .common import batched, derive_seed

MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
#: MD5 of the canonical .gz downloads (the values torchvision checks)
MNIST_MD5 = {
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}
PIXELS = 28 * 28
IMAGES_MAGIC = 0x00000803  # uint8 data, 3 dimensions
LABELS_MAGIC = 0x00000801  # uint8 data, 1 dimension


def mnist_file(stem: str) -> DataFile:
    """``<SEQPLAT_DATA>/mnist/<stem>[.gz]`` (also the ``train-images.idx3-ubyte`` spelling), else a download."""
    dotted = stem.replace("-idx", ".idx")
    return DataFile(
        "mnist", compressed_names(stem) + compressed_names(dotted),
        url=tuple(m + stem + ".gz" for m in MNIST_MIRRORS), checksum=f"md5:{MNIST_MD5[stem]}",
    )


def parse_idx(data: bytes, magic: int, url: str) -> Tensor:
    """An IDX array (big-endian header, uint8 payload) as a uint8 tensor; checks magic and size."""
    if len(data) < 8:
        raise DataError(f"Data file {url} is too short ({len(data)} bytes) to be an IDX file.")
    (found,) = struct.unpack(">I", data[:4])
    if found != magic:
        raise DataError(
            f"Data file {url} has IDX magic 0x{found:08x}, expected 0x{magic:08x}; it is not the right MNIST file "
            f"(or it is still compressed)."
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"Data file {url} ends inside its IDX header ({len(data)} bytes).")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    size = 1
    for d in dims:
        size *= d
    if len(data) != header + size:
        raise DataError(
            f"Data file {url} has {len(data) - header} data bytes, its IDX header {tuple(dims)} says {size}; "
            f"the file is truncated or corrupt."
        )
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(dims)


@lru_cache(maxsize=4)
def _load_pair(images_url: str, labels_url: str) -> tuple[Tensor, Tensor]:
    images = parse_idx(read_bytes(images_url), IMAGES_MAGIC, images_url)
    labels = parse_idx(read_bytes(labels_url), LABELS_MAGIC, labels_url)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"Data files {images_url} ({images.shape[0]} images) and {labels_url} "
                        f"({labels.shape[0]} labels) do not match.")
    if tuple(images.shape[1:]) != (28, 28):
        raise DataError(f"Data file {images_url} holds {tuple(images.shape[1:])} images, expected 28x28.")
    if int(labels.max()) > 9:
        raise DataError(f"Data file {labels_url} has label {int(labels.max())}; MNIST labels are 0-9.")
    return images.reshape(-1, PIXELS), labels.long()


def load_mnist(split: Literal["train", "test"]) -> tuple[Tensor, Tensor]:
    """``(images uint8 [n, 784], labels int64 [n])`` of the official train (60k) or test (10k) set."""
    prefix = "train" if split == "train" else "t10k"
    return _load_pair(mnist_file(f"{prefix}-images-idx3-ubyte").resolve(),
                      mnist_file(f"{prefix}-labels-idx1-ubyte").resolve())


class SequentialMNISTConfig(TaskConfig):
    """Sequential MNIST: pixels in row-major order."""

    valid_size: int = Field(
        5000, ge=0, le=59000, description="validation images carved from the start of the official train set"
    )
    pixels_per_step: int = Field(
        1, ge=1, le=PIXELS, description="pixels fed per time step (784 / this = sequence length)"
    )

    @field_validator("pixels_per_step")
    @classmethod
    def _divides(cls, v: int) -> int:
        if PIXELS % v:
            raise ValueError(f"must divide 784 (e.g. 1, 2, 4, 7, 14, 28, 56, 112), got {v}")
        return v


class PermutedMNISTConfig(SequentialMNISTConfig):
    """Permuted sequential MNIST: pixels in the order of one fixed random permutation."""

    permutation_seed: int = Field(
        92916, ge=0, description="seed of torch.Generator().manual_seed(...) for torch.randperm(784)"
    )


class SequentialMNISTTask(Task):
    """Sequential MNIST, one pixel (value/255) per step, 10 classes at the last step."""

    config_class = SequentialMNISTConfig
    config: SequentialMNISTConfig
    head_kind = "last_step"
    output_kind = "classification"
    primary_metric = "accuracy"
    primary_mode = "max"
    baseline = 0.1

    @property
    def input_features(self) -> int:
        return self.config.pixels_per_step

    @property
    def num_outputs(self) -> int:
        return 10

    @property
    def permutation(self) -> Tensor | None:
        """The pixel order (None: row-major)."""
        return None

    def split(self, split: str) -> tuple[Tensor, Tensor]:
        """``(images uint8 [n, 784], labels [n])`` of ``train`` (minus validation), ``valid`` or ``test``."""
        if split == "test":
            return load_mnist("test")
        images, labels = load_mnist("train")
        v = self.config.valid_size
        if split == "valid":
            return images[:v], labels[:v]
        if split == "train":
            return images[v:], labels[v:]
        raise ValueError(f"split must be 'train', 'valid' or 'test', got {split!r}")

    def prepare(self) -> None:
        self.split("train")
        self.split("test")

    def encode(self, images: Tensor) -> Tensor:
        """uint8 ``[b, 784]`` -> float ``[b, 784 / p, p]`` in [0, 1], permuted if the task says so."""
        if self.permutation is not None:
            images = images[:, self.permutation]
        p = self.config.pixels_per_step
        return images.to(torch.float32).div_(255.0).reshape(images.shape[0], PIXELS // p, p)

    def steps_per_epoch(self, batch_size: int) -> int:
        n = self.split("train")[0].shape[0]
        if n < batch_size:
            raise DataError(f"The MNIST train split has {n} images, fewer than batch size {batch_size}.")
        return n // batch_size

    def epoch_order(self, epoch: int, seed: int) -> Tensor:
        """The shuffled order of training images in ``epoch`` (a function of seed and epoch only)."""
        n = self.split("train")[0].shape[0]
        g = torch.Generator().manual_seed(derive_seed("mnist_epoch", seed, epoch))
        return torch.randperm(n, generator=g)

    def train_batch(self, step: int, batch_size: int, seed: int) -> Batch:
        images, labels = self.split("train")
        epoch, i = divmod(step, self.steps_per_epoch(batch_size))
        key = (epoch, seed)
        if getattr(self, "_order_key", None) != key:
            self._order, self._order_key = self.epoch_order(epoch, seed), key
        idx = self._order[i * batch_size : (i + 1) * batch_size]
        return Batch(self.encode(images[idx]), labels[idx])

    def eval_batches(self, split: Literal["valid", "test"], batch_size: int) -> Iterator[Batch]:
        images, labels = self.split(split)
        if images.shape[0] == 0:
            raise DataError(f"The MNIST {split} split is empty; set task.valid_size above 0.")
        return batched(lambda s: Batch(self.encode(images[s]), labels[s]), images.shape[0], batch_size)


class PermutedMNISTTask(SequentialMNISTTask):
    """Permuted sequential MNIST: a fixed pixel permutation (seed 92916), 10 classes at the last step."""

    config_class = PermutedMNISTConfig
    config: PermutedMNISTConfig

    def __init__(self, config: PermutedMNISTConfig):
        super().__init__(config)
        g = torch.Generator().manual_seed(config.permutation_seed)
        self._permutation = torch.randperm(PIXELS, generator=g)

    @property
    def permutation(self) -> Tensor:
        return self._permutation
