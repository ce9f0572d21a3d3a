"""Fine-tuning plumbing on tiny models and generated images: what each stage freezes, the head's
learning rate, frozen batch-norm statistics, exact resume after a kill, DDP on gloo, bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from cnncodes.extractor import load_backbone
from cnncodes.extractor.errors import LayerNotFoundError
from cnncodes.extractor.layers import Probe

from cnncodes.pipelines.cli import cli
from cnncodes.pipelines.finetune.checkpoints import load_checkpoint
from cnncodes.pipelines.finetune.freezing import (
    FinetuneError,
    apply_stage,
    frozen_modules,
    parse_stages,
    replace_head,
    resolve_stages,
)
from cnncodes.pipelines.finetune.training import FinetuneConfig, finetune, make_optimizer

from .conftest import write_image

TINY = "timm:test_efficientnet"  # 0.36 M parameters at 160 px: an epoch of 20 images is ~0.2 s
REPO = Path(__file__).resolve().parents[1]


def tiny_config(data, out, **kw) -> FinetuneConfig:
    base = dict(model=TINY, weights="none", stages="head:1,stage5:1,all:1", batch_size=4,
                val_fraction=0.3, workers=0, patience=0)
    base.update(kw)
    return FinetuneConfig(str(data), str(out), **base)


def write_many(root: Path, per_class: int = 12, classes=("a", "b", "c"), size=(48, 40)) -> Path:
    for c, cls in enumerate(classes):
        for i in range(per_class):
            write_image(root / "train" / cls / f"{i}.png", seed=1000 + 50 * c + i, size=size)
        for i in range(3):
            write_image(root / "test" / cls / f"{i}.png", seed=3000 + 50 * c + i, size=size)
    return root


# --- stages and freezing ---------------------------------------------------------------------------

def test_parse_stages_and_errors():
    assert parse_stages("head:3, layer4:3,all:4") == [("head", 3), ("layer4", 3), ("all", 4)]
    for bad in ("head", "head:0", "head:x", ":3", ""):
        with pytest.raises(FinetuneError, match="START:EPOCHS"):
            parse_stages(bad)


@pytest.fixture(scope="module")
def resnet():
    bb = load_backbone("resnet18", "none")
    probe = Probe(bb.model, 64, "resnet18")
    head = replace_head(bb.model, probe, 5)
    return bb.model, probe, head


def _trainable_tops(model) -> set[str]:
    return {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}


def test_each_stage_trains_its_start_and_everything_after(resnet):
    model, probe, head = resnet
    assert head == ("fc",) and model.fc.out_features == 5
    stages = resolve_stages(probe, parse_stages("head:1,stage5:1,layer3:1,layer2.1:1,all:1"))
    expected = [{"fc"}, {"layer4", "fc"}, {"layer3", "layer4", "fc"}, {"layer2", "layer3", "layer4", "fc"},
                {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc"}]
    for stage, want in zip(stages, expected):
        n = apply_stage(model, frozen_modules(model, probe, stage, head))
        assert _trainable_tops(model) == want, stage.name
        assert n == sum(p.numel() for p in model.parameters() if p.requires_grad)
    # layer2.1 starts inside layer2: layer2.0 stays frozen
    apply_stage(model, frozen_modules(model, probe, stages[3], head))
    assert not any(p.requires_grad for p in model.layer2[0].parameters())
    assert all(p.requires_grad for p in model.layer2[1].parameters())
    assert stages[1].module == "layer4"


def test_stages_out_of_order_and_unknown_names_are_refused(resnet):
    _, probe, _ = resnet
    with pytest.raises(FinetuneError, match="out of network order.*'layer4' starts after 'layer3'"):
        resolve_stages(probe, parse_stages("head:1,layer3:1,layer4:1"))
    with pytest.raises(FinetuneError, match="out of network order"):
        resolve_stages(probe, parse_stages("all:1,head:1"))
    with pytest.raises(LayerNotFoundError,
                       match="'layr4' is not a layer.*'layer4'.*Valid starts: head, all, stage1"):
        resolve_stages(probe, parse_stages("head:1,layr4:1"))


def test_head_learns_ten_times_faster_and_from_scratch_evenly(resnet):
    model, probe, head = resnet
    stage = resolve_stages(probe, [("layer4", 1)])[0]
    apply_stage(model, frozen_modules(model, probe, stage, head))
    opt = make_optimizer(model, head, FinetuneConfig("d", "o", lr=0.002))
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"backbone": 0.002, "head": pytest.approx(0.02)}
    head_ids = {id(p) for p in model.fc.parameters()}
    assert {id(p) for p in opt.param_groups[1]["params"]} == head_ids
    assert not head_ids & {id(p) for p in opt.param_groups[0]["params"]}
    scratch = make_optimizer(model, head, FinetuneConfig("d", "o", lr=0.002, from_scratch=True))
    assert [g["lr"] for g in scratch.param_groups] == pytest.approx([0.02, 0.02])


def test_layer_wise_decay_gives_each_stage_below_the_top_a_smaller_rate(resnet):
    from cnncodes.pipelines.finetune.freezing import depth_groups
    model, probe, head = resnet
    apply_stage(model, frozen_modules(model, probe, resolve_stages(probe, [("all", 1)])[0], head))
    depth = depth_groups(model, probe)
    assert set(depth) == {n for n, _ in model.named_parameters()}
    # resnet's stages: the stem (conv1, bn1) before stage1, layer1 ... layer4, the head last
    assert depth["conv1.weight"] == 0 and depth["layer1.0.conv1.weight"] < depth["layer4.1.bn2.bias"]
    assert depth["layer2.0.conv1.weight"] <= depth["layer3.0.conv1.weight"] <= depth["layer4.0.conv1.weight"]
    opt = make_optimizer(model, head, FinetuneConfig("d", "o", lr=0.01, lr_decay=0.5), depth)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    top = max(depth.values())
    assert lrs["backbone"] == 0.01 and lrs["head"] == pytest.approx(0.1)
    assert lrs[f"backbone-{top}"] == pytest.approx(0.01 * 0.5 ** top)
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each parameter once
    assert [g["name"] for g in make_optimizer(model, head, FinetuneConfig("d", "o"), depth).param_groups] == \
        ["backbone", "head"]  # lr_decay 1: one backbone group
    with pytest.raises(FinetuneError, match="--lr-decay"):
        make_optimizer(model, head, FinetuneConfig("d", "o", lr_decay=0.0), depth)


def test_layer_wise_groups_are_the_stages_that_stages_trains():
    # EfficientNet-Lite0: stage4 = blocks.4 and stage5 = bn2 name the modules that *end* those
    # stages; `--stages stage5:N` trains everything after blocks.4, and so is the top group
    from cnncodes.extractor.layers import Probe

    from cnncodes.pipelines.finetune.freezing import depth_groups
    bb = load_backbone("efficientnet_lite0", "none")
    probe = Probe(bb.model, bb.input_size, "efficientnet_lite0")
    depth = depth_groups(bb.model, probe)
    top = max(depth.values())
    assert top == 4 and depth["conv_stem.weight"] == depth["blocks.0.0.conv_dw.weight"] == 0
    for name in ("blocks.5.0.conv_pw.weight", "blocks.6.0.conv_pw.weight", "conv_head.weight", "bn2.weight"):
        assert depth[name] == top, name
    assert depth["blocks.3.0.conv_pw.weight"] == depth["blocks.4.0.conv_pw.weight"] == 3
    stage = resolve_stages(probe, [("stage5", 1)])[0]
    frozen = frozen_modules(bb.model, probe, stage, ("classifier",))
    trained = {n.rpartition(".")[0] for n, _ in bb.model.named_parameters()} - frozen - {"classifier"}
    assert {depth[f"{m}.weight"] for m in trained if f"{m}.weight" in depth} == {top}


def test_a_run_with_layer_wise_decay_logs_a_rate_per_stage(tmp_path, data):
    cfg = tiny_config(data, tmp_path / "run", stages="head:1,all:2", lr_decay=0.6)
    full = finetune(cfg, progress=False)
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert set(lrs[1]) > {"backbone", "head", "backbone-1"} and full.recipe["lr_decay"] == 0.6


@pytest.mark.parametrize("mix", ["mixup", "cutmix", "both"])
def test_mixed_batches_have_soft_labels_and_train(tmp_path, data, mix):
    from cnncodes.pipelines.finetune.epochs import batch_mixer
    x, y = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    mixed, soft = batch_mixer(mix, 3)(x, y)
    assert mixed.shape == x.shape and soft.shape == (6, 3) and torch.allclose(soft.sum(1), torch.ones(6))
    r = finetune(tiny_config(data, tmp_path / "run", stages="head:1,all:1", mix=mix), progress=False)
    assert r.recipe["mix"] == mix and r.epochs_run == 2


def test_ema_validates_and_saves_the_average_and_the_raw_weights_go_on_training(tmp_path, data):
    r = finetune(tiny_config(data, tmp_path / "run", stages="head:1,all:2", ema=0.5, patience=0),
                 progress=False)
    last, best = load_checkpoint(tmp_path / "run" / "last.pt"), load_checkpoint(tmp_path / "run" / "best.pt")
    assert r.recipe["ema"] == 0.5 and last["ema"] is not None

    def average(ckpt):
        return {k[len("module."):]: v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    assert set(average(last)) == set(last["model"])
    assert any(not torch.equal(v, last["model"][k]) for k, v in average(last).items()), "it should lag"
    # best.pt holds the average its epoch's validation scored, not the raw weights
    assert all(torch.equal(best["model"][k], v) for k, v in average(best).items())
    with pytest.raises(FinetuneError, match="ema"):
        finetune(tiny_config(data, tmp_path / "bad", ema=1.0), progress=False)


# --- runs --------------------------------------------------------------------------------------------

@pytest.fixture
def data(tmp_path) -> Path:
    return write_many(tmp_path / "data")


def _bn_stats(sd: dict) -> dict:
    return {k: v for k, v in sd.items() if k.endswith(("running_mean", "running_var"))}


def test_run_writes_metrics_curves_and_checkpoints(tmp_path, data):
    r = finetune(tiny_config(data, tmp_path / "run", stages="head:2,stage5:1"), progress=False)
    out = tmp_path / "run"
    assert {p.name for p in out.iterdir()} >= {"best.pt", "last.pt", "metrics.jsonl", "result.json",
                                               "curves.png", "confusion.png"}
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["stage"] for l in lines] == ["head", "head", "stage5"]
    assert set(lines[0]) >= {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr",
                             "trainable_params"}
    assert set(lines[0]["lr"]) == {"head"} and set(lines[2]["lr"]) == {"backbone", "head"}
    assert lines[0]["trainable_params"] < lines[2]["trainable_params"]
    saved = json.loads((out / "result.json").read_text())
    assert saved["evaluated_on"] == "test" and saved["images"] == {"train": 25, "val": 11, "test": 9}
    assert 0 <= r.test_accuracy <= 1 and len(saved["confusion"]) == 3
    assert json.loads(json.dumps(r.as_dict(), default=str)) == saved  # the summary returned is result.json
    ckpt = load_checkpoint(out / "last.pt")
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "epoch", "stage", "frozen", "rng", "recipe"}
    assert ckpt["stage"] == "stage5" and "conv_stem" in ckpt["frozen"] and "blocks.4" not in ckpt["frozen"]


def test_frozen_parts_and_their_bn_statistics_stay_put(tmp_path, data):
    start = _initial_state(data, tmp_path)
    finetune(tiny_config(data, tmp_path / "head", stages="head:2"), progress=False)
    after = load_checkpoint(tmp_path / "head" / "last.pt")["model"]
    assert _bn_stats(start)
    for k, v in start.items():
        if k.startswith("classifier."):
            assert not torch.equal(after[k], v), "the head should train"
        else:
            assert torch.equal(after[k], v), f"frozen {k} changed"
    finetune(tiny_config(data, tmp_path / "bn-train", stages="head:1", bn="train"), progress=False)
    moved = load_checkpoint(tmp_path / "bn-train" / "last.pt")["model"]
    assert any(not torch.equal(moved[k], v) for k, v in _bn_stats(start).items())


@pytest.mark.parametrize("bn,moves", [("eval", False), ("frozen", True), ("train", True)])
def test_bn_eval_keeps_the_statistics_of_unfrozen_layers_too(tmp_path, data, bn, moves):
    start = _initial_state(data, tmp_path)
    finetune(tiny_config(data, tmp_path / bn, stages="all:1", bn=bn), progress=False)
    after = load_checkpoint(tmp_path / bn / "last.pt")["model"]
    changed = [k for k, v in _bn_stats(start).items() if not torch.equal(after[k], v)]
    assert bool(changed) == moves, changed
    # the scale and shift of unfrozen batch-norm layers train in every mode
    assert any(not torch.equal(after[k], v) for k, v in start.items() if k.endswith("bn1.weight"))


def test_from_scratch_always_reestimates_the_statistics(tmp_path, data):
    r = finetune(tiny_config(data, tmp_path / "s", stages="all:1", from_scratch=True), progress=False)
    assert r.recipe["bn"] == "train"


def _initial_state(data, tmp_path) -> dict:
    """The network a run starts from: the seeded initialisation and head, before any step."""
    from cnncodes.pipelines.finetune.training import _Dist, _Run
    run = _Run(tiny_config(data, tmp_path / "init"), _Dist(), progress=False)
    return {k: v.clone() for k, v in run.model.state_dict().items()}


def test_checkpoint_is_weights_for_extract_and_finetune(tmp_path, data):
    from cnncodes.extractor import extract, open_cache
    finetune(tiny_config(data, tmp_path / "run", stages="head:1"), progress=False)
    best = tmp_path / "run" / "best.pt"
    res = extract(data, tmp_path / "codes.h5", model=TINY, weights=str(best), layers=["penultimate"],
                  progress=False)
    with open_cache(res.path) as c:
        assert c.attrs["weights"]["sha256"] and c.codes("penultimate").shape[0] == 45
    again = finetune(tiny_config(data, tmp_path / "run2", stages="head:1", weights=str(best)), progress=False)
    assert again.recipe["weights"]["name"] == "best.pt"


def test_corrupt_image_is_skipped_and_recorded(tmp_path, data):
    (data / "train" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    r = finetune(tiny_config(data, tmp_path / "run", stages="head:1", val_fraction=0.2), progress=False)
    assert r.failed_images == ["train/a/broken.png"] and r.status == "trained"


def test_resume_refuses_another_recipe_or_class_list(tmp_path, data):
    finetune(tiny_config(data, tmp_path / "run", stages="head:1"), progress=False)
    with pytest.raises(FinetuneError, match="already holds a run.*--resume.*--overwrite"):
        finetune(tiny_config(data, tmp_path / "run", stages="head:1"), progress=False)
    with pytest.raises(FinetuneError, match="different recipe: lr: 0.0001 in the run, 0.01 now"):
        finetune(tiny_config(data, tmp_path / "run", stages="head:1", lr=0.01), resume=True, progress=False)
    for i in range(12):
        write_image(data / "train" / "d" / f"{i}.png", seed=7000 + i)
    with pytest.raises(FinetuneError, match=r"classes differ \(new: d\)"):
        finetune(tiny_config(data, tmp_path / "run", stages="head:1"), resume=True, progress=False)
    r = finetune(tiny_config(data, tmp_path / "run", stages="head:1"), overwrite=True, progress=False)
    assert r.status == "trained" and len(r.classes) == 4


def test_bad_data_is_refused(tmp_path):
    one = tmp_path / "one"
    for i in range(4):
        write_image(one / "train" / "a" / f"{i}.png", seed=i)
    with pytest.raises(FinetuneError, match="1 class"):
        finetune(tiny_config(one, tmp_path / "r1"), progress=False)
    no_train = tmp_path / "no-train"
    for c in "ab":
        write_image(no_train / "test" / c / "0.png", seed=1)
    with pytest.raises(FinetuneError, match="train split .* is empty"):
        finetune(tiny_config(no_train, tmp_path / "r2"), progress=False)


def test_early_stopping_ends_a_stage(tmp_path, data):
    r = finetune(tiny_config(data, tmp_path / "run", stages="head:6,all:1", lr=1e-9, head_lr_mult=1.0,
                             patience=1), progress=False)
    head = r.stages[0]
    assert head["epochs_run"] < 6 and r.stages[1]["epochs_run"] == 1
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[head["epochs_run"] - 1]["early_stop"] is True


# --- CLI, kill and resume, DDP -------------------------------------------------------------------------

def _cnncodes(*args) -> list[str]:
    return [sys.executable, "-m", "cnncodes", *map(str, args)]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


TRAIN_ARGS = ["--model", TINY, "--weights", "none", "-b", "2", "--val-fraction", "0.3", "-j", "0",
              "--patience", "0", "-q"]


# "prepared": photos larger than the tiny model's training side (271 px), so the run reads its
# training and evaluation copies (--prepare, the default) and resumes from them
@pytest.mark.parametrize("extra", [["prepared"], ["--mix", "both", "--lr-decay", "0.7", "--ema", "0.9"]],
                         ids=["prepared", "mixed"])
def test_killed_mid_epoch_then_resumed_matches_the_uninterrupted_run(tmp_path, extra):
    prepared = extra == ["prepared"]
    data = write_many(tmp_path / "data", per_class=30, size=(300, 280) if prepared else (48, 40))
    if prepared:
        extra = ["--prepared-dir", tmp_path / "prepared"]
    args = ["finetune", data, "--stages", "head:1,stage4:2,all:1", *TRAIN_ARGS, *extra]
    subprocess.run(_cnncodes(*args, "--out", tmp_path / "whole"), check=True, env=_env(), cwd=REPO)
    want = load_checkpoint(tmp_path / "whole" / "last.pt")

    run = tmp_path / "killed"
    proc = subprocess.Popen(_cnncodes(*args, "--out", run), env=_env(), cwd=REPO)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    epoch_s = json.loads(metrics.read_text().splitlines()[1])["seconds"]
    time.sleep(0.4 * epoch_s)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(metrics.read_text().splitlines())
    assert done == 2, "the kill should land inside the third epoch"
    subprocess.run(_cnncodes(*args, "--out", run, "--resume"), check=True, env=_env(), cwd=REPO)
    got = load_checkpoint(run / "last.pt")
    assert got["epoch"] == want["epoch"] == 4
    for k, v in want["model"].items():
        assert torch.equal(got["model"][k], v), k
    assert [json.loads(l)["val_loss"] for l in metrics.read_text().splitlines()] == \
        [json.loads(l)["val_loss"] for l in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    if prepared:
        assert len(list((tmp_path / "prepared").glob("train-*/*.npy"))) > 50


def test_ddp_on_gloo_ends_with_identical_weights_on_both_ranks(tmp_path, data):
    # Batches of one image and some broken files: a rank then meets a batch with nothing to
    # train on while the other rank has one, which must not leave that rank waiting forever.
    for cls in ("a", "b", "c"):
        for i in range(3):
            (data / "train" / cls / f"broken{i}.png").write_bytes(b"not an image")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cnncodes", "finetune", str(data), "--stages", "head:1,all:1", *TRAIN_ARGS, "-b", "1",
           "--out", str(tmp_path / "ddp"), "--json"]
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
        proc.communicate()
        pytest.fail("DDP run stalled")
    assert proc.returncode == 0, err[-3000:]
    r = json.loads((tmp_path / "ddp" / "result.json").read_text())
    assert r["world_size"] == 2 and len(r["rank_digests"]) == 2
    assert r["rank_digests"][0] == r["rank_digests"][1] and r["ranks_agree"]
    assert sum("broken" in f for f in r["failed_images"]) >= 1
    # every validation image was scored once, shared between the ranks
    lines = [json.loads(l) for l in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and r["images"]["test"] == 9 and sum(map(sum, r["confusion"])) == 9


def test_cli_finetune_and_its_errors(tmp_path, data):
    runner = CliRunner()
    base = ["finetune", str(data), *TRAIN_ARGS]
    r = runner.invoke(cli, [*base, "--freeze-until", "stage5", "--epochs", "1", "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    assert "stage5" in r.output and "test accuracy" in r.output
    r = runner.invoke(cli, [*base, "--stages", "head:1", "--freeze-until", "stage5"])
    assert r.exit_code == 2 and "give one" in r.output
    r = runner.invoke(cli, [*base, "--stages", "head:1,blocks.99:1", "--out", str(tmp_path / "x")])
    assert r.exit_code == 1 and "'blocks.99' is not a layer" in r.output and "Traceback" not in r.output
    r = runner.invoke(cli, [*base, "--freeze-until", "stage5", "--epochs", "1", "--out", str(tmp_path / "r")])
    assert r.exit_code == 1 and "already holds a run" in r.output
    r = runner.invoke(cli, [*base, "--freeze-until", "stage5", "--epochs", "1", "--out", str(tmp_path / "r"),
                            "--resume", "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["status"] == "up to date"


def test_compare_writes_one_report_and_reuses_finished_strategies(tmp_path, data):
    from cnncodes.pipelines.compare.strategies import compare
    cfg = tiny_config(data, "", batch_size=4)
    result = compare(data, TINY, weights="none", out=tmp_path / "cmp", head_epochs=1, epochs=1, config=cfg,
                     progress=False)
    df = result.table
    assert list(df["strategy"]) == ["probe", "top", "all", "scratch"]
    assert df["test_accuracy"].between(0, 1).all()
    params = dict(zip(df["strategy"], df["trainable_params"]))
    assert params["probe"] < params["top"] < params["all"] == params["scratch"]
    files = {Path(p).name for p in result.files.values()}
    assert files == {"compare.csv", "compare.json", "compare.md", "compare.png", "index.html"}
    summary = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert len(summary["rows"]) == 4 and summary["conclusion"][0].startswith("Best:")
    assert summary["conclusion"] == result.conclusion and summary["settings"] == result.settings
    html = (tmp_path / "cmp" / "index.html").read_text()
    assert 'id="compare-table"' in html and "data:image/png;base64," in html
    t = time.perf_counter()
    again = compare(data, TINY, weights="none", out=tmp_path / "cmp", head_epochs=1, epochs=1, config=cfg,
                    progress=False)
    assert time.perf_counter() - t < 10  # nothing retrained: read back
    assert list(again.table["test_accuracy"]) == list(df["test_accuracy"])
    # a strategy recorded before --lr-decay, --mix and --ema existed ran with their former values
    from cnncodes.pipelines.records import read_record
    record_path = tmp_path / "cmp" / "strategies" / "all.json"
    record = json.loads(record_path.read_text())
    for k in ("lr_decay", "mix", "ema"):
        del record["key"]["config"][k]
    record_path.write_text(json.dumps(record))
    t = time.perf_counter()
    older = compare(data, TINY, weights="none", out=tmp_path / "cmp", head_epochs=1, epochs=1, config=cfg,
                    strategies=["all"], progress=False)
    assert time.perf_counter() - t < 10 and list(older.table["test_accuracy"]) == [df["test_accuracy"][2]]
    assert read_record(record_path, {"other": "key"}) is None


def test_out_of_memory_becomes_advice(tmp_path, data, monkeypatch):
    import cnncodes.pipelines.finetune.epochs as ft

    def oom(out):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(ft, "_logits", oom)
    with pytest.raises(FinetuneError, match=r"ran out of memory at --batch-size 4: try --batch-size 2 "
                                            r"--accumulate 2 \(the same effective batch\)"):
        finetune(tiny_config(data, tmp_path / "run", stages="head:1"), progress=False)


@pytest.mark.gpu
def test_cuda_run_with_autocast_and_accumulation(tmp_path, data):
    r = finetune(tiny_config(data, tmp_path / "run", stages="head:1,all:1", device="cuda", accumulate=2),
                 progress=False)
    assert r.device.startswith("cuda") and r.precision in ("bf16", "fp16")
    assert 0 <= r.test_accuracy <= 1


def test_accumulate_steps_once_per_n_batches(tmp_path, data):
    for n in (1, 2):
        finetune(tiny_config(data, tmp_path / f"acc{n}", stages="head:1", accumulate=n), progress=False)
    steps = {n: load_checkpoint(tmp_path / f"acc{n}" / "last.pt")["scheduler"]["last_epoch"] for n in (1, 2)}
    assert steps == {1: 7, 2: 4}  # 25 training images in batches of 4: 7 batches


def test_compare_takes_the_best_layer_of_a_sweep_report(tmp_path):
    from cnncodes.pipelines.compare.strategies import best_layer_from_sweep
    rows = [{"model": "m", "layer": "stage3", "cv_accuracy": 0.8},
            {"model": "m", "layer": "stage4", "cv_accuracy": 0.9},
            {"model": "other", "layer": "stage5", "cv_accuracy": 0.99},
            {"model": "m", "layer": "stage5", "cv_accuracy": None}]
    (tmp_path / "sweep.json").write_text(json.dumps({"rows": rows}))
    assert best_layer_from_sweep(tmp_path, "m") == "stage4"
    with pytest.raises(FinetuneError, match="no fitted layer of nope"):
        best_layer_from_sweep(tmp_path, "nope")
    with pytest.raises(FinetuneError, match="cannot read the sweep report"):
        best_layer_from_sweep(tmp_path / "missing", "m")
