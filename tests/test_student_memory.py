"""`estimate_memory` (engine.training.student_memory) and `avatar distill --estimate-memory`."""

import json

import pytest
import torch
from torch import nn

from engine.cli import main
from engine.model import Avatar
from engine.training.student_memory import _saved_bytes, estimate_memory


def test_saved_bytes_match_a_hand_count():
    """Linear(10, 20) -> ReLU -> Linear(20, 5) on a [3, 10] input saves, for backward, the input (30 floats), the
    ReLU's output (60, which the second Linear saves again: counted once) and the weights' transposes (views of
    parameters: not activations): 90 float32 = 360 bytes."""
    net = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    with _saved_bytes(net, False) as counts:
        net(torch.randn(3, 10))
    assert counts["total"] == 360


@pytest.fixture(scope="module")
def tiny():
    return Avatar.from_preset("tiny")


def test_the_estimate_counts_the_trained_parameters_and_scales_with_the_batch(tiny):
    trainable = sum(p.numel() for net in (tiny.controlnet, tiny.unet) for p in net.parameters())
    frozen = sum(p.numel() for p in tiny.parameters()) - trainable
    one, two = (estimate_memory(tiny, 1, b) for b in (1, 2))
    parts = one["bytes"]
    assert (parts["trainable_weights"], parts["gradients"], parts["adamw_moments"]) == (4 * trainable, 4 * trainable,
                                                                                          8 * trainable)
    assert parts["frozen_weights"] == 4 * frozen and "autocast_weight_copies" not in parts
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    # activations grow with the frames of a step; checkpointing and half precision keep fewer of them
    assert two["bytes"]["activations"] == pytest.approx(2 * parts["activations"], rel=0.1)
    plain = two["bytes"]["activations"]
    assert estimate_memory(tiny, 1, 2, gradient_checkpointing=True)["bytes"]["activations"] < plain
    half = estimate_memory(tiny, 1, 2, "bf16")["bytes"]
    assert half["activations"] < plain and half["autocast_weight_copies"] == 2 * (trainable + frozen)
    # two steps backpropagate through the UNet and ControlNet twice
    assert estimate_memory(tiny, 2, 1)["bytes"]["activations"] > parts["activations"]
    assert not tiny.is_meta and next(tiny.parameters()).device.type == "cpu"  # the teacher is left as it was


def test_the_command_prints_the_estimate_and_needs_out_otherwise(capsys):
    main(["distill", "--teacher", "tiny", "--steps", "1", "--batch-size", "1", "--estimate-memory"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["settings"]["batch_size"] == 1 and printed["bytes"]["total"] > printed["bytes"]["activations"] > 0
    assert main(["distill", "--teacher", "tiny", "--steps", "1"]) == 2
    assert "--out is required" in capsys.readouterr().err
