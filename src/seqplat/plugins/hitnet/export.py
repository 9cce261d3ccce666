"""Model size accounting and the packed export (safetensors) of a quantized model.

An export holds, for every quantized weight ``<name>``, ``<name>.codes`` (the codes packed into uint8,
2 bits per ternary weight) and ``<name>.scales`` (float32 ``[blocks, k]``), plus every other tensor of
the state dict in full precision. The safetensors metadata carries the resolved run config and, per
quantized weight, its shape, method, bits and blocks. :func:`load_export` rebuilds the model from the
config with plain (unparametrized) weights set to the decoded values and the same activation
quantizers, so its outputs equal the quantized model's exactly.
"""

from __future__ import annotations

import copy
import json
import struct
from dataclasses import dataclass
from typing import Any

import fsspec
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn
from torch.nn.utils import parametrize

from seqplat import CheckpointError, RunConfig, SequenceModel, build_model

from .functions import codebook, lookup, pack_codes, packed_bytes, ste, unpack_codes
from .quantizer import quantized_weights

FORMAT = "seqplat.hitnet.export/1"


@dataclass(frozen=True)
class TensorSize:
    """Storage of one tensor: ``bits`` per element plus ``scales`` float32 scales."""

    name: str
    numel: int
    bits: int
    scales: int = 0

    @property
    def bytes(self) -> int:
        return packed_bytes(self.numel, self.bits) + 4 * self.scales

    @property
    def full_precision_bytes(self) -> int:
        return self.numel * 4


def size_report(model: nn.Module) -> list[TensorSize]:
    """Bits per tensor: quantized weights at their code width (2 for ternary), the rest at 32 (spec §6.8).

    Tied tensors are counted once; learned scales of trained_ternary are counted as scales.
    """
    rows: list[TensorSize] = []
    covered: set[int] = set()
    for name, module, attr, wq in quantized_weights(model):
        original = module.parametrizations[attr].original
        n_scales = wq.blocks * (2 if wq.method == "trained_ternary" else 1)
        rows.append(TensorSize(name, original.numel(), wq.bits, n_scales))
        covered.add(id(original))
        covered.update(id(p) for p in wq.parameters())
    for name, p in model.named_parameters():
        if id(p) in covered:
            continue
        covered.add(id(p))
        rows.append(TensorSize(name, p.numel(), p.element_size() * 8))
    return rows


def size_summary(model: nn.Module) -> dict[str, Any]:
    """Totals: packed bytes, the same model in float32, and the quantized share."""
    rows = size_report(model)
    quantized = [r for r in rows if r.bits < 32]
    packed = sum(r.bytes for r in rows)
    full = sum(r.full_precision_bytes for r in rows)
    return {
        "bytes": packed,
        "full_precision_bytes": full,
        "ratio": full / packed if packed else float("nan"),
        "quantized_parameters": sum(r.numel for r in quantized),
        "quantized_bytes": sum(r.bytes for r in quantized),
        "quantized_full_precision_bytes": sum(r.full_precision_bytes for r in quantized),
        "parameters": sum(r.numel for r in rows),
    }


# -- export ----------------------------------------------------------------------------------------

def export_tensors(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Packed tensors and per-tensor metadata of ``model`` (codes taken in eval mode)."""
    was_training = model.training
    model.eval()
    try:
        tensors: dict[str, Tensor] = {}
        quant: dict[str, Any] = {}
        skip: set[str] = set()
        for name, module, attr, wq in quantized_weights(model):
            original = module.parametrizations[attr].original
            codes, scales = wq.pack(original)
            tensors[f"{name}.codes"] = pack_codes(codes, wq.bits)
            tensors[f"{name}.scales"] = scales.detach().to("cpu", torch.float32).contiguous()
            quant[name] = {"shape": list(original.shape), "method": wq.method, "bits": wq.bits, "blocks": wq.blocks,
                           "dtype": str(original.dtype).replace("torch.", "")}
            prefix = name.rpartition(".")[0]
            parametrized = f"{prefix}.parametrizations.{attr}".lstrip(".")
            skip.update(k for k in model.state_dict() if k.startswith(parametrized + "."))
        aliases: dict[str, str] = {}
        seen: dict[int, str] = {}
        for key, value in model.state_dict(keep_vars=True).items():
            if key in skip:
                continue
            if id(value) in seen:  # tied weights are stored once
                aliases[key] = seen[id(value)]
                continue
            seen[id(value)] = key
            tensors[key] = value.detach().to("cpu").contiguous().clone()
    finally:
        model.train(was_training)
    return tensors, {"quantized": quant, "aliases": aliases}


def export_run(model: nn.Module, run: RunConfig) -> tuple[bytes, dict[str, Any]]:
    """The safetensors bytes of a quantized model and its size summary."""
    tensors, meta = export_tensors(model)
    config = run.model_dump(mode="json")
    if config.get("quantizer"):
        config["quantizer"]["init_from"] = None
    summary = size_summary(model)
    metadata = {"format": FORMAT, "config": json.dumps(config), "quantized": json.dumps(meta["quantized"]),
                "aliases": json.dumps(meta["aliases"]), "size": json.dumps(summary)}
    return st_save(tensors, metadata=metadata), summary


def write_export(url: str, data: bytes) -> None:
    """Write export bytes atomically (temporary file, then rename) through fsspec."""
    fs, path = fsspec.core.url_to_fs(url)
    parent = path.rpartition("/")[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def read_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    return dict(header.get("__metadata__", {}))


def decode_weights(tensors: dict[str, Tensor], quant: dict[str, Any]) -> dict[str, Tensor]:
    """The quantized weights' values from their packed codes and scales."""
    out = {}
    for name, info in quant.items():
        shape = torch.Size(info["shape"])
        codes = unpack_codes(tensors[f"{name}.codes"], info["bits"], shape.numel()).view(info["blocks"], -1)
        scales = tensors[f"{name}.scales"].to(getattr(torch, info["dtype"]))
        out[name] = lookup(codebook(info["method"], scales, info["bits"]), codes).view(shape)
    return out


def unquantized_spec(spec: dict[str, Any] | None) -> dict[str, Any] | None:
    """The quantizer spec of a reloaded export: same activations and slope, weights stored decoded."""
    if not spec:
        return None
    spec = {**copy.deepcopy(spec), "weights": "none", "quantize_embedding": False, "quantize_decoder": False,
            "init_from": None}
    if spec.get("activations", "none") == "none" and float(spec.get("slope", 1.0)) == 1.0:
        return None
    return spec


def load_export(url: str, registry: Any | None = None) -> tuple[SequenceModel, RunConfig, dict[str, Any]]:
    """Rebuild the model of an export with its decoded weights; returns (model, run config, size summary)."""
    from seqplat.core.config import validate_run

    fs, path = fsspec.core.url_to_fs(url)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError as exc:
        raise CheckpointError(f"Export '{url}' does not exist; write one with `seqplat export`.") from exc
    meta = read_metadata(data)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"'{url}' is not a hitnet export (format {meta.get('format')!r}, expected {FORMAT!r}).")
    config = json.loads(meta["config"])
    config["quantizer"] = unquantized_spec(config.get("quantizer"))
    run = validate_run(config, registry)
    model = build_model(run, registry=registry)
    tensors = st_load(data)
    quant = json.loads(meta["quantized"])
    state = {k: v for k, v in tensors.items() if not any(k in (f"{n}.codes", f"{n}.scales") for n in quant)}
    state.update(decode_weights(tensors, quant))
    for alias, source in json.loads(meta["aliases"]).items():
        state[alias] = state[source]
    model.load_state_dict(state, strict=True)
    for name in quant:
        path, _, attr = name.rpartition(".")
        parametrize.register_parametrization(model.get_submodule(path) if path else model, attr, DecodedWeight())
    return model, run, json.loads(meta["size"])


class DecodedWeight(nn.Module):
    """Identity parametrization of a decoded weight: ``w.detach() + (w - w.detach())``.

    It returns the stored values unchanged, but as a computed tensor like a quantizer's output, so
    fused kernels dispatch exactly as for the quantized model (torch's CPU GRU/LSTM pick a different
    kernel when ``weight_ih`` is a plain tensor rather than a parameter, which differs in the last bit).
    """

    def forward(self, w: Tensor) -> Tensor:
        return ste(w.detach(), w)
