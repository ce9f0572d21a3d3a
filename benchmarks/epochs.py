#!/usr/bin/env python3
"""Fine-tuning epochs on small photos and on 12-megapixel ones: seconds per epoch before and after
images were decoded once (`finetune --prepare`) and the CPU training loop was tuned.

The photos are photos.py's (built from ../shared/datasets/caltech101-mini the same way every
time, kept in benchmarks/.work/photos/): N Caltech training photos at their own size (about
300 x 200), and the same N enlarged to 4032 x 3024 and saved as JPEG quality 90.

Each program is `cnncodes finetune DATA` with its version's default settings (Lite0, stages
head:2,all:3, the probe-started head), one after the other, rounds interleaved:

- ``before``: the code at ``--before`` (a git revision; default: the last commit before this
  benchmark existed), run from a copy of that revision's tree, with that version's defaults
  (at 51cb6bc: reduced decoding, light crops, two decoding worker processes, every epoch
  decoding every photo again);
- ``after``: this tree's defaults (prepared images, decoded in turn with the steps,
  channels_last); the first round makes the store (its time is the ``prepare`` column: the
  run's wall time beyond the same run with the store made), later rounds read it;
- ``after --no-prepare``: this tree without the store, to show what the store itself adds;
- ``before --decode exact --augment standard``: the settings of the runs made before reduced
  decoding and the light crops (the issue's "today").

Per program: the seconds of epoch 1 and the mean of epochs 2-5 (from metrics.jsonl), and
epochs per hour at that mean.

Example:
  python benchmarks/epochs.py --repeats 2 --update-readme
Writes benchmarks/results/epochs-cpu.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from extract import run_measured
from photos import build
from readme_table import publish, update_readme

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / ".work" / "epochs"
BEFORE = "51cb6bc"


def before_tree(rev: str) -> Path:
    """An importable copy of ``rev``'s package: ``<work>/before-<rev>/pkg/cnncodes`` with its
    extractor/ and pipelines/ where the installed layout puts them (PYTHONPATH finds it before
    the editable install of this tree)."""
    root = WORK / f"before-{rev}"
    pkg = root / "pkg" / "cnncodes"
    if not pkg.is_dir():
        src = root / "src"
        src.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
        shutil.copytree(src / "cnncodes", pkg)
        shutil.copytree(src / "extractor", pkg / "extractor")
        shutil.copytree(src / "pipelines", pkg / "pipelines")
    return root / "pkg"


def run(data: Path, out: Path, extra: list[str], pythonpath: Path | None) -> dict:
    """One ``finetune`` run: epoch seconds from its metrics.jsonl, and the process's wall time (run
    outside the repository, whose cnncodes/ would otherwise shadow the copy of ``before``)."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    cmd = [sys.executable, "-m", "cnncodes", "finetune", str(data), "--out", str(out), "--overwrite",
           "--quiet", "--json", *extra]
    _, wall, _ = run_measured(cmd, cwd=WORK, env=env)
    epochs = [json.loads(line)["seconds"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"epoch_s": [round(s, 2) for s in epochs], "wall_s": round(wall, 1),
            "later_mean_s": round(statistics.mean(epochs[1:]), 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--images", type=int, default=120)
    ap.add_argument("--before", default=BEFORE, help="the git revision measured as 'before'")
    ap.add_argument("--update-readme", action="store_true", help="rewrite the README's table")
    ap.add_argument("--readme-only", action="store_true",
                    help="rebuild the README table from the saved JSON without running anything")
    args = ap.parse_args()
    out_json = HERE / "results" / "epochs-cpu.json"
    if args.readme_only:
        update_readme(markdown(json.loads(out_json.read_text())), "epochs-cpu")
        return
    large, small, _ = build(args.images, 0.0)
    old = before_tree(args.before)
    store = WORK / "prepared"
    shutil.rmtree(store, ignore_errors=True)
    programs = {
        "before (exact, standard)": (["--decode", "exact", "--augment", "standard"], old),
        "before": ([], old),
        "after --no-prepare": (["--no-prepare"], None),
        "after": (["--prepared-dir", str(store)], None),
    }
    runs: dict = {d: {k: [] for k in programs} for d in ("small", "large")}
    for r in range(args.repeats):
        for dname, data in (("small", small), ("large", large)):
            for name, (extra, path) in programs.items():
                res = run(data, WORK / "runs" / f"{dname}-{name.replace(' ', '_')}", extra, path)
                runs[dname][name].append(res)
                print(f"round {r + 1} {dname:5s} {name:26s} epochs {res['epoch_s']} wall {res['wall_s']} s",
                      file=sys.stderr)
    summary = {}
    for dname, by in runs.items():
        for name, rs in by.items():
            later = statistics.median(x["later_mean_s"] for x in rs)
            summary.setdefault(dname, {})[name] = {
                "epoch1_s": statistics.median(x["epoch_s"][0] for x in rs), "later_mean_s": later,
                "epochs_per_hour": round(3600 / later), "wall_s": statistics.median(x["wall_s"] for x in rs)}
        if "after" in by and len(by["after"]) > 1:  # the first round made the store
            summary[dname]["after"]["prepare_s"] = round(by["after"][0]["wall_s"] - statistics.median(
                x["wall_s"] for x in by["after"][1:]), 1)
    result = {"benchmark": "epochs", "device": "cpu",
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
              "settings": {"images": args.images, "before": args.before, "repeats": args.repeats,
                           "model": "efficientnet_lite0", "stages": "head:2,all:3"},
              "summary": summary, "runs": runs, "date": time.strftime("%Y-%m-%d")}
    publish(result, out_json, markdown(result), "epochs-cpu", args.update_readme)


def markdown(r: dict) -> str:
    s, n = r["summary"], r["settings"]["images"]
    lines = [f"| {n} photos, Lite0, `finetune` defaults | small: epoch 1 s | small: epochs 2-5 s | "
             f"12 MP: epoch 1 s | 12 MP: epochs 2-5 s | 12 MP: epochs/hour |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in s["large"]:
        a, b = s["small"][name], s["large"][name]
        lines.append(f"| {name} | {a['epoch1_s']:.1f} | {a['later_mean_s']:.1f} | {b['epoch1_s']:.1f} | "
                     f"{b['later_mean_s']:.1f} | {b['epochs_per_hour']} |")
    large = s["large"]
    now = large["after"]["later_mean_s"]
    prep = large["after"].get("prepare_s")
    lines.append("")
    lines.append(f"(2-thread CPU, {r['date']}; before = {r['settings']['before']}; median of "
                 f"{r['settings']['repeats']} rounds; epochs 2-5 on 12 MP photos "
                 f"{large['before (exact, standard)']['later_mean_s'] / now:.1f}x faster than before with "
                 f"exact decoding and {large['before']['later_mean_s'] / now:.1f}x faster than before's "
                 f"defaults" + (f"; the run that made the store took {prep:.0f} s longer than the runs that "
                                f"read it" if prep is not None else "") + "; `python benchmarks/epochs.py`)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
