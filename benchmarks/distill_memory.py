"""The memory one process of `avatar distill` needs for an avatar's structure, over the settings that matter.

    python -m benchmarks.distill_memory [--teacher sd21] [--out benchmarks/results/sd21-distill-memory]

Each row is `avatar distill --teacher T --steps S --batch-size B --mixed-precision M [--gradient-checkpointing]
--estimate-memory` (`engine.training.student_memory`: counted on the meta device, nothing allocated, so it runs on
any CPU). Writes `<out>.json` and `<out>.md`.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import platform
from pathlib import Path

import torch

from engine.avatars import load_avatar
from engine.training.student_memory import estimate_memory

RESULTS = Path(__file__).parent / "results"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.distill_memory", description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="sd21", help="a preset or avatar folder (default: sd21)")
    p.add_argument("--out", default=str(RESULTS / "sd21-distill-memory"), help="stem of the .json and .md")
    args = p.parse_args(argv)
    teacher = load_avatar(args.teacher, device="meta")
    rows = [estimate_memory(teacher, steps, batch, mixed, checkpointing, weight)
            for steps, batch, mixed, checkpointing, weight in itertools.product(
                (1, 2), (1, 4), ("no", "bf16"), (False, True), (1.0, 0.0))]
    result = {"teacher": args.teacher, "latent": rows[0]["settings"]["latent"], "parameters": rows[0]["parameters"],
              "date": datetime.date.today().isoformat(), "torch": torch.__version__, "host": platform.machine(),
              "rows": rows}
    Path(args.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Memory of one `avatar distill` process: {args.teacher}", "",
             f"Latent {result['latent']}; {rows[0]['parameters']['trainable'] / 1e6:.0f} M trainable parameters "
             f"(ControlNet + UNet) of {rows[0]['parameters']['all'] / 1e6:.0f} M. Counted on the meta device "
             "(`engine.training.student_memory`); GiB.", "",
             "| steps | batch | precision | checkpointing | image term | weights+grads+AdamW | activations | total |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        s, g = r["settings"], r["gib"]
        fixed = r["gib"]["total"] - g["activations"]
        lines.append(f"| {s['steps']} | {s['batch_size']} | {s['mixed_precision']} | "
                     f"{'yes' if s['gradient_checkpointing'] else 'no'} | {s['image_weight']:g} | {fixed:.2f} | "
                     f"{g['activations']:.2f} | {g['total']:.2f} |")
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
