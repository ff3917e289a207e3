"""Parameter groups by type, schedules per iteration, gradient clipping of the ratios."""
import math

import pytest
import torch

from engine.config import load_config, resolve
from engine.optim import build_optimizer, build_scheduler, lr_factor, parameter_groups
from models import build_model


def _cfg(*overrides):
    return resolve(load_config(None, ["data.dataset=demo", *overrides]), 1)


def test_groups_by_type_not_name():
    model = build_model("resnet18_v1", 10, "sn", width=8)
    groups = parameter_groups(model)
    assert len(groups["ratio"]) == 2 * 20  # mean_weight and var_weight of 20 SN layers
    assert len(groups["norm"]) == 2 * 20
    assert [p.shape for p in groups["bias"]] == [torch.Size([10])]  # the classifier's bias
    assert all(p.ndim == 4 for p in groups["weight"][:-1]) and groups["weight"][-1].ndim == 2
    total = sum(len(v) for v in groups.values())
    assert total == len(list(model.parameters()))


def test_optimizer_weight_decay_and_ratio_lr():
    cfg = _cfg("optim.ratio_weight_decay=0", "optim.norm_weight_decay=0", "optim.ratio_lr_scale=0.1",
               "batch.gpus=1", "batch.per_gpu=64")
    opt = build_optimizer(cfg, build_model("resnet18_v1", 10, "ssn", width=8))
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["ratio"]["weight_decay"] == 0 and by_name["norm"]["weight_decay"] == 0
    assert by_name["weight"]["weight_decay"] == 1e-4
    assert by_name["ratio"]["lr"] == pytest.approx(0.1 * 0.1 * 64 / 256)
    assert by_name["weight"]["lr"] == pytest.approx(0.1 * 64 / 256)


def test_step_schedule_per_iteration():
    cfg = _cfg("schedule.milestones=[1, 2]", "train.epochs=3")
    assert [lr_factor(cfg, it, 10) for it in (0, 9, 10, 19, 20, 29)] == \
        pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_warmup_then_cosine():
    cfg = _cfg("schedule.name=cosine", "schedule.warmup_epochs=1", "train.epochs=5")
    f = [lr_factor(cfg, it, 10) for it in range(50)]
    assert f[0] == 0 and f[5] == pytest.approx(0.5) and f[10] == pytest.approx(1.0)
    assert f[30] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def test_scheduler_steps_every_iteration_and_resumes():
    cfg = _cfg("schedule.milestones=[1]", "train.epochs=2")
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(cfg, model)
    sched = build_scheduler(cfg, opt, iters_per_epoch=4)
    for _ in range(5):
        opt.step()
        sched.step()
    lr = opt.param_groups[0]["lr"]
    assert lr == pytest.approx(cfg.optim.lr * 0.1)
    state = sched.state_dict()
    opt2 = build_optimizer(cfg, model)
    sched2 = build_scheduler(cfg, opt2, iters_per_epoch=4)
    sched2.load_state_dict(state)
    opt2.step()
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr)
