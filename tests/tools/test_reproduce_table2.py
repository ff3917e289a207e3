"""tools/reproduce_table2.py (the paper's Table 2, Fig. 3, Fig. 4 at small scale): the grid and
its arguments, the table arithmetic, and a CI-sized run of two cells through train.py that
writes the tables and figures and, run again, skips the finished cells."""
import csv
import glob
import os

import pytest
import yaml

from . import ROOT, run_main, tiny_dataset

from tools import reproduce_table2 as rt  # tools/ is a namespace package


# -- the grid -------------------------------------------------------------------------------------
def test_default_grid_is_the_papers():
    cells = rt.plan("all", "0")
    assert len(cells) == 26 and ("bn", (8, 1)) not in {(c.norm, c.setting) for c in cells}
    assert [c.setting for c in cells[:3]] == [(8, 32)] * 3


def test_selectors_and_extra_seeds():
    assert rt.parse_cells("8x2") == [("bn", (8, 2)), ("gn", (8, 2)), ("sn", (8, 2))]
    assert [s for _, s in rt.parse_cells("bn")] == [s for s in rt.SETTINGS if s != (8, 1)]
    assert rt.parse_cells("BN:8x1") == [("bn", (8, 1))]  # left out of the grid, allowed by name
    cells = rt.plan("all", "0", ["8x32,8x2=1,2"])
    extra = [c.folder for c in cells if c.seed > 0]
    assert len(cells) == 26 + 12 and extra[:3] == ["bn_8x32_s1", "gn_8x32_s1", "sn_8x32_s1"]
    assert rt.plan("sn:8x2", "0,1", ["8x2=1"]) == [rt.Cell("sn", 8, 2, 0), rt.Cell("sn", 8, 2, 1)]


@pytest.mark.parametrize("spec,match", [("bn:8x3", "unknown cell 'bn:8x3'; valid: all"),
                                        ("ln", "sn:1x8"), (",", "no cell")])
def test_bad_cells_are_one_line_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        rt.parse_cells(spec)


def test_bad_arguments_are_one_line_errors():
    for argv, match in ((["--seeds", "a"], "--seeds: expected integers"),
                        (["--extra-seeds", "8x2"], "expected CELLS=SEEDS"),
                        (["--epochs", "0"], "--epochs: must be >= 1"),
                        (["--cells", "sn:8x2", "--dry-run", "model.bogus=1"], "model.bogus")):
        rc, _, err = run_main(rt.main, argv)
        assert rc == 1 and match in err and err.count("\n") == 1, err


def test_milestones_and_world_sizes():
    assert rt.scaled_milestones([30, 60, 90], 100, 20) == [6, 12, 18]
    assert rt.scaled_milestones([12, 18], 20, 10) == [6, 9]
    assert rt.scaled_milestones([30, 60, 90], 100, 1) == [1]
    assert [rt.world_size(g, 3) for g in (8, 1)] == [2, 1]
    assert rt.world_size(8, 8) == 8


def test_dry_run_prints_the_commands(tmp_path):
    rc, out, _ = run_main(rt.main, ["--scale", "imagenet", "--cells", "sn:8x2,sn:8x1", "--nproc",
                                    "4", "--epochs", "10", "--out", tmp_path, "--dry-run",
                                    "data.root=/data/imagenet"])
    lines = out.splitlines()
    assert rc == 0 and len(lines) == 2
    assert "--nproc_per_node=4 train.py --config" in lines[0]
    assert "configs/imagenet/table2/resnet50_sn_8x2.yaml" in lines[0]
    assert "train.epochs=10 schedule.milestones=[3,6,9] data.root=/data/imagenet" in lines[0]
    assert f"output_dir={tmp_path}/sn_8x1_s0" in lines[1]


# -- the table ------------------------------------------------------------------------------------
def _rows(*top1):
    return [{"epoch": e, "train_top1": t - 5, "val_top1": t} for e, t in enumerate(top1, 1)]


def test_table_rows_mean_spread_and_differences():
    results = {rt.Cell("bn", 8, 2, 0): _rows(50.0, 60.0), rt.Cell("bn", 8, 2, 1): _rows(50.0, 64.0),
               rt.Cell("sn", 8, 2, 0): _rows(60.0, 70.0)}
    table = rt.table_rows(results)
    j = rt.SETTINGS.index((8, 2))
    mean, sd, n = table["BN"][j]
    assert (mean, n) == (62.0, 2) and sd == pytest.approx(2.0 ** 1.5)
    assert table["SN-BN"][j] == (8.0, None, 1)
    assert table["GN"][j] is None and table["GN-BN"][j] is None
    assert rt._fmt(table["BN"][j]) == "62.0 ± 2.8" and rt._fmt(None) == "-"


def test_paper_numbers_are_consistent():
    paper = rt.PAPER_TABLE2
    for row in ("GN-BN", "SN-BN", "SN-GN"):
        a, b = row.split("-")
        for j, value in enumerate(paper[row]):
            if value is not None:
                assert value == pytest.approx(paper[a][j] - paper[b][j], abs=0.051)


def test_eta_fits_per_sample_and_per_iteration_costs():
    eta = rt.Eta()
    assert eta.predict(rt.Cell("bn", 8, 32), 10) is None
    eta.add(rt.Cell("bn", 8, 32), 10, 10 * (2.0 + 64.0 / 256))
    eta.add(rt.Cell("bn", 8, 2), 10, 10 * (2.0 + 64.0 / 16))
    assert eta.predict(rt.Cell("sn", 8, 1), 5) == pytest.approx(5 * (2.0 + 64.0 / 8))


# -- the configs ----------------------------------------------------------------------------------
def _model_batch_train(path):
    from engine.config import load_config
    cfg = load_config(path, ["data.root=/data/imagenet"])
    return (cfg.model.norm, cfg.model.norm_kwargs.get("using_bn", True), cfg.batch.gpus,
            cfg.batch.per_gpu, cfg.train.batch_average_samples > 0, cfg.model.zero_init_last,
            cfg.schedule.name)


def test_demo_table2_configs_mirror_the_imagenet_ones():
    imagenet = sorted(glob.glob(os.path.join(ROOT, "configs/imagenet/table2/resnet50_*.yaml")))
    demo = sorted(glob.glob(os.path.join(ROOT, "configs/demo/table2/resnet18_*.yaml")))
    assert len(demo) == len(imagenet) == 27
    for a, b in zip(imagenet, demo):
        assert os.path.basename(a)[len("resnet50"):] == os.path.basename(b)[len("resnet18"):]
        assert _model_batch_train(a) == _model_batch_train(b)
    with open(os.path.join(ROOT, "configs/demo/table2/base.yaml")) as f:
        base = yaml.safe_load(f)
    assert base["schedule"]["name"] == "step" and base["optim"]["weight_decay"] > 0
    assert max(base["schedule"]["milestones"]) < base["train"]["epochs"]


# -- a CI-sized run ---------------------------------------------------------------------------
TINY = ["data.demo_variant=shapes", "data.demo_size=40", "data.image_size=32", "data.val_resize=36", "data.val_crop=32",
        "data.min_scale=0.5", "data.workers=0", "model.num_classes=4", "model.width=8",
        "train.batch_average_samples=16", "log.tensorboard=false", "train.print_freq=1000"]


def test_two_cells_write_the_report_and_are_skipped_when_run_again(tmp_path):
    root = tiny_dataset(tmp_path)  # 4 classes x 24 training images, 40 px
    out = tmp_path / "grid"
    argv = ["--cells", "bn:1x8,sn:1x8", "--epochs", "1", "--jobs", "2", "--out", out,
            f"data.root={root}"] + TINY
    rc, stdout, err = run_main(rt.main, argv)
    assert rc == 0, stdout + err
    assert "[1/2]" in stdout and "[2/2]" in stdout and "top-1" in stdout
    for name in ("table2.md", "table2.csv", "fig3_curves.png", "fig3_curves.svg",
                 "fig4_ratios.png", "fig4_ratios.csv"):
        assert (out / name).is_file(), name
    with open(out / "table2.csv") as f:
        rows = {(r["row"], r["statistic"]): r for r in csv.DictReader(f)}
    assert float(rows[("BN", "mean")]["(1,8)"]) >= 0 and rows[("BN", "paper")]["(1,8)"] == "75.4"
    assert rows[("SN-BN", "mean")]["(1,8)"] != "" and rows[("GN", "mean")]["(1,8)"] == ""
    assert "| SN |" in (out / "table2.md").read_text()
    with open(out / "fig4_ratios.csv") as f:
        assert next(csv.DictReader(f))["setting"] == "(1,8)"

    rc, stdout, err = run_main(rt.main, argv)  # again: nothing left to train
    assert rc == 0, stdout + err
    assert stdout.count("seed 0: finished earlier: top-1") == 2
    for cell in ("bn_1x8_s0", "sn_1x8_s0"):
        assert (out / cell / "train.log").read_text().count("==== ") == 1  # started once
