"""From tracker output to an avatar's inputs: `ExpressionMap` (-> expression code) and `camera_from_pose` (-> camera).

Two kinds of map:
- `"names"`: for avatars whose code is ARKit-named (the synthetic rig, the `tiny` preset): each code dimension
  takes the tracker coefficient of the same name, clamped to [0, 1].
- `"ridge"`: for any other avatar: a ridge regression `code = features @ weights + bias`, fitted in closed form on
  the avatar's own training frames (`avatar fit-driver`). Features are the tracker's coefficient vector
  (`features="coefficients"`, [len(COEFFICIENTS)]) or its pose-normalised landmark offsets
  (`features="landmarks"`, [478 * 3]).

File format (`.npz`, version 1, written by `save`, read by `load`; strings are numpy unicode arrays, no pickles):
    format "diffusion-avatars-expression-map", version 1, kind "names"|"ridge", features "coefficients"|"landmarks",
    target_dim (int), target_names [E] str (empty when the code is unnamed), weights [F, E] float32 and
    bias [E] float32 (ridge only; empty for names), alpha (float), metrics (a JSON string: the fit's report).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from ..errors import ConfigError, FormatError, InputError
from ..files import atomic_path, read_npz
from ..geometry import Camera
from .face_math import COEFFICIENTS, NUM_LANDMARKS, HeadPose, TrackResult

FORMAT = "diffusion-avatars-expression-map"
VERSION = 1
KINDS = ("names", "ridge")
FEATURES = {"coefficients": len(COEFFICIENTS), "landmarks": NUM_LANDMARKS * 3}
# Viewer frame (x right, y up, z toward the camera) <-> OpenCV camera axes (x right, y down, z forward).
_FLIP = np.diag([1.0, -1.0, -1.0])


def ridge_fit(X: np.ndarray, Y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form ridge regression with an unpenalised intercept: X [N, F], Y [N, E] -> (W [F, E], b [E]).

    Minimises |X W + b - Y|^2 + alpha |W|^2 (float64 inside), in the dual form when F > N.
    """
    X, Y = np.asarray(X, np.float64), np.asarray(Y, np.float64)
    if X.ndim != 2 or Y.ndim != 2 or len(X) != len(Y) or len(X) < 2:
        raise InputError(f"ridge_fit needs X [N, F] and Y [N, E] with the same N >= 2, got {X.shape}, {Y.shape}")
    if alpha <= 0:
        raise InputError(f"the ridge penalty alpha must be > 0, got {alpha}")
    mx, my = X.mean(0), Y.mean(0)
    Xc, Yc = X - mx, Y - my
    n, f = Xc.shape
    if f <= n:
        W = np.linalg.solve(Xc.T @ Xc + alpha * np.eye(f), Xc.T @ Yc)
    else:
        W = Xc.T @ np.linalg.solve(Xc @ Xc.T + alpha * np.eye(n), Yc)
    return W.astype(np.float32), (my - mx @ W).astype(np.float32)


class ExpressionMap:
    """Tracker output -> an avatar's expression code [E] float32 (see the module docstring).

    Build with `by_name(names)`, `fit(features, codes, ...)`, `for_avatar(config, path)` or `load(path)`.
    """

    def __init__(self, kind: str, target_dim: int, target_names=None, features: str = "coefficients",
                 weights: np.ndarray | None = None, bias: np.ndarray | None = None, alpha: float = 0.0,
                 metrics: dict | None = None):
        if kind not in KINDS:
            raise ConfigError(f"unknown expression map kind {kind!r}; use one of {KINDS}")
        if features not in FEATURES:
            raise ConfigError(f"unknown map features {features!r}; use one of {sorted(FEATURES)}")
        self.kind, self.features, self.target_dim = kind, features, int(target_dim)
        self.target_names = tuple(target_names) if target_names else None
        if self.target_names is not None and len(self.target_names) != self.target_dim:
            raise ConfigError(f"{len(self.target_names)} target names for a {self.target_dim}-value code")
        self.alpha, self.metrics = float(alpha), dict(metrics or {})
        if kind == "names":
            missing = [n for n in self.target_names or () if n not in COEFFICIENTS]
            if self.target_names is None or missing:
                raise ConfigError(
                    f"a by-name map needs a code whose every dimension is a tracker coefficient; "
                    f"{missing or 'the code is unnamed'} {'is' if len(missing) == 1 else 'are'} not among "
                    f"{list(COEFFICIENTS)}; fit a ridge map instead (`avatar fit-driver`)"
                )
            self._index = np.array([COEFFICIENTS.index(n) for n in self.target_names])
            self.weights = self.bias = None
        else:
            W, b = np.asarray(weights, np.float32), np.asarray(bias, np.float32)
            if W.shape != (FEATURES[features], self.target_dim) or b.shape != (self.target_dim,):
                raise ConfigError(f"a ridge map from {features} to {self.target_dim} values needs weights "
                                  f"[{FEATURES[features]}, {self.target_dim}] and bias [{self.target_dim}], got "
                                  f"{list(W.shape)} and {list(b.shape)}")
            if not (np.isfinite(W).all() and np.isfinite(b).all()):
                raise ConfigError("the ridge map's weights hold NaN/Inf; refit it with a larger alpha")
            self.weights, self.bias = W, b

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def by_name(cls, names) -> "ExpressionMap":
        """Each code dimension named `names[i]` takes the tracker coefficient of that name (clamped to [0, 1])."""
        return cls("names", len(names), names)

    @classmethod
    def fit(cls, features: np.ndarray, codes: np.ndarray, alpha: float = 1.0, kind: str = "coefficients",
            target_names=None, metrics: dict | None = None) -> "ExpressionMap":
        """A ridge map fitted on features [N, F] (see `feature_vector`) and codes [N, E]."""
        W, b = ridge_fit(features, codes, alpha)
        return cls("ridge", W.shape[1], target_names, kind, W, b, alpha, metrics)

    @classmethod
    def for_avatar(cls, config, path: str | os.PathLike | None = None) -> "ExpressionMap":
        """The map for an avatar config: the file at `path` if given, else by name when the code is ARKit-named."""
        if path is not None:
            m = cls.load(path)
            if m.target_dim != config.expression_dim:
                raise ConfigError(f"map {path} produces {m.target_dim}-value codes but avatar {config.name!r} takes "
                                  f"{config.expression_dim}; fit one for this avatar with `avatar fit-driver`")
            return m
        names = config.expression_names
        if not names or any(n not in COEFFICIENTS for n in names):
            raise ConfigError(
                f"avatar {config.name!r} has an expression code the tracker cannot name ({config.expression_dim} "
                "values" + (", unnamed" if not names else "") + "); fit a map on its training data with `avatar "
                "fit-driver --avatar A --data DIR --out map.npz` and pass it with --map map.npz"
            )
        return cls.by_name(names)

    # -- use -------------------------------------------------------------------------------------
    def feature_vector(self, result: TrackResult) -> np.ndarray:
        """This map's features of one tracked frame: [F] float32."""
        return feature_vector(result, self.features)

    def map_features(self, features: np.ndarray) -> np.ndarray:
        """Features [N, F] (or [F]) -> codes [N, E] (or [E]) float32."""
        X = np.asarray(features, np.float32)
        if X.shape[-1] != FEATURES[self.features]:
            raise InputError(f"this map takes {FEATURES[self.features]} {self.features} features, got {X.shape[-1]}")
        if self.kind == "names":
            return np.clip(X[..., self._index], 0.0, 1.0).astype(np.float32)
        return (X @ self.weights + self.bias).astype(np.float32)

    def __call__(self, result: TrackResult) -> np.ndarray:
        """One tracked frame -> the avatar's code [E] float32."""
        return self.map_features(self.feature_vector(result))

    def neutral_code(self) -> np.ndarray:
        """[E] float32: the code of the neutral face (all features zero), used before the first tracked frame."""
        return self.map_features(np.zeros(FEATURES[self.features], np.float32))

    # -- file ------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the map (see the module docstring), atomically."""
        path = Path(path)
        empty = np.zeros(0, np.float32)
        arrays = dict(
            format=np.array(FORMAT), version=np.array(VERSION), kind=np.array(self.kind),
            features=np.array(self.features), target_dim=np.array(self.target_dim),
            target_names=np.array(self.target_names or [], dtype=str), alpha=np.array(self.alpha),
            weights=empty if self.weights is None else self.weights, bias=empty if self.bias is None else self.bias,
            metrics=np.array(json.dumps(self.metrics)),
        )
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ExpressionMap":
        path = Path(path)
        d = read_npz(path, f"write one with `avatar fit-driver --out {path}`")
        if str(d.get("format", "")) != FORMAT:
            raise FormatError(f"{path} is not an expression map (no \"format\": {FORMAT!r}); refit it")
        if int(d.get("version", 0)) > VERSION:
            raise FormatError(f"{path} has map version {int(d['version'])}, newer than this engine's ({VERSION}); "
                              "upgrade the engine")
        try:
            names = [str(n) for n in d["target_names"]]
            kind = str(d["kind"])
            return cls(kind, int(d["target_dim"]), names or None, str(d["features"]),
                       d["weights"] if kind == "ridge" else None, d["bias"] if kind == "ridge" else None,
                       float(d["alpha"]), json.loads(str(d["metrics"])))
        except (KeyError, ValueError, ConfigError) as e:
            raise FormatError(f"{path} is not a valid expression map ({e}); refit it with `avatar fit-driver`") from e

    def __repr__(self) -> str:
        return f"ExpressionMap(kind={self.kind!r}, features={self.features!r}, target_dim={self.target_dim})"


def feature_vector(result: TrackResult, features: str = "coefficients") -> np.ndarray:
    """A tracked frame's features: the coefficient vector [18] or the flattened landmark offsets [1434], float32."""
    if features == "coefficients":
        return np.asarray(result.vector, np.float32)
    if features == "landmarks":
        return np.asarray(result.offsets, np.float32).reshape(-1)
    raise ConfigError(f"unknown map features {features!r}; use one of {sorted(FEATURES)}")


def camera_from_pose(pose: HeadPose, base_camera: Camera, centre=(0.0, 0.0, 0.0)) -> Camera:
    """The camera that shows the avatar's head turned by `pose` as seen from `base_camera`.

    The base camera orbits the head centre `centre` (world, metres) by the inverse of the head's rotation
    relative to its neutral pose, so the rendered head turns the way the tracked one does in its (non-mirrored)
    frame: R' = F Q F R, t' = t + R c - R' c, with Q the pose's viewer-frame rotation and F = diag(1, -1, -1).
    Intrinsics and image size are kept; translation and scale of the pose are not used.
    """
    Q = np.asarray(pose.rotation, np.float64)
    if Q.shape != (3, 3):
        raise InputError(f"pose.rotation must be [3, 3], got {Q.shape}")
    R = base_camera.R.double().numpy()
    t = base_camera.t.double().numpy()
    c = np.asarray(centre, np.float64).reshape(3)
    R_new = _FLIP @ Q @ _FLIP @ R
    t_new = t + R @ c - R_new @ c
    return Camera(R=R_new, t=t_new, fx=base_camera.fx, fy=base_camera.fy, cx=base_camera.cx, cy=base_camera.cy,
                  width=base_camera.width, height=base_camera.height)
