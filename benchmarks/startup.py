#!/usr/bin/env python3
"""Benchmark what a user waits for before any work: `cnncodes info` and the time `fit-softmax`
spends outside its fit.

1. `cnncodes info` on the Caltech-101 mini cache (2,020 x 1,280 penultimate codes), median of
   --repeats runs, each a fresh process; the target is under 0.5 s, which needs it to leave
   torch unimported (checked in the same process).
2. `cnncodes fit-softmax --json` on the same cache: wall time of the process against the fit's
   own ``seconds``; the difference is imports, reading the codes and writing the summary (the
   fit's ``seconds`` include reading the codes, so the difference is mostly imports).
3. `cnncodes predict` of one photo, each a fresh process (median of --repeats): with the saved
   SVM (torch, the backbone built and its weights loaded) and with the same SVM exported by
   `cnncodes export` (ONNX Runtime alone).

Example:
  python benchmarks/startup.py --update-readme
Writes benchmarks/results/startup-cpu.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from readme_table import update_readme

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CALTECH = REPO.parent / "shared" / "datasets" / "caltech101-mini"
WORK = HERE / ".work"
TARGET_INFO_S = 0.5


def timed(cmd: list[str]) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    return time.perf_counter() - t0, p.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--update-readme", action="store_true")
    args = ap.parse_args()
    WORK.mkdir(exist_ok=True)
    cache = WORK / "caltech-lite0.h5"  # the classify benchmark's cache: made once, reused
    timed([sys.executable, "-m", "cnncodes", "extract", str(CALTECH), "--out", str(cache), "-q"])

    info = [timed([sys.executable, "-m", "cnncodes", "info", str(cache)])[0] for _ in range(args.repeats)]
    probe = ("import sys; from cnncodes.pipelines.cli import cli; "
             f"cli(['info', {str(cache)!r}], standalone_mode=False); print('torch' in sys.modules)")
    torch_loaded = timed([sys.executable, "-c", probe])[1].strip().endswith("True")
    fits = []
    for _ in range(max(1, args.repeats // 2)):
        wall, out = timed([sys.executable, "-m", "cnncodes", "fit-softmax", "--cache", str(cache), "--json"])
        fits.append((wall, json.loads(out)["seconds"]))
    wall, fit = min(fits)
    model, onnx = WORK / "startup-svm.npz", WORK / "startup-svm.onnx"
    timed([sys.executable, "-m", "cnncodes", "fit-svm", "--cache", str(cache), "--c-grid", "0.01", "--out",
           str(model), "--overwrite"])
    timed([sys.executable, "-m", "cnncodes", "export", "--model", str(model), "--out", str(onnx),
           "--overwrite"])
    photo = str(sorted((CALTECH / "test").rglob("*.jpg"))[0])
    predict = {kind: [timed([sys.executable, "-m", "cnncodes", "predict", "--model", str(m), photo])[0]
                      for _ in range(args.repeats)] for kind, m in (("probe", model), ("onnx", onnx))}
    result = {"date": datetime.date.today().isoformat(), "cache": str(cache), "info_seconds": info,
              "info_median_s": statistics.median(info), "info_imports_torch": torch_loaded,
              "fit_softmax_wall_s": wall, "fit_softmax_fit_s": fit, "fit_softmax_outside_s": wall - fit,
              "target_info_s": TARGET_INFO_S, "predict_probe_s": predict["probe"],
              "predict_onnx_s": predict["onnx"],
              "predict_probe_median_s": statistics.median(predict["probe"]),
              "predict_onnx_median_s": statistics.median(predict["onnx"])}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "startup-cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    met = "yes" if result["info_median_s"] < TARGET_INFO_S and not torch_loaded else "**no**"
    table = "\n".join([
        "| Caltech-101 mini cache (2,020 x 1,280) | seconds | target | met |",
        "|---|---:|---:|:---:|",
        f"| `cnncodes info` (median of {args.repeats}; torch imported: {'yes' if torch_loaded else 'no'}) "
        f"| {result['info_median_s']:.2f} | < {TARGET_INFO_S} | {met} |",
        f"| `cnncodes fit-softmax` wall | {wall:.1f} | | |",
        f"| of which the fit | {fit:.1f} | | |",
        f"| of which outside the fit (imports: neither torch nor scikit-learn; reading codes) "
        f"| {wall - fit:.1f} | | |",
        f"| `cnncodes predict` of one photo, saved SVM (torch; median of {args.repeats}) "
        f"| {result['predict_probe_median_s']:.2f} | | |",
        f"| `cnncodes predict` of one photo, the same SVM exported to ONNX (no torch; median of "
        f"{args.repeats}) | {result['predict_onnx_median_s']:.2f} | | |",
        "",
        f"(2-core CPU, {result['date']}; `python benchmarks/startup.py`)",
    ])
    print(table)
    if args.update_readme and not update_readme(table, "startup-cpu"):
        print("neither README.md nor docs/*.md has bench:startup-cpu markers; not updated", file=sys.stderr)


if __name__ == "__main__":
    main()
