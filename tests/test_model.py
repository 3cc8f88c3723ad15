"""The model registry: sizes, keys and forward shapes of every registered FerretNet."""

import pytest
import torch

from ferret_runtime.errors import ConfigError
from ferret_train import create_model, list_models
from ferret_train.registry import register_model

PARAMS = {"ferretnet-s": 126_289, "ferretnet-b": 1_057_777}


def test_registry_lists_the_paper_variants():
    assert set(PARAMS) <= set(list_models())


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
