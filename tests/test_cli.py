"""Exit codes, messages and output of the `cnncodes` commands (click's CliRunner)."""
import json

import pytest
from click.testing import CliRunner

from cnncodes.pipelines.cli import cli

COMMANDS = ["extract", "info", "list-layers", "list-models", "sample-data", "sweep", "demo"]


@pytest.fixture
def run():
    runner = CliRunner()
    return lambda *args: runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(run, command):
    r = run(command, "--help")
    assert r.exit_code == 0 and "Example" in r.output


def test_extract_info_and_rerun(run, image_folder, tmp_path, r18_weights):
    out = tmp_path / "c.h5"
    args = ["extract", image_folder, "--out", out, "-m", "resnet18", "-w", r18_weights, "-l", "layer3", "-q"]
    r = run(*args)
    assert r.exit_code == 0, r.output
    assert "created, 12/12 images done, 0 failed" in r.output and "layer3: 256" in r.output
    r = run(*args, "--json")
    assert r.exit_code == 0 and json.loads(r.output)["state"] == "up to date"
    r = run("info", out, "--json")
    info = json.loads(r.output)
    assert info["complete"] and info["layers"]["layer3"]["dim"] == 256 and info["classes"] == 3
    assert info["weights"]["name"] == "r18.pth" and info["preprocessing"]["crop"] == 224
    r = run("info", out)
    assert "complete" in r.output and "layer layer3" in r.output


@pytest.mark.parametrize("extra,message", [
    (["-l", "layr3"], "'layr3' is not a layer of resnet18. Did you mean 'layer3'"),
    (["-m", "resnet19"], "Did you mean 'resnet18'"),
    (["--precision", "bf16"], "needs a CUDA device"),
    pytest.param(["--device", "cuda:1"], "CUDA", marks=pytest.mark.skipif(
        __import__("torch").cuda.is_available(), reason="the message is for machines without CUDA")),
])
def test_bad_input_is_one_clear_line_and_exit_1(run, image_folder, tmp_path, r18_weights, extra, message):
    r = run("extract", image_folder, "--out", tmp_path / "c.h5", "-m", "resnet18", "-w", r18_weights,
            "-q", *extra)
    assert r.exit_code == 1 and message in r.output
    assert r.output.count("\n") == 1 and "Traceback" not in r.output


def test_a_bad_single_value_is_a_usage_error_naming_its_option(run, image_folder, tmp_path):
    # click's BadParameter: exit status 2, with the usage line and the option named
    r = run("extract", image_folder, "--out", tmp_path / "c.h5", "--pool", "median")
    assert r.exit_code == 2 and "Invalid value for '--pool'" in r.output and \
        "'median' is not a pooling" in r.output
    assert "Traceback" not in r.output


def test_missing_data_and_foreign_output(run, image_folder, tmp_path):
    assert run("extract", tmp_path / "nope").exit_code == 2
    (tmp_path / "x.h5").write_text("keep me")
    r = run("extract", image_folder, "--out", tmp_path / "x.h5", "-m", "resnet18", "-w", "none", "-q")
    assert r.exit_code == 1 and "not an HDF5 file" in r.output
    assert (tmp_path / "x.h5").read_text() == "keep me"


def test_list_layers_and_models(run):
    r = run("list-layers", "--model", "resnet18")
    assert r.exit_code == 0 and "layer3" in r.output and "penultimate  -> input of fc (512)" in r.output
    layers = json.loads(run("list-layers", "--model", "resnet18", "--json").output)
    assert layers["aliases"]["stage4"] == "layer3"
    models = {m["name"]: m for m in json.loads(run("list-models", "--json").output)}
    assert models["efficientnet_lite0"]["offline"] and "vgg16" in models


def test_sample_data_digits(run, tmp_path):
    r = run("sample-data", "digits", tmp_path / "d")
    assert r.exit_code == 0 and "1437 train + 360 test" in r.output
    assert len(list((tmp_path / "d").glob("*/*/*.png"))) == 1797
    assert sorted(p.name for p in (tmp_path / "d" / "train").iterdir()) == [str(i) for i in range(10)]
    assert "already there" in run("sample-data", "digits", tmp_path / "d").output


def test_extract_exits_non_zero_when_no_image_decodes(tmp_path):
    bad = tmp_path / "bad" / "x"
    bad.mkdir(parents=True)
    for i in range(2):
        (bad / f"{i}.png").write_bytes(b"not a png")
    r = CliRunner().invoke(cli, ["extract", str(tmp_path / "bad"), "-m", "timm:test_resnet", "-w", "none",
                                 "-o", str(tmp_path / "c.h5"), "-q"])
    assert r.exit_code == 1 and "none of the 2 images" in r.output and "Traceback" not in r.output
    assert (tmp_path / "c.h5").exists()   # the failures are recorded, as for any failed image
