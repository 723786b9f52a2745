"""Expression attention, placed in the UNet exactly where the release puts it (model.md, "One frame", step 6).

diffusers' `BasicTransformerBlock.forward` has no hook between the text cross-attention's residual add and
`norm3`, so `add_expression_attention` re-classes every transformer block of the UNet as
`ExpressionTransformerBlock`, whose `forward` is the release's order:

    h = h + attn1(norm1(h))
    h = h + attn2(norm2(h), text)
    h = h + _expression_attention(h, tokens)      # query: the un-normalised h; keys/values: the tokens
    h = h + ff(norm3(h))

Only the blocks of the cross-attention down and up blocks get an `_expression_attention` (a diffusers
`Attention`, so parameter paths are `<block path>._expression_attention.{to_q,to_k,to_v,to_out.0}` as in the
release's checkpoints); mid-block blocks run the plain order. Attention processors stay the extension point:
a backend may `set_processor` on `_expression_attention` or `attn2` modules (e.g. to cache keys/values).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.attention import BasicTransformerBlock, _chunked_feed_forward
from diffusers.models.attention_processor import Attention
from torch import nn

from .errors import ConfigError, InputError

# The key of `cross_attention_kwargs` that carries the tokens `[B, T, C]` through diffusers' blocks.
TOKENS_KWARG = "expression_tokens"


class ExpressionTransformerBlock(BasicTransformerBlock):
    """A `BasicTransformerBlock` (SD configuration only) with the release's expression attention step.

    Never constructed directly: `add_expression_attention` converts existing blocks in place, so the block's
    own parameters keep their diffusers names. `_expression_attention` is an `Attention` or None (mid block).
    """

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        timestep: torch.LongTensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        class_labels: torch.LongTensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """hidden_states `[B, N, dim]`, encoder_hidden_states (text) `[B, L, cross_dim]`; the expression
        tokens `[B, T, token_dim]` ride in `cross_attention_kwargs["expression_tokens"]`. Returns `[B, N, dim]`
        in the input dtype. Same signature as diffusers' (positional calls from gradient checkpointing)."""
        # Popped here, like diffusers pops "gligen", so attention processors never see it.
        kwargs = dict(cross_attention_kwargs) if cross_attention_kwargs is not None else {}
        tokens = kwargs.pop(TOKENS_KWARG, None)
        expression_attention = self._expression_attention

        attn_output = self.attn1(self.norm1(hidden_states), attention_mask=attention_mask, **kwargs)
        hidden_states = attn_output + hidden_states
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.squeeze(1)

        attn_output = self.attn2(
            self.norm2(hidden_states),
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=encoder_attention_mask,
            **kwargs,
        )
        hidden_states = attn_output + hidden_states

        if expression_attention is not None:
            if tokens is None:
                raise InputError(
                    "this UNet has expression attention but got no expression tokens; call it with "
                    "cross_attention_kwargs={'expression_tokens': tokens} (tokens [B, T, C], see Avatar.predict)"
                )
            hidden_states = expression_attention(hidden_states, encoder_hidden_states=tokens, **kwargs) + hidden_states

        norm_hidden_states = self.norm3(hidden_states)
        if self._chunk_size is not None:
            ff_output = _chunked_feed_forward(self.ff, norm_hidden_states, self._chunk_dim, self._chunk_size)
        else:
            ff_output = self.ff(norm_hidden_states)
        hidden_states = ff_output + hidden_states
        if hidden_states.ndim == 4:
            hidden_states = hidden_states.squeeze(1)
        return hidden_states


def add_expression_attention(unet: nn.Module, token_dim: int | None = None) -> list[str]:
    """Convert `unet` (a diffusers `UNet2DConditionModel`) in place; returns the paths of the blocks that got an
    `_expression_attention` (down and up blocks only, in module order).

    token_dim: width of the expression tokens (default: the UNet's cross_attention_dim, as in the release).
    New layers are created on the device and dtype of each block's `attn2`, with torch's default init: call
    `init_expression_from_text` (or load weights) afterwards. Refuses block configurations whose diffusers
    forward differs from the SD one (ConfigError), since the release order is only written for that one.
    """
    config = getattr(unet, "config", None)
    if config is None or not hasattr(unet, "down_blocks"):
        raise ConfigError("add_expression_attention needs a diffusers UNet2DConditionModel")
    if any(isinstance(m, ExpressionTransformerBlock) for m in unet.modules()):
        raise ConfigError("this UNet already has expression attention; convert a plain diffusers UNet only once")
    token_dim = config.cross_attention_dim if token_dim is None else token_dim
    paths = []
    for name, block in unet.named_modules():
        if not isinstance(block, BasicTransformerBlock):
            continue
        _check_sd_block(name, block)
        block.__class__ = ExpressionTransformerBlock
        if not name.startswith(("down_blocks.", "up_blocks.")):
            # Registered as an empty child so `_expression_attention` reads None without a class attribute
            # (which would shadow the module that down/up blocks register under the same name).
            block.register_module("_expression_attention", None)
            continue
        attn2 = block.attn2
        weight = attn2.to_q.weight
        block._expression_attention = Attention(
            query_dim=block.dim,
            cross_attention_dim=token_dim,
            heads=attn2.heads,
            dim_head=attn2.inner_dim // attn2.heads,
            bias=attn2.to_q.bias is not None,
            upcast_attention=bool(config.upcast_attention),
            out_bias=attn2.to_out[0].bias is not None,
        ).to(device=weight.device, dtype=weight.dtype)
        paths.append(name)
    if not paths:
        raise ConfigError("the UNet has no transformer blocks in its down or up blocks to add expression attention to")
    return paths


def expression_attention_paths(unet: nn.Module) -> list[str]:
    """Module paths (in module order) of the transformer blocks that hold an `_expression_attention`."""
    return [
        name
        for name, block in unet.named_modules()
        if isinstance(block, ExpressionTransformerBlock) and block._expression_attention is not None
    ]


@torch.no_grad()
def init_expression_from_text(unet: nn.Module) -> None:
    """The release's training init: q/k/v copied from each block's text cross-attention (`attn2`), the output
    projection zero, so a fresh layer changes nothing. Needs token_dim == cross_attention_dim."""
    for path in expression_attention_paths(unet):
        block = unet.get_submodule(path)
        expr, text = block._expression_attention, block.attn2
        for name in ("to_q", "to_k", "to_v"):
            src, dst = getattr(text, name), getattr(expr, name)
            if src.weight.shape != dst.weight.shape:
                raise ConfigError(
                    f"{path}: cannot copy attn2.{name} {tuple(src.weight.shape)} into the expression attention "
                    f"{tuple(dst.weight.shape)}; the training init needs token width == cross_attention_dim"
                )
            dst.weight.copy_(src.weight)
            if dst.bias is not None:
                dst.bias.copy_(src.bias)
        for p in expr.to_out[0].parameters():
            p.zero_()


def _check_sd_block(name: str, block: BasicTransformerBlock) -> None:
    """The release order is written for the SD block only; anything else would silently compute another net."""
    problems = []
    if block.norm_type != "layer_norm":
        problems.append(f"norm_type {block.norm_type!r} (need 'layer_norm')")
    if block.pos_embed is not None:
        problems.append("positional embeddings")
    if hasattr(block, "fuser"):
        problems.append("GLIGEN gated attention")
    if block.only_cross_attention:
        problems.append("only_cross_attention")
    if block.attn2 is None or not block.attn2.is_cross_attention:
        problems.append("no text cross-attention (attn2)")
    if problems:
        raise ConfigError(
            f"transformer block {name} is not a Stable Diffusion block ({', '.join(problems)}); expression attention "
            "is only defined for the SD 2.x UNet configuration: use a UNetConfig like the sd21 preset"
        )
