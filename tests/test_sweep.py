"""Layer sweeps: one extraction per backbone, LogME + CV per layer, resumable, report files."""
import csv
import json
import os

import pytest
from click.testing import CliRunner
from PIL import Image

from cnncodes.extractor.errors import SettingsError

from cnncodes.pipelines.cli import cli
from cnncodes.pipelines.sweep.runner import COLUMNS, sweep, sweep_layers

FAST = dict(folds=2, c_grid="0.1,1", progress=False)


@pytest.fixture(scope="module")
def swept(tmp_path_factory, r18_weights):
    """A two-classifier sweep of every resnet18 stage on a tiny split folder."""
    from .conftest import write_split_folder
    tmp = tmp_path_factory.mktemp("sweep")
    root = write_split_folder(tmp / "data")
    result = sweep(root, ["resnet18"], "all-stages", ["svm", "softmax"], weights=str(r18_weights),
                   cache=tmp / "c.h5", report=tmp / "report", **FAST)
    return result, root, tmp


def test_all_stages_leaves_out_a_penultimate_that_only_pools_the_last_stage():
    assert sweep_layers("resnet18") == ["stage1", "stage2", "stage3", "stage4", "stage5"]
    assert sweep_layers("vgg11")[-1] == "penultimate"  # fc7 is more than a pooled stage5
    assert sweep_layers("resnet18", "layer2, layer3") == ["layer2", "layer3"]


def test_sweep_table_covers_every_layer_and_classifier(swept):
    result, _, _ = swept
    df = result.table
    assert list(df.columns) == COLUMNS and len(df) == 10
    assert df["fitted"].all() and df["cv_accuracy"].between(0, 1).all() and df["test_accuracy"].notna().all()
    svm = df[df["classifier"] == "svm"]
    assert list(svm["layer"]) == ["stage1", "stage2", "stage3", "stage4", "stage5"]
    assert list(svm["module"])[1:] == ["layer1", "layer2", "layer3", "layer4"]
    assert svm["relative_depth"].is_monotonic_increasing and 0 < svm["relative_depth"].iloc[0] < 0.2
    assert list(svm["dim"]) == [64, 64, 128, 256, 512] and list(svm["stride"]) == [2, 4, 8, 16, 32]
    assert df["logme"].notna().all() and result.best["cv_accuracy"] == df["cv_accuracy"].max()
    assert len(result.conclusion) == 3 and result.conclusion[0].startswith("Best: ")
    assert set(result.kendall_tau) == {"svm", "softmax"}
    assert result.report == str(result.settings.report) and set(result.files) >= {"csv", "json", "html"}


def test_report_files_parse_back(swept):
    result, _, tmp = swept
    report = tmp / "report"
    with open(report / "sweep.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 10 and set(COLUMNS) <= set(rows[0])
    summary = json.loads((report / "sweep.json").read_text())
    assert {"rows", "conclusion", "best", "kendall_tau_logme_vs_cv", "settings", "caches",
            "versions"} <= set(summary)
    assert summary["settings"]["seed"] == 0 and summary["settings"]["c_grid"] == [0.1, 1.0]
    assert summary["settings"] == result.settings.as_dict() and summary["best"] == result.best
    assert len(summary["caches"]["resnet18"]["fingerprint"]) == 64 and "torch" in summary["versions"]
    for name, least in (("sweep.png", (900, 550)), ("confusion.png", (450, 450))):
        with Image.open(report / name) as im:
            assert im.format == "PNG" and im.width >= least[0] and im.height >= least[1]
    html = (report / "index.html").read_text()
    assert 'id="sweep-table"' in html and html.count("data:image/png;base64,") == 2 and \
        "src=\"http" not in html
    assert "| stage3 |" in (report / "sweep.md").read_text().replace("  ", " ")


def test_rerun_redoes_nothing_and_an_interrupted_sweep_resumes(swept, r18_weights):
    result, root, tmp = swept
    fits = tmp / "report" / "fits"
    stamps = {p.name: p.stat().st_mtime_ns for p in fits.iterdir()}
    (fits / "resnet18__stage3__svm.json").unlink()  # as if killed before this fit was stored
    old = fits / "resnet18__stage4__softmax.json"      # as if made by a cnncodes whose fits differ
    record = json.loads(old.read_text())
    old.write_text(json.dumps({**record, "results_version": record["results_version"] - 1}))
    stamps[old.name] = old.stat().st_mtime_ns
    again = sweep(root, ["resnet18"], "all-stages", ["svm", "softmax"], weights=str(r18_weights),
                  cache=tmp / "c.h5", report=tmp / "report", **FAST)
    assert again.caches["resnet18"]["state"] == "up to date"
    changed = {p.name for p in fits.iterdir() if stamps.get(p.name) != p.stat().st_mtime_ns}
    assert changed == {f"resnet18__{fit}.{ext}" for fit in ("stage3__svm", "stage4__softmax")
                       for ext in ("json", "joblib", "joblib.sha256")}
    cols = ["layer", "classifier", "cv_accuracy", "test_accuracy", "C"]
    assert again.table[cols].equals(result.table[cols])


def test_prescreen_fits_only_the_best_logme_layers_and_extends_the_cache(swept, r18_weights):
    _, root, tmp = swept
    result = sweep(root, ["resnet18"], "layer3,layer4,stage3,stage4", ["svm"], weights=str(r18_weights),
                   cache=tmp / "c.h5", report=tmp / "pre", prescreen=3, **FAST)
    df = result.table
    assert result.caches["resnet18"]["state"] == "layers added"  # layer3/layer4 were new names
    assert df["fitted"].sum() == 3
    best3 = df.sort_values("logme", ascending=False)["layer"].head(3)
    assert set(df[df["fitted"]]["layer"]) == set(best3)
    assert -1 <= result.kendall_tau["svm"] <= 1
    assert "(pre-screened out)" in (tmp / "pre" / "sweep.md").read_text()


def test_two_backbones_each_get_a_cache_and_lines_in_the_report(swept, r18_weights, monkeypatch):
    _, root, tmp = swept
    monkeypatch.chdir(tmp)  # default caches go to ./cache
    result = sweep(root, ["resnet18", "timm:resnet10t"], "stage3,stage4", ["svm"],
                   weights=[str(r18_weights), "none"], report=tmp / "two", **FAST)
    df = result.table
    assert list(df["model"]) == ["resnet18", "resnet18", "timm:resnet10t", "timm:resnet10t"]
    assert {m: c["path"] for m, c in result.caches.items()} == {
        "resnet18": "cache/data-resnet18.h5", "timm:resnet10t": "cache/data-timm-resnet10t.h5"}
    assert df["gflops"].notna().all() and (tmp / "two" / "index.html").is_file()
    assert (tmp / "two" / "fits" / "timm-resnet10t__stage3__svm.joblib").is_file()  # slug() of the model
    with pytest.raises(SettingsError, match="one --weights for every --model"):
        sweep(root, ["resnet18", "alexnet", "vgg11"], weights=["none", "none"], **FAST)


def test_fit_key_is_the_recipes_fit_keys_content_then_module_classifier_and_settings(swept):
    from cnncodes.pipelines.probes.codes import load_codes
    from cnncodes.pipelines.sweep.runner import _fit_key
    _, _, tmp = swept
    c = load_codes(tmp / "c.h5", "stage3")
    settings = {"c_grid": [0.1, 1.0], "folds": 2, "seed": 0}
    key = _fit_key(c.attrs, c.layer_attrs, "svm", settings)
    want = {"image_fingerprint": c.attrs["image_fingerprint"], "model": c.attrs["model"],
            "weights_sha256": c.attrs["weights_sha256"], "pooling": c.attrs["pooling"],
            "content": c.attrs["content_digest"], "module": c.layer_attrs["module"], "classifier": "svm",
            **settings}
    assert list(key.items()) == list(want.items()) and len(key["weights_sha256"]) == 64
    assert len(key["content"]) == 64  # a re-extracted image changes it, so no fit is reused stale


def test_the_solvers_former_name_keys_fits_as_its_own():
    """``--solver torch`` is ``batched`` under its former name: the same stored fits."""
    from cnncodes.pipelines.sweep.settings import SweepSettings
    keys = [SweepSettings.from_arguments("data", solver=s).fit_settings()["solver"]
            for s in ("torch", "batched")]
    assert keys == ["batched", "batched"]
    direct = SweepSettings.from_arguments("data")
    assert type(direct)(**{**direct.__dict__, "solver": "torch"}).solver == "batched"


def test_order_table_follows_the_given_backbones_then_depth_then_classifiers():
    import pandas as pd

    from cnncodes.pipelines.sweep.runner import order_table
    table = pd.DataFrame({"model": ["b", "a", "b", "a", "b"], "relative_depth": [0.5, 0.9, 0.1, 0.2, 0.5],
                          "classifier": ["svm", "softmax", "softmax", "svm", "softmax"], "n": range(5)})
    out = order_table(table, ["b", "a"], ["softmax", "svm"])
    assert list(out["n"]) == [2, 4, 0, 3, 1] and list(out.columns) == list(table.columns)
    assert list(out.index) == list(range(5))


def test_sweep_command_prints_the_table_and_json(swept, r18_weights):
    _, root, tmp = swept
    run = lambda *a: CliRunner().invoke(cli, [str(x) for x in a], catch_exceptions=False)
    base = ["sweep", root, "-m", "resnet18", "-w", r18_weights, "--cache", tmp / "c.h5", "--report",
            tmp / "report", "--folds", 2, "--c-grid", "0.1,1", "-q"]
    r = run(*base)
    assert r.exit_code == 0, r.output
    assert "stage5" in r.output and "Best: " in r.output and "index.html" in r.output
    r = run(*base, "--json")
    out = json.loads(r.output)
    assert len(out["rows"]) == 10 and out["best"]["layer"] and out["files"]["html"].endswith("index.html")
    r = run(*base, "--classifier", "lda")
    assert r.exit_code == 1 and "--classifier takes svm, softmax, knn" in r.output
    r = run("sweep", root, "-m", "resnet18", "-m", "alexnet", "--cache", tmp / "c.h5")
    assert r.exit_code == 1 and "works with one --model" in r.output


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists("/usr/bin/chromium") and not os.environ.get("CI"),
                    reason="Debian's chromium is not installed (.ci/run installs it; "
                           "in CI this test never skips)")
def test_html_report_renders_in_headless_chromium(swept, tmp_path):
    from playwright.sync_api import sync_playwright
    _, _, tmp = swept
    page_url = (tmp / "report" / "index.html").resolve().as_uri()
    shot = tmp_path / "report.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(page_url)
            table = page.locator("#sweep-table")
            assert table.is_visible() and table.locator("tbody tr").count() == 10
            plot = page.locator("#sweep-plot img")
            assert plot.is_visible()
            box = plot.bounding_box()
            assert box["width"] > 500 and box["height"] > 300
            assert plot.evaluate("img => img.complete && img.naturalWidth") >= 600  # decoded, not broken
            assert page.locator("#conclusion li").first.inner_text().startswith("Best: ")
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    with Image.open(shot) as im:
        assert im.width == 1280 and im.height > 900 and \
            len(im.convert("L").getcolors(maxcolors=256) or []) > 20


def test_a_cache_without_depth_attributes_gets_them_from_a_probe(swept, r18_weights):
    import shutil

    import h5py
    result, root, tmp = swept
    old = tmp / "old.h5"
    shutil.copyfile(tmp / "c.h5", old)
    with h5py.File(old, "r+") as f:  # as written before relative depth was recorded
        for ds in f["codes"].values():
            del ds.attrs["relative_depth"], ds.attrs["flops"]
    again = sweep(root, ["resnet18"], "stage2,stage4", ["svm"], weights=str(r18_weights), cache=old,
                  report=tmp / "old-report", **FAST)
    df = result.table
    want = df[df["classifier"] == "svm"].set_index("layer")["relative_depth"]
    assert list(again.table["relative_depth"]) == [want["stage2"], want["stage4"]]


def test_sweep_with_the_knn_probe_reuses_the_cache_and_reports_k(swept, r18_weights):
    _, root, tmp = swept
    result = sweep(root, ["resnet18"], "stage4,stage5", ["knn", "svm"], weights=str(r18_weights),
                   cache=tmp / "c.h5", report=tmp / "knn", folds=2, progress=False)
    df = result.table
    assert result.caches["resnet18"]["state"] == "up to date"
    knn = df[df["classifier"] == "knn"]
    assert list(knn["layer"]) == ["stage4", "stage5"] and knn["fitted"].all()
    assert knn["C"].isin([1, 5, 10, 20, 50, 100, 200]).all()  # the chosen k
    assert "C (k for knn)" in (tmp / "knn" / "sweep.md").read_text()


def test_sweep_select_and_class_weights_key_the_fits_and_show_what_chose(swept, r18_weights):
    """--select balanced_accuracy: the table shows the score that chose C and the best layer, the
    conclusion names it; the fits are keyed apart from the plain ones (k-NN's class weight not)."""
    _, root, tmp = swept
    result = sweep(root, ["resnet18"], "stage4,stage5", ["svm", "knn"], weights=str(r18_weights),
                   cache=tmp / "c.h5", report=tmp / "selected", select="balanced_accuracy",
                   class_weight="balanced", **FAST)
    df = result.table
    assert df["cv_balanced_accuracy"].notna().all() and df["cv_macro_f1"].notna().all()
    assert "CV balanced acc" in (tmp / "selected" / "sweep.md").read_text()
    assert "CV balanced accuracy" in result.conclusion[0]
    best = df.loc[df["cv_balanced_accuracy"].idxmax()]
    assert result.best["cv_balanced_accuracy"] == pytest.approx(best["cv_balanced_accuracy"])
    again = sweep(root, ["resnet18"], "stage4,stage5", ["svm", "knn"], weights=str(r18_weights),
                  cache=tmp / "c.h5", report=tmp / "selected", select="balanced_accuracy", **FAST)
    # without the class weights the SVM fits anew; k-NN (which has none) reads its stored fits
    knn = lambda t: list(t[t["classifier"] == "knn"]["fit_seconds"])
    assert knn(again.table) == knn(df)
    with pytest.raises(SettingsError, match="--select"):
        sweep(root, ["resnet18"], "stage4", ["svm"], weights=str(r18_weights), cache=tmp / "c.h5",
              report=tmp / "bad", select="f1", **FAST)


def test_sweep_shots_runs_the_few_shot_protocol_per_layer(swept, r18_weights):
    _, root, tmp = swept
    result = sweep(root, ["resnet18"], "stage4,stage5", ["svm", "knn"], weights=str(r18_weights),
                   cache=tmp / "c.h5", report=tmp / "shots", shots="1,2", episodes=2, **FAST)
    rows = [(f["layer"], f["classifier"], f["shots"]) for f in result.few_shot]
    assert rows == [("stage4", "svm", 1), ("stage4", "svm", 2), ("stage5", "svm", 1), ("stage5", "svm", 2)]
    assert all(0 <= f["test_accuracy_mean"] <= 1 for f in result.few_shot)
    assert (tmp / "shots" / "few_shot.csv").read_text().count("\n") == 5
    assert json.loads((tmp / "shots" / "sweep.json").read_text())["settings"]["shots"] == [1, 2]
    r = CliRunner().invoke(cli, ["sweep", str(root), "-m", "resnet18", "-w", str(r18_weights), "-c",
                                 str(tmp / "c.h5"), "--report", str(tmp / "shots"), "-l", "stage5",
                                 "--classifier", "softmax", "--folds", "2", "--c-grid", "1", "--shots", "2",
                                 "--episodes", "1", "-q"])
    assert r.exit_code == 0, r.output
    assert "few-shot test accuracy" in r.output and "softmax on stage5 of resnet18, 2 a class" in r.output
