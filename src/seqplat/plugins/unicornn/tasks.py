"""The UnICORNN paper's benchmarks beyond psMNIST: noise-padded CIFAR-10, EigenWorms and IMDB.

All three keep their data in memory and address training batches by step (one seeded
permutation per epoch), so a resumed run sees the same batches. Heads follow the authors' code:
``kaiming_normal_`` weights and zero biases (spec section 3).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import fsspec
import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from seqplat import Batch, DataError, Task, TaskConfig
from seqplat.core import data as core_data

from . import datasets

log = logging.getLogger(__name__)

Split = Literal["train", "valid", "test"]


def _kaiming_head(hidden_size: int, outputs: int) -> nn.Linear:
    head = nn.Linear(hidden_size, outputs)
    nn.init.kaiming_normal_(head.weight)
    nn.init.zeros_(head.bias)
    return head


class _InMemoryTask(Task):
    """Splits held as ``(items, labels)``; subclasses implement ``load_splits`` and ``make_batch``."""

    head_kind = "last_step"
    output_kind = "classification"
    primary_metric = "accuracy"
    primary_mode = "max"

    def __init__(self, config: Any):
        super().__init__(config)
        self._splits: dict[str, tuple[Any, Tensor]] | None = None
        self._perm: tuple[tuple[int, int], Tensor] | None = None

    def load_splits(self) -> dict[str, tuple[Any, Tensor]]:
        raise NotImplementedError

    def make_batch(self, split: str, idx: Tensor, generator: torch.Generator | None) -> Batch:
        raise NotImplementedError

    @property
    def splits(self) -> dict[str, tuple[Any, Tensor]]:
        if self._splits is None:
            loaded = self.load_splits()
            limit = getattr(self.config, "max_examples", None)
            if limit is not None:
                loaded = {k: (items[:limit], labels[:limit]) for k, (items, labels) in loaded.items()}
            self._splits = loaded
        return self._splits

    def prepare(self) -> None:
        self.splits  # noqa: B018 - loads and checks the data early

    def num_examples(self, split: str) -> int:
        return int(self.splits[split][1].shape[0])

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, self.num_examples("train") // batch_size)

    def epoch_permutation(self, epoch: int, seed: int) -> Tensor:
        """The training order of ``epoch`` (seeded by ``seed`` and ``epoch``; cached for the current epoch)."""
        if self._perm is None or self._perm[0] != (epoch, seed):
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            self._perm = ((epoch, seed), torch.randperm(self.num_examples("train"), generator=g))
        return self._perm[1]

    def train_batch(self, step: int, batch_size: int, seed: int) -> Batch:
        epoch, i = divmod(step, self.steps_per_epoch(batch_size))
        perm = self.epoch_permutation(epoch, seed)
        idx = perm[torch.arange(i * batch_size, (i + 1) * batch_size) % perm.numel()]  # wraps on tiny sets
        g = torch.Generator().manual_seed(seed * 7_919 + step)
        return self.make_batch("train", idx, g)

    def eval_batches(self, split: Literal["valid", "test"], batch_size: int) -> Iterator[Batch]:
        n = self.num_examples(split)
        for k, start in enumerate(range(0, n, batch_size)):
            g = torch.Generator().manual_seed(1_000_000 + k)
            yield self.make_batch(split, torch.arange(start, min(n, start + batch_size)), g)

    def build_head(self, hidden_size: int) -> nn.Module:
        return _kaiming_head(hidden_size, self.num_outputs)


def _data_path(path: str, dataset: str) -> str:
    """An absolute path/URL as is; a relative one under ``SEQPLAT_DATA/<dataset>/``."""
    if "://" in path or path.startswith("/"):
        return path
    root = core_data.data_root()
    if root is None:
        raise DataError(f"'{path}' is relative to SEQPLAT_DATA/{dataset}/, but SEQPLAT_DATA is not set")
    return f"{root.rstrip('/')}/{dataset}/{path}"


# -- noise-padded CIFAR-10 -------------------------------------------------------------------------

class NoisyCIFAR10Config(TaskConfig):
    noise_steps: int = Field(968, ge=0, description="N(0,1) noise steps appended after the 32 image rows (T=32+this)")
    noise_seed: int = Field(12345, ge=0, description="seed of the one noise tensor shared by all samples")
    fresh_noise: bool = Field(
        False, description="draw new noise for every sample (a different, harder task; the authors reuse one tensor)"
    )
    valid_size: int = Field(2000, ge=1, description="images held out of the 50k training set for validation")
    split_seed: int = Field(0, ge=0, description="seed of the train/valid split")
    png_folder: str | None = Field(
        None, description="read '<name>_<label>.png' images from this folder (relative to SEQPLAT_DATA/cifar10) "
        "and use them for every split: for pipeline tests only, not a benchmark"
    )
    max_examples: int | None = Field(None, ge=1, description="keep only the first N examples of each split")


class NoisyCIFAR10Task(_InMemoryTask):
    """Noise-padded CIFAR-10 (spec section 5): each image row (3 channels x 32 pixels = 96 values)
    is one step, then ``noise_steps`` steps of Gaussian noise; the label is read at the end."""

    config_class = NoisyCIFAR10Config

    def __init__(self, config: NoisyCIFAR10Config):
        super().__init__(config)
        self._noise: Tensor | None = None

    @property
    def input_features(self) -> int:
        return 96

    @property
    def num_outputs(self) -> int:
        return 10

    def load_splits(self) -> dict[str, tuple[Any, Tensor]]:
        cfg = self.config
        if cfg.png_folder is not None:
            images, labels = datasets.load_png_folder(_data_path(cfg.png_folder, "cifar10"))
            both = (torch.from_numpy(images), torch.from_numpy(labels))
            return {"train": both, "valid": both, "test": both}
        images, labels = datasets.load_cifar10("train")
        if cfg.valid_size >= len(labels):
            raise DataError(f"task.valid_size={cfg.valid_size} leaves no training images (have {len(labels)})")
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(cfg.split_seed))
        train, valid = perm[: len(labels) - cfg.valid_size], perm[len(labels) - cfg.valid_size :]
        images_t, labels_t = torch.from_numpy(images), torch.from_numpy(labels)
        test_images, test_labels = datasets.load_cifar10("test")
        return {
            "train": (images_t[train], labels_t[train]),
            "valid": (images_t[valid], labels_t[valid]),
            "test": (torch.from_numpy(test_images), torch.from_numpy(test_labels)),
        }

    def noise(self) -> Tensor:
        """The fixed noise tensor ``[noise_steps, 96]`` (drawn once from ``noise_seed``)."""
        g = torch.Generator().manual_seed(self.config.noise_seed)
        return torch.randn(self.config.noise_steps, 96, generator=g)

    def make_batch(self, split: str, idx: Tensor, generator: torch.Generator | None) -> Batch:
        images, labels = self.splits[split]
        x = images[idx].float().div_(255.0)                      # [b, 3, 32, 32], ToTensor scaling
        rows = x.permute(0, 2, 1, 3).reshape(len(idx), 32, 96)   # row r: (R, G, B) pixels of row r
        if self.config.fresh_noise:
            pad = torch.randn(len(idx), self.config.noise_steps, 96, generator=generator)
        else:
            if self._noise is None:
                self._noise = self.noise()
            pad = self._noise.expand(len(idx), -1, -1)
        return Batch(torch.cat([rows, pad], dim=1), labels[idx])


# -- EigenWorms (UEA) -----------------------------------------------------------------------------

class EigenWormsConfig(TaskConfig):
    problem: str = Field("EigenWorms", description="UEA problem name: reads <problem>_TRAIN.ts and <problem>_TEST.ts")
    folder: str = Field("eigenworms", description="dataset folder under SEQPLAT_DATA (and under the cache)")
    split_seed: int = Field(1234, ge=0, description="seed of the authors' re-split (sklearn train_test_split)")
    holdout_fraction: float = Field(
        0.3, gt=0.0, lt=1.0, description="fraction of the merged cases held out, then halved into valid/test"
    )
    num_features: int | None = Field(6, ge=1, description="channels (checked against the data; None: from the data)")
    num_classes: int | None = Field(5, ge=2, description="classes (checked against the data; None: from the data)")
    max_examples: int | None = Field(None, ge=1, description="keep only the first N examples of each split")


class EigenWormsTask(_InMemoryTask):
    """UEA EigenWorms (spec section 5): train and test merged, re-split 70/15/15 as the authors did
    (``train_test_split(test_size=0.3, random_state=1234)``, then the held-out part halved with the
    same seed: valid = the second split's train part, test = its test part)."""

    config_class = EigenWormsConfig

    def load_splits(self) -> dict[str, tuple[Any, Tensor]]:
        cfg = self.config
        train = datasets.load_uea(cfg.problem, "train", cfg.folder)
        test = datasets.load_uea(cfg.problem, "test", cfg.folder)
        values = np.concatenate([train.values, test.values])
        names = train.labels + test.labels
        classes = sorted(set(names))  # sklearn LabelEncoder order
        self._classes = classes
        labels = np.asarray([classes.index(n) for n in names], dtype=np.int64)
        self._check("num_features", values.shape[2], cfg.num_features)
        self._check("num_classes", len(classes), cfg.num_classes)
        tr, held = datasets.sklearn_style_split(len(labels), cfg.holdout_fraction, cfg.split_seed)
        va_rel, te_rel = datasets.sklearn_style_split(len(held), 0.5, cfg.split_seed)
        x, y = torch.from_numpy(values), torch.from_numpy(labels)
        return {"train": (x[tr], y[tr]), "valid": (x[held[va_rel]], y[held[va_rel]]),
                "test": (x[held[te_rel]], y[held[te_rel]])}

    @property
    def classes(self) -> list[str]:
        """Class names in label order (sorted, as sklearn's LabelEncoder)."""
        self.splits  # noqa: B018
        return self._classes

    def _check(self, field: str, found: int, declared: int | None) -> None:
        if declared is not None and declared != found:
            raise DataError(f"task.{field}={declared} but {self.config.problem} has {found}; set task.{field}={found}")

    @property
    def input_features(self) -> int:
        return self.config.num_features or int(self.splits["train"][0].shape[2])

    @property
    def num_outputs(self) -> int:
        return self.config.num_classes or len(self.classes)

    def make_batch(self, split: str, idx: Tensor, generator: torch.Generator | None) -> Batch:
        x, y = self.splits[split]
        return Batch(x[idx], y[idx])


# -- IMDB -----------------------------------------------------------------------------------------

class IMDBConfig(TaskConfig):
    max_vocab: int = Field(25000, ge=1, description="most frequent training tokens kept (plus <unk> and <pad>)")
    max_length: int | None = Field(None, ge=1, description="truncate reviews to this many tokens (None: keep all)")
    lowercase: bool = Field(False, description="lower-case before tokenizing (the authors' spaCy field did not)")
    valid_fraction: float = Field(
        0.3, gt=0.0, lt=1.0, description="part of the 25k training reviews used for validation"
    )
    split_seed: int = Field(0, ge=0, description="seed of the train/valid split")
    padding: Literal["right", "left"] = Field(
        "right", description="'right' pads after the review so the head reads a padded step (authors' code); "
        "'left' pads before it so the last step is the review's last token"
    )
    bucket_pool: int = Field(100, ge=1, description="bucketing: sort pools of this many batches by length")
    embedding_dropout: float = Field(
        0.65, ge=0.0, lt=1.0, description="drop whole rows of the embedding matrix (word types) during training"
    )
    glove: bool = Field(
        False, description="initialise the embedding from GloVe 6B (glove.6B.<dim>d.txt in SEQPLAT_DATA/glove, "
        "else downloaded from nlp.stanford.edu, 822 MB); False: N(0,1) rows"
    )
    max_examples: int | None = Field(None, ge=1, description="keep only N random reviews of each split (smoke tests)")


class WordDropoutEmbedding(nn.Embedding):
    """An embedding whose rows (whole word types) are dropped with probability ``p`` in training."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int, p: float):
        super().__init__(num_embeddings, embedding_dim, padding_idx=padding_idx)
        self.p = p

    def forward(self, ids: Tensor) -> Tensor:
        weight = self.weight
        if self.training and self.p > 0:
            keep = weight.new_empty(weight.shape[0], 1).bernoulli_(1.0 - self.p).div_(1.0 - self.p)
            weight = weight * keep
        return F.embedding(ids, weight, self.padding_idx)


class IMDBTask(_InMemoryTask):
    """IMDB sentiment (spec section 5): 25k train reviews split 70/30 into train/valid, 25k test;
    vocabulary from the training part; one logit and BCE-with-logits, read at the last step."""

    config_class = IMDBConfig
    glove_url: ClassVar[str] = "https://nlp.stanford.edu/data/glove.6B.zip"

    @property
    def vocab(self) -> list[str]:
        self.splits  # noqa: B018
        return self._vocab

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def num_outputs(self) -> int:
        return 2  # classes; the head has a single logit (BCE), as in the authors' code

    def load_splits(self) -> dict[str, tuple[Any, Tensor]]:
        cfg = self.config
        raw = datasets.load_aclimdb()
        g = torch.Generator().manual_seed(cfg.split_seed)
        train_all = raw["train"]
        perm = torch.randperm(len(train_all.labels), generator=g).tolist()
        n_valid = int(round(cfg.valid_fraction * len(perm)))
        parts = {"train": perm[n_valid:], "valid": perm[:n_valid]}
        test_perm = torch.randperm(len(raw["test"].labels), generator=g).tolist()
        if cfg.max_examples is not None:
            parts = {k: v[: cfg.max_examples] for k, v in parts.items()}
            test_perm = test_perm[: cfg.max_examples]
        sources = {"train": (train_all, parts["train"]), "valid": (train_all, parts["valid"]),
                   "test": (raw["test"], test_perm)}
        tokens = {k: [datasets.tokenize(src.texts[i], cfg.lowercase) for i in idx] for k, (src, idx) in sources.items()}
        self._vocab = datasets.build_vocab(tokens["train"], cfg.max_vocab)
        index = {w: i for i, w in enumerate(self._vocab)}
        out = {}
        for k, (src, idx) in sources.items():
            ids = [torch.tensor([index.get(t, 0) for t in toks[: cfg.max_length]] or [0], dtype=torch.long)
                   for toks in tokens[k]]
            out[k] = (ids, torch.tensor([src.labels[i] for i in idx], dtype=torch.long))
        return out

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, self.num_examples("train") // batch_size)

    def _epoch_batches(self, epoch: int, seed: int, batch_size: int) -> list[Tensor]:
        """Bucketed batches of one epoch: shuffle, sort pools of ``bucket_pool`` batches by length, shuffle batches."""
        key = (epoch, seed, batch_size)
        cached = getattr(self, "_buckets", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        ids, _ = self.splits["train"]
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(len(ids), generator=g)
        n = max(batch_size, (len(ids) // batch_size) * batch_size)
        perm = perm[torch.arange(n) % len(ids)]
        lengths = torch.tensor([len(ids[i]) for i in perm.tolist()])
        pool = batch_size * self.config.bucket_pool
        batches = []
        for s in range(0, n, pool):
            chunk = perm[s : s + pool]
            chunk = chunk[torch.argsort(lengths[s : s + pool], stable=True)]
            batches.extend(chunk.split(batch_size))
        order = torch.randperm(len(batches), generator=g).tolist()
        result = [batches[i] for i in order]
        self._buckets = (key, result)
        return result

    def train_batch(self, step: int, batch_size: int, seed: int) -> Batch:
        epoch, i = divmod(step, self.steps_per_epoch(batch_size))
        return self.make_batch("train", self._epoch_batches(epoch, seed, batch_size)[i], None)

    def eval_batches(self, split: Literal["valid", "test"], batch_size: int) -> Iterator[Batch]:
        ids, _ = self.splits[split]
        order = torch.argsort(torch.tensor([len(t) for t in ids]), stable=True)
        for chunk in order.split(batch_size):
            yield self.make_batch(split, chunk, None)

    def make_batch(self, split: str, idx: Tensor, generator: torch.Generator | None) -> Batch:
        ids, labels = self.splits[split]
        seqs = [ids[i] for i in idx.tolist()]
        width = max(len(s) for s in seqs)
        out = torch.full((len(seqs), width), 1, dtype=torch.long)  # <pad> = 1
        for r, s in enumerate(seqs):
            if self.config.padding == "right":
                out[r, : len(s)] = s
            else:
                out[r, width - len(s) :] = s
        return Batch(out, labels[idx])

    def build_encoder(self, embedding_size: int | None) -> tuple[nn.Module, int]:
        dim = embedding_size or 100
        emb = WordDropoutEmbedding(self.vocab_size, dim, padding_idx=1, p=self.config.embedding_dropout)
        with torch.no_grad():
            nn.init.normal_(emb.weight)  # torchtext's unk_init for words without a pretrained vector
            if self.config.glove:
                self._load_glove(emb.weight, dim)
            emb.weight[0].zero_()  # <unk> and <pad> rows start at zero (authors' code)
            emb.weight[1].zero_()
        return emb, dim

    def _load_glove(self, weight: Tensor, dim: int) -> None:
        name = f"glove.6B.{dim}d.txt"
        path = core_data.resolve("glove", core_data.compressed_names(name), url=self.glove_url, member=name)
        index = {w: i for i, w in enumerate(self.vocab)}
        hits = 0
        with fsspec.open(path, "rt", encoding="utf-8", compression="infer") as f:
            for line in f:
                word, _, rest = line.rstrip("\n").partition(" ")
                row = index.get(word)
                if row is None:
                    continue
                vec = torch.tensor([float(v) for v in rest.split(" ")])
                if vec.numel() != dim:
                    raise DataError(f"{path}: vector of '{word}' has {vec.numel()} values, expected {dim}")
                weight[row] = vec
                hits += 1
        log.info("imdb: GloVe vectors for %d of %d vocabulary entries", hits, len(index))

    def build_head(self, hidden_size: int) -> nn.Module:
        return _kaiming_head(hidden_size, 1)

    def batch_stats(self, out: Tensor, batch: Batch, with_grad: bool = False) -> dict[str, Tensor]:
        logit = out.reshape(-1)
        target = batch.targets.reshape(-1)
        loss = F.binary_cross_entropy_with_logits(logit, target.to(logit.dtype), reduction="sum")
        stats = {"loss_sum": loss, "count": torch.tensor(float(logit.numel()), device=out.device)}
        if not with_grad:
            pred = (logit > 0).long()
            conf = torch.bincount(target * 2 + pred, minlength=4).reshape(2, 2)
            stats = {k: v.detach().to(torch.float64) for k, v in stats.items()}
            stats["confusion"] = conf.to(torch.float64)
        return stats


__all__ = ["EigenWormsTask", "IMDBTask", "NoisyCIFAR10Task", "WordDropoutEmbedding"]
