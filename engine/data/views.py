"""Views of a tracked sequence for a square avatar: the recorded cameras cropped to a square (the crop the engine uses
for the paper's comparison) and novel views with the release's intrinsics.

- `square_crop(camera, centre, size)`: the largest square of the recorded image (side min(W, H)) centred on the
  projected head centre (clamped to stay inside the image), resized to `size` x `size`; the same crop of an image
  by `crop_image`. The release's evaluation crop (`rendering_dataset.get_random_crop`) is the full-width square
  around the centre of the face's bounding box, moved to stay inside the image; here the projected head centre
  stands in for the bounding-box file.
- `novel_view(camera, size)`: the release's novel-view intrinsics, fx, fy scaled by 512 / 2200 (the ratio of the
  avatar's size to NeRSemble's full image width) and cx = cy = 256, here generalised to fx * size / W and
  cx = cy = size / 2 of a camera of width W at any resolution.
- `orbit_views(camera, centre, frames, yaw_deg, size)`: novel views on an arc about the vertical axis through the
  head centre, starting from `camera`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..geometry import Camera


def square_crop(camera: Camera, centre: torch.Tensor, size: int) -> tuple[Camera, tuple[int, int, int]]:
    """(the cropped, resized camera, (left, top, side) of the crop in `camera`'s pixels)."""
    side = min(camera.width, camera.height)
    u, v = camera.project(centre.reshape(1, 3).to(torch.float32))[0].tolist()
    left = int(np.clip(round(u - side / 2 + 0.5), 0, camera.width - side))
    top = int(np.clip(round(v - side / 2 + 0.5), 0, camera.height - side))
    cropped = Camera(R=camera.R, t=camera.t, fx=camera.fx, fy=camera.fy, cx=camera.cx - left, cy=camera.cy - top,
                     width=side, height=side)
    return cropped.scaled(size, size), (left, top, side)


def crop_image(image: torch.Tensor, box: tuple[int, int, int], size: int) -> torch.Tensor:
    """[C, H, W] image cut to the square `box` (left, top, side) and area-resized to `size` x `size`."""
    left, top, side = box
    part = image[:, top:top + side, left:left + side][None].float()
    return torch.nn.functional.interpolate(part, size=(size, size), mode="area")[0]


def novel_view(camera: Camera, size: int) -> Camera:
    """`camera`'s pose with the release's novel-view intrinsics at `size` x `size` (see the module docstring)."""
    f = size / camera.width
    return Camera(R=camera.R, t=camera.t, fx=camera.fx * f, fy=camera.fy * f, cx=size / 2, cy=size / 2, width=size,
                  height=size)


def orbit_views(camera: Camera, centre: torch.Tensor, frames: int, yaw_deg: float, size: int) -> list[Camera]:
    """`frames` novel views swinging from -yaw_deg to +yaw_deg about the vertical axis through `centre`."""
    views = []
    base = novel_view(camera, size)
    p = centre.double().reshape(3)
    for yaw in np.radians(np.linspace(-yaw_deg, yaw_deg, frames)) if frames > 1 else [0.0]:
        c, s = math.cos(yaw), math.sin(yaw)
        ry = torch.tensor([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]], dtype=torch.float64)
        R = base.R.double() @ ry.T
        eye = ry @ (base.center.double() - p) + p
        views.append(Camera(R.float(), (-R @ eye).float(), base.fx, base.fy, base.cx, base.cy, size, size))
    return views


def tracked_sequence_frames(root, sequence: str, size: int, camera: str | None = None,
                            orbit_deg: float | None = None) -> list:
    """The `Frame`s of a tracked sequence of a dataset folder (per-frame meshes and codes) seen from the recorded
    camera `camera` (default: the first held-out one), square-cropped, or with `orbit_deg` from novel views on an
    arc of +-orbit_deg about the head centre (the first frame's mesh centre) starting at that camera."""
    from ..errors import InputError
    from ..frame import Frame
    from .dataset import DatasetIndex

    index = DatasetIndex(root)
    if sequence not in index.frames:
        raise InputError(f"{index.root} has no sequence {sequence!r}; it has {sorted(index.frames)}")
    name = camera or next(iter(index.eval_cameras), next(iter(index.cameras)))
    if name not in index.cameras:
        raise InputError(f"{index.root} has no camera {name!r}; it has {sorted(index.cameras)}")
    cache: dict = {}
    meshes = [index.mesh(sequence, t, cache) for t in range(index.frames[sequence])]
    centre = meshes[0].vertices.mean(0)
    recorded = index.cameras[name]
    if orbit_deg is None:
        views = [square_crop(recorded, centre, size)[0]] * len(meshes)
    else:
        views = orbit_views(recorded, centre, len(meshes), orbit_deg, size)
    codes = torch.from_numpy(index.codes[sequence])
    return [Frame(view, code, mesh) for view, code, mesh in zip(views, codes, meshes)]
