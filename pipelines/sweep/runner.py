"""Layer sweep: which layer of which backbone should a linear classifier read?

For every backbone, all requested layers come from ONE forward pass into one cache (an existing
cache gains only the layers it lacks). Every layer is scored with LogME (training-free) and, for
each classifier, cross-validated like ``fit-svm`` / ``fit-softmax``. Each finished fit is stored
in ``<report>/fits/`` under a key made of the cache's recipe and the fit's settings, so an
interrupted sweep resumes where it stopped and a rerun redoes nothing.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import pandas as pd
from tqdm.auto import tqdm

from cnncodes.extractor import DEFAULT_MODEL, extract, list_layers
from cnncodes.extractor.engine import default_cache_path

from cnncodes.pipelines.probes.artifacts import save_model
from cnncodes.pipelines.probes.classifiers import CLASSIFIERS, cache_summary, fit_linear_probe, parse_c_grid, split_rows
from cnncodes.pipelines.probes.codes import load_codes
from cnncodes.pipelines.probes.logme import logme
from cnncodes.pipelines.records import read_record, write_record

log = logging.getLogger(__name__)

STAGES = ("stage1", "stage2", "stage3", "stage4", "stage5")
COLUMNS = ["model", "layer", "module", "classifier", "dim", "stride", "relative_depth", "gflops", "logme",
           "fitted", "C", "cv_accuracy", "cv_std", "test_accuracy", "balanced_accuracy", "macro_f1",
           "fit_seconds", "n_train", "n_test", "model_file"]


def sweep_layers(model: str, spec="all-stages") -> list[str]:
    """The layer names a sweep of ``model`` covers.

    ``all-stages`` is ``stage1``..``stage5`` and ``penultimate``, leaving out ``penultimate``
    when it is only the pooled last stage (ResNets, EfficientNets: the same codes twice).
    Otherwise a comma-separated list (or a sequence) of names and aliases, as for ``extract``.
    """
    if isinstance(spec, str) and spec != "all-stages":
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    if spec != "all-stages":
        if not spec:
            raise ValueError("--layers must name at least one layer, or be all-stages.")
        return list(dict.fromkeys(spec))
    _, aliases = list_layers(model)
    names = [s for s in STAGES if s in aliases]
    pen = aliases.get("penultimate")
    last = aliases[names[-1]] if names else None
    if pen is not None and not (last is not None and pen.flops <= last.flops * 1.001):
        names.append("penultimate")
    return names


def _fit_key(attrs: dict, layer_attrs: dict, classifier: str, settings: dict) -> dict:
    return {"image_fingerprint": attrs.get("image_fingerprint"), "model": attrs.get("model"),
            "weights_sha256": attrs.get("weights_sha256"), "pooling": attrs.get("pooling"),
            "module": layer_attrs.get("module"), "classifier": classifier, **settings}


def default_report_dir(data, models) -> Path:
    return Path("reports") / f"{Path(data).resolve().name}-{'+'.join(m.replace(':', '_') for m in models)}"


def sweep(data, models=(DEFAULT_MODEL,), layers="all-stages", classifiers=("svm", "softmax"), *,
          weights="DEFAULT", cache=None, report=None, c_grid=None, folds: int = 5,
          seed: int = 0, norm: str = "standard", solver: str = "auto", holdout: float | None = None,
          prescreen: int | None = None, pool: str = "avg", batch_size: int = 32, device: str = "auto",
          progress: bool | None = None) -> pd.DataFrame:
    """Extract, score and cross-validate every layer of every backbone; write the report.

    Parameters
    ----------
    data : path
        Image folder or manifest, as for :func:`extractor.extract`.
    models : sequence of str
        Backbones; each gets its own cache (``cache/<data>-<model>.h5`` unless ``cache`` is
        given, which only works with one model).
    layers : 'all-stages', str or sequence of str
        See :func:`sweep_layers`.
    weights : str or sequence of str
        As for ``extract``: one for every model, or one per model.
    classifiers : sequence of {'svm', 'softmax'}
    prescreen : int, optional
        Score every layer with LogME and cross-validate only the ``prescreen`` best of each
        backbone.
    report : path, optional
        Report folder; default ``reports/<data>-<model>``.
    c_grid, folds, seed, norm, solver, holdout
        As for :func:`pipelines.classifiers.fit_linear_probe`.

    Returns
    -------
    pandas.DataFrame
        One row per backbone x layer x classifier (columns ``COLUMNS``; ``model_file`` is the
        fitted classifier, saved for ``cnncodes predict``); ``df.attrs`` holds
        ``report`` (folder), ``files``, ``conclusion`` (sentences), ``best`` (row as a dict),
        ``kendall_tau`` (per classifier) and ``settings``.

    Examples
    --------
    >>> df = sweep("data/digits", layers="stage3,stage4,stage5", classifiers=["svm"])  # doctest: +SKIP
    >>> df[["layer", "relative_depth", "cv_accuracy", "logme"]]                           # doctest: +SKIP
    """
    from cnncodes.pipelines.sweep.report import conclude, kendall_taus, write_sweep_report

    t0 = time.perf_counter()
    models = list(dict.fromkeys(models)) or [DEFAULT_MODEL]
    classifiers = list(dict.fromkeys(classifiers))
    bad = [c for c in classifiers if c not in CLASSIFIERS]
    if bad or not classifiers:
        raise ValueError(f"--classifier takes {' and/or '.join(CLASSIFIERS)} (comma-separated), got {bad or 'none'}.")
    if cache is not None and len(models) > 1:
        raise ValueError("--cache names one cache, so it works with one --model; drop it to give "
                         "each backbone its default cache.")
    if prescreen is not None and prescreen < 1:
        raise ValueError(f"--prescreen must be >= 1, got {prescreen}.")
    per_model = [weights] * len(models) if weights is None or isinstance(weights, (str, os.PathLike)) else list(weights)
    if len(per_model) == 1:
        per_model *= len(models)
    if len(per_model) != len(models):
        raise ValueError(f"give one --weights for every --model, or one for all: got {len(per_model)} "
                         f"for {len(models)} models.")
    grid = parse_c_grid(c_grid) if not isinstance(c_grid, (list, tuple)) else tuple(sorted(c_grid))
    settings = {"c_grid": list(grid), "folds": folds, "seed": seed, "norm": norm, "solver": solver,
                "holdout": holdout}
    report = Path(report) if report else default_report_dir(data, models)
    fits_dir = report / "fits"
    show = progress if progress is not None else sys.stderr.isatty()

    rows, fit_records, caches = [], {}, {}
    for model, model_weights in zip(models, per_model):
        names = sweep_layers(model, layers)
        path = Path(cache) if cache else default_cache_path(data, model)
        log.info("extracting %s of %s into %s", ", ".join(names), model, path)
        ext = extract(data, path, model=model, weights=model_weights, layers=names, pool=pool,
                      batch_size=batch_size, device=device, progress=show)
        caches[model] = {"path": str(path), "state": ext.state, "extract_seconds": round(ext.seconds, 2)}
        codes = {name: load_codes(path, name) for name in names}
        depth = {n: (c.layer_attrs.get("relative_depth"), c.layer_attrs.get("flops")) for n, c in codes.items()}
        if any(d is None for pair in depth.values() for d in pair):  # a cache older than these attributes
            layers_, aliases = list_layers(model)
            known = {**{l.name: l for l in layers_}, **aliases}
            depth = {n: (known[n].relative_depth, known[n].flops) if n in known else (None, None) for n in names}
        caches[model]["fingerprint"] = codes[names[0]].attrs.get("image_fingerprint")
        scores = {}
        for name, c in codes.items():
            key = _fit_key(c.attrs, c.layer_attrs, "logme", {"seed": seed, "holdout": holdout})
            record_path = fits_dir / f"{_safe(model)}__{_safe(name)}__logme.json"
            record = read_record(record_path, key)
            if record is None:
                train, _ = split_rows(c, holdout, seed)
                record = write_record(record_path, key, logme=logme(c.X[train], c.y[train]))
            scores[name] = record["logme"]
        chosen = names
        if prescreen is not None:
            chosen = sorted(names, key=lambda n: -scores[n])[:prescreen]
        todo = [(name, clf) for name in names for clf in classifiers]
        bar = tqdm(total=sum(1 for n, _ in todo if n in chosen), desc=f"fits {model}", unit="fit",
                   disable=not show, leave=False)
        for name, clf in todo:
            c = codes[name]
            la = c.layer_attrs
            stride = la.get("stride")
            row = {"model": model, "layer": name, "module": la.get("module"), "classifier": clf,
                   "dim": int(c.X.shape[1]), "stride": None if stride in (None, -1) else int(stride),
                   "relative_depth": depth[name][0],
                   "gflops": round(depth[name][1] / 1e9, 4) if depth[name][1] is not None else None,
                   "logme": round(scores[name], 6), "fitted": name in chosen}
            if name in chosen:
                bar.set_postfix_str(f"{clf} on {name}")
                record = _fit(c, name, clf, model, settings, grid, fits_dir)
                fit_records[(model, name, clf)] = record
                m = record["metrics"]
                row.update({"C": m["C"], "cv_accuracy": m["cv_accuracy"], "cv_std": m["cv_std"],
                            "test_accuracy": m["test_accuracy"], "balanced_accuracy": m["balanced_accuracy"],
                            "macro_f1": m["macro_f1"], "fit_seconds": m["seconds"], "n_train": m["n_train"],
                            "n_test": m["n_test"], "model_file": record["model_file"]})
                bar.update()
            rows.append(row)
        bar.close()
    df = pd.DataFrame(rows).reindex(columns=COLUMNS)
    # Shallow to deep within each backbone, backbones and classifiers in the order given.
    df = df.sort_values(["model", "relative_depth", "classifier"], kind="stable",
                        key=lambda col: col.map({m: i for i, m in enumerate(models)}) if col.name == "model"
                        else col.map({c: i for i, c in enumerate(classifiers)}) if col.name == "classifier"
                        else col).reset_index(drop=True)
    df.attrs.update({"report": str(report), "settings": {**settings, "classifiers": classifiers,
                                                         "prescreen": prescreen, "pool": pool,
                                                         "models": models, "data": str(data)},
                     "caches": caches, "kendall_tau": kendall_taus(df)})
    df.attrs.update(conclude(df))
    df.attrs["seconds"] = round(time.perf_counter() - t0, 2)
    df.attrs["files"] = {k: str(v) for k, v in write_sweep_report(df, report, fit_records).items()}
    return df


def _fit(codes, name, clf, model, settings, grid, fits_dir: Path) -> dict:
    """One cross-validated fit, or its stored record when the same one was done before."""
    key = _fit_key(codes.attrs, codes.layer_attrs, clf, settings)
    stem = fits_dir / f"{_safe(model)}__{_safe(name)}__{clf}"
    record = read_record(stem.with_suffix(".json"), key)
    if record is not None and stem.with_suffix(".joblib").exists():
        return record
    r = fit_linear_probe(codes, name, clf, c_grid=grid, folds=settings["folds"], seed=settings["seed"],
                         norm=settings["norm"], holdout=settings["holdout"], solver=settings["solver"])
    what, truth, pred = r.evaluated()
    save_model(r, stem.with_suffix(".joblib"), overwrite=True)
    # written last: its presence means the fit is whole
    return write_record(stem.with_suffix(".json"), key, metrics=r.as_dict(), evaluated_on=what,
                        classes=list(r.classes), truth=[int(v) for v in truth], pred=[int(v) for v in pred],
                        model_file=str(stem.with_suffix(".joblib")), recipe=cache_summary(codes))


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in name)
