"""Layer sweep: which layer of which backbone should a linear classifier read?

For every backbone, all requested layers come from ONE forward pass into one cache (an existing
cache gains only the layers it lacks). Every layer is scored with LogME (training-free) and, for
each classifier, cross-validated like ``fit-svm`` / ``fit-softmax``. Each finished fit is stored
in ``<report>/fits/`` under a key made of the cache's recipe and the fit's settings, so an
interrupted sweep resumes where it stopped and a rerun redoes nothing.

The steps, each a function of the validated :class:`~.settings.SweepSettings`:
:func:`_extract_backbone` (one forward pass per backbone), :func:`_logme_scores`,
:func:`_fit_rows` (one cross-validated fit per layer and classifier), :func:`order_table`, and
the report (:func:`~.report.write_sweep_report`).
"""
from __future__ import annotations

import logging
import time

import pandas as pd
from tqdm.auto import tqdm

from cnncodes.extractor import DEFAULT_MODEL, extract, list_layers
from cnncodes.extractor.engine import default_cache_path
from cnncodes.extractor.errors import IncompatibleCacheError, SettingsError
from cnncodes.extractor.files import slug
from cnncodes.extractor.recipe import Recipe

from cnncodes.pipelines.probes.artifacts import save_model
from cnncodes.pipelines.probes.classifiers import cache_summary, fit_linear_probe, split_rows
from cnncodes.pipelines.probes.codes import load_codes
from cnncodes.pipelines.probes.logme import logme
from cnncodes.pipelines.records import read_record, write_record
from cnncodes.pipelines.sweep.report import SweepResult, conclude, kendall_taus, write_sweep_report
from cnncodes.pipelines.sweep.settings import SweepSettings, default_report_dir

__all__ = ["COLUMNS", "STAGES", "SweepResult", "SweepSettings", "default_report_dir", "order_table",
           "run_sweep", "sweep", "sweep_layers"]

log = logging.getLogger(__name__)

STAGES = ("stage1", "stage2", "stage3", "stage4", "stage5")
COLUMNS = ["model", "layer", "module", "classifier", "dim", "stride", "relative_depth", "gflops", "logme",
           "fitted", "C", "cv_accuracy", "cv_std", "cv_balanced_accuracy", "cv_macro_f1", "test_accuracy",
           "balanced_accuracy", "macro_f1", "fit_seconds", "n_train", "n_test", "model_file"]
# The columns a fit's metrics fill, and where in its record each comes from.
_METRIC_COLUMNS = {"C": "C", "cv_accuracy": "cv_accuracy", "cv_std": "cv_std",
                   "cv_balanced_accuracy": "cv_balanced_accuracy", "cv_macro_f1": "cv_macro_f1",
                   "test_accuracy": "test_accuracy", "balanced_accuracy": "balanced_accuracy",
                   "macro_f1": "macro_f1", "fit_seconds": "seconds", "n_train": "n_train", "n_test": "n_test"}


def sweep_layers(model: str, spec="all-stages") -> list[str]:
    """The layer names a sweep of ``model`` covers.

    ``all-stages`` is ``stage1``..``stage5`` and ``penultimate``, leaving out ``penultimate``
    when it is only the pooled last stage (ResNets, EfficientNets: the same codes twice), i.e.
    when no module with parameters (a ViT's final norm) runs between the two.
    Otherwise a comma-separated list (or a sequence) of names and aliases, as for ``extract``.
    """
    if isinstance(spec, str) and spec != "all-stages":
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    if spec != "all-stages":
        if not spec:
            raise SettingsError("--layers must name at least one layer, or be all-stages.")
        return list(dict.fromkeys(spec))
    layers, aliases = list_layers(model)
    names = [s for s in STAGES if s in aliases]
    pen = aliases.get("penultimate")
    last = aliases[names[-1]] if names else None
    between = [l for l in layers if last is not None and pen is not None and l.start > last.order
               and l.order < pen.order and l.params]
    if pen is not None and not (last is not None and pen.flops <= last.flops * 1.001 and not between):
        names.append("penultimate")
    return names


def sweep(data, models=(DEFAULT_MODEL,), layers="all-stages", classifiers=("svm", "softmax"), *,
          weights="DEFAULT", cache=None, report=None, c_grid=None, folds: int = 5,
          seed: int = 0, norm: str = "standard", solver: str = "auto", holdout: float | None = None,
          prescreen: int | None = None, pool: str = "avg", batch_size: int = 32, device: str = "auto",
          progress: bool | None = None, runtime: str | None = None, select: str = "accuracy",
          class_weight: str | None = None, shots=None, episodes: int = 5) -> SweepResult:
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
    c_grid, folds, seed, norm, solver, holdout, select, class_weight
        As for :func:`pipelines.classifiers.fit_linear_probe`; ``select`` also picks the best
        layer (``class_weight`` applies to the linear probes).
    shots, episodes : optional
        The few-shot protocol (:func:`pipelines.probes.few_shot.few_shot`) on every fitted layer
        with each linear probe: ``result.few_shot`` and the report's ``few_shot.csv``.

    Returns
    -------
    SweepResult
        ``table`` has one row per backbone x layer x classifier (columns ``COLUMNS``;
        ``model_file`` is the fitted classifier, saved for ``cnncodes predict``); ``report``
        (folder), ``files``, ``conclusion`` (sentences), ``best`` (row as a dict),
        ``kendall_tau`` (per classifier), ``settings`` and ``caches`` describe it.

    Examples
    --------
    >>> r = sweep("data/digits", layers="stage3,stage4,stage5", classifiers=["svm"])  # doctest: +SKIP
    >>> r.table[["layer", "relative_depth", "cv_accuracy", "logme"]]                   # doctest: +SKIP
    """
    t0 = time.perf_counter()
    settings = SweepSettings.from_arguments(
        data, models, layers, classifiers, weights=weights, cache=cache, report=report, c_grid=c_grid,
        progress=progress, folds=folds, seed=seed, norm=norm, solver=solver, holdout=holdout,
        prescreen=prescreen, pool=pool, batch_size=batch_size, device=device, runtime=runtime,
        select=select, class_weight=class_weight, shots=shots, episodes=episodes)
    return run_sweep(settings, t0)


def run_sweep(settings: SweepSettings, started: float | None = None) -> SweepResult:
    """:func:`sweep` with its settings already checked; ``started`` is when the clock of the
    result's ``seconds`` began (default: now)."""
    t0 = time.perf_counter() if started is None else started
    rows, fit_records, caches, few = [], {}, {}, []
    for model, model_weights in zip(settings.models, settings.weights):
        codes, depth, caches[model] = _extract_backbone(settings, model, model_weights)
        scores = _logme_scores(settings, model, codes)
        model_rows = _fit_rows(settings, model, codes, depth, scores, fit_records)
        rows += model_rows
        if settings.shots:
            few += _few_shot_rows(settings, model, codes, [r["layer"] for r in model_rows if r["fitted"]])
    table = order_table(pd.DataFrame(rows).reindex(columns=COLUMNS), settings.models, settings.classifiers)
    conclusion, best = conclude(table, settings.select)
    result = SweepResult(table=table, report=str(settings.report), settings=settings, caches=caches,
                         kendall_tau=kendall_taus(table), conclusion=conclusion, best=best,
                         seconds=round(time.perf_counter() - t0, 2), few_shot=few)
    result.files = {k: str(v) for k, v in write_sweep_report(result, fit_records).items()}
    return result


def _extract_backbone(settings: SweepSettings, model: str, weights) -> tuple[dict, dict, dict]:
    """One forward pass of ``model`` for all its sweep layers into its cache.

    Returns the codes per layer, (relative depth, FLOPs) per layer, and the cache's entry of
    ``sweep.json`` (path, state, seconds, image fingerprint).
    """
    names = sweep_layers(model, settings.layers)
    path = settings.cache or default_cache_path(settings.data, model)
    log.info("extracting %s of %s into %s", ", ".join(names), model, path)
    try:
        ext = extract(settings.data, path, model=model, weights=weights, layers=names, pool=settings.pool,
                      batch_size=settings.batch_size, device=settings.device, progress=settings.progress,
                      runtime=settings.runtime)
    except IncompatibleCacheError as e:  # sweep has no --overwrite or --out: name what it has
        raise e.with_remedy(f"Give sweep another --cache, or delete {e.path}.") from None
    codes = {name: load_codes(path, name) for name in names}
    cache = {"path": str(path), "state": ext.state, "extract_seconds": round(ext.seconds, 2),
             "fingerprint": codes[names[0]].attrs.get("image_fingerprint")}
    return codes, _depths(model, codes), cache


def _depths(model: str, codes: dict) -> dict:
    """(relative depth, FLOPs) of each layer, from the cache or, for a cache older than these
    attributes, from a probe of the network."""
    depth = {n: (c.layer_attrs.get("relative_depth"), c.layer_attrs.get("flops")) for n, c in codes.items()}
    if all(d is not None for pair in depth.values() for d in pair):
        return depth
    layers, aliases = list_layers(model)
    known = {**{l.name: l for l in layers}, **aliases}
    return {n: (known[n].relative_depth, known[n].flops) if n in known else (None, None) for n in codes}


def _fit_key(attrs: dict, layer_attrs: dict, classifier: str, settings: dict) -> dict:
    """What a stored fit (or LogME score) was made from: the cache's recipe, the content of its
    rows (a re-extracted image changes it), the layer's module, the classifier and the fit's
    settings."""
    return {**Recipe.from_attrs(attrs).key(Recipe.FIT_KEYS), "content": attrs.get("content_digest"),
            "module": layer_attrs.get("module"), "classifier": classifier, **settings}


def _logme_scores(settings: SweepSettings, model: str, codes: dict) -> dict[str, float]:
    """LogME of every layer on its training rows, each read back when stored before."""
    scores = {}
    for name, c in codes.items():
        key = _fit_key(c.attrs, c.layer_attrs, "logme", {"seed": settings.seed, "holdout": settings.holdout})
        record_path = settings.fits_dir / f"{slug(model)}__{slug(name)}__logme.json"
        record = read_record(record_path, key)
        if record is None:
            train, _ = split_rows(c, settings.holdout, settings.seed)
            record = write_record(record_path, key, logme=logme(c.X[train], c.y[train]))
        scores[name] = record["logme"]
    return scores


def _fit_rows(settings: SweepSettings, model: str, codes: dict, depth: dict, scores: dict,
              fit_records: dict) -> list[dict]:
    """The table rows of one backbone: every layer x classifier, cross-validated unless
    pre-screened out. Each fit's record goes into ``fit_records`` under (model, layer, clf)."""
    names = list(codes)
    chosen = names
    if settings.prescreen is not None:
        chosen = sorted(names, key=lambda n: -scores[n])[:settings.prescreen]
    todo = [(name, clf) for name in names for clf in settings.classifiers]
    bar = tqdm(total=sum(1 for n, _ in todo if n in chosen), desc=f"fits {model}", unit="fit",
               disable=not settings.progress, leave=False)
    rows = []
    for name, clf in todo:
        row = _layer_row(model, name, clf, codes[name], depth[name], scores[name], fitted=name in chosen)
        if name in chosen:
            bar.set_postfix_str(f"{clf} on {name}")
            record = _fit(settings, codes[name], name, clf, model)
            fit_records[(model, name, clf)] = record
            metrics = record["metrics"]
            # .get: fits stored before a column existed (the CV balanced accuracy) lack it
            row.update({col: metrics.get(key, metrics.get("k")) if key == "C" else metrics.get(key)
                        for col, key in _METRIC_COLUMNS.items()})  # the k-NN probe's k in column C
            row["model_file"] = record["model_file"]
            bar.update()
        rows.append(row)
    bar.close()
    return rows


def _few_shot_rows(settings: SweepSettings, model: str, codes: dict, layers: list[str]) -> list[dict]:
    """The few-shot protocol (:mod:`~cnncodes.pipelines.probes.few_shot`) on every fitted layer,
    for each linear probe of the sweep: one row per layer, probe and K."""
    from cnncodes.pipelines.probes.few_shot import few_shot
    out = []
    for name in dict.fromkeys(layers):
        for clf in (c for c in settings.classifiers if c != "knn"):
            r = few_shot(codes[name], name, clf, settings.shots, settings.episodes, seed=settings.seed,
                         folds=settings.folds, c_grid=settings.c_grid, norm=settings.norm,
                         holdout=settings.holdout, class_weight=settings.class_weight, select=settings.select)
            out += [{"model": model, "layer": name, "classifier": clf, "shots": row["shots"],
                     "test_accuracy_mean": round(row["mean"], 6), "test_accuracy_std": round(row["std"], 6),
                     "balanced_accuracy_mean": round(row["balanced_mean"], 6), "episodes": settings.episodes}
                    for row in r.rows]
    return out


def _layer_row(model: str, name: str, clf: str, codes, depth: tuple, score: float, fitted: bool) -> dict:
    """The columns of a row that do not need a fit."""
    la = codes.layer_attrs
    stride = la.get("stride")
    relative_depth, flops = depth
    return {"model": model, "layer": name, "module": la.get("module"), "classifier": clf,
            "dim": int(codes.X.shape[1]), "stride": None if stride in (None, -1) else int(stride),
            "relative_depth": relative_depth, "gflops": round(flops / 1e9, 4) if flops is not None else None,
            "logme": round(score, 6), "fitted": fitted}


def _fit(settings: SweepSettings, codes, name: str, clf: str, model: str) -> dict:
    """One cross-validated fit, or its stored record when the same one was done before."""
    fit_settings = settings.fit_settings()
    if clf == "knn":  # it has no class weights: a k-NN fit is the same whatever they are
        fit_settings.pop("class_weight", None)
    key = _fit_key(codes.attrs, codes.layer_attrs, clf, fit_settings)
    stem = settings.fits_dir / f"{slug(model)}__{slug(name)}__{clf}"
    record = read_record(stem.with_suffix(".json"), key)
    if record is not None and stem.with_suffix(".joblib").exists():
        return record
    r = fit_linear_probe(codes, name, clf, c_grid=settings.c_grid, folds=settings.folds, seed=settings.seed,
                         norm=settings.norm, holdout=settings.holdout, solver=settings.solver,
                         select=settings.select, class_weight=None if clf == "knn" else settings.class_weight)
    what, truth, pred = r.evaluated()
    save_model(r, stem.with_suffix(".joblib"), overwrite=True)
    # written last: its presence means the fit is whole
    return write_record(stem.with_suffix(".json"), key, metrics=r.as_dict(), evaluated_on=what,
                        classes=list(r.classes), truth=[int(v) for v in truth], pred=[int(v) for v in pred],
                        model_file=str(stem.with_suffix(".joblib")), recipe=cache_summary(codes))


def order_table(table: pd.DataFrame, models: list[str], classifiers: list[str]) -> pd.DataFrame:
    """Shallow to deep within each backbone, backbones and classifiers in the order given."""
    model_rank = {m: i for i, m in enumerate(models)}
    classifier_rank = {c: i for i, c in enumerate(classifiers)}
    ranked = table.assign(_model_rank=table["model"].map(model_rank),
                          _classifier_rank=table["classifier"].map(classifier_rank))
    ranked = ranked.sort_values(["_model_rank", "relative_depth", "_classifier_rank"], kind="stable")
    return ranked.drop(columns=["_model_rank", "_classifier_rank"]).reset_index(drop=True)
