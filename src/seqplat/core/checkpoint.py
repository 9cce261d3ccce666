"""Checkpoints: written atomically through fsspec, loaded without unpickling arbitrary objects.

A checkpoint is a folder ``<run_dir>/checkpoints/step-00001200/`` (or ``best-00001200/``) holding

* ``model.safetensors`` -- the model's weights;
* ``state.pt`` -- optimizer, scheduler, RNG and loop state, saved with ``torch.save`` and read back with
  ``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers;
* ``carry-rank<r>.safetensors`` -- the state each process carries across stream chunks (if any);
* ``config.json`` -- the resolved run config, so the model can be rebuilt from the checkpoint alone;
* ``meta.json`` -- written last: a folder without it is incomplete and ignored.

Each checkpoint is first written to ``<name>.tmp-<random>`` and renamed into place once complete, so a
crash, a kill or a full disk never leaves a half-written checkpoint where a loader would pick it up.
"""

from __future__ import annotations

import io
import json
import posixpath
import re
import uuid
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from seqplat.core.errors import CheckpointError

_NAME = re.compile(r"^(step|best)-(\d{8})$")


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(url)
    return fs, path


def _write_bytes(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    with fs.open(path, "wb") as f:
        f.write(data)


def _tensors_for_safetensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied weights): store independent copies
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


@dataclass
class Checkpoint:
    """A loaded checkpoint."""

    url: str
    model_state: dict[str, torch.Tensor]
    state: dict[str, Any]
    config: dict[str, Any]
    meta: dict[str, Any]

    def carry(self, rank: int) -> list[torch.Tensor] | None:
        fs, path = _fs(self.url)
        p = posixpath.join(path, f"carry-rank{rank}.safetensors")
        if not fs.exists(p):
            return None
        tensors = st_load(fs.cat_file(p))
        return [tensors[str(i)] for i in range(len(tensors))]


def write_checkpoint(
    ckpt_root: str,
    name: str,
    model_state: dict[str, torch.Tensor],
    state: dict[str, Any],
    config: dict[str, Any],
    meta: dict[str, Any],
    carries: dict[int, list[torch.Tensor]] | None = None,
) -> str:
    """Write a complete checkpoint folder ``<ckpt_root>/<name>`` atomically; returns its URL."""
    fs, root = _fs(ckpt_root)
    final = posixpath.join(root, name)
    tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        fs.makedirs(tmp, exist_ok=True)
        _write_bytes(fs, posixpath.join(tmp, "model.safetensors"), st_save(_tensors_for_safetensors(model_state)))
        buf = io.BytesIO()
        torch.save(state, buf)
        _write_bytes(fs, posixpath.join(tmp, "state.pt"), buf.getvalue())
        for rank, tensors in (carries or {}).items():
            data = st_save({str(i): t.detach().cpu().contiguous() for i, t in enumerate(tensors)})
            _write_bytes(fs, posixpath.join(tmp, f"carry-rank{rank}.safetensors"), data)
        _write_bytes(fs, posixpath.join(tmp, "config.json"), json.dumps(config, indent=2).encode())
        _write_bytes(fs, posixpath.join(tmp, "meta.json"), json.dumps(meta, indent=2).encode())
        if fs.exists(final):
            fs.rm(final, recursive=True)
        fs.mv(tmp, final, recursive=True)
    except OSError as exc:
        try:
            if fs.exists(tmp):
                fs.rm(tmp, recursive=True)
        except OSError:
            pass
        raise CheckpointError(
            f"Could not write checkpoint '{final}': {exc.strerror or exc}. The previous checkpoint is intact; "
            f"free space or choose another io.output_dir."
        ) from exc
    return fs.unstrip_protocol(final) if "://" in ckpt_root else final


def list_checkpoints(ckpt_root: str, kind: str = "step") -> list[tuple[int, str]]:
    """Complete checkpoints of ``kind`` ("step" or "best") as ``(step, url)``, oldest first."""
    fs, root = _fs(ckpt_root)
    if not fs.exists(root):
        return []
    out = []
    for entry in fs.ls(root, detail=False):
        base = posixpath.basename(entry.rstrip("/"))
        m = _NAME.match(base)
        if m and m.group(1) == kind and fs.exists(posixpath.join(entry, "meta.json")):
            url = fs.unstrip_protocol(entry) if "://" in ckpt_root else entry
            out.append((int(m.group(2)), url))
    return sorted(out)


def prune(ckpt_root: str, kind: str, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints of ``kind`` and any stale temp folders."""
    fs, root = _fs(ckpt_root)
    for _, url in list_checkpoints(ckpt_root, kind)[:-keep]:
        fs.rm(_fs(url)[1], recursive=True)


def clean_temp(ckpt_root: str) -> None:
    fs, root = _fs(ckpt_root)
    if not fs.exists(root):
        return
    for entry in fs.ls(root, detail=False):
        if ".tmp-" in posixpath.basename(entry.rstrip("/")):
            fs.rm(entry, recursive=True)


def resolve_checkpoint(url: str, prefer: str = "step") -> str:
    """A checkpoint folder from a checkpoint URL, a ``checkpoints`` folder or a run folder."""
    fs, path = _fs(url)
    if fs.exists(posixpath.join(path, "meta.json")):
        return url
    for root in (posixpath.join(url, "checkpoints"), url):
        for kind in (prefer, "best" if prefer == "step" else "step"):
            found = list_checkpoints(root, kind)
            if found:
                return found[-1][1]
    if not fs.exists(path):
        raise CheckpointError(f"Checkpoint '{url}' does not exist; pass a checkpoint folder or a run folder.")
    raise CheckpointError(f"No complete checkpoint under '{url}' (a folder with meta.json); was the run started?")


def load_checkpoint(url: str, prefer: str = "step") -> Checkpoint:
    """Load a checkpoint; raises CheckpointError naming the file on any corruption."""
    url = resolve_checkpoint(url, prefer)
    fs, path = _fs(url)

    def read(name: str) -> bytes:
        p = posixpath.join(path, name)
        try:
            return fs.cat_file(p)
        except FileNotFoundError as exc:
            raise CheckpointError(f"Checkpoint file '{p}' is missing; the checkpoint is incomplete.") from exc

    try:
        model_state = st_load(read("model.safetensors"))
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types on corrupt input
        where = posixpath.join(path, "model.safetensors")
        raise CheckpointError(f"Checkpoint file '{where}' is corrupt: {exc}") from exc
    try:
        state = torch.load(io.BytesIO(read("state.pt")), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - refused pickles and truncated files both land here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"Checkpoint file '{posixpath.join(path, 'state.pt')}' cannot be loaded safely: {first}"
        ) from exc
    try:
        config = json.loads(read("config.json"))
        meta = json.loads(read("meta.json"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"Checkpoint '{url}' has a corrupt JSON file: {exc}") from exc
    return Checkpoint(url, model_state, state, config, meta)
