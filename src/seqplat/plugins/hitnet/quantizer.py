"""The quantizers: weight parametrizations and activation quantizers installed at a cell's roles.

Roles contract (what a cell exposes so that any quantizer here can reach it):

* ``weight_roles = {role: (parameter names relative to the cell, ...)}``: each named parameter is
  replaced through ``torch.nn.utils.parametrize`` by its quantized value; the latent full-precision
  parameter keeps training (straight-through gradient). Fused kernels keep working: ``nn.LSTM``
  re-reads its weights on every call.
* ``activation_roles``: names at which the cell calls ``self.quantize_activation(role, value)``. A
  role ``R`` whose value is a sigmoid/tanh output is declared together with ``R_preact``, the
  argument of that sigmoid/tanh (``h = o * tanh(quantize_activation("hidden_preact", c))``): the
  sloping factor multiplies ``R_preact`` by lambda, and by default the quantizers act on exactly
  those ``R``. The baselines' lstm exposes gate, candidate, hidden (+ their ``_preact``) and cell
  (the full-precision accumulator, never quantized by default); gru exposes gate, candidate (+
  ``_preact``) and hidden (already ternary when its inputs are, so not quantized by default).

With any activation quantizer or sloping factor installed the core runs the cell's reference path.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from seqplat import Cell, CheckpointError, ConfigError, Quantizer

from .config import BinaryConfig, HitNetConfig, QuantizeConfig, TernaryConfig, UniformConfig
from .functions import (
    bernoulli_ternary,
    binary_activation,
    codebook,
    direct_weights,
    lookup,
    round_ternary,
    ste,
    uniform_activation,
    weight_bits,
    weight_codes,
)

PREACT = "_preact"


class ForwardScope:
    """Counts the forwards of an owner module, so weight quantizers run once per forward.

    The reference path of a cell reads its (parametrized) weights at every time step; inside one
    forward of the owner the quantized weight is computed once and reused (and Bernoulli weights
    are drawn once per sequence, not per step).
    """

    def __init__(self) -> None:
        self.token: int | None = None
        self._count = 0

    def enter(self, module: nn.Module, args: Any) -> None:
        self._count += 1
        self.token = self._count

    def exit(self, module: nn.Module, args: Any, output: Any) -> None:
        self.token = None

    def attach(self, owner: nn.Module) -> None:
        owner.register_forward_pre_hook(self.enter)
        owner.register_forward_hook(self.exit, always_call=True)


class WeightQuantizer(nn.Module):
    """Parametrization ``W -> W_q`` of one weight tensor (spec §2 "Weights"), straight-through backward."""

    def __init__(self, cfg: QuantizeConfig, weight: Tensor, blocks: int, scope: ForwardScope | None = None):
        super().__init__()
        self.method = cfg.weights
        self.bits = weight_bits(cfg.weights, cfg.bits)
        self.blocks = blocks
        self.threshold = cfg.threshold
        self.trained_threshold = cfg.trained_threshold
        self.use_scale = cfg.scale == "mean"
        self.ste_clip = cfg.ste_clip
        self.scope = scope
        self._cache: tuple[Any, Tensor] | None = None
        if self.method == "trained_ternary":  # Zhu et al.: learned positive and negative scales per block
            self.scales = nn.Parameter(self._codes(weight)[1].clone())

    def _codes(self, w: Tensor) -> tuple[Tensor, Tensor]:
        return weight_codes(self.method, w.detach().reshape(self.blocks, -1), bits=self.bits, threshold=self.threshold,
                            trained_threshold=self.trained_threshold, use_scale=self.use_scale,
                            stochastic=self.training)

    def pack(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """Codes ``[blocks, n]`` and the scales ``[blocks, k]`` that :func:`codebook` turns into values."""
        codes, scales = self._codes(w)
        if self.method == "trained_ternary":
            scales = self.scales.detach()
        return codes, scales

    @torch.no_grad()
    def reset_scales(self, w: Tensor) -> None:
        """Re-initialise learned scales from ``w`` (after the latent weights were replaced)."""
        if self.method == "trained_ternary":
            self.scales.copy_(weight_codes(self.method, w.reshape(self.blocks, -1),
                                           trained_threshold=self.trained_threshold)[1])

    def forward(self, w: Tensor) -> Tensor:
        token = self.scope.token if self.scope is not None else None
        key = (token, w._version, self.training, torch.is_grad_enabled())
        if not self.training and not torch.is_grad_enabled():
            # evaluation without a graph is deterministic: reuse W_q across forwards until W (or a
            # learned scale) is changed in place, as an optimizer step or a checkpoint load does
            scales = getattr(self, "scales", None)
            token = "eval"
            key = (token, id(w), w._version, None if scales is None else scales._version)
        if token is not None and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        q = None if self.method == "trained_ternary" else direct_weights(
            self.method, w.detach().reshape(self.blocks, -1), threshold=self.threshold, use_scale=self.use_scale)
        if q is not None:
            q = q.view_as(w)
        else:
            codes, scales = self._codes(w)
            if self.method == "trained_ternary":
                scales = self.scales
            q = lookup(codebook(self.method, scales, self.bits), codes).view_as(w)
        grad_scale: Tensor | None = None
        if self.method == "trained_ternary":  # latent gradient scaled by w_p / 1 / w_n (Zhu et al.)
            ones = torch.ones_like(self.scales[:, :1])
            grad_scale = lookup(torch.cat([ones, self.scales.detach()], dim=1), codes).view_as(w)
        if self.ste_clip is not None:
            mask = (w.detach().abs() <= self.ste_clip).to(w.dtype)
            grad_scale = mask if grad_scale is None else grad_scale * mask
        out = ste(q, w, grad_scale)
        self._cache = (key, out) if token is not None else None
        return out

    def extra_repr(self) -> str:
        return f"method={self.method}, bits={self.bits}, blocks={self.blocks}"


class ActivationQuantizer(nn.Module):
    """``Q_a`` at one activation role (spec §2 "Activations"), straight-through backward.

    Bernoulli draws use the global RNG in training (seeded and checkpointed by the trainer) and a
    private generator at evaluation, reseeded with ``seed`` at every switch to eval mode, so an
    evaluation is reproducible and does not disturb the training RNG stream.
    """

    def __init__(self, cfg: QuantizeConfig, signed: bool, seed: int):
        super().__init__()
        self.method = cfg.activations
        self.signed = signed
        self.bits = cfg.bits
        self.act_threshold = cfg.act_threshold
        self.act_eval = cfg.act_eval
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def train(self, mode: bool = True) -> ActivationQuantizer:
        if not mode:
            self._generators = {}  # fresh, fixed-seed draws for every evaluation
        return super().train(mode)

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._generators[device] = g
        return self._generators[device]

    def forward(self, x: Tensor) -> Tensor:
        if self.method == "bernoulli":
            if self.training:
                q = bernoulli_ternary(x)
            elif self.act_eval == "expectation":
                return x
            elif self.act_eval == "deterministic":
                q = round_ternary(x, 0.5)
            else:
                q = bernoulli_ternary(x, self._generator(x.device))
        elif self.method == "ternary":
            q = round_ternary(x, self.act_threshold)
        elif self.method == "uniform":
            q = uniform_activation(x, self.bits, self.signed)
        else:
            q = binary_activation(x, self.signed)
        return ste(q, x)

    def extra_repr(self) -> str:
        return f"method={self.method}, signed={self.signed}, act_eval={self.act_eval}"


class Slope(nn.Module):
    """The sloping factor at a pre-activation role: ``z -> lambda * z`` (so sigma(lambda z), tanh(lambda z))."""

    def __init__(self, slope: float):
        super().__init__()
        self.slope = float(slope)

    def forward(self, z: Tensor) -> Tensor:
        return z * self.slope

    def extra_repr(self) -> str:
        return f"slope={self.slope}"


# -- helpers -------------------------------------------------------------------------------------------

def cell_name(cell: nn.Module) -> str:
    """The registered name of a cell's class (its class name if not registered)."""
    from seqplat.registry import get_registry

    for name, entry in get_registry().entries["cell"].items():
        if entry.obj is type(cell):
            return name
    return type(cell).__name__


def cells_with_roles() -> list[str]:
    """Registered cells that expose quantization roles (for error messages)."""
    from seqplat.registry import get_registry

    return sorted(n for n, e in get_registry().entries["cell"].items()
                  if getattr(e.obj, "weight_roles", None) or getattr(e.obj, "activation_roles", None))


def role_cells(cell: nn.Module) -> list[Cell]:
    """The outermost cells at or below ``cell`` that expose roles (wrapper cells expose their inner cells)."""
    if isinstance(cell, Cell) and (type(cell).weight_roles or type(cell).activation_roles):
        return [cell]
    return [c for child in cell.children() for c in role_cells(child)]


def squash_roles(cell_cls: type) -> list[str]:
    """Activation roles that are sigmoid/tanh outputs: those declared together with ``<role>_preact``."""
    exposed = tuple(getattr(cell_cls, "activation_roles", ()))
    return [r for r in exposed if not r.endswith(PREACT) and r + PREACT in exposed]


def quantized_weights(model: nn.Module) -> list[tuple[str, nn.Module, str, WeightQuantizer]]:
    """``(full name, module, attribute, quantizer)`` of every weight a quantizer here parametrizes."""
    out = []
    for mname, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for attr, plist in module.parametrizations.items():  # type: ignore[union-attr]
                for p in plist:
                    if isinstance(p, WeightQuantizer):
                        out.append((f"{mname}.{attr}" if mname else attr, module, attr, p))
    return out


# -- the quantizers ------------------------------------------------------------------------------------

class HitNetQuantizer(Quantizer):
    """HitNet (Wang et al. 2018): threshold ternary weights, Bernoulli ternary activations, sloping factor.

    Equations: spec §2-3 (docs/plugins/hitnet.md). The other registered quantizers are this class
    with other defaults (see :mod:`.config`).
    """

    config_class: ClassVar[type[QuantizeConfig]] = HitNetConfig
    registry_name: ClassVar[str] = "hitnet"
    config: QuantizeConfig

    # -- checks ----------------------------------------------------------------------------------
    def _fail(self, cell: nn.Module, problem: str, fix: str) -> ConfigError:
        name = cell_name(cell)
        return ConfigError(f"quantizer: '{self.registry_name}' cannot quantize cell '{name}': {problem}; {fix}")

    def _weight_roles(self, cell: Cell) -> list[str]:
        exposed = dict(type(cell).weight_roles)
        if self.config.weights == "none":
            return []
        if not exposed:
            raise self._fail(cell, "it exposes no weight_roles",
                             "set quantizer.weights=none, or use a cell that exposes them "
                             f"({', '.join(cells_with_roles())})")
        roles = list(self.config.weight_roles) if self.config.weight_roles is not None else list(exposed)
        unknown = [r for r in roles if r not in exposed]
        if unknown:
            raise self._fail(cell, f"unknown weight role(s) {', '.join(unknown)}",
                             f"quantizer.weight_roles must be among: {', '.join(exposed)}")
        return roles

    def _activation_roles(self, cell: Cell) -> list[str]:
        cfg = self.config
        if cfg.activations == "none" and cfg.slope == 1.0:
            return []
        exposed = tuple(type(cell).activation_roles)
        squash = squash_roles(type(cell))
        roles = list(cfg.activation_roles) if cfg.activation_roles is not None else squash
        if not roles:
            what = "it exposes no activation roles" if not exposed else (
                f"none of its activation roles ({', '.join(exposed)}) is declared as a sigmoid/tanh output "
                "(a role R with an R_preact role)")
            raise self._fail(cell, what, "name them with quantizer.activation_roles=[...] and slope=1, set "
                             "quantizer.activations=none and slope=1, or use a cell that exposes them "
                             f"({', '.join(cells_with_roles())})")
        for r in roles:
            if r not in exposed or r.endswith(PREACT):
                allowed = ", ".join(x for x in exposed if not x.endswith(PREACT))
                raise self._fail(cell, f"'{r}' is not one of its activation roles",
                                 f"quantizer.activation_roles must be among: {allowed}")
            if squash and r not in squash:
                raise self._fail(cell, f"role '{r}' is not a sigmoid/tanh output (its values are not bounded)",
                                 f"quantize only the bounded roles: {', '.join(squash)}")
            if cfg.slope != 1.0 and r + PREACT not in exposed:
                raise self._fail(cell, f"the sloping factor needs the pre-activation role '{r}{PREACT}'",
                                 "set quantizer.slope=1 or declare the role in the cell")
        return roles

    def _blocks(self, cell: Cell, name: str, w: Tensor) -> int:
        if self.config.granularity == "tensor":
            return 1
        rows, h = w.shape[0], cell.output_size
        if w.dim() != 2 or rows % h:
            raise self._fail(cell, f"weight '{name}' of shape {tuple(w.shape)} does not split into gate blocks of "
                             f"{h} rows", "set quantizer.granularity=tensor")
        return rows // h

    # -- apply -----------------------------------------------------------------------------------
    def apply(self, model: nn.Module) -> None:
        """Quantize every cell of ``model`` (a SequenceModel or a single cell); see the module docstring."""
        cfg = self.config
        tops = [model] if isinstance(model, Cell) else list(getattr(model, "cells", []))
        if not tops:
            raise ConfigError(f"quantizer: '{self.registry_name}' found no cells in {type(model).__name__}")
        index = 0
        for top in tops:
            found = role_cells(top)
            if not found:
                raise self._fail(top, "it exposes no weight_roles or activation_roles",
                                 f"choose a cell that exposes them ({', '.join(cells_with_roles())}) or declare "
                                 "weight_roles / activation_roles on the cell (docs/plugins/hitnet.md, 'Roles')")
            for cell in found:
                self._apply_cell(cell, index)
                index += 1
        if cfg.quantize_embedding or cfg.quantize_decoder:
            self._apply_model_weights(model)
        if cfg.init_from:
            install_init_from(model, cfg.init_from)

    def _apply_cell(self, cell: Cell, index: int) -> None:
        cfg = self.config
        weight_roles = self._weight_roles(cell)
        act_roles = self._activation_roles(cell)
        if weight_roles:
            scope = ForwardScope()
            scope.attach(cell)
            for role in weight_roles:
                for pname in type(cell).weight_roles[role]:
                    path, _, attr = pname.rpartition(".")
                    module = cell.get_submodule(path) if path else cell
                    w = getattr(module, attr)
                    wq = WeightQuantizer(cfg, w, self._blocks(cell, pname, w), scope)
                    parametrize.register_parametrization(module, attr, wq)
        if act_roles:
            holder = nn.ModuleDict()
            for k, role in enumerate(act_roles):
                if cfg.slope != 1.0:
                    holder[role + PREACT] = Slope(cfg.slope)
                if cfg.activations != "none":
                    seed = cfg.eval_seed * 1_000_003 + index * 101 + k
                    holder[role] = ActivationQuantizer(cfg, signed=role not in cfg.unsigned_roles, seed=seed)
            cell.add_module("hitnet_quantizers", holder)
            cell.activation_quantizers.update(dict(holder.items()))

    def _apply_model_weights(self, model: nn.Module) -> None:
        cfg = self.config
        encoder, head = getattr(model, "encoder", None), getattr(model, "head", None)
        if encoder is not None and head is not None and getattr(head, "weight", None) is getattr(encoder, "weight", 0):
            raise ConfigError("quantizer: quantize_embedding/quantize_decoder do not support tied weights "
                              "(model.tie_weights=true); untie them or quantize the cells only")
        scope = ForwardScope()
        scope.attach(model)
        targets = ((cfg.quantize_embedding, encoder, nn.Embedding), (cfg.quantize_decoder, head, nn.Linear))
        for flag, module, kind in targets:
            if not flag:
                continue
            if not isinstance(module, kind):
                raise ConfigError(f"quantizer: '{self.registry_name}' can quantize the embedding/decoder only when "
                                  f"they are {kind.__name__} layers (got {type(module).__name__}); set "
                                  "quantize_embedding/quantize_decoder=false")
            parametrize.register_parametrization(module, "weight", WeightQuantizer(cfg, module.weight, 1, scope))

    # -- reporting -------------------------------------------------------------------------------
    def model_size_bytes(self, model: nn.Module) -> int:
        """Bytes of the model when quantized weights are packed (codes + float32 scales)."""
        from .export import size_report

        return sum(t.bytes for t in size_report(model))

    def export(self, model: nn.Module) -> dict[str, Tensor]:
        """Packed tensors (``<name>.codes`` uint8, ``<name>.scales`` float32) plus the full-precision ones."""
        from .export import export_tensors

        return export_tensors(model)[0]


class TernaryQuantizer(HitNetQuantizer):
    """Threshold ternary weights (TWN rule) alone; activations stay full precision, fused kernels kept."""

    config_class = TernaryConfig
    registry_name = "ternary"


class UniformQuantizer(HitNetQuantizer):
    """Uniform k-bit weights and activations (the paper's 2-bit baseline)."""

    config_class = UniformConfig
    registry_name = "uniform"


class BinaryQuantizer(HitNetQuantizer):
    """Binary weights and activations."""

    config_class = BinaryConfig
    registry_name = "binary"


# -- initialisation from a full-precision checkpoint ---------------------------------------------------

def load_full_precision(model: nn.Module, ref: str) -> None:
    """Copy a checkpoint's weights into ``model``'s latent weights.

    A key ``a.w`` of a full-precision checkpoint fills ``a.parametrizations.w.original``.
    """
    from seqplat.core.checkpoint import load_checkpoint
    from seqplat.core.train import resolve_run_reference

    ck = load_checkpoint(resolve_run_reference(ref), prefer="best")
    target = model.state_dict()
    own = {f"{name.rpartition('.')[0]}.parametrizations.{attr}.0.scales".lstrip(".")
           for name, _, attr, wq in quantized_weights(model) if wq.method == "trained_ternary"}
    state: dict[str, Tensor] = {}
    unexpected = []
    for key, value in ck.model_state.items():
        path, _, attr = key.rpartition(".")
        alt = f"{path}.parametrizations.{attr}.original" if path else f"parametrizations.{attr}.original"
        if key in target:
            state[key] = value
        elif alt in target:
            state[alt] = value
        else:
            unexpected.append(key)
    missing = [k for k in target if k not in state and k not in own]
    if unexpected or missing:
        raise CheckpointError(
            f"quantizer.init_from: checkpoint '{ck.url}' does not fit this model (unexpected: "
            f"{', '.join(unexpected[:4]) or '-'}; missing: {', '.join(missing[:4]) or '-'}); it must come from a run "
            f"with the same cell, task and model sizes"
        )
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(f"quantizer.init_from: checkpoint '{ck.url}' does not fit this model: "
                              f"{str(exc).splitlines()[0][:200]}") from exc
    for _, module, attr, wq in quantized_weights(model):
        wq.reset_scales(module.parametrizations[attr].original)


def install_init_from(model: nn.Module, ref: str) -> None:
    """Load ``ref`` into the latent weights at the first training forward, unless a state dict is loaded first.

    Deferring the load keeps rebuilding a finished run (resume, ``seqplat evaluate``, export) independent
    of the full-precision checkpoint: those load their own weights, which cancels the pending copy.
    """
    pending = [True]

    def cancel(*args: Any) -> None:
        pending[0] = False

    def before_forward(module: nn.Module, args: Any) -> None:
        if pending[0] and module.training:
            pending[0] = False
            load_full_precision(module, ref)

    model.register_load_state_dict_pre_hook(cancel)
    model.register_forward_pre_hook(before_forward)
