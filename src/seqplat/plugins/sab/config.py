"""Configuration of the ``sab`` wrapper cell (Sparse Attentive Backtracking).

The paper's three knobs are ``k_att`` (write a macro-state every ``k_att`` steps), ``k_top`` (read
the ``k_top`` best-scoring macro-states) and ``k_trunc`` (local truncated-BPTT window). The places
where the released code differs from the paper are separate options (``scorer``, ``sparsifier``,
``small_memory``, ``zero_slot``, ``truncation``); ``reproduce_released_code = true`` sets all of them
to the released code's behaviour at once. After validation every one of them holds its resolved
value, so ``seqplat config show`` and checkpoints say exactly what ran.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from seqplat import CellConfig, SeqplatError
from seqplat.core.config import component_config, format_validation_error

__all__ = ["PAPER_CHOICES", "RELEASE_CHOICES", "SABConfig"]

#: the resolved value of each switchable behaviour: paper-faithful default / released code
PAPER_CHOICES: dict[str, Any] = {
    "scorer": "mlp",
    "sparsifier": "paper",
    "small_memory": "softmax",
    "zero_slot": False,
    "truncation": "aligned",
}
RELEASE_CHOICES: dict[str, Any] = {
    "scorer": "official",
    "sparsifier": "official",
    "small_memory": "raw",
    "zero_slot": True,
    "truncation": "official",
}


class SABConfig(CellConfig):
    """SAB around any registered step-capable cell (default: the baselines' ``lstm``)."""

    inner: dict[str, Any] = Field(
        default_factory=lambda: {"name": "lstm"},
        description="inner cell spec {name, options} built through the registry; the cell must support "
        "one-step unrolling (supports_step). Its hidden_size is set by this cell's hidden_size",
    )
    hidden_size: int = Field(128, ge=1, description="units H of the inner cell (its hidden_size option)")
    k_att: int = Field(2, ge=1, description="k_att: write the state h_t into memory when (t+1) mod k_att == 0")
    k_top: int = Field(
        10, ge=0,
        description="k_top: memories read per step (0: no memory at all, i.e. the inner cell with truncated BPTT)",
    )
    k_trunc: int | None = Field(
        10, ge=0, description="k_trunc: local truncated-BPTT window in steps (0 or None: no truncation, full BPTT "
        "within the chunk)"
    )
    memory_size: int = Field(
        128, ge=1, description="capacity of the macro-state memory in slots; when full the oldest slot is "
        "overwritten. Set >= 1 + (steps per sequence) // k_att to keep every macro-state",
    )
    scorer: Literal["mlp", "official"] | None = Field(
        None, description="attention score a(h_t, m_i): 'mlp' = v^T tanh(W_q h_t + W_m m_i + b) (state-dependent, "
        "paper), 'official' = w^T tanh([h_t; m_i]) of the release (state-independent once |M| > k_top). "
        "None: mlp, or official with reproduce_released_code",
    )
    score_size: int | None = Field(
        None, ge=1, description="hidden width d of the mlp scorer (None: hidden_size)"
    )
    sparsifier: Literal["paper", "official"] | None = Field(
        None, description="'paper': subtract the (k_top+1)-th largest score, rectify, normalise (k_top weights); "
        "'official': subtract the k_top-th largest + epsilon (k_top - 1 weights). None: by reproduce_released_code",
    )
    small_memory: Literal["softmax", "raw"] | None = Field(
        None, description="weights when |M| <= k_top: 'softmax' over all memories (dense attention), 'raw' = "
        "the unnormalised scores as in the release. None: by reproduce_released_code",
    )
    zero_slot: bool | None = Field(
        None, description="memory starts with the initial state h_0 in slot 0, as in the release "
        "(None: by reproduce_released_code)",
    )
    truncation: Literal["aligned", "official"] | None = Field(
        None, description="where the local windows start: 'aligned' detaches before steps t = k_trunc, "
        "2 k_trunc, ... (equal windows); 'official' before steps with (t+1) mod k_trunc == 0 as in the "
        "release (first window k_trunc - 1 steps). None: by reproduce_released_code",
    )
    detach_threshold: bool = Field(
        False, description="stop the gradient through the threshold score delta (False: as in the release, "
        "the threshold slot also receives gradient)",
    )
    epsilon: float = Field(1e-7, gt=0.0, description="epsilon of the official sparsifier (threshold and sum)")
    output: Literal["state_and_summary", "state"] = Field(
        "state_and_summary", description="cell output y_t: [h_t; s_t] (2H, the release's head input) or h_t (H)"
    )
    hidden_state_index: int | None = Field(
        None, ge=0, description="index (in flattened order) of the inner state tensor that receives the summary "
        "(None: the tensor the inner step returns as its output, e.g. h of (h, c))",
    )
    backend: Literal["auto", "cpp", "python"] = Field(
        "auto", description="fast path with an lstm inner cell and the mlp scorer: 'cpp' runs the whole loop in "
        "C++ (sab_cpu.cpp, float32/float64 CPU tensors; an error where it cannot), 'python' the torch-op loop, "
        "'auto' the C++ loop where it can run"
    )
    reproduce_released_code: bool = Field(
        False, description="reproduce the released code exactly: official scorer and sparsifier, raw scores "
        "for small memories, the h_0 slot, official truncation windows",
    )

    @model_validator(mode="before")
    @classmethod
    def _resolve_switches(cls, data: Any) -> Any:
        """Fill the switchable behaviours from ``reproduce_released_code`` and refuse contradictions."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        release = bool(data.get("reproduce_released_code", False))
        wanted = RELEASE_CHOICES if release else PAPER_CHOICES
        for key, value in wanted.items():
            given = data.get(key)
            if given is None:
                data[key] = value
            elif release and given != value:
                raise ValueError(
                    f"{key}={given!r} contradicts reproduce_released_code=true (the release uses {value!r}); "
                    f"drop {key} or set reproduce_released_code=false"
                )
        return data

    @model_validator(mode="after")
    def _check(self) -> SABConfig:
        self._check_inner()
        if self.backend == "cpp" and (self.inner.get("name") != "lstm" or self.scorer != "mlp"):
            raise ValueError(
                f"backend: 'cpp' runs an lstm inner cell with the mlp scorer (got inner {self.inner.get('name')!r}, "
                f"scorer {self.scorer!r}); use backend 'auto' or 'python'"
            )
        return self

    def _check_inner(self) -> None:
        """The inner spec must name a registered, step-capable cell with valid options."""
        spec = self.inner
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ValueError(f"inner: needs a mapping with a cell 'name', e.g. {{name: lstm}} (got {spec!r})")
        from seqplat.registry import get_registry

        try:
            cls = get_registry().get("cell", spec["name"]).obj
        except SeqplatError as exc:
            raise ValueError(f"inner.name: {exc}") from exc
        if not getattr(cls, "supports_step", False):
            raise ValueError(
                f"inner.name: cell '{spec['name']}' cannot be unrolled one step at a time (supports_step is "
                "False); SAB reads its memory between steps. Choose a step cell such as lstm, gru or rnn"
            )
        if "hidden_size" in spec and "hidden_size" in cls.config_class.model_fields:
            raise ValueError("inner.hidden_size: set the width with sab's hidden_size, not inside the inner spec")
        try:
            component_config("cell", self.inner_spec())
        except ValidationError as exc:
            raise ValueError("; ".join(format_validation_error(exc, "inner."))) from None

    def inner_spec(self) -> dict[str, Any]:
        """The inner cell spec with ``hidden_size`` filled in when the inner cell has that option."""
        from seqplat.registry import get_registry

        spec = dict(self.inner)
        cls = get_registry().get("cell", spec["name"]).obj
        if "hidden_size" in cls.config_class.model_fields:
            spec["hidden_size"] = self.hidden_size
        return spec
