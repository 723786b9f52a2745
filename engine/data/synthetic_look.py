"""The synthetic head's appearance: a procedural albedo in canonical space and fixed world-space lighting.

`albedo(canonical)` colours each surface point from its 5-D canonical coordinates alone (rest position in metres =
xyz / 4, part from ambient 0, upper/lower from ambient 1): skin with low-frequency tone variation and redder cheeks,
lips with a darker line between them, nostrils, brows, a hair cap, eyelids with lash lines, eyeballs (sclera, iris,
pupil), teeth, a dark mouth cavity. Nothing comes from files and nothing is random, so a point keeps its colour
under any expression and camera. The one exception is opt-in: a `DetailField`, fine skin and hair texture drawn
afresh for each frame (the same in every view of it), which the mesh does not determine, so a diffusion model must
learn its distribution (the few-step students' test data). `shade` multiplies the albedo by Lambert terms of a key
light, a fill light and an ambient term fixed in the world (so all views agree) plus a small specular for the eyes,
lips and teeth. `render_mesh` rasterises, shades, anti-aliases by supersampling, composites over white and, if
asked, blurs by a camera's point-spread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..geometry import Camera, Mesh
from ..metrics import gaussian_window
from ..raster import rasterize
from .synthetic_mesh import (
    CANONICAL_SCALE,
    CAVITY,
    EYE_CENTRES,
    EYE_RADIUS,
    EYEBALL,
    LID,
    PART_CODES,
    PART_NAMES,
    SKIN,
    TEETH,
    Y_MOUTH,
    lid_edges,
)

SKIN_RGB = (0.87, 0.67, 0.55)
CHEEK_RGB = (0.90, 0.58, 0.52)
LIP_RGB = (0.70, 0.30, 0.30)
BROW_RGB = (0.20, 0.13, 0.09)
HAIR_RGB = (0.17, 0.11, 0.08)
LASH_RGB = (0.07, 0.05, 0.05)
SCLERA_RGB = (0.94, 0.92, 0.89)
IRIS_RGB = (0.36, 0.23, 0.13)
PUPIL_RGB = (0.03, 0.03, 0.03)
TEETH_RGB = (0.93, 0.90, 0.82)
CAVITY_RGB = (0.22, 0.05, 0.06)
TONGUE_RGB = (0.48, 0.16, 0.16)
IRIS_ANGLE, PUPIL_ANGLE = math.asin(0.0058 / EYE_RADIUS), math.asin(0.0024 / EYE_RADIUS)

# World-space lights: (direction toward the light, intensity).
KEY_LIGHT = ((0.40, 0.50, 0.77), 0.60)
FILL_LIGHT = ((-0.50, -0.15, 0.85), 0.32)
AMBIENT = 0.30


def _rgb(c, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(c, dtype=like.dtype, device=like.device)


def _smoothstep(e0: float, e1: float, x: torch.Tensor) -> torch.Tensor:
    t = ((x - e0) / (e1 - e0)).clamp(0, 1)
    return t * t * (3 - 2 * t)


def _mix(base: torch.Tensor, colour, w: torch.Tensor) -> torch.Tensor:
    return base + (_rgb(colour, base) - base) * w[:, None]


def _skin(p: torch.Tensor) -> torch.Tensor:
    """[N, 3] skin albedo at rest positions p [N, 3] (metres)."""
    x, y, z = p.unbind(1)
    ax = x.abs()
    tone = 1 + 0.035 * (torch.sin(31 * x + 1.3) * torch.sin(27 * y + 0.4) + torch.sin(23 * z + 19 * x + 2.1))
    c = _rgb(SKIN_RGB, p) * tone[:, None]
    cheek = torch.exp(-(((ax - 0.045) / 0.018) ** 2 + ((y + 0.012) / 0.016) ** 2)) * _smoothstep(0.02, 0.05, z)
    c = _mix(c, CHEEK_RGB, 0.3 * cheek)
    # Lips: vermilion above and below the mouth line, a darker line where they meet.
    front = _smoothstep(0.055, 0.07, z)
    upper_h = 0.0062 * (1 - (x / 0.025) ** 2).clamp(min=0).sqrt() * (1 - 0.25 * torch.exp(-((x / 0.004) ** 2)))
    lower_h = 0.0085 * (1 - (x / 0.023) ** 2).clamp(min=0).sqrt()
    dy = y - Y_MOUTH
    lip = torch.where(dy >= 0, _smoothstep(0.0012, -0.0004, dy - upper_h) * _smoothstep(0.0, 0.0015, upper_h),
                      _smoothstep(0.0012, -0.0004, -dy - lower_h) * _smoothstep(0.0, 0.0015, lower_h))
    c = _mix(c, LIP_RGB, lip * front)
    line = torch.exp(-((dy / 0.0009) ** 2)) * (1 - (x / 0.024) ** 2).clamp(min=0)
    c = c * (1 - 0.55 * line * front)[:, None]
    for s in (1.0, -1.0):  # nostrils
        d2 = ((x - s * 0.0075) / 0.0035) ** 2 + ((y + 0.0195) / 0.0022) ** 2 + ((z - 0.091) / 0.006) ** 2
        c = c * (1 - 0.6 * torch.exp(-d2))[:, None]
    # Brows: an arch above each eye, thick at the inner end.
    u = (ax - 0.012) / 0.044
    centre = 0.041 + 0.007 * torch.sin(math.pi * u.clamp(0, 1) ** 0.8)
    half = 0.0035 - 0.0015 * u.clamp(0, 1)
    brow = _smoothstep(0.0008, -0.0008, (y - centre).abs() - half) * _smoothstep(-0.03, 0.02, u)
    brow = brow * _smoothstep(1.05, 0.95, u) * _smoothstep(0.04, 0.06, z)
    c = _mix(c, BROW_RGB, 0.9 * brow)
    # Hair: above a hairline that is high on the forehead, lower at the temples and the back, off the ears.
    back = _smoothstep(0.02, -0.04, z)
    line_y = 0.074 - 0.03 * _smoothstep(0.045, 0.07, ax) - 0.115 * back
    ear = torch.exp(-(((ax - 0.074) / 0.016) ** 2 + ((y - 0.005) / 0.032) ** 2 + ((z + 0.018) / 0.024) ** 2))
    hair = _smoothstep(-0.003, 0.003, y - line_y) * (1 - _smoothstep(0.3, 0.6, ear))
    strands = 1 + 0.08 * torch.sin(420 * x + 60 * torch.sin(40 * z))
    return _mix(c, HAIR_RGB, hair) * torch.lerp(torch.ones_like(hair), strands, hair)[:, None]


# A `DetailField`'s defaults: plane waves, their wave numbers (rad per metre of rest position: 400..700 is a
# 9-16 mm wavelength, 4-8 pixels in a 128-pixel view of the head, one to two latent cells of the demo's VAE), and
# the albedo's modulation depth.
DETAIL_WAVES, DETAIL_BAND, DETAIL_AMPLITUDE = 32, (400.0, 700.0), 0.25


@dataclass(frozen=True)
class DetailField:
    """Fine texture on the skin, hair and eyelids that the mesh does not determine: a Gaussian random field in
    canonical space drawn per frame, multiplying the albedo by 1 + amplitude * field (clamped to [0.2, 1.8]).

    The field is sqrt(2 / K) sum_k cos(w_k . p + phi_k) over K plane waves with directions uniform on the sphere,
    wave numbers uniform in a band and phases uniform in [0, 2 pi): zero mean and unit variance at every point
    over draws, so its expectation leaves the plain albedo (the blurry mean a one-step model draws).
    waves: [K, 4] float64 (wave vector, phase).
    """

    waves: torch.Tensor
    amplitude: float = DETAIL_AMPLITUDE

    @classmethod
    def draw(cls, seed: int, count: int = DETAIL_WAVES, band: tuple[float, float] = DETAIL_BAND,
             amplitude: float = DETAIL_AMPLITUDE) -> "DetailField":
        """The field of one frame, from its seed."""
        g = torch.Generator().manual_seed(int(seed))
        direction = torch.nn.functional.normalize(torch.randn(count, 3, generator=g, dtype=torch.float64), dim=1)
        wave_number = band[0] + (band[1] - band[0]) * torch.rand(count, 1, generator=g, dtype=torch.float64)
        phase = 2 * math.pi * torch.rand(count, 1, generator=g, dtype=torch.float64)
        return cls(torch.cat([direction * wave_number, phase], 1), amplitude)

    def field(self, p: torch.Tensor) -> torch.Tensor:
        """[N] float64 field values at rest positions p [N, 3] (metres)."""
        w = self.waves.to(p.device)
        return torch.cos(p.double() @ w[:, :3].T + w[:, 3]).sum(1) * math.sqrt(2 / len(w))

    def modulate(self, colour: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        """colour [N, 3] x (1 + amplitude x field(p)), clamped to [0.2, 1.8]."""
        gain = (1 + self.amplitude * self.field(p)).clamp(0.2, 1.8).to(colour.dtype)
        return colour * gain[:, None]


def _eye_local(p: torch.Tensor) -> torch.Tensor:
    """Rest positions relative to their eye's centre (the eye on the same side of x = 0)."""
    centres = torch.tensor(EYE_CENTRES, dtype=p.dtype, device=p.device)
    return p - torch.where(p[:, :1] >= 0, centres[0], centres[1])


def _lid(p: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    """Eyelids: skin, with a dark lash line along the upper lid's edge and a fainter one on the lower."""
    d = _eye_local(p)
    a = torch.atan2(d[:, 0], d[:, 2])
    e = torch.asin((d[:, 1] / d.norm(dim=1)).clamp(-1, 1))
    up, lo = lid_edges(a, torch.where(p[:, 0] >= 0, 1.0, -1.0).to(p))
    dist = torch.where(side > 0, e - up, lo - e)
    width = torch.where(side > 0, 0.16, 0.07)
    lash = _smoothstep(0.02, -0.02, dist - width)
    return _mix(_rgb(SKIN_RGB, p).expand(len(p), 3) * 0.96, LASH_RGB, lash)


def _eyeball(p: torch.Tensor) -> torch.Tensor:
    d = _eye_local(p)
    angle = torch.acos((d[:, 2] / d.norm(dim=1)).clamp(-1, 1))  # from the gaze axis (+z)
    c = _rgb(SCLERA_RGB, p).expand(len(p), 3)
    c = c * (1 - 0.12 * _smoothstep(0.6, 1.3, angle))[:, None]
    ring = 0.55 + 0.45 * _smoothstep(IRIS_ANGLE, IRIS_ANGLE - 0.12, angle)  # darker limbal ring
    streak = 1 + 0.15 * torch.sin(23 * torch.atan2(d[:, 1], d[:, 0]))
    iris = _rgb(IRIS_RGB, p) * (ring * streak)[:, None]
    c = c + (iris - c) * _smoothstep(IRIS_ANGLE + 0.02, IRIS_ANGLE - 0.02, angle)[:, None]
    return _mix(c, PUPIL_RGB, _smoothstep(PUPIL_ANGLE + 0.02, PUPIL_ANGLE - 0.02, angle))


def _teeth(p: torch.Tensor) -> torch.Tensor:
    ax = p[:, 0].abs()
    gap = sum(torch.exp(-(((ax - b) / 0.0004) ** 2)) for b in (0.0, 0.0085, 0.0155))
    return _rgb(TEETH_RGB, p) * (1 - 0.35 * gap.clamp(max=1) - 0.25 * _smoothstep(0.012, 0.019, ax))[:, None]


def _cavity(p: torch.Tensor, side: torch.Tensor) -> torch.Tensor:
    tongue = _smoothstep(0.0, -0.04, side) * _smoothstep(0.09, 0.06, p[:, 2])
    return _mix(_rgb(CAVITY_RGB, p).expand(len(p), 3), TONGUE_RGB, 0.6 * tongue)


def part_of(canonical: torch.Tensor) -> torch.Tensor:
    """[N] int64 part index (SKIN, LID, EYEBALL, TEETH, CAVITY) decoded from ambient coordinate 0 of [N, 5]."""
    codes = torch.tensor([PART_CODES[n] for n in PART_NAMES], dtype=canonical.dtype, device=canonical.device)
    return (canonical[:, 3:4] - codes).abs().argmin(1)


def albedo(canonical: torch.Tensor, detail: DetailField | None = None) -> torch.Tensor:
    """[N, 3] float32 albedo in [0, 1] of surface points with canonical coordinates [N, 5]; `detail` (optional)
    modulates the skin (hair included) and the eyelids."""
    p = canonical[:, :3] / CANONICAL_SCALE
    side = canonical[:, 4]
    part = part_of(canonical)
    out = torch.empty(len(p), 3, dtype=canonical.dtype, device=canonical.device)
    for k, fn in ((SKIN, lambda i: _skin(p[i])), (LID, lambda i: _lid(p[i], side[i])),
                  (EYEBALL, lambda i: _eyeball(p[i])), (TEETH, lambda i: _teeth(p[i])),
                  (CAVITY, lambda i: _cavity(p[i], side[i]))):
        idx = (part == k).nonzero().squeeze(1)
        if idx.numel():
            out[idx] = fn(idx) if detail is None or k not in (SKIN, LID) else detail.modulate(fn(idx), p[idx])
    return out.clamp(0, 1)


def shade(colour: torch.Tensor, normals: torch.Tensor, part: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """Lit colour [N, 3]: albedo [N, 3] x (ambient + key + fill Lambert) + specular on eyes, lips and teeth.

    normals [N, 3] world unit normals; part [N] int64; view [3] unit vector toward the camera."""
    light = torch.full_like(colour[:, 0], AMBIENT) * (0.75 + 0.25 * normals[:, 1])  # sky above, bounce below
    spec = torch.zeros_like(light)
    gloss = torch.where(part == EYEBALL, 0.6, torch.where(part == TEETH, 0.15, 0.04))
    for direction, power in (KEY_LIGHT, FILL_LIGHT):
        to_light = F.normalize(torch.tensor(direction, dtype=colour.dtype, device=colour.device), dim=0)
        light = light + power * (normals @ to_light).clamp(min=0)
        h = F.normalize(to_light + view, dim=0)
        spec = spec + power * (normals @ h).clamp(min=0) ** 40
    return (colour * light[:, None] + (gloss * spec)[:, None]).clamp(0, 1)


def render_mesh(mesh: Mesh, camera: Camera, supersample: int = 2, detail: DetailField | None = None,
                psf: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Shade `mesh` (canonical 5-D, as built by the synthetic head) seen by `camera`, with a frame's `detail`.

    Rasterises at `supersample` x the camera's size and average-pools. Returns rgb [H, W, 3] float32 in [0, 1]
    composited over white and alpha [H, W] float32 in [0, 1], CPU tensors. `psf` > 0 blurs rgb by a camera's
    Gaussian point-spread of that standard deviation in pixels (alpha, the head's coverage, stays as rasterised).
    """
    k = supersample
    W, H = camera.width, camera.height
    buf = rasterize(mesh, camera.scaled(W * k, H * k) if k > 1 else camera)
    covered = buf.mask[0, ..., 0] > 0.5
    canon, normals = buf.canonical[0][covered], buf.normals[0][covered]
    view = F.normalize(camera.center.to(canon), dim=0)
    colour = shade(albedo(canon, detail), normals, part_of(canon), view)
    img = torch.zeros(H * k, W * k, 3, dtype=torch.float32, device=canon.device)
    img[covered] = colour.float()
    alpha = covered.float()
    if k > 1:
        img = F.avg_pool2d(img.permute(2, 0, 1)[None], k)[0].permute(1, 2, 0)
        alpha = F.avg_pool2d(alpha[None, None], k)[0, 0]
    rgb = (img + (1 - alpha)[..., None]).clamp(0, 1)
    if psf > 0:
        rgb = gaussian_blur(rgb.permute(2, 0, 1)[None], psf)[0].permute(1, 2, 0)
    return rgb.cpu(), alpha.cpu()


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """`images` [B, C, H, W] blurred by a Gaussian of standard deviation `sigma` pixels (separable, truncated at
    3 sigma, edges replicated: the white background continues past the frame)."""
    radius = max(1, math.ceil(3 * sigma))
    kernel = gaussian_window(2 * radius + 1, sigma, images.device).to(images.dtype).repeat(images.shape[1], 1, 1, 1)
    padded = F.pad(images, (radius, radius, radius, radius), mode="replicate")
    rows = F.conv2d(padded, kernel.view(-1, 1, 1, 2 * radius + 1), groups=images.shape[1])
    return F.conv2d(rows, kernel.view(-1, 1, 2 * radius + 1, 1), groups=images.shape[1])
