"""seqplat.core.data: offline lookup, download + cache + checksum, safe archive members, readers."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import tarfile
import uuid
import zipfile

import fsspec
import pytest

from seqplat import DataError
from seqplat.core import data
from seqplat.core.data import DataFile, read_bytes, read_text, resolve

TEXT = b"the quick brown fox\n" * 50


@pytest.fixture
def mem():
    """A fresh folder in fsspec's memory filesystem, removed afterwards."""
    fs = fsspec.filesystem("memory")
    root = f"/t{uuid.uuid4().hex[:10]}"
    fs.makedirs(root, exist_ok=True)
    yield fs, root
    fs.rm(root, recursive=True)


@pytest.fixture
def online(monkeypatch, tmp_path):
    """No SEQPLAT_DATA, a fresh local cache."""
    monkeypatch.delenv("SEQPLAT_DATA", raising=False)
    monkeypatch.setenv("SEQPLAT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def put(fs, path: str, payload: bytes) -> str:
    with fs.open(path, "wb") as f:
        f.write(payload)
    return f"memory://{path}"


def make_tar(members: dict[str, bytes], links: dict[str, str] | None = None, compression: str = "gz") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=f"w:{compression}") as tf:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tf.addfile(info)
    return buf.getvalue()


def make_zip(members: dict[str, bytes], symlinks: tuple[str, ...] = ()) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, payload in members.items():
            zf.writestr(name, payload)
        for name in symlinks:
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o120777 << 16)
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


# -- offline lookup (SEQPLAT_DATA) -----------------------------------------------------------------

def test_offline_folder_prefers_candidates_in_order(monkeypatch, tmp_path):
    (tmp_path / "d" / "ptb").mkdir(parents=True)
    (tmp_path / "d" / "ptb" / "x.txt.gz").write_bytes(gzip.compress(TEXT))
    (tmp_path / "d" / "ptb" / "x.txt.xz").write_bytes(lzma.compress(TEXT))
    monkeypatch.setenv("SEQPLAT_DATA", str(tmp_path / "d"))
    found = resolve("ptb", ["x.txt", "x.txt.xz", "x.txt.gz"])
    assert found == str(tmp_path / "d" / "ptb" / "x.txt.xz")
    assert read_bytes(found) == TEXT


def test_offline_glob_candidate(monkeypatch, tmp_path):
    (tmp_path / "text8").mkdir()
    (tmp_path / "text8" / "text8_first100chars.xz").write_bytes(lzma.compress(b" abc" * 25))
    monkeypatch.setenv("SEQPLAT_DATA", str(tmp_path))
    assert resolve("text8", ["text8", "text8*"]).endswith("text8_first100chars.xz")


def test_offline_missing_file_never_downloads(monkeypatch, tmp_path, mem):
    fs, root = mem
    url = put(fs, f"{root}/remote/x.txt", TEXT)  # a reachable source that must not be used
    monkeypatch.setenv("SEQPLAT_DATA", str(tmp_path))
    with pytest.raises(DataError) as err:
        resolve("ptb", ["ptb.char.train.txt", "ptb.char.train.txt.gz"], url=url)
    msg = str(err.value)
    assert f"No ptb/ptb.char.train.txt under SEQPLAT_DATA={tmp_path}" in msg
    assert "tried ptb.char.train.txt, ptb.char.train.txt.gz" in msg
    assert "\n" not in msg
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("x.txt"))


def test_offline_fsspec_url(monkeypatch, mem):
    fs, root = mem
    put(fs, f"{root}/mnist/a.bin.gz", gzip.compress(b"\x00\x01\x02"))
    monkeypatch.setenv("SEQPLAT_DATA", f"memory://{root}")
    found = resolve("mnist", ["a.bin", "a.bin.gz"])
    assert found == f"memory://{root}/mnist/a.bin.gz"
    assert read_bytes(found) == b"\x00\x01\x02"


# -- download and cache ---------------------------------------------------------------------------

def test_download_verifies_checksum_and_caches(online, mem):
    fs, root = mem
    url = put(fs, f"{root}/remote/file.txt", TEXT)
    digest = hashlib.sha256(TEXT).hexdigest()
    path = resolve("demo", ["file.txt"], url=url, checksum=f"sha256:{digest}")
    assert path == str(online / "demo" / "file.txt")
    assert read_text(path) == TEXT.decode()
    fs.rm(f"{root}/remote/file.txt")  # the second call must come from the cache
    assert resolve("demo", ["file.txt"], url=url) == path
    assert [p.name for p in (online / "demo").iterdir()] == ["file.txt"]  # no temp files left


def test_download_checksum_mismatch_leaves_nothing(online, mem):
    fs, root = mem
    url = put(fs, f"{root}/remote/file.txt", TEXT)
    with pytest.raises(DataError, match=r"^Download memory://.*file.txt has md5 [0-9a-f]{32}, expected 0{32}"):
        resolve("demo", ["file.txt"], url=url, checksum="md5:" + "0" * 32)
    assert not (online / "demo").exists() or list((online / "demo").iterdir()) == []


def test_download_tries_mirrors_in_order(online, mem):
    fs, root = mem
    good = put(fs, f"{root}/m2/file.txt", TEXT)
    path = resolve("demo", ["file.txt"], url=(f"memory://{root}/m1/file.txt", good))
    assert read_bytes(path) == TEXT


def test_download_failure_names_file_and_fix(online, mem):
    _, root = mem
    with pytest.raises(DataError) as err:
        resolve("ptb", ["ptb.train.txt"], url=f"memory://{root}/nowhere/simple-examples.tgz",
                member="simple-examples/data/ptb.train.txt")
    msg = str(err.value)
    assert msg.startswith("Could not download ptb/ptb.train.txt (memory://")
    assert msg.endswith("download it by hand and set SEQPLAT_DATA to a folder holding ptb/ptb.train.txt.")


def test_no_source_no_data(online):
    with pytest.raises(DataError, match="no download source is known; set SEQPLAT_DATA to a folder holding x/y.bin"):
        resolve("x", ["y.bin"])


def test_cache_can_be_a_url(monkeypatch, mem):
    fs, root = mem
    monkeypatch.delenv("SEQPLAT_DATA", raising=False)
    monkeypatch.setenv("SEQPLAT_CACHE", f"memory://{root}/cache")
    url = put(fs, f"{root}/remote/f.gz", gzip.compress(TEXT))
    path = resolve("demo", ["f", "f.gz"], url=url)
    assert path == f"memory://{root}/cache/demo/f.gz"
    assert read_bytes(path) == TEXT


# -- archive members --------------------------------------------------------------------------------

@pytest.mark.parametrize("compression", ["gz", "xz"])
def test_tar_member_extracted_and_verified(online, mem, compression):
    fs, root = mem
    payload = b"a b c \n"
    url = put(fs, f"{root}/remote/bundle.tgz",
              make_tar({"./bundle/data/x.txt": payload, "./bundle/data/y.txt": b"other"}, compression=compression))
    digest = hashlib.sha256(payload).hexdigest()
    path = resolve("b", ["x.txt", "x.txt.gz"], url=url, member="bundle/data/x.txt", member_checksum=f"sha256:{digest}")
    assert path == str(online / "b" / "x.txt")
    assert read_bytes(path) == payload
    # the archive stays cached, so a second member needs no download
    fs.rm(f"{root}/remote/bundle.tgz")
    assert read_bytes(resolve("b", ["y.txt"], url=url, member="bundle/data/y.txt")) == b"other"


def test_tar_member_checksum_mismatch(online, mem):
    fs, root = mem
    url = put(fs, f"{root}/r/a.tgz", make_tar({"x.txt": b"abc"}))
    with pytest.raises(DataError, match="member 'x.txt' has sha256 .* expected 1111"):
        resolve("b", ["x.txt"], url=url, member="x.txt", member_checksum="sha256:" + "1" * 64)
    assert not (online / "b" / "x.txt").exists()


def test_tar_missing_member_lists_members(online, mem):
    fs, root = mem
    url = put(fs, f"{root}/r/a.tgz", make_tar({"x.txt": b"abc"}))
    with pytest.raises(DataError, match=r"has no member 'y.txt'; members: x.txt"):
        resolve("b", ["y.txt"], url=url, member="y.txt")


def test_tar_link_member_refused(online, mem):
    fs, root = mem
    url = put(fs, f"{root}/r/a.tgz", make_tar({"real.txt": b"abc"}, links={"data/x.txt": "/etc/passwd"}))
    with pytest.raises(DataError, match="member 'data/x.txt' is a link; refusing it"):
        resolve("b", ["x.txt"], url=url, member="data/x.txt")


def test_tar_traversal_member_refused(online, mem):
    fs, root = mem
    url = put(fs, f"{root}/r/a.tgz", make_tar({"../evil.txt": b"abc"}))
    with pytest.raises(DataError, match="unsafe path"):
        resolve("b", ["evil.txt"], url=url, member="../evil.txt")
    assert not (online.parent / "evil.txt").exists()


def test_truncated_tar_archive(online, mem):
    fs, root = mem
    blob = make_tar({"x.txt": bytes(range(256)) * 400})
    url = put(fs, f"{root}/r/a.tgz", blob[: len(blob) // 2])
    with pytest.raises(DataError, match="truncated or corrupt"):
        resolve("b", ["x.txt"], url=url, member="x.txt")


def test_zip_member_and_symlink(online, mem):
    fs, root = mem
    url = put(fs, f"{root}/r/a.zip", make_zip({"dir/x.txt": b"hello"}, symlinks=("dir/link.txt",)))
    assert read_bytes(resolve("z", ["x.txt"], url=url, member="dir/x.txt")) == b"hello"
    with pytest.raises(DataError, match="member 'dir/link.txt' is a symbolic link"):
        resolve("z", ["link.txt"], url=url, member="dir/link.txt")


def test_datafile_roundtrip(online, mem):
    fs, root = mem
    url = put(fs, f"{root}/r/t.txt", TEXT)
    spec = DataFile("demo", ("t.txt",), url=url, checksum=hashlib.sha256(TEXT).hexdigest())
    assert spec.read_text() == TEXT.decode()


# -- readers -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "encode",
    [lambda b: b, gzip.compress, lzma.compress, bz2.compress, lambda b: make_zip({"only": b})],
    ids=["plain", "gzip", "xz", "bz2", "zip"],
)
def test_transparent_decompression(tmp_path, encode):
    path = tmp_path / "f"
    path.write_bytes(encode(TEXT))
    assert read_bytes(str(path)) == TEXT


def test_zip_with_many_members_needs_a_name(tmp_path):
    path = tmp_path / "two.zip"
    path.write_bytes(make_zip({"a": b"1", "b": b"2"}))
    with pytest.raises(DataError, match="holds 2 files"):
        read_bytes(str(path))
    assert read_bytes(str(path), member="b") == b"2"


def test_truncated_gzip(tmp_path):
    path = tmp_path / "t.txt.gz"
    blob = gzip.compress(bytes(range(256)) * 100)
    path.write_bytes(blob[:-20])
    with pytest.raises(DataError, match=rf"^Data file {path} is truncated or corrupt \(EOFError"):
        read_bytes(str(path))


def test_corrupt_xz(tmp_path):
    path = tmp_path / "t.xz"
    blob = bytearray(lzma.compress(TEXT))
    blob[30] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_bytes(str(path))


def test_empty_files(tmp_path):
    (tmp_path / "e").write_bytes(b"")
    (tmp_path / "e.gz").write_bytes(gzip.compress(b""))
    with pytest.raises(DataError, match=rf"^Data file {tmp_path / 'e'} is empty"):
        read_bytes(str(tmp_path / "e"))
    with pytest.raises(DataError, match="is empty after decompression"):
        read_bytes(str(tmp_path / "e.gz"))


def test_non_utf8_text(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"caf\xe9 au lait")
    with pytest.raises(DataError, match=rf"^Data file {path} is not utf-8 text \(byte 0xe9 at offset 3\)"):
        read_text(str(path))
    assert read_text(str(path), encoding="latin-1") == "café au lait"


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_bytes(str(tmp_path / "nope"))


def test_unsafe_member_request_rejected():
    with pytest.raises(DataError, match="unsafe path"):
        resolve("x", ["a"], url="memory://x/a.tgz", member="/etc/passwd")


def test_cache_default(monkeypatch):
    monkeypatch.delenv("SEQPLAT_CACHE", raising=False)
    assert data.cache_root().endswith(".cache/seqplat")
