import os
import stat

import pytest

from engine.errors import InputError
from engine.files import atomic_path, check_writable, write_atomic


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("data, expected", [(b"\x00\x01bytes\xff", b"\x00\x01bytes\xff"),
                                            ("text \u00e9\n", "text \u00e9\n".encode("utf-8"))])
def test_write_atomic_writes_whole_content(tmp_path, data, expected):
    path = tmp_path / "new" / "sub" / "out.bin"  # missing parent folders are created
    assert write_atomic(path, data) == path
    assert path.read_bytes() == expected
    assert os.listdir(path.parent) == ["out.bin"]  # no temp file left behind


def test_write_atomic_replaces_an_existing_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old and longer")
    write_atomic(str(path), "new")
    assert path.read_text() == "new"
    assert os.listdir(tmp_path) == ["out.txt"]


@pytest.mark.skipif(os.name == "nt", reason="POSIX permission bits")
def test_final_file_has_the_mode_of_a_new_file(tmp_path):
    # mkstemp makes 0600 files; the result must be what open() would have made
    path = write_atomic(tmp_path / "out.json", "{}")
    assert _mode(path) == 0o666 & ~_umask()
    with atomic_path(tmp_path / "other.bin") as tmp:
        tmp.write_bytes(b"x")
    assert _mode(tmp_path / "other.bin") == 0o666 & ~_umask()


def test_atomic_path_yields_a_temp_beside_the_target(tmp_path):
    path = tmp_path / "clip.mp4"
    with atomic_path(path, suffix=".mp4") as tmp:
        assert tmp.parent == tmp_path and tmp.is_file() and not path.exists()
        assert tmp.name.startswith(".clip.mp4.") and tmp.name.endswith(".mp4")
        tmp.write_bytes(b"video")
    assert not tmp.exists() and path.read_bytes() == b"video"


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_error_keeps_the_old_file_and_removes_the_temp(tmp_path, error):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(type(error)):
        with atomic_path(path) as tmp:
            tmp.write_text("half-written")
            raise error
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]


def test_error_on_a_new_path_leaves_nothing(tmp_path):
    path = tmp_path / "out.txt"
    with pytest.raises(ValueError, match="bad data"):
        with atomic_path(path):
            raise ValueError("bad data")
    assert os.listdir(tmp_path) == []


def test_a_path_below_a_file_or_onto_a_folder_is_an_input_error(tmp_path):
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(InputError, match=rf"cannot write {tmp_path}/afile/x/out.txt: {tmp_path}/afile is a file, "
                                         r"not a folder \(choose a path outside it, or move the file away\)"):
        write_atomic(tmp_path / "afile" / "x" / "out.txt", "data")
    (tmp_path / "folder").mkdir()
    with pytest.raises(InputError, match=r"folder: it is a folder \(name a file, e.g. one inside it\)"):
        write_atomic(tmp_path / "folder", "data")
    with pytest.raises(InputError, match="a path cannot hold a NUL character"):
        write_atomic(tmp_path / "a\0b", "data")
    assert sorted(os.listdir(tmp_path)) == ["afile", "folder"] and not os.listdir(tmp_path / "folder")


def test_check_writable_creates_nothing(tmp_path):
    check_writable(tmp_path / "new" / "sub" / "out.mp4", "the video")  # missing folders are fine, and not made
    check_writable(tmp_path / "frames", "the frames", folder=True)
    assert os.listdir(tmp_path) == []
    (tmp_path / "out.mp4").write_bytes(b"old")
    check_writable(tmp_path / "out.mp4", "the video")  # an existing file may be replaced
    with pytest.raises(InputError, match="cannot write the frames .*out.mp4: it is a file, not a folder"):
        check_writable(tmp_path / "out.mp4", "the frames", folder=True)
    assert os.listdir(tmp_path) == ["out.mp4"]
