#!/usr/bin/env python3
"""The transfer-learning strategies on real photos: `cnncodes compare` on
../shared/datasets/caltech101-mini (102 classes, 1,515 train / 505 test) with EfficientNet-Lite0.

Linear SVM on the penultimate codes vs fine-tuning the top stage vs fine-tuning everything vs
training from scratch, all with cnncodes' defaults except the epoch counts; the same splits and
seed. Writes benchmarks/results/finetune-<device>.json and a Markdown table (README with
--update-readme). The run folder (benchmarks/.work/compare-caltech) keeps finished strategies,
so an interrupted benchmark resumes; --fresh starts again.

Example:
  python benchmarks/finetune.py --head-epochs 1 --epochs 2 --update-readme
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from readme_table import update_readme

from cnncodes.pipelines.reports import fmt_cell

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CALTECH = REPO.parent / "shared" / "datasets" / "caltech101-mini"
WORK = HERE / ".work" / "compare-caltech"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--head-epochs", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--fresh", action="store_true", help="Delete the kept runs first.")
    ap.add_argument("--update-readme", action="store_true")
    ap.add_argument("--readme-only", action="store_true",
                    help="Rewrite the README table from the saved JSON.")
    args = ap.parse_args()
    if args.readme_only:
        for path in sorted((HERE / "results").glob("finetune-*.json")):
            r = json.loads(path.read_text())
            update_readme(markdown(r), f"finetune-{r['device']}")
        return
    if args.fresh:
        shutil.rmtree(WORK, ignore_errors=True)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "cnncodes", "compare", str(CALTECH), "--report", str(WORK),
           "--head-epochs", str(args.head_epochs), "--epochs", str(args.epochs), "--device", args.device,
           "--json", "-q"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    out = json.loads(p.stdout)
    import torch

    from cnncodes.extractor.provenance import library_versions
    device = "cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    result = {"benchmark": "finetune", "device": device,
              "device_name": torch.cuda.get_device_name() if device == "cuda"
                             else f"{torch.get_num_threads()}-thread CPU",
              "date": time.strftime("%Y-%m-%d"), "head_epochs": args.head_epochs, "epochs": args.epochs,
              "rows": out["rows"], "conclusion": out["conclusion"],
              "wall_seconds": round(time.perf_counter() - t0, 1),
              "command": " ".join(cmd[1:]), "versions": library_versions()}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"finetune-{device}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    print(table)
    if args.update_readme:
        update_readme(table, f"finetune-{device}")


def per_stage(row: dict) -> str:
    stages = row.get("stages") or []
    return ", ".join(f"{s['name']} {s['seconds_per_epoch']:.0f}" for s in stages if s["epochs_run"]) or "-"


def markdown(r: dict) -> str:
    rows = ["| Caltech-101 mini, Lite0 | test acc | best val (CV for the probe) | epochs | s/epoch per stage "
            "| training s | trainable params |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    f = fmt_cell
    for row in r["rows"]:
        rows.append(f"| {row['strategy']}: {row['what']} | {f(row['test_accuracy'], '.4f')} | "
                    f"{f(row['best_val_accuracy'], '.4f')} | {f(row['epochs'], '.0f')} | "
                    f"{per_stage(row)} | {f(row['train_seconds'], '.0f')} | "
                    f"{f(row['trainable_params'], ',.0f')} |")
    return "\n".join(rows) + (f"\n\n({r['device_name']}, {r['date']}; head {r['head_epochs']} + "
                              f"{r['epochs']} epochs; `python benchmarks/finetune.py --head-epochs "
                              f"{r['head_epochs']} --epochs {r['epochs']}`)")


if __name__ == "__main__":
    main()
