#!/usr/bin/env python3
"""Benchmark the linear probes (`cnncodes fit-svm` / `fit-softmax`) against stock scikit-learn.

Every case runs each program as a new user would, in its own process, on the same codes, the
same C grid (1e-4 .. 1e2) and the same folds (StratifiedKFold(5, shuffle, random_state=0) over
the same rows in the same order); the speed-up is of the whole command's wall time (imports
and reading included) and of the fit alone.

Sections (``--only`` picks some):

- ``widths``: real codes of every width, EfficientNet-Lite0 on ../shared/datasets/caltech101-mini
  (blocks.0 .. bn2, 16 to 1,280 dimensions, and bn2 ``avgmax``, 2,560): the 102 classes, and
  the same photos with the classes merged into 10 (class index mod 10: non-separable,
  few classes, the hard case); the digits demo cache at three stages.
- ``busy``: the 1,280-d softmax fit while two other processes keep both cores busy.
- ``wide``: 36 images of 21,952-d codes (blocks.4, ``--pool none``), ``fit-svm --folds 2``.
- ``scale``: synthetic float16 caches of 50k .. 500k x 2,048 (Caltech codes repeated, with
  noise; 10 classes), time and peak memory of cnncodes alone (the peer would take hours).

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
TARGETS = {"speedup": 5.0, "accuracy_points": 0.5, "memory_x_codes": 3.0}
BLOCKS = ["blocks.0", "blocks.2", "blocks.4", "blocks.6", "bn2"]     # 16, 40, 112, 320, 1,280 dims
EXTRACTED = ["blocks.0", "blocks.1", "blocks.2", "blocks.3", "blocks.4", "blocks.5", "blocks.6", "bn2"]
SECTIONS = ("widths", "busy", "wide", "scale")
# runs a command and reports its peak resident memory (KiB) on stderr: /proc's VmHWM, which
# starts afresh with the program (ru_maxrss keeps the forking parent's peak across exec, so a
# benchmark process holding gigabytes would report them for every command it starts)
MAXRSS = ("import atexit, resource, runpy, sys; "
          "peak = lambda: next((int(l.split()[1]) for l in open('/proc/self/status') "
          "if l.startswith('VmHWM')), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); "
          "atexit.register(lambda: print('MAXRSS', peak(), "
          "file=sys.stderr)); sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__') "
          "if sys.argv[0].endswith('.py') else runpy.run_module(sys.argv[0], run_name='__main__', "
          "alter_sys=True)")


def run(cmd, timeout=None) -> dict:
    """The command's JSON output with its wall time and peak memory, or how it timed out."""
    t0 = time.perf_counter()
    # Python as users run it: this sandbox sets PYTHONDONTWRITEBYTECODE, which makes every
    # command compile its modules again (about 0.1 s of a small fit); the same for both programs
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    try:
        p = subprocess.run([sys.executable, "-c", MAXRSS, *map(str, cmd)], capture_output=True, text=True,
                           cwd=REPO, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"timed_out_after_s": round(time.perf_counter() - t0, 1)}
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{p.stderr[-2000:]}")
    out = json.loads(p.stdout[p.stdout.find("{"):])
    rss = [int(line.split()[1]) for line in p.stderr.splitlines() if line.startswith("MAXRSS")]
    return {**out, "wall_s": round(wall, 2), "peak_rss_gb": round(rss[-1] / 2**20, 3) if rss else None}


def extract(name: str, *args) -> Path:
    WORK.mkdir(exist_ok=True)
    cache = WORK / f"{name}.h5"
    subprocess.run([sys.executable, "-m", "cnncodes", "extract", *map(str, args), "--out", str(cache), "-q",
                    "--json"], cwd=REPO, check=True, capture_output=True)
    return cache


def write_cache(path: Path, layers: dict[str, np.ndarray], y, splits, classes, dtype="float32") -> Path:
    """A cache of the given codes (real codes, new labels or rows), as cnncodes writes them."""
    from cnncodes.extractor.cache import DONE, LayerSpec, create_cache
    from cnncodes.extractor.writer import CacheWriter
    n = len(y)
    if path.exists():
        path.unlink()
    create_cache(path, paths=[f"row{i}" for i in range(n)], labels=np.asarray(y), splits=list(splits),
                 classes=list(classes),
                 layers=[LayerSpec(k, v.shape[1], {"module": k, "kind": "input"}) for k, v in layers.items()],
                 attrs={"model": "benchmark", "weights": {"name": "none"}, "weights_sha256": "none",
                        "preprocessing": {}, "pooling": "avg", "dtype": dtype, "precision": "fp32",
                        "image_fingerprint": path.stem})
    with CacheWriter(path) as w:
        for lo in range(0, n, 8192):
            r = np.arange(lo, min(n, lo + 8192))
            w.add(r, np.full(len(r), DONE), [""] * len(r), {k: v[r] for k, v in layers.items()})
        w.commit()
    return path


def peer_npz(cache: Path, layer: str, merge: int | None = None) -> Path:
    from cnncodes.pipelines.probes.codes import load_codes
    c = load_codes(cache, layer)
    y = c.y % merge if merge else c.y
    tr, te = c.splits != "test", c.splits == "test"
    path = WORK / f"{cache.stem}-{layer}-{merge or 'all'}.npz"
    arrays = {"X_train": c.X[tr], "y_train": y[tr]}
    if te.any():
        arrays.update(X_test=c.X[te], y_test=y[te])
    np.savez(path, **arrays)
    return path


def merged_cache(cache: Path, layers: list[str], merge: int) -> Path:
    from cnncodes.pipelines.probes.codes import load_codes
    codes = {layer: load_codes(cache, layer) for layer in layers}
    c = codes[layers[0]]
    return write_cache(WORK / f"{cache.stem}-merged{merge}.h5", {k: v.X for k, v in codes.items()},
                       c.y % merge, c.splits, [f"group{i}" for i in range(merge)])


def ours(cache: Path, layer: str, clf: str, *extra, timeout=None) -> dict:
    r = run(["cnncodes", f"fit-{clf}", "--cache", cache, "--layer", layer, "--c-grid", GRID, "--json",
             *extra],
            timeout)
    keep = ("seconds", "wall_s", "peak_rss_gb", "C", "cv_accuracy", "test_accuracy", "solver", "n_train",
            "timed_out_after_s")
    return {k: r[k] for k in keep if k in r}


def peer(npz: Path, clf: str, timeout, *extra) -> dict:
    r = run([PEER, "--codes", npz, "--classifier", clf, "--c-grid", GRID, *extra], timeout)
    if "best_C" in r:
        r["C"] = r.pop("best_C")
    return r


def compare(o: dict, p: dict) -> dict:
    v = {"cnncodes": o, "peer": p}
    if "seconds" in p and "seconds" in o:
        v.update(speedup_wall=round(p["wall_s"] / o["wall_s"], 2),
                 speedup_fit=round(p["seconds"] / o["seconds"], 2),
                 cv_points=round(100 * (o["cv_accuracy"] - p["cv_accuracy"]), 2))
        if p.get("test_accuracy") is not None and o.get("test_accuracy") is not None:
            v["test_points"] = round(100 * (o["test_accuracy"] - p["test_accuracy"]), 2)
    elif "timed_out_after_s" in p and "wall_s" in o:
        v["speedup_wall_at_least"] = round(p["timed_out_after_s"] / o["wall_s"], 2)
    return v


def widths(args) -> list[dict]:
    blocks = extract("caltech-blocks", CALTECH, *sum((["-l", b] for b in EXTRACTED), []))
    avgmax = extract("caltech-avgmax", CALTECH, "-l", "blocks.5", "-l", "bn2", "--pool", "avgmax")
    merged = merged_cache(blocks, BLOCKS, 10)
    merged_wide = merged_cache(avgmax, ["bn2"], 10)
    digits = REPO / "cache" / "digits-efficientnet_lite0.h5"
    if not digits.exists():
        digits = extract("digits", REPO / "data" / "digits",
                         *sum((["-l", f"stage{i}"] for i in (1, 3, 5)), []))
    cases = [("Caltech, 10 merged classes", merged, blocks, 10, layer) for layer in BLOCKS]
    cases += [("Caltech, 10 merged classes", merged_wide, avgmax, 10, "bn2")]
    cases += [("Caltech, 102 classes", blocks, blocks, None, layer)
              for layer in ("blocks.0", "blocks.4", "bn2")]
    cases += [("Caltech, 102 classes", avgmax, avgmax, None, "bn2")]
    cases += [("digits", digits, digits, None, layer) for layer in ("stage1", "stage3", "stage5")]
    out = []
    for name, cache, source, merge, layer in cases:
        npz = peer_npz(source, layer, merge)
        for clf in ("svm", "softmax"):
            o = ours(cache, layer, clf)
            p = peer(npz, clf, args.peer_timeout)
            row = {"case": name, "layer": layer, "dim": int(np.load(npz)["X_train"].shape[1]),
                   "n_train": o.get("n_train"), "classifier": clf, **compare(o, p)}
            print(json.dumps(row), file=sys.stderr, flush=True)
            out.append(row)
    return out


def busy(args) -> list[dict]:
    blocks = extract("caltech-blocks", CALTECH, *sum((["-l", b] for b in EXTRACTED), []))
    npz = peer_npz(blocks, "bn2")
    out = []
    for clf in ("softmax",):
        hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(os.cpu_count() or 2)]
        try:
            o = ours(blocks, "bn2", clf)
            p = peer(npz, clf, args.peer_timeout)
        finally:
            for h in hogs:
                h.kill()
        quiet_o, quiet_p = ours(blocks, "bn2", clf), peer(npz, clf, args.peer_timeout)
        row = {"case": "Caltech, 102 classes, busy machine", "layer": "bn2", "classifier": clf,
               "quiet": compare(quiet_o, quiet_p), **compare(o, p)}
        for who, q, b in (("cnncodes", quiet_o, o), ("peer", quiet_p, p)):
            if "wall_s" in q and "wall_s" in b:
                row[f"{who}_slowdown"] = round(b["wall_s"] / q["wall_s"], 2)
        print(json.dumps(row), file=sys.stderr, flush=True)
        out.append(row)
    return out


def wide(args) -> list[dict]:
    import csv
    rows = sorted(p for p in CALTECH.rglob("*.jpg"))
    by_class: dict[str, list[Path]] = {}
    for p in rows:
        by_class.setdefault(p.parent.name, []).append(p)
    chosen = [(p, cls) for cls in sorted(by_class)[:3] for p in by_class[cls][:12]]
    WORK.mkdir(exist_ok=True)
    manifest = WORK / "wide36.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows([str(p), cls] for p, cls in chosen)
    cache = extract("wide36", manifest, "-l", "blocks.4", "--pool", "none")
    o = ours(cache, "blocks.4", "svm", "--folds", "2")
    npz = peer_npz(cache, "blocks.4")
    p = peer(npz, "svm", args.peer_timeout, "--folds", "2")
    row = {"case": "36 images, --pool none", "layer": "blocks.4",
           "dim": int(np.load(npz)["X_train"].shape[1]),
           "classifier": "svm", **compare(o, p)}
    print(json.dumps(row), file=sys.stderr, flush=True)
    return [row]


def scale(args) -> list[dict]:
    from cnncodes.pipelines.probes.codes import load_codes
    blocks = extract("caltech-blocks", CALTECH, *sum((["-l", b] for b in EXTRACTED), []))
    c = load_codes(blocks, "bn2")
    X0, y0 = c.X, c.y % 10
    X0 = np.concatenate([X0, X0[:, :768]], axis=1)                                 # 2,048-d
    sd = X0.std(0, keepdims=True)
    out = []
    for rows in args.scale_rows:
        rng = np.random.default_rng(0)
        path = WORK / f"scale-{rows}.h5"
        idx = np.arange(rows) % len(X0)
        X = np.empty((rows, X0.shape[1]), np.float16)
        for lo in range(0, rows, 50000):
            i = idx[lo:lo + 50000]
            X[lo:lo + len(i)] = (X0[i]
                                 + rng.normal(0, 1, (len(i), X0.shape[1])).astype(np.float32) * (1.5 * sd))
        write_cache(path, {"codes": X}, y0[idx], [""] * rows, [f"group{i}" for i in range(10)],
                    dtype="float16")
        del X
        codes_gb = rows * X0.shape[1] * 4 / 2**30
        for clf in ("svm", "softmax"):
            o = ours(path, "codes", clf)
            row = {"case": "synthetic, float16 cache", "rows": rows, "dim": X0.shape[1], "classifier": clf,
                   "codes_float32_gb": round(codes_gb, 3), "cnncodes": o,
                   "memory_x_codes": round(o["peak_rss_gb"] / codes_gb, 2) if o.get("peak_rss_gb") else None}
            print(json.dumps(row), file=sys.stderr, flush=True)
            out.append(row)
        path.unlink()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated: {', '.join(SECTIONS)}")
    ap.add_argument("--peer-timeout", type=float, default=240, help="seconds for the peer per fit")
    ap.add_argument("--scale-rows", type=lambda s: [int(v) for v in s.split(",")],
                    default=[50_000, 100_000, 200_000, 500_000])
    ap.add_argument("--update-readme", action="store_true")
    ap.add_argument("--readme-only", action="store_true",
                    help="rebuild the README table from benchmarks/results/classify-cpu.json, run nothing")
    args = ap.parse_args()
    saved = HERE / "results" / "classify-cpu.json"
    result = json.loads(saved.read_text()) if saved.exists() else {}
    if not args.readme_only:
        if result.get("benchmark") != "classify" or result.get("format") != 2:
            result = {}
        result.update({"benchmark": "classify", "format": 2, "device": "cpu", "cpus": os.cpu_count(),
                       "grid": GRID, "folds": 5, "targets": TARGETS})
        from cnncodes.extractor.provenance import library_versions
        result["versions"] = library_versions()
        saved.parent.mkdir(exist_ok=True)
        for section in args.only.split(","):  # saved after each: an interrupted run keeps the rest
            result[section] = {"date": time.strftime("%Y-%m-%d"), "rows": globals()[section](args)}
            saved.write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    print(table)
    if args.update_readme or args.readme_only:
        update_readme(table, "classify-cpu")


def _acc(v: dict, key: str) -> str:
    p, o = v["peer"].get(key), v["cnncodes"].get(key)
    return f"{'-' if p is None else f'{p:.3f}'} / {'-' if o is None else f'{o:.3f}'}"


def _speed(v: dict) -> str:
    if "speedup_wall" in v:
        return f"{v['speedup_wall']:.1f}x ({v['speedup_fit']:.1f}x)"
    if "speedup_wall_at_least" in v:
        return f">= {v['speedup_wall_at_least']:.1f}x"
    return "-"


def _secs(r: dict) -> str:
    if "wall_s" in r and "seconds" in r:
        return f"{r['wall_s']:.1f} ({r['seconds']:.1f})"
    return f"> {r['timed_out_after_s']:.0f}" if "timed_out_after_s" in r else "-"


def markdown(r: dict) -> str:
    rows = ["| case | layer (dim) | fit | peer s: wall (fit) | cnncodes s: wall (fit) | speed-up: wall (fit) "
            "| CV acc peer / cnncodes | test acc peer / cnncodes |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for section in ("widths", "busy", "wide"):
        for v in r.get(section, {}).get("rows", []):
            dim = f" ({v['dim']:,})" if "dim" in v else ""
            rows.append(f"| {v['case']} | {v['layer']}{dim} | {v['classifier']} | {_secs(v['peer'])} | "
                        f"{_secs(v['cnncodes'])} | {_speed(v)} | {_acc(v, 'cv_accuracy')} | "
                        f"{_acc(v, 'test_accuracy')} |")
    for v in r.get("busy", {}).get("rows", []):
        rows.append(f"| (busy machine: slowdown against quiet) | | {v['classifier']} | "
                    f"{v.get('peer_slowdown', '-')}x | {v.get('cnncodes_slowdown', '-')}x | | | |")
    out = "\n".join(rows)
    if r.get("scale"):
        s = ["| rows x dim (float16 cache) | fit | cnncodes wall s (fit) | peak memory GB | x float32 codes "
             "| CV acc |", "|---|---|---:|---:|---:|---:|"]
        for v in r["scale"]["rows"]:
            o = v["cnncodes"]
            s.append(f"| {v['rows']:,} x {v['dim']:,} | {v['classifier']} | {_secs(o)} | "
                     f"{o.get('peak_rss_gb', 0):.2f} | {v.get('memory_x_codes') or '-'} | "
                     f"{o.get('cv_accuracy', 0):.3f} |")
        out += "\n\n" + "\n".join(s)
    dates = sorted({r[s]["date"] for s in SECTIONS if s in r})
    t = r.get("targets", TARGETS)
    return out + (f"\n\n(targets: >= {t['speedup']}x the peer's wall time within {t['accuracy_points']} "
                  f"points; peak memory <= {t['memory_x_codes']}x the float32 codes. "
                  f"{r.get('cpus')}-core CPU, "
                  f"{', '.join(dates)}; `python benchmarks/classify.py`)")


if __name__ == "__main__":
    main()
