#!/usr/bin/env python3
"""Benchmark extraction beyond one process: torchrun ranks, WebDataset shards, the decode paths.

One run, same images, same machine (the extract benchmark's 512 evenly spaced Caltech photos,
EfficientNet-Lite0, taps blocks.4 and blocks.6, average pooling, batch 32):

- ``1 process``: `cnncodes extract` as usual (on a CPU: one lane per core);
- ``torchrun 2 x 1``: `torchrun --nproc-per-node 2 -m cnncodes extract` with one thread per
  rank (torchrun's default), the ranks sharing the cache's row blocks; its rate is rank 0's
  (rank 0 ends after every rank's rows are in the cache), its cache is compared bitwise with
  the single-process one;
- ``shards``: the same photos as WebDataset tar shards (64 per shard, written to a temporary
  folder), one process: what reading members in place costs against files; codes compared
  bitwise with those of the files;
- each with ``--runtime torch`` and ``--runtime auto``;
- decode paths: Caltech-mini's 2,020 photos through the exact Pillow path and through the
  ``--decode gpu`` code with torchvision's CPU JPEG decoder standing in for nvJPEG (this
  machine has no GPU): the codes' max and mean absolute difference, and a logistic-regression
  probe's test accuracy on each.

Example:
  python benchmarks/scale_out.py --repeats 3 --update-readme
Writes benchmarks/results/scale-out-cpu.json and prints Markdown tables.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

from extract import CALTECH, LAYERS, evenly_spaced, image_folder_order, run_measured, write_manifest
from readme_table import update_readme

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def extract_cmd(data, out: Path, runtime: str, ranks: int = 1) -> list[str]:
    head = [sys.executable, "-m", "cnncodes"] if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
         "-m", "cnncodes"]
    cmd = head + ["extract", str(data), "--out", str(out), "--overwrite", "--quiet", "--json",
                  "--batch-size", "32", "--runtime", runtime]
    for layer in LAYERS:
        cmd += ["--layer", layer]
    return cmd


def write_shards(files: list[Path], folder: Path, per_shard: int = 64) -> Path:
    import io
    import tarfile
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(0, len(files), per_shard):
        with tarfile.open(folder / f"train-{k // per_shard:06d}.tar", "w") as tf:
            for f in files[k:k + per_shard]:
                key = f"{f.parent.name}_{f.stem}"
                members = ((key + f.suffix.lower(), f.read_bytes()), (key + ".txt", f.parent.name.encode()))
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return folder


def same_codes(a: Path, b: Path, by_key: bool = False) -> bool:
    import numpy as np

    from cnncodes import extractor
    with extractor.open_cache(a) as ca, extractor.open_cache(b) as cb:
        order = None
        if by_key:  # b's rows are shard/key: match them to a's files
            index = {f"{Path(p).parent.name}_{Path(p).stem}": i for i, p in enumerate(ca.paths)}
            order = [index[p.split("/", 1)[1]] for p in cb.paths]
        for layer in ca.layers:
            x, y = ca.codes(layer), cb.codes(layer)
            if order is not None:
                x = x[order]
            if x.tobytes() != y.tobytes() or not np.array_equal(x, y):
                return False
    return True


def throughput(manifest: Path, shards: Path, tmp: Path, repeats: int) -> dict:
    cases = {}
    for runtime in ("torch", "auto"):
        one = tmp / f"one-{runtime}.h5"
        cases[f"1 process, --runtime {runtime}"] = (extract_cmd(manifest, one, runtime), None)
        cases[f"torchrun 2 x 1 thread, --runtime {runtime}"] = (
            extract_cmd(manifest, tmp / f"two-{runtime}.h5", runtime, ranks=2), tmp / f"one-{runtime}.h5")
        cases[f"shards, 1 process, --runtime {runtime}"] = (
            extract_cmd(shards, tmp / f"shards-{runtime}.h5", runtime), tmp / f"one-{runtime}.h5")
    rounds: dict[str, list] = {k: [] for k in cases}
    for r in range(repeats):
        for name, (cmd, _) in cases.items():
            res, wall, rss = run_measured(cmd)
            rounds[name].append((res["images_per_s"], wall, res["runtime"]))
            print(f"round {r + 1} {name}: {res['images_per_s']:.1f} img/s, wall {wall:.1f} s",
                  file=sys.stderr)
    out = {}
    for name, (cmd, ref) in cases.items():
        rates = [x[0] for x in rounds[name]]
        out[name] = {"images_per_s": round(statistics.median(rates), 1), "rounds": rates,
                     "wall_s": round(statistics.median(x[1] for x in rounds[name]), 1),
                     "runtime": rounds[name][-1][2]}
        if ref is not None:
            out[name]["bitwise_equal_to_1_process"] = same_codes(ref, Path(cmd[cmd.index("--out") + 1]),
                                                                 by_key="shards" in name)
    return out


def decode_difference(tmp: Path) -> dict:
    """Exact Pillow decoding vs the --decode gpu code (torchvision's CPU decoder), Caltech-mini."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from cnncodes.extractor.batching import encoded_batches, row_blocks
    from cnncodes.extractor.encoding import PreparedNetwork, make_encoder
    from cnncodes.extractor.layers import Probe
    from cnncodes.extractor.pooling import parse_pooling

    from cnncodes import extractor

    table = extractor.find_images(CALTECH)
    bb = extractor.load_backbone()
    probe = Probe(bb.model, bb.input_size, bb.name)
    taps = probe.resolve(["penultimate"])
    pooling, cpu = parse_pooling("avg"), torch.device("cpu")
    net = PreparedNetwork(bb, taps, pooling, cpu)
    codes = {}
    for decode in ("cpu", "gpu"):
        enc, ds = make_encoder(bb, probe, taps, pooling, cpu, "fp32", 32, {"penultimate": 1280}, "float32",
                               table, net, decode)
        with enc:
            parts = list(encoded_batches(enc, ds, row_blocks(np.arange(len(table)), 32), cpu, None))
        codes[decode] = np.concatenate([p[3]["penultimate"] for p in parts])
    a, b = codes["cpu"], codes["gpu"]
    diff = np.abs(a - b)
    splits = np.array(table.splits)
    acc = {}
    for decode, X in codes.items():
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
        clf.fit(X[splits == "train"], table.labels[splits == "train"])
        hits = clf.predict(X[splits == "test"]) == table.labels[splits == "test"]
        acc[decode] = round(float(hits.mean()), 4)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {"images": len(table), "layer": "penultimate (1280-d)",
            "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "largest_code": float(np.abs(a).max()), "mean_abs_code": float(np.abs(a).mean()),
            "max_rel_diff": float(diff.max() / np.abs(a).max()), "min_cosine": float(cos.min()),
            "probe_test_accuracy": {"exact (--decode cpu)": acc["cpu"],
                                    "tensor path (--decode gpu code, CPU decoder)": acc["gpu"]}}


def tables(res: dict) -> str:
    lines = ["| extraction (512 Caltech photos, Lite0, 2 taps) | runtime | images/s | wall s | codes |",
             "|---|---|---:|---:|---|"]
    for name, r in res["throughput"].items():
        same = {True: "bitwise = 1 process", False: "DIFFER", None: "-"}[r.get("bitwise_equal_to_1_process")]
        lines.append(f"| {name.split(', --runtime')[0]} | {r['runtime']} | {r['images_per_s']} | "
                     f"{r['wall_s']} | {same} |")
    d = res.get("decode")
    if d:
        acc = d["probe_test_accuracy"]
        lines += ["", "| decode path (Caltech-mini, 2,020 photos, penultimate) | max abs diff | "
                  "mean abs diff | min cosine | probe test accuracy |", "|---|---:|---:|---:|---:|",
                  f"| exact Pillow (`--decode cpu`, default) | - | - | - | "
                  f"{acc['exact (--decode cpu)']:.4f} |",
                  f"| `--decode gpu` code, torchvision CPU decoder | {d['max_abs_diff']:.3g} "
                  f"({d['max_rel_diff']:.1%} of the largest code) | {d['mean_abs_diff']:.3g} "
                  f"(codes average {d['mean_abs_code']:.3g}) | {d['min_cosine']:.4f} | "
                  f"{acc['tensor path (--decode gpu code, CPU decoder)']:.4f} |"]
    lines.append(f"\n{res['machine']}, {res['cores']} cores; `python benchmarks/scale_out.py --repeats "
                 f"{res['repeats']}`")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--skip-decode", action="store_true")
    ap.add_argument("--update-readme", action="store_true")
    args = ap.parse_args()
    files = evenly_spaced(image_folder_order(CALTECH / "train"), args.images)
    res = {"machine": platform.processor() or platform.machine(), "cores": os.cpu_count(),
           "repeats": args.repeats, "images": len(files)}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        manifest = write_manifest(tmp / "list.csv", files)
        shards = write_shards(files, tmp / "shards")
        res["throughput"] = throughput(manifest, shards, tmp, args.repeats)
        if not args.skip_decode:
            res["decode"] = decode_difference(tmp)
    out = HERE / "results" / "scale-out-cpu.json"
    out.write_text(json.dumps(res, indent=2) + "\n")
    table = tables(res)
    print(table)
    if args.update_readme:
        update_readme(table, "scale-out")


if __name__ == "__main__":
    main()
