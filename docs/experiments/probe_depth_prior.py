"""Does a Depth gain come from the image or from a text prior? Real vs shuffled images.

Run: .venv/bin/python docs/experiments/probe_depth_prior.py --model RUN/final_hf --data DATA/CV-Bench
     [--results bench/results/depth_prior.json]

In the synthetic CV-Bench Depth questions ("which is closer to the camera, the A or the B?") the
gold is the object with the bigger area, and a shape alone predicts much of it: at equal radius a
square (4r^2) beats a circle (pi r^2), which beats a triangle (2r^2). So a model can gain on Depth
without looking. This probe evaluates a model (the project's `eval` command, greedy) twice: on the
real held-out set and on a copy whose images are rotated by one row (every question gets another
question's scene: in-distribution pixels that say nothing about the named objects). It splits the
rows into:

  same shape    both options the same shape: the shape says nothing, only sizes in the image do
  prior right   different shapes, and the higher-ranked shape (square > circle > triangle) is the gold
  prior wrong   different shapes, and the gold is the lower-ranked one

and prints rows, valid answers (one of the options) and right answers per kind. Right answers on
`same shape` rows above their shuffled-image count are read from the image.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from visualthinker_ray.data.cvbench import load_cvbench
from visualthinker_ray.rewards import extract_answer, normalize_answer

ROOT = Path(__file__).resolve().parents[2]
SHAPE_RANK = {"square": 3, "circle": 2, "triangle": 1}  # area at equal radius: 4r^2 > pi r^2 > 2r^2
KINDS = ("same shape", "prior right", "prior wrong")


def shuffled_copy(src: Path, dst: Path) -> Path:
    """The CV-Bench folder with every row's image replaced by the next row's (same file)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.glob("*.parquet")):
        table = pq.read_table(f)
        rows = table.to_pylist()
        images = [r["image"] for r in rows]
        for i, row in enumerate(rows):
            row["image"] = images[(i + 1) % len(rows)]
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), dst / f.name)
    return dst


def kind_of(choices: tuple[str, ...], gold: str) -> str:
    a, b = (c.split()[-1] for c in choices)
    if a == b:
        return "same shape"
    higher = max(choices, key=lambda c: SHAPE_RANK[c.split()[-1]])
    return "prior right" if higher == gold else "prior wrong"


def breakdown(eval_json: Path, records: dict) -> dict[str, dict[str, int]]:
    out = {k: {"rows": 0, "valid": 0, "right": 0} for k in KINDS}
    for row in json.loads(eval_json.read_text())["rows"]:
        rec = records[row["id"]]
        if rec.question_type != "Depth":
            continue
        cell = out[kind_of(rec.choices, rec.gold)]
        cell["rows"] += 1
        cell["valid"] += normalize_answer(extract_answer(row["response"])) in {
            normalize_answer(c) for c in rec.choices
        }
        cell["right"] += bool(row["correct"])
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a trained model folder (a run's final_hf)")
    p.add_argument("--data", required=True, help="the synthetic CV-Bench folder it was evaluated on")
    p.add_argument("--config", default="jobs/tiny_cpu.yaml")
    p.add_argument("--work", default=str(ROOT / "artifacts" / "probe-depth-prior"))
    p.add_argument("--results", default=str(ROOT / "bench" / "results" / "depth_prior.json"))
    p.add_argument("overrides", nargs="*", help="extra dotted overrides for `eval` (after --)")
    args = p.parse_args()
    work = Path(args.work)
    sets = {
        "real": Path(args.data),
        "shuffled": shuffled_copy(Path(args.data), work / "shuffled" / "CV-Bench"),
    }
    records = {r.id: r for r in load_cvbench(args.data).records}
    result = {"model": args.model, "data": args.data, "overrides": args.overrides, "images": {}}
    for name, data in sets.items():
        out = work / f"eval_{name}.json"
        subprocess.run(
            [sys.executable, "-m", "visualthinker_ray", "eval", "--config", args.config, "--model", args.model,
             "--data", str(data), "--out", str(out), *args.overrides],
            cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        result["images"][name] = breakdown(out, records)
    print(f"Depth rows of {args.data}, model {args.model}")
    print("| images | " + " | ".join(f"{k}: right / valid / rows" for k in KINDS) + " | accuracy |")
    print("|---|" + "---|" * (len(KINDS) + 1))
    for name, cells in result["images"].items():
        total = sum(c["rows"] for c in cells.values())
        right = sum(c["right"] for c in cells.values())
        print(
            f"| {name} | "
            + " | ".join(f"{c['right']} / {c['valid']} / {c['rows']}" for c in cells.values())
            + f" | {right / total:.3f} |"
        )
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(result, indent=2))
    print(f"results written to {args.results}")


if __name__ == "__main__":
    main()
