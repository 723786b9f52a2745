"""The reference's ControlNet + UNet step with every per-frame and per-run constant hoisted out of it.

`HoistedNetworks` holds private copies of an avatar's networks (the caller's avatar is never modified) and
computes exactly `Avatar.predict` and `Avatar.decode`, reorganised so that a step does only per-step work:

    at construction   text keys/values of every cross-attention (`attn2`): the prompt is constant;
                      each resnet's time projection `time_emb_proj(silu(time_embedding(t_i)))` for every
                      step i of the sampler, tabulated in float32 (`StepTable`); self-attention q/k/v fused
                      into one weight (one GEMM)
    once per frame    `prepare(condition, tokens)`: expression keys/values of every `_expression_attention`
                      and the ControlNet's conditioning embedding (t-independent, `controlnet.py` adds it to
                      `conv_in(sample)`)
    per step          `predict(i, x, cond_embedding)`: conv_in -> blocks -> residual adds, with attention
                      through `F.scaled_dot_product_attention` and `temb` read from the tables

`controlnet_residuals` and `unet_down` + `unet_up` are diffusers' `ControlNetModel.forward` and
`UNet2DConditionModel.forward` for the Stable Diffusion configuration (checked by `check_sd_networks`), minus
the time embedding, the conditioning embedding and the `conditioning_scale` multiply (1.0 in the release).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.resnet import ResnetBlock2D
from torch import nn

from ..errors import ConfigError
from ..expression import TOKENS_KWARG
from . import copy_module


class StepState:
    """The sampler step being traced or run; `StepTable`s read `i` (a python int, so no device work)."""

    i = 0


class StepTable(nn.Module):
    """Stands in for a resnet's `time_emb_proj`: returns row `state.i` of `table` `[N, 1, C]`, the projection of
    step i's time embedding (its input, the resnet's `temb`, is ignored; the resnet is set `skip_time_act`)."""

    def __init__(self, table: torch.Tensor, state: StepState):
        super().__init__()
        self.register_buffer("table", table)
        self.state = state

    def forward(self, _temb) -> torch.Tensor:
        return self.table[self.state.i]


class SDPAttention:
    """Attention processor: `F.scaled_dot_product_attention` on keys/values that are either cached (`cache`:
    text K/V once, expression K/V once per frame) or, for self-attention, projected with one fused q/k/v GEMM."""

    def __init__(self, attn, fuse_qkv: bool = False):
        self.kv: tuple[torch.Tensor, torch.Tensor] | None = None
        self.qkv = None
        if fuse_qkv:
            # One [3 inner, dim] weight; to_q/k/v become views of it, so nothing is stored twice.
            weight = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight]).detach()
            n = attn.to_q.weight.shape[0]
            for i, lin in enumerate((attn.to_q, attn.to_k, attn.to_v)):
                lin.weight = nn.Parameter(weight[i * n:(i + 1) * n], requires_grad=False)
            self.qkv = weight

    def cache(self, attn, context: torch.Tensor) -> None:
        """Keys and values of `context` `[B, L, D]` -> `[B, heads, L, d]`, used by every later call."""
        b, n, _ = context.shape
        k = attn.to_k(context).view(b, n, attn.heads, -1).transpose(1, 2)
        v = attn.to_v(context).view(b, n, attn.heads, -1).transpose(1, 2)
        self.kv = (k, v)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **unused):
        b, n, _ = hidden_states.shape
        h = attn.heads
        if self.kv is not None:
            q = attn.to_q(hidden_states).view(b, n, h, -1).transpose(1, 2)
            k, v = self.kv
            if k.shape[0] != b:
                k, v = k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1)
        elif self.qkv is not None:
            q, k, v = F.linear(hidden_states, self.qkv).view(b, n, 3, h, -1).permute(2, 0, 3, 1, 4)
        else:
            context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
            q = attn.to_q(hidden_states).view(b, n, h, -1).transpose(1, 2)
            k = attn.to_k(context).view(b, context.shape[1], h, -1).transpose(1, 2)
            v = attn.to_v(context).view(b, context.shape[1], h, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        out = out.transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out))


def check_sd_networks(unet, controlnet) -> None:
    """ConfigError unless the networks are the Stable Diffusion configuration the hoisted forward is written for."""
    problems = []
    uc, cc = unet.config, controlnet.config
    if uc.center_input_sample or uc.class_embed_type or uc.addition_embed_type or unet.time_embed_act is not None:
        problems.append("UNet class/addition embeddings, time_embed_act or center_input_sample")
    if getattr(unet, "encoder_hid_proj", None) is not None or unet.conv_norm_out is None:
        problems.append("UNet encoder_hid_proj or no conv_norm_out")
    if cc.class_embed_type or cc.addition_embed_type or cc.global_pool_conditions:
        problems.append("ControlNet class/addition embeddings or global pooling")
    if cc.controlnet_conditioning_channel_order != "rgb":
        problems.append("ControlNet 'bgr' conditioning order")
    for net in (unet, controlnet):
        for block in net.modules():
            if isinstance(block, BasicTransformerBlock):
                for attn in (block.attn1, block.attn2, getattr(block, "_expression_attention", None)):
                    if attn is not None and (attn.group_norm is not None or attn.spatial_norm is not None
                                             or attn.residual_connection or attn.rescale_output_factor != 1.0
                                             or attn.norm_q is not None or attn.norm_cross is not None):
                        problems.append("attention with norms, residual or output rescale")
    if problems:
        raise ConfigError(
            f"the compiled backend handles the Stable Diffusion 2.x network configuration only, got: "
            f"{'; '.join(sorted(set(problems)))}; use backend='reference' for this avatar"
        )


class HoistedNetworks(nn.Module):
    """Private copies of the avatar's UNet, ControlNet and decoder in `dtype` (optionally channels-last), with
    hoisted constants (module docstring). `timesteps`: the sampler's LongTensor `[N]`."""

    def __init__(self, avatar, timesteps: torch.Tensor, dtype: torch.dtype, device: torch.device,
                 decoder: str = "vae", channels_last: bool = True):
        super().__init__()
        check_sd_networks(avatar.unet, avatar.controlnet)
        self.dtype, self.config = dtype, avatar.config
        self.state = StepState()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        with torch.no_grad():
            # Cast on the way to the device (no full-precision copy there); the time embeddings stay float32 for
            # the tables, computed in float32 before the final cast (which also casts the tables).
            self.unet = copy_module(avatar.unet, device, dtype, float32=_time_modules(avatar.unet))
            self.controlnet = copy_module(avatar.controlnet, device, dtype, float32=_time_modules(avatar.controlnet))
            for net in (self.unet, self.controlnet):
                _tabulate_time(net, timesteps.to(device), self.state)
                net.time_embedding = net.time_proj = None
            with _quiet_diffusers():  # its "modules to keep in float32" notice: there are none here
                self.unet.to(dtype=dtype, memory_format=fmt)
                self.controlnet.to(dtype=dtype, memory_format=fmt)
            self.decoder_name = decoder
            if decoder == "vae":
                vae = avatar.vae
                self.post_quant_conv = None if vae.post_quant_conv is None else copy_module(vae.post_quant_conv,
                                                                                             device, dtype)
                self.decoder = copy_module(vae.decoder, device, dtype)
                self.scale = float(avatar.config.vae.scaling_factor)
            elif decoder == "tiny":
                trained = getattr(avatar, "tiny_decoder", None)
                tiny = _tiny_decoder(avatar.config) if trained is None else copy_module(trained, device, dtype)
                self.post_quant_conv, self.decoder, self.scale = None, tiny, 1.0
            else:
                raise ConfigError(f"unknown decoder {decoder!r}; choose 'vae' or 'tiny'")
            if self.post_quant_conv is not None:
                self.post_quant_conv.to(device=device, dtype=dtype, memory_format=fmt)
            self.decoder.to(device=device, dtype=dtype, memory_format=fmt)
            self.requires_grad_(False).eval()
            prompt = avatar.prompt_embedding.to(device=device, dtype=dtype)
            self.register_buffer("prompt", prompt)
            self.expression = []  # (attn, processor) pairs whose K/V are set per frame
            for net in (self.unet, self.controlnet):
                for block in net.modules():
                    if not isinstance(block, BasicTransformerBlock):
                        continue
                    block.attn1.set_processor(SDPAttention(block.attn1, fuse_qkv=True))
                    text = SDPAttention(block.attn2)
                    text.cache(block.attn2, prompt)
                    block.attn2.set_processor(text)
                    expr = getattr(block, "_expression_attention", None)
                    if expr is not None:
                        proc = SDPAttention(expr)
                        expr.set_processor(proc)
                        self.expression.append((expr, proc))

    # -- per frame -------------------------------------------------------------------------------
    def prepare(self, condition: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """condition `[B, C, H, W]`, tokens `[B, T, D]` (both in `dtype`) -> the conditioning embedding
        `[B, C0, h, w]`; caches the expression keys/values for this frame's steps."""
        for attn, proc in self.expression:
            proc.cache(attn, tokens)
        return self.controlnet.controlnet_cond_embedding(condition)

    # -- per step ----------------------------------------------------------------------------------
    def predict(self, i: int, x: torch.Tensor, cond_embedding: torch.Tensor, tokens: torch.Tensor,
                side=None) -> torch.Tensor:
        """Step i's prediction (v) `[B, c, h, w]` in `dtype` for the latent `x` (in `dtype`): `Avatar.predict`.
        With a CUDA stream `side`, the ControlNet runs on it while the UNet's down blocks run on the current
        stream (the UNet needs the residuals only after them); the streams join before the residual adds."""
        self.state.i = i
        text, kwargs = self.prompt.expand(x.shape[0], -1, -1), {TOKENS_KWARG: tokens}
        if side is None:
            down, mid = controlnet_residuals(self.controlnet, x, cond_embedding, text)
            h, res = unet_down(self.unet, x, text, kwargs)
        else:
            main = torch.cuda.current_stream(x.device)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                down, mid = controlnet_residuals(self.controlnet, x, cond_embedding, text)
            h, res = unet_down(self.unet, x, text, kwargs)
            main.wait_stream(side)
        return unet_up(self.unet, x, h, res, text, kwargs, down, mid)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """latent `[B, c, h, w]` (any float dtype) -> image `[B, 3, H, W]` in `dtype`, nominally [-1, 1]."""
        z = (latent / self.scale).to(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)


def _time_modules(net) -> list[str]:
    """Paths of the modules that only compute time embeddings: `time_embedding` and every resnet's projection."""
    return ["time_embedding"] + [f"{name}.time_emb_proj" for name, m in net.named_modules()
                                 if isinstance(m, ResnetBlock2D) and m.time_emb_proj is not None]


@torch.no_grad()
def _tabulate_time(net, timesteps: torch.Tensor, state: StepState) -> None:
    """Replace every resnet's `time_emb_proj` by a `StepTable` of its outputs for the sampler's N timesteps."""
    weight = net.time_embedding.linear_1.weight
    emb = net.time_embedding(net.time_proj(timesteps).to(weight.dtype))  # [N, D]: the reference's emb per step
    for m in net.modules():
        if isinstance(m, ResnetBlock2D) and m.time_emb_proj is not None and not isinstance(m.time_emb_proj, StepTable):
            act = emb if m.skip_time_act else m.nonlinearity(emb)
            m.time_emb_proj = StepTable(m.time_emb_proj(act)[:, None, :].contiguous(), state)
            m.skip_time_act = True


@contextlib.contextmanager
def _quiet_diffusers():
    from diffusers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _tiny_decoder(config) -> nn.Module:
    """For an avatar without a trained tiny decoder: TAESD's shape (64 channels, 3 residual blocks a stage, 1 in
    the last) with one upsampling stage per halving of the avatar's VAE, so it renders the avatar's image size, with
    seeded random weights, for timing."""
    from ..recipe import TinyDecoderConfig
    from ..tiny_decoder import build_tiny_decoder

    halvings = config.vae.downsample.bit_length() - 1
    shape = TinyDecoderConfig(config.vae.latent_channels, 64, (3,) * halvings + (1,))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_tiny_decoder(shape)


def controlnet_residuals(cn, x, cond_embedding, text):
    """diffusers' ControlNetModel.forward (SD config, conditioning_scale 1) from a precomputed conditioning
    embedding; `temb` comes from the resnets' StepTables. Returns (down residuals list, mid residual)."""
    h = cn.conv_in(x) + cond_embedding
    res = [h]
    for block in cn.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, r = block(hidden_states=h, temb=None, encoder_hidden_states=text)
        else:
            h, r = block(hidden_states=h, temb=None)
        res.extend(r)
    if getattr(cn.mid_block, "has_cross_attention", False):
        h = cn.mid_block(h, None, encoder_hidden_states=text)
    else:
        h = cn.mid_block(h, None)
    down = [zero_conv(r) for zero_conv, r in zip(cn.controlnet_down_blocks, res)]
    return down, cn.controlnet_mid_block(h)


def unet_down(unet, x, text, kwargs):
    """diffusers' UNet2DConditionModel.forward (SD config), conv_in and down blocks -> (h, skip connections)."""
    h = unet.conv_in(x)
    res = [h]
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, r = block(hidden_states=h, temb=None, encoder_hidden_states=text, cross_attention_kwargs=kwargs)
        else:
            h, r = block(hidden_states=h, temb=None)
        res.extend(r)
    return h, res


def unet_up(unet, x, h, res, text, kwargs, down, mid):
    """The rest of the UNet's forward: ControlNet residual adds, mid block, up blocks, output conv -> v."""
    forward_upsample_size = any(s % 2**unet.num_upsamplers for s in x.shape[-2:])
    res = [r + d for r, d in zip(res, down)]
    h = unet.mid_block(h, None, encoder_hidden_states=text, cross_attention_kwargs=kwargs) + mid
    for i, block in enumerate(unet.up_blocks):
        n = len(block.resnets)
        skips, res = tuple(res[-n:]), res[:-n]
        size = res[-1].shape[2:] if forward_upsample_size and i < len(unet.up_blocks) - 1 else None
        if getattr(block, "has_cross_attention", False):
            h = block(hidden_states=h, temb=None, res_hidden_states_tuple=skips, encoder_hidden_states=text,
                      cross_attention_kwargs=kwargs, upsample_size=size)
        else:
            h = block(hidden_states=h, temb=None, res_hidden_states_tuple=skips, upsample_size=size)
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(h)))
