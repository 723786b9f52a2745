"""The project's exception types. Every error names the problem and the fix."""


class AvatarError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigError(AvatarError, ValueError):
    """A configuration, preset, sampler, backend or option is unknown or inconsistent."""


class InputError(AvatarError, ValueError):
    """A tensor or value handed to the engine has the wrong shape, range or content (NaN, Inf, ...)."""


class CheckpointError(AvatarError):
    """A checkpoint or avatar folder is missing files or tensors, or holds tensors of the wrong shape."""


class FormatError(AvatarError, ValueError):
    """A file on disk (sequence, mesh, dataset, results) is not in the documented format."""


class BackendError(AvatarError, RuntimeError):
    """A backend cannot run here (missing library, no GPU, unsupported setting)."""


class RangeWarning(UserWarning):
    """A camera or expression code lies outside what the avatar was trained on (`AvatarConfig.trained_on`): the
    frame is rendered anyway (a code is clamped into the range), at a quality the avatar was never checked for."""
