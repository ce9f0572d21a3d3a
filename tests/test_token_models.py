"""Token models (ViT, DeiT, registers, Swin, ConvNeXt) on tiny random-weight timm models: layer
kinds, every pooling against the same computation done by hand, aliases, truncation, refusals,
the cache's layer attributes, a sweep over two blocks, and what fine-tuning freezes."""
from __future__ import annotations

import json

import h5py
import pytest
import timm
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from torch import nn

from cnncodes.extractor import extract, load_backbone
from cnncodes.extractor.encoding import layer_specs
from cnncodes.extractor.errors import LayerNotFoundError, PoolingError
from cnncodes.extractor.layers import Probe, Tapper
from cnncodes.extractor.pooling import parse_pooling

from cnncodes.pipelines.cli import cli
from cnncodes.pipelines.finetune.freezing import (
    apply_stage,
    frozen_modules,
    parse_stages,
    replace_head,
    resolve_stages,
)

from .conftest import write_image

torch.manual_seed(0)


def vit(**kw) -> nn.Module:
    """A 4-block ViT at 64 px (a 4x4 grid of 16-px patches), 32 wide."""
    args = dict(img_size=64, patch_size=16, embed_dim=32, depth=4, num_heads=2, num_classes=5)
    args.update(kw)
    return timm.create_model("vit_tiny_patch16_224", **args).eval()


def swin() -> nn.Module:
    """A Swin with one block per stage at 224 px (maps 56, 28, 14, 7), 16 wide."""
    return timm.create_model("swin_tiny_patch4_window7_224", embed_dim=16, depths=(1, 1, 2, 1),
                             num_heads=(1, 1, 2, 2), num_classes=5).eval()


def raw(model: nn.Module, module: str, x: torch.Tensor) -> torch.Tensor:
    """A module's output, read by a plain forward hook (the hand computation's input)."""
    got = {}
    h = model.get_submodule(module).register_forward_hook(lambda m, a, o: got.setdefault("t", o.detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    return got["t"]


def tap(model: nn.Module, size: int, layer: str, pool: str, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), Tapper(model, Probe(model, size).resolve([layer]), parse_pooling(pool)) as t:
        return t(x)[layer]


# --- kinds -------------------------------------------------------------------------------------------

def test_vit_layers_are_tokens_with_their_prefix_and_grid():
    p = Probe(vit(), 64, "vit")
    b = p.by_name["blocks.1"]
    assert b.kind == "tokens" and b.shape == (17, 32) and b.layout.prefix == 1 and b.layout.grid == (4, 4)
    assert b.layout.describe() == "1+16 tokens x 32" and b.stride == 16
    assert p.by_name["patch_embed"].layout.describe() == "16 tokens x 32"   # before the CLS token joins
    assert p.by_name["patch_embed.proj"].kind == "map" and p.by_name["patch_embed.proj"].shape == (32, 4, 4)
    assert p.by_name["blocks.1.mlp.fc1"].layout.describe() == "1+16 tokens x 128"
    for inner in ("blocks.1.attn.qkv", "blocks.1.attn.q_norm", "blocks.1.attn.proj"):
        assert p.by_name[inner].kind == "internal", inner
    assert p.by_name["blocks.1.attn"].kind == "tokens"          # the attention's own output is a layer
    assert p.by_name["head"].kind == "vector"


def test_distillation_and_register_tokens_count_as_prefix():
    deit = timm.create_model("deit_tiny_distilled_patch16_224", img_size=64, embed_dim=32, depth=2,
                             num_heads=2, num_classes=5).eval()
    p = Probe(deit, 64)
    assert p.by_name["blocks.0"].layout.describe() == "2+16 tokens x 32"
    assert p.aliases()["penultimate"].name == "head"   # the CLS head, not the distillation head
    p = Probe(vit(reg_tokens=4), 64)
    assert p.by_name["blocks.0"].layout.describe() == "5+16 tokens x 32"
    p = Probe(vit(reg_tokens=2, class_token=False, global_pool="avg"), 64)
    lay = p.by_name["blocks.0"].layout
    assert lay.describe() == "2+16 tokens x 32" and not lay.class_token


def test_swin_stages_are_channels_last_maps_and_window_attention_is_internal():
    p = Probe(swin(), 224, "swin")
    for i, (hw, c) in enumerate([(56, 16), (28, 32), (14, 64), (7, 128)]):
        info = p.by_name[f"layers.{i}"]
        assert info.kind == "map-channels-last" and info.shape == (hw, hw, c) and info.stride == 224 // hw
        assert info.layout.describe() == f"{hw}x{hw}x{c} (channels-last)"
    assert p.by_name["patch_embed.proj"].kind == "map"  # the patch convolution writes N x C x H x W
    assert p.by_name["layers.0.blocks.0.attn"].kind == "internal"   # runs on 64 windows, not one image
    assert {k: v.name for k, v in p.aliases().items()} == {
        "stage2": "layers.0", "stage3": "layers.1", "stage4": "layers.2", "stage5": "norm",
        "penultimate": "head.fc"}
    assert [b.name for b in p.blocks] == ["layers.0.blocks.0", "layers.1.blocks.0", "layers.2.blocks.0",
                                          "layers.2.blocks.1", "layers.3.blocks.0"]


def test_convnext_blocks_are_maps_and_their_inner_norm_is_channels_last():
    model = timm.create_model("convnext_atto", num_classes=5, conv_mlp=False).eval()
    p = Probe(model, 64)
    assert p.by_name["stages.1.blocks.0"].kind == "map" and p.by_name["stages.1.blocks.0"].shape == (80, 8, 8)
    assert p.by_name["stages.1.blocks.0.norm"].kind == "map-channels-last"
    assert p.by_name["stages.1.blocks.0.mlp.fc1"].shape == (8, 8, 320)
    assert {k: v.name for k, v in p.aliases().items()} == {
        "stage2": "stages.0", "stage3": "stages.1", "stage4": "stages.2", "stage5": "norm_pre",
        "penultimate": "head.fc"}


def test_torchvision_vit_prefix_from_its_class_token_and_grid_from_its_patch_convolution():
    from torchvision.models import VisionTransformer
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                              mlp_dim=32, num_classes=3).eval()
    p = Probe(model, 32)
    enc = p.by_name["encoder.layers.encoder_layer_1"]
    assert enc.layout.describe() == "1+16 tokens x 16" and enc.layout.grid == (4, 4)
    assert [b.name for b in p.blocks] == ["encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1"]


# --- pooling = the same computation by hand ----------------------------------------------------------

def test_every_token_pooling_equals_the_hand_computation_on_the_raw_block_output():
    model = vit(reg_tokens=2)   # prefix = CLS + 2 registers
    x = torch.randn(3, 3, 64, 64)
    t = raw(model, "blocks.2", x)                       # (3, 3 + 16, 32)
    patches = t[:, 3:]
    grid = patches.reshape(3, 4, 4, 32).permute(0, 3, 1, 2)
    want = {
        "cls": t[:, 0],
        "mean": patches.mean(1), "avg": patches.mean(1), "max": patches.amax(1),
        "avgmax": torch.cat([patches.mean(1), patches.amax(1)], 1),
        "cls+mean": torch.cat([t[:, 0], patches.mean(1)], 1),
        "none": t.flatten(1),
        "grid:2": F.adaptive_avg_pool2d(grid, 2).flatten(1),
        "spp:1,2": torch.cat([grid.amax((2, 3)), F.adaptive_max_pool2d(grid, 2).flatten(1)], 1),
    }
    for pool, ref in want.items():
        got = tap(model, 64, "blocks.2", pool, x)
        assert got.shape == ref.shape and torch.allclose(got, ref, atol=1e-6), pool
        assert parse_pooling(pool).dim(Probe(model, 64).by_name["blocks.2"].layout) == ref.shape[1]


def test_channels_last_maps_pool_exactly_like_nchw_maps():
    model = swin()
    x = torch.randn(2, 3, 224, 224)
    nchw = raw(model, "layers.1", x).permute(0, 3, 1, 2)   # (2, 32, 28, 28)
    want = {"avg": nchw.mean((2, 3)), "mean": nchw.mean((2, 3)), "max": nchw.amax((2, 3)),
            "grid:2": F.adaptive_avg_pool2d(nchw, 2).flatten(1), "none": nchw.flatten(1)}
    for pool, ref in want.items():
        got = tap(model, 224, "layers.1", pool, x)
        assert torch.allclose(got, ref, atol=1e-5), pool


def test_poolings_that_mean_nothing_are_refused_naming_the_layers_that_can():
    model = vit()
    p = Probe(model, 64, "vit")
    with pytest.raises(PoolingError, match=r"'blocks.1.attn.qkv' is an internal tensor .*attention "
                                           r"module 'blocks.1.attn'.*can take --pool avg: stage1"):
        layer_specs(p.resolve(["blocks.1.attn.qkv"]), parse_pooling("avg"), 64, p)
    s = Probe(swin(), 224, "swin")
    with pytest.raises(PoolingError, match=r"'stage3' is a feature map .*'cls' needs a token layer\. "
                                           r"No map or token layer"):
        layer_specs(s.resolve(["stage3"]), parse_pooling("cls"), 224, s)
    g = Probe(vit(reg_tokens=2, class_token=False, global_pool="avg"), 64)
    with pytest.raises(PoolingError, match="registers, with no class token.*use mean"):
        layer_specs(g.resolve(["blocks.0"]), parse_pooling("cls+mean"), 64, g)
    with pytest.raises(PoolingError, match="asks for 5x5 cells: use sizes up to 4"):
        layer_specs(p.resolve(["blocks.0"]), parse_pooling("grid:5"), 64, p)
    # a vector passes through any pooling, and cls of a token layer is fine
    specs = layer_specs(p.resolve(["block:-1", "penultimate"]), parse_pooling("cls"), 64, p)
    assert [s.dim for s in specs] == [32, 32]


# --- aliases and truncation --------------------------------------------------------------------------

def test_aliases_are_quarters_of_the_blocks_and_block_k_indexes_them():
    model = timm.create_model("vit_tiny_patch16_224", img_size=64, embed_dim=32, depth=12, num_heads=2).eval()
    p = Probe(model, 64, "vit12")
    assert [b.name for b in p.blocks] == [f["module"] for f in model.feature_info]   # timm's own list
    assert {k: v.name for k, v in p.aliases().items()} == {
        "stage1": "blocks.2", "stage2": "blocks.5", "stage3": "blocks.8", "stage4": "blocks.11",
        "penultimate": "head"}
    taps = p.resolve(["block:0", "block:-1", "block:7", "penultimate"])
    assert [t.module for t in taps] == ["blocks.0", "blocks.11", "blocks.7", "head"]
    assert taps[3].shape == (32,) and taps[3].hook == "input"
    with pytest.raises(LayerNotFoundError, match=r"12 blocks: 'block:12' is out of range \(block:0..block:1"):
        p.resolve(["block:12"])
    with pytest.raises(LayerNotFoundError, match="no stage5: it has four quarters of its blocks"):
        p.resolve(["stage5"])
    assert Probe(vit(), 64).aliases()["stage1"].name == "blocks.0"   # 4 blocks: one per quarter


def test_no_module_after_the_deepest_token_tap_runs():
    model = vit()
    ran = []
    for name in ("blocks.2", "blocks.3", "norm", "head"):
        model.get_submodule(name).register_forward_hook(lambda m, a, o, n=name: ran.append(n))
    taps = Probe(model, 64).resolve(["block:1", "stage2"])   # stage2 = blocks.1 of 4 blocks
    ran.clear()
    with torch.no_grad(), Tapper(model, taps, parse_pooling("cls")) as t:
        out = t(torch.randn(2, 3, 64, 64))
    assert ran == [] and out["block:1"].shape == (2, 32) and torch.equal(out["block:1"], out["stage2"])


# --- the cache, the command line, a sweep ------------------------------------------------------------


def test_cache_records_kind_tokens_and_pooling_and_resumes(photos, tmp_path):
    out = tmp_path / "c.h5"
    layers = ["stage2", "block:-1", "penultimate"]
    r = extract(photos, out, model="timm:test_vit", weights="none", layers=layers, pool="cls+mean",
                progress=False)
    assert r.layers == {"stage2": 128, "block:-1": 128, "penultimate": 64}
    with h5py.File(out) as f:
        a = dict(f["codes/block:-1"].attrs)
        assert a["kind"] == "tokens" and a["prefix_tokens"] == 1 and a["patch_tokens"] == 100
        assert a["pooling"] == "cls+mean" and a["module"] == "blocks.5" and a["hook"] == "output"
        pen = f["codes/penultimate"].attrs
        assert pen["kind"] == "vector" and pen["pooling"] == "none" and pen["hook"] == "input"
    again = extract(photos, out, model="timm:test_vit", weights="none", layers=layers, pool="cls+mean",
                    progress=False)
    assert again.state == "up to date"


def test_list_layers_shows_kinds_token_counts_and_what_each_alias_means():
    r = CliRunner().invoke(cli, ["list-layers", "--model", "timm:test_vit"])
    assert r.exit_code == 0, r.output
    assert "1+100 tokens x 64" in r.output and "internal" not in r.output
    assert "stage4       -> blocks.5 (1+100 tokens x 64)" in r.output
    assert "block:0 = blocks.0 .. block:5 = block:-1 = blocks.5 (6 blocks)" in r.output
    j = json.loads(CliRunner().invoke(cli, ["list-layers", "--model", "timm:test_vit", "--json"]).output)
    blk = next(l for l in j["layers"] if l["name"] == "blocks.5")
    assert blk["kind"] == "tokens" and blk["prefix_tokens"] == 1 and blk["grid"] == [10, 10]
    assert j["aliases"]["block:5"] == "blocks.5" and j["aliases"]["stage4"] == "blocks.5"
    r = CliRunner().invoke(cli, ["extract", "x", "--model", "timm:test_vit"])
    assert r.exit_code == 2   # (no such folder: the usual usage error)


def test_refused_pooling_is_one_line_on_the_command_line(photos, tmp_path):
    r = CliRunner().invoke(cli, ["extract", str(photos), "-m", "timm:test_vit", "-w", "none", "-l",
                                 "blocks.0.attn.qkv", "-o", str(tmp_path / "c.h5")])
    assert r.exit_code == 1 and "internal tensor" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "c.h5").exists()


def test_sweep_over_two_vit_blocks_writes_a_report(photos, tmp_path):
    r = CliRunner().invoke(cli, ["sweep", str(photos), "-m", "timm:test_vit", "-w", "none", "--layers",
                                 "block:2,block:-1", "--pool", "cls", "--classifier", "softmax",
                                 "--folds", "2", "--c-grid", "1", "--cache", str(tmp_path / "c.h5"),
                                 "--report", str(tmp_path / "rep"), "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)["rows"]
    assert [row["layer"] for row in rows] == ["block:2", "block:-1"]
    assert rows[0]["relative_depth"] < rows[1]["relative_depth"] and rows[0]["stride"] == 16
    assert (tmp_path / "rep" / "index.html").exists() and (tmp_path / "rep" / "sweep.csv").exists()


# --- fine-tuning -------------------------------------------------------------------------------------

def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_finetune_of_a_vit_freezes_and_unfreezes_the_right_parameters():
    model = vit()
    probe = Probe(model, 64, "vit")
    heads = replace_head(model, probe, 3)
    assert heads == ("head",) and model.head.out_features == 3
    stages = resolve_stages(probe, parse_stages("head:1,stage4:1,block:-3:1,all:1"))
    got = []
    for stage in stages:
        apply_stage(model, frozen_modules(model, probe, stage, heads))
        got.append(_trainable(model))
    head, s4, b1, everything = got
    assert head == {"head.weight", "head.bias"}                               # not the CLS token either
    assert {n.split(".")[1] for n in s4 if n.startswith("blocks.")} == {"3"} and "norm.weight" in s4
    assert {n.split(".")[1] for n in b1 if n.startswith("blocks.")} == {"1", "2", "3"}
    assert "cls_token" not in b1 and "pos_embed" not in b1
    assert everything == {n for n, _ in model.named_parameters()}              # cls_token, pos_embed too


def test_distilled_deit_gets_both_heads_replaced_by_timm():
    deit = timm.create_model("deit_tiny_distilled_patch16_224", img_size=64, embed_dim=32, depth=2,
                             num_heads=2).eval()
    heads = replace_head(deit, Probe(deit, 64), 4)
    assert heads == ("head", "head_dist")
    with torch.no_grad():
        assert deit(torch.randn(1, 3, 64, 64)).shape == (1, 4)


def test_cli_finetune_of_a_tiny_vit_by_block(photos, tmp_path):
    r = CliRunner().invoke(cli, ["finetune", str(photos), "-m", "timm:test_vit", "-w", "none", "--stages",
                                 "head:1,block:-2:1", "--batch-size", "4", "--workers", "0",
                                 "--out", str(tmp_path / "run"), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert [s["module"] for s in res["stages"]] == [None, "blocks.4"]


# --- weights at another input size -------------------------------------------------------------------

def test_a_vit_file_saved_at_another_size_is_resampled_to_the_preprocessing_grid(tmp_path):
    big = timm.create_model("test_vit", img_size=224)   # 14x14 patches; the architecture's own is 10x10
    f = tmp_path / "vit224.pth"
    torch.save(big.state_dict(), f)
    bb = load_backbone("timm:test_vit", str(f))
    assert bb.input_size == 160 and tuple(bb.model.patch_embed.img_size) == (160, 160)
    assert bb.model.pos_embed.shape == (1, 101, 64)
    with torch.no_grad():
        assert bb.model(torch.randn(1, 3, 160, 160)).shape == (1, 1000)


def test_fit_svm_then_predict_new_images_through_a_vit_token_layer(photos, tmp_path):
    run = lambda *a: CliRunner().invoke(cli, [str(x) for x in a])
    r = run("extract", photos, "-m", "timm:test_vit", "-w", "none", "-l", "block:-2", "--pool", "cls+mean",
            "-o", tmp_path / "c.h5", "-q")
    assert r.exit_code == 0, r.output
    r = run("fit-svm", "--cache", tmp_path / "c.h5", "--layer", "block:-2", "--folds", "2",
            "--out", tmp_path / "svm.joblib", "--json")
    assert r.exit_code == 0, r.output
    new = [write_image(tmp_path / "new" / f"{i}.png", seed=7000 + i, size=(48, 40)) for i in range(3)]
    r = run("predict", "--model", tmp_path / "svm.joblib", *new, "--out", tmp_path / "pred.csv")
    assert r.exit_code == 0, r.output
    rows = (tmp_path / "pred.csv").read_text().splitlines()
    assert len(rows) == 4 and all(line.split(",")[1] in ("a", "b") for line in rows[1:])


def test_all_stages_of_a_vit_adds_penultimate_after_its_final_norm():
    from cnncodes.pipelines.sweep.runner import sweep_layers
    assert sweep_layers("timm:test_vit") == ["stage1", "stage2", "stage3", "stage4", "penultimate"]
    assert sweep_layers("timm:test_convnext")[-1] == "penultimate"   # its head norms the pooled map
    assert sweep_layers("timm:test_efficientnet")[-1] == "stage5"    # its head only pools bn2


def test_a_resumed_cache_whose_layer_name_now_means_another_module_is_refused(photos, tmp_path):
    from cnncodes.extractor.errors import IncompatibleCacheError
    out = tmp_path / "c.h5"
    extract(photos, out, model="timm:test_vit", weights="none", layers=["stage2"], progress=False)
    with h5py.File(out, "r+") as f:   # half done, by a version whose stage2 was another module
        f["codes/stage2"].attrs["module"] = "blocks.3"
        f["images/status"][0] = 0
        f.attrs["complete"] = False
    with pytest.raises(IncompatibleCacheError, match=r"layer 'stage2' holds codes of module 'blocks.3' "
                                                     r"\(64-d\), but 'stage2' now means 'blocks.2'"):
        extract(photos, out, model="timm:test_vit", weights="none", layers=["stage2"], progress=False)


def test_vector_codes_are_copies_that_a_later_inplace_relu_cannot_change():
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 6), nn.ReLU(inplace=True), nn.Linear(6, 2))
    model.eval()
    taps = Probe(model, 8).resolve(["1", "penultimate"])
    for pool in ("none", "avg"):
        with torch.no_grad(), Tapper(model, taps, parse_pooling(pool)) as t:
            out = t(torch.randn(16, 3, 8, 8))
        assert (out["1"] < 0).any() and (out["penultimate"] >= 0).all(), pool


def test_compare_runs_every_strategy_on_a_tiny_vit(tmp_path):
    from cnncodes.pipelines.compare.strategies import compare
    from cnncodes.pipelines.finetune.training import FinetuneConfig
    for split, n in (("train", 8), ("test", 2)):
        for c, cls in enumerate(["a", "b"]):
            for i in range(n):
                seed = 500 * c + 20 * (split == "test") + i
                write_image(tmp_path / "d" / split / cls / f"{i}.png", seed=seed, size=(48, 40))
    cfg = FinetuneConfig(str(tmp_path / "d"), "", model="timm:test_vit", weights="none", batch_size=4,
                         val_fraction=0.25, workers=0, patience=0)
    result = compare(tmp_path / "d", "timm:test_vit", weights="none", out=tmp_path / "cmp", head_epochs=1,
                     epochs=1, config=cfg, progress=False)
    df = result.table
    assert list(df["strategy"]) == ["probe", "top", "all", "scratch"]
    params = dict(zip(df["strategy"], df["trainable_params"]))
    assert params["probe"] < params["top"] < params["all"] == params["scratch"]
