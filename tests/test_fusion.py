import torch
import torchvision

from cnncodes.extractor.encoding import prepare_model
from cnncodes.extractor.fusion import conv_bn_pairs, fold_batchnorm
from cnncodes.extractor.layers import Probe, Tapper
from cnncodes.extractor.pooling import parse_pooling


def _r18():
    torch.manual_seed(0)
    m = torchvision.models.resnet18(weights=None).eval()
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 2.0)
            mod.weight.data.uniform_(0.5, 1.5)
    return m


def test_folded_model_gives_the_same_taps():
    m = _r18()
    pairs = conv_bn_pairs(m, 64)
    assert ("conv1", "bn1") in pairs and ("layer2.0.downsample.0", "layer2.0.downsample.1") in pairs
    folded, n = fold_batchnorm(m, 64)
    assert n == 20
    taps = Probe(m, 64).resolve(["layer2", "layer4", "penultimate"])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad(), Tapper(m, taps, parse_pooling("avg")) as a, \
            Tapper(folded, taps, parse_pooling("avg")) as b:
        ra, rb = a(x), b(x)
    for k in ra:
        assert torch.allclose(ra[k], rb[k], rtol=1e-4, atol=1e-5), k
    assert isinstance(m.bn1, torch.nn.BatchNorm2d)  # the original is untouched


def test_a_tapped_convolution_keeps_its_own_output():
    m = _r18()
    folded, n = fold_batchnorm(m, 64, keep={"conv1"})
    assert n == 19 and isinstance(folded.bn1, torch.nn.BatchNorm2d)


def test_prepare_model_matches_plain_forward(r18_weights):
    from cnncodes.extractor.backbones.loading import load_backbone
    bb = load_backbone("resnet18", str(r18_weights))
    taps = Probe(bb.model, 224).resolve(["layer3"])
    net = prepare_model(bb, taps, torch.device("cpu"))
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in net.layer1.modules())
