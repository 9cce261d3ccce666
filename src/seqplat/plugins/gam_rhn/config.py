"""Configuration of the ``gam_rhn`` cell (GAM-RHN-L of Luo & Yu 2019)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator

from seqplat import CellConfig

_MEMORY = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


def parse_memory(text: str) -> tuple[int, int]:
    """``"SxN"`` -> ``(S, N)``: N groups of S scalar slots each (the authors' ``gam_config``)."""
    match = _MEMORY.match(text)
    if match is None:
        raise ValueError(
            f"memory must look like 'SxN' (S slots per group, N groups), e.g. '3x600'; got {text!r}"
        )
    slots, groups = int(match.group(1)), int(match.group(2))
    if slots < 1 or groups < 1:
        raise ValueError(f"memory {text!r}: S (slots per group) and N (groups) must both be >= 1")
    return slots, groups


class GAMRHNConfig(CellConfig):
    """Options of the ``gam_rhn`` cell. Defaults are the authors' temporal-order model (about 20k
    parameters with 6 one-hot inputs and an 8-way head)."""

    hidden_size: int = Field(
        60, ge=1, description="D, width of the highway state s and of the outputs (the authors' state_size)"
    )
    memory: str = Field(
        "6x10",
        description="grouped auxiliary memory as 'SxN' like the authors' gam_config: N groups of S scalar "
        "slots each, S*N slots in all; the softmax of every address runs over the S slots of one group and "
        "the written value m_bar has one entry per group (N). '3x600' = 600 groups of 3 slots",
    )
    head_size: int = Field(10, ge=1, description="H, width of the write head and of the read heads of layers >= 2")
    depth: int = Field(
        1, ge=1, description="L, highway layers per time step, each with its own read (the -L of GAM-RHN-L; "
        "the authors' num_layers). Not model.num_layers, which stacks whole cells"
    )
    read_address_bias: bool = Field(
        True, description="read addresses carry a zero-initialised bias (the authors' code after tframe be2a400, "
        "used in their published runs); False: no bias, as in the earlier matmul read"
    )
    write_address_bias: bool = Field(
        False, description="the write address carries a bias (the authors' address_bias flag, off in every run)"
    )
    gam_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="dropout on the written value m_bar, fresh mask every step. The "
        "published runs set 0.3-0.4 but the pinned code never applied it: keep 0 to reproduce them"
    )
    rhn_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="dropout on every highway candidate s_hat, fresh mask every step"
    )

    backend: Literal["auto", "cpp", "python"] = Field(
        "auto", description="the fast path's time loop: 'cpp' (C++ kernel built at first use, float32/float64 "
        "CPU tensors), 'python' (torch ops, any device), 'auto' (cpp on CPU when the kernel builds, else python)"
    )

    @field_validator("memory")
    @classmethod
    def _check_memory(cls, value: str) -> str:
        slots, groups = parse_memory(value)
        return f"{slots}x{groups}"

    @property
    def slots(self) -> int:
        """S, scalar slots per group."""
        return parse_memory(self.memory)[0]

    @property
    def groups(self) -> int:
        """N, number of groups (and width of m_bar and of every read)."""
        return parse_memory(self.memory)[1]

    @property
    def memory_size(self) -> int:
        """S*N, slots in all."""
        slots, groups = parse_memory(self.memory)
        return slots * groups
