"""Tabulate a teacher's few-step students: `benchmarks/results/<stem>.{json,md}` from the runs' own files.

    python -m benchmarks.distill_report --recipes STEM.json --student 1=DIR,EVAL.json [--student 2=DIR,EVAL.json]
                                        [--wall 1=SECONDS ...] [--out benchmarks/results/detail-distill]

DIR: an `avatar distill --out` folder (its `distilled.json`: held-out PSNR against the teacher's reference, against
the truth, and sharpness, for the student and the teacher's DDIM 1/2/4); EVAL.json: `avatar eval --avatar DIR --data
... --json` of that student (expression gain, flicker); STEM.json: the teacher's `avatar eval --recipes
ddim:1,ddim:2,ddim:4,ddpm:20` (its reference row gives the teacher's gain and flicker). The bars are issue 17's.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from engine.recipe import parse_recipe

RESULTS = Path(__file__).parent / "results"


def _pairs(values: list[str]) -> dict[int, str]:
    return {int(k): v for k, v in (item.split("=", 1) for item in values)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.distill_report", description=__doc__.splitlines()[0])
    p.add_argument("--recipes", required=True, help="the teacher's `avatar eval --recipes` JSON")
    p.add_argument("--student", action="append", required=True, help="STEPS=DIR,EVAL.json (repeat)")
    p.add_argument("--wall", action="append", default=[], help="STEPS=SECONDS of the distill run (repeat)")
    p.add_argument("--out", default=str(RESULTS / "detail-distill"), help="stem of the .json and .md")
    args = p.parse_args(argv)
    recipes = json.loads(Path(args.recipes).read_text())
    walls = {k: float(v) for k, v in _pairs(args.wall).items()}
    students = {}
    for steps, spec in sorted(_pairs(args.student).items()):
        folder, eval_file = spec.split(",")
        held = json.loads((Path(folder) / "distilled.json").read_text())
        scored = json.loads(Path(eval_file).read_text())
        students[steps] = {"folder": folder, "settings": held["settings"], "held_out": held["held_out"],
                           "wall_s": walls.get(steps), "psnr": scored["psnr"], "psnr_mask": scored["psnr_mask"],
                           "gain": scored["neutral"]["gain"], "flicker": scored["flicker"]}
    first = students[min(students)]["held_out"]
    # the teacher's row of the students' reference recipe (decoder included: ddpm:20 is ddpm:20+vae)
    teacher_recipe = str(parse_recipe(students[min(students)]["settings"]["teacher_recipe"]))
    reference = next(r for r in recipes["recipes"] if r["recipe"] == teacher_recipe)
    sharp = first["sharpness"]
    bars = {"reference_sharpness_vs_truth": sharp["reference"] / sharp["truth"],
            "autoencoder_sharpness_vs_truth": sharp["autoencoder"] / sharp["truth"],
            "teacher_ddim1_vs_reference_db": first["vs_reference_db"]["teacher_ddim1"]}
    for n, s in students.items():
        h = s["held_out"]
        bars.update({f"student{n}_vs_reference_db": h["vs_reference_db"]["student"],
                     f"student{n}_gain_over_teacher_ddim{n}_db": h["student_gain_over_teacher_db"],
                     f"student{n}_sharpness_vs_reference": h["sharpness"]["student"] / h["sharpness"]["reference"],
                     # a ratio means nothing unless the teacher gains from its codes at all
                     f"student{n}_expression_gain_vs_teacher": s["gain"] / reference["gain"]
                     if reference["gain"] > 0 else None,
                     f"student{n}_flicker_vs_teacher": s["flicker"]["ratio"] / reference["flicker_ratio"]})
    result = {"teacher": recipes["avatar"], "data": recipes["data"], "frames": first["frames"],
              "host": {"machine": platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__},
              "teacher_recipes": recipes["recipes"], "students": students, "bars": bars}
    Path(args.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Few-step students of avatar {recipes['avatar']}", "",
             f"{first['frames']} held-out frames ({recipes['data']}); reference: the teacher's "
             f"{students[min(students)]['settings']['teacher_recipe']} with its fixed noise.", "",
             "| frames of | PSNR vs reference | PSNR vs truth | sharpness |", "|---|---|---|---|"]
    rows = [("reference", "teacher, reference"), *((f"teacher_ddim{n}", f"teacher DDIM {n}") for n in (1, 2, 4))]
    for key, name in rows:
        against = first["vs_reference_db"].get(key)
        lines.append(f"| {name} | {'—' if against is None else f'{against:.2f} dB'} | "
                     f"{first['vs_truth_db'][key]:.2f} dB | {sharp[key]:.4f} |")
    for n, s in students.items():
        h = s["held_out"]
        lines.append(f"| {n}-step student | {h['vs_reference_db']['student']:.2f} dB | "
                     f"{h['vs_truth_db']['student']:.2f} dB | {h['sharpness']['student']:.4f} |")
    lines += [f"| autoencoder, decode(encode(truth)) | — | {first['vs_truth_db']['autoencoder']:.2f} dB | "
              f"{sharp['autoencoder']:.4f} |", f"| ground truth | — | — | {sharp['truth']:.4f} |", "",
              "| `avatar eval` | PSNR frame / head mask | expression gain | flicker (vs truth's) |",
              "|---|---|---|---|",
              f"| teacher, reference | {reference['psnr']:.2f} / {reference['psnr_mask']:.2f} dB | "
              f"{reference['gain']:.3f} dB | {reference['flicker_ratio']:.4f} |"]
    for n, s in students.items():
        lines.append(f"| {n}-step student | {s['psnr']:.2f} / {s['psnr_mask']:.2f} dB | {s['gain']:.3f} dB | "
                     f"{s['flicker']['ratio']:.4f} |")
    shown = {k: "— (the teacher gains nothing)" if v is None else f"{v:.3f}" for k, v in bars.items()}
    lines += ["", "| bar figure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in shown.items())]
    if walls:
        lines += ["", "Distillation wall times: " + ", ".join(f"{n}-step {w:.0f} s" for n, w in walls.items())]
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
