"""Probes on cached codes: ``fit-svm``, ``fit-softmax``, ``fit-knn``, ``evaluate``, ``predict``,
``export``."""
from __future__ import annotations

import os
import sys

import click

from .options import CV_OPTIONS, DEVICE, OFFLINE, RUNTIME, SELECT_OPTIONS, checked_by, echo_json, fail_cleanly

_PCA = checked_by("cnncodes.pipelines.probes.classifiers", "parse_pca")
_K_GRID = checked_by("cnncodes.pipelines.probes.knn", "parse_k_grid")
_SHOTS = checked_by("cnncodes.pipelines.probes.few_shot", "parse_shots")
# Largest class over smallest from which a fit suggests the balanced options.
IMBALANCED = 3.0


def _fit_options(fn):
    """Options shared by fit-svm and fit-softmax."""
    options = [
        click.option("--cache", "-c", required=True, type=click.Path(exists=True, dir_okay=False),
                     help="HDF5 cache written by `cnncodes extract`."),
        click.option("--layer", "-l", help="Layer of the cache [default: its only layer, or penultimate]."),
        *CV_OPTIONS,
        *SELECT_OPTIONS,
        click.option("--shots", callback=_SHOTS,
                     help="Few-shot protocol: K training images a class (comma-separated K values), "
                     "drawn --episodes times; reports mean +- std test accuracy per K."),
        click.option("--episodes", type=click.IntRange(min=1), default=5, show_default=True,
                     help="Draws per K of --shots (seeded by --seed, K and the episode)."),
        click.option("--pca", callback=_PCA,
                     help="Number of PCA components, or 'whiten' (fitted inside each fold)."),
        click.option("--holdout", type=click.FloatRange(0, 1, min_open=True, max_open=True),
                     help="Without a test split in the cache: keep this stratified share as the test."),
        click.option("--allow-incomplete", is_flag=True,
                     help="Use the finished rows of an incomplete cache."),
        click.option("--solver", type=click.Choice(["auto", "sklearn", "batched", "torch"]), default="auto",
                     show_default=True, help="batched: the folds of each C fitted at once as one problem "
                     "(numpy on the CPU, torch on a GPU when present; 'torch' is its former name); "
                     "auto: batched unless --pca."),
        click.option("--n-jobs", "-j", type=int, default=1, show_default=True,
                     help="Folds fitted in parallel (threads; the codes are shared, not copied)."),
        click.option("--report", "report_dir", type=click.Path(file_okay=False),
                     help="Write per-class metrics, a confusion matrix (PNG, CSV), the reliability "
                     "diagram, suspects.csv (training images least likely labelled right), fit.json "
                     "and index.html (with the suspects' thumbnails) here."),
        click.option("--out", "-o", type=click.Path(dir_okay=False),
                     help="Save the fitted model (with its calibration and a .sha256 sidecar) for "
                     "`predict`."),
        click.option("--overwrite", is_flag=True, help="Replace an existing --out file."),
        click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _fit(classifier, cache, layer, folds, seed, norm, holdout, allow_incomplete, report_dir, out, overwrite,
         as_json, c_grid=None, pca=None, solver="auto", n_jobs=1, k_grid=None, temperature=None,
         select="accuracy", class_weight="none", shots=None, episodes=5) -> None:
    from cnncodes.extractor.files import check_writable

    from cnncodes.pipelines.probes.artifacts import save_model
    from cnncodes.pipelines.probes.classifiers import fit_linear_probe
    given = click.get_current_context().get_parameter_source
    if not shots and given("episodes") == click.core.ParameterSource.COMMANDLINE:
        raise click.ClickException("--episodes is the number of draws of the few-shot protocol: "
                                   "give --shots too.")
    if shots:
        if out or report_dir or pca or overwrite or solver not in ("auto", "batched", "torch") or n_jobs != 1:
            raise click.ClickException("--shots fits many small probes with the batched solver and keeps "
                                       "none: it takes no --out, --overwrite, --report, --pca, --solver "
                                       "sklearn or --n-jobs.")
        return _few_shot(classifier, cache, layer, shots, episodes, folds, seed, norm, holdout, c_grid,
                         class_weight, select, allow_incomplete, as_json)
    if out and os.path.exists(out) and not overwrite:
        raise click.ClickException(f"{out} exists: pass --overwrite to replace it, or choose another --out.")
    for path, is_folder in ((out, False), (report_dir, True)):  # before the fit, not after it
        if path:
            check_writable(path, folder=is_folder)
    r = fit_linear_probe(cache, layer, classifier, c_grid=c_grid, folds=folds, seed=seed, norm=norm,
                         pca=pca, holdout=holdout, allow_incomplete=allow_incomplete, n_jobs=n_jobs,
                         solver=solver, k_grid=k_grid, temperature=temperature, select=select,
                         class_weight=class_weight)
    summary = r.as_dict()
    summary["notes"] = notes = _notes(r)
    if out:  # the model first: an optional report that fails must not lose the fit
        summary["model_file"] = str(save_model(r, out, overwrite=overwrite))
    if report_dir:  # imported here: scikit-learn's metrics (2 s of imports) only for a report
        from cnncodes.pipelines.reports import write_fit_report
        summary["report"] = {k: str(v) for k, v in write_fit_report(r, report_dir).items()}
    if as_json:
        echo_json(summary)
        return
    click.echo(f"{classifier} on {r.layer} of {cache}: {r.n_train} training rows, {r.n_test} test rows"
               + (f" ({', '.join(f'{v} {k}' for k, v in r.excluded.items())} excluded)"
                  if r.excluded else ""))
    click.echo(f"{r.hyper:>10}  {'CV accuracy':>18}  {'balanced':>8}  {'macro-F1':>8}")
    for g in r.grid:
        by = "" if r.select == "accuracy" else f" (by {r.select})"
        mark = f"  <- chosen{by}" if g["C"] == r.C else ""
        click.echo(f"{g['C']:>10g}  {g['mean']:>9.4f} +- {g['std']:.4f}  {g['balanced_accuracy']:>8.4f}  "
                   f"{g['macro_f1']:>8.4f}{mark}")
    if r.test_accuracy is None:
        click.echo(f"no test rows (use split folders or --holdout); CV accuracy {r.cv_accuracy:.4f}")
    else:
        click.echo(f"test: accuracy {r.test_accuracy:.4f}, balanced accuracy {r.balanced_accuracy:.4f}, "
                   f"macro-F1 {r.macro_f1:.4f}")
    if r.calibration is not None:
        c = r.calibration
        test = "" if c.ece_test_before is None else \
            f", test {c.ece_test_before:.3f} -> {c.ece_test_after:.3f}"
        click.echo(f"calibration: temperature {c.temperature:.3g}; expected calibration error out-of-fold "
                   f"{c.ece_cv_before:.3f} -> {c.ece_cv_after:.3f}{test}")
    for note in notes:
        click.echo(f"note: {note}")
    for key, label in (("report", "report"), ("model_file", "model")):
        if key in summary:
            click.echo(f"{label}: {summary[key] if key == 'model_file' else report_dir}")
    click.echo(f"({r.seconds:.1f}s, solver {r.solver})")


def _notes(r) -> list[str]:
    """Advice a fit's figures call for: imbalanced classes without the balanced options, a
    temperature at its bound."""
    from cnncodes.pipelines.probes.calibration import BOUNDS
    from cnncodes.pipelines.probes.metrics import imbalance
    notes = []
    ratio = imbalance(r.y_train) if r.y_train is not None else 1.0
    if r.classifier != "knn" and ratio >= IMBALANCED and r.class_weight is None and r.select == "accuracy":
        notes.append(f"the training classes are imbalanced (the largest {ratio:.1f}x the smallest): "
                     f"accuracy favours the large ones; try --class-weight balanced "
                     f"--select balanced_accuracy.")
    c = r.calibration
    if c is not None and not BOUNDS[0] * 1.01 < c.temperature < BOUNDS[1] / 1.01:
        notes.append(f"the temperature reached its bound ({c.temperature:.3g}): the out-of-fold scores leave "
                     f"nothing to calibrate (every image right, or none), so the calibrated probabilities "
                     f"say little beyond the ranking.")
    return notes


def _few_shot(classifier, cache, layer, shots, episodes, folds, seed, norm, holdout, c_grid, class_weight,
              select, allow_incomplete, as_json) -> None:
    from cnncodes.pipelines.probes.few_shot import few_shot, parse_shots
    total = len(parse_shots(shots)) * episodes
    with click.progressbar(length=total, label="episodes", file=sys.stderr,
                           hidden=as_json or not sys.stderr.isatty()) as bar:
        r = few_shot(cache, layer, classifier, shots, episodes, seed=seed, folds=folds, c_grid=c_grid,
                     norm=norm, holdout=holdout, class_weight=class_weight, select=select,
                     allow_incomplete=allow_incomplete,
                     progress=lambda done, _: bar.update(done - bar.pos))
    if as_json:
        echo_json(r.as_dict())
        return
    click.echo(f"{classifier} on {r.layer} of {cache}: few-shot, {r.episodes} episodes per K, {r.classes} "
               f"classes, {r.n_test} test rows")
    click.echo(f"{'K':>5}  {'test accuracy':>17}  {'balanced accuracy':>17}  C per episode")
    for row in r.rows:
        cs = ",".join(f"{e['C']:g}" for e in row["episodes"])
        click.echo(f"{row['shots']:>5}  {row['mean']:>8.4f} +- {row['std']:.4f}  "
                   f"{row['balanced_mean']:>8.4f} +- "
                   f"{row['balanced_std']:.4f}  {cs}")
    click.echo(f"({r.seconds:.1f}s)")


@click.command("fit-svm")
@_fit_options
@fail_cleanly
def fit_svm(**kw) -> None:
    """Linear SVM (LinearSVC) on cached CNN codes, C chosen by cross-validation.

    With train/val/test splits in the cache, C is cross-validated on train (+ val), the model is
    refitted on them with the best C and scored once on test. Without splits all rows are
    cross-validated, and --holdout keeps a test part aside.

    \b
    Examples:
      cnncodes fit-svm --cache cache/digits-efficientnet_lite0.h5 --layer stage3
      cnncodes fit-svm -c codes.h5 --c-grid 0.01,0.1,1 --norm power --report reports/svm --out svm.joblib
      cnncodes fit-svm -c codes.h5 --class-weight balanced --select balanced_accuracy
      cnncodes fit-svm -c codes.h5 --shots 1,5,10 --episodes 5

    The chosen C's out-of-fold scores calibrate the model (one temperature; `predict` prints
    the calibrated probabilities) and rank the training images by how unlikely their given
    label is (--report's suspects.csv).
    """
    _fit("svm", **kw)


@click.command("fit-knn")
@click.option("--cache", "-c", required=True, type=click.Path(exists=True, dir_okay=False),
              help="HDF5 cache written by `cnncodes extract`.")
@click.option("--layer", "-l", help="Layer of the cache [default: its only layer, or penultimate].")
@click.option("--k-grid", callback=_K_GRID, help="Comma-separated k values [default: 1,5,10,20,50,100,200].")
@click.option("--temperature", "-t", type=click.FloatRange(0, min_open=True), default=0.07, show_default=True,
              help="Votes weigh exp(cosine similarity / T) (DINO's 0.07).")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True,
              help="Stratified, shuffled cross-validation folds.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the folds (and holdout).")
@click.option("--norm", type=click.Choice(["l2", "power"]), default="l2", show_default=True,
              help="Rows to unit length (power: signed sqrt first); similarity is their dot product.")
@click.option("--holdout", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="Without a test split in the cache: keep this stratified share as the test.")
@click.option("--allow-incomplete", is_flag=True, help="Use the finished rows of an incomplete cache.")
@click.option("--report", "report_dir", type=click.Path(file_okay=False),
              help="Write per-class metrics, a confusion matrix (PNG, CSV), fit.json and index.html here.")
@click.option("--out", "-o", type=click.Path(dir_okay=False),
              help="Save the model (its training codes, k and T, with a .sha256 sidecar) for `predict`.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@fail_cleanly
def fit_knn(**kw) -> None:
    """k-nearest-neighbour probe on cached CNN codes (cosine similarity), k chosen by CV.

    The k most similar training codes vote, each with weight exp(similarity / T), as in DINO's
    k-NN evaluation. Cross-validation is leakage-free like the linear probes': a held-out row's
    neighbours are only the training rows of its fold. Runs on CUDA when present.

    \b
    Examples:
      cnncodes fit-knn --cache cache/digits-efficientnet_lite0.h5 --layer stage5
      cnncodes fit-knn -c codes.h5 --k-grid 10,20,50 --temperature 0.1 --out knn.joblib --json
    """
    _fit("knn", **kw)


@click.command("fit-softmax")
@_fit_options
@fail_cleanly
def fit_softmax(**kw) -> None:
    """Multinomial logistic regression (softmax) on cached CNN codes; options as fit-svm.

    \b
    Example:
      cnncodes fit-softmax --cache cache/digits-efficientnet_lite0.h5 --json
    """
    _fit("softmax", **kw)


@click.command("evaluate")
@click.option("--model", "-m", "model_file", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--cache", "-c", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--allow-incomplete", is_flag=True, help="Use the finished rows of an incomplete cache.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@fail_cleanly
def evaluate_cmd(model_file, cache, allow_incomplete, as_json) -> None:
    """Score a saved model on another cache made by the same recipe.

    \b
    Example:
      cnncodes evaluate --model svm.joblib --cache cache/holdout-efficientnet_lite0.h5
    """
    from cnncodes.pipelines.probes.predict import evaluate_model
    r = evaluate_model(model_file, cache, allow_incomplete)
    if as_json:
        echo_json(r)
        return
    click.echo(f"{r['n']} images: accuracy {r['accuracy']:.4f}, balanced accuracy "
               f"{r['balanced_accuracy']:.4f}, macro-F1 {r['macro_f1']:.4f}")


@click.command("predict")
@OFFLINE
@click.option("--model", "-m", "model_file", required=True, type=click.Path(exists=True, dir_okay=False))
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", "-o", type=click.Path(dir_okay=False), help="Write CSV here instead of stdout.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@click.option("--device", type=DEVICE, default="auto", show_default=True)
@RUNTIME
@click.option("--batch-size", "-b", type=click.IntRange(min=1), default=32, show_default=True)
@fail_cleanly
def predict_cmd(model_file, paths, out, overwrite, device, runtime, batch_size) -> None:
    """Classify image files or folders with a saved model, extracting codes with its own recipe.

    A model exported by `cnncodes export` (an .onnx file) runs with ONNX Runtime alone: torch
    is not imported, and --device, --runtime and --offline do not apply.

    Prints (or writes) CSV: path, label, score (probability for softmax, decision score for SVM),
    probability (of the label, calibrated by the temperature the fit found; empty for an SVM
    saved before calibration existed) and error; an unreadable image is a row with its error,
    not a failure of the run.

    \b
    Examples:
      cnncodes predict --model svm.joblib photos/ extra.jpg --out predictions.csv
      cnncodes predict --model classifier.onnx photos/
    """
    import csv

    from cnncodes.extractor.files import atomic_write, check_writable

    from cnncodes.pipelines.probes.onnx_model import is_onnx
    if out and os.path.exists(out) and not overwrite:
        raise click.ClickException(f"{out} exists: pass --overwrite to replace it, or choose another --out.")
    if out:
        check_writable(out)  # before the extraction, not after it
    if is_onnx(model_file):  # torch-free: neither the extraction nor scikit-learn is imported
        given = click.get_current_context().get_parameter_source
        named = [f"--{o}" for o in ("device", "runtime")
                 if given(o) == click.core.ParameterSource.COMMANDLINE]
        if named:
            raise click.ClickException(f"{model_file} is an exported ONNX model, run by ONNX Runtime on the "
                                       f"CPU: {' and '.join(named)} do not apply.")
        from cnncodes.extractor.images import gather_images

        from cnncodes.pipelines.probes.onnx_model import OnnxClassifier
        files = gather_images(paths)
        if not files:
            raise click.ClickException(f"no image files in {', '.join(paths)}: nothing to predict.")
        rows = OnnxClassifier(model_file).predict(files, batch_size=batch_size)
    else:
        from cnncodes.pipelines.probes.predict import predict_images
        rows = predict_images(model_file, paths, batch_size=batch_size, device=device, runtime=runtime)

    def write(fh):
        w = csv.writer(fh)
        w.writerow(["path", "label", "score", "probability", "error"])
        for p in rows:
            w.writerow([p.path, p.label or "", "" if p.score is None else f"{p.score:.6f}",
                        "" if p.probability is None else f"{p.probability:.6f}", p.error])
    if out:
        with atomic_write(out) as tmp, open(tmp, "w", newline="") as fh:
            write(fh)
    else:
        write(sys.stdout)
    failed = sum(1 for p in rows if p.error)
    if failed:
        click.echo(f"{failed} of {len(rows)} images could not be read (see the error column)", err=True)


@click.command("export")
@click.option("--model", "-m", "model_file", type=click.Path(exists=True, dir_okay=False),
              help="A probe saved by fit-svm or fit-softmax --out.")
@click.option("--run", "run_dir", type=click.Path(exists=True, file_okay=False),
              help="Or a fine-tuning run folder (its best.pt network, logits and softmax).")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False), help="The ONNX file to write.")
@click.option("--codes", "with_codes", is_flag=True, help="Also output the codes (a third output, 'codes').")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object.")
@fail_cleanly
def export_cmd(model_file, run_dir, out, with_codes, overwrite, as_json) -> None:
    """Write a saved probe and the network under it as one ONNX file: images in, classes out.

    The graph takes a uint8 N x H x W x 3 batch at the recipe's input size and holds the
    weights' normalisation, the truncated network, the pooling, the probe's normalisation (and
    PCA) and its linear head; it returns the calibrated class probabilities ('probabilities')
    and the scores `predict` shows ('scores'). Decoding, the resize and the centre crop stay
    outside (they belong to the image decoder) and are described in the model's metadata,
    with the class names and the full recipe; `cnncodes predict --model FILE.onnx` does them
    and runs the graph with ONNX Runtime, without torch. With --run, a fine-tuned network
    (best.pt) instead: its logits are the scores. Needs `pip install 'cnncodes[onnxruntime]'`.

    \b
    Examples:
      cnncodes export --model svm.npz --out classifier.onnx
      cnncodes predict --model classifier.onnx photos/ --out predictions.csv
      cnncodes export --run runs/digits --out finetuned.onnx
    """
    from cnncodes.extractor.files import check_writable

    from cnncodes.pipelines.probes.export import export_classifier, export_run
    if (model_file is None) == (run_dir is None):
        raise click.ClickException("export takes one of --model (a saved probe) or --run (a fine-tuning "
                                   "run).")
    if run_dir and with_codes:
        raise click.ClickException("--codes is for a probe's layer (--model); a run's graph outputs its "
                                   "logits.")
    if os.path.exists(out) and not overwrite:
        raise click.ClickException(f"{out} exists: pass --overwrite to replace it, or choose another --out.")
    check_writable(out)
    r = export_run(run_dir, out, overwrite=overwrite) if run_dir else \
        export_classifier(model_file, out, with_codes=with_codes, overwrite=overwrite)
    if as_json:
        echo_json(r)
        return
    click.echo(f"{r['path']}: {r['classifier']} on {r['layer']}, {r['classes']} classes; input uint8 "
               f"N x {r['input'][1]} x {r['input'][2]} x 3, outputs {', '.join(r['outputs'])} "
               f"({r['bytes'] / 1e6:.1f} MB, {r['seconds']:.1f}s)")
