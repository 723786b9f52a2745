"""`avatar fit-head --dataset DIR --out FILE`: fit a person's learned head model (`engine.heads.fitting`) on the
tracked frames of a dataset folder (`avatar import-nersemble`), print the held-out figures of the linear map and
of the MLP, and write the chosen one (`LearnedHead` file; `avatar import-release --head-model FILE` puts it into
an avatar)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import InputError
from ..files import check_writable, write_atomic
from .fitting import fit_head


def _frame(text: str) -> tuple[str, int]:
    seq, sep, frame = text.rpartition(":")
    if not sep or not frame.isdigit():
        raise argparse.ArgumentTypeError(f"expected SEQUENCE:FRAME, got {text!r}")
    return seq, int(frame)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `avatar fit-head`."""
    p.add_argument("--dataset", required=True, help="dataset folder of the person's tracked frames "
                   "(`avatar import-nersemble`; 5-D canonical coordinates)")
    p.add_argument("--out", required=True, help="head model file to write (.npz)")
    p.add_argument("--kind", choices=["auto", "linear", "mlp"], default="auto",
                   help="the code -> mesh map: linear, linear + a small MLP, or auto: fit both, keep the one with the "
                   "lower held-out vertex error (default)")
    p.add_argument("--components", type=int, default=32, help="PCA components of the offsets (default: 32)")
    p.add_argument("--hidden", type=int, default=128, help="width of the MLP's hidden layer (default: 128)")
    p.add_argument("--steps", type=int, default=1500, help="MLP training steps, full batch (default: 1500)")
    p.add_argument("--template", type=_frame, default=None,
                   help="SEQUENCE:FRAME of the template (default: the frame with the smallest code)")
    p.add_argument("--max-frames", type=int, default=1200, help="at most this many training frames, evenly spaced "
                   "(they are held in memory; default: 1200)")
    p.add_argument("--report", default=None, help="also write the figures as JSON to this file")


def run(args: argparse.Namespace) -> None:
    """`avatar fit-head`: fit, print the comparison, write the file."""
    for name in ("components", "hidden", "steps", "max_frames"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    check_writable(args.out, "the head model")
    if args.report:
        check_writable(args.report, "the report")
    head, report = fit_head(args.dataset, kind=args.kind, components=args.components, hidden=args.hidden,
                            steps=args.steps, template=args.template, max_frames=args.max_frames)
    seq, frame = report["template"]
    print(f"template {seq}:{frame} ({report['vertices']} vertices); {report['train_frames']} training, "
          f"{report['heldout_frames']} held-out frames")
    print(f"held-out matching distance to the template (canonical): mean {report['match_mm'][0]:.2f} mm, worst frame "
          f"{report['match_mm'][1]:.2f} mm")
    print(f"{'map':<8}{'vertex mean':>12}{'p95':>8}{'max':>8}  {'PSNR':>8}  pose")
    for kind, r in report["kinds"].items():
        print(f"{kind:<8}{r['vertex_mm_mean']:>9.2f} mm{r['vertex_mm_p95']:>8.2f}{r['vertex_mm_max']:>8.2f}  "
              f"{r['psnr_db']:>5.1f} dB  {r['pose_ms']:.1f} ms{'  <- written' if kind == report['chosen'] else ''}")
    print(f"(PSNR: {report['kinds'][report['chosen']]['psnr_frames']} held-out frames, camera {report['camera']}, "
          "fitted mesh against tracked mesh in the synthetic look)")
    head.save(args.out)
    if args.report:
        write_atomic(args.report, json.dumps(report, indent=1) + "\n")
    print(f"wrote {Path(args.out).resolve()}")
