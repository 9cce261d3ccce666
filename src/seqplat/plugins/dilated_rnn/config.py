"""Configuration of the ``dilated_rnn`` wrapper cell.

The stack's dilations come either from an explicit list or from the paper's exponential rule
``s_l = M ** (l - 1 + l0)`` (``dilation_base`` = M, ``first_exponent`` = l0, ``num_layers`` = L).
After validation ``dilations`` always holds the resolved list and ``num_layers`` its length, so
the resolved config that ``seqplat config show`` prints (and checkpoints store) says exactly
which dilations ran.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationError, model_validator

from seqplat import CellConfig, SeqplatError
from seqplat.core.config import component_config, format_validation_error

#: layers of the paper's MNIST/copy-memory stacks (dilations 1..256)
DEFAULT_NUM_LAYERS = 9


class DilatedRNNConfig(CellConfig):
    """A stack of dilated recurrent layers around any registered cell."""

    inner: dict[str, Any] = Field(
        default_factory=lambda: {"name": "gru"},
        description="inner cell spec {name, options} built through the registry for every layer "
        "(rnn, lstm, gru or any registered cell); its hidden_size is set per layer by this cell",
    )
    hidden_size: int = Field(20, ge=1, description="units per layer H_l (unless hidden_sizes is given)")
    hidden_sizes: list[int] | None = Field(
        None, description="units per layer, one entry per layer (overrides hidden_size)"
    )
    dilations: list[int] | None = Field(
        None, description="dilation s_l of each layer, bottom first (None: dilation_base ** (l + first_exponent))"
    )
    num_layers: int | None = Field(
        None, ge=1, description=f"layers L when dilations is None (None: {DEFAULT_NUM_LAYERS}); must match "
        "len(dilations) otherwise"
    )
    dilation_base: int = Field(2, ge=1, description="M of the exponential rule s_l = M ** (l - 1 + l0)")
    first_exponent: int = Field(0, ge=0, description="l0 of the exponential rule: the first dilation is M ** l0")
    concat_outputs: bool = Field(
        True, description="when the first dilation d0 > 1, output at every t the top layer's outputs at "
        "t-d0+1..t concatenated oldest first (the paper's final 1 x d0 convolution); no effect when d0 = 1",
    )

    @model_validator(mode="after")
    def _resolve(self) -> DilatedRNNConfig:
        if self.dilations is None:
            n = self.num_layers or DEFAULT_NUM_LAYERS
            dilations = [self.dilation_base ** (layer + self.first_exponent) for layer in range(n)]
        else:
            dilations = list(self.dilations)
            if not dilations:
                raise ValueError("dilations: needs at least one layer, e.g. [1, 2, 4, 8]")
            bad = [d for d in dilations if not isinstance(d, int) or d < 1]
            if bad:
                raise ValueError(f"dilations: every dilation must be an integer >= 1, got {bad}")
            if self.num_layers is not None and self.num_layers != len(dilations):
                raise ValueError(
                    f"num_layers={self.num_layers} disagrees with {len(dilations)} dilations {dilations}; "
                    "drop num_layers or make them agree"
                )
        if self.hidden_sizes is not None:
            if len(self.hidden_sizes) != len(dilations):
                raise ValueError(
                    f"hidden_sizes has {len(self.hidden_sizes)} entries but there are {len(dilations)} layers "
                    f"(dilations {dilations})"
                )
            if any(h < 1 for h in self.hidden_sizes):
                raise ValueError(f"hidden_sizes: every entry must be >= 1, got {self.hidden_sizes}")
        # the config is frozen: fill the resolved values in place once, at validation
        object.__setattr__(self, "dilations", dilations)
        object.__setattr__(self, "num_layers", len(dilations))
        self._check_inner()
        return self

    def _check_inner(self) -> None:
        """The inner spec must name a registered cell that accepts a carried state."""
        spec = self.inner
        if not isinstance(spec.get("name"), str):
            raise ValueError(f"inner: needs a mapping with a cell 'name', e.g. {{name: gru}} (got {spec!r})")
        from seqplat.registry import get_registry

        try:
            cls = get_registry().get("cell", spec["name"]).obj
        except SeqplatError as exc:
            raise ValueError(f"inner.name: {exc}") from exc
        if "hidden_size" in spec and "hidden_size" in cls.config_class.model_fields:
            raise ValueError(
                "inner.hidden_size: set the width with dilated_rnn's hidden_size or hidden_sizes, "
                "not inside the inner spec"
            )
        if not getattr(cls, "supports_state_carry", True):
            raise ValueError(
                f"inner.name: cell '{spec['name']}' cannot start from a given state, which every dilated layer "
                "needs (each phase chain starts from its own state)"
            )
        for layer in range(len(self.layer_dilations)):
            try:
                component_config("cell", self.layer_spec(layer))
            except ValidationError as exc:
                lines = format_validation_error(exc, "inner.")
                raise ValueError("; ".join(lines)) from None

    @property
    def layer_dilations(self) -> list[int]:
        """The resolved dilations, bottom layer first."""
        assert self.dilations is not None  # filled by the validator
        return list(self.dilations)

    def layer_hidden_size(self, layer: int) -> int:
        """Units of layer ``layer`` (0-based)."""
        return self.hidden_sizes[layer] if self.hidden_sizes is not None else self.hidden_size

    def layer_spec(self, layer: int) -> dict[str, Any]:
        """The inner cell spec of layer ``layer`` (0-based), with this layer's width filled in when the
        inner cell has a ``hidden_size`` option."""
        from seqplat.registry import get_registry

        spec = dict(self.inner)
        cls = get_registry().get("cell", spec["name"]).obj
        if "hidden_size" in cls.config_class.model_fields:
            spec["hidden_size"] = self.layer_hidden_size(layer)
        return spec
