"""`avatar export --to tensorrt` and the `tensorrt` backend on a machine without TensorRT (tests/gpu has the real one).

The tiny preset is exported to ONNX twice (float32, float16; child processes started together, about 30 s on 2
cores). Checked against them: every operator and data type in TensorRT's documented list, the tensor types a
strongly typed build computes in, the buffer plan the backend builds from the manifest. The build and the backend
then run on `fake_tensorrt` (the documented API, recorded, with engines computing closed forms through the bound
addresses): the STRONGLY_TYPED flag, the timing cache, the engine cache and its refusals, and one frame's enqueues.
"""

import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch

import engine.backends.tensorrt as trt_backend
import export.tensorrt_build as build
from engine.cli import main
from engine.errors import BackendError, ConfigError
from engine.frame import to_pixels
from engine.renderer import Renderer
from engine.sampling import denoise
from export.manifest import read_manifest
from export.tensorrt_build import EngineKey, build_engines
from export.tensorrt_support import (
    SUPPORTED,
    graph_dtype,
    graph_problems,
    opset_problem,
    precision_problems,
)
from fake_tensorrt import FakeTensorRT, conditioning, decoder, denoiser

ROOT = Path(__file__).resolve().parents[1]
GRAPHS = ("conditioning", "denoiser", "decoder", "tokens")
GPU = ("NVIDIA Fake H200", "9.0")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{"float32": folder, "float16": folder}: the tiny preset's ONNX exports."""
    root, jobs = tmp_path_factory.mktemp("onnx"), {}
    for dtype in ("float32", "float16"):
        cmd = [sys.executable, "-m", "engine.cli", "export", "--avatar", "tiny", "--to", "onnx", "--dtype", dtype,
               "--no-verify", "--out", str(root / dtype)]
        jobs[dtype] = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for job in jobs.values():
        log = job.communicate(timeout=900)[0]
        assert job.returncode == 0, log
    return {dtype: root / dtype for dtype in jobs}


@pytest.fixture
def fake_trt(monkeypatch):
    """The fake `tensorrt` module importable, a fake GPU, and the backend's CUDA check off (its buffers then live
    on the CPU, where the fake engines read and write them through their addresses)."""
    fake = FakeTensorRT()
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(build, "current_gpu", lambda device=None: GPU)
    monkeypatch.setattr(trt_backend, "require_cuda", lambda device: None)
    return fake


def _load(folder, name):
    return onnx.load(str(folder / f"{name}.onnx"))


# -- the graphs against TensorRT's documented support ------------------------------------------------------------
def test_the_supported_list_is_the_pages():
    """Entries read off onnx-tensorrt's docs/operators.md (10.1 GA) by hand: 150 operators marked Y."""
    assert len(SUPPORTED) == 150
    assert SUPPORTED["Conv"] == SUPPORTED["Softmax"] == {"FP32", "FP16", "BF16"}
    assert SUPPORTED["Cast"] == {"FP32", "FP16", "BF16", "INT32", "INT64", "UINT8", "BOOL"}
    assert SUPPORTED["And"] == {"BOOL"} and SUPPORTED["GridSample"] == {"FP32", "FP16"}
    assert {"LayerNormalization", "GroupNormalization", "InstanceNormalization", "Resize", "Erf"} <= set(SUPPORTED)
    assert not {"BitShift", "Unique", "STFT", "ConvInteger", "SequenceAt"} & set(SUPPORTED)


def test_every_exported_op_and_type_is_in_tensorrts_list(exports):
    for dtype, folder in exports.items():
        for name in GRAPHS:
            model = _load(folder, name)
            assert graph_problems(model) == [], (dtype, name)
            assert opset_problem(model, 10) is None and opset_problem(model, 11) is None, (dtype, name)
    # and the check fails where it should: an unsupported operator, a type the list lacks, a dynamic batch
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.DOUBLE, ["batch", 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.DOUBLE, ["batch", 4])
    nodes = [onnx.helper.make_node("Relu", ["x"], ["r"], name="relu"),
             onnx.helper.make_node("BitShift", ["r", "r"], ["y"], name="shift", direction="LEFT")]
    bad = onnx.helper.make_model(onnx.helper.make_graph(nodes, "bad", [x], [y]),
                                 opset_imports=[onnx.helper.make_opsetid("", 21)])
    problems = "\n".join(graph_problems(bad))
    assert "Relu on DOUBLE" in problems and "BitShift is not in TensorRT's supported list" in problems
    assert "'x' has no static shape" in problems and "opset 21 is outside 9..20" in opset_problem(bad, 10)


def test_graph_types_are_what_a_strongly_typed_build_computes(exports):
    for dtype, folder in exports.items():
        for name in GRAPHS:
            assert precision_problems(_load(folder, name), graph_dtype(name, dtype)) == [], (dtype, name)
    half = _load(exports["float16"], "denoiser")
    types = {v.name: v.type.tensor_type.elem_type for v in [*half.graph.value_info, *half.graph.input]}
    convs = [n for n in half.graph.node if n.op_type == "Conv"]
    assert convs and all(types[n.input[0]] == onnx.TensorProto.FLOAT16 for n in convs)
    # a float32 graph would build a float32 engine where float16 was asked for, and the other way round
    assert any("Conv computes in {'FP32'" in p for p in precision_problems(_load(exports["float32"], "denoiser"),
                                                                             "float16"))
    assert any("holds ['FP16'] tensors" in p for p in precision_problems(half, "float32"))


def test_cache_key_changes_with_each_part():
    key = EngineKey("a" * 64, "NVIDIA H200", "9.0", "10.8.0")
    changed = {"graph_sha256": "b" * 64, "gpu": "NVIDIA H100", "compute_capability": "8.9", "tensorrt": "10.9.0"}
    reasons = {"graph_sha256": "the ONNX graph changed", "gpu": "built for NVIDIA H200",
               "compute_capability": "compute capability 9.0), this GPU is",
               "tensorrt": "built with TensorRT 10.8.0, this is TensorRT 10.9.0"}
    digests = {key.digest()}
    for part, value in changed.items():
        other = EngineKey(**{**key.to_dict(), part: value})
        digests.add(other.digest())
        assert reasons[part] in key.mismatch(other), part
    assert len(digests) == 5 and key.mismatch(EngineKey.from_dict(key.to_dict())) is None


def test_buffer_plan_follows_the_manifest(exports, tiny_avatar):
    c = tiny_avatar.config
    manifest = read_manifest(exports["float32"])
    plan = trt_backend.BufferPlan(manifest["graphs"])
    latent = (1, c.vae.latent_channels, c.latent_size, c.latent_size)
    assert plan.buffers == {
        "condition": ((1, c.condition_channels, c.image_size, c.image_size), "float32"),
        "cond_embedding": ((1, c.unet.block_out_channels[0], c.latent_size, c.latent_size), "float32"),
        "latent": (latent, "float32"), "timestep": ((1,), "float32"),
        "tokens": ((1, c.expression_tokens, c.token_dim), "float32"), "v": (latent, "float32"),
        "image": ((1, 3, c.image_size, c.image_size), "float32")}
    assert [t.name for t in plan.graphs["denoiser"]] == ["latent", "timestep", "cond_embedding", "tokens", "v"]
    assert plan.order(3) == ["conditioning", "denoiser", "denoiser", "denoiser", "decoder"]
    graphs = manifest["graphs"]
    wrong = {**graphs, "decoder": {**graphs["decoder"], "inputs": [{**graphs["decoder"]["inputs"][0],
                                                                    "shape": [1, 4, 8, 8]}]}}
    with pytest.raises(BackendError, match=r"graph 'decoder' has latent \[1, 4, 8, 8\] float32"):
        trt_backend.BufferPlan(wrong)


# -- the build, on the fake TensorRT ------------------------------------------------------------------------------
def test_build_is_strongly_typed_keeps_valid_engines_and_the_timing_cache(exports, fake_trt, tmp_path):
    out, lines = tmp_path / "engines", []
    manifest = build_engines(exports["float16"], out, workspace_gib=2, log=lines.append)
    flags = [c[1] for c in fake_trt.calls if c[0] == "create_network"]
    assert flags == [1 << 0] * 4  # STRONGLY_TYPED on 10.x
    assert ("workspace", 2 * 2**30) in fake_trt.calls
    assert [c[1] for c in fake_trt.calls if c[0] == "build"] == list(GRAPHS)
    assert manifest["dtype"] == "float16" and sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json", "timing.cache", *(f"{g}.plan" for g in GRAPHS)])
    assert (out / "timing.cache").read_bytes() == b"+"  # an empty cache, serialized once after the builds
    assert manifest["graphs"]["denoiser"]["key"] == {"graph_sha256": build.file_sha256(exports["float16"] /
                                                                                      "denoiser.onnx"),
                                                     "gpu": GPU[0], "compute_capability": GPU[1],
                                                     "tensorrt": "10.8.0.43"}
    fake_trt.calls.clear()
    again = build_engines(exports["float16"], out, log=lines.append)  # nothing changed: every engine kept
    assert all(g["kept"] for g in again["graphs"].values()) and not [c for c in fake_trt.calls if c[0] == "build"]
    assert ("create_timing_cache", b"+") in fake_trt.calls  # the earlier build's cache was read
    assert (out / "timing.cache").read_bytes() == b"++"
    fake_trt.failing_graph, before = "decoder", sorted(p.read_bytes() for p in out.iterdir())
    with pytest.raises(BackendError, match=r"could not build an engine from .*decoder.onnx"):
        build_engines(exports["float16"], out, rebuild=True)
    assert sorted(p.read_bytes() for p in out.iterdir()) == before  # the earlier build stays as it was
    assert [p.name for p in out.parent.iterdir()] == ["engines"]  # no temporary folder left
    fake_trt.failing_graph, fake_trt.__version__ = None, "10.9.0.1"
    (out / "decoder.plan").write_bytes(b"changed")
    rebuilt = build_engines(exports["float16"], out, log=lines.append)
    assert not any(g["kept"] for g in rebuilt["graphs"].values())
    assert any("built with TensorRT 10.8.0.43, this is TensorRT 10.9.0.1" in line for line in lines)


def test_tensorrt_11_builds_without_the_deprecated_flag_and_foreign_caches_start_afresh(exports, fake_trt, tmp_path):
    fake_trt.__version__ = "11.4.0.5"
    cache = tmp_path / "shared.cache"
    cache.write_bytes(b"foreign cache")
    lines = []
    build_engines(exports["float32"], tmp_path / "e", timing_cache=cache, log=lines.append)
    assert {c[1] for c in fake_trt.calls if c[0] == "create_network"} == {0}
    assert any("from another TensorRT version or GPU" in line for line in lines)
    assert cache.read_bytes() == b"+" and not (tmp_path / "e" / "timing.cache").exists()


def test_build_refuses_graphs_a_strongly_typed_build_would_get_wrong(exports, fake_trt, tmp_path):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for p in exports["float32"].iterdir():
        (mixed / p.name).write_bytes(p.read_bytes())
    (mixed / "decoder.onnx").write_bytes((exports["float16"] / "decoder.onnx").read_bytes())  # a float16 graph
    with pytest.raises(BackendError, match=r"decoder: a float32 graph holds \['FP16'\] tensors"):
        build_engines(mixed, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not [c for c in fake_trt.calls if c[0] == "build"]
    with pytest.raises(ConfigError, match="is the --onnx folder"):
        build_engines(mixed, mixed)


# -- the backend, on the fake TensorRT ----------------------------------------------------------------------------
@pytest.fixture
def fake_engines(exports, fake_trt, tmp_path):
    build_engines(exports["float32"], tmp_path / "engines")
    fake_trt.calls.clear()
    return tmp_path / "engines"


def test_a_frame_is_n_plus_1_executions_on_one_stream_without_synchronisation(fake_engines, fake_trt, tiny_avatar,
                                                                               monkeypatch):
    """The denoiser N times and the decoder once (after the per-frame conditioning), every execute_async_v3 on torch's
    current stream, nothing synchronised between; the pixels are the closed forms run through the shared loop."""
    steps, stream, syncs = 4, 0x5EED, []

    class Stream:
        cuda_stream = stream

        def synchronize(self):
            syncs.append("stream.synchronize")

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    r = Renderer(tiny_avatar, sampler="ddim", steps=steps, backend="tensorrt",
                 backend_options={"engines": fake_engines, "graphs": False})
    backend = r.backend
    bound = {(c[1], c[2]) for c in fake_trt.calls if c[0] == "set_tensor_address"}
    assert bound == {(g, t.name) for g in backend.plan.graphs for t in backend.plan.graphs[g]}
    gen = torch.Generator().manual_seed(3)
    condition = torch.randn(backend.plan.buffers["condition"][0], generator=gen)
    tokens = torch.randn(backend.plan.buffers["tokens"][0], generator=gen)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append("torch.cuda.synchronize"))
    for method in ("item", "tolist", "cpu", "numpy"):
        original = getattr(torch.Tensor, method)
        monkeypatch.setattr(torch.Tensor, method, lambda self, *a, _m=method, _o=original, **k: (
            syncs.append(f"Tensor.{_m}"), _o(self, *a, **k))[1])
    fake_trt.calls.clear()
    pixels = backend.frame(condition, tokens)
    monkeypatch.undo()
    order = [g for g, _ in fake_trt.executions()]
    assert order == ["conditioning", *["denoiser"] * steps, "decoder"] == backend.plan.order(steps)
    assert {s for _, s in fake_trt.executions()} == {stream} and syncs == []
    assert [c[0] for c in fake_trt.calls] == ["execute_async_v3"] * (steps + 2)  # nothing else between them
    # the same frame from the closed forms in torch, through the shared loop
    c = tiny_avatar.config
    emb = torch.from_numpy(conditioning(condition.numpy(), c.unet.block_out_channels[0], c.latent_size))
    timesteps = r.sampler.timesteps.float()
    latent = denoise(lambda i, x: torch.from_numpy(denoiser(x.numpy(), timesteps[i:i + 1].expand(1).numpy(),
                                                            emb.numpy(), tokens.numpy())), r.sampler, r.noise)
    want = to_pixels(torch.from_numpy(decoder(latent.numpy(), c.image_size)))
    assert (pixels.int() - want.int()).abs().max() <= 1 and pixels.float().std() > 1


def test_backend_refuses_engines_for_another_gpu_tensorrt_or_file(fake_engines, fake_trt, tiny_avatar, monkeypatch):
    opts = {"engines": fake_engines, "graphs": False}
    monkeypatch.setattr(build, "current_gpu", lambda device=None: ("NVIDIA A100", "8.0"))
    with pytest.raises(ConfigError, match=r"built for NVIDIA Fake H200 \(compute capability 9.0\), this GPU is NVIDIA "
                                          r"A100 \(8.0\); build it again on this machine: avatar export --to tensorrt"):
        Renderer(tiny_avatar, backend="tensorrt", backend_options=opts)
    monkeypatch.setattr(build, "current_gpu", lambda device=None: GPU)
    fake_trt.__version__ = "10.9.0.1"
    with pytest.raises(ConfigError, match=r"built with TensorRT 10.8.0.43, this is TensorRT 10.9.0.1"):
        Renderer(tiny_avatar, backend="tensorrt", backend_options=opts)
    fake_trt.__version__ = "10.8.0.43"
    (fake_engines / "denoiser.plan").write_bytes(b"{}")
    with pytest.raises(ConfigError, match=r"denoiser.plan changed since it was built"):
        Renderer(tiny_avatar, backend="tensorrt", backend_options=opts)


def test_backend_refuses_onnx_folders_and_other_avatars(exports, fake_trt, tiny_avatar):
    with pytest.raises(ConfigError, match=r"holds a 'onnx' export, not TensorRT engines"):
        Renderer(tiny_avatar, backend="tensorrt", backend_options={"engines": exports["float32"]})
    with pytest.raises(ConfigError, match="needs a build folder"):
        Renderer(tiny_avatar, backend="tensorrt")


# -- without TensorRT -----------------------------------------------------------------------------------------------
def test_without_tensorrt_the_command_and_the_backend_say_how_to_install(exports, tmp_path, capsys, monkeypatch,
                                                                         tiny_avatar):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    out = tmp_path / "engines"
    assert main(["export", "--to", "tensorrt", "--onnx", str(exports["float16"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("avatar export: error: TensorRT is not installed: pip install "
                          "'diffusion-avatars-engine[tensorrt]'") and "NVIDIA GPU" in err and "driver" in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(BackendError, match=r"pip install 'diffusion-avatars-engine\[tensorrt\]'"):
        Renderer(tiny_avatar, backend="tensorrt", backend_options={"engines": exports["float32"]})
    for args, message in ((["--to", "tensorrt", "--out", str(out)], "--to tensorrt needs --onnx DIR"),
                          (["--to", "onnx", "--out", str(out)], "--to onnx needs --avatar")):
        assert main(["export", *args]) == 2
        assert message in capsys.readouterr().err
