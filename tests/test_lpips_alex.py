"""LPIPS without the lpips package: AlexNet weights in the whole-lpips.LPIPS state-dict layout (random, written here
from the layer list of lpips/pretrained_networks.py: torchvision AlexNet feature indices 0, 3, 6, 8, 10)."""

import sys

import pytest
import torch

from engine.errors import CheckpointError
from engine.evaluation.scores import LPIPS


def alex_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {"scaling_layer.shift": torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1),
             "scaling_layer.scale": torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)}
    for (index, c_in, c_out, k), slice_ in zip([(0, 3, 64, 11), (3, 64, 192, 5), (6, 192, 384, 3), (8, 384, 256, 3),
                                               (10, 256, 256, 3)], range(1, 6)):
        state[f"net.slice{slice_}.{index}.weight"] = torch.randn(c_out, c_in, k, k, generator=g) * 0.05
        state[f"net.slice{slice_}.{index}.bias"] = torch.zeros(c_out)
    for i, c in enumerate((64, 192, 384, 256, 256)):
        state[f"lin{i}.model.1.weight"] = torch.rand(1, c, 1, 1, generator=g) * 0.1
    return state


def test_alexnet_lpips_runs_from_local_weights_alone(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lpips", None)  # the package is absent
    torch.save(alex_state(), tmp_path / "alex.pth")
    metric = LPIPS(tmp_path / "alex.pth")
    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 3, 64, 64, generator=g)
    near = (a + 0.02 * torch.randn(2, 3, 64, 64, generator=g)).clamp(0, 1)
    far = (a + 0.3 * torch.randn(2, 3, 64, 64, generator=g)).clamp(0, 1)
    assert metric(a, a) == pytest.approx([0.0, 0.0], abs=1e-7)
    d_near, d_far = metric(a, near), metric(a, far)
    assert metric(near, a) == pytest.approx(d_near, rel=1e-5)  # symmetric
    assert all(0 < n < f for n, f in zip(d_near, d_far))
    state = alex_state()
    del state["lin2.model.1.weight"]
    torch.save(state, tmp_path / "short.pth")
    with pytest.raises(CheckpointError, match="lin2.model.1.weight"):
        LPIPS(tmp_path / "short.pth")
