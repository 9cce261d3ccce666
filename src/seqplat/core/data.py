"""Dataset files: find them offline, or download, verify and cache them; read them decompressed.

Two places a file can come from, decided by the environment at call time:

* ``SEQPLAT_DATA`` set (a local folder or any fsspec URL): the file is looked up as
  ``<SEQPLAT_DATA>/<dataset>/<name>`` for each candidate name in turn, and nothing is ever
  downloaded. A missing file is a :class:`~seqplat.DataError` that says which names were tried.
* otherwise: the cache ``SEQPLAT_CACHE`` (default ``~/.cache/seqplat``, also any fsspec URL) is
  searched the same way; on a miss the canonical URL is downloaded through fsspec to a temporary
  name, its checksum checked where known, and renamed into place. A wanted member of a tar or zip
  archive is then copied out of the cached archive (links, absolute names and ``..`` are refused)
  and checked against its own checksum where known.

Readers (:func:`read_bytes`, :func:`read_text`) undo gzip, xz, bzip2 and zip transparently (by
content, not by name) and turn every malformed input -- empty files, truncated streams, non-UTF-8
text -- into a one-line :class:`~seqplat.DataError` naming the file.

Example::

    path = resolve("ptb", ["ptb.char.train.txt", "ptb.char.train.txt.gz"],
                   url="http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz",
                   member="simple-examples/data/ptb.char.train.txt")
    text = read_text(path)
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import logging
import lzma
import os
import posixpath
import stat
import tarfile
import uuid
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import fsspec
from fsspec.spec import AbstractFileSystem

from seqplat.core.errors import DataError

logger = logging.getLogger(__name__)

DATA_ENV = "SEQPLAT_DATA"
CACHE_ENV = "SEQPLAT_CACHE"
DEFAULT_CACHE = "~/.cache/seqplat"
_CHUNK = 1 << 20
_GLOB_CHARS = "*?["


# -- locations ---------------------------------------------------------------------------------

def data_root() -> str | None:
    """The offline data folder or URL from ``SEQPLAT_DATA`` (None when unset or empty)."""
    value = os.environ.get(DATA_ENV, "").strip()
    return value or None


def cache_root() -> str:
    """The download cache from ``SEQPLAT_CACHE`` (default ``~/.cache/seqplat``)."""
    value = os.environ.get(CACHE_ENV, "").strip() or DEFAULT_CACHE
    return os.path.expanduser(value) if "://" not in value else value


def _fs(root: str) -> tuple[AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(root)
    return fs, path.rstrip("/") or path


def _url(fs: AbstractFileSystem, path: str) -> str:
    """A string that :func:`fsspec.open` opens again: a plain path for local files."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        return path
    return fs.unstrip_protocol(path)


def _find(fs: AbstractFileSystem, folder: str, candidates: Sequence[str]) -> str | None:
    """The first candidate present in ``folder`` (names may be glob patterns)."""
    for name in candidates:
        path = posixpath.join(folder, name)
        if any(c in name for c in _GLOB_CHARS):
            hits = sorted(p for p in fs.glob(path) if fs.isfile(p) and ".part-" not in p)
            if hits:
                return hits[0]
        elif fs.isfile(path):
            return path
    return None


def _shown(root: str, dataset: str, name: str) -> str:
    return f"{root.rstrip('/')}/{dataset}/{name}"


# -- checksums ----------------------------------------------------------------------------------

def _parse_checksum(checksum: str | None) -> tuple[str, str] | None:
    """``"sha256:<hex>"`` or ``"md5:<hex>"`` (a bare hex string is taken as sha256)."""
    if checksum is None:
        return None
    algo, _, digest = checksum.partition(":") if ":" in checksum else ("sha256", "", checksum)
    if algo not in hashlib.algorithms_available:
        raise ValueError(f"unknown checksum algorithm {algo!r} in {checksum!r}; use 'sha256:<hex>'")
    return algo, digest.lower()


def file_checksum(url: str, algo: str = "sha256") -> str:
    """Hex digest of a file's stored bytes (no decompression)."""
    h = hashlib.new(algo)
    with fsspec.open(url, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _copy(src: io.RawIOBase | io.BufferedIOBase | object, fs: AbstractFileSystem, dest: str,
          checksum: str | None, what: str, hint: str) -> None:
    """Copy a readable stream to ``dest`` through a temporary name, verifying ``checksum``."""
    parsed = _parse_checksum(checksum)
    h = hashlib.new(parsed[0]) if parsed else None
    tmp = f"{dest}.part-{uuid.uuid4().hex[:12]}"
    fs.makedirs(posixpath.dirname(dest), exist_ok=True)
    try:
        with fs.open(tmp, "wb") as out:
            while chunk := src.read(_CHUNK):  # type: ignore[attr-defined]
                out.write(chunk)
                if h is not None:
                    h.update(chunk)
        if parsed and h is not None and h.hexdigest() != parsed[1]:
            raise DataError(
                f"{what} has {parsed[0]} {h.hexdigest()}, expected {parsed[1]} (corrupt or changed upstream); "
                f"{hint}"
            )
        fs.mv(tmp, dest)
    finally:
        if fs.exists(tmp):
            fs.rm(tmp)


# -- archives -----------------------------------------------------------------------------------

def _clean_member(name: str) -> str:
    while name.startswith("./"):
        name = name[2:]
    return name


def _check_member_name(name: str, where: str) -> None:
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
        raise DataError(f"{where} member '{name}' has an unsafe path (absolute or '..'); refusing it.")


def _open_member(archive_file: object, archive: str, member: str) -> tuple[object, object]:
    """``(container, stream)`` of ``member`` in a tar or zip archive, refusing links and odd names."""
    want = _clean_member(member)
    head = archive_file.read(4)  # type: ignore[attr-defined]
    archive_file.seek(0)  # type: ignore[attr-defined]
    if head == b"PK\x03\x04":
        zf = zipfile.ZipFile(archive_file)  # type: ignore[arg-type]
        for info in zf.infolist():
            if _clean_member(info.filename) != want:
                continue
            _check_member_name(info.filename, f"Archive {archive}")
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                raise DataError(f"Archive {archive} member '{info.filename}' is a symbolic link; refusing it.")
            if info.is_dir():
                raise DataError(f"Archive {archive} member '{info.filename}' is a folder, not a file.")
            return zf, zf.open(info)
        names = zf.namelist()
        zf.close()
        raise DataError(f"Archive {archive} has no member '{member}'; members: {_listing(names)}")
    try:
        tf = tarfile.open(fileobj=archive_file, mode="r:*")  # type: ignore[call-overload]  # noqa: SIM115
    except (tarfile.TarError, EOFError, OSError, lzma.LZMAError, zlib.error) as exc:
        raise DataError(f"Archive {archive} is not a readable tar or zip file ({exc}); delete it and retry.") from exc
    names = []
    try:
        for info in tf:
            names.append(info.name)
            if _clean_member(info.name) != want:
                continue
            _check_member_name(info.name, f"Archive {archive}")
            if info.issym() or info.islnk():
                raise DataError(f"Archive {archive} member '{info.name}' is a link; refusing it.")
            if not info.isfile():
                raise DataError(f"Archive {archive} member '{info.name}' is not a regular file.")
            return tf, tf.extractfile(info)
    except (tarfile.TarError, EOFError, OSError, lzma.LZMAError, zlib.error) as exc:
        tf.close()
        raise DataError(f"Archive {archive} is truncated or corrupt ({exc}); delete it and retry.") from exc
    except DataError:
        tf.close()
        raise
    tf.close()
    raise DataError(f"Archive {archive} has no member '{member}'; members: {_listing(names)}")


def _listing(names: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "") if names else "(none)"


# -- resolve ------------------------------------------------------------------------------------

def resolve(
    dataset: str,
    candidates: Sequence[str],
    *,
    url: str | Sequence[str] | None = None,
    checksum: str | None = None,
    member: str | None = None,
    member_checksum: str | None = None,
) -> str:
    """Find (or fetch) one dataset file and return a path/URL that :func:`read_bytes` opens.

    :param dataset: folder name under ``SEQPLAT_DATA`` and under the cache (``"ptb"``, ``"mnist"``).
    :param candidates: file names to look for, in order of preference; glob patterns allowed
        (``"text8*"``). The first is the canonical name: an extracted ``member`` is cached under it.
    :param url: canonical download URL, or several mirrors tried in order (None: no download).
    :param checksum: ``"sha256:<hex>"``/``"md5:<hex>"`` of the downloaded file, checked once after
        download (None: not checked).
    :param member: path of the wanted file inside the downloaded tar/zip archive (None: the
        download is the file itself).
    :param member_checksum: checksum of the extracted member, checked once after extraction.
    :raises DataError: with one line naming the file and the fix.
    """
    if not candidates:
        raise ValueError("resolve() needs at least one candidate file name")
    if member is not None:
        _check_member_name(_clean_member(member), f"The requested {dataset}")
    names = list(candidates)
    offline = data_root()
    if offline is not None:
        fs, root = _fs(offline)
        found = _find(fs, posixpath.join(root, dataset), names)
        if found is not None:
            return _url(fs, found)
        tried = ", ".join(n for n in names)
        raise DataError(
            f"No {dataset}/{names[0]} under {DATA_ENV}={offline} (tried {tried}); put one of these files in "
            f"{_shown(offline, dataset, '')} or unset {DATA_ENV} to download it"
            + (f" from {_mirrors(url)[0]}." if url else ".")
        )

    cache = cache_root()
    fs, root = _fs(cache)
    folder = posixpath.join(root, dataset)
    found = _find(fs, folder, names)
    if found is not None:
        return _url(fs, found)
    mirrors = _mirrors(url)
    hint = f"set {DATA_ENV} to a folder holding {dataset}/{names[0]}"
    if not mirrors:
        raise DataError(f"No {dataset}/{names[0]} in the cache {cache} and no download source is known; {hint}.")

    # a download that is the file itself is cached under the first candidate name (URLs such as
    # ".../file_downloaded" do not name the file); an archive keeps its own name
    remote_name = posixpath.basename(mirrors[0].rstrip("/"))
    plain = member is None and remote_name not in names and not any(c in names[0] for c in "*?[")
    archive = posixpath.join(folder, names[0] if plain else remote_name)
    if not fs.isfile(archive):
        _download(mirrors, fs, archive, checksum, dataset, names[0], hint)
    if member is None:
        return _url(fs, archive)
    dest = posixpath.join(folder, names[0])
    shown = _url(fs, archive)
    with fs.open(archive, "rb") as f:
        container, stream = _open_member(f, shown, member)
        try:
            _copy(stream, fs, dest, member_checksum, f"{shown} member '{member}'",
                  f"delete {shown} to download it again, or {hint}")
        except (tarfile.TarError, EOFError, OSError, lzma.LZMAError, zlib.error, zipfile.BadZipFile) as exc:
            raise DataError(
                f"Archive {shown} is truncated or corrupt ({exc}); delete it and retry, or {hint}."
            ) from exc
        finally:
            container.close()  # type: ignore[attr-defined]
    logger.info("extracted %s from %s", names[0], shown)
    return _url(fs, dest)


def _mirrors(url: str | Sequence[str] | None) -> list[str]:
    if url is None:
        return []
    return [url] if isinstance(url, str) else list(url)


def _download(mirrors: list[str], fs: AbstractFileSystem, dest: str, checksum: str | None,
              dataset: str, name: str, hint: str) -> None:
    errors = []
    for src_url in mirrors:
        logger.info("downloading %s to %s", src_url, _url(fs, dest))
        try:
            with fsspec.open(src_url, "rb") as src:
                _copy(src, fs, dest, checksum, f"Download {src_url}", hint)
            return
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - network/filesystem errors of any backend
            errors.append(f"{src_url}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    raise DataError(f"Could not download {dataset}/{name} ({'; '.join(errors)}); download it by hand and {hint}.")


# -- readers ------------------------------------------------------------------------------------

def _decompress(raw: bytes, url: str, member: str | None = None) -> bytes:
    """Undo gzip/xz/bzip2/zip by magic bytes; plain bytes pass through."""
    try:
        if raw[:2] == b"\x1f\x8b":
            return gzip.decompress(raw)
        if raw[:6] == b"\xfd7zXZ\x00":
            return lzma.decompress(raw)
        if raw[:3] == b"BZh" and raw[4:10] == b"1AY&SY":
            return bz2.decompress(raw)
        if raw[:4] == b"PK\x03\x04":
            with zipfile.ZipFile(io.BytesIO(raw)) as zf:
                files = [i for i in zf.infolist() if not i.is_dir()]
                if member is None:
                    if len(files) != 1:
                        raise DataError(
                            f"Zip file {url} holds {len(files)} files ({_listing([i.filename for i in files])}); "
                            f"name the member to read."
                        )
                    member = files[0].filename
                container, stream = _open_member(io.BytesIO(raw), url, member)
                with container, stream:  # type: ignore[attr-defined]
                    return stream.read()  # type: ignore[attr-defined]
    except DataError:
        raise
    except (EOFError, OSError, lzma.LZMAError, zlib.error, zipfile.BadZipFile) as exc:
        raise DataError(
            f"Data file {url} is truncated or corrupt ({type(exc).__name__}: {exc}); replace it with a good copy."
        ) from exc
    return raw


def read_bytes(url: str, member: str | None = None) -> bytes:
    """The decompressed content of a data file (``member``: which file of a zip to read)."""
    try:
        with fsspec.open(url, "rb") as f:
            raw = f.read()
    except FileNotFoundError as exc:
        raise DataError(f"Data file {url} does not exist; check {DATA_ENV} or the path in the config.") from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"Data file {url} cannot be read ({type(exc).__name__}: {exc}).") from exc
    if not raw:
        raise DataError(f"Data file {url} is empty; replace it with a good copy.")
    data = _decompress(raw, url, member)
    if not data:
        raise DataError(f"Data file {url} is empty after decompression; replace it with a good copy.")
    return data


def read_text(url: str, encoding: str = "utf-8", member: str | None = None) -> str:
    """The decompressed content of a text file, decoded strictly."""
    data = read_bytes(url, member)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise DataError(
            f"Data file {url} is not {encoding} text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
            f"check that it is the right file."
        ) from exc


@dataclass(frozen=True)
class DataFile:
    """A dataset file described once (where to look, where to download from) and fetched on demand.

    Example::

        TRAIN = DataFile("ptb", ("ptb.train.txt", "ptb.train.txt.gz"),
                         url=PTB_URL, member="simple-examples/data/ptb.train.txt")
        text = TRAIN.read_text()
    """

    dataset: str
    candidates: tuple[str, ...]
    url: str | tuple[str, ...] | None = None
    checksum: str | None = None
    member: str | None = None
    member_checksum: str | None = None

    def resolve(self) -> str:
        """Path or URL of the file (see :func:`resolve`)."""
        return resolve(self.dataset, self.candidates, url=self.url, checksum=self.checksum,
                       member=self.member, member_checksum=self.member_checksum)

    def read_bytes(self) -> bytes:
        return read_bytes(self.resolve())

    def read_text(self, encoding: str = "utf-8") -> str:
        return read_text(self.resolve(), encoding)


def compressed_names(name: str) -> tuple[str, ...]:
    """``name`` and its ``.gz``/``.xz``/``.bz2`` variants, in that order."""
    return (name, f"{name}.gz", f"{name}.xz", f"{name}.bz2")
