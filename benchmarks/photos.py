#!/usr/bin/env python3
"""Phone-size photos: `cnncodes extract` on 12-megapixel JPEGs against the ONNX Runtime peer, its
own rate on small photos, and what the reduced decode does to codes and to probe accuracy.

The photos are built from ../shared/datasets/caltech101-mini the same way every time (into
benchmarks/.work/photos/, kept between runs; nothing is committed):

- ``large``: N evenly spaced training photos (the peers' --limit order), each enlarged with
  Pillow's bicubic filter to 4032 x 3024 (3024 x 4032 when taller than wide: what a 12 MP
  phone camera writes) and saved as JPEG quality 90 (4:2:0). An enlarged photo holds less fine
  detail than a camera's, so its JPEG is smaller (about 1 MB against 2-5 MB) and quicker to
  entropy-decode; ``--noise`` adds seeded sensor-like noise for camera-sized files.
- ``phone``: all 2,020 photos (train and test), the short side enlarged to 600, 1,200 or 3,024
  px in turn, so each JPEG DCT scale (1/2, 1/4, 1/8 of a 256 px resize) is taken by a third.

Measured in one run, rounds interleaved, medians reported (a shared 2-core machine is noisy):

- images/s of each program's own extraction loop (model loading excluded, as the peers report
  it) on ``large``: the ``onnx`` peer (../shared/peers/extract_peer.py), cnncodes with default
  settings (``--decode auto``: ``reduced`` for a new cache), cnncodes ``--decode exact`` (the
  path of every cache before ``reduced``); and cnncodes with default settings on the same N
  photos at their original size;
- codes: per layer, the cosine of each photo's reduced codes to its exact ones (mean, min) and
  the largest difference relative to the layer's largest value (``large`` and ``phone``);
- accuracy: ``cnncodes fit-svm`` test accuracy on the penultimate codes of ``phone`` decoded
  both ways (and of the original photos, where ``reduced`` is the exact decode bitwise: no
  Caltech photo is twice the resize).

Example:
  python benchmarks/photos.py --repeats 3 --update-readme
Writes benchmarks/results/photos-<device>.json and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from extract import CALTECH, PEER, evenly_spaced, image_folder_order, run_measured, write_manifest
from readme_table import publish, update_readme

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / ".work" / "photos"
LAYERS = ["blocks.4", "blocks.6"]
TARGETS = {"vs_onnx": 4.0, "of_small": 0.6, "cosine": 0.995, "accuracy_points": 0.3}


def _enlarge(job: tuple[str, str, int | None, int, float]) -> None:
    """Write one enlarged JPEG: ``(source, target, short side or None for 4032 x 3024, seed,
    noise std)``; skipped when the target exists (the builder resumes)."""
    import numpy as np
    from PIL import Image
    src, dst, short, seed, noise = job
    dst = Path(dst)
    if dst.exists():
        return
    img = Image.open(src).convert("RGB")
    w, h = img.size
    if short is None:
        size = (4032, 3024) if w >= h else (3024, 4032)
    else:
        size = (round(short * w / min(w, h)), round(short * h / min(w, h)))
    img = img.resize(size, Image.Resampling.BICUBIC)
    if noise:
        rng = np.random.default_rng(seed)
        a = np.asarray(img, dtype=np.float32) + rng.normal(0, noise, (size[1], size[0], 1)).astype(np.float32)
        img = Image.fromarray(np.clip(a + 0.5, 0, 255).astype(np.uint8))
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    img.save(tmp, "JPEG", quality=90)
    os.replace(tmp, dst)  # a killed builder never leaves half a photo under the final name


def build(n: int, noise: float) -> tuple[Path, Path, Path]:
    """The ``large`` folder, a manifest of the same photos at their original size, and the
    ``phone`` folder (built once; rerun to finish an interrupted build)."""
    train = image_folder_order(CALTECH / "train")
    chosen = evenly_spaced(train, n)
    large = WORK / (f"large-{n}" + (f"-noise{noise:g}" if noise else ""))
    jobs = [(str(f), str(large / f.parent.name / f.name), None, i, noise) for i, f in enumerate(chosen)]
    phone = WORK / "phone"
    every = [(s, f) for s in ("train", "test") for f in image_folder_order(CALTECH / s)]
    jobs += [(str(f), str(phone / s / f.parent.name / f.name), (600, 1200, 3024)[i % 3], i, 0.0)
             for i, (s, f) in enumerate(every)]
    todo = [j for j in jobs if not Path(j[1]).exists()]
    if todo:
        print(f"building {len(todo)} photos in {WORK} ...", file=sys.stderr)
        with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
            list(pool.map(_enlarge, todo, chunksize=8))
    WORK.mkdir(parents=True, exist_ok=True)
    return large, write_manifest(WORK / f"small-{n}.csv", chosen), phone


def extract_cmd(data: Path, out: Path, device: str, batch_size: int, *extra: str,
                layers=LAYERS) -> list[str]:
    cmd = [sys.executable, "-m", "cnncodes", "extract", str(data), "--out", str(out), "--overwrite",
           "--quiet", "--json", "--device", device, "--batch-size", str(batch_size), *extra]
    for layer in layers:
        cmd += ["--layer", layer]
    return cmd


def code_agreement(exact: Path, reduced: Path, layers) -> dict:
    """Per layer: cosine of each row's reduced codes to its exact ones (mean, min), and the
    largest difference relative to the layer's largest value."""
    import h5py
    import numpy as np
    out = {}
    with h5py.File(exact) as a, h5py.File(reduced) as b:
        assert a.attrs["decode"] == "exact" and b.attrs["decode"] == "reduced"
        for layer in layers:
            x, y = a["codes"][layer][()].astype(np.float64), b["codes"][layer][()].astype(np.float64)
            cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
            out[layer] = {"cosine_mean": round(float(cos.mean()), 5),
                          "cosine_min": round(float(cos.min()), 5),
                          "max_rel_diff": round(float(np.abs(x - y).max() / np.abs(x).max()), 4)}
    return out


def fit_svm(cache: Path) -> dict:
    res, _, _ = run_measured([sys.executable, "-m", "cnncodes", "fit-svm", "--cache", str(cache),
                              "--layer", "penultimate", "--json"])
    return {"test_accuracy": res["test_accuracy"], "cv_accuracy": res["cv_accuracy"], "C": res["C"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--images", type=int, default=120, help="large photos in the speed rounds")
    ap.add_argument("--noise", type=float, default=0.0,
                    help="std of seeded noise added to the large photos (0: plain enlargements)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--update-readme", action="store_true", help="rewrite the README's table")
    ap.add_argument("--readme-only", action="store_true",
                    help="rebuild the README table from the saved JSON without running anything")
    args = ap.parse_args()
    out_json = HERE / "results" / f"photos-{args.device}.json"
    if args.readme_only:
        update_readme(markdown(json.loads(out_json.read_text())), f"photos-{args.device}")
        return
    large, small, phone = build(args.images, args.noise)
    sizes = [p.stat().st_size for p in large.rglob("*.jpg")]
    tmp = WORK / "caches"
    tmp.mkdir(parents=True, exist_ok=True)
    programs = {
        "onnx": [sys.executable, str(PEER), "--peer", "onnx", "--images", str(large), "--batch-size",
                 str(args.batch_size)] + [a for layer in LAYERS for a in ("--layer", layer)],
        "cnncodes": extract_cmd(large, tmp / "large-reduced.h5", args.device, args.batch_size),
        "cnncodes-small": extract_cmd(small, tmp / "small.h5", args.device, args.batch_size),
        "cnncodes-exact": extract_cmd(large, tmp / "large-exact.h5", args.device, args.batch_size,
                                      "--decode", "exact"),
    }
    runs = {k: [] for k in programs}
    for r in range(args.repeats):
        for name, cmd in programs.items():
            res, wall, rss = run_measured(cmd)
            runs[name].append({"images_per_s": res["images_per_s"], "seconds": res["seconds"],
                               **({"runtime": res["runtime"]} if "runtime" in res else {}),
                               "process_wall_s": round(wall, 2), "peak_rss_mib": round(rss, 1)})
            print(f"round {r + 1} {name:15s} {res['images_per_s']:7.1f} img/s  (loop {res['seconds']:.1f}s, "
                  f"process {wall:.1f}s, {rss:.0f} MiB)", file=sys.stderr)
    med = {k: statistics.median(x["images_per_s"] for x in v) for k, v in runs.items()}

    codes = {"large": code_agreement(tmp / "large-exact.h5", tmp / "large-reduced.h5", LAYERS)}
    accuracy = {}
    for name, data in (("phone", phone), ("original", CALTECH)):
        for decode in ("exact", "reduced"):
            path = tmp / f"{name}-{decode}.h5"
            run_measured(extract_cmd(data, path, args.device, args.batch_size, "--decode", decode,
                                     layers=["stage4", "penultimate"]))
            accuracy.setdefault(name, {})[decode] = fit_svm(path)
            print(f"{name} {decode}: {accuracy[name][decode]}", file=sys.stderr)
        codes[name] = code_agreement(tmp / f"{name}-exact.h5", tmp / f"{name}-reduced.h5",
                                     ["stage4", "penultimate"])
        accuracy[name]["points"] = round(100 * abs(accuracy[name]["reduced"]["test_accuracy"]
                                                   - accuracy[name]["exact"]["test_accuracy"]), 2)

    ratios = {"vs_onnx": med["cnncodes"] / med["onnx"], "of_small": med["cnncodes"] / med["cnncodes-small"],
              "vs_exact": med["cnncodes"] / med["cnncodes-exact"]}
    cos_min_mean = min(v["cosine_mean"] for d in codes.values() for v in d.values())
    met = {"vs_onnx": ratios["vs_onnx"] >= TARGETS["vs_onnx"],
           "of_small": ratios["of_small"] >= TARGETS["of_small"],
           "cosine": cos_min_mean >= TARGETS["cosine"],
           "accuracy_points": all(a["points"] <= TARGETS["accuracy_points"] for a in accuracy.values())}
    import torch
    result = {
        "benchmark": "photos", "device": args.device,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None},
        "settings": {"images": args.images, "noise": args.noise, "batch_size": args.batch_size,
                     "layers": LAYERS,
                     "model": "efficientnet_lite0", "repeats": args.repeats,
                     "large_jpeg_mb_mean": round(statistics.mean(sizes) / 1e6, 2)},
        "median_images_per_s": {k: round(v, 2) for k, v in med.items()}, "runs": runs,
        "ratios": {k: round(v, 3) for k, v in ratios.items()}, "codes": codes, "accuracy": accuracy,
        "targets": TARGETS, "met": met,
        "versions": __import__("cnncodes.extractor.provenance", fromlist=["x"]).library_versions(),
        "date": time.strftime("%Y-%m-%d"),
    }
    publish(result, out_json, markdown(result), f"photos-{args.device}", args.update_readme)


def markdown(r: dict) -> str:
    m, x, t, ok, s = r["median_images_per_s"], r["ratios"], r["targets"], r["met"], r["settings"]
    yes = lambda k: "yes" if ok[k] else "**no**"
    rows = [
        f"| extract, {s['images']} photos at 4032 x 3024 (JPEG q90, {s['large_jpeg_mb_mean']} MB mean), "
        f"Lite0 `blocks.4`+`blocks.6` | images/s (median of {s['repeats']}) | cnncodes is | target | met |",
        "|---|---:|---:|---:|:---:|",
        f"| peer `onnx` (ONNX Runtime) | {m['onnx']:.1f} | {x['vs_onnx']:.2f}x | >= {t['vs_onnx']}x | "
        f"{yes('vs_onnx')} |",
        f"| cnncodes `--decode exact` (every cache's path before `reduced`) | {m['cnncodes-exact']:.1f} | "
        f"{x['vs_exact']:.2f}x | | |",
        f"| cnncodes on the same photos at their original size (~0.07 MP) | {m['cnncodes-small']:.1f} | "
        f"{x['of_small']:.2f} of it | >= {t['of_small']} | {yes('of_small')} |",
        f"| **cnncodes** (defaults: `--decode reduced`) | **{m['cnncodes']:.1f}** | | | |",
        "",
        "| reduced vs exact decode | layer | cosine mean | cosine min | max diff / layer max |",
        "|---|---|---:|---:|---:|",
    ]
    for name, layers in r["codes"].items():
        rows += [f"| {name} | `{layer}` | {v['cosine_mean']:.4f} | {v['cosine_min']:.4f} | "
                 f"{v['max_rel_diff']:.3f} |" for layer, v in layers.items()]
    rows += ["", "| linear SVM on `penultimate`, Caltech-mini test accuracy | exact | reduced | difference |",
             "|---|---:|---:|---:|"]
    label = {"phone": "enlarged to phone sizes (1/2, 1/4, 1/8 scales)", "original": "original photos"}
    for name, a in r["accuracy"].items():
        rows.append(f"| {label.get(name, name)} | {a['exact']['test_accuracy']:.4f} | "
                    f"{a['reduced']['test_accuracy']:.4f} | {a['points']:.2f} points |")
    dev = r["machine"]["gpu"] or f"{r['machine']['cpus']}-core CPU"
    return "\n".join(rows) + (f"\n\n({r['device']}: {dev}, {r['date']}; "
                              f"`python benchmarks/photos.py --repeats {s['repeats']}"
                              + (f" --noise {s['noise']:g}" if s["noise"] else "") + "`)")


if __name__ == "__main__":
    main()
