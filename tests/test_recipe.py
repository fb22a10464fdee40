"""The recipe knobs (run/recipe.py): each does what timm's part promises, computed by hand here; the
defaults build the paper's optimizer and loss and leave every record's computation key as it was."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from orestudy import config as configs, models
from orestudy.config import TrainConfig
from orestudy.run import recipe
from orestudy.studies import study

RECIPE = dict(optimizer="adamw", weight_decay=0.05, lr_schedule="cosine", warmup_epochs=1, head_lr_mult=10.0,
              label_smoothing=0.1, mixup=0.4, cutmix=1.0, ema_decay=0.9)  # every knob on


def small_model():
    return models.create_model("mobilenet_v2", 3, "none", "se", 4, 0.2)


def test_the_schedule_gives_warmup_then_cosine_and_the_head_its_multiple():
    config = TrainConfig(lr=1e-3, epochs=10, lr_schedule="cosine", warmup_epochs=2, head_lr_mult=10.0)
    model = small_model()
    optimizer = recipe.make_optimizer(model, config, torch.device("cpu"))
    scheduler = recipe.make_scheduler(optimizer, config)
    (backbone,) = [g for g in optimizer.param_groups if any(p is next(model.backbone.parameters()) for p in g["params"])]
    (head,) = [g for g in optimizer.param_groups if any(p is model.head[-1].weight for p in g["params"])]
    start = 1e-3 * recipe.WARMUP_START
    for t, want in [(0, start), (1, start + (1e-3 - start) / 2), (2, 0.5e-3 * (1 + math.cos(math.pi * 2 / 10))),
                    (5, 0.5e-3), (9, 0.5e-3 * (1 + math.cos(math.pi * 9 / 10)))]:
        scheduler.step(t)
        assert backbone["lr"] == pytest.approx(want, rel=1e-9), t
        if t >= 2:  # past the warm-up (which starts every group at the same rate) the head moves 10x
            assert head["lr"] == pytest.approx(10 * want, rel=1e-9), t
    assert recipe.make_scheduler(optimizer, TrainConfig()) is None  # the paper's constant rate


def test_weight_decay_spares_biases_and_norms():
    model = small_model()
    groups = recipe.param_groups(model, TrainConfig(weight_decay=0.05, head_lr_mult=2.0))
    decay = {id(p) for g in groups if g["weight_decay"] for p in g["params"]}
    assert all((id(p) in decay) == (p.ndim > 1) for p in model.parameters())
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_label_smoothing_loss_on_a_hand_case():
    logits, target = torch.tensor([[2.0, 0.0, -1.0]]), torch.tensor([0])
    logp = F.log_softmax(logits, 1)[0]
    by_hand = 0.9 * -logp[0] + 0.1 * -logp.mean()
    loss = recipe.make_recipe(TrainConfig(label_smoothing=0.1), 3).criterion(logits, target)
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)
    assert recipe.make_recipe(TrainConfig(), 3).criterion is F.cross_entropy  # the paper's loss


def test_ema_is_the_hand_update_and_is_what_is_judged():
    model = torch.nn.Linear(2, 1)
    ema = recipe.make_ema(model, TrainConfig(ema_decay=0.9))
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    assert torch.allclose(ema.module.weight, 0.9 * start + 0.1 * (start + 1.0))
    with recipe.weights_of(model, ema) as judged:
        assert torch.equal(judged.weight, ema.module.weight)
    assert torch.equal(model.weight, start + 1.0)  # its own weights are back


def test_mixup_targets_and_inputs_are_the_same_blend():
    mix = recipe.make_recipe(TrainConfig(mixup=1.0), 3)
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 1])
    np.random.seed(0)
    mixed, soft = mix.mix(x.clone(), y)
    lam = soft[0, 0].item()  # row 0 is class 0 blended with row 3's class 1
    want = lam * F.one_hot(y, 3) + (1 - lam) * F.one_hot(y.flip(0), 3)
    assert torch.allclose(soft, want.float()) and torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    pooled, soft = mix.mix(torch.randn(4, 16), y)  # a pooled cached batch takes mixup too
    assert pooled.shape == (4, 16) and soft.shape == (4, 3)
    odd, soft = mix.mix(x[:3].clone(), y[:3])  # timm pairs a batch with its reverse: an odd one stays as it is
    assert torch.equal(odd, x[:3]) and torch.equal(soft, F.one_hot(y[:3], 3).float())


def test_defaults_build_the_papers_adam_and_keep_computation_keys():
    model = small_model()
    optimizer = recipe.make_optimizer(model, TrainConfig(), torch.device("cpu"))
    paper = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)
    assert type(optimizer) is torch.optim.Adam and optimizer.defaults == paper.defaults
    assert len(optimizer.param_groups) == 1
    saved = {k: v for k, v in json.loads(json.dumps(configs.computation(configs.defaults()))).items()
             if k not in RECIPE}  # a record written before the knobs existed
    assert study.computation_key(saved) == study.computation_key(configs.computation(configs.defaults()))
    assert study.computation_key({**saved, "mixup": 0.2}) != study.computation_key(saved)
    assert configs.compact(configs.defaults()) == {k: v for k, v in configs.defaults().items() if k not in RECIPE}
    assert configs.complete(configs.compact(configs.defaults())) == configs.defaults()  # records stay as they were


@pytest.mark.parametrize("field, value", [("lr", 1e30), ("weight_decay", 1.0), ("warmup_epochs", 20),
                                          ("head_lr_mult", 0.0), ("label_smoothing", 0.5), ("ema_decay", 0.3),
                                          ("optimizer", "lamb"), ("mixup", -1.0)])
def test_knobs_are_bounded(field, value):
    with pytest.raises(ValueError, match=field):
        TrainConfig(**{field: value})


class Captured(Exception):
    pass


def test_a_recipe_file_sets_the_config_and_the_command_line_overrides_it(tmp_path, monkeypatch):
    from orestudy.commands import train
    from orestudy.run import training

    def capture(config, resume=None):
        raise Captured(config)

    monkeypatch.setattr(training, "run_experiment", capture)
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text("optimizer: adamw\nlr: 3.0e-4\nmixup: 0.2\nepochs: 12\n")
    with pytest.raises(Captured) as caught:
        train.main(["--config", str(recipe_file), "--lr", "0.001", "--data", str(tmp_path)])
    config = caught.value.args[0]
    assert (config.optimizer, config.lr, config.mixup, config.epochs, config.attention) == ("adamw", 0.001, 0.2, 12, "se")
    paper = configs.read_recipe(configs.REPO_ROOT / "experiments" / "recipes" / "paper.yaml")
    assert TrainConfig(**paper) == TrainConfig()  # the shipped paper recipe is the default
    recipe_file.write_text("optimiser: adamw\n")
    with pytest.raises(SystemExit):
        train.main(["--config", str(recipe_file)])
    recipe_file.write_text("evaluate_test: false\n")
    with pytest.raises(ValueError, match="set by studies"):
        configs.read_recipe(recipe_file)


def test_the_shipped_pick_and_crossfit_grid_compute_what_the_search_retrained():
    """experiments/recipes/recipe_cpu_pick.yaml and the single-model row of experiments/crossfit_grid.yaml
    are the search's pick as its retraining ran it (docs/results/recipe_cpu/best.jsonl), seed by seed."""
    from orestudy.studies import grid as grids

    records = study.read_records(configs.REPO_ROOT / "docs/results/recipe_cpu/best.jsonl")
    pick = configs.read_recipe(configs.REPO_ROOT / "experiments/recipes/recipe_cpu_pick.yaml")
    loaded = grids.load_grid(configs.REPO_ROOT / "experiments/crossfit_grid.yaml")
    cells = grids.grid_cells(loaded)
    rows = grids.trial_configs(loaded, cells, [r.config["seed"] for r in records], {**loaded["paper"]})
    for record in records:
        seed = record.config["seed"]
        retrained = study.computation_key(record.config)
        assert study.computation_key({**pick, "split_method": "shuffle", "precision": "fp32", "seed": seed}) == retrained
        single = [r for r in rows if r["seed"] == seed and r["folds"] == 1]
        assert [study.computation_key(r) for r in single] == [retrained]
    assert {r["folds"] for r in rows} == {1, 3}


def test_the_crossfit_paper_grids_single_row_is_the_paper_recipes_committed_records():
    """experiments/crossfit_paper_grid.yaml's reference row computes exactly the paper recipe's committed
    records of its ten seeds (so --reuse trains only the cross-fitted row)."""
    from orestudy.studies import grid as grids

    records = study.read_records(configs.REPO_ROOT / "docs/results/recipe_cpu/baseline.jsonl",
                                 configs.REPO_ROOT / "docs/results/paper_recipe_s5to9/trials.jsonl")
    loaded = grids.load_grid(configs.REPO_ROOT / "experiments/crossfit_paper_grid.yaml")
    rows = grids.trial_configs(loaded, grids.grid_cells(loaded), loaded["seeds"], {**loaded["paper"]})
    single = sorted(study.computation_key(r) for r in rows if r["folds"] == 1)
    assert single == sorted(study.computation_key(r.config) for r in records) and len(single) == 10
    assert {r["folds"] for r in rows} == {1, 3}
