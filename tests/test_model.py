"""The model registry: sizes, keys and forward shapes of every registered FerretNet."""

import pytest
import torch

from ferret_runtime.errors import ConfigError
from ferret_train import create_model, list_models
from ferret_train.registry import register_model


def conv(k: int, cin: int, cout: int, groups: int = 1, bias: bool = False) -> int:
    """Parameters of a k x k convolution: k*k*(cin/groups)*cout weights (+ cout biases)."""
    return k * k * (cin // groups) * cout + (cout if bias else 0)


def bn(c: int) -> int:
    """BatchNorm2d: a scale and a shift per channel (running statistics are buffers, not parameters)."""
    return 2 * c


def ds_block(cin: int, cout: int, shortcut: bool) -> int:
    """The original Ferret DSBlock: dilated pair (two depthwise 3x3 with cin groups, cin -> cout) + 1x1, BN,
    separable 3x3 (depthwise + pointwise), BN; a 1x1 conv with bias + BN shortcut when the shape changes."""
    dilated = 2 * conv(3, cin, cout, groups=cin) + conv(1, cout, cout)
    separable = conv(3, cout, cout, groups=cout) + conv(1, cout, cout)
    return dilated + bn(cout) + separable + bn(cout) + ((conv(1, cin, cout, bias=True) + bn(cout)) if shortcut else 0)


def ferretnet_params(dim: int, depths: tuple[int, ...]) -> int:
    """FerretNet from the paper's description and the authors' ``Ferret`` module: stem 3 -> dim/2 (3x3) and
    dim/2 -> dim (3x3 stride 2), each conv + BN; per stage width x2, a shortcut block then depth-1 plain ones;
    a 1x1 conv; global pooling and a linear dim -> 1 head. The LPD has no parameters."""
    total = conv(3, 3, dim // 2) + bn(dim // 2) + conv(3, dim // 2, dim) + bn(dim)
    for depth in depths:
        total += ds_block(dim, 2 * dim, shortcut=True) + (depth - 1) * ds_block(2 * dim, 2 * dim, shortcut=False)
        dim *= 2
    return total + conv(1, dim, dim) + (dim * 1 + 1)


# Hand derivations (FerretNet-S: dim 32, depths [2, 2]; FerretNet-B: dim 96, depths [2, 2], as the paper):
#   S: stem 432+32 + 4608+64; stage 1 (32 -> 64) 12,416 + 10,176; stage 2 (64 -> 128) 45,312 + 36,736;
#      1x1 16,384; head 129  = 126,289
PARAMS = {"ferretnet-s": ferretnet_params(32, (2, 2)), "ferretnet-b": ferretnet_params(96, (2, 2))}
PAPER_PARAMS_M = {"ferretnet-b": 1.06}  # FerretNet's efficiency table (NeurIPS 2025), rounded to 0.01M


def test_registry_lists_the_paper_variants():
    assert set(PARAMS) <= set(list_models())


def test_the_derivation_adds_up():
    assert ds_block(32, 64, shortcut=True) == 1152 + 4096 + 128 + 576 + 4096 + 128 + 2112 + 128 == 12_416
    assert PARAMS["ferretnet-s"] == 464 + 4672 + 12_416 + 10_176 + 45_312 + 36_736 + 16_384 + 129 == 126_289
    assert round(PARAMS["ferretnet-b"] / 1e6, 2) == PAPER_PARAMS_M["ferretnet-b"]


@pytest.mark.parametrize("name", sorted(PARAMS))  # the peers are checked against the paper in test_peers.py
def test_param_count(name):
    m = create_model(name)
    assert sum(p.numel() for p in m.parameters()) == PARAMS[name]


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("hw", [(64, 64), (37, 53)])
def test_forward_shape_any_size(name, hw):
    m = create_model(name).eval()
    with torch.no_grad():
        assert m(torch.randn(2, 3, *hw)).shape == (2, 1)


def test_state_dict_keys_are_the_originals():
    keys = set(create_model("ferretnet-s").state_dict())
    for k in ["cbr1.0.weight", "cbr2.1.running_var", "feature.0.0.layers.0.conv1.weight",
              "feature.0.0.layers.0.conv2.weight", "feature.0.0.layers.3.depth_wise.weight",
              "feature.0.0.shortcut.0.bias", "feature.1.1.layers.4.weight", "feature.2.weight",
              "logit.1.weight", "logit.1.bias"]:
        assert k in keys
    assert not any(k.startswith("lpd") for k in keys)


def test_duplicate_registration_is_an_error():
    with pytest.raises(ValueError, match="'ferretnet-s' is already registered"):
        register_model("ferretnet-s")(lambda: None)


def test_unknown_model_suggests_nearest():
    with pytest.raises(ConfigError, match=r"Received model 'ferretnet-x' \(did you mean 'ferretnet-s'\?\)"):
        create_model("ferretnet-x")


def test_lpd_impls_give_the_same_logits():
    torch.manual_seed(0)
    fast = create_model("ferretnet-s", lpd_func="excmed").eval()
    ref = create_model("ferretnet-s", lpd_func="excmed", lpd_impl="reference").eval()
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(3, 3, 48, 40)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), rtol=0, atol=1e-5)
