"""How much of a detail dataset's sharpness is its per-frame detail: `benchmarks/results/<stem>.{json,md}`.

    python -m benchmarks.detail_share --data DIR [--frames 16] [--reference-db DB] [--out STEM]

For the held-out frames `avatar distill --held-out` scores (the eval split, evenly spread), renders each frame's truth
again without its `DetailField` (with the dataset's point-spread, if any; the field has zero mean, so that render is
the truth's expectation over draws, up to the albedo's clamp) and reports the variance of the Laplacian inside the
head mask (`engine.metrics.sharpness`, the metric of the teacher's sharpness bar; the mask also eroded by 3 px, away
from the outline) with and without the detail, and the detail's energy: the PSNR of the render without it against
the truth (mean over frames).
`--reference-db` (the teacher's DDIM 1 against its reference, dB, from `*distill*.json`) puts the teacher's drawn
field beside it: DDIM 1 from pure noise is the teacher's conditional mean, so its distance to the reference is the
reference's field.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from engine.data.dataset import AvatarDataset
from engine.data.synthetic import SyntheticHead
from engine.metrics import psnr, sharpness

RESULTS = Path(__file__).parent / "results"


def measure(root: str | Path, frames: int = 16) -> dict:
    """The truth's sharpness with and without its detail, and the detail's energy, on `frames` held-out frames."""
    data = AvatarDataset(root, "eval")
    doc = json.loads((Path(root) / "dataset.json").read_text())
    detail, psf = doc.get("detail"), doc.get("render", {}).get("psf_px", 0.0)
    if not detail:
        raise SystemExit(f"{root} has no per-frame detail (write it with avatar make-data --detail-band LOW,HIGH)")
    head = SyntheticHead()
    picks = np.linspace(0, len(data) - 1, min(frames, len(data))).round().astype(int)
    truth, plain, masks = [], [], []
    for i in picks:
        item = data[int(i)]
        rgb, _ = head.render(item["camera"], item["expression"], detail=None, psf=psf)
        plain.append((torch.as_tensor(np.asarray(rgb)).permute(2, 0, 1) * 255).round() / 255)  # 8-bit, as stored
        truth.append((item["image"] + 1) / 2)
        masks.append(item["mask"])
    truth, plain, mask = torch.stack(truth), torch.stack(plain).float(), torch.stack(masks)
    inner = -F.max_pool2d(-mask, 7, 1, 3)
    energy_db = float(psnr(plain, truth).mean())
    return {"data": str(root), "frames": len(picks), "band_rad_per_m": detail["band_rad_per_m"], "psf_px": psf,
            "sharpness": {"truth": float(sharpness(truth, mask).mean()),
                          "without_detail": float(sharpness(plain, mask).mean()),
                          "truth_inner": float(sharpness(truth, inner).mean()),
                          "without_detail_inner": float(sharpness(plain, inner).mean())},
            "detail_energy_db": energy_db}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.detail_share", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="a dataset written by avatar make-data --detail-band")
    p.add_argument("--frames", type=int, default=16, help="held-out frames (as avatar distill --held-out)")
    p.add_argument("--reference-db", type=float, help="the teacher's DDIM 1 vs its reference, dB")
    p.add_argument("--out", default=str(RESULTS / "detail-share"), help="stem of the .json and .md")
    args = p.parse_args(argv)
    r = measure(args.data, args.frames)
    s = r["sharpness"]
    r["detail_share_of_sharpness"] = 1 - s["without_detail"] / s["truth"]
    r["detail_share_of_sharpness_inner"] = 1 - s["without_detail_inner"] / s["truth_inner"]
    lines = [f"# How much of the truth's sharpness is its detail ({r['frames']} held-out frames of {r['data']})", "",
             "| | variance of the Laplacian, head | head eroded 3 px |", "|---|---|---|",
             f"| truth | {s['truth']:.4f} | {s['truth_inner']:.4f} |",
             f"| truth without its detail | {s['without_detail']:.4f} | {s['without_detail_inner']:.4f} |",
             f"| detail's share | {r['detail_share_of_sharpness']:.1%} | {r['detail_share_of_sharpness_inner']:.1%} |",
             "", f"Detail energy: the truth without its detail scores {r['detail_energy_db']:.2f} dB against it."]
    if args.reference_db is not None:
        r["teacher_ddim1_vs_reference_db"] = args.reference_db
        r["teacher_field_vs_truth"] = 10 ** ((r["detail_energy_db"] - args.reference_db) / 10)
        lines.append(f"Teacher's field: its DDIM 1 (the conditional mean) scores {args.reference_db:.2f} dB against "
                     f"its reference, so the reference draws {r['teacher_field_vs_truth']:.2f}x the truth's detail "
                     "energy.")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(r, indent=2) + "\n")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
