"""The torch modules that `export.onnx` turns into ONNX graphs: an avatar's networks split where a frame's work splits.

    conditioning   condition [B, C, H, W] -> cond_embedding [B, C0, h, w]    once per frame (the ControlNet's
                                                                              conditioning embedding, t-independent)
    denoiser       latent [B, c, h, w], timestep [B], cond_embedding,        once per step: ControlNet + UNet
                   tokens [B, T, D] -> v [B, c, h, w]                         with expression attention
    decoder        latent [B, c, h, w] -> image [B, 3, H, W] in [-1, 1]       once per frame (the VAE decoder)
    tiny_decoder   latent [B, c, h, w] -> image [B, 3, H, W] in [-1, 1]       the avatar's trained tiny decoder
                                                                              (`engine.tiny_decoder`), if it has one
    tokens         code [B, E] -> tokens [B, T, D]                           the expression projection

Every input and output is float32 whatever the graph's compute dtype (casts sit inside the graphs), so a
backend feeds every graph the same way. The modules wrap private copies of diffusers' own modules and run their
own `forward`s (`ControlNetModel`, `UNet2DConditionModel`, the VAE's `post_quant_conv` + `Decoder`); what changes:
- the timestep is a graph input (float32 `[B]`): the time embedding is computed inside the graph, so one graph
  serves every sampler and step count;
- the prompt is constant: each text cross-attention's keys and values are computed here once and stored as
  buffers (graph constants), and the prompt itself never enters the graph;
- the denoiser's ControlNet takes the conditioning embedding (its `controlnet_cond_embedding` is an identity
  there: diffusers adds `controlnet_cond_embedding(cond)` to `conv_in(sample)`, nothing else reads it);
- attention runs through `GraphAttention` (a diffusers attention processor): logits and softmax in float32;
- in half-precision graphs every GroupNorm / LayerNorm and the time embedding run in float32 on float32 weights
  (`Float32`), so softmax, normalisation and attention logits are float32 by construction.
"""

from __future__ import annotations

import copy

import torch
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from torch import nn

from engine.backends.hoisted import check_sd_networks
from engine.errors import ConfigError
from engine.expression import TOKENS_KWARG

GRAPHS = ("conditioning", "denoiser", "decoder", "tokens", "tiny_decoder")


class Float32(nn.Module):
    """Runs `module` (kept in float32) on a float32 cast of its first input and casts the result back to that
    input's dtype; other arguments pass through. Wraps norms and the time embedding in half-precision graphs."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module.float()

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        return self.module(x.float(), *args).to(x.dtype)


class GraphAttention:
    """Attention processor for export (diffusers' `AttnProcessor2_0` order of operations, SD configurations).

    Keys and values come from the buffers `attn.folded_k` / `attn.folded_v` `[1, heads, L, d]` when `fold`
    stored them (the constant prompt), else from `encoder_hidden_states` (expression tokens) or the hidden states
    (self-attention). Logits `q k^T * scale` and the softmax are float32 (the inputs are upcast, as diffusers'
    `upcast_attention` does), the probabilities are cast back to the values' dtype for the second matmul.
    Handles the VAE's attention too: 4-D input, group norm, residual connection, output rescale.
    """

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 temb=None, **unused):
        if attention_mask is not None or attn.spatial_norm is not None or attn.norm_q is not None \
                or attn.norm_cross is not None:
            raise ConfigError("export handles Stable Diffusion attention only (no masks, spatial or q/k norms)")
        residual = hidden_states
        image = hidden_states.ndim == 4
        if image:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        b, n, _ = hidden_states.shape
        heads = attn.heads
        q = attn.to_q(hidden_states).view(b, n, heads, -1).transpose(1, 2)
        if hasattr(attn, "folded_k"):
            k, v = attn.folded_k.expand(b, -1, -1, -1), attn.folded_v.expand(b, -1, -1, -1)
        else:
            context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            k = attn.to_k(context).view(b, context.shape[1], heads, -1).transpose(1, 2)
            v = attn.to_v(context).view(b, context.shape[1], heads, -1).transpose(1, 2)
        logits = torch.matmul(q.float() * attn.scale, k.float().transpose(-1, -2))  # [B, heads, N, L] float32
        probs = torch.softmax(logits, dim=-1).to(v.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, n, -1)
        out = attn.to_out[1](attn.to_out[0](out))
        if image:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


@torch.no_grad()
def fold(attn: Attention, context: torch.Tensor) -> None:
    """Store the keys and values of a constant `context` `[1, L, D]` on `attn` as buffers `[1, heads, L, d]`."""
    _, n, _ = context.shape
    attn.register_buffer("folded_k", attn.to_k(context).view(1, n, attn.heads, -1).transpose(1, 2).contiguous())
    attn.register_buffer("folded_v", attn.to_v(context).view(1, n, attn.heads, -1).transpose(1, 2).contiguous())


def graph_copy(module: nn.Module, dtype: torch.dtype, float32: tuple[str, ...] = ()) -> nn.Module:
    """A private eval copy of `module` in `dtype` with `GraphAttention` on every `Attention`; in half precision
    every GroupNorm / LayerNorm and the submodules named in `float32` stay float32 (`Float32`, built from the
    float32 originals, so their weights are never rounded)."""
    out = copy.deepcopy(module).to(dtype).eval().requires_grad_(False)
    if dtype != torch.float32:
        for name, m in module.named_modules():
            if isinstance(m, (nn.GroupNorm, nn.LayerNorm)) or name in float32:
                parent, _, leaf = name.rpartition(".")
                wrapped = Float32(copy.deepcopy(m).float().eval().requires_grad_(False))
                setattr(out.get_submodule(parent) if parent else out, leaf, wrapped)
    for m in out.modules():
        if isinstance(m, Attention):
            m.set_processor(GraphAttention())
    return out


def _fold_prompt(net: nn.Module, prompt: torch.Tensor) -> None:
    """Fold the prompt's keys/values into every text cross-attention (`attn2`) of `net`'s transformer blocks."""
    for block in net.modules():
        if isinstance(block, BasicTransformerBlock):
            fold(block.attn2, prompt.to(block.attn2.to_k.weight.dtype))


class ConditioningGraph(nn.Module):
    """condition `[B, C, H, W]` float32 (the 73-channel image) -> the ControlNet's conditioning embedding
    `[B, C0, h, w]` float32 (C0 = the ControlNet's first block width, h = H / vae.downsample)."""

    def __init__(self, avatar, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.embedding = graph_copy(avatar.controlnet.controlnet_cond_embedding, dtype)

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        return self.embedding(condition.to(self.dtype)).float()


class DenoiserGraph(nn.Module):
    """One ControlNet + UNet evaluation (`Avatar.predict` with the conditioning embedding precomputed).

    latent `[B, c, h, w]`, timestep `[B]` (float32; the sampler's integer timesteps are exact), cond_embedding
    `[B, C0, h, w]` (`ConditioningGraph`), tokens `[B, T, D]` (`Avatar.expression_tokens`), all float32 ->
    v `[B, c, h, w]` float32. Computed in `dtype`."""

    def __init__(self, avatar, dtype: torch.dtype):
        super().__init__()
        check_sd_networks(avatar.unet, avatar.controlnet)
        self.dtype = dtype
        keep = ("time_embedding",)
        self.unet = graph_copy(avatar.unet, dtype, keep)
        self.controlnet = graph_copy(avatar.controlnet, dtype, keep)
        self.controlnet.controlnet_cond_embedding = nn.Identity()
        prompt = avatar.prompt_embedding.detach().float()
        for net in (self.unet, self.controlnet):
            _fold_prompt(net, prompt)
        # The prompt's only readers (attn2's keys/values) are folded: diffusers' forwards get a zero stand-in of
        # its shape, which nothing reads, so it drops out of the graph.
        self.register_buffer("prompt", torch.zeros(1, prompt.shape[1], prompt.shape[2], dtype=dtype))

    def forward(self, latent, timestep, cond_embedding, tokens) -> torch.Tensor:
        x = latent.to(self.dtype)
        b = x.shape[0]
        prompt = self.prompt.expand(b, -1, -1)
        down, mid = self.controlnet(x, timestep, encoder_hidden_states=prompt,
                                    controlnet_cond=cond_embedding.to(self.dtype), conditioning_scale=1.0,
                                    return_dict=False)
        v = self.unet(x, timestep, encoder_hidden_states=prompt, down_block_additional_residuals=down,
                      mid_block_additional_residual=mid, cross_attention_kwargs={TOKENS_KWARG: tokens.to(self.dtype)},
                      return_dict=False)[0]
        return v.float()


class DecoderGraph(nn.Module):
    """latent `[B, c, h, w]` float32 -> image `[B, 3, H, W]` float32, nominally in [-1, 1] (`Avatar.decode`:
    divide by the latent scale, post_quant_conv, the VAE decoder)."""

    def __init__(self, avatar, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.scale = float(avatar.config.vae.scaling_factor)
        pqc = avatar.vae.post_quant_conv
        self.post_quant_conv = graph_copy(pqc, dtype) if pqc is not None else None
        self.decoder = graph_copy(avatar.vae.decoder, dtype)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        z = (latent / self.scale).to(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).float()


class TinyDecoderGraph(nn.Module):
    """latent `[B, c, h, w]` float32 -> image `[B, 3, H, W]` float32 (`Avatar.decode(latent, "tiny")`: the trained
    tiny decoder takes the diffusion latent as it is)."""

    def __init__(self, avatar, dtype: torch.dtype):
        super().__init__()
        if avatar.tiny_decoder is None:
            raise ConfigError(f"avatar {avatar.config.name!r} has no tiny decoder to export; train one with `avatar "
                              "distill-decoder`, or leave the tiny_decoder graph out")
        self.dtype = dtype
        self.decoder = graph_copy(avatar.tiny_decoder, dtype)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decoder(latent.to(self.dtype)).float()


class TokensGraph(nn.Module):
    """Expression code `[B, E]` float32 -> tokens `[B, T, D]` float32 (`Avatar.expression_tokens`; always
    float32: a single small linear layer)."""

    def __init__(self, avatar):
        super().__init__()
        self.proj = copy.deepcopy(avatar.expression_proj).float().eval().requires_grad_(False)
        self.shape = (avatar.config.expression_tokens, avatar.config.token_dim)

    def forward(self, code: torch.Tensor) -> torch.Tensor:
        return self.proj(code).view(code.shape[0], *self.shape)


def graph_module(name: str, avatar, dtype: torch.dtype) -> nn.Module:
    """The module of graph `name` (one of `GRAPHS`)."""
    if name == "tokens":
        return TokensGraph(avatar)
    return {"conditioning": ConditioningGraph, "denoiser": DenoiserGraph, "decoder": DecoderGraph,
            "tiny_decoder": TinyDecoderGraph}[name](avatar, dtype)


def example_inputs(name: str, config, batch: int) -> dict[str, torch.Tensor]:
    """Named float32 example inputs of graph `name` for `config` at `batch` (their shapes are the graph's)."""
    c, h = config.vae.latent_channels, config.latent_size
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(shape, generator=gen)

    if name == "conditioning":
        return {"condition": randn(batch, config.condition_channels, config.image_size, config.image_size)}
    if name == "denoiser":
        return {"latent": randn(batch, c, h, h), "timestep": torch.full((batch,), 500.0),
                "cond_embedding": randn(*output_shape("conditioning", config, batch)),
                "tokens": randn(batch, config.expression_tokens, config.token_dim)}
    if name in ("decoder", "tiny_decoder"):
        return {"latent": randn(batch, c, h, h)}
    if name == "tokens":
        return {"code": randn(batch, config.expression_dim)}
    raise ConfigError(f"unknown graph {name!r}; choose one of {GRAPHS}")


OUTPUTS = {"conditioning": "cond_embedding", "denoiser": "v", "decoder": "image", "tokens": "tokens",
           "tiny_decoder": "image"}


def output_shape(name: str, config, batch: int) -> list[int]:
    """The static shape of graph `name`'s output (`OUTPUTS[name]`) for `config` at `batch`."""
    c, h = config.vae.latent_channels, config.latent_size
    return {"conditioning": [batch, config.unet.block_out_channels[0], h, h], "denoiser": [batch, c, h, h],
            "decoder": [batch, 3, config.image_size, config.image_size],
            "tiny_decoder": [batch, 3, config.image_size, config.image_size],
            "tokens": [batch, config.expression_tokens, config.token_dim]}[name]
