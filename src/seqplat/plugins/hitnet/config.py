"""Configs of the quantizers: one field set, different defaults per registered name.

``hitnet`` is the paper's hybrid (ternary weights + Bernoulli ternary activations + sloping factor);
``ternary``, ``uniform`` and ``binary`` are the building blocks of its comparison (spec §1.2), each
applicable to weights, activations or both through the same fields.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from seqplat import QuantizerConfig

WeightMethod = Literal["none", "ternary", "trained_ternary", "bernoulli", "uniform", "binary"]
ActivationMethod = Literal["none", "bernoulli", "ternary", "uniform", "binary"]


class QuantizeConfig(QuantizerConfig):
    """Options shared by every quantizer of the hitnet plugin (symbols of docs/plugins/hitnet.md)."""

    weights: WeightMethod = Field(
        "ternary", description="weight quantizer at the cell's weight roles: ternary (threshold, TWN form), "
        "trained_ternary (Zhu et al.'s learned scales), bernoulli, uniform (k bits), binary, or none"
    )
    activations: ActivationMethod = Field(
        "bernoulli", description="activation quantizer at the activation roles: bernoulli (BTQ, stochastic "
        "ternary), ternary (round to {-1,0,1}), uniform (k bits), binary, or none"
    )
    bits: int = Field(2, ge=1, le=8, description="k, bits per value of the uniform quantizer (weights and activations)")
    threshold: float = Field(
        0.7, gt=0.0, lt=3.0, description="ternary weights: Delta = threshold * mean|W| per block (TWN's 0.7)"
    )
    trained_threshold: float = Field(
        0.05, gt=0.0, lt=1.0, description="trained_ternary weights: Delta = t * max|W| per block (Zhu et al.'s t)"
    )
    scale: Literal["mean", "none"] = Field(
        "mean", description="weights: keep the per-block scale alpha (mean), or none for pure {-1,0,1} values"
    )
    granularity: Literal["tensor", "gate"] = Field(
        "tensor", description="one (Delta, alpha) per weight matrix, or one per gate block of rows"
    )
    ste_clip: float | None = Field(
        None, gt=0.0, description="weights: zero the straight-through gradient where |W| > ste_clip (None: off)"
    )
    weight_roles: tuple[str, ...] | None = Field(
        None, description="weight roles to quantize (None: every role the cell exposes, e.g. input, recurrent)"
    )
    activation_roles: tuple[str, ...] | None = Field(
        None, description="activation roles to quantize (None: every sigmoid/tanh output the cell exposes, i.e. "
        "each role R with an R_preact role: lstm gate, candidate, hidden; gru gate, candidate)"
    )
    unsigned_roles: tuple[str, ...] = Field(
        ("gate",), description="roles whose values lie in [0, 1] (sigmoid outputs); the others lie in [-1, 1]"
    )
    slope: float = Field(
        1.0, ge=1.0, description="lambda, the sloping factor: sigmoid(lambda*z) and tanh(lambda*z) at the "
        "quantized roles (1: no sloping factor)"
    )
    act_threshold: float = Field(0.5, gt=0.0, lt=1.0, description="ternary activations: |x| above this maps to sign(x)")
    act_eval: Literal["stochastic", "deterministic", "expectation"] = Field(
        "stochastic", description="bernoulli activations at evaluation: stochastic (fresh draws from a generator "
        "reseeded with eval_seed at every switch to eval mode), deterministic (sign(x)*1[|x|>0.5]) or "
        "expectation (x itself: no activation quantization, an ablation)"
    )
    eval_seed: int = Field(0, ge=0, description="seed of the evaluation draws of stochastic activations")
    quantize_embedding: bool = Field(False, description="also quantize the token embedding matrix with `weights`")
    quantize_decoder: bool = Field(False, description="also quantize the output layer's weight matrix with `weights`")
    init_from: str | None = Field(
        None, description="start from a full-precision checkpoint (folder, run folder or MLflow run id): its "
        "weights are copied into the latent weights at the first training step (skipped when a checkpoint is "
        "loaded, e.g. on resume)"
    )

    @model_validator(mode="after")
    def _check(self) -> QuantizeConfig:
        if self.weights == "none" and self.activations == "none" and self.slope == 1.0:
            raise ValueError("weights and activations are both 'none' and slope is 1: the quantizer would do nothing; "
                             "set weights=ternary or activations=bernoulli (or remove the quantizer)")
        if self.weights == "none" and (self.quantize_embedding or self.quantize_decoder):
            raise ValueError("quantize_embedding/quantize_decoder need a weight method (weights=ternary, ...)")
        return self


class HitNetConfig(QuantizeConfig):
    """HitNet: threshold ternary weights, Bernoulli ternary activations, sloping factor lambda = 2."""

    slope: float = Field(
        2.0, ge=1.0, description="lambda, the sloping factor: sigmoid(lambda*z) and tanh(lambda*z) at the "
        "quantized roles (1: no sloping factor; 2 is our default, the paper's value is unconfirmed)"
    )


class TernaryConfig(QuantizeConfig):
    """Threshold ternary weights alone (TWN rule); activations full precision unless asked."""

    activations: ActivationMethod = Field(
        "none", description="activation quantizer at the activation roles (none: weights only, fused kernels kept)"
    )


class UniformConfig(QuantizeConfig):
    """Uniform k-bit weights and activations (2 bits by default)."""

    weights: WeightMethod = Field("uniform", description="weight quantizer (uniform k-bit by default)")
    activations: ActivationMethod = Field("uniform", description="activation quantizer (uniform k-bit by default)")


class BinaryConfig(QuantizeConfig):
    """Binary weights (alpha * sign W) and binary activations."""

    weights: WeightMethod = Field("binary", description="weight quantizer (binary by default)")
    activations: ActivationMethod = Field("binary", description="activation quantizer (binary by default)")
