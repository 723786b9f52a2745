"""`manifest.json` of an export folder: what the graphs are, what they were exported from, and the checks that
refuse graphs exported from other weights, shapes, batch or precision.

Format (`FORMAT`, `VERSION`):
    {"format": "diffusion-avatars-engine/export", "version": 1, "target": "onnx", "created": ISO date,
     "dtype": "float32" | "float16" | "bfloat16" (the graphs' compute dtype; every graph input and output is float32),
     "batch": B, "opset": 18,
     "avatar": {"name", "weights_sha256" (`weights_sha256`), "image_size", "latent_shape": [c, h, w],
                "condition_channels", "tokens": [T, D], "expression_dim", "config": the AvatarConfig as JSON},
     "graphs": {name: {"file": "denoiser.onnx", "external_data": "denoiser.onnx.data" | null, "bytes": total size,
                       "nodes": n, "inputs": [{"name", "shape", "dtype"}], "outputs": [...],
                       "export_s": seconds, "max_abs_err": against the torch module (or null),
                       "not_verified": why ONNX Runtime did not run it (or null)}},
     "versions": {"torch", "diffusers", "onnx", "onnxscript", "onnx_ir", "onnxslim", "onnxruntime" (verification),
                  "engine", "python"}}
A TensorRT build (`export.tensorrt_build`) writes the same format with "target": "tensorrt", the ONNX manifest's
dtype, batch, opset and avatar, and per graph the engine ("file": "denoiser.plan", "engine_sha256", "onnx_file",
"key": {"graph_sha256", "gpu", "compute_capability", "tensorrt"}, "inputs", "outputs", "kept", "build_s").
One writer (`write_manifest`) and one reader (`read_manifest`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from engine.errors import CheckpointError, ConfigError, FormatError
from engine.files import read_json, write_atomic

FORMAT = "diffusion-avatars-engine/export"
VERSION = 1
MANIFEST = "manifest.json"


def weights_sha256(avatar) -> str:
    """sha256 over every tensor of the avatar's state dict, in order: name, dtype, shape, then the raw bytes.
    Independent of the device; about 1 s a GB."""
    h = hashlib.sha256()
    for name, t in avatar.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{str(t.dtype).removeprefix('torch.')}|{list(t.shape)}\n".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def avatar_facts(avatar) -> dict:
    """The avatar entry of a manifest: name, weights hash, shapes and the config."""
    return {"name": avatar.config.name, "weights_sha256": weights_sha256(avatar), **shape_facts(avatar),
            "config": avatar.config.to_dict()}


def write_manifest(folder: Path, manifest: dict) -> Path:
    """Write `manifest` (a dict in the format above, without "format"/"version") to `folder/manifest.json`."""
    data = {"format": FORMAT, "version": VERSION, **manifest}
    return write_atomic(Path(folder) / MANIFEST, json.dumps(data, indent=1) + "\n")


def read_manifest(folder: str | Path) -> dict:
    """The manifest of an export folder; CheckpointError when the folder or a graph file it names is missing,
    FormatError when the manifest is not one this engine reads."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"engines folder {folder} does not exist; write one with "
                              "`avatar export --avatar A --to onnx --out DIR`")
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {MANIFEST}, so it is not an export folder; write one with "
                              "`avatar export --avatar A --to onnx --out DIR`")
    data = read_json(path, "export again")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise FormatError(f"{path} is not an export manifest (its 'format' is not {FORMAT!r}); export again")
    if not isinstance(data.get("version"), int) or data["version"] > VERSION:
        raise FormatError(f"{path} has version {data.get('version')!r}; this engine reads up to {VERSION}: "
                          "upgrade the engine or export again")
    for key in ("target", "dtype", "batch", "avatar", "graphs"):
        if key not in data:
            raise FormatError(f"{path} has no {key!r}; export again")
    for name, graph in data["graphs"].items():
        for file in (graph.get("file"), graph.get("external_data")):
            if file is not None and not (folder / file).is_file():
                raise CheckpointError(f"graph {name!r} of {folder}: {folder / file} is missing; export again "
                                      "(`avatar export --to onnx`)")
    return data


def check_manifest(manifest: dict, avatar, batch: int | None = None, dtype: str | None = None,
                   source: str = "the engines", weights: bool = True) -> None:
    """ConfigError unless `manifest` was exported from this avatar (shapes, then weights), at `batch` and in
    `dtype` where given; each message names both sides."""
    got = manifest["avatar"]
    for key, value in shape_facts(avatar).items():
        if got.get(key) != value:
            raise ConfigError(f"{source} were exported for {key} {got.get(key)} (avatar {got.get('name')!r}), but "
                              f"avatar {avatar.config.name!r} has {key} {value}; export this avatar again")
    if batch is not None and manifest["batch"] != batch:
        raise ConfigError(f"{source} were exported for batch {manifest['batch']}, but got batch {batch}; export "
                          f"with --batch {batch} or render {manifest['batch']} frame(s) at a time")
    if dtype is not None and manifest["dtype"] != dtype:
        raise ConfigError(f"{source} compute in {manifest['dtype']}, but {dtype} was asked for; export with "
                          f"--dtype {dtype} or leave the dtype unset")
    if weights:
        sha = weights_sha256(avatar)
        if got.get("weights_sha256") != sha:
            raise ConfigError(f"{source} were exported from other weights (avatar {got.get('name')!r}, weights "
                              f"sha256 {str(got.get('weights_sha256'))[:16]}...) than avatar {avatar.config.name!r} "
                              f"(weights sha256 {sha[:16]}...); export this avatar again")


def shape_facts(avatar) -> dict:
    """The shapes the graphs are exported for (entries of a manifest's "avatar")."""
    c = avatar.config
    return {"image_size": c.image_size, "latent_shape": [c.vae.latent_channels, c.latent_size, c.latent_size],
            "condition_channels": c.condition_channels, "tokens": [c.expression_tokens, c.token_dim],
            "expression_dim": c.expression_dim}
