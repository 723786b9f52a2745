"""Fused kernels on a CPU machine: the .cu files compile, `kernels` imports nothing of the engine but its errors,
the engine-side ops (`engine.fused`) equal the torch twins off the GPU, inputs are validated, and the Python
argument lists match the kernels' signatures. The GPU parity tests live in tests/gpu/test_kernels_gpu.py."""

import ast
import ctypes
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import kernels
from engine import fused
from engine.conditioning import NeuralTextures, PackedTextures, build_condition, pack_textures
from engine.config import ConditioningConfig
from engine.errors import BackendError, InputError
from engine.frame import to_pixels
from engine.fused import build_condition_fused, to_pixels_fused
from kernels import loader, ops

SOURCES = sorted(loader.SOURCE_DIR.glob("*.cu"))
KERNELS_DIR = Path(kernels.__file__).resolve().parent
ENGINE_DIR = Path(fused.__file__).resolve().parent


def _to_pixels_formula(image: torch.Tensor) -> torch.Tensor:
    """The twin's formula (engine.frame.to_pixels), written out: the twin is checked against it too."""
    return ((image.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)


def _case(dims=5, b=2, h=5, w=7, r=6, c=4, seed=0):
    """Random raster buffers (coordinates a little beyond the normalisation box) and textures."""
    g = torch.Generator().manual_seed(seed)
    cfg = ConditioningConfig(canonical_dims=dims, texture_resolution=r, texture_channels=c)
    lo = torch.tensor(cfg.canonical_min + (cfg.ambient_min if dims == 5 else ()))
    hi = torch.tensor(cfg.canonical_max + (cfg.ambient_max if dims == 5 else ()))
    span = hi - lo
    normals = torch.randn(b, h, w, 3, generator=g)
    raster = SimpleNamespace(
        mask=(torch.rand(b, h, w, 1, generator=g) > 0.3).float(),
        depth=torch.rand(b, h, w, 1, generator=g) * cfg.depth_max,
        canonical=lo - 0.1 * span + 1.2 * span * torch.rand(b, h, w, dims, generator=g),
        normals=normals / normals.norm(dim=-1, keepdim=True),
    )
    return raster, NeuralTextures(cfg, generator=g), cfg


# -- compile checks ---------------------------------------------------------------------------------------
def test_every_kernel_has_a_source():
    assert {p.stem for p in SOURCES} >= {"condition", "pixels"}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_cu_compiles_with_nvcc(path, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH; install the CUDA toolkit to compile-check the kernels")
    # No includes are allowed: NVRTC has no include path at run time.
    assert not re.search(r"^\s*#\s*include", path.read_text(), re.M)
    result = subprocess.run(
        [nvcc, "-c", "-arch=sm_90", "-o", str(tmp_path / f"{path.stem}.o"), str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr


def _nvrtc_or_skip():
    if not ops._nvrtc_loads():
        pytest.skip("cuda-python or the NVRTC library is not installed (pip install 'diffusion-avatars-engine[cuda]')")


@pytest.mark.parametrize("name", [p.stem for p in SOURCES])
def test_cu_compiles_with_nvrtc(name):
    _nvrtc_or_skip()
    cubin = loader.compile_cubin(name, "sm_90")
    assert cubin[:4] == b"\x7fELF"


def test_nvrtc_error_carries_the_log(tmp_path, monkeypatch):
    _nvrtc_or_skip()
    (tmp_path / "broken.cu").write_text('extern "C" __global__ void f(int* x) { x[0] = undefined_name; }\n')
    monkeypatch.setattr(loader, "SOURCE_DIR", tmp_path)
    with pytest.raises(BackendError, match="undefined_name"):
        loader.compile_cubin("broken", "sm_90")
    with pytest.raises(BackendError, match="cannot build for sm_1"):
        loader.compile_cubin("broken", "sm_1")
    with pytest.raises(BackendError, match="no kernel source"):
        loader.compile_cubin("missing", "sm_90")


def test_missing_cuda_python_names_the_install(monkeypatch):
    monkeypatch.setattr(loader, "_bindings", lambda: None)
    assert not loader.has_cuda_python()
    with pytest.raises(BackendError, match=r"pip install 'diffusion-avatars-engine\[cuda\]'"):
        loader.bindings()


# -- import boundaries ------------------------------------------------------------------------------------
def _imports(path: Path, package: str) -> list[str]:
    """Every module a file of `package` imports, anywhere in it (inside functions too), relative ones resolved."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")[: len(package.split(".")) - max(node.level - 1, 0)] if node.level else []
            base = ".".join([*parts, *([node.module] if node.module else [])])
            # `from engine import fused` imports the module engine.fused; names that are not modules just
            # lengthen the path (`engine.errors.InputError`), which a prefix check still places.
            found += [f"{base}.{a.name}" for a in node.names]
    return found


def _is_within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_import_walker_sees_every_form(tmp_path):
    path = tmp_path / "sample.py"
    path.write_text(
        "import engine.renderer\nfrom engine import fused\nfrom . import loader\n"
        "def f():\n    from engine.errors import InputError\n"
    )
    want = ["engine.renderer", "engine.fused", "kernels.loader", "engine.errors.InputError"]
    assert _imports(path, "kernels") == want


def test_kernels_import_nothing_of_the_engine_but_its_errors():
    files = sorted(KERNELS_DIR.glob("*.py"))
    assert {p.name for p in files} >= {"__init__.py", "loader.py", "ops.py"}
    engine_imports = {p.name: [m for m in _imports(p, "kernels") if _is_within(m, "engine")] for p in files}
    assert any(engine_imports.values()), "the walker found no engine import at all (kernels raise engine.errors)"
    offending = {name: [m for m in mods if not _is_within(m, "engine.errors")] for name, mods in engine_imports.items()}
    assert not any(offending.values()), f"kernels/ may import only engine.errors from the engine, found {offending}"


def test_reference_conditioning_imports_no_fast_path():
    mods = _imports(ENGINE_DIR / "conditioning.py", "engine")
    assert "engine.config.ConditioningConfig" in mods
    assert not [m for m in mods if _is_within(m, "kernels") or _is_within(m, "engine.fused")]


# -- the argument lists against the kernels' signatures ---------------------------------------------------
def _param_sizes(path: Path, function: str) -> tuple[int, ...]:
    """Byte sizes of an `extern "C" __global__` function's parameters, read from the source."""
    match = re.search(rf'extern "C" __global__ void {function}\((.*?)\)\s*\{{', path.read_text(), re.S)
    sizes = []
    for param in match.group(1).split(","):
        kind = " ".join(param.split()[:-1])
        sizes.append(8 if "*" in param or "long long" in kind else {"int": 4, "float": 4}[kind.split()[-1]])
    return tuple(sizes)


class _Recorder:
    def __init__(self):
        self.calls = []

    def launch(self, grid, block, args, stream=None):
        self.calls.append((grid, block, tuple(ctypes.sizeof(a) for a in args), tuple(a.value for a in args)))


@pytest.mark.parametrize("dims", [5, 3])
def test_arguments_match_kernel_signatures(monkeypatch, dims):
    """The engine-side ops as on CUDA: the config's layout numbers reach the kernels in the .cu order."""
    rec = _Recorder()
    monkeypatch.setattr(fused, "_use_kernel", lambda device: True)
    monkeypatch.setattr(ops, "_require_cuda", lambda device, op: None)
    monkeypatch.setattr(loader, "get_function", lambda name, function, device: rec)
    raster, tex, cfg = _case(dims=dims)
    out = build_condition_fused(raster, tex, cfg)
    image = torch.zeros(2, 3, 4, 5)
    pixels = to_pixels_fused(image)
    assert out.shape == (2, cfg.channels, 5, 7) and out.is_contiguous(memory_format=torch.channels_last)
    assert pixels.shape == (2, 4, 5, 3) and pixels.dtype == torch.uint8
    (grid, block, cond, values), (_, _, pix, pix_values) = rec.calls
    assert grid * block >= 2 * 5 * 7
    assert cond == _param_sizes(loader.SOURCE_DIR / "condition.cu", "build_condition")
    assert pix == _param_sizes(loader.SOURCE_DIR / "pixels.cu", "to_pixels")
    buffers = (raster.mask, raster.depth, raster.canonical, raster.normals, tex.planes)
    assert values[:5] == tuple(t.data_ptr() for t in buffers)
    assert values[5] == (tex.ambient.data_ptr() if dims == 5 else None) and values[6] == out.data_ptr()
    assert values[7:13] == (2, 5 * 7, dims, 4, 6, 0)  # batch, H * W, dims, C, R, float32 texels
    assert values[13:20] == tex.planes.stride() + (tex.ambient.stride() if dims == 5 else (0, 0, 0))
    assert values[20] == 1  # channels_last
    ambient_box = (*cfg.ambient_min, *cfg.ambient_max) if dims == 5 else (0.0, 0.0, 1.0, 1.0)  # unread placeholders
    want = (cfg.depth_max, *cfg.canonical_min, *cfg.canonical_max, *ambient_box)
    assert values[21:] == pytest.approx(want, rel=1e-7)
    assert pix_values == (image.data_ptr(), pixels.data_ptr(), 0, 2, 4 * 5)


# -- CPU: the engine-side ops equal the twins -------------------------------------------------------------
@pytest.mark.parametrize("dims", [5, 3])
@pytest.mark.parametrize("channels_last", [True, False])
def test_condition_fallback_equals_reference(dims, channels_last):
    raster, tex, cfg = _case(dims=dims)
    with torch.no_grad():
        ref = build_condition(raster, tex, cfg).half()
    got = build_condition_fused(raster, tex, cfg, channels_last=channels_last)
    assert got.dtype == torch.float16 and got.shape == (2, cfg.channels, 5, 7)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert got.is_contiguous(memory_format=fmt)
    assert torch.equal(got, ref)
    out = torch.full_like(got, float("nan"))
    assert build_condition_fused(raster, tex, cfg, out=out, channels_last=channels_last) is out
    assert torch.equal(out, ref)


def test_packed_textures_keep_values_and_feed_the_fallback():
    raster, tex, cfg = _case(dims=5)
    packed = pack_textures(tex, torch.float16)
    assert isinstance(packed, PackedTextures)
    # _case: C = 4, R = 6; a texel's 4 features are adjacent.
    assert packed.planes.stride() == (6 * 6 * 4, 1, 6 * 4, 4)
    assert packed.ambient.stride() == (1, 6 * 4, 4)
    assert torch.equal(packed.planes.float(), tex.planes.detach().half().float())
    assert torch.equal(packed.ambient.float(), tex.ambient.detach().half().float())
    upcast = PackedTextures(packed.planes.float(), packed.ambient.float())
    with torch.no_grad():
        ref = build_condition(raster, upcast, cfg).half()
    assert torch.equal(build_condition_fused(raster, packed, cfg), ref)


def test_half_packed_twin_is_the_reference_within_half_rounding():
    """The stated tolerance of packed float16 textures: each texel rounds to half (relative error <= 2^-11), so a
    bilinear feature moves by at most 2^-11 max|texel|, and the result is rounded to half once more (2^-11 of
    it; rtol 2^-10 leaves room for float32 rounding)."""
    raster, tex, cfg = _case(dims=5, b=1, h=16, w=16, r=16, c=8, seed=2)
    with torch.no_grad():
        ref = build_condition(raster, tex, cfg)
    got = build_condition_fused(raster, pack_textures(tex, torch.float16), cfg)
    scale = max(tex.planes.abs().max().item(), tex.ambient.abs().max().item())
    torch.testing.assert_close(got.float(), ref, atol=1.01 * 2**-11 * scale, rtol=2**-10)


def test_pixels_fallback_equals_formula():
    g = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, 4, 5, generator=g) * 2.4 - 1.2
    ref = _to_pixels_formula(image)
    got = to_pixels_fused(image)
    assert got.dtype == torch.uint8 and got.shape == (2, 4, 5, 3) and got.is_contiguous()
    assert torch.equal(got, ref)
    out = torch.zeros(2, 4, 5, 3, dtype=torch.uint8)
    assert to_pixels_fused(image.half(), out=out) is out
    assert torch.equal(out, _to_pixels_formula(image.half()))
    assert torch.equal(to_pixels_fused(image), to_pixels(image))


# -- validation -------------------------------------------------------------------------------------------
def _with(raster, **changes):
    return SimpleNamespace(**{**vars(raster), **changes})


def test_condition_rejects_bad_inputs():
    raster, tex, cfg = _case(dims=5)
    raster3, tex3, cfg3 = _case(dims=3)
    cases = [
        (_with(raster, depth=raster.depth.double()), tex, cfg, {}, "float32"),
        (_with(raster, canonical=raster.canonical[..., :3].contiguous()), tex, cfg, {}, "shape"),
        (_with(raster, normals=raster.normals.transpose(1, 2).contiguous().transpose(1, 2)), tex, cfg, {},
         "contiguous"),
        (_with(raster, mask=None), tex, cfg, {}, "RasterBuffers"),
        (raster, PackedTextures(tex.planes, None), cfg, {}, "ambient"),
        (raster3, PackedTextures(tex3.planes, tex.ambient), cfg3, {}, "`ambient` must be None"),
        (raster, tex, ConditioningConfig(canonical_dims=5, texture_resolution=8, texture_channels=4), {}, "shape"),
        (raster, tex, cfg, {"out": torch.empty(2, cfg.channels, 5, 7, dtype=torch.float16)}, "channels_last"),
        (raster, tex, cfg, {"out": torch.empty(2, cfg.channels, 5, 7)}, "float16"),
        (raster, tex, cfg, {"out": torch.empty(2, cfg.channels, 5, 6, dtype=torch.float16)}, "shape"),
    ]  # fmt: skip
    for r, t, c, kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            build_condition_fused(r, t, c, **kwargs)
    nhwc = torch.empty(2, cfg.channels, 5, 7, dtype=torch.float16, memory_format=torch.channels_last)
    with pytest.raises(InputError, match="contiguous NCHW"):
        build_condition_fused(raster, tex, cfg, channels_last=False, out=nhwc)
    with pytest.raises(InputError, match="pack"):
        pack_textures(tex, torch.int8)


def _layout(cfg: ConditioningConfig, **changes) -> dict:
    lo = cfg.canonical_min + (cfg.ambient_min if cfg.has_ambient else ())
    hi = cfg.canonical_max + (cfg.ambient_max if cfg.has_ambient else ())
    layout = {
        "canonical_dims": cfg.canonical_dims,
        "texture_channels": cfg.texture_channels,
        "texture_resolution": cfg.texture_resolution,
        "depth_max": cfg.depth_max,
        "coord_min": lo,
        "coord_max": hi,
    }
    return {**layout, **changes}


@pytest.mark.parametrize("dims", [5, 3])
def test_kernel_entry_points_check_layout_numbers_and_want_cuda(dims):
    raster, tex, cfg = _case(dims=dims)
    args = (raster.mask, raster.depth, raster.canonical, raster.normals, tex.planes, tex.ambient)
    assert kernels.check_condition_args(*args, **_layout(cfg)) == (2, cfg.channels, 5, 7)
    lo = _layout(cfg)["coord_min"]
    for changes, message in [
        ({"canonical_dims": 4}, "`canonical_dims` must be 3"),
        ({"texture_channels": 0}, "must be positive"),
        ({"depth_max": 0.0}, "`depth_max`"),
        ({"depth_max": float("nan")}, "`depth_max`"),
        ({"coord_min": lo[:-1]}, "`coord_min` and `coord_max`"),
        ({"coord_max": lo}, "`coord_min` and `coord_max`"),
        ({"coord_max": (float("inf"),) * dims}, "`coord_min` and `coord_max`"),
    ]:
        with pytest.raises(InputError, match=message):
            kernels.check_condition_args(*args, **_layout(cfg, **changes))
    with pytest.raises(InputError, match="CUDA"):
        kernels.fused_condition(*args, **_layout(cfg))
    with pytest.raises(InputError, match="CUDA"):
        kernels.fused_pixels(torch.zeros(1, 3, 2, 2))
    assert kernels.check_pixels_args(torch.zeros(1, 3, 2, 4)) == (1, 2, 4)


def test_pixels_rejects_bad_inputs():
    with pytest.raises(InputError, match=r"\[B, 3, H, W\]"):
        to_pixels_fused(torch.zeros(1, 4, 2, 2))
    with pytest.raises(InputError, match=r"\[B, 3, H, W\]"):
        to_pixels_fused(None)
    with pytest.raises(InputError, match="float32"):
        to_pixels_fused(torch.zeros(1, 3, 2, 2, dtype=torch.float64))
    with pytest.raises(InputError, match="contiguous"):
        to_pixels_fused(torch.zeros(1, 2, 2, 3).permute(0, 3, 1, 2))
    with pytest.raises(InputError, match="uint8"):
        to_pixels_fused(torch.zeros(1, 3, 2, 2), out=torch.zeros(1, 2, 2, 3))
    with pytest.raises(InputError, match="shape"):
        to_pixels_fused(torch.zeros(1, 3, 2, 2), out=torch.zeros(1, 3, 2, 2, dtype=torch.uint8))


def test_not_available_without_gpu():
    if not torch.cuda.is_available():
        assert not ops.available()
