#!/usr/bin/env python3
"""Benchmark `cnncodes extract` against the reference peers and the forward-only ceiling.

One run, same images, same machine, each program in its own process:

- 512 evenly spaced images of ../shared/datasets/caltech101-mini/train (the peers' --limit 512),
  EfficientNet-Lite0 (packaged ImageNet weights), taps blocks.4 and blocks.6, average pooling;
- ``naive``, ``tuned`` and ``onnx``: ../shared/peers/extract_peer.py (``onnx``: the tuned
  peer's truncated pass exported with torch.onnx.export and run by ONNX Runtime);
- ``cnncodes``: the real CLI writing a real HDF5 cache, with ``--runtime auto`` (the fastest
  installed inference runtime, OpenVINO here) and with ``--runtime torch`` (PyTorch's own
  forward pass, the rate before runtimes);
- ``ceiling``: the same truncated, BN-folded model cnncodes runs, timed on tensors decoded
  beforehand, on all cores at once and as one single-threaded pass per core, the faster of the
  two (what cnncodes would reach if decoding and writing were free);
- ``runtime ceiling``: the same for the runtime ``auto`` picks (its compiled graph on
  pre-decoded uint8 batches, one request per core);
- codes: per layer, the largest difference of each runtime's codes to PyTorch's on the same
  photos, relative to the layer's largest value;
- memory: peak RSS of `cnncodes extract` on 500 and on 2,000 images (it should stream).

Throughput is images / seconds of each program's own extraction loop (model loading excluded
for all, as the peers report it); whole-process wall times are recorded too. Rounds are
interleaved and the median is reported, because a shared 2-core machine is noisy.

Example:
  python benchmarks/extract.py --repeats 3 --update-readme
Writes benchmarks/results/extract-<device>.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from readme_table import publish, update_readme

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = REPO.parent / "shared"
CALTECH = SHARED / "datasets" / "caltech101-mini"
PEER = SHARED / "peers" / "extract_peer.py"
LAYERS = ["blocks.4", "blocks.6"]
TARGETS = {"vs_naive": 1.8, "vs_tuned": 1.1, "of_ceiling": 0.80, "memory_ratio": 1.10,
           "vs_onnx": 1.5, "vs_torch_runtime": 1.25, "of_runtime_ceiling": 0.8}


def evenly_spaced(files: list[Path], n: int) -> list[Path]:
    import numpy as np
    idx = np.linspace(0, len(files) - 1, n).astype(int)
    return [files[i] for i in idx]


def image_folder_order(root: Path) -> list[Path]:
    """The order torchvision's ImageFolder lists files in (so the subset equals the peers')."""
    out = []
    for cls in sorted(e.name for e in os.scandir(root) if e.is_dir()):
        out += [root / cls / f for f in sorted(os.listdir(root / cls))]
    return out


def write_manifest(path: Path, files: list[Path]) -> Path:
    path.write_text("path,label\n" + "".join(f"{f},{f.parent.name}\n" for f in files))
    return path


def run_measured(cmd: list[str], cwd: Path = REPO, env: dict | None = None) -> tuple[dict, float, float]:
    """Run a command (in ``cwd``, with ``env``); return its JSON stdout, wall seconds and peak RSS
    (MiB, from wait4())."""
    t0 = time.perf_counter()
    # stderr goes to a file: reading two pipes one after the other can deadlock.
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=cwd, env=env)
        out_chunks = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        err.seek(0)
        err_chunks = err.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err_chunks[-2000:]}")
    start = out_chunks.find("{")
    return json.loads(out_chunks[start:]), wall, usage.ru_maxrss / 1024


def cnncodes_cmd(manifest: Path, out: Path, device: str, batch_size: int, runtime: str = "auto") -> list[str]:
    cmd = [sys.executable, "-m", "cnncodes", "extract", str(manifest), "--out", str(out),
           "--overwrite", "--quiet", "--json", "--device", device, "--batch-size", str(batch_size),
           "--runtime", runtime]
    for layer in LAYERS:
        cmd += ["--layer", layer]
    return cmd


def ceiling(manifest: Path, device: str, batch_size: int) -> dict:
    """In-process: the engine's own prepared model on pre-decoded tensors, after a warm-up.

    On a CPU it is timed both ways the forward pass can use the cores: one pass over all of
    them, and cnncodes' lanes (one single-threaded pass per core at a time); the ceiling is the
    faster, so it is what cnncodes would reach if decoding and writing were free, at the least.
    """
    import torch

    from cnncodes.extractor.batching import _torch_threads, micro_batch_size
    from cnncodes.extractor.encoding import prepare_model
    from cnncodes.extractor.layers import Probe, Tapper
    from cnncodes.extractor.pooling import parse_pooling

    from cnncodes import extractor
    dev = torch.device(device)
    table = extractor.find_images(manifest)
    bb = extractor.load_backbone()
    probe = Probe(bb.model, bb.input_size)
    taps = probe.resolve(LAYERS)
    net = prepare_model(bb, taps, dev)
    micro = micro_batch_size(dev, batch_size, probe, taps)  # exactly as the engine runs it
    split = bb.split
    batches = []
    for lo in range(0, len(table), batch_size):
        x = torch.stack([split.pil(extractor.load_rgb(table.absolute(i)))
                         for i in range(lo, min(lo + batch_size, len(table)))])
        batches.append(split.batch(x).contiguous(memory_format=torch.channels_last))
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else None

    def forward(x):
        with torch.inference_mode():
            x = x.to(dev, non_blocking=True)
            for i in range(0, len(x), micro):
                if autocast:
                    with autocast:
                        out = tap(x[i:i + micro])
                else:
                    out = tap(x[i:i + micro])
                for v in out.values():
                    v.float().cpu()

    def lane(x):
        torch.set_num_threads(1)
        forward(x)

    def timed(run) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    schedules = {}
    with Tapper(net, taps, parse_pooling("avg")) as tap:
        forward(batches[0][:micro])  # warm-up
        schedules["one pass on all cores"] = timed(lambda: [forward(x) for x in batches])
        if dev.type == "cpu" and torch.get_num_threads() > 1:
            from concurrent.futures import ThreadPoolExecutor
            n = torch.get_num_threads()
            with _torch_threads(1), ThreadPoolExecutor(n) as pool:
                list(pool.map(lane, batches[:n]))  # warm-up
                schedules["one pass per core"] = timed(lambda: list(pool.map(lane, batches)))
    dt = min(schedules.values())
    return {"images": len(table), "seconds": round(dt, 3), "images_per_s": round(len(table) / dt, 2),
            "schedules_images_per_s": {k: round(len(table) / v, 2) for k, v in schedules.items()}}


def runtime_ceiling(manifest: Path, batch_size: int) -> dict:
    """In-process: the graph ``--runtime auto`` compiles, on uint8 batches decoded beforehand
    (as the decoders hand them over), one request per core at a time, after a warm-up."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from cnncodes.extractor import runtimes
    from cnncodes.extractor.batching import collate
    from cnncodes.extractor.encoding import PreparedNetwork
    from cnncodes.extractor.images import Content
    from cnncodes.extractor.layers import Probe
    from cnncodes.extractor.pooling import parse_pooling

    from cnncodes import extractor
    table = extractor.find_images(manifest)
    bb = extractor.load_backbone()
    taps = Probe(bb.model, bb.input_size).resolve(LAYERS)
    wanted = runtimes.resolve_runtime("auto", torch.device("cpu"), "fp32")
    prepared = PreparedNetwork(bb, taps, parse_pooling("avg"), torch.device("cpu"), wanted)
    rt = prepared.tapper
    if rt is None:
        return {"runtime": "torch", "images_per_s": None}
    split = bb.split
    batches = []
    for lo in range(0, len(table), batch_size):
        items = [(i, split.pil(extractor.load_rgb(table.absolute(i))), "", Content())
                 for i in range(lo, min(lo + batch_size, len(table)))]
        x = collate(items)[1]
        batches.append(x if rt.takes_uint8 else split.batch(x))
    n = max(1, torch.get_num_threads())
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(rt, batches[:n]))  # warm-up: every lane's request
        t0 = time.perf_counter()
        list(pool.map(rt, batches))
        dt = time.perf_counter() - t0
    return {"runtime": prepared.runtime, "images": len(table), "seconds": round(dt, 3),
            "images_per_s": round(len(table) / dt, 2)}


def code_differences(torch_cache: Path, caches: dict[str, Path]) -> dict[str, dict[str, float]]:
    """Per runtime and layer: max |runtime - torch| / max |torch| over the same images."""
    import h5py
    import numpy as np
    out = {}
    with h5py.File(torch_cache) as ref:
        for name, path in caches.items():
            with h5py.File(path) as f:
                out[name] = {"runtime": str(f.attrs["runtime"])}
                for layer in LAYERS:
                    a, b = f["codes"][layer][()], ref["codes"][layer][()]
                    out[name][layer] = float(np.abs(a - b).max() / np.abs(b).max())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--update-readme", action="store_true", help="rewrite the README's table")
    ap.add_argument("--readme-only", action="store_true",
                    help="rebuild the README table from the saved JSON without running anything")
    ap.add_argument("--ceiling-only", metavar="MANIFEST", help=argparse.SUPPRESS)
    ap.add_argument("--runtime-ceiling-only", metavar="MANIFEST", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.readme_only:
        saved = json.loads((HERE / "results" / f"extract-{args.device}.json").read_text())
        saved["memory"] = {int(k): v for k, v in saved["memory"].items()}
        update_readme(markdown(saved), f"extract-{args.device}")
        return
    if args.ceiling_only:
        print(json.dumps(ceiling(Path(args.ceiling_only), args.device, args.batch_size)))
        return
    if args.runtime_ceiling_only:
        print(json.dumps(runtime_ceiling(Path(args.runtime_ceiling_only), args.batch_size)))
        return

    tmp = Path(tempfile.mkdtemp(prefix="cnncodes-bench-"))
    train = image_folder_order(CALTECH / "train")
    manifest = write_manifest(tmp / "subset.csv", evenly_spaced(train, args.images))
    everything = image_folder_order(CALTECH / "train") + image_folder_order(CALTECH / "test")
    m500 = write_manifest(tmp / "m500.csv", evenly_spaced(everything, 500))
    m2000 = write_manifest(tmp / "m2000.csv", evenly_spaced(everything, 2000))

    peer = lambda kind: [sys.executable, str(PEER), "--peer", kind, "--images", str(CALTECH / "train"),
                         "--limit", str(args.images), "--batch-size", str(args.batch_size)] + \
        [a for layer in LAYERS for a in ("--layer", layer)]
    runs = {"naive": [], "tuned": [], "onnx": [], "cnncodes": [], "cnncodes-torch": [], "ceiling": [],
            "runtime-ceiling": []}
    for r in range(args.repeats):
        for name in runs:
            if name in ("naive", "tuned", "onnx"):
                cmd = peer(name)
            elif name == "cnncodes":
                cmd = cnncodes_cmd(manifest, tmp / "codes.h5", args.device, args.batch_size)
            elif name == "cnncodes-torch":
                cmd = cnncodes_cmd(manifest, tmp / "codes-torch.h5", args.device, args.batch_size, "torch")
            elif name == "ceiling":
                cmd = [sys.executable, str(HERE / "extract.py"), "--ceiling-only", str(manifest),
                       "--device", args.device, "--batch-size", str(args.batch_size)]
            else:
                cmd = [sys.executable, str(HERE / "extract.py"), "--runtime-ceiling-only", str(manifest),
                       "--batch-size", str(args.batch_size)]
            res, wall, rss = run_measured(cmd)
            if res.get("images_per_s") is None:  # no runtime installed: no runtime ceiling
                runs[name].append({"images_per_s": None, "runtime": res.get("runtime")})
                continue
            runs[name].append({"images_per_s": res["images_per_s"], "seconds": res["seconds"],
                               **({"runtime": res["runtime"]} if "runtime" in res else {}),
                               "process_wall_s": round(wall, 2), "peak_rss_mib": round(rss, 1),
                               **({"schedules_images_per_s": res["schedules_images_per_s"]}
                                  if "schedules_images_per_s" in res else {})})
            print(f"round {r + 1} {name:9s} {res['images_per_s']:7.1f} img/s  "
                  f"(loop {res['seconds']:.1f}s, process {wall:.1f}s, {rss:.0f} MiB)", file=sys.stderr)

    mem = {}
    for n, m in ((500, m500), (2000, m2000)):
        res, wall, rss = run_measured(cnncodes_cmd(m, tmp / f"mem{n}.h5", args.device, args.batch_size))
        mem[n] = {"images": res["images"], "peak_rss_mib": round(rss, 1), "images_per_s": res["images_per_s"]}
        print(f"memory {n}: {rss:.0f} MiB peak", file=sys.stderr)

    others = {}
    for rt in ("openvino", "onnxruntime"):
        try:
            run_measured(cnncodes_cmd(manifest, tmp / f"codes-{rt}.h5", args.device, args.batch_size, rt))
            others[rt] = tmp / f"codes-{rt}.h5"
        except SystemExit:
            print(f"{rt}: not installed or cannot run", file=sys.stderr)
    codes = code_differences(tmp / "codes-torch.h5", others)

    med = {k: statistics.median(x["images_per_s"] for x in v) if all(x["images_per_s"] for x in v) else None
           for k, v in runs.items()}
    ratios = {"vs_naive": med["cnncodes"] / med["naive"], "vs_tuned": med["cnncodes"] / med["tuned"],
              "of_ceiling": med["cnncodes-torch"] / med["ceiling"],  # PyTorch's path vs its own ceiling
              "memory_ratio": mem[2000]["peak_rss_mib"] / mem[500]["peak_rss_mib"],
              "vs_onnx": med["cnncodes"] / med["onnx"],
              "vs_torch_runtime": med["cnncodes"] / med["cnncodes-torch"],
              "of_runtime_ceiling": med["cnncodes"] / med["runtime-ceiling"] if med["runtime-ceiling"]
              else 0.0}
    met = {k: (v <= TARGETS[k] if k == "memory_ratio" else v >= TARGETS[k]) for k, v in ratios.items()}
    import torch
    result = {
        "benchmark": "extract", "device": args.device,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None},
        "settings": {"images": args.images, "batch_size": args.batch_size, "layers": LAYERS,
                     "pooling": "avg", "model": "efficientnet_lite0", "repeats": args.repeats},
        "median_images_per_s": {k: round(v, 2) for k, v in med.items()},
        "runs": runs, "memory": mem, "codes_vs_torch": codes,
        "ratios": {k: round(v, 3) for k, v in ratios.items()}, "targets": TARGETS, "met": met,
        "versions": __import__("cnncodes.extractor.provenance", fromlist=["x"]).library_versions(),
        "date": time.strftime("%Y-%m-%d"),
    }
    publish(result, HERE / "results" / f"extract-{args.device}.json", markdown(result),
            f"extract-{args.device}", args.update_readme)


def markdown(r: dict) -> str:
    m, x, t, ok = r["median_images_per_s"], r["ratios"], r["targets"], r["met"]
    yes = lambda k: "yes" if ok[k] else "**no**"
    runtime = next((run.get("runtime") for run in r["runs"]["cnncodes"] if run.get("runtime")), "?")
    rows = [
        "| extract, 512 Caltech images, Lite0 `blocks.4`+`blocks.6` | images/s (median of "
        f"{r['settings']['repeats']}) | cnncodes is | target | met |",
        "|---|---:|---:|---:|:---:|",
        f"| peer `naive` | {m['naive']:.1f} | {x['vs_naive']:.2f}x | >= {t['vs_naive']}x | "
        f"{yes('vs_naive')} |",
        f"| peer `tuned` | {m['tuned']:.1f} | {x['vs_tuned']:.2f}x | >= {t['vs_tuned']}x | "
        f"{yes('vs_tuned')} |",
        f"| peer `onnx` (ONNX Runtime) | {m['onnx']:.1f} | {x['vs_onnx']:.2f}x | >= {t['vs_onnx']}x | "
        f"{yes('vs_onnx')} |",
        f"| `cnncodes extract --runtime torch` (PyTorch's forward pass) | {m['cnncodes-torch']:.1f} | "
        f"{x['vs_torch_runtime']:.2f}x | >= {t['vs_torch_runtime']}x | {yes('vs_torch_runtime')} |",
        f"| forward-only ceiling, PyTorch | {m['ceiling']:.1f} | `--runtime torch` reaches "
        f"{x['of_ceiling']:.2f} of it | >= {t['of_ceiling']} | {yes('of_ceiling')} |",
        f"| forward-only ceiling, {runtime} | {(m['runtime-ceiling'] or 0):.1f} | "
        f"{x['of_runtime_ceiling']:.2f} of it | >= {t['of_runtime_ceiling']} | {yes('of_runtime_ceiling')} |",
        f"| **cnncodes** (`--runtime auto`: {runtime}) | **{m['cnncodes']:.1f}** | | | |",
        f"| peak memory, 2,000 vs 500 images | {r['memory'][2000]['peak_rss_mib']:.0f} vs "
        f"{r['memory'][500]['peak_rss_mib']:.0f} MiB | {x['memory_ratio']:.2f}x | <= {t['memory_ratio']}x | "
        f"{yes('memory_ratio')} |",
    ]
    codes = r.get("codes_vs_torch") or {}
    if codes:
        rows += ["", "| codes vs PyTorch's (max difference / layer's max, 512 photos) | "
                 + " | ".join(f"`{layer}`" for layer in LAYERS) + " |",
                 "|---|" + "---:|" * len(LAYERS)]
        rows += [f"| {v['runtime']} | " + " | ".join(f"{v[layer]:.1e}" for layer in LAYERS) + " |"
                 for v in codes.values()]
    dev = r["machine"]["gpu"] or f"{r['machine']['cpus']}-core CPU"
    return "\n".join(rows) + (f"\n\n({r['device']}: {dev}, {r['date']}; "
                              f"`python benchmarks/extract.py --repeats {r['settings']['repeats']}`)")


if __name__ == "__main__":
    main()
