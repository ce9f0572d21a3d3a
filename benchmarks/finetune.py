#!/usr/bin/env python3
"""The transfer-learning strategies on real photos: `cnncodes compare` on
../shared/datasets/caltech101-mini (102 classes, 1,515 train / 505 test) with EfficientNet-Lite0.

Linear SVM on the penultimate codes vs fine-tuning the top stage vs fine-tuning everything vs
training from scratch, all with cnncodes' defaults except the epoch counts; the same splits and
seed. Writes benchmarks/results/finetune-<device>.json and a Markdown table (README with
--update-readme). The run folder (benchmarks/.work/compare-caltech) keeps finished strategies,
so an interrupted benchmark resumes; --fresh starts again.

With --versus-peer it runs instead `cnncodes finetune DATA --stages head:F,all:E` (its defaults
otherwise: the head started from the linear probe, SGD, reduced decoding) and
../shared/peers/finetune_peer.py (fastai's `fine_tune(E, freeze_epochs=F)` on the same backbone
and weights) on each DATA (train/ and test/ folders; the same test images), one after the other,
and writes benchmarks/results/finetune-peer-<device>.json and its table.

Examples:
  python benchmarks/finetune.py --head-epochs 1 --epochs 2 --update-readme
  python benchmarks/finetune.py --versus-peer ../shared/datasets/caltech101-mini --head-epochs 1 --epochs 3
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
    ap.add_argument("--versus-peer", nargs="+", metavar="DATA",
                    help="cnncodes finetune against fastai's fine_tune on these data folders.")
    args = ap.parse_args()
    if args.versus_peer:
        versus_peer(args)
        return
    if args.readme_only:
        for path in sorted((HERE / "results").glob("finetune-*.json")):
            r = json.loads(path.read_text())
            peer = r["benchmark"] == "finetune-peer"
            update_readme((peer_markdown if peer else markdown)(r), f"{r['benchmark']}-{r['device']}")
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


def _json_run(cmd: list[str]) -> tuple[dict, float]:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout[p.stdout.index("{"):]), time.perf_counter() - t0


def versus_peer(args) -> None:
    """cnncodes finetune and fastai's fine_tune, the same epochs on the same data, one after the
    other (so neither shares the cores with the other)."""
    import torch

    from cnncodes.extractor.provenance import library_versions
    rows = []
    for data in args.versus_peer:
        data = Path(data).resolve()
        peer_script = REPO.parent / "shared" / "peers" / "finetune_peer.py"
        peer, peer_wall = _json_run([sys.executable, str(peer_script), "--data", str(data),
                                     "--epochs", str(args.epochs), "--freeze-epochs", str(args.head_epochs)])
        out = WORK.parent / "versus-peer" / data.name
        ours, ours_wall = _json_run([sys.executable, "-m", "cnncodes", "finetune", str(data), "--out",
                                     str(out), "--overwrite", "--stages",
                                     f"head:{args.head_epochs},all:{args.epochs}", "--device", args.device,
                                     "--json", "-q"])
        rows.append({"data": data.name, "train_images": peer["train_images"],
                     "test_images": peer["test_images"],
                     "peer_test_accuracy": peer["test_accuracy"], "peer_seconds": peer["seconds"],
                     "peer_process_s": round(peer_wall, 1), "cnncodes_test_accuracy": ours["test_accuracy"],
                     "cnncodes_seconds": ours["seconds"], "cnncodes_process_s": round(ours_wall, 1),
                     "head_init": ours.get("head_init"), "fastai": peer.get("fastai"),
                     "head_epochs": args.head_epochs, "epochs": args.epochs,
                     "date": time.strftime("%Y-%m-%d")})
        print(rows[-1], file=sys.stderr)
    device = "cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    path = HERE / "results" / f"finetune-peer-{device}.json"
    if path.exists():  # rows of other data sets or epochs measured before are kept
        rows = [r for r in json.loads(path.read_text())["rows"]
                if (r["data"], r.get("head_epochs"), r.get("epochs")) not in
                {(n["data"], n["head_epochs"], n["epochs"]) for n in rows}] + rows
    result = {"benchmark": "finetune-peer", "device": device, "date": time.strftime("%Y-%m-%d"), "rows": rows,
              "device_name": f"{torch.get_num_threads()}-thread CPU" if device == "cpu"
              else torch.cuda.get_device_name(), "versions": library_versions()}
    (HERE / "results").mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    table = peer_markdown(result)
    print(table)
    if args.update_readme:
        update_readme(table, f"finetune-peer-{device}")


def peer_markdown(r: dict) -> str:
    lines = ["| data, Lite0 | head + all epochs | fastai `fine_tune` test acc | cnncodes `finetune` test "
             "acc | fastai s | cnncodes s |", "|---|---:|---:|---:|---:|---:|"]
    for row in r["rows"]:
        lines.append(f"| {row['data']} ({row['train_images']} train / {row['test_images']} test) | "
                     f"{row.get('head_epochs', 1)} + {row.get('epochs', 3)} | "
                     f"{row['peer_test_accuracy']:.4f} | {row['cnncodes_test_accuracy']:.4f} | "
                     f"{row['peer_seconds']:.0f} | {row['cnncodes_seconds']:.0f} |")
    return "\n".join(lines) + (f"\n\n({r['device_name']}, {r['date']}; `python benchmarks/finetune.py "
                               f"--versus-peer DATA --head-epochs F --epochs E`)")


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
