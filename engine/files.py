"""File I/O shared by every format: atomic writes (a file appears under its name whole, or not at all), reading
`.npz` archives with clear errors, and checking a loaded state dict against the one a model expects.

Data is written to a temporary file in the target's own folder and then renamed onto the target with `os.replace`
(a rename within one filesystem is atomic on POSIX and Windows), and the temporary file is removed if anything
fails. So a reader never sees a half-written file, and an interrupted write leaves any earlier file unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .errors import CheckpointError, FormatError, InputError


def _read_umask() -> int:
    """The process umask. It can only be read by setting it, so it is set straight back; this runs once, at
    import, because the umask is process-wide and changing it around every write could race with other threads."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


# The mode `open()` gives a new file. mkstemp creates its file 0600 (private), which would otherwise stick to
# every file written here.
FILE_MODE = 0o666 & ~_read_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `path`; when the block ends without an exception the file is renamed onto
    `path`, with the normal mode of a new file. On any exception it is removed and the exception re-raised, and
    `path` is left as it was.

    The temporary file already exists (empty), so the block may open it or hand its name to a library. `suffix` is
    for libraries that pick a format by extension. The temporary name starts with `.<name>.`, so it is hidden and
    shows what it belongs to. Missing parent folders are created.
    """
    path = Path(path)
    tmp = temp_beside(path, suffix)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def temp_beside(path: Path, suffix: str = "", folder: bool = False) -> Path:
    """Create an empty temporary file (or folder) `.<name>.XXXX<suffix>` beside `path`, and any missing parent
    folders; InputError saying why (see `check_writable`) when it cannot be created there, or when a file is to
    replace a folder."""
    if not folder and os.path.isdir(path):
        raise InputError(_unwritable(path, str(path), folder))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if folder:
            return Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix))
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    except (OSError, ValueError) as e:  # ValueError: a NUL character in the path
        raise InputError(_unwritable(path, str(path), folder) or f"cannot write {path!r} ({e})") from e
    os.close(fd)
    return Path(name)


def check_writable(path: str | os.PathLike, what: str, folder: bool = False) -> None:
    """InputError unless `what` (e.g. "the video") can be written at `path`, as a file (folder=False) or a folder.

    An existing file (folder: an existing folder) at `path` may be replaced. Nothing is left behind: a probe file
    is created and removed, and missing parent folders are not created. Run it before long work whose result goes
    to `path`."""
    reason = _unwritable(Path(path), f"{what} {path}", folder)
    if reason:
        raise InputError(reason)


def _unwritable(path: Path, name: str, folder: bool) -> str | None:
    """Why `name` cannot be written at `path` (a message with its fix), or None if it can."""
    if "\0" in str(path):
        return f"cannot write {name!r}: a path cannot hold a NUL character (choose another path)"
    if folder and os.path.exists(path) and not os.path.isdir(path):
        return f"cannot write {name}: it is a file, not a folder (choose another path, or move the file away)"
    if not folder and os.path.isdir(path):
        return f"cannot write {name}: it is a folder (name a file, e.g. one inside it)"
    base = path.absolute().parent
    while not os.path.exists(base):
        base = base.parent
    if not os.path.isdir(base):
        return f"cannot write {name}: {base} is a file, not a folder (choose a path outside it, or move the file away)"
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".write-check.")
    except OSError as e:
        return f"cannot write {name}: {base} is not writable: {e.strerror} (choose a writable folder)"
    os.close(fd)
    os.unlink(probe)
    return None


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write `data` to `path` atomically (see `atomic_path`); a str is written as UTF-8. Returns the path."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def read_npz(path: str | os.PathLike, fix: str) -> dict[str, np.ndarray]:
    """Every array of an `.npz` file, read whole; a missing or unreadable file is a FormatError ending in `fix`."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"{path} does not exist; {fix}")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise FormatError(f"{path} is not a readable .npz ({e}); {fix}") from e


def read_json(path: str | Path, fix: str, error: type[Exception] = FormatError):
    """The JSON document in `path`; `error` (FormatError by default) naming the file, the reason and `fix` when it
    cannot be read or parsed."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path} is not readable JSON ({e}); {fix}") from e


def check_state_dict(expected: dict, got: dict, source: str) -> None:
    """CheckpointError naming the first missing / unexpected keys, or the first tensor of the wrong shape."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    for what, keys in (("is missing", missing), ("has unexpected", unexpected)):
        if keys:
            more = f" and {len(keys) - 5} more" if len(keys) > 5 else ""
            raise CheckpointError(f"{source} {what} tensor(s) {keys[:5]}{more}; it was written for another avatar "
                                  "config or is damaged: save or export it again with this engine")
    for key, ref in expected.items():
        if tuple(got[key].shape) != tuple(ref.shape):
            raise CheckpointError(f"{source}: tensor {key} has shape {tuple(got[key].shape)}, expected "
                                  f"{tuple(ref.shape)}; the checkpoint does not match the avatar config")
