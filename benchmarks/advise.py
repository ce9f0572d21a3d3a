#!/usr/bin/env python3
"""`cnncodes advise` checked against reality: its advice against the best strategy measured, per
data set, and against a rule that reads the data's size alone.

For each data set (train/ and test/ folders):

1. ``advise`` recommends a strategy from a sample (its figures, in about a minute);
2. the strategies are measured on the whole data, every one scored on the same test images:
   a linear SVM on the codes of every stage (one extraction), and ``compare``'s fine-tuning
   strategies ``top`` (the head, then the top stage) and ``all`` (the head, then everything),
   each with the same epochs; when the advice unfreezes from another stage, that run too;
3. the *regret* of a rule on a data set is the best test accuracy measured minus the accuracy of
   the strategy the rule chose. The size-only rule is the classic table's rows without its
   columns: small data (under 100 images per class) a linear probe on the top layer, medium
   data fine-tune the top stage, large data (1,000 per class or more) fine-tune everything.

Data sets: the shared digits and Caltech-101 photos, and Omniglot's handwritten alphabets
(benchmarks/datasets.py builds it; nothing like ImageNet); Omniglot's 242 characters with
--data (not measured yet). Writes
benchmarks/results/advise-<device>.json and its table (README and docs/advise.md with
--update-readme). Finished runs are kept in benchmarks/.work/advise/, so an interrupted benchmark
resumes (compare's strategies and the runs are resumable themselves).

Examples:
  python benchmarks/advise.py --omniglot-source /path/to/omniglot-git-mirror --update-readme
  python benchmarks/advise.py --data digits,caltech101-mini --head-epochs 1 --epochs 2
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from datasets import TASKS, build_omniglot
from readme_table import publish

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = REPO.parent / "shared" / "datasets"
WORK = HERE / ".work" / "advise"
DATASETS = ("digits", "caltech101-mini", *TASKS)
# The default run: omniglot-characters (242 classes of 15) is built and advised like the others,
# but its fine-tuning (about 35 minutes of a 2-core CPU) has not been measured yet; add it with
# --data to measure it.
DEFAULT_DATA = ("omniglot-alphabets", "digits", "caltech101-mini")


def data_folder(name: str, omniglot_source: str | None) -> Path:
    """The data set's folder, built first where it is built from a public source."""
    if name == "digits":
        from cnncodes.pipelines.sample_data import write_digits
        write_digits(WORK / "data" / "digits")
        return WORK / "data" / "digits"
    if name in TASKS:
        build_omniglot(WORK / "data" / name, name, omniglot_source)
        return WORK / "data" / name
    return SHARED / name


def size_only(per_class_median: float, top: str) -> str:
    """The classic rule's rows without its columns (the size thresholds are advise's)."""
    from cnncodes.pipelines.advise.rule import size_class
    return {"small": f"probe:{top}", "medium": "top", "large": "all"}[size_class(per_class_median)]


def advised_key(rec: dict, top_stage: str) -> str:
    """The measured strategy an advice names: ``probe:<layer>``, ``top``, ``all`` or
    ``from:<stage>``."""
    if rec["strategy"] == "linear probe":
        return f"probe:{rec['layer']}"
    start = rec["unfreeze_from"]
    return "all" if start == "all" else "top" if start == top_stage else f"from:{start}"


def probes(data: Path, out: Path, model: str, seed: int, also: str | None = None) -> dict:
    """Test accuracy of a linear SVM on every stage's codes, and on ``also`` when the advice
    names another layer (one extraction, kept)."""
    from cnncodes.extractor import extract, list_layers

    from cnncodes.pipelines.probes.classifiers import fit_linear_probe
    from cnncodes.pipelines.probes.codes import load_codes
    _, aliases = list_layers(model, "none")
    stages = sorted(a for a in aliases if a.startswith("stage"))
    stages += [also] if also and also not in stages else []
    ex = extract(data, out / "codes.h5", model=model, layers=stages, progress=False)
    acc = {}
    for layer in stages:
        codes = load_codes(ex.path, layer)
        fit = fit_linear_probe(codes, layer, "svm", seed=seed, solver="auto", folds=5)
        acc[f"probe:{layer}"] = round(float(fit.test_accuracy), 4)
    return acc


def finetunes(data: Path, out: Path, model: str, head_epochs: int, epochs: int,
              extra: list[str], seed: int = 0) -> tuple[dict, dict]:
    """``compare``'s top and all strategies, plus a run from each stage in ``extra``."""
    from cnncodes.pipelines.compare.strategies import compare
    from cnncodes.pipelines.finetune.training import FinetuneConfig, finetune
    r = compare(data, model, out=out / "compare", head_epochs=head_epochs, epochs=epochs,
                strategies=("top", "all"), config=FinetuneConfig(str(data), "", seed=seed), progress=False)
    acc, seconds = {}, {}
    for row in r.table.to_dict("records"):
        acc[row["strategy"]] = round(float(row["test_accuracy"]), 4)
        seconds[row["strategy"]] = row["train_seconds"]
    for stage in extra:
        cfg = FinetuneConfig(str(data), str(out / "runs" / f"from-{stage}"), model=model, seed=seed,
                             stages=f"head:{head_epochs},{stage}:{epochs}")
        run = finetune(cfg, resume=True, overwrite=True, progress=False)
        acc[f"from:{stage}"] = round(float(run.test_accuracy), 4)
        seconds[f"from:{stage}"] = run.train_seconds
    return acc, seconds


def one(name: str, args) -> dict:
    from cnncodes.pipelines.advise.runner import advise
    from cnncodes.pipelines.compare.strategies import _top_stage
    data = data_folder(name, args.omniglot_source)
    out = WORK / name
    t0 = time.perf_counter()
    adv = advise(data, args.model, seed=args.seed).as_dict()
    advice_seconds = time.perf_counter() - t0
    rec = adv["recommendation"]
    top = _top_stage(args.model)
    chosen = advised_key(rec, top)
    accuracy = probes(data, out, args.model, args.seed, rec["layer"])
    extra = [chosen.split(":", 1)[1]] if chosen.startswith("from:") else []
    ft, seconds = finetunes(data, out, args.model, args.head_epochs, args.epochs, extra, args.seed)
    accuracy.update(ft)
    best = max(accuracy, key=accuracy.get)
    baseline = size_only(adv["size"]["per_class_median"], top)
    row = {"data": name, "train_images": adv["size"]["train_images"], "classes": adv["size"]["classes"],
           "per_class_median": adv["size"]["per_class_median"], "size": rec["size"],
           "imagenet_head": adv["imagenet_head"],
           "probe_cv": {r["layer"]: r.get("probe_accuracy") for r in adv["layers"]},
           "similarity": rec["similarity"], "advice": chosen, "advice_headline": rec["strategy"],
           "best": best, "accuracy": accuracy, "finetune_seconds": seconds,
           "regret": round(accuracy[best] - accuracy[chosen], 4),
           "size_only": baseline, "size_only_regret": round(accuracy[best] - accuracy[baseline], 4),
           "advice_seconds": round(advice_seconds, 1), "command": rec["command"]}
    keys = ("data", "advice", "best", "regret", "size_only", "size_only_regret")
    print(json.dumps({k: row[k] for k in keys}), flush=True)
    return row


def markdown(r: dict) -> str:
    def pct(x):
        return f"{100 * x:.1f}"
    lines = ["| data | images/class | advice | measured best | regret | size-only rule | its regret |",
             "|---|---:|---|---|---:|---|---:|"]
    for row in r["rows"]:
        acc = row["accuracy"]
        lines.append(f"| {row['data']} | {row['per_class_median']:g} "
                     f"| {row['advice']} ({pct(acc[row['advice']])}) "
                     f"| {row['best']} ({pct(acc[row['best']])}) | {pct(row['regret'])} "
                     f"| {row['size_only']} ({pct(acc[row['size_only']])}) "
                     f"| {pct(row['size_only_regret'])} |")
    lines.append(f"| **sum** | | | | **{pct(r['regret_sum'])}** | "
                 f"| **{pct(r['size_only_regret_sum'])}** |")
    lines.append("")
    lines.append(f"Test accuracy in %, regret in points. Fine-tuning: head {r['head_epochs']} + "
                 f"{r['epochs']} epochs, cnncodes' defaults; probes: linear SVM per stage. "
                 f"{r['device_name']}, {r['date']}; `{r['command']}`.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=",".join(DEFAULT_DATA),
                    help=f"Comma-separated, of {', '.join(DATASETS)} [default: {','.join(DEFAULT_DATA)}].")
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--head-epochs", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--omniglot-source", help="A folder or git mirror with the Omniglot zips [GitHub].")
    ap.add_argument("--update-readme", action="store_true")
    ap.add_argument("--readme-only", action="store_true", help="Rewrite the tables from the saved JSON.")
    ap.add_argument("--from-rows", action="store_true",
                    help="Publish the data sets an interrupted run finished (its rows.json), not run any.")
    args = ap.parse_args()
    if args.readme_only:
        for path in sorted((HERE / "results").glob("advise-*.json")):
            r = json.loads(path.read_text())
            publish(r, path, markdown(r), f"advise-{r['device']}", True)
        return
    names = [n for n in args.data.split(",") if n]
    unknown = sorted(set(names) - set(DATASETS))
    if unknown:
        raise SystemExit(f"unknown data set(s) {', '.join(unknown)}; choose from {', '.join(DATASETS)}")
    import torch

    from cnncodes.extractor.provenance import library_versions
    t0 = time.perf_counter()
    rows = json.loads((WORK / "rows.json").read_text()) if args.from_rows else []
    for n in [] if args.from_rows else names:  # the rows so far are kept after each data set
        rows.append(one(n, args))
        WORK.mkdir(parents=True, exist_ok=True)
        (WORK / "rows.json").write_text(json.dumps(rows, indent=2) + "\n")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where compare's runs went (auto)
    result = {"benchmark": "advise", "device": device,
              "device_name": torch.cuda.get_device_name() if device == "cuda"
              else f"{torch.get_num_threads()}-thread CPU",
              "date": time.strftime("%Y-%m-%d"), "head_epochs": args.head_epochs, "epochs": args.epochs,
              "rows": rows, "regret_sum": round(sum(r["regret"] for r in rows), 4),
              "size_only_regret_sum": round(sum(r["size_only_regret"] for r in rows), 4),
              "wall_seconds": round(time.perf_counter() - t0, 1),
              "command": "python benchmarks/advise.py " + " ".join(
                  a for a in sys.argv[1:] if a not in ("--update-readme", "--from-rows")),
              "versions": library_versions()}
    path = HERE / "results" / f"advise-{device}.json"
    publish(result, path, markdown(result), f"advise-{device}", args.update_readme)


if __name__ == "__main__":
    main()
