"""Readers for the canonical files of the UnICORNN benchmarks (no third-party data libraries).

* CIFAR-10 python batches (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``): pickled dicts
  with ``b"data"`` uint8 ``[10000, 3072]`` (R, G, B planes, row-major 32x32) and ``b"labels"``;
  also a folder of PNG files named ``<anything>_<label>.png`` (the layout of the 20-image test copy).
* aclImdb (``aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt`` inside a tar archive).
* UEA/UCR ``.ts`` files (sktime format): ``@`` header lines, then one case per line, dimensions
  separated by ``:``, values by ``,``, the class label (or regression target) last.

Files are found through :mod:`seqplat.core.data` (``SEQPLAT_DATA`` offline, else download + cache).
"""

from __future__ import annotations

import io
import math
import pickle
import posixpath
import re
import tarfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import fsspec
import numpy as np

from seqplat import DataError
from seqplat.core import data as core_data

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "md5:c58f30108f718f92721af3b95e74349a"
IMDB_URL = "https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz"
UEA_URL = "https://www.timeseriesclassification.com/aeon-toolkit/{problem}.zip"


# -- CIFAR-10 -------------------------------------------------------------------------------------

class _SafeUnpickler(pickle.Unpickler):
    """Unpickles only plain containers and numpy arrays (what CIFAR batches hold)."""

    ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("builtins", "bytes"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def parse_cifar_batch(raw: bytes, where: str = "CIFAR batch") -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR-10 python batch as ``(images uint8 [n, 3, 32, 32], labels int64 [n])``."""
    try:
        obj = _SafeUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise DataError(f"{where} is not a CIFAR-10 python batch ({exc})") from exc
    if not isinstance(obj, dict) or b"data" not in obj or b"labels" not in obj:
        raise DataError(f"{where} is not a CIFAR-10 python batch (needs keys b'data' and b'labels')")
    data = np.asarray(obj[b"data"], dtype=np.uint8)
    labels = np.asarray(obj[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise DataError(f"{where}: data has shape {data.shape} and {labels.shape[0]} labels; expected [n, 3072]")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The canonical CIFAR-10 ``train`` (50k) or ``test`` (10k) split, found via ``SEQPLAT_DATA`` or downloaded."""
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    parts = []
    for name in names:
        try:
            path = core_data.resolve("cifar10", [f"cifar-10-batches-py/{name}", name], url=CIFAR_URL,
                                     checksum=CIFAR_MD5, member=f"cifar-10-batches-py/{name}")
            parts.append(parse_cifar_batch(core_data.read_bytes(path), path))
        except DataError:
            if core_data.data_root() is None:
                raise
            archive = core_data.resolve("cifar10", ["cifar-10-python.tar.gz"])  # offline: the archive itself
            parts.append(parse_cifar_batch(_tar_member(archive, f"cifar-10-batches-py/{name}"), archive))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _tar_member(url: str, member: str) -> bytes:
    with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:*") as tf:
        for info in tf:
            name = info.name[2:] if info.name.startswith("./") else info.name
            if name == member and info.isfile():
                stream = tf.extractfile(info)
                assert stream is not None
                return stream.read()
    raise DataError(f"Archive {url} has no member '{member}'")


_PNG_LABEL = re.compile(r"_(\d)\.png$")


def load_png_folder(folder: str) -> tuple[np.ndarray, np.ndarray]:
    """Images ``<anything>_<label>.png`` of a folder (local or fsspec URL), sorted by name.

    Returns ``(images uint8 [n, 3, 32, 32], labels int64 [n])``. PNGs are decoded by matplotlib.
    """
    import matplotlib.image as mpimg

    fs, root = fsspec.core.url_to_fs(folder)
    files = sorted(p for p in fs.glob(posixpath.join(root, "*.png")) if _PNG_LABEL.search(p))
    if not files:
        raise DataError(f"No '<name>_<label>.png' images in {folder}")
    images, labels = [], []
    for path in files:
        with fs.open(path, "rb") as f:
            img = mpimg.imread(io.BytesIO(f.read()), format="png")
        if img.dtype != np.uint8:  # matplotlib returns floats in [0, 1] for 8-bit PNGs
            img = np.rint(np.asarray(img) * 255.0).astype(np.uint8)
        if img.shape[:2] != (32, 32) or img.ndim != 3 or img.shape[2] < 3:
            raise DataError(f"{path}: expected a 32x32 RGB image, got shape {img.shape}")
        images.append(img[:, :, :3].transpose(2, 0, 1))
        labels.append(int(_PNG_LABEL.search(path).group(1)))  # type: ignore[union-attr]
    return np.stack(images), np.asarray(labels, dtype=np.int64)


# -- IMDB -----------------------------------------------------------------------------------------

_IMDB_MEMBER = re.compile(r"^(?:\./)?aclImdb/(train|test)/(pos|neg)/(\d+)_(\d+)\.txt$")


@dataclass
class ImdbReviews:
    """Raw reviews of one split, sorted by (label, id) for a stable order."""

    texts: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)  # 1 = pos, 0 = neg


def load_aclimdb() -> dict[str, ImdbReviews]:
    """``{"train": ..., "test": ...}`` from ``aclImdb_v1.tar.gz`` (or the labelled ``.tar.xz`` copy)."""
    path = core_data.resolve("imdb", ["aclImdb_v1.tar.gz", "aclImdb_labelled.tar.xz"], url=IMDB_URL)
    return read_aclimdb_tar(path)


def read_aclimdb_tar(url: str) -> dict[str, ImdbReviews]:
    """Parse the labelled reviews of an aclImdb tar archive (any compression tarfile reads)."""
    found: dict[str, list[tuple[int, int, str]]] = {"train": [], "test": []}
    try:
        with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r:*") as tf:
            for info in tf:
                m = _IMDB_MEMBER.match(info.name)
                if not m or not info.isfile():
                    continue
                stream = tf.extractfile(info)
                assert stream is not None
                text = stream.read().decode("utf-8")
                found[m.group(1)].append((int(m.group(2) == "pos"), int(m.group(3)), text))
    except (tarfile.TarError, EOFError, OSError, UnicodeDecodeError) as exc:
        raise DataError(f"IMDB archive {url} cannot be read ({type(exc).__name__}: {exc})") from exc
    out = {}
    for split, items in found.items():
        if not items:
            raise DataError(f"IMDB archive {url} has no aclImdb/{split}/{{pos,neg}}/*.txt reviews")
        items.sort(key=lambda r: (r[0], r[1]))
        out[split] = ImdbReviews([r[2] for r in items], [r[0] for r in items])
    return out


_TOKEN = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)?|[^\sA-Za-z0-9]")
_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


def tokenize(text: str, lowercase: bool = False) -> list[str]:
    """Words (with an attached ``'s``/``'t`` clitic) and single punctuation marks; ``<br />`` removed.

    A regular-expression stand-in for the spaCy tokenizer the authors used through torchtext.
    """
    text = _BREAK.sub(" ", text)
    if lowercase:
        text = text.lower()
    return _TOKEN.findall(text)


UNK, PAD = "<unk>", "<pad>"


def build_vocab(token_lists: Iterable[list[str]], max_size: int) -> list[str]:
    """``[<unk>, <pad>]`` + the ``max_size`` most frequent tokens (ties alphabetically, as torchtext)."""
    counts: Counter[str] = Counter()
    for toks in token_lists:
        counts.update(toks)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [UNK, PAD] + [w for w, _ in ranked[:max_size]]


# -- UEA .ts --------------------------------------------------------------------------------------

@dataclass
class TsData:
    """A parsed ``.ts`` file: ``values`` float32 ``[n, length, dims]`` and one label/target per case."""

    values: np.ndarray
    labels: list[str]
    header: dict[str, str]
    class_labels: list[str] | None = None

    @property
    def targets(self) -> np.ndarray:
        """Regression targets (``@targetLabel true`` files) as float32."""
        return np.asarray([float(v) for v in self.labels], dtype=np.float32)


def parse_ts(text: str, where: str = ".ts file") -> TsData:
    """Parse a UEA/UCR ``.ts`` file with equal-length series (missing values ``?`` become NaN)."""
    header: dict[str, str] = {}
    rows: list[np.ndarray] = []
    labels: list[str] = []
    in_data = False
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            if not line.startswith("@"):
                raise DataError(f"{where}:{lineno}: expected an @ header line before @data, got {line[:40]!r}")
            key, _, value = line[1:].partition(" ")
            key = key.lower()
            if key == "data":
                in_data = True
            else:
                header[key] = value.strip()
            continue
        if header.get("timestamps", "false").lower() == "true" or "(" in line:
            raise DataError(f"{where}:{lineno}: time-stamped .ts series are not supported")
        parts = line.split(":")
        has_label = header.get("classlabel", "false").split()[:1] == ["true"] or \
            header.get("targetlabel", "false").lower() == "true"
        dims = parts[:-1] if has_label else parts
        if has_label:
            labels.append(parts[-1].strip())
        try:
            series = [np.array([math.nan if v.strip() == "?" else float(v) for v in d.split(",")], dtype=np.float32)
                      for d in dims]
        except ValueError as exc:
            raise DataError(f"{where}:{lineno}: bad number ({exc})") from exc
        lengths = {len(s) for s in series}
        if len(lengths) != 1:
            raise DataError(f"{where}:{lineno}: dimensions have different lengths {sorted(lengths)}; "
                            "unequal-length series are not supported")
        rows.append(np.stack(series, axis=1))  # [length, dims]
    if not in_data:
        raise DataError(f"{where}: no @data line")
    if not rows:
        raise DataError(f"{where}: no cases after @data")
    shapes = {r.shape for r in rows}
    if len(shapes) != 1:
        raise DataError(f"{where}: cases have different shapes {sorted(shapes)}; unequal lengths are not supported")
    if "dimensions" in header and int(header["dimensions"]) != rows[0].shape[1]:
        raise DataError(f"{where}: header says {header['dimensions']} dimensions, cases have {rows[0].shape[1]}")
    class_labels = None
    cl = header.get("classlabel", "").split()
    if cl[:1] == ["true"]:
        class_labels = cl[1:]
        unknown = sorted(set(labels) - set(class_labels))
        if unknown:
            raise DataError(f"{where}: labels {unknown} are not declared in @classLabel {class_labels}")
    return TsData(np.stack(rows), labels, header, class_labels)


def load_uea(problem: str, split: str, folder: str = "eigenworms") -> TsData:
    """``<problem>_<TRAIN|TEST>.ts`` (plain, ``.gz`` or in a sub-folder) from ``SEQPLAT_DATA/<folder>``
    or from the archive's ``<problem>.zip``."""
    name = f"{problem}_{split.upper()}.ts"
    cands = [*core_data.compressed_names(name), *(f"*/{n}" for n in core_data.compressed_names(name))]
    path = core_data.resolve(folder, cands, url=UEA_URL.format(problem=problem), member=name)
    return parse_ts(core_data.read_text(path), path)


def sklearn_style_split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train_idx, test_idx)`` exactly as ``sklearn.model_selection.train_test_split(..., random_state=seed)``.

    sklearn draws ``RandomState(seed).permutation(n)``, takes the first ``ceil(f*n)`` as test and
    the next ``n - ceil(f*n)`` as train (the authors' EigenWorms split, seed 1234).
    """
    n_test = math.ceil(test_fraction * n)
    perm = np.random.RandomState(seed).permutation(n)
    return perm[n_test:], perm[:n_test]
