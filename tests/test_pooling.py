import pytest
import torch

from cnncodes.extractor.errors import PoolingError
from cnncodes.extractor.pooling import parse_pooling


@pytest.mark.parametrize("spec,dim", [("avg", 8), ("max", 8), ("avgmax", 16), ("grid:2", 32),
                                      ("spp:1,2,4", 8 * 21), ("none", 8 * 6 * 6)])
def test_dims_match_outputs(spec, dim):
    p = parse_pooling(spec)
    x = torch.randn(3, 8, 6, 6)
    assert p(x).shape == (3, dim) and p.dim((8, 6, 6)) == dim


def test_values():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert parse_pooling("avg")(x).item() == 7.5
    assert parse_pooling("max")(x).item() == 15
    assert parse_pooling("grid:2")(x).tolist() == [[2.5, 4.5, 10.5, 12.5]]
    assert parse_pooling("spp:1,2")(x).tolist() == [[15, 5, 7, 13, 15]]


def test_vectors_pass_through_and_canonical_names():
    v = torch.randn(2, 5)
    assert torch.equal(parse_pooling("grid:3")(v), v)
    assert str(parse_pooling(" SPP:1, 2,4")) == "spp:1,2,4"


@pytest.mark.parametrize("bad", ["median", "cls:2", "grid", "grid:0", "grid:1,2", "spp:a", "avg:2"])
def test_bad_specs_are_explained(bad):
    with pytest.raises(PoolingError, match="pooling|grid|spp|sizes"):
        parse_pooling(bad)
