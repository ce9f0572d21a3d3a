#!/usr/bin/env python3
"""Probe diagnostics on real photos: few-shot speed, suspected label errors, calibration and
class weights, on the penultimate codes of ../shared/datasets/caltech101-mini (EfficientNet-Lite0).

Each row runs the `cnncodes` command a user would run (few-shot: the whole command, start-up
included) or the library call behind it, on the same codes:

- few-shot: `fit-svm` / `fit-softmax --shots 1,5,10 --episodes 5`, wall time of the process;
- suspects: 5% of the training labels swapped at random (seeds 0-2), the share of swapped
  images in the top 10% of suspects.csv's ranking;
- calibration: expected calibration error of the test rows before and after the temperature;
- class weights: half the classes keep 2 of their 15 training photos; test balanced accuracy
  without and with `--class-weight balanced --select balanced_accuracy` (2 folds: a kept class
  has 2 images).

Writes benchmarks/results/diagnostics-cpu.json and the Markdown table (docs with --update-readme).
The codes are extracted once into benchmarks/.work/diagnostics (kept for reruns).

Example:
  python benchmarks/diagnostics.py --update-readme
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from readme_table import publish

HERE = Path(__file__).resolve().parent
CALTECH = HERE.parent.parent / "shared" / "datasets" / "caltech101-mini"
WORK = HERE / ".work" / "diagnostics"


def codes_file() -> Path:
    path = WORK / "caltech-penultimate.h5"
    if not path.exists():
        from cnncodes import extractor
        WORK.mkdir(parents=True, exist_ok=True)
        extractor.extract(CALTECH, path, layers=["penultimate"], progress=True)
    return path


def few_shot_row(path: Path, classifier: str) -> dict:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "cnncodes", f"fit-{classifier}", "--cache", str(path), "--shots", "1,5,10",
           "--episodes", "5", "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    r = json.loads(out.stdout)
    return {"classifier": classifier, "process_s": round(wall, 2), "seconds": r["seconds"],
            "accuracy": {str(s["shots"]): [round(s["mean"], 4), round(s["std"], 4)] for s in r["shots"]}}


def suspects_row(codes, classifier: str, seeds=(0, 1, 2)) -> dict:
    from cnncodes.pipelines.probes.classifiers import fit_linear_probe
    train = np.flatnonzero(codes.splits != "test")
    found, recall, precision = [], [], []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        swapped = rng.choice(train, int(round(0.05 * len(train))), replace=False)
        y = codes.y.copy()
        y[swapped] = (y[swapped] + rng.integers(1, len(codes.classes), len(swapped))) % len(codes.classes)
        r = fit_linear_probe(replace(codes, y=y), classifier=classifier)
        s = r.suspects()
        found.append(float(np.isin(swapped, train[s.top(0.10)]).mean()))
        flagged = train[s.flagged]
        recall.append(float(np.isin(swapped, flagged).mean()))
        precision.append(float(np.isin(flagged, swapped).mean()) if len(flagged) else 0.0)
    clean = fit_linear_probe(codes, classifier=classifier)
    c = clean.calibration
    eces = {"temperature": round(c.temperature, 4), "ece_test_before": round(c.ece_test_before, 4),
            "ece_test_after": round(c.ece_test_after, 4)}
    return {"classifier": classifier, "swapped": int(round(0.05 * len(train))),
            "in_top_10pct": [round(v, 3) for v in found], "flagged_recall": [round(v, 3) for v in recall],
            "flagged_precision": [round(v, 3) for v in precision], **eces}


def class_weight_row(codes, classifier: str) -> dict:
    from cnncodes.pipelines.probes.classifiers import fit_linear_probe
    rng = np.random.default_rng(0)
    keep = np.ones(len(codes.y), bool)
    for k in range(len(codes.classes) // 2, len(codes.classes)):
        rows = np.flatnonzero((codes.splits != "test") & (codes.y == k))
        keep[rng.permutation(rows)[2:]] = False
    sub = codes.take(keep)
    plain = fit_linear_probe(sub, classifier=classifier, folds=2)
    weighted = fit_linear_probe(sub, classifier=classifier, folds=2, class_weight="balanced",
                                select="balanced_accuracy")
    return {"classifier": classifier, "train_rows": plain.n_train,
            "balanced_accuracy_plain": round(plain.balanced_accuracy, 4),
            "balanced_accuracy_weighted": round(weighted.balanced_accuracy, 4)}


def markdown(r: dict) -> str:
    lines = ["| probe | few-shot 1 / 5 / 10 (test acc, 5 episodes) | few-shot s | swapped labels in top 10% "
             "(3 seeds) | test ECE before -> after (T) | imbalanced: balanced acc plain -> balanced |",
             "|---|---|---:|---|---|---|"]
    for f, s, w in zip(r["few_shot"], r["suspects"], r["class_weight"]):
        acc = " / ".join(f"{m:.3f}+-{sd:.3f}" for m, sd in f["accuracy"].values())
        found = ", ".join(f"{v:.0%}" for v in s["in_top_10pct"])
        lines.append(f"| {f['classifier']} | {acc} | {f['process_s']:.1f} | {found} | "
                     f"{s['ece_test_before']:.3f} -> {s['ece_test_after']:.3f} ({s['temperature']:.3g}) | "
                     f"{w['balanced_accuracy_plain']:.3f} -> {w['balanced_accuracy_weighted']:.3f} |")
    return "\n".join(lines) + (f"\n\n({r['device_name']}, {r['date']}; Caltech-101 mini, Lite0 penultimate "
                               f"codes, {r['n_train']} train / {r['n_test']} test; "
                               f"`python benchmarks/diagnostics.py`)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--update-readme", action="store_true")
    args = ap.parse_args()
    from cnncodes.extractor.provenance import library_versions

    from cnncodes.pipelines.probes.codes import load_codes
    path = codes_file()
    codes = load_codes(path)
    result = {"benchmark": "diagnostics", "device": "cpu", "date": time.strftime("%Y-%m-%d"),
              "device_name": f"{len(__import__('os').sched_getaffinity(0))}-core CPU",
              "n_train": int((codes.splits != "test").sum()), "n_test": int((codes.splits == "test").sum()),
              "few_shot": [few_shot_row(path, c) for c in ("svm", "softmax")],
              "suspects": [suspects_row(codes, c) for c in ("svm", "softmax")],
              "class_weight": [class_weight_row(codes, c) for c in ("svm", "softmax")],
              "versions": library_versions()}
    publish(result, HERE / "results" / "diagnostics-cpu.json", markdown(result), "diagnostics-cpu",
            args.update_readme)


if __name__ == "__main__":
    main()
