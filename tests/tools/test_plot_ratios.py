"""analysis.ratio_figures and tools/plot_ratios.py: layer kinds and receptive fields, the
divergence, the trainer's per-epoch figures, and every file the tool writes, for checkpoint
files and for a real 2-epoch run's output_dir (TensorBoard ratios)."""
import csv
import json
import os
import time

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

import normalization
from analysis.ratio_figures import (RatioHistory, history_from_tensorboard, layer_infos,
                                    ratio_figures, snapshot, symmetric_kl)
from models import build_model

from . import randomize, run_main, save_ours, tiny_config_dict, tiny_dataset, tiny_model, \
    write_config

from tools import plot_ratios  # tools/ is a namespace package


def test_resnet50_layers_kinds_and_receptive_fields():
    infos = layer_infos(build_model("resnet50_v1", 1000, "sn"))
    assert len(infos) == 53  # the paper's 53 SN layers
    kinds = [i.kind for i in infos]
    assert kinds.count("conv3x3") == 16 and kinds.count("conv1x1") == 32
    assert kinds.count("shortcut") == 4 and kinds[0] == "stem"
    assert infos[0].rf == 7 and max(i.rf for i in infos) == 427  # the range of Fig. 7
    by_name = {i.name: i for i in infos}
    assert by_name["layer1.0.bn2"].rf == 11 + 2 * 4  # 3x3 conv after the stride-4 stem
    assert by_name["layer1.0.downsample.1"].rf == 11  # the shortcut sees the block input
    v2 = {i.name: i.kind for i in layer_infos(build_model("resnet50_v2", 1000, "sn"))}
    assert v2["layer1.1.bn1"] == "preact" and v2["bn_out"] == "preact"
    assert v2["layer1.0.bn3"] == "conv3x3"


def test_symmetric_divergence():
    p, q = [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]
    assert symmetric_kl(p, p) == pytest.approx(0.0, abs=1e-12)
    assert symmetric_kl(p, q) == pytest.approx(symmetric_kl(q, p))
    exact = sum((a - b) * np.log(a / b) for a, b in zip(p, q))
    assert symmetric_kl(p, q, eps=1e-12) == pytest.approx(exact, rel=1e-6)
    assert symmetric_kl([1, 0, 0], [0, 0, 1]) == pytest.approx(2 * np.log(1e6), rel=1e-3)


def test_trainer_figures_are_quick_and_complete():
    model = randomize(build_model("resnet50_v1", 1000, "sn"))
    ratio_figures(model)  # first call: font cache
    start = time.perf_counter()
    figures = ratio_figures(model, "epoch 3")
    seconds = time.perf_counter() - start
    assert set(figures) == {"ratios/average", "ratios/layers"}
    assert all(isinstance(f, Figure) and f.axes for f in figures.values())
    assert seconds < 3.0  # about 0.2 s on an idle core; generous for a loaded machine
    assert ratio_figures(tiny_model("gn")) == {}


def _files_ok(out, names):
    for name in names:
        path = os.path.join(out, name)
        assert os.path.isfile(path) and os.path.getsize(path) > 0, name


def test_tool_on_checkpoint_files(tmp_path):
    cfg = tiny_config_dict("/nowhere")
    paths = []
    for epoch in (1, 2):
        model = randomize(tiny_model(), seed=epoch)
        paths.append(save_ours(tmp_path / f"e{epoch}.pth", model, cfg, epoch=epoch))
    other = save_ours(tmp_path / "other.pth", randomize(tiny_model(), seed=3),
                      tiny_config_dict("/x", batch={"gpus": 4, "per_gpu": 4}), epoch=3)
    bn = save_ours(tmp_path / "bn.pth", tiny_model("bn"), tiny_config_dict("/x", model={
        "norm": "bn"}))
    out = tmp_path / "figs"
    rc, stdout, err = run_main(plot_ratios.main, ["--checkpoint", *paths, other, bn, "--out",
                                                  out, "--dpi", 40, "--formats", "png"])
    assert rc == 0, err
    assert "has no SN layer; skipped" in err
    figs = ["fig4_average", "fig5_layers_2_8_epoch_1", "fig5_layers_2_8_epoch_2",
            "fig5_layers_4_4", "fig7_mean_checkpoints_2_8", "fig7_var_checkpoints_2_8",
            "fig7_divergence_checkpoints_2_8", "fig8_hard_checkpoints_2_8"]
    _files_ok(out, [f"{f}.png" for f in figs])
    _files_ok(out, ["average.csv", "layers.csv", "dynamics.csv", "hard.csv", "ratios.json"])
    assert not [f for f in os.listdir(out) if "4_4" in f and f.startswith("fig7")]
    rows = list(csv.DictReader(open(out / "average.csv")))
    assert [r["label"] for r in rows] == ["(2, 8) epoch 1", "(2, 8) epoch 2", "(4, 4)"]
    assert "layers pick different normalizers for mu and sigma" in stdout
    # the averages are those of the model
    model = randomize(tiny_model(), seed=1)
    ratios = normalization.ratios(model)
    mean_bn = np.mean([float(r["mean"][2]) for r in ratios.values()])
    assert float(rows[0]["mean_bn"]) == pytest.approx(mean_bn, abs=1e-5)


def test_errors_are_one_line(tmp_path):
    bogus = tmp_path / "bogus.pth"
    bogus.write_bytes(os.urandom(256))
    rc, _, err = run_main(plot_ratios.main, ["--checkpoint", bogus, "--out", tmp_path / "o"])
    assert rc == 1 and "not a readable PyTorch checkpoint" in err
    assert err.strip().count("\n") == 0
    rc, _, err = run_main(plot_ratios.main, ["--checkpoint", tmp_path, "--out", tmp_path / "o"])
    assert rc == 1 and "checkpoint_last.pth" in err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real 2-epoch run of train.py (in this process) on the tiny dataset."""
    import train
    base = tmp_path_factory.mktemp("run")
    config = write_config(base / "tiny.yaml", tiny_config_dict(tiny_dataset(base)))
    out = str(base / "run")
    rc, stdout, err = run_main(train.main, ["--config", config, f"output_dir={out}"])
    assert rc == 0, err
    return out


def test_tool_on_a_run_output_dir(tiny_run, tmp_path):
    out = tmp_path / "figs"
    rc, stdout, err = run_main(plot_ratios.main, ["--checkpoint", tiny_run, "--out", out,
                                                  "--snapshots", "1,2", "--dpi", 40])
    assert rc == 0, err
    figs = ["fig4_average", "fig5_layers_2_8", "fig7_mean_2_8", "fig7_var_2_8",
            "fig7_divergence_2_8", "fig8_hard_2_8"]
    _files_ok(out, [f"{f}.{ext}" for f in figs for ext in ("png", "svg")])
    result = json.load(open(out / "ratios.json"))
    assert {r["epoch"] for r in result["dynamics"]} == {1, 2}
    assert list(result["hard"]["(2, 8)"]["snapshots"]) == ["epoch 1", "epoch 2"]
    assert "epoch 1 -> epoch 2:" in stdout


def test_tensorboard_history_matches_the_checkpoint(tiny_run):
    from models import load_model
    history = history_from_tensorboard(os.path.join(tiny_run, "tb"))
    assert isinstance(history, RatioHistory) and history.epochs == [1, 2]
    snap = snapshot(load_model(os.path.join(tiny_run, "checkpoint_last.pth")))
    assert sorted(history.layers) == sorted(snap.layers)
    for name, r in snap.ratios.items():
        for stat in ("mean", "var"):
            np.testing.assert_allclose(history.series[name][stat][-1], r[stat], atol=1e-6)
    divergence = history.divergence()    # every layer, every epoch: D(mean ratios || var ratios)
    assert set(divergence) == set(snap.layers)
    for name, series in history.series.items():
        assert divergence[name].shape == (2,)
        for epoch in range(2):
            assert divergence[name][epoch] == pytest.approx(
                symmetric_kl(series["mean"][epoch], series["var"][epoch]), rel=1e-12)
    assert divergence[name][-1] == pytest.approx(
        symmetric_kl(snap.ratios[name]["mean"], snap.ratios[name]["var"]), rel=1e-4, abs=1e-9)
