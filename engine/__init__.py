"""DiffusionAvatars inference engine: `Avatar` (the model) and `Renderer` (frames), plus geometry and formats."""

from .config import AvatarConfig, from_preset
from .errors import AvatarError, BackendError, CheckpointError, ConfigError, FormatError, InputError
from .recipe import Recipe

__all__ = [
    "Avatar", "AvatarConfig", "AvatarError", "BackendError", "Camera", "CheckpointError", "ConfigError",
    "FormatError", "Frame", "InputError", "Mesh", "Recipe", "Renderer", "from_preset", "rasterize",
]


def __getattr__(name):
    # Lazy so that `import engine` (and the CLI's --help) stays fast and torch-free until needed.
    if name == "Avatar":
        from .model import Avatar
        return Avatar
    if name == "Renderer":
        from .renderer import Renderer
        return Renderer
    if name == "Frame":
        from .frame import Frame
        return Frame
    if name in ("Camera", "Mesh"):
        from . import geometry
        return getattr(geometry, name)
    if name == "rasterize":
        from .raster import rasterize
        return rasterize
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
