"""Light value types at the bottom of the frame's data flow: `Frame` (one frame's inputs), codes, views and pixels.

`as_codes` and `check_visible` are the checks of a frame's inputs that need no model; `to_output` gives the
pixels in the output type the caller asked for. File formats (sequences, the live protocol) and fast paths build
on these without importing the model stack.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .errors import ConfigError, InputError
from .geometry import Camera, Mesh

OUTPUT_TYPES = ("np", "pil", "pt")


@dataclass
class Frame:
    """One frame's inputs: a camera, an expression code [E] and optionally a posed mesh."""

    camera: Camera
    expression: torch.Tensor
    mesh: Mesh | None = None


def to_pixels(image: torch.Tensor) -> torch.Tensor:
    """Decoder output [B, 3, H, W] in [-1, 1] -> [B, H, W, 3] uint8 (the release's (x / 2 + 0.5).clamp(0, 1)).

    Contiguous: for a channels-last image the permute already is, for a contiguous one this copies."""
    pixels = ((image.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    return pixels.contiguous()


def check_output_type(output_type: str) -> str:
    if output_type not in OUTPUT_TYPES:
        raise ConfigError(f"unknown output_type {output_type!r}; choose one of {list(OUTPUT_TYPES)} ('np': uint8 "
                          "[H, W, C] array, 'pil': PIL.Image, 'pt': float32 [C, H, W] tensor in [0, 1])")
    return output_type


def to_output(pixels: np.ndarray, output_type: str = "np"):
    """Frames [B, H, W, C] uint8 (C = 3, or 4 with alpha) in host memory -> `output_type`:
    "np": the array itself; "pil": a list of B `PIL.Image`s (RGB or RGBA); "pt": a float32 CPU tensor
    [B, C, H, W] in [0, 1], the uint8 values / 255 (diffusers' `output_type="pt"` layout and range)."""
    check_output_type(output_type)
    if output_type == "np":
        return pixels
    if output_type == "pil":
        from PIL import Image

        return [Image.fromarray(np.ascontiguousarray(p)) for p in pixels]
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float().div_(255)


def as_codes(expressions, dim: int | None = None, names: Sequence[str] | None = None) -> torch.Tensor:
    """Expression code(s) -> a finite float32 CPU tensor [B, E] (one code [E] becomes [1, E]).

    A code is E numbers (a list, numpy array or tensor) or, where the avatar names its code dimensions (`names`),
    a {name: value} mapping (dimensions left out are 0, as in the live protocol); B codes are [B, E] or a list of
    codes. `dim` (E), when given, is checked. Anything else is an InputError saying what to pass."""
    what = f"{dim} numbers" if dim is not None else "E numbers"
    if expressions is None:
        raise InputError(f"the expression code is None; pass {what} (a list, numpy array or tensor; all zeros is the "
                         f"neutral code){' or a {name: value} dict' if names else ''}")
    if isinstance(expressions, Mapping) or (isinstance(expressions, (list, tuple)) and expressions
                                            and all(isinstance(e, Mapping) for e in expressions)):
        one = isinstance(expressions, Mapping)
        expressions = [_named(e, names) for e in ([expressions] if one else expressions)]
    codes = _numbers(expressions, what)
    if codes.ndim == 1:
        codes = codes[None]
    if codes.ndim != 2:
        raise InputError(f"expression codes must be [E] or [B, E] ({what} per code), got shape {tuple(codes.shape)}")
    if codes.shape[0] == 0:
        raise InputError("got no expression codes (shape (0, E)); pass at least one code")
    if dim is not None and codes.shape[1] != dim:
        listed = f" ({', '.join(names)})" if names else ""
        raise InputError(f"expression code has {codes.shape[1]} values, the avatar expects {dim}{listed}; pass "
                         f"[{dim}] or [B, {dim}]")
    bad = ~torch.isfinite(codes)
    if bool(bad.any()):
        b, e = (int(i) for i in bad.nonzero()[0])
        raise InputError(f"the expression code holds NaN or Inf (code {b}, dimension {e}; values beyond float32's "
                         "range overflow to Inf); replace missing values (e.g. with 0) first")
    return codes


def _numbers(value, what: str) -> torch.Tensor:
    """`value` as a float32 CPU tensor, from a tensor or anything numpy reads as an array of real numbers."""
    if isinstance(value, (str, bytes)):
        raise InputError(f"the expression code is a string ({value[:20]!r}); pass {what}")
    try:
        if torch.is_tensor(value):
            kind = "complex" if value.is_complex() else "bool" if value.dtype == torch.bool else None
            array = value
        else:
            array = np.asarray(value)
            kind = None if array.dtype.kind in "iuf" else {"b": "bool", "c": "complex"}.get(array.dtype.kind, "other")
    except (TypeError, ValueError, OverflowError, RuntimeError) as e:
        raise InputError(f"the expression code must be {what} (a list, numpy array or tensor), got "
                         f"{type(value).__name__} ({e})") from None
    if kind is not None:
        got = f"{kind} values" if kind != "other" else f"a {type(value).__name__} that reads as {array.dtype}"
        raise InputError(f"the expression code must be {what} (real numbers), got {got}")
    try:
        return (array.detach().to("cpu", torch.float32) if torch.is_tensor(array)
                else torch.from_numpy(array.astype(np.float32)))
    except (NotImplementedError, RuntimeError) as e:  # e.g. a tensor on the meta device holds no values
        raise InputError(f"the expression code tensor cannot be read ({e}); pass a CPU or CUDA tensor") from None


def _named(code: Mapping, names: Sequence[str] | None) -> list[float]:
    """A {name: value} code -> E numbers in the avatar's order (dimensions left out are 0)."""
    if not names:
        raise InputError("this avatar's code dimensions have no names (config.expression_names is None); pass the "
                         "code as a list of numbers")
    unknown = sorted(str(k) for k in code if k not in names)
    if unknown:
        raise InputError(f"unknown expression name(s) {unknown[:8]}; this avatar's are {list(names)}")
    values = {}
    for name, v in code.items():
        number = v.item() if isinstance(v, (np.ndarray, torch.Tensor)) and v.ndim == 0 else v
        ok = not isinstance(number, bool) and isinstance(number, (int, float, np.integer, np.floating))
        try:
            values[name] = float(number) if ok else None
        except OverflowError:
            values[name] = float("inf")  # reported with the other non-finite values
        if values[name] is None:
            raise InputError(f"code[{name!r}] = {v!r} is not a number; pass {{name: number}}")
    return [values.get(name, 0.0) for name in names]


def check_visible(camera: Camera, mesh: Mesh, znear: float, zfar: float, which: str = "the camera") -> None:
    """InputError when `camera` can see nothing of `mesh`: every vertex lies beyond the far plane, before the near
    plane (or behind the camera), or outside one side of the field of view (the frame would show no head).

    Exact in what it rejects: the points of a triangle whose vertices all lie outside one plane of the view frustum
    all lie outside it too, so a mesh with anything in view always passes (one that is outside only through a
    combination of planes is not caught). One [V, 4] projection of the vertices in float64, on the mesh's device."""
    x, y, z, w = camera.world_to_clip(mesh.vertices.double(), znear, zfar).unbind(-1)
    far, near, left, right, above, below = torch.stack([
        (z > w).all(), (z < -w).all(), (x < -w).all(), (x > w).all(), (y < -w).all(), (y > w).all()]).tolist()
    aim = "point the camera at the head (e.g. Camera.look_at(eye, target=(0, 0, 0)) or engine.orbit.orbit_camera)"
    if far:
        raise InputError(f"{which} sees nothing of the head: all of it lies beyond the far plane (its nearest point is "
                         f"{float(w.min()):.2f} m in front of the camera, the avatar's depth range ends at zfar = "
                         f"{zfar:g} m); move the camera closer than {zfar:g} m to the head")
    if near:
        raise InputError(f"{which} sees nothing of the head: all of it lies behind the camera or nearer than the near "
                         f"plane (znear = {znear:g} m); {aim}")
    side = next((s for s, out in (("left of", left), ("right of", right), ("above", above), ("below", below)) if out),
                None)
    if side is not None:
        raise InputError(f"{which} sees nothing of the head: all of it lies {side} the image; {aim}")
