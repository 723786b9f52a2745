"""The project's top-level `kernels` package must not make diffusers believe the registry's `kernels` is installed.

diffusers probes `kernels` (the Hugging Face kernel-hub package) once, at import, in
`diffusers/utils/import_utils.py`: `_is_package_available("kernels")` is `importlib.util.find_spec("kernels") is not
None` (True with this project installed: it is our folder) and then `importlib.metadata.version("kernels")`, a
distribution *named* `kernels`; this project's distribution is `diffusion-avatars-engine`, so that raises
`PackageNotFoundError` and the probe is False. (Were the probe True, diffusers' attention dispatch and quantizers
would `from kernels import get_kernel` and fail on our package.) Its `packages_distributions()`-style map, which
does attribute the top-level name `kernels` to `diffusion-avatars-engine`, is only consulted with
`get_dist_name=True`, which diffusers 0.42 does not pass for `kernels`. transformers (a dev dependency) has the same
probe, with a fallback through that map (it finds version 0.1.0, ours), so only its version window
(`KERNELS_MIN_VERSION` .. `KERNELS_MAX_VERSION`) keeps it False: checked too, where transformers is installed.

Both installs are checked in a fresh interpreter (the probes are cached at import): editable (the checkout first on
`sys.path`, the venv's editable metadata), and a wheel of this checkout installed with `pip --target` into a temp
folder, run with `python -S` on a view of site-packages without the editable install, the checkout not importable.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import importlib.metadata as md, importlib.util, json
out = {"kernels": importlib.util.find_spec("kernels").origin, "engine": importlib.util.find_spec("engine").origin}
dist = md.distribution("diffusion-avatars-engine")
out["dist"] = str(dist.locate_file(""))
out["dist_top_level"] = (dist.read_text("top_level.txt") or "").split()
try:
    out["kernels_distribution"] = md.version("kernels")
except md.PackageNotFoundError:
    out["kernels_distribution"] = None
from diffusers.utils import is_kernels_available
out["diffusers"] = is_kernels_available()
if importlib.util.find_spec("transformers") is not None:
    from transformers.utils import is_kernels_available as transformers_probe
    out["transformers"] = transformers_probe()
print("PROBE " + json.dumps(out))
"""


def _run(cmd, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{cmd[:6]} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def _probe(args, cwd):
    """Run PROBE in a fresh interpreter (no PYTHONPATH) -> its JSON."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = _run([sys.executable, *args], cwd=cwd, env=env)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")][-1]
    return json.loads(line[len("PROBE "):])


def _check(out, root: Path):
    # The situation the probe must survive: `kernels` resolves, to this project's package.
    assert Path(out["kernels"]).is_relative_to(root) and Path(out["engine"]).is_relative_to(root), out
    assert "kernels" in out["dist_top_level"], out
    assert out["diffusers"] is False, f"diffusers.utils.is_kernels_available() is True with this project: {out}"
    assert out.get("transformers", False) is False, f"transformers' is_kernels_available() is True: {out}"
    assert out["kernels_distribution"] is None, f"a distribution named 'kernels' is installed: {out}"


def test_probe_is_false_with_the_checkout_importable():
    """Editable / source checkout: the checkout's `kernels` first on sys.path, the installed metadata of the
    project (the venv's editable install) visible. ~6 s (importing diffusers)."""
    out = _probe(["-c", PROBE], cwd=ROOT)
    _check(out, ROOT)


def _package_dirs() -> list[str]:
    """Top-level folders the wheel packages (pyproject's `packages.find.include`, e.g. "kernels*" -> kernels)."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted({p.rstrip("*").rstrip(".").split(".")[0] for p in include})


@pytest.mark.slow  # ~12 s on 2 busy cores: wheel build (~3 s), pip install --target (~1 s), a fresh interpreter
def test_probe_is_false_with_the_wheel_installed(tmp_path):
    """Non-editable: a wheel of this checkout (pip wheel --no-deps --no-build-isolation), installed with
    `pip install --target`; the probe runs with `python -S` on [target, site-packages minus the editable
    install], from an empty folder, so neither the checkout nor the editable finder can supply `kernels`."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in _package_dirs():
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    wheels, target = tmp_path / "wheels", tmp_path / "target"
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", "--no-input"]
    _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(wheels), str(src)])
    (wheel,) = wheels.glob("diffusion_avatars_engine-*.whl")
    _run([*pip, "install", "--no-deps", "--no-index", "--no-compile", "--target", str(target), str(wheel)])
    assert (target / "kernels" / "__init__.py").is_file()

    # site-packages (where diffusers is) without any install of this project.
    site = Path(importlib.util.find_spec("diffusers").origin).parents[1]
    ours = {"engine", "export", "kernels", "benchmarks"}
    view = tmp_path / "site"
    view.mkdir()
    for entry in site.iterdir():
        name = entry.name
        if name.startswith(("__editable__", "diffusion_avatars_engine")) or name in ours:
            continue
        (view / name).symlink_to(entry)
    empty = tmp_path / "cwd"
    empty.mkdir()
    head = f"import sys; sys.path[1:1] = [{str(target)!r}, {str(view)!r}]\n"
    out = _probe(["-S", "-c", head + PROBE], cwd=empty)
    _check(out, target)
    assert Path(out["dist"]).is_relative_to(target), out
