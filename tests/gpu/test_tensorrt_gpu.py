"""`avatar export --to tensorrt` and the `tensorrt` backend with TensorRT itself (skipped without TensorRT or CUDA;
never run on this project's machines, where TensorRT cannot be installed).

The tiny preset, exported to ONNX in float32 and float16, built into engines, frames rendered against the float32
torch reference with the same fixed noise: float32 engines PSNR >= 40 dB (TensorRT may use TF32), float16 engines
>= 30 dB; a second build keeps every engine; the frame is captured in a CUDA graph and replayed.
"""

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.tensorrt,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
tensorrt = pytest.importorskip("tensorrt", reason="needs TensorRT: pip install 'diffusion-avatars-engine[tensorrt]'")


def _psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


@pytest.mark.parametrize("dtype,floor", [("float32", 40), ("float16", 30)])
def test_tiny_engines_match_the_reference(tiny_avatar, tmp_path, dtype, floor):
    from engine.renderer import Renderer
    from engine.sequence import orbit
    from export.onnx import export_onnx
    from export.tensorrt_build import build_engines

    export_onnx(tiny_avatar, tmp_path / "onnx", dtype=dtype, verify=False)
    built = build_engines(tmp_path / "onnx", tmp_path / "trt")
    assert not any(g["kept"] for g in built["graphs"].values())
    again = build_engines(tmp_path / "onnx", tmp_path / "trt")
    assert all(g["kept"] for g in again["graphs"].values()) and (tmp_path / "trt" / "timing.cache").stat().st_size
    ref = Renderer(tiny_avatar, device="cuda", sampler="ddim", steps=4, backend="reference")
    fast = Renderer(tiny_avatar, device="cuda", sampler="ddim", steps=4, backend="tensorrt",
                    backend_options={"engines": tmp_path / "trt"})
    frames = orbit(tiny_avatar.config, frames=3)[:2]
    for f in frames:
        psnr = _psnr(ref.render(f.camera, f.expression), fast.render(f.camera, f.expression))
        print(f"[tensorrt psnr] tiny {dtype} ddim 4: {psnr:.1f} dB")
        assert psnr >= floor
    assert fast.backend.graphs and fast.backend._graph is not None, "the frame was not captured in a CUDA graph"
