"""Writers of the authors' release run folder (model.md, "The release's checkpoints and data") and of a local
diffusers Stable Diffusion folder, at the `tiny` preset's shapes. Independent of the engine's readers: keys and
shapes are written out from model.md, the networks are diffusers' own."""

import json
import lzma
import struct

import numpy as np
import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from PIL import Image

from engine.config import from_preset
from engine.data.synthetic import default_rig_cameras, synthetic_head
from engine.data.synthetic_dataset import expression_sequences
from engine.data.synthetic_look import render_mesh
from engine.geometry import Mesh

TINY = from_preset("tiny")
R, C = TINY.conditioning.texture_resolution, TINY.conditioning.texture_channels
RUN_FILES = ("model_config.json", "dataset_config.json", "optimization_config.json", "train_setup.json")
# The release's expression layers of the tiny UNet, written out (block path, width).
TINY_BLOCKS = [
    ("down_blocks.0.attentions.0.transformer_blocks.0", 32),
    ("down_blocks.1.attentions.0.transformer_blocks.0", 64),
    ("up_blocks.1.attentions.0.transformer_blocks.0", 64),
    ("up_blocks.1.attentions.1.transformer_blocks.0", 64),
    ("up_blocks.2.attentions.0.transformer_blocks.0", 32),
    ("up_blocks.2.attentions.1.transformer_blocks.0", 32),
]


def write_sd_folder(folder):
    """A tiny diffusers Stable Diffusion folder (random weights, diffusers' own layout): unet/ and vae/."""
    torch.manual_seed(0)
    UNet2DConditionModel(**TINY.unet.diffusers_kwargs(TINY.latent_size)).save_pretrained(folder / "unet")
    AutoencoderKL(**TINY.vae.diffusers_kwargs(TINY.image_size)).save_pretrained(folder / "vae")
    return folder


def release_state(seed, code_size=8, people=3, scale=1.0):
    """A release checkpoint of the tiny shapes, `people` rows, keys as model.md lists them; random weights times
    `scale` (small weights keep a rendered frame finite)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * scale

    with torch.device("meta"):
        unet = UNet2DConditionModel(**TINY.unet.diffusers_kwargs(TINY.latent_size))
        controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 16, 32, 32),
                                               conditioning_channels=73)
    state = {f"controlnet.{k}": rand(*v.shape) for k, v in controlnet.state_dict().items()}
    for block, width in TINY_BLOCKS:
        prefix = f"unet.{block}._expression_attention."
        state[prefix + "to_q.weight"] = rand(width, width)
        state[prefix + "to_k.weight"] = rand(width, 32)
        state[prefix + "to_v.weight"] = rand(width, 32)
        state[prefix + "to_out.0.weight"] = rand(width, width)
        state[prefix + "to_out.0.bias"] = rand(width)
    state["expression_codes_mlp.weight"] = rand(4 * 32, code_size)
    state["expression_codes_mlp.bias"] = rand(4 * 32)
    for name in ("neural_texture_lookup_uv", "neural_texture_lookup_uw", "neural_texture_lookup_vw",
                 "ambient_texture_lookup"):
        state[f"{name}.weight"] = torch.randn(people, R * R * C, generator=g)
    return state


def write_release_run(run, state, step=2000):
    """A run folder: the four config files and checkpoints/ckpt-<step>.pt (plus an older, stale checkpoint whose
    name sorts after it as text: the largest step must win)."""
    (run / "checkpoints").mkdir(parents=True)
    for name in RUN_FILES:
        (run / name).write_text("{}")
    torch.save(state, run / "checkpoints" / f"ckpt-{step}.pt")
    torch.save({"stale": torch.zeros(1)}, run / "checkpoints" / "ckpt-300.pt")
    return run


# -- the tracked data's file formats ---------------------------------------------------------------
def ctm_bytes(vertices: np.ndarray, faces: np.ndarray, method: str = "MG1") -> bytes:
    """An OpenCTM v5 file. MG1 follows libopenctm's encoder: triangles rotated to start at their smallest index
    and sorted, index deltas, byte-plane interleaving, raw LZMA1 with a 5-byte property header."""
    head = b"OCTM" + struct.pack("<i4s5i", 5, method.encode().ljust(4, b"\0"), len(vertices), len(faces), 0, 0, 0)
    head += struct.pack("<I", 4) + b"test"
    if method == "RAW":
        return head + b"INDX" + faces.astype("<u4").tobytes() + b"VERT" + vertices.astype("<f4").tobytes()
    tri = np.array([np.roll(f, -int(np.argmin(f))) for f in faces], dtype=np.int64)
    tri = tri[np.lexsort((tri[:, 1], tri[:, 0]))]
    d = tri.copy()
    for i in range(len(d) - 1, -1, -1):
        d[i, 1] -= tri[i - 1, 1] if i >= 1 and tri[i, 0] == tri[i - 1, 0] else tri[i, 0]
        d[i, 2] -= tri[i, 0]
        if i >= 1:
            d[i, 0] -= tri[i - 1, 0]

    def pack(words: np.ndarray, size: int) -> bytes:  # words [count * size] uint32, element-major
        w = words.reshape(-1, size)
        planes = [((w >> (8 * b)) & 0xFF).astype(np.uint8).T.reshape(-1) for b in (3, 2, 1, 0)]
        filt = {"id": lzma.FILTER_LZMA1, "dict_size": 1 << 16, "lc": 3, "lp": 0, "pb": 2}
        packed = lzma.compress(np.concatenate(planes).tobytes(), format=lzma.FORMAT_RAW, filters=[filt])
        props = bytes([(2 * 5 + 0) * 9 + 3]) + struct.pack("<I", 1 << 16)
        return struct.pack("<I", len(packed)) + props + packed

    body = b"INDX" + pack((d & 0xFFFFFFFF).astype(np.uint32).reshape(-1), 3)
    body += b"VERT" + pack(vertices.astype("<f4").reshape(-1).view(np.uint32), 1)
    return head + body


def ply_bytes(vertices, faces, binary=False) -> bytes:
    hdr = (f"ply\nformat {'binary_little_endian' if binary else 'ascii'} 1.0\ncomment test\n"
           f"element vertex {len(vertices)}\nproperty float x\nproperty float y\nproperty float z\n"
           f"element face {len(faces)}\nproperty list uchar int vertex_indices\nend_header\n").encode()
    if binary:
        body = b"".join(struct.pack("<3f", *v) for v in vertices)
        return hdr + body + b"".join(struct.pack("<B3i", 3, *f) for f in faces)
    lines = [" ".join(f"{x:.8g}" for x in v) for v in vertices] + [f"3 {a} {b} {c}" for a, b, c in faces]
    return hdr + ("\n".join(lines) + "\n").encode()


def rodrigues_vector(R: np.ndarray) -> np.ndarray:
    """The Rodrigues vector (axis * angle) of a rotation matrix (the log map; angle pi handled)."""
    R = np.asarray(R, dtype=np.float64)
    angle = np.arccos(np.clip((np.trace(R) - 1) / 2, -1, 1))
    if angle < 1e-9:
        return np.zeros(3)
    if np.pi - angle < 1e-6:
        B = (R + np.eye(3)) / 2
        axis = B[:, int(np.argmax(np.diag(B)))]
        return axis / np.linalg.norm(axis) * angle
    axis = np.array([R[2, 1] - R[1, 2], R[0, 2] - R[2, 0], R[1, 0] - R[0, 1]]) / (2 * np.sin(angle))
    return axis * angle


def remeshed(mesh: Mesh, rng: np.random.Generator, split: float = 0.3):
    """Marching cubes' stand-in: the posed mesh with a random `split` share of its triangles split at their centroid
    (canonical coordinates averaged) and the vertices shuffled, so that vertex count, order and faces change from
    frame to frame while the surface stays. Returns (vertices [U, 3], faces [F', 3], canonical [U, 5])."""
    v, f, c = mesh.vertices.numpy(), mesh.faces.numpy(), mesh.canonical.numpy()
    pick = rng.random(len(f)) < split
    tri = f[pick]
    centre = np.arange(len(v), len(v) + len(tri))
    v = np.concatenate([v, v[tri].mean(1)])
    c = np.concatenate([c, c[tri].mean(1)])
    f = np.concatenate([f[~pick]] + [np.stack([tri[:, a], tri[:, b], centre], 1) for a, b in ((0, 1), (1, 2), (2, 0))])
    order = rng.permutation(len(v))
    new_index = np.empty_like(order)
    new_index[order] = np.arange(len(v))
    return v[order], new_index[f], c[order]


def synthetic_codes(codes8: np.ndarray) -> np.ndarray:
    """[T, 8] synthetic rig codes -> [T, 206]: a fixed random linear embedding into 200 "NPHM" values (full column
    rank, so the rig code is recoverable) and the 2 blinks spread over the 6 "FLAME eye" values."""
    g = np.random.default_rng(1234)
    nphm = codes8 @ g.normal(0, 0.5, (8, 200))
    eyes = codes8[:, 4:6] @ g.normal(0, 0.3, (2, 6))
    return np.concatenate([nphm, eyes], axis=1).astype(np.float32)


def write_synthetic_person(root, sequences=2, frames=8, cameras=3, size=32, seed=0, split=0.3, every=1):
    """The synthetic head exported as one person's tracked data in the release's layout: NeRSemble calibration (full
    resolution 2 * size, images in images-2x), per timestep a remeshed posed mesh as an OpenCTM MG1 file in NPHM
    space (metres x 4), its canonical coordinates quantised to uint16, the 200-value code, and per sequence the FLAME
    pose (a small head motion) and 6 eye values; ground-truth images of the placed head and their alpha maps.
    Timesteps are numbered 0, every, 2 * every, ... Returns the [T, 8] rig codes per sequence (the truth)."""
    rng = np.random.default_rng(seed)
    head = synthetic_head()
    cams = default_rig_cameras(cameras, size)
    serials = [f"2222000{37 + i:02d}" for i in range(cameras)]
    calib = root / "calibration"
    calib.mkdir(parents=True)
    (calib / "calibration_result.json").write_text(json.dumps({"params_result": {
        "rs": [rodrigues_vector(c.R.numpy()).tolist() for c in cams], "ts": [c.t.tolist() for c in cams],
        "intrinsics": [{"fx": 2 * c.fx, "fy": 2 * c.fy, "cx": 2 * c.cx, "cy": 2 * c.cy} for c in cams]}}))
    (calib / "config.json").write_text(json.dumps({"serials": serials, "image_size": {"w": 2 * size, "h": 2 * size}}))
    lo, hi = np.array([-1, -1, -1.5, -0.2, -0.2]), np.array([1, 1, 0.5, 0.2, 0.2])
    truth = {}
    for s, codes8 in enumerate(expression_sequences(sequences, frames, seed=seed)):
        name = f"EXP-{s + 1}-synthetic"
        truth[name] = codes8
        base = root / "sequences" / name
        nphm, flame = (base / "annotations" / "tracking" / run for run in ("NPHM_temp_wNeck", "FLAME2023_v2"))
        nphm.mkdir(parents=True)
        flame.mkdir(parents=True)
        codes = synthetic_codes(codes8)
        phase = np.linspace(0, np.pi, frames)[:, None]
        rotation = 0.08 * np.sin(phase + rng.uniform(0, np.pi, (1, 3)))
        translation = 0.005 * np.sin(phase + rng.uniform(0, np.pi, (1, 3)))
        np.savez(flame / "tracked_flame_params.npz", rotation=rotation, translation=translation,
                 scale=np.ones((1, 1)), eyes=codes[:, 200:])
        for i in range(frames):
            t = i * every
            v, f, c = remeshed(head.posed_mesh(torch.from_numpy(codes8[i])), rng, split)
            (nphm / f"{t:05d}_local_new.CTM").write_bytes(ctm_bytes(v * 4, f, "RAW"))
            q = np.round((np.clip(c, lo, hi) - lo) / (hi - lo) * 65535).astype(np.uint16)
            np.savez(nphm / f"{t:05d}_canonical_vertices_uint16.npz", q)
            np.savez(nphm / f"{t:05d}_ex_code.npz", codes[i:i + 1, :200])
            a, b, g = rotation[i]
            rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
            ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
            rz = np.array([[np.cos(g), -np.sin(g), 0], [np.sin(g), np.cos(g), 0], [0, 0, 1]])
            world = Mesh(torch.from_numpy((v @ (rx @ ry @ rz).T + translation[i]).astype(np.float32)),
                         torch.from_numpy(f), torch.from_numpy(c))
            frame = base / "timesteps" / f"frame_{t:05d}"
            (frame / "images-2x").mkdir(parents=True)
            (frame / "alpha_map").mkdir()
            for serial, cam in zip(serials, cams):
                rgb, alpha = render_mesh(world, cam)
                Image.fromarray((rgb.numpy() * 255).round().astype(np.uint8)).save(
                    frame / "images-2x" / f"cam_{serial}.png")
                Image.fromarray((alpha.numpy() * 255).round().astype(np.uint8)).save(
                    frame / "alpha_map" / f"cam_{serial}.png")
    return truth
