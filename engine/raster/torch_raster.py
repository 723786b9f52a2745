"""The reference rasteriser: pure PyTorch, any device, exact z-buffer.

Algorithm (two passes, vectorised over triangles):
1. Project the vertices to clip space (`Camera.world_to_clip`, float64) and to pixel coordinates (column u,
   row v; pixel centres at integers). Drop triangles with a vertex at or behind the camera plane (Z <= 1e-6:
   this rasteriser does not clip them, unlike nvdiffrast, so a triangle crossing the camera plane vanishes;
   meshes kept in front of the camera, as heads at ~1 m are, never have one), triangles wholly nearer than znear
   or farther than zfar, zero-area and off-screen ones.
2. Expand each kept triangle into (triangle, row) spans, each span the pixel range of its scanline (plus a pixel
   of margin), and the spans into candidate pixels, in chunks of at most `max_candidates` (so a triangle covering
   the whole image is fine). Each candidate is tested at its pixel centre against the three edge functions
   (inclusive: a centre on an edge is inside). Edge functions are evaluated from the edge's endpoints in a fixed
   order (sorted by position), so two triangles sharing an edge get bit-identical values of opposite sign: the
   mesh is watertight. No back-face culling.
3. Depth test: the perspective-correct camera depth Z of the fragment (fragments with Z outside [znear, zfar]
   are discarded) is packed with the face index into one int64 (float32 bits of Z high, face index low), and
   `scatter_reduce(amin)` keeps the nearest fragment per pixel; equal depths go to the lower face index.
4. The winning face of each covered pixel is evaluated once more: screen-space barycentrics divided by each
   vertex's w (= Z), renormalised, interpolate clip z, canonical coordinates and vertex normals.
"""

from __future__ import annotations

import torch

from ..geometry import Camera, Mesh

W_EPS = 1e-6  # triangles with a vertex at Z <= W_EPS (metres) are dropped
MAX_CANDIDATES = 1 << 20  # candidate pixels per chunk: bounds peak memory (~150 B each)


def _work_dtype(device: torch.device) -> torch.dtype:
    return torch.float32 if device.type == "mps" else torch.float64


def _edge_coefficients(sx: torch.Tensor, sy: torch.Tensor, faces: torch.Tensor):
    """Per face, the 3 edge functions E_k(p) = a_k px + b_k py + c_k (edge k opposite vertex k), signed so that
    E_k >= 0 inside, and E_k / (E_0 + E_1 + E_2) is the barycentric weight of vertex k. Also the doubled signed area.

    Returns a, b, c [F, 3] and area2 [F].
    """
    X, Y = sx[faces], sy[faces]  # [F, 3]
    ia, ib = [1, 2, 0], [2, 0, 1]
    Ax, Ay, Bx, By = X[:, ia], Y[:, ia], X[:, ib], Y[:, ib]
    # Fixed endpoint order (by x, then y) so a shared edge evaluates bit-identically in both faces.
    swap = (Ax > Bx) | ((Ax == Bx) & (Ay > By))
    Ax, Bx = torch.where(swap, Bx, Ax), torch.where(swap, Ax, Bx)
    Ay, By = torch.where(swap, By, Ay), torch.where(swap, Ay, By)
    a = -(By - Ay)
    b = Bx - Ax
    c = (By - Ay) * Ax - (Bx - Ax) * Ay
    area2 = (X[:, 1] - X[:, 0]) * (Y[:, 2] - Y[:, 0]) - (Y[:, 1] - Y[:, 0]) * (X[:, 2] - X[:, 0])
    # E for edge (v1 -> v2) evaluated at v0 is area2 (positive for counter-clockwise-on-screen faces); an
    # exact negation (swap, or a clockwise face) keeps E_k >= 0 meaning "inside".
    sign = torch.where(swap, -1.0, 1.0).to(a.dtype) * torch.where(area2 < 0, -1.0, 1.0).to(a.dtype)[:, None]
    return a * sign, b * sign, c * sign, area2


def _spans(sx, sy, faces, tri, W: int, H: int):
    """(triangle, row) spans of the faces `tri`: returns span_tri (face index), span_y, span_x0, span_w [S]."""
    X, Y = sx[faces[tri]], sy[faces[tri]]  # [T, 3]
    y0 = Y.min(1).values.ceil().clamp(0, H - 1).long()
    y1 = Y.max(1).values.floor().clamp(0, H - 1).long()
    bx0 = X.min(1).values.ceil().clamp(0, W - 1).long()
    bx1 = X.max(1).values.floor().clamp(0, W - 1).long()
    h = (y1 - y0 + 1).clamp(min=0)
    local = torch.repeat_interleave(torch.arange(tri.numel(), device=tri.device), h)
    starts = torch.cumsum(h, 0) - h
    span_y = y0[local] + torch.arange(local.numel(), device=tri.device) - starts[local]
    # Scanline extent: intersect the row's centre line with the three edges.
    Xs, Ys, yc = X[local], Y[local], span_y.to(X.dtype)[:, None]
    Xa, Ya, Xb, Yb = Xs, Ys, Xs[:, [1, 2, 0]], Ys[:, [1, 2, 0]]
    dy = Yb - Ya
    crosses = (torch.minimum(Ya, Yb) <= yc) & (yc <= torch.maximum(Ya, Yb)) & (dy != 0)
    t = (yc - Ya) / torch.where(dy != 0, dy, torch.ones_like(dy))
    xi = Xa + t * (Xb - Xa)
    inf = torch.full_like(xi, float("inf"))
    lo = torch.where(crosses, xi, inf).min(1).values
    hi = torch.where(crosses, xi, -inf).max(1).values
    # A horizontal edge on the row: its endpoints are where the other edges cross, so lo/hi already cover it.
    has = torch.isfinite(lo) & torch.isfinite(hi)
    x0 = torch.where(has, (lo - 1).floor(), torch.zeros_like(lo)).clamp(min=-1).long()
    x1 = torch.where(has, (hi + 1).ceil(), torch.full_like(hi, W)).clamp(max=W).long()
    x0 = torch.maximum(x0, bx0[local])
    x1 = torch.minimum(x1, bx1[local])
    width = (x1 - x0 + 1).clamp(min=0)
    return tri[local], span_y, x0, width


@torch.no_grad()
def _nearest_faces(mesh: Mesh, camera: Camera, znear: float, zfar: float, max_candidates: int = MAX_CANDIDATES):
    """Pass 1-3: per pixel, the index of the nearest covering face, or -1. Returns (face [H*W] int64, geometry
    tuple reused by pass 4)."""
    dev = mesh.device
    dt = _work_dtype(dev)
    H, W = camera.height, camera.width
    faces = mesh.faces
    clip = camera.world_to_clip(mesh.vertices.to(dt), znear, zfar)
    w = clip[:, 3]
    ws = torch.where(w > W_EPS, w, torch.ones_like(w))
    sx = (clip[:, 0] / ws + 1) * (W / 2) - 0.5  # column coordinate, pixel centres at integers
    sy = (clip[:, 1] / ws + 1) * (H / 2) - 0.5  # row coordinate
    a, b, c, area2 = _edge_coefficients(sx, sy, faces)
    Zf = w[faces]  # [F, 3] camera depth per corner
    X, Y = sx[faces], sy[faces]
    keep = (
        (Zf > W_EPS).all(1)
        & (Zf.max(1).values >= znear)
        & (Zf.min(1).values <= zfar)
        & (area2.abs() > 1e-12)
        & (X.max(1).values >= 0)
        & (X.min(1).values <= W - 1)
        & (Y.max(1).values >= 0)
        & (Y.min(1).values <= H - 1)
    )
    geometry = (clip, a, b, c, Zf)
    INVALID = torch.iinfo(torch.int64).max
    best = torch.full((H * W,), INVALID, dtype=torch.int64, device=dev)
    tri = keep.nonzero().squeeze(1)
    if tri.numel() == 0:
        return torch.full((H * W,), -1, dtype=torch.int64, device=dev), geometry
    span_tri, span_y, span_x0, span_w = _spans(sx, sy, faces, tri, W, H)
    nonempty = span_w > 0
    span_tri, span_y, span_x0, span_w = span_tri[nonempty], span_y[nonempty], span_x0[nonempty], span_w[nonempty]
    if span_w.numel() == 0:
        return torch.full((H * W,), -1, dtype=torch.int64, device=dev), geometry
    # Chunk k holds the spans whose first candidate falls in [k * max_candidates, (k + 1) * max_candidates).
    first = torch.cumsum(span_w, 0) - span_w
    total = int(first[-1] + span_w[-1])
    bounds = torch.searchsorted(first, torch.arange(0, total, max_candidates, device=dev)).tolist() + [span_w.numel()]
    for s0, s1 in zip(bounds[:-1], bounds[1:]):
        if s1 <= s0:
            continue
        sw = span_w[s0:s1]
        sid = torch.repeat_interleave(torch.arange(s0, s1, device=dev), sw)
        off = torch.arange(sid.numel(), device=dev) - (first[sid] - first[s0])
        px = span_x0[sid] + off
        py = span_y[sid]
        f = span_tri[sid]
        pxf, pyf = px.to(dt)[:, None], py.to(dt)[:, None]
        e = a[f] * pxf + b[f] * pyf + c[f]  # [N, 3]
        inside = (e >= 0).all(1)
        e, f, px, py = e[inside], f[inside], px[inside], py[inside]
        # Perspective-correct depth: 1/Z interpolates linearly in screen space.
        bary = e / e.sum(1, keepdim=True)
        Z = 1.0 / (bary / Zf[f]).sum(1)
        ok = (Z >= znear) & (Z <= zfar)
        Z, f, px, py = Z[ok], f[ok], px[ok], py[ok]
        key = (Z.float().view(torch.int32).to(torch.int64) << 32) | f
        best.scatter_reduce_(0, py * W + px, key, reduce="amin", include_self=True)
    face = torch.where(best == INVALID, torch.full_like(best, -1), best & 0xFFFFFFFF)
    return face, geometry


def rasterize_torch(
    mesh: Mesh, camera: Camera, znear: float = 0.1, zfar: float = 2.0, max_candidates: int = MAX_CANDIDATES
):
    """The reference backend of `engine.raster.rasterize` (see there and the module docstring)."""
    from . import RasterBuffers

    dev = mesh.device
    dt = _work_dtype(dev)
    H, W = camera.height, camera.width
    face, (clip, a, b, c, Zf) = _nearest_faces(mesh, camera, znear, zfar, max_candidates)
    D = mesh.canonical_dims
    attrs = torch.cat([clip[:, 2:3].float(), mesh.canonical, mesh.vertex_normals()], dim=1)  # [V, 1 + D + 3]
    out = torch.zeros(H * W, attrs.shape[1], dtype=torch.float32, device=dev)
    pix = (face >= 0).nonzero().squeeze(1)
    if pix.numel():
        f = face[pix]
        px, py = (pix % W).to(dt)[:, None], (pix // W).to(dt)[:, None]
        e = a[f] * px + b[f] * py + c[f]
        bary = e / e.sum(1, keepdim=True)
        pc = bary / Zf[f]
        pc = (pc / pc.sum(1, keepdim=True)).float()  # perspective-correct weights [P, 3]
        out[pix] = (pc[:, :, None] * attrs[mesh.faces[f]]).sum(1)
    out = out.view(1, H, W, -1)
    mask = (face >= 0).view(1, H, W, 1).float()
    normals = torch.nn.functional.normalize(out[..., 1 + D :], dim=-1, eps=1e-12)
    return RasterBuffers(mask=mask, depth=out[..., :1], canonical=out[..., 1 : 1 + D], normals=normals)
