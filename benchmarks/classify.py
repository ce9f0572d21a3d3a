#!/usr/bin/env python3
"""Benchmark `cnncodes fit-svm` / `fit-softmax` against the stock scikit-learn peer.

One run, same codes, same C grid (1e-4 .. 1e2), same folds (StratifiedKFold(5, shuffle,
random_state=0) over the same rows in the same order), each program in its own process:

1. Caltech-101 codes: ../shared/datasets/caltech101-mini through EfficientNet-Lite0,
   ``penultimate`` (1,280-d); cross-validation on train (1,515), scored on test (505).
2. A 20,000 x 2,048 matrix built from those training codes: rows repeated, features
   [codes, codes[:, :768]], Gaussian noise of 0.1 x each feature's std; cross-validation only.
   The peer gets --peer-timeout seconds there (it can take hours); the target for cnncodes is
   the whole grid in under 5 minutes.

Example:
  python benchmarks/classify.py --update-readme
Writes benchmarks/results/classify-cpu.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from readme_table import update_readme

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = REPO.parent / "shared"
CALTECH = SHARED / "datasets" / "caltech101-mini"
PEER = SHARED / "peers" / "classify_peer.py"
WORK = HERE / ".work"
GRID = "1e-4,1e-3,1e-2,1e-1,1,10,100"
TARGETS = {"speedup": 5.0, "accuracy_points": 0.5, "big_seconds": 300.0}


def sh(cmd, timeout=None) -> tuple[dict | None, float]:
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{p.stderr[-2000:]}")
    out = p.stdout[p.stdout.find("{"):]
    return json.loads(out), time.perf_counter() - t0


def caltech_cache() -> Path:
    WORK.mkdir(exist_ok=True)
    cache = WORK / "caltech-lite0.h5"
    sh([sys.executable, "-m", "cnncodes", "extract", str(CALTECH), "--out", str(cache), "-q", "--json"])
    return cache


def peer_npz(cache: Path) -> Path:
    from cnncodes.pipelines.probes.codes import load_codes
    c = load_codes(cache, "penultimate")
    tr, te = c.splits != "test", c.splits == "test"
    path = WORK / "caltech-codes.npz"
    np.savez(path, X_train=c.X[tr], y_train=c.y[tr], X_test=c.X[te], y_test=c.y[te])
    return path


def big_matrix(cache: Path, rows: int, dim: int, seed: int = 0) -> tuple[Path, Path]:
    from cnncodes.extractor.cache import DONE, LayerSpec, create_cache
    from cnncodes.extractor.writer import CacheWriter

    from cnncodes.pipelines.probes.codes import load_codes
    c = load_codes(cache, "penultimate")
    tr = c.splits != "test"
    X0, y0 = c.X[tr], c.y[tr]
    rng = np.random.default_rng(seed)
    idx = np.arange(rows) % len(X0)
    X = np.concatenate([X0, X0[:, : dim - X0.shape[1]]], axis=1)[idx]
    X = (X + rng.normal(0, 1, X.shape) * (0.1 * X.std(0, keepdims=True))).astype(np.float32)
    y = y0[idx]
    h5 = WORK / f"big-{rows}x{dim}.h5"
    if h5.exists():
        h5.unlink()
    create_cache(h5, paths=[f"row{i}" for i in range(rows)], labels=y, splits=[""] * rows, classes=c.classes,
                 layers=[LayerSpec("penultimate", dim, {"module": "synthetic", "kind": "input"})],
                 attrs={"model": "synthetic", "weights": {"name": "none"}, "weights_sha256": "none",
                        "preprocessing": {}, "pooling": "avg", "dtype": "float32", "precision": "fp32",
                        "image_fingerprint": "synthetic"})
    with CacheWriter(h5) as w:
        for lo in range(0, rows, 4096):
            r = np.arange(lo, min(rows, lo + 4096))
            w.add(r, np.full(len(r), DONE), [""] * len(r), {"penultimate": X[r]})
        w.commit()
    npz = WORK / f"big-{rows}x{dim}.npz"
    np.savez(npz, X_train=X, y_train=y)
    return h5, npz


def ours(cache: Path, classifier: str, solver: str = "auto", timeout: float | None = None) -> dict:  # noqa: D103
    res, wall = sh([sys.executable, "-m", "cnncodes", f"fit-{classifier}", "--cache", str(cache),
                    "--layer", "penultimate", "--c-grid", GRID, "--solver", solver, "--json"],
                   timeout=timeout)
    if res is None:
        return {"timed_out_after_s": round(wall, 1), "solver": solver}
    return {"seconds": res["seconds"], "process_wall_s": round(wall, 2), "C": res["C"],
            "cv_accuracy": res["cv_accuracy"], "test_accuracy": res["test_accuracy"], "solver": res["solver"]}


def peer(npz: Path, classifier: str, timeout: float | None) -> dict:
    res, wall = sh([sys.executable, str(PEER), "--codes", str(npz), "--classifier", classifier,
                    "--c-grid", GRID], timeout=timeout)
    if res is None:
        return {"timed_out_after_s": round(wall, 1)}
    return {"seconds": res["seconds"], "process_wall_s": round(wall, 2), "C": res["best_C"],
            "cv_accuracy": res["cv_accuracy"], "test_accuracy": res.get("test_accuracy")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--big-rows", type=int, default=20000)
    ap.add_argument("--big-dim", type=int, default=2048)
    ap.add_argument("--peer-timeout", type=float, default=600,
                    help="seconds for the peer on the big matrix; 0 skips it")
    ap.add_argument("--caltech-peer-timeout", type=float, default=1800,
                    help="seconds for the peer on the Caltech codes (a lower bound of the speed-up is "
                         "reported past it)")
    ap.add_argument("--sklearn-timeout", type=float, default=900,
                    help="seconds for `--solver sklearn`, the accuracy reference of the torch solver; "
                         "0 skips it")
    ap.add_argument("--skip-big", action="store_true")
    ap.add_argument("--update-readme", action="store_true")
    ap.add_argument("--readme-only", action="store_true",
                    help="rebuild the README table from benchmarks/results/classify-cpu.json, run nothing")
    args = ap.parse_args()
    if args.readme_only:
        result = json.loads((HERE / "results" / "classify-cpu.json").read_text())
        write_table(markdown(result, args), update=True)
        return
    cache = caltech_cache()
    npz = peer_npz(cache)
    result = {"benchmark": "classify", "device": "cpu", "cpus": os.cpu_count(), "grid": GRID, "folds": 5,
              "date": time.strftime("%Y-%m-%d"), "targets": TARGETS, "caltech": {}, "big": {}}
    for clf in ("svm", "softmax"):
        p = peer(npz, clf, args.caltech_peer_timeout)
        o = ours(cache, clf)
        v = {"peer": p, "cnncodes": o}
        if "seconds" in p:
            v.update(speedup=round(p["seconds"] / o["seconds"], 2),
                     cv_points=round(100 * (o["cv_accuracy"] - p["cv_accuracy"]), 2),
                     test_points=round(100 * (o["test_accuracy"] - p["test_accuracy"]), 2))
        else:
            v["speedup_at_least"] = round(p["timed_out_after_s"] / o["seconds"], 2)
        # the reference: scikit-learn, same grid and folds
        if o["solver"] == "torch" and args.sklearn_timeout:
            ref = ours(cache, clf, "sklearn", args.sklearn_timeout)
            v["sklearn_solver"] = ref
            if "seconds" in ref:
                v["torch_vs_sklearn_points"] = {k: round(100 * (o[k] - ref[k]), 2)
                                                for k in ("cv_accuracy", "test_accuracy")}
        result["caltech"][clf] = v
        print(clf, json.dumps(result["caltech"][clf]), file=sys.stderr)
    saved = HERE / "results" / "classify-cpu.json"
    if args.skip_big and saved.exists():  # keep the last full run's big-matrix figures, marked as such
        result["big"] = {k: {**v, "from_run_of": json.loads(saved.read_text()).get("date")}
                         for k, v in json.loads(saved.read_text()).get("big", {}).items()}
    if not args.skip_big:
        h5, big_npz = big_matrix(cache, args.big_rows, args.big_dim)
        for clf in ("svm", "softmax"):
            o = ours(h5, clf)
            p = peer(big_npz, clf, args.peer_timeout) if args.peer_timeout else {"skipped": True}
            result["big"][clf] = {"cnncodes": o, "peer": p}
            print("big", clf, json.dumps(result["big"][clf]), file=sys.stderr)
    from cnncodes.extractor.provenance import library_versions
    result["versions"] = library_versions()
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "classify-cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    write_table(markdown(result, args), args.update_readme)


def write_table(table: str, update: bool) -> None:
    print(table)
    if update:
        update_readme(table, "classify-cpu")


def markdown(r: dict, args) -> str:
    t = r["targets"]
    rows = ["| fit, C grid 1e-4..1e2 x 5 folds | peer s | cnncodes s | speed-up | CV acc peer / cnncodes | "
            "test acc peer / cnncodes |",
            "|---|---:|---:|---:|---:|---:|"]
    for clf, v in r["caltech"].items():
        p, o = v["peer"], v["cnncodes"]
        if "seconds" in p:
            rows.append(f"| Caltech 1,515 x 1,280, `fit-{clf}` ({o['solver']}) | {p['seconds']:.1f} | "
                        f"{o['seconds']:.1f} | "
                        f"{v['speedup']:.1f}x | {p['cv_accuracy']:.4f} / {o['cv_accuracy']:.4f} | "
                        f"{p['test_accuracy']:.4f} / {o['test_accuracy']:.4f} |")
        else:
            rows.append(f"| Caltech 1,515 x 1,280, `fit-{clf}` ({o['solver']}) | "
                        f"> {p['timed_out_after_s']:.0f} | "
                        f"{o['seconds']:.1f} | >= {v['speedup_at_least']:.1f}x | "
                        f"- / {o['cv_accuracy']:.4f} | "
                        f"- / {o['test_accuracy']:.4f} |")
    for clf, v in r["caltech"].items():
        if "sklearn_solver" in v and "timed_out_after_s" in v["sklearn_solver"]:
            rows.append(f"| Caltech, `fit-{clf} --solver sklearn` (reference for the torch solver) | | "
                        f"> {v['sklearn_solver']['timed_out_after_s']:.0f} | | not finished | not finished |")
        elif "sklearn_solver" in v:
            ref, o, d = v["sklearn_solver"], v["cnncodes"], v["torch_vs_sklearn_points"]
            rows.append(f"| Caltech, `fit-{clf} --solver sklearn` (reference for the torch solver) | | "
                        f"{ref['seconds']:.1f} | "
                        f"torch {ref['seconds'] / o['seconds']:.1f}x faster | "
                        f"{ref['cv_accuracy']:.4f} (torch {d['cv_accuracy']:+.2f} pt) | "
                        f"{ref['test_accuracy']:.4f} (torch {d['test_accuracy']:+.2f} pt) |")
    for clf, v in r["big"].items():
        p, o = v["peer"], v["cnncodes"]
        ps = f"{p['seconds']:.1f}" if "seconds" in p else (f"> {p['timed_out_after_s']:.0f}"
                                                           if "timed_out_after_s" in p else "not run")
        pa = f"{p['cv_accuracy']:.4f}" if "cv_accuracy" in p else "-"
        rows.append(f"| {args.big_rows:,} x {args.big_dim:,}, `fit-{clf}` ({o['solver']}) | {ps} | "
                    f"{o['seconds']:.1f} | | "
                    f"{pa} / {o['cv_accuracy']:.4f} | - |")
    return "\n".join(rows) + (f"\n\n(targets: >= {t['speedup']}x the peer within "
                              f"{t['accuracy_points']} points; the "
                              f"{args.big_rows:,} x {args.big_dim:,} grid < {t['big_seconds']:.0f} s. "
                              f"{r['cpus']}-core CPU, "
                              f"{r['date']}; `python benchmarks/classify.py`)")


if __name__ == "__main__":
    main()
