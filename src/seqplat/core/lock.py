"""A run-folder lock, so two jobs never write checkpoints into the same folder.

On a local filesystem the lock is ``<run_dir>/.lock`` created with ``O_CREAT | O_EXCL`` (atomic) and
holding ``host:pid``. A lock left by a process that no longer exists on this host is stale and is
taken over. On other fsspec filesystems the same file is checked and written (best effort: object
stores have no atomic create).
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import socket

import fsspec

from seqplat.core.errors import SeqplatError


class RunFolderBusy(SeqplatError):
    """Another live job owns the run folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    def __init__(self, run_dir: str):
        self.fs, self.dir = fsspec.core.url_to_fs(run_dir)
        self.path = posixpath.join(self.dir, ".lock")
        self.local = self.fs.protocol in ("file", "local") or "file" in (self.fs.protocol or ())
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self.held = False

    def _owner_alive(self) -> tuple[bool, str]:
        try:
            text = self.fs.cat_file(self.path).decode().strip()
        except (FileNotFoundError, OSError):
            return False, ""
        host, _, pid = text.partition(":")
        if host == socket.gethostname() and pid.isdigit():
            return _alive(int(pid)) and int(pid) != os.getpid(), text
        return True, text  # another host: assume alive

    def acquire(self) -> None:
        self.fs.makedirs(self.dir, exist_ok=True)
        for _ in range(2):
            if self.local:
                try:
                    fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    alive, who = self._owner_alive()
                    if alive:
                        raise RunFolderBusy(
                            f"Run folder '{self.dir}' is in use by process {who}; choose another io.run_dir "
                            f"(or wait for that job to finish)."
                        ) from None
                    os.unlink(self.path)  # stale lock from a dead process
                    continue
                with os.fdopen(fd, "w") as f:
                    f.write(self.owner)
                self.held = True
                return
            alive, who = self._owner_alive()
            if alive and who and who != self.owner:
                raise RunFolderBusy(f"Run folder '{self.dir}' is in use by {who}; choose another io.run_dir.")
            with self.fs.open(self.path, "wb") as f:
                f.write(self.owner.encode())
            self.held = True
            return

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError, OSError):
                self.fs.rm(self.path)
            self.held = False
