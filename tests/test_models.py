import pytest
import torch

from orestudy import models


def test_se_block_shape_and_gate_in_unit_interval():
    se = models.SqueezeExcitation(64, reduction=8)
    x = torch.randn(4, 64, 7, 7) * 5
    gate = se.gate(x)
    assert gate.shape == (4, 64, 1, 1)
    assert (gate > 0).all() and (gate < 1).all()
    assert se(x).shape == x.shape
    assert se.excite[0].out_features == 8
    assert torch.allclose(se(x), x * gate)


@pytest.mark.parametrize("kind", ["se", "cbam", "eca"])
def test_attention_modules_keep_shape(kind):
    x = torch.randn(2, 32, 5, 5)
    assert models.create_attention(kind, 32, 4)(x).shape == x.shape


@pytest.mark.parametrize("attention", ["none", "se", "eca"])
def test_channel_attention_heads_run_from_pooled_features(attention):
    """pools_first: with channel attention the output depends on the map only through its mean, so
    the cached pooled features give the same outputs as the whole map."""
    model = models.create_model("mobilenet_v2", 7, weights="none", attention=attention).eval()
    x = torch.randn(3, 1280, 7, 7).abs()
    assert model.pools_first
    with torch.no_grad():
        torch.testing.assert_close(model.forward_pooled(x.mean((2, 3))), model.forward_head(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, attention", [("mobilenet_v2", "cbam"), ("alexnet", "se"), ("vgg16", "none")])
def test_spatial_heads_keep_the_whole_map(name, attention):
    assert not models.create_model(name, 7, weights="none", attention=attention).pools_first


@pytest.mark.parametrize("name", ["alexnet", "vgg16", "resnet50", "inception_v3", "mobilenet_v2", "mobilenet_v1"])
def test_every_backbone_builds_with_attention_and_dropout(name):
    model = models.create_model(name, 7, weights="none", attention="se", reduction=8)
    assert isinstance(model.head[-1], torch.nn.Linear) and model.head[-1].out_features == 7
    assert isinstance(model.head[-2], torch.nn.Dropout) and model.head[-2].p == 0.5
    size = 75 if name == "inception_v3" else 64  # Inception's stem needs at least 75 px
    model.eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, size, size)).shape == (1, 7)
    if name == "inception_v3":
        model.train()
        logits, aux = model(torch.zeros(2, 3, 299, 299))
        assert logits.shape == aux.shape == (2, 7)


def test_mobilenet_v1_loads_shared_imagenet_weights():
    path = models.mobilenet_v1_weights_path()
    model = models.create_model("mobilenet_v1", 7)
    state = torch.load(path, weights_only=True)
    assert torch.equal(model.backbone[0][0].weight, state["features.0.0.weight"])
    assert model.spec.mean == [0.5, 0.5, 0.5]  # TensorFlow's x / 127.5 - 1


def test_mobilenet_v1_missing_weights_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "REPO_ROOT", tmp_path / "repo")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(models.WeightsUnavailable, match="ORESTUDY_WEIGHTS_DIR"):
        models.create_model("mobilenet_v1", 7)


def test_checkpoint_round_trip(tmp_path):
    model = models.create_model("mobilenet_v2", 3, weights="none", attention="eca").eval()
    config = {"attention": "eca", "reduction": 8, "dropout": 0.5}
    models.save_checkpoint(tmp_path / "m.pt", model, ["a", "b", "c"], 96, [0.1] * 3, [0.2] * 3, config, {})
    loaded, meta = models.load_checkpoint(tmp_path / "m.pt")
    x = torch.randn(2, 3, 96, 96)
    assert torch.equal(loaded(x), model(x))
    assert meta["class_names"] == ["a", "b", "c"] and meta["input_size"] == 96


def test_torchvision_weights_missing_offline_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("ORESTUDY_OFFLINE", "1")
    with pytest.raises(models.WeightsUnavailable, match=r"resnet50-0676ba61\.pth.*ORESTUDY_OFFLINE"):
        models.create_model("resnet50", 7)
