"""Report files of ``cnncodes compare``: ``compare.csv``, ``compare.json``, ``compare.md``,
``compare.png`` (accuracy and training time per strategy) and a self-contained ``index.html``."""
from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd

from extractor.engine import library_versions

from .sweep_report import embed_png

HEAD = ["strategy", "what", "test acc", "best val/CV acc", "train time (s)", "s/epoch", "epochs",
        "trainable params"]


def _fmt(v, spec) -> str:
    return "-" if v is None or (isinstance(v, float) and pd.isna(v)) else format(v, spec)


def table_rows(df: pd.DataFrame) -> list[list[str]]:
    return [[r["strategy"], r["what"], _fmt(r["test_accuracy"], ".4f"), _fmt(r["best_val_accuracy"], ".4f"),
             _fmt(r["train_seconds"], ".1f"), _fmt(r["seconds_per_epoch"], ".1f"),
             _fmt(r["epochs"], ".0f"), _fmt(r["trainable_params"], ",.0f")] for _, r in df.iterrows()]


def plot_compare(df: pd.DataFrame, path: Path, title: str) -> None:
    """Test accuracy per strategy (bars) beside its training time (bars, log scale)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_acc, ax_t) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    names = list(df["strategy"])
    acc = [0 if v is None or pd.isna(v) else v for v in df["test_accuracy"]]
    bars = ax_acc.bar(names, acc, color=["#4c72b0", "#55a868", "#c44e52", "#8172b2"][:len(names)])
    ax_acc.bar_label(bars, fmt="%.3f", fontsize=9)
    ax_acc.set_ylim(0, 1.05)
    ax_acc.set_ylabel("test accuracy")
    secs = [0 if v is None or pd.isna(v) else v for v in df["train_seconds"]]
    bars = ax_t.bar(names, secs, color="#999999")
    ax_t.bar_label(bars, fmt="%.0f s", fontsize=9)
    ax_t.set_yscale("log")
    ax_t.set_ylabel("training time (s, log scale)")
    for ax in (ax_acc, ax_t):
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_compare_report(df: pd.DataFrame, directory: str | Path) -> dict[str, Path]:
    out = Path(directory)
    files = {"csv": out / "compare.csv", "json": out / "compare.json", "markdown": out / "compare.md",
             "plot": out / "compare.png", "html": out / "index.html"}
    settings = df.attrs.get("settings", {})
    df[[c for c in df.columns if c != "stages"]].to_csv(files["csv"], index=False)
    plot_compare(df, files["plot"], f"{settings.get('model')} on {Path(str(settings.get('data'))).name}")
    conclusion = df.attrs.get("conclusion", [])
    summary = {"rows": json.loads(df.to_json(orient="records")), "conclusion": conclusion,
               "settings": settings, "seconds": df.attrs.get("seconds"), "versions": library_versions()}
    files["json"].write_text(json.dumps(summary, indent=2) + "\n")
    rows = table_rows(df)
    md = ["# Transfer-learning strategies", "", *[f"- {c}" for c in conclusion], "",
          "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    md += ["", "![accuracy and training time](compare.png)", ""]
    files["markdown"].write_text("\n".join(md))
    trs = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    files["html"].write_text(f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cnncodes compare</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }}
table {{ border-collapse: collapse; font-size: 14px; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
th {{ background: #f0f0f0; }} td:nth-child(-n+2), th:nth-child(-n+2) {{ text-align: left; }}
img {{ max-width: 100%; border: 1px solid #ddd; margin: 1em 0; }}
.small {{ color: #666; font-size: 13px; }}
</style></head><body>
<h1>Transfer-learning strategies: {html.escape(str(settings.get('model')))} on {html.escape(str(settings.get('data')))}</h1>
<ul id="conclusion">{''.join(f'<li>{html.escape(c)}</li>' for c in conclusion)}</ul>
<table id="compare-table"><thead><tr>{''.join(f'<th>{html.escape(h)}</th>' for h in HEAD)}</tr></thead>
<tbody>{trs}</tbody></table>
<p class="small">Every strategy is scored on the same test split. The probe's "val" column is its
cross-validated accuracy on train; fine-tuning holds out a stratified share of train for
validation (seed {settings.get('seed')}). Training time of the probe includes extracting its codes.</p>
<div id="compare-plot">{embed_png(files['plot'], 'accuracy and training time per strategy')}</div>
<p class="small">Made by cnncodes in {df.attrs.get('seconds')} s; settings in compare.json.</p>
</body></html>
""")
    return files
