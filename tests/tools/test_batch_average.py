"""tools/batch_average.py: the collected BN-branch statistics equal an explicit average.

The explicit average is computed separately: a copy of the model runs the same
batches with its norms in training mode, forward hooks record each SN layer's
input, and each layer's statistics are averaged over the ghost chunks in
float64 (mean of chunk means; ``E[chunk var + chunk mean^2] - mean^2``).
"""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import normalization
from engine.config import from_dict, resolve
from models import load_model

from ..conftest import free_port
from . import ROOT, randomize, run_main, save_ours, tiny_config_dict, tiny_dataset, tiny_model

from tools import batch_average  # tools/ is a namespace package


def explicit_average(model, batches, ghost):
    """{layer: (mean, var)} in float64, from the inputs each SN layer sees in training mode."""
    model = copy.deepcopy(model).eval()
    seen = {}
    layers = normalization.switch_layers(model)
    for name, layer in layers:
        layer.train()
        layer.ghost_batch_size = None  # the model is fed one chunk at a time
        layer.register_forward_pre_hook(lambda m, args, name=name: seen.setdefault(name, [])
                                        .append(args[0].detach().double()))
    with torch.no_grad():
        for x in batches:
            _forward_in_chunks(model, x, ghost)
    out = {}
    for name, xs in seen.items():
        chunks = [c for x in xs for c in torch.split(x, ghost)]
        means = torch.stack([c.mean((0, 2, 3)) for c in chunks])
        second = torch.stack([c.var((0, 2, 3), unbiased=False) + c.mean((0, 2, 3)) ** 2
                              for c in chunks])
        weights = torch.tensor([float(c.shape[0]) for c in chunks], dtype=torch.float64)[:, None]
        mean = (weights * means).sum(0) / weights.sum()
        out[name] = (mean, (weights * second).sum(0) / weights.sum() - mean ** 2)
    return out


def _forward_in_chunks(model, x, ghost):
    """One forward per chunk: each chunk's layers see that chunk's own batch statistics,
    exactly as ghost batches (virtual GPUs) make them."""
    for chunk in torch.split(x, ghost):
        model(chunk)


def _assert_equal_stats(model, expected):
    assert expected
    for name, layer in normalization.switch_layers(model):
        mean, var = expected[name]
        torch.testing.assert_close(layer.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.running_var.double(), var, rtol=1e-5, atol=1e-6)


def test_collected_statistics_equal_an_explicit_average():
    model = randomize(tiny_model()).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(8, 3, 32, 32, generator=g) * 2 + 1 for _ in range(3)]
    expected = explicit_average(model, batches, ghost=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert normalization.set_ghost_batches(model, 4) > 0
    n = batch_average.collect(model, iter(batches), num_batches=3)
    assert n == 24
    _assert_equal_stats(model, expected)
    for key, value in model.state_dict().items():  # only the running statistics change
        if not key.endswith(("running_mean", "running_var")):
            assert torch.equal(value, before[key]), key
    assert not model.training


def test_a_model_without_batch_statistics_is_refused():
    with pytest.raises(ValueError, match="nothing to average"):
        batch_average.collect(tiny_model("gn"), iter([torch.randn(2, 3, 32, 32)]), 1)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("ba")
    cfg = tiny_config_dict(tiny_dataset(base))
    torch.manual_seed(0)
    model = randomize(tiny_model())
    return base, cfg, model, save_ours(base / "k.pth", model, cfg, epoch=2)


def _loader_batches(cfg_dict, num_batches, rank=0, world_size=1):
    cfg = resolve(from_dict(cfg_dict), world_size)
    loader = batch_average.train_loader(cfg, "train", rank, world_size, torch.device("cpu"))
    return list(batch_average.batches(loader, num_batches))


def test_the_tool_writes_the_average_of_the_training_minibatches(setup, tmp_path):
    base, cfg, model, ckpt = setup
    out = tmp_path / "ba.pth"
    rc, stdout, err = run_main(batch_average.main, ["--checkpoint", ckpt, "--out", out,
                                                    "--samples", 40, "--quiet"])
    assert rc == 0, err
    assert "averaged over 48 samples" in stdout  # 3 minibatches of (2, 8)
    expected = explicit_average(model, _loader_batches(cfg, 3), ghost=8)
    averaged = load_model(str(out))
    _assert_equal_stats(averaged, expected)
    state = torch.load(out, weights_only=True)
    assert state["config"]["batch"]["per_gpu"] == 8 and state["batch_average"]["samples"] == 48


def test_validation_transform_and_one_line_errors(setup, tmp_path):
    _, _, _, ckpt = setup
    out = tmp_path / "ba_val.pth"
    rc, stdout, err = run_main(batch_average.main, ["--checkpoint", ckpt, "--out", out,
                                                    "--samples", 16, "--transform", "val",
                                                    "--quiet"])
    assert rc == 0, err
    assert "val transform" in stdout
    bogus = tmp_path / "bogus.pth"
    bogus.write_bytes(os.urandom(300))
    rc, _, err = run_main(batch_average.main, ["--checkpoint", bogus, "--out", out])
    assert rc == 1 and "not a readable PyTorch checkpoint" in err
    assert err.strip().count("\n") == 0


@pytest.mark.distributed
def test_torchrun_reduces_the_statistics_over_ranks(setup, tmp_path):
    base, cfg, model, ckpt = setup
    out = tmp_path / "ba_ddp.pth"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", "tools/batch_average.py", "--checkpoint", ckpt,
           "--out", str(out), "--samples", "32", "--quiet"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("averaged over 32 samples") == 1  # only rank 0 reports and writes
    # each rank holds one virtual GPU of 8 samples; rank r takes its shard of every epoch
    batches = _loader_batches(cfg, 2, 0, 2) + _loader_batches(cfg, 2, 1, 2)
    _assert_equal_stats(load_model(str(out)), explicit_average(model, batches, ghost=8))
    json.dumps(torch.load(out, weights_only=True)["batch_average"])
