"""The MLflow model registry: register a run's best checkpoint under a model name, and resolve
``models:/NAME/VERSION`` references back to the checkpoint.

The checkpoint artifact (``<run>/checkpoint``: safetensors weights, state, config) is what a
registered version points at. MLflow 3's ``mlflow.register_model`` only accepts MLflow-format
models (an ``MLmodel`` file or a logged model), so the version is created with
``MlflowClient.create_model_version`` with the same source, ``runs:/<run id>/checkpoint``.
"""

from __future__ import annotations

import re
from typing import Any

from seqplat.core.errors import CheckpointError, SeqplatError

__all__ = ["register_checkpoint_model", "resolve_model_reference"]

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[^/]+))?/?$")


def _client() -> Any:
    from mlflow import MlflowClient

    return MlflowClient()


def register_checkpoint_model(run_id: str, name: str) -> str:
    """Register ``runs:/<run_id>/checkpoint`` as a new version of model ``name``; returns the version.

    The registered model is created on first use. The version is tagged with the run's cell and
    task (``seqplat.cell``, ``seqplat.task``). Raises :class:`SeqplatError` when the name is empty,
    the run does not exist, or it has no ``checkpoint`` artifact (``tracking.log_checkpoint=false``).
    """
    from mlflow.exceptions import MlflowException

    if not name or not name.strip():
        raise SeqplatError("--register-model: the model name is empty; give a name, e.g. --register-model ptb-lstm")
    client = _client()
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise SeqplatError(f"Cannot register a model from MLflow run '{run_id}': {_first_line(exc)}") from exc
    if not client.list_artifacts(run_id, "checkpoint"):
        raise SeqplatError(
            f"MLflow run '{run_id}' has no 'checkpoint' artifact to register as model '{name}'; "
            f"keep tracking.log_checkpoint=true"
        )
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if "already exists" not in str(exc).lower() and "ALREADY_EXISTS" not in str(getattr(exc, "error_code", "")):
            raise SeqplatError(f"Cannot create registered model '{name}': {_first_line(exc)}") from exc
    tags = {k: v for k, v in run.data.tags.items() if k in ("seqplat.cell", "seqplat.task")}
    cell, task = tags.get("seqplat.cell", "?"), tags.get("seqplat.task", "?")
    try:
        version = client.create_model_version(
            name, f"runs:/{run_id}/checkpoint", run_id=run_id, tags=tags,
            description=f"seqplat checkpoint: {cell} on {task} (run {run_id}); load it with seqplat, e.g. "
                        f"`seqplat generate models:/{name}/<version> --prompt ...` for language models",
        )
    except MlflowException as exc:
        raise SeqplatError(f"Cannot register run '{run_id}' as model '{name}': {_first_line(exc)}") from exc
    return str(version.version)


def resolve_model_reference(ref: str) -> str:
    """``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` (or ``models:/NAME``: the latest version) ->
    ``runs:/<run id>``, which :func:`seqplat.core.train.resolve_run_reference` turns into a checkpoint.
    Any other reference is returned unchanged."""
    m = _MODELS_URI.match(ref)
    if m is None:
        return ref
    from mlflow.exceptions import MlflowException

    client = _client()
    name = m.group("name")
    try:
        if m.group("version"):
            mv = client.get_model_version(name, m.group("version"))
        elif m.group("alias"):
            mv = client.get_model_version_by_alias(name, m.group("alias"))
        else:
            versions = client.search_model_versions(f"name = '{name}'")
            if not versions:
                raise CheckpointError(f"Registered model '{name}' has no versions.")
            mv = max(versions, key=lambda v: int(v.version))
    except MlflowException as exc:
        raise CheckpointError(f"Model '{ref}' not found in the registry: {_first_line(exc)}") from exc
    if not mv.run_id:
        raise CheckpointError(f"Model version '{ref}' is not linked to a run; cannot find its checkpoint.")
    return f"runs:/{mv.run_id}"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__
