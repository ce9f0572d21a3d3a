"""Layer naming, aliases and truncation, pinned on tiny toy modules and torchvision resnet18."""
import pytest
import torch
from torch import nn

from cnncodes.extractor.errors import LayerNotFoundError
from cnncodes.extractor.layers import Probe, Tapper
from cnncodes.extractor.pooling import parse_pooling


class Counter(nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x


class Toy(nn.Module):
    """stem (stride 2) -> block1 (stride 4) -> block2 (stride 8) -> after -> pool -> fc."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.BatchNorm2d(4), nn.ReLU(inplace=True))
        self.block1 = nn.Sequential(nn.Conv2d(4, 8, 3, 2, 1), nn.ReLU(inplace=True))
        self.block2 = nn.Sequential(nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU(inplace=True))
        self.after = Counter()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.after(self.block2(self.block1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))


def test_probe_shapes_strides_and_aliases():
    p = Probe(Toy().eval(), 32, "toy")
    assert p.by_name["stem"].shape == (4, 16, 16) and p.by_name["stem"].stride == 2
    assert p.by_name["block2"].stride == 8
    al = p.aliases()
    assert {k: v.name for k, v in al.items()} == {
        "stage1": "stem", "stage2": "block1", "stage3": "after", "penultimate": "fc"}
    assert al["penultimate"].shape == (16,)


def test_relative_depth_is_the_share_of_forward_flops_spent():
    p = Probe(Toy().eval(), 32, "toy")
    # Multiply-adds x 2, as torch's FLOP counter counts them.
    conv = lambda cin, cout, hw: 2 * cin * cout * 9 * hw * hw
    stem, b1, b2, fc = conv(3, 4, 16), conv(4, 8, 8), conv(8, 16, 4), 2 * 16 * 5
    total = stem + b1 + b2 + fc
    assert p.total_flops == total
    assert p.by_name["stem"].relative_depth == pytest.approx(stem / total, abs=1e-6)
    assert p.by_name["block2"].relative_depth == pytest.approx((stem + b1 + b2) / total, abs=1e-6)
    pen = p.resolve(["penultimate"])[0]  # the input of fc: everything but the classifier
    assert pen.relative_depth == pytest.approx((total - fc) / total, abs=1e-6) and pen.flops == total - fc


def test_unknown_layer_suggests_and_points_to_list_layers():
    p = Probe(Toy().eval(), 32, "toy")
    with pytest.raises(LayerNotFoundError, match=r"'blok1' is not a layer of toy\. Did you mean 'block1'"
                       r".*cnncodes list-layers --model toy"):
        p.resolve(["blok1"])
    with pytest.raises(LayerNotFoundError, match="stage5"):
        p.resolve(["stage5"])


def test_forward_stops_after_the_deepest_tap_and_runs_once():
    model = Toy().eval()
    taps = Probe(model, 32).resolve(["block1", "stem"])
    model.after.calls = 0
    fc_calls = []
    model.fc.register_forward_hook(lambda *a: fc_calls.append(1))
    block1_calls = []
    model.block1.register_forward_hook(lambda *a: block1_calls.append(1))
    with Tapper(model, taps, parse_pooling("avg")) as tap:
        out = tap(torch.randn(2, 3, 32, 32))
    assert model.after.calls == 0 and not fc_calls  # nothing after block1 ran
    assert len(block1_calls) == 1                   # both taps from one forward pass
    assert out["stem"].shape == (2, 4) and out["block1"].shape == (2, 8)


def test_penultimate_is_the_classifier_input_and_the_head_never_runs():
    model = Toy().eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        expected = model.pool(model.after(model.block2(model.block1(model.stem(x))))).flatten(1)
    taps = Probe(model, 32).resolve(["penultimate"])
    ran = []
    model.fc.register_forward_hook(lambda *a: ran.append(1))
    with Tapper(model, taps, parse_pooling("avg")) as tap, torch.no_grad():
        got = tap(x)["penultimate"]
    assert torch.allclose(got, expected) and not ran


def test_threads_calling_one_tapper_get_their_own_codes():
    from concurrent.futures import ThreadPoolExecutor
    model = Toy().eval()
    taps = Probe(model, 32).resolve(["block1", "penultimate"])
    xs = [torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(16)]
    with Tapper(model, taps, parse_pooling("avg")) as tap:
        with torch.no_grad():
            alone = [tap(x) for x in xs]

        def run(x):
            with torch.no_grad():
                return tap(x)
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(run, xs * 4))
    for i, got in enumerate(together):
        for name in ("block1", "penultimate"):
            assert torch.equal(got[name], alone[i % 16][name])


def test_tap_is_read_before_a_later_in_place_op():
    model = Toy().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        conv_out = model.stem[1](model.stem[0](x))  # before the in-place ReLU
    taps = Probe(model, 32).resolve(["stem.1"])
    with Tapper(model, taps, parse_pooling("none")) as tap, torch.no_grad():
        got = tap(x)["stem.1"]
    assert torch.allclose(got, conv_out.flatten(1)) and (got < 0).any()


def test_resnet18_stage_aliases_are_its_layers():
    import torchvision
    p = Probe(torchvision.models.resnet18(weights=None).eval(), 224, "resnet18")
    al = {k: v.name for k, v in p.aliases().items()}
    assert al == {"stage1": "relu", "stage2": "layer1", "stage3": "layer2", "stage4": "layer3",
                  "stage5": "layer4", "penultimate": "fc"}
    assert p.by_name["layer3"].shape == (256, 14, 14)


def test_lite0_stage_aliases_match_timms_feature_taps():
    import timm
    m = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    al = {k: v.name for k, v in Probe(m, 224).aliases().items()}
    # timm's own feature_info names blocks.0/1/2/4/6; stage5 here is the last stride-32 module
    assert [al[f"stage{k}"] for k in range(1, 5)] == ["blocks.0", "blocks.1", "blocks.2", "blocks.4"]
    assert al["stage5"] == "bn2" and al["penultimate"] == "classifier"
