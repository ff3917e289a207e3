"""Sparse SN tools: tools/sparsify.py (hard ratios + the finetuning config),
normalization.fold (folded == unfolded in float64) and tools/export_inference.py."""
import copy

import pytest
import torch
import torch.nn as nn
import yaml

import normalization
from engine.config import load_config, resolve
from engine.trainer import model_from_config
from models import load_model
from normalization.fold import FrozenAffine2d, fold_hard_bn, fold_plan

from . import randomize, run_main, save_ours, tiny_config_dict, tiny_dataset, tiny_model

from tools import export_inference, sparsify  # tools/ is a namespace package


def _one_hot(t):
    return sorted(t.tolist()) == [0.0] * (len(t) - 1) + [1.0]


def test_sparsify_writes_one_hot_ratios_and_the_finetuning_config(tmp_path):
    root = tiny_dataset(tmp_path)
    cfg = tiny_config_dict(root, schedule={"name": "step", "milestones": [1, 2]},
                           train={"epochs": 3})
    model = randomize(tiny_model())
    before = normalization.ratios(model)
    ckpt = save_ours(tmp_path / "soft.pth", model, cfg, epoch=1)
    hard, config_out = tmp_path / "hard.pth", tmp_path / "finetune.yaml"
    rc, stdout, err = run_main(sparsify.main, ["--checkpoint", ckpt, "--out", hard,
                                               "--config-out", config_out])
    assert rc == 0, err
    assert "pick different normalizers for mean and variance" in stdout
    sparse = load_model(str(hard))
    ratios = normalization.ratios(sparse)
    for name, r in ratios.items():
        for stat in ("mean", "var"):
            assert _one_hot(r[stat]), (name, stat)
            assert int(r[stat].argmax()) == int(before[name][stat].argmax())
    state = torch.load(hard, weights_only=True)
    assert state["config"]["model"]["norm_kwargs"]["hard_ratios"] is True
    # the finetuning config: the remaining 2 epochs at lr x 0.1 (one milestone passed)
    data = yaml.safe_load(open(config_out))
    assert data["train"]["epochs"] == 2 and data["schedule"]["milestones"] == [1]
    assert data["optim"]["base_lr"] == pytest.approx(0.4 * 0.1)
    assert data["checkpoint"]["init"] == str(hard)
    finetune = resolve(load_config(str(config_out)), 1)
    rebuilt = model_from_config(finetune)
    rebuilt.load_state_dict(state["model"])  # the trainer's checkpoint.init loads it
    assert all(layer.hard_ratios for _, layer in normalization.switch_layers(rebuilt))


def test_finetuning_the_hard_checkpoint_runs(tmp_path):
    import train
    root = tiny_dataset(tmp_path)
    ckpt = save_ours(tmp_path / "soft.pth", randomize(tiny_model()),
                     tiny_config_dict(root, output_dir=str(tmp_path / "run")), epoch=1)
    config_out = tmp_path / "finetune.yaml"
    assert run_main(sparsify.main, ["--checkpoint", ckpt, "--out", tmp_path / "hard.pth",
                                    "--config-out", config_out])[0] == 0
    rc, stdout, err = run_main(train.main, ["--config", config_out, "train.max_iters=1",
                                            "log.tensorboard=false"])
    assert rc == 0, err
    assert "initialised the weights from" in stdout
    model = load_model(str(tmp_path / "run_hard_e1" / "checkpoint_last.pth"))
    assert all(_one_hot(r["mean"]) for r in normalization.ratios(model).values())


def test_sparsify_an_ssn_checkpoint_sets_its_fixed_flags(tmp_path):
    model = randomize(tiny_model("ssn"))
    cfg = tiny_config_dict("/x", model={"norm": "ssn"})
    hard, config_out = tmp_path / "hard.pth", tmp_path / "ft.yaml"
    rc, _, err = run_main(sparsify.main, ["--checkpoint", save_ours(tmp_path / "s.pth", model,
                                                                      cfg), "--out", hard,
                                          "--config-out", config_out, "--epochs", 3,
                                          "--base-lr", 0.05])
    assert rc == 0, err
    sparse = load_model(str(hard))
    for _, layer in normalization.switch_layers(sparse):
        assert int(layer.mean_fixed) == 1 and int(layer.var_fixed) == 1
    data = yaml.safe_load(open(config_out))
    assert data["train"]["epochs"] == 3 and data["optim"]["base_lr"] == 0.05


def _hard_model(name, seed=0):
    """Hard ratios; every other layer picks BN for both mean and variance, the others BN for
    one of them only (not foldable)."""
    model = randomize(tiny_model(name=name, hard_ratios=True), seed)
    with torch.no_grad():
        for i, (_, layer) in enumerate(normalization.switch_layers(model)):
            mean, var = {0: ("bn", "bn"), 1: ("bn", "ln"), 2: ("bn", "bn"), 3: ("in", "bn")}[i % 4]
            layer.mean_weight.copy_(torch.eye(3)[("in", "ln", "bn").index(mean)])
            layer.var_weight.copy_(torch.eye(3)[("in", "ln", "bn").index(var)])
    return model.eval()


@pytest.mark.parametrize("name", ["resnet18_v1", "resnet50_v2"])
@pytest.mark.parametrize("into_conv", [False, True])
def test_folded_model_equals_the_unfolded_one_in_float64(name, into_conv):
    model = _hard_model(name).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
    plan = fold_plan(model, into_conv)
    folded, n = fold_hard_bn(copy.deepcopy(model), into_conv=into_conv)
    layers = len(normalization.switch_layers(model))
    assert n == len(plan) == (layers + 1) // 2
    assert len(normalization.switch_layers(folded)) == layers - n
    affine = sum(isinstance(m, FrozenAffine2d) for m in folded.modules())
    assert affine == sum(conv is None for conv in plan.values())
    if into_conv and name.endswith("v1"):
        assert affine == 0  # conv -> norm everywhere in ResNet v1
    if into_conv and name.endswith("v2"):
        assert 0 < affine < n  # pre-activation norms after a residual sum stay affine
    with torch.no_grad():
        got = folded(x)
    assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12 * float(expected.abs().max()))


def test_soft_ratio_layers_are_not_folded():
    model = randomize(tiny_model()).eval()
    assert fold_hard_bn(model)[1] == 0
    with torch.no_grad():  # one-hot BN logits but soft ratios: the softmax is not one-hot
        for _, layer in normalization.switch_layers(model):
            layer.mean_weight.copy_(torch.tensor([0.0, 0.0, 10.0]))
    assert fold_hard_bn(model)[1] == 0


def test_export_inference_folds_checks_and_times(tmp_path):
    model = _hard_model("resnet18_v1")
    cfg = tiny_config_dict("/x", model={"norm_kwargs": {"hard_ratios": True}})
    ckpt = save_ours(tmp_path / "hard.pth", model, cfg)
    out = tmp_path / "hard_folded.pt"
    rc, stdout, err = run_main(export_inference.main, ["--checkpoint", ckpt, "--out", out,
                                                       "--batch", 2, "--repeats", 3])
    assert rc == 0, err
    assert "speed-up" in stdout and "tolerance 1e-5" in stdout
    folded = export_inference.load_inference_model(str(out))
    assert isinstance(folded.bn1, nn.Identity) and folded.conv1.bias is not None
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        diff = (folded(x) - model(x)).abs().max() / model(x).abs().max()
    assert float(diff) < 1e-5
    rc, _, err = run_main(export_inference.main, ["--checkpoint", out, "--out", out])
    assert rc == 1 and err.strip().count("\n") == 0
