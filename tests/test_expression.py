import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.utils import logging as diffusers_logging

from engine.config import from_preset
from engine.errors import ConfigError, InputError
from engine.expression import (
    ExpressionTransformerBlock,
    add_expression_attention,
    expression_attention_paths,
    init_expression_from_text,
)

TINY = from_preset("tiny")
# The tiny UNet's transformer blocks: 1 per down cross-attention block, 2 per up cross-attention block.
TINY_PATHS = [
    "down_blocks.0.attentions.0.transformer_blocks.0",
    "down_blocks.1.attentions.0.transformer_blocks.0",
    "up_blocks.1.attentions.0.transformer_blocks.0",
    "up_blocks.1.attentions.1.transformer_blocks.0",
    "up_blocks.2.attentions.0.transformer_blocks.0",
    "up_blocks.2.attentions.1.transformer_blocks.0",
]


def _plain_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(**TINY.unet.diffusers_kwargs(TINY.latent_size)).eval()


def _inputs(batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(batch, 4, 16, 16, generator=g)
    text = torch.randn(batch, 8, TINY.token_dim, generator=g)
    tokens = torch.randn(batch, 4, TINY.token_dim, generator=g)
    return latent, torch.tensor(500), text, tokens


def _converted(plain, randomize_out=False, seed=2):
    unet = copy.deepcopy(plain)
    add_expression_attention(unet)
    init_expression_from_text(unet)
    if randomize_out:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for path in expression_attention_paths(unet):
                layer = unet.get_submodule(path)._expression_attention
                for p in layer.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return unet


def test_paths_and_parameter_names():
    unet = _plain_unet()
    paths = add_expression_attention(unet)
    assert paths == TINY_PATHS == expression_attention_paths(unet)
    sd = unet.state_dict()
    for path in paths:
        width = unet.get_submodule(path).dim
        prefix = f"{path}._expression_attention."
        assert sd[prefix + "to_q.weight"].shape == (width, width)
        assert sd[prefix + "to_k.weight"].shape == (width, TINY.token_dim)
        assert sd[prefix + "to_v.weight"].shape == (width, TINY.token_dim)
        assert sd[prefix + "to_out.0.weight"].shape == (width, width)
        assert sd[prefix + "to_out.0.bias"].shape == (width,)
        assert prefix + "to_q.bias" not in sd  # like attn2: no q/k/v bias
    expr_keys = {k for k in sd if "_expression_attention" in k}
    assert len(expr_keys) == 5 * len(TINY_PATHS)
    # every transformer block is converted, the mid block's without a layer
    mid = [m for n, m in unet.named_modules()
           if n.startswith("mid_block.") and isinstance(m, ExpressionTransformerBlock)]
    assert mid and all(m._expression_attention is None for m in mid)
    with pytest.raises(ConfigError, match="already has expression attention"):
        add_expression_attention(unet)


def test_sd21_has_15_layers_6_down_9_up():
    c = from_preset("sd21")
    with torch.device("meta"):
        unet = UNet2DConditionModel(**c.unet.diffusers_kwargs(c.latent_size))
        paths = add_expression_attention(unet)
    assert len(paths) == 15
    assert sum(p.startswith("down_blocks.") for p in paths) == 6
    assert sum(p.startswith("up_blocks.") for p in paths) == 9
    layer = unet.get_submodule(paths[0])._expression_attention
    assert layer.upcast_attention and layer.heads == 5


def test_training_init_equals_plain_unet():
    plain = _plain_unet()
    unet = _converted(plain)
    latent, t, text, tokens = _inputs()
    with torch.no_grad():
        want = plain(latent, t, encoder_hidden_states=text).sample
        got = unet(latent, t, encoder_hidden_states=text, cross_attention_kwargs={"expression_tokens": tokens}).sample
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    block = unet.get_submodule(TINY_PATHS[0])
    torch.testing.assert_close(block._expression_attention.to_k.weight, block.attn2.to_k.weight, rtol=0, atol=0)
    assert not block._expression_attention.to_out[0].weight.any()


def test_different_tokens_change_the_output():
    unet = _converted(_plain_unet(), randomize_out=True)
    latent, t, text, tokens = _inputs()
    with torch.no_grad():
        a = unet(latent, t, encoder_hidden_states=text, cross_attention_kwargs={"expression_tokens": tokens}).sample
        b = unet(latent, t, encoder_hidden_states=text, cross_attention_kwargs={"expression_tokens": -tokens}).sample
    assert (a - b).abs().mean() > 1e-3


def _layer_norm(x, norm):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _attention(attn, x, context):
    """softmax(Q K^T / sqrt(d)) V per head, in float32, then the output projection."""
    q = x @ attn.to_q.weight.T
    k = context @ attn.to_k.weight.T
    v = context @ attn.to_v.weight.T
    b, n, inner = q.shape
    h = attn.heads
    d = inner // h
    q, k, v = (y.reshape(b, -1, h, d).transpose(1, 2).float() for y in (q, k, v))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, inner)
    return out @ attn.to_out[0].weight.T + attn.to_out[0].bias


def _feed_forward(ff, x):
    proj = ff.net[0].proj
    hidden, gate = (x @ proj.weight.T + proj.bias).chunk(2, dim=-1)
    return (hidden * F.gelu(gate)) @ ff.net[2].weight.T + ff.net[2].bias


def test_block_equals_hand_written_release_order():
    unet = _converted(_plain_unet(), randomize_out=True)
    block = unet.get_submodule(TINY_PATHS[2])
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 64, block.dim, generator=g)
    text = torch.randn(2, 8, TINY.token_dim, generator=g)
    tokens = torch.randn(2, 4, TINY.token_dim, generator=g)
    with torch.no_grad():
        got = block(h, encoder_hidden_states=text, cross_attention_kwargs={"expression_tokens": tokens})
        x = h + _attention(block.attn1, _layer_norm(h, block.norm1), _layer_norm(h, block.norm1))
        x = x + _attention(block.attn2, _layer_norm(x, block.norm2), text)
        before_expression = x
        x = x + _attention(block._expression_attention, x, tokens)  # query: the un-normalised hidden state
        want = x + _feed_forward(block.ff, _layer_norm(x, block.norm3))
        # a release-order mistake (normalised query) would be caught: it gives a clearly different block
        normed = _layer_norm(before_expression, block.norm3)
        wrong = before_expression + _attention(block._expression_attention, normed, tokens)
        wrong = wrong + _feed_forward(block.ff, _layer_norm(wrong, block.norm3))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (wrong - want).abs().max() > 1e-2


def test_forward_chunking_is_kept():
    unet = _converted(_plain_unet(), randomize_out=True)
    latent, t, text, tokens = _inputs()
    kwargs = dict(encoder_hidden_states=text, cross_attention_kwargs={"expression_tokens": tokens})
    calls = []
    unet.get_submodule(TINY_PATHS[0]).ff.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    with torch.no_grad():
        want = unet(latent, t, **kwargs).sample
        assert calls == [(2, 16 * 16, 32)]
        for block in unet.modules():
            if isinstance(block, ExpressionTransformerBlock):
                block.set_chunk_feed_forward(16, dim=1)  # diffusers' own switch: 16 tokens per chunk
        calls.clear()
        got = unet(latent, t, **kwargs).sample
    assert calls == [(2, 16, 32)] * 16
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _Recording(AttnProcessor2_0):
    def __init__(self):
        super().__init__()
        self.contexts = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kw):
        self.contexts.append(encoder_hidden_states)
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kw)


def test_processors_are_the_extension_point_and_never_see_the_tokens_kwarg():
    unet = _converted(_plain_unet())
    latent, t, text, tokens = _inputs()
    recorder = _Recording()
    for path in TINY_PATHS:
        unet.get_submodule(path)._expression_attention.set_processor(recorder)
    assert set(unet.attn_processors) >= {f"{p}._expression_attention.processor" for p in TINY_PATHS}
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = diffusers_logging.get_logger("diffusers.models.attention_processor")
    logger.addHandler(handler)
    try:
        with torch.no_grad():
            unet(latent, t, encoder_hidden_states=text, cross_attention_kwargs={"expression_tokens": tokens})
    finally:
        logger.removeHandler(handler)
    assert len(recorder.contexts) == len(TINY_PATHS)
    assert all(c is tokens for c in recorder.contexts)
    assert not [r for r in records if "expression_tokens" in r.getMessage()]


def test_missing_tokens_is_an_input_error():
    unet = _converted(_plain_unet())
    latent, t, text, _ = _inputs()
    with pytest.raises(InputError, match="expression_tokens"):
        unet(latent, t, encoder_hidden_states=text)


def test_refuses_non_sd_blocks():
    kwargs = TINY.unet.diffusers_kwargs(TINY.latent_size)
    unet = UNet2DConditionModel(**kwargs, only_cross_attention=True)
    with pytest.raises(ConfigError, match="only_cross_attention"):
        add_expression_attention(unet)
