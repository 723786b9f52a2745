"""Fitting an `ExpressionMap` (ridge) from tracker output to an avatar's codes on its own training frames.

Every frame of the dataset (`engine.data.dataset`, image + code pairs) is tracked as a photo. Each camera gets its
own neutral face, its frame with the smallest code (the nearest to the rest pose), because a live user's neutral
is captured from their own view too. The map is fitted on the `train` items and its error is reported on the
held-out items (the dataset's eval cameras and sequences; every 5th item when it holds none out). The ridge
penalty is chosen by 5-fold cross-validation on the training items unless given.
"""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError, InputError
from .expression_map import FEATURES, ExpressionMap, feature_vector, ridge_fit
from .tracking import Tracker

ALPHAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)


def _to_uint8(image) -> np.ndarray:
    """A dataset image [3, H, W] float in [-1, 1] -> [H, W, 3] uint8."""
    x = np.asarray(image, np.float32).transpose(1, 2, 0)
    return ((x + 1) * 127.5).clip(0, 255).round().astype(np.uint8)


def _rmse(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(np.sqrt(np.mean((pred - truth) ** 2)))


def track_dataset(dataset, features: str = "coefficients", max_items: int | None = None,
                  progress: bool = True) -> dict:
    """Track every item of an `AvatarDataset` -> {"features" [N, F], "codes" [N, E], "train" [N] bool} of the items
    with a face, plus "items" (the dataset size considered) and "tracked" (N)."""
    from tqdm import tqdm

    if features not in FEATURES:
        raise ConfigError(f"unknown map features {features!r}; use one of {sorted(FEATURES)}")
    picks = np.arange(len(dataset))
    if max_items is not None and max_items < len(picks):
        picks = np.unique(np.linspace(0, len(picks) - 1, max_items).round().astype(int))
    landmarks, codes, cams, held = [], [], [], []
    with Tracker(static_images=True, smooth=False) as tracker:
        for i in tqdm(picks, desc="tracking", unit="img", disable=not progress):
            item = dataset[int(i)]
            landmarks.append(tracker.landmarks(_to_uint8(item["image"])))
            codes.append(np.asarray(item["expression"], np.float32))
            cams.append(item["camera_name"])
            held.append(item["holdout"] != "none")
        codes_arr = np.stack(codes)
        found = np.array([lm is not None for lm in landmarks])
        rows, feats = [], []
        for cam in sorted(set(cams)):
            idx = [k for k, c in enumerate(cams) if c == cam and found[k]]
            if not idx:
                continue
            # the camera's rest pose: its tracked frame with the smallest code
            tracker.neutral = landmarks[min(idx, key=lambda k: float(np.linalg.norm(codes_arr[k])))]
            for k in idx:
                rows.append(k)
                feats.append(feature_vector(tracker.measure(landmarks[k]), features))
    if len(rows) < 4:
        raise InputError(f"the tracker found a face in only {len(rows)} of {len(picks)} dataset images; the map "
                         "needs face images (frontal views, faces at least ~100 pixels tall)")
    order = np.argsort(rows)
    rows = np.asarray(rows)[order]
    train = ~np.asarray(held)[rows]
    if train.all() or not train.any():  # no usable split in the dataset: hold out every 5th item
        train = np.arange(len(rows)) % 5 != 4
    return {"features": np.stack(feats)[order], "codes": codes_arr[rows], "train": train, "items": len(picks),
            "tracked": len(rows)}


def choose_alpha(X: np.ndarray, Y: np.ndarray, folds: int = 5) -> float:
    """The ridge penalty from `ALPHAS` with the smallest k-fold cross-validated error on (X [N, F], Y [N, E]).

    Folds are contiguous blocks of rows, as neighbouring frames of a sequence are nearly alike."""
    n = len(X)
    folds = min(folds, n // 2)
    if folds < 2:
        return 1.0
    fold = np.arange(n) * folds // n
    errors = []
    for alpha in ALPHAS:
        sq = 0.0
        for k in range(folds):
            val = fold == k
            W, b = ridge_fit(X[~val], Y[~val], alpha)
            sq += float(((X[val] @ W + b - Y[val]) ** 2).sum())
        errors.append(sq)
    return ALPHAS[int(np.argmin(errors))]


def fit_driver(dataset, expression_names=None, features: str = "coefficients", alpha: float | None = None,
               max_items: int | None = None, progress: bool = True) -> ExpressionMap:
    """Fit a ridge `ExpressionMap` on an `AvatarDataset`; its `metrics` hold the held-out report: `rmse` (the map),
    `baseline_rmse` (always predicting the training mean), `r2`, per-dimension `rmse_per_dim`, counts, `alpha`."""
    data = track_dataset(dataset, features, max_items, progress)
    X, Y, train = data["features"], data["codes"], data["train"]
    alpha = choose_alpha(X[train], Y[train]) if alpha is None else float(alpha)
    W, b = ridge_fit(X[train], Y[train], alpha)
    pred, truth = X[~train] @ W + b, Y[~train]
    mean = Y[train].mean(0)
    baseline = _rmse(np.broadcast_to(mean, truth.shape), truth)
    metrics = {
        "items": data["items"], "tracked": data["tracked"], "train": int(train.sum()), "heldout": int((~train).sum()),
        "features": features, "alpha": alpha, "rmse": _rmse(pred, truth), "baseline_rmse": baseline,
        "r2": float(1 - np.sum((pred - truth) ** 2) / max(np.sum((truth - mean) ** 2), 1e-12)),
        "rmse_per_dim": np.sqrt(np.mean((pred - truth) ** 2, axis=0)).round(5).tolist(),
    }
    return ExpressionMap("ridge", Y.shape[1], expression_names, features, W, b, alpha, metrics)
