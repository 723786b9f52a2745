"""Reading triangle meshes from files: `.npz` (`Mesh.save`'s keys), `.ply` (ASCII or binary), `.obj`, and OpenCTM
`.ctm` written with the RAW or MG1 method (MG1 is libopenctm's default, and so what the release's `.CTM` files use).

`read_mesh_file(path) -> (vertices [V, 3] float32, faces [F, 3] int64)`. Anything unreadable raises FormatError
naming the file and a fix. OpenCTM's MG2 method is not read: convert such files with OpenCTM's tool,
`ctmconv in.ctm out.ply`, and put the `.ply` beside it (same stem).
"""

from __future__ import annotations

import lzma
import re
import struct
import zipfile
from pathlib import Path

import numpy as np

from ..errors import FormatError

MESH_SUFFIXES = (".ctm", ".ply", ".obj", ".npz")
_CTM_FIX = "convert it with OpenCTM's `ctmconv {name} {stem}.ply` and keep the .ply beside it"


def read_mesh_file(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(vertices [V, 3] float32, faces [F, 3] int64) of a mesh file; the suffix picks the reader."""
    path = Path(path)
    if not path.is_file():
        raise FormatError(f"mesh file {path} does not exist; check the path")
    readers = {".ctm": _read_ctm, ".ply": _read_ply, ".obj": _read_obj, ".npz": _read_npz}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise FormatError(f"{path}: unsupported mesh format {path.suffix!r}; use one of {list(MESH_SUFFIXES)}")
    try:
        v, f = reader(path)
    except (ValueError, IndexError, struct.error, lzma.LZMAError, EOFError, OSError, zipfile.BadZipFile) as e:
        if isinstance(e, FormatError):
            raise
        raise FormatError(f"mesh file {path} is corrupt or truncated ({type(e).__name__}: {e})") from e
    v = np.asarray(v, dtype=np.float32).reshape(-1, 3)
    f = np.asarray(f, dtype=np.int64).reshape(-1, 3)
    if len(f) and (f.min() < 0 or f.max() >= len(v)):
        raise FormatError(f"mesh file {path}: faces index vertices outside [0, {len(v)}); the file is corrupt")
    return v, f


# -- OpenCTM -------------------------------------------------------------------------------------
def _read_ctm(path: Path) -> tuple[np.ndarray, np.ndarray]:
    data = path.read_bytes()
    if data[:4] != b"OCTM":
        raise FormatError(f"{path} is not an OpenCTM file (no OCTM magic)")
    version, method, n_vert, n_tri, _n_uv, _n_attr, _flags = struct.unpack_from("<i4s5i", data, 4)
    if version != 5:
        raise FormatError(f"{path}: OpenCTM format version {version}, expected 5; "
                          + _CTM_FIX.format(name=path.name, stem=path.stem))
    (comment_len,) = struct.unpack_from("<I", data, 32)
    pos = 36 + comment_len
    method = method.rstrip(b"\0")
    if method == b"RAW":
        pos = _expect(data, pos, b"INDX", path)
        faces = np.frombuffer(data, "<u4", 3 * n_tri, pos).astype(np.int64)
        pos = _expect(data, pos + 12 * n_tri, b"VERT", path)
        vertices = np.frombuffer(data, "<f4", 3 * n_vert, pos)
        return vertices, faces
    if method == b"MG1":
        pos = _expect(data, pos, b"INDX", path)
        idx, pos = _packed(data, pos, n_tri, 3, path)
        faces = _restore_mg1_indices(idx.view("<u4").astype(np.int64).reshape(-1, 3))
        pos = _expect(data, pos, b"VERT", path)
        # Format v5 packs the vertex floats as one stream of 3V scalars (not 3 interleaved components).
        verts, _ = _packed(data, pos, 3 * n_vert, 1, path)
        return verts.view("<f4"), faces
    raise FormatError(f"{path}: OpenCTM method {method.decode(errors='replace')!r} is not supported (RAW and MG1 "
                      "are); " + _CTM_FIX.format(name=path.name, stem=path.stem))


def _expect(data: bytes, pos: int, tag: bytes, path: Path) -> int:
    if data[pos:pos + 4] != tag:
        raise FormatError(f"{path}: expected an OpenCTM {tag.decode()} block at byte {pos}; the file is corrupt")
    return pos + 4


def _packed(data: bytes, pos: int, count: int, size: int, path: Path) -> tuple[np.ndarray, int]:
    """Decode one MG1 packed array of `count` x `size` 32-bit words -> ([count * size] uint32 words, new pos).

    Layout: uint32 packed size, 5 LZMA property bytes (lc/lp/pb byte + dictionary size), then raw LZMA1 data. The
    decoded bytes are byte planes, most significant first: byte b (0 = LSB) of element i, component k sits at
    (3 - b) * count * size + k * count + i.
    """
    (packed_size,) = struct.unpack_from("<I", data, pos)
    props = data[pos + 4:pos + 9]
    payload = data[pos + 9:pos + 9 + packed_size]
    if len(props) < 5 or len(payload) < packed_size:
        raise FormatError(f"{path}: an OpenCTM packed block is truncated; the file is incomplete")
    d = props[0]
    lc, lp, pb = d % 9, (d // 9) % 5, d // 45
    (dict_size,) = struct.unpack("<I", props[1:5])
    filt = {"id": lzma.FILTER_LZMA1, "dict_size": max(dict_size, 4096), "lc": lc, "lp": lp, "pb": pb}
    n_bytes = 4 * count * size
    # The LZMA SDK writes no end marker: decode exactly n_bytes and ignore what is left.
    raw = lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=[filt]).decompress(payload, max_length=n_bytes)
    if len(raw) != n_bytes:
        raise FormatError(f"{path}: an OpenCTM packed block decodes to {len(raw)} bytes, expected {n_bytes}")
    planes = np.frombuffer(raw, np.uint8).reshape(4, size, count).astype(np.uint32)  # [byte plane, k, i]
    words = (planes[0] << 24) | (planes[1] << 16) | (planes[2] << 8) | planes[3]  # [k, i]
    return np.ascontiguousarray(words.T).reshape(-1), pos + 9 + packed_size


def _restore_mg1_indices(d: np.ndarray) -> np.ndarray:
    """Undo MG1's index deltas (OpenCTM's `_ctmRestoreIndices`) on [F, 3] int64, vectorised.

    Encoded: a[0] is the delta of the first index to the previous triangle's first index; a[2] is relative to the
    triangle's first index; a[1] is relative to the previous triangle's second index when both triangles share their
    first index, else to the first index. Indices are unsigned 32-bit, so sums wrap around.
    """
    mask = 0xFFFFFFFF
    if len(d) == 0:
        return d.copy()
    first = np.cumsum(d[:, 0]) & mask
    starts = np.flatnonzero(np.r_[True, first[1:] != first[:-1]])  # runs of triangles sharing their first index
    run = np.repeat(starts, np.diff(np.r_[starts, len(d)]))  # [F]: the start of each triangle's run
    inclusive = np.cumsum(d[:, 1])
    second = (first[run] + inclusive - (inclusive[run] - d[run, 1])) & mask
    third = (d[:, 2] + first) & mask
    return np.stack([first, second, third], axis=-1)


# -- PLY / OBJ / NPZ -----------------------------------------------------------------------------
_PLY_TYPES = {"char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2",
              "ushort": "u2", "uint16": "u2", "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
              "float": "f4", "float32": "f4", "double": "f8", "float64": "f8"}


def _read_ply(path: Path) -> tuple[np.ndarray, np.ndarray]:
    data = path.read_bytes()
    end = data.find(b"end_header")
    if not data.startswith(b"ply") or end < 0:
        raise FormatError(f"{path} is not a PLY file (no 'ply' magic or 'end_header')")
    header = data[:end].decode("ascii", errors="replace").splitlines()
    body_start = data.index(b"\n", end) + 1
    fmt, elements = None, []  # [(name, count, [(prop name, dtype | (count dtype, item dtype))])]
    for line in header:
        tok = line.split()
        if not tok:
            continue
        if tok[0] == "format":
            fmt = tok[1]
        elif tok[0] == "element":
            elements.append((tok[1], int(tok[2]), []))
        elif tok[0] == "property" and elements:
            if tok[1] == "list":
                elements[-1][2].append((tok[4], (_PLY_TYPES[tok[2]], _PLY_TYPES[tok[3]])))
            else:
                elements[-1][2].append((tok[2], _PLY_TYPES[tok[1]]))
    if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
        raise FormatError(f"{path}: unsupported PLY format {fmt!r}")
    end_char = "<" if fmt == "binary_little_endian" else ">"
    out: dict[str, dict[str, np.ndarray]] = {}
    if fmt == "ascii":
        values = data[body_start:].split()
        pos = 0
        for name, count, props in elements:
            cols: dict[str, list] = {p: [] for p, _ in props}
            for _ in range(count):
                for p, t in props:
                    if isinstance(t, tuple):
                        n = int(values[pos])
                        cols[p].append([float(x) for x in values[pos + 1:pos + 1 + n]])
                        pos += 1 + n
                    else:
                        cols[p].append(float(values[pos]))
                        pos += 1
            out[name] = {p: np.asarray(c) for p, c in cols.items()}
    else:
        pos = body_start
        for name, count, props in elements:
            if all(not isinstance(t, tuple) for _, t in props):  # fixed-size rows: one structured read
                dt = np.dtype([(p, end_char + t) for p, t in props])
                arr = np.frombuffer(data, dt, count, pos)
                pos += dt.itemsize * count
                out[name] = {p: arr[p] for p, _ in props}
                continue
            cols = {p: [] for p, _ in props}
            for _ in range(count):
                for p, t in props:
                    if isinstance(t, tuple):
                        n = int(np.frombuffer(data, end_char + t[0], 1, pos)[0])
                        pos += np.dtype(t[0]).itemsize
                        cols[p].append(np.frombuffer(data, end_char + t[1], n, pos))
                        pos += np.dtype(t[1]).itemsize * n
                    else:
                        cols[p].append(np.frombuffer(data, end_char + t, 1, pos)[0])
                        pos += np.dtype(t).itemsize
            out[name] = {p: np.asarray(c) for p, c in cols.items()}
    vert = out.get("vertex", {})
    if not all(k in vert for k in "xyz"):
        raise FormatError(f"{path}: the PLY file has no vertex x, y, z properties")
    vertices = np.stack([vert["x"], vert["y"], vert["z"]], axis=-1)
    face = out.get("face", {})
    lists = face.get("vertex_indices", face.get("vertex_index"))
    if lists is None:
        raise FormatError(f"{path}: the PLY file has no face vertex_indices")
    return vertices, _triangulate([np.asarray(f, dtype=np.int64).reshape(-1) for f in lists], path)


def _read_obj(path: Path) -> tuple[np.ndarray, np.ndarray]:
    verts, polys = [], []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("v "):
            verts.append([float(x) for x in line.split()[1:4]])
        elif line.startswith("f "):
            idx = [int(re.split("/", tok)[0]) for tok in line.split()[1:]]
            polys.append(np.asarray([i - 1 if i > 0 else len(verts) + i for i in idx], dtype=np.int64))
    return np.asarray(verts, dtype=np.float64).reshape(-1, 3), _triangulate(polys, path)


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        if "vertices" not in z.files or "faces" not in z.files:
            raise FormatError(f"{path}: a mesh .npz needs arrays 'vertices' [V, 3] and 'faces' [F, 3], "
                              f"has {sorted(z.files)}")
        return z["vertices"], z["faces"]


def _triangulate(polys: list[np.ndarray], path: Path) -> np.ndarray:
    """Fan-triangulate polygons (lists of >= 3 indices) into [F, 3] int64."""
    tris = []
    for p in polys:
        if len(p) < 3:
            raise FormatError(f"{path}: a face has {len(p)} vertices; faces need at least 3")
        tris.extend([p[0], p[k], p[k + 1]] for k in range(1, len(p) - 1))
    return np.asarray(tris, dtype=np.int64).reshape(-1, 3)
