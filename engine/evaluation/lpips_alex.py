"""LPIPS with the AlexNet backbone in plain torch, for machines without the `lpips` package (or torchvision): the
same state-dict names as a whole `lpips.LPIPS(net="alex")` module, so one local weights file serves both.

Keys: `scaling_layer.shift`, `scaling_layer.scale` [1, 3, 1, 1]; the backbone `net.slice1.0` (conv 3->64, 11x11,
stride 4, pad 2), `net.slice2.3` (max-pool 3/2, conv 64->192, 5x5, pad 2), `net.slice3.6` (max-pool, conv 192->384,
3x3), `net.slice4.8` (384->256), `net.slice5.10` (256->256), each followed by ReLU (torchvision's AlexNet feature
indices); the heads `lin0..lin4.model.1.weight` [1, C, 1, 1] (1x1 conv, no bias). Distance (Zhang et al. 2018):
inputs in [-1, 1] are shifted and scaled, each layer's features normalised to unit length over channels, squared
differences weighted by the head, averaged over space, summed over the five layers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CONVS = (("net.slice1.0", 4, 2, False), ("net.slice2.3", 1, 2, True), ("net.slice3.6", 1, 1, True),
         ("net.slice4.8", 1, 1, False), ("net.slice5.10", 1, 1, False))  # (key, stride, padding, pool first)


def required_keys() -> list[str]:
    keys = ["scaling_layer.shift", "scaling_layer.scale"]
    keys += [f"{k}.{p}" for k, *_ in CONVS for p in ("weight", "bias")]
    return keys + [f"lin{i}.model.1.weight" for i in range(len(CONVS))]


def lpips_alex(state: dict[str, torch.Tensor], pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B] LPIPS of images [B, 3, H, W] in [-1, 1] with the weights `state`."""
    def features(x):
        x = (x - state["scaling_layer.shift"]) / state["scaling_layer.scale"]
        out = []
        for key, stride, padding, pool in CONVS:
            if pool:
                x = F.max_pool2d(x, 3, 2)
            x = F.relu(F.conv2d(x, state[f"{key}.weight"], state[f"{key}.bias"], stride=stride, padding=padding))
            out.append(x)
        return out

    total = torch.zeros(pred.shape[0], device=pred.device)
    for i, (a, b) in enumerate(zip(features(pred), features(target))):
        a = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        b = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        total = total + F.conv2d((a - b) ** 2, state[f"lin{i}.model.1.weight"]).mean(dim=(1, 2, 3))
    return total
