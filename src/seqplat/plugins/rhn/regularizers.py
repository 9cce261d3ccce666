"""``rhn_token_dropout``: Zilly et al.'s ``noise_x``, dropout of whole embedded tokens.

In ``rhn_train.py`` (spec §1, "Variational dropout") every training segment draws, per batch row, a
keep/drop decision for each input position, and a token that occurs again later in the same row reuses
the decision of its earlier occurrence; kept embeddings are scaled by ``1/(1-p)``. That is one mask
entry per (row, token type) per segment, which this regularizer draws directly: a ``[b, V]`` mask
gathered at the row's token ids, multiplied into the embedding output. It needs token ids, so it lives
on the model's embedding (a cell only sees vectors) and is a no-op in eval mode.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from seqplat import ConfigError, Regularizer, RegularizerConfig


class TokenDropoutConfig(RegularizerConfig):
    """Options of ``rhn_token_dropout``."""

    p: float = Field(0.1, ge=0.0, lt=1.0, description="probability of dropping a token type in a row for a "
                     "whole segment (Zilly's drop_x: .25 PTB word, .10 enwik8/text8)")


class TokenDropout(Regularizer):
    """Zilly's noise_x: drop whole embedded tokens, one decision per (row, token type) per segment."""

    config_class = TokenDropoutConfig
    config: TokenDropoutConfig

    def apply(self, model: nn.Module) -> None:
        encoder = getattr(model, "encoder", None)
        if not isinstance(encoder, nn.Embedding):
            raise ConfigError(
                "regularizers: rhn_token_dropout needs a token task (an nn.Embedding encoder); "
                f"this model's encoder is {type(encoder).__name__}"
            )
        p = self.config.p

        def hook(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor:
            if not module.training or p == 0.0:
                return out
            ids = args[0]
            keep = 1.0 - p
            mask = torch.empty(ids.shape[0], module.num_embeddings, device=out.device, dtype=out.dtype)
            mask.bernoulli_(keep).div_(keep)  # [b, V]: one decision per row and token type
            return out * mask.gather(1, ids.reshape(ids.shape[0], -1)).reshape(*ids.shape, 1)

        encoder.register_forward_hook(hook)
