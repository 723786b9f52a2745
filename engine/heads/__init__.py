"""Head models: an expression code -> a posed `Mesh` with per-vertex canonical coordinates.

`load_head_model(spec, root)` builds one from a spec string, `kind[:argument]`, through a registry that later
modules extend with `register_head_model(kind, factory)`:
- `"builtin:head"`: `StaticHead` of `builtin_head_mesh()`.
- `"mesh:<file.npz>"`: `StaticHead` of a mesh file (`Mesh.save` format), relative to `root` (the avatar folder).
- `"learned:<file.npz>"`: `LearnedHead` (`engine.heads.learned`), a person's code -> mesh map fitted on tracked
  frames by `avatar fit-head`, relative to `root`.
- `"nphm:<head.json>"`: `NphmHead` (`engine.heads.nphm`), the NPHM tracking model's backward field inverted per
  vertex of a fixed template (GPU-scale).
- `"synthetic[:<version>]"`: the procedural, rigged head of `engine.data.synthetic` (ARKit-named code).
- `"none"`: no head model (returns None), for avatars driven by pre-rendered buffers.
Kinds registered with `file_argument=True` (`mesh`, `learned`) name a file in the avatar folder: `head_file` finds
it, and `Avatar.save_pretrained` copies it along.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

import torch

from ..errors import ConfigError
from ..geometry import Mesh
from .builtin import builtin_head_mesh


@runtime_checkable
class HeadModel(Protocol):
    """Anything with a `name` and `posed_mesh(expression [E] float32) -> Mesh`.

    A head model whose rig is defined only on a range of code values says so with an optional attribute
    `code_range = (low, high)` (every dimension; `posed_mesh` clamps to it, as the synthetic head's [0, 1]): the
    renderer then clamps the code it turns into expression tokens the same way (`code_range(head)`)."""

    name: str

    def posed_mesh(self, expression: torch.Tensor) -> Mesh: ...


class StaticHead:
    """A head model that ignores the expression and returns its one fixed mesh (normals precomputed)."""

    def __init__(self, mesh: Mesh, name: str = "static"):
        if not isinstance(mesh, Mesh):
            raise ConfigError(f"StaticHead needs a Mesh, got {type(mesh).__name__}")
        if mesh.normals is None:
            mesh = Mesh(mesh.vertices, mesh.faces, mesh.canonical, normals=mesh.vertex_normals())
        self.mesh = mesh
        self.name = name

    def posed_mesh(self, expression: torch.Tensor | None = None) -> Mesh:
        return self.mesh

    def to(self, device: torch.device | str) -> "StaticHead":
        """This head with its mesh on `device` (moved once, not per frame)."""
        return StaticHead(self.mesh.to(device), self.name)

    def __repr__(self) -> str:
        return f"StaticHead(name={self.name!r}, mesh={self.mesh!r})"


def code_range(head: HeadModel | None) -> tuple[float, float] | None:
    """The head model's declared `code_range` (low, high), or None (it takes any code)."""
    bounds = getattr(head, "code_range", None)
    if bounds is None:
        return None
    low, high = (float(b) for b in bounds)
    if not low <= high:
        raise ConfigError(f"head model {getattr(head, 'name', head)!r} declares code_range {bounds!r}; "
                          "it needs low <= high")
    return low, high


# kind -> factory(argument, root) -> HeadModel | None
HeadFactory = Callable[[str, "Path | None"], "HeadModel | None"]
_REGISTRY: dict[str, HeadFactory] = {}
_FILE_KINDS: set[str] = set()


def register_head_model(kind: str, factory: HeadFactory, file_argument: bool = False) -> None:
    """Make `load_head_model("<kind>[:argument]")` call `factory(argument, root)`. Re-registering replaces.
    `file_argument`: the argument is a file relative to the avatar folder (see `head_file`)."""
    if not kind or ":" in kind or kind != kind.strip():
        raise ConfigError(f"a head model kind must be a non-empty name without ':' or spaces, got {kind!r}")
    _REGISTRY[kind] = factory
    _FILE_KINDS.discard(kind)
    if file_argument:
        _FILE_KINDS.add(kind)


def head_model_kinds() -> list[str]:
    """The registered kinds (plus 'none')."""
    return sorted([*_REGISTRY, "none"])


def load_head_model(spec: str, root: Path | str | None = None) -> HeadModel | None:
    """The head model named by `spec` (`kind[:argument]`, see the module docstring); `root` resolves relative
    file arguments (the avatar folder; the working directory when None). `"none"` gives None."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"a head model spec must be a non-empty string like 'builtin:head', got {spec!r}")
    spec = spec.strip()
    if spec == "none":
        return None
    kind, _, arg = spec.partition(":")
    if kind not in _REGISTRY:
        raise ConfigError(f"unknown head model {spec!r}: kind {kind!r} is not one of {head_model_kinds()}")
    return _REGISTRY[kind](arg, None if root is None else Path(root))


def _builtin(arg: str, root: Path | None) -> HeadModel:
    if arg != "head":
        raise ConfigError(f"unknown built-in head {arg!r}; the built-in head model is 'builtin:head'")
    return StaticHead(builtin_head_mesh(), name="builtin:head")


def head_file(spec: str, root: Path | str | None = None) -> Path | None:
    """The file of a file-backed head model spec such as `mesh:<file>` (a relative file resolves against `root`, the
    avatar folder; the working directory when None), or None for a spec of another kind. Whether the file exists is
    not checked."""
    kind, _, arg = spec.strip().partition(":")
    if kind not in _FILE_KINDS:
        return None
    if not arg:
        raise ConfigError(f"'{kind}:' needs a file, e.g. '{kind}:head.npz' (relative to the avatar folder)")
    path = Path(arg)
    return Path(root) / path if root is not None and not path.is_absolute() else path


def _static_mesh(arg: str, root: Path | None) -> HeadModel:
    return StaticHead(Mesh.load(head_file(f"mesh:{arg}", root)), name=f"mesh:{arg}")


def _synthetic(arg: str, root: Path | None) -> HeadModel:
    from ..data.synthetic import synthetic_head  # lazy: engine.data builds on this package

    return synthetic_head(arg)


def _learned(arg: str, root: Path | None) -> HeadModel:
    from .learned import learned_head

    return learned_head(arg, root)


def _nphm(arg: str, root: Path | None) -> HeadModel:
    from .nphm import nphm_head

    return nphm_head(arg, root)


register_head_model("builtin", _builtin)
register_head_model("nphm", _nphm, file_argument=True)
register_head_model("learned", _learned, file_argument=True)
register_head_model("mesh", _static_mesh, file_argument=True)
register_head_model("synthetic", _synthetic)

__all__ = [
    "HeadModel",
    "StaticHead",
    "builtin_head_mesh",
    "code_range",
    "load_head_model",
    "head_file",
    "register_head_model",
    "head_model_kinds",
]
