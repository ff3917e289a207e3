"""tools/reproduce_table2.py (the paper's Table 2, Fig. 3, Fig. 4 at small scale): the grid and
its arguments, the table arithmetic on hand-made metrics.jsonl files (per-cell seeds, mean, min,
max; differences paired seed by seed), the ETA, and a CI-sized run of two cells through
train.py whose tables equal its metrics files and whose per-layer ratios equal its checkpoint's,
and which, run again, skips the finished cells."""
import csv
import glob
import json
import os

import pytest
import torch
import yaml

from . import ROOT, run_main, tiny_dataset

from tools import reproduce_table2 as rt  # tools/ is a namespace package


# -- the grid -------------------------------------------------------------------------------------
def test_default_grid_has_three_seeds_where_a_claim_rests():
    cells = rt.plan("all", "0", rt.DEFAULT_EXTRA_SEEDS["demo"])
    seeds = {}
    for c in cells:
        seeds.setdefault((c.norm, c.setting), []).append(c.seed)
    assert len(seeds) == 26 and ("bn", (8, 1)) not in seeds
    claims = {(n, st) for n in rt.NORMS for st in rt.CLAIM_SETTINGS}
    assert len(claims) == 12 and all(seeds[k][:3] == [0, 1, 2] for k in claims)
    assert all(len(seeds[(n, (8, 32))]) == 5 for n in rt.NORMS)
    assert all(v == [0] for k, v in seeds.items() if k not in claims)
    assert len(cells) == 12 * 3 + 3 * 2 + 14
    assert [c.setting for c in cells[:3]] == [(8, 32)] * 3  # every cell once before the seeds


def test_selectors_and_extra_seeds():
    assert rt.parse_cells("8x2") == [("bn", (8, 2)), ("gn", (8, 2)), ("sn", (8, 2))]
    assert [s for _, s in rt.parse_cells("bn")] == [s for s in rt.SETTINGS if s != (8, 1)]
    assert rt.parse_cells("BN:8x1") == [("bn", (8, 1))]  # left out of the grid, allowed by name
    cells = rt.plan("all", "0", ["8x32,8x2=1,2"])
    extra = [c.folder for c in cells if c.seed > 0]
    assert len(cells) == 26 + 12 and extra[:3] == ["bn_8x32_s1", "gn_8x32_s1", "sn_8x32_s1"]
    assert rt.plan("sn:8x2", "0,1", ["8x2=1"]) == [rt.Cell("sn", 8, 2, 0), rt.Cell("sn", 8, 2, 1)]
    assert len(rt.plan("all", "0", [""])) == 26  # --extra-seeds= : none


@pytest.mark.parametrize("spec,match", [("bn:8x3", "unknown cell 'bn:8x3'; valid: all"),
                                        ("ln", "sn:1x8"), (",", "no cell")])
def test_bad_cells_are_one_line_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        rt.parse_cells(spec)


def test_bad_arguments_are_one_line_errors():
    for argv, match in ((["--seeds", "a"], "--seeds: expected integers"),
                        (["--extra-seeds", "8x2"], "expected CELLS=SEEDS"),
                        (["--epochs", "0"], "--epochs: must be >= 1"),
                        (["--last-epochs", "0"], "--last-epochs: must be >= 1"),
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
    assert rc == 0 and len(lines) == 2  # the imagenet scale: one seed, no extra ones
    assert "--nproc_per_node=4 train.py --config" in lines[0]
    assert "configs/imagenet/table2/resnet50_sn_8x2.yaml" in lines[0]
    assert "train.epochs=10 schedule.milestones=[3,6,9] data.root=/data/imagenet" in lines[0]
    assert f"output_dir={tmp_path}/sn_8x1_s0" in lines[1]


def test_demo_dry_run_shares_one_dataset_with_a_large_validation_set(tmp_path, monkeypatch):
    monkeypatch.setenv("SN_DEMO_DIR", str(tmp_path / "cache"))
    rc, out, _ = run_main(rt.main, ["--cells", "8x2,gn:8x1", "--out", tmp_path, "--dry-run"])
    lines = out.splitlines()
    assert rc == 0 and len(lines) == 3 * 3 + 1  # (8,2) is a claim setting: 3 seeds
    roots = {word for line in lines for word in line.split() if word.startswith("data.root=")}
    assert roots == {f"data.root={tmp_path}/cache/demo_v1_72_clean_10c_300x"
                     f"{rt.VAL_PER_CLASS}"}
    assert 10 * rt.VAL_PER_CLASS >= 2000
    assert not (tmp_path / "cache").exists()  # a dry run generates nothing


# -- the table, from hand-made metrics files ----------------------------------------------------
def _write_run(out, cell: rt.Cell, val_top1, seconds=None):
    """A finished run folder as the trainer leaves it: metrics.jsonl, a checkpoint file."""
    folder = out / cell.folder
    folder.mkdir(parents=True)
    with open(folder / "metrics.jsonl", "w") as f:
        for epoch, top1 in enumerate(val_top1, 1):
            f.write(json.dumps({"epoch": epoch, "lr": 0.1, "train_loss": 1.0,
                                "train_top1": top1 - 5, "val_top1": top1, "val_top5": 99.0,
                                "images_per_sec": 100.0, "seconds": 1.0}) + "\n")
    (folder / "checkpoint_last.pth").write_bytes(b"")
    if seconds:
        (folder / "reproduce_table2.json").write_text(json.dumps(
            {"seconds": seconds[0], "cpu_seconds": seconds[1]}))


#: (norm, seed) -> the last three epochs' top-1 at (8, 2); SN has no seed 2
RUNS_8X2 = {("bn", 0): (40.0, 50.0, 60.0), ("bn", 1): (40.0, 62.0, 64.0),
            ("bn", 2): (40.0, 70.0, 72.0), ("gn", 0): (50.0, 70.0, 70.0),
            ("gn", 1): (50.0, 66.0, 68.0), ("gn", 2): (50.0, 73.0, 75.0),
            ("sn", 0): (50.0, 80.0, 76.0), ("sn", 1): (50.0, 60.0, 62.0)}


@pytest.fixture
def grid(tmp_path):
    out = tmp_path / "grid"
    for (norm, seed), top1 in RUNS_8X2.items():
        _write_run(out, rt.Cell(norm, 8, 2, seed), top1, (100.0 + seed, 90.0 + seed))
    _write_run(out, rt.Cell("bn", 1, 16, 0), (80.0, 90.0))
    (out / "sn_1x16_s0").mkdir()  # started, not finished: left out
    (out / "sn_1x16_s0" / "metrics.jsonl").write_text('{"epoch": 1, "val_top1": 99.0}\n')
    planned = {c: 3 for c in rt.plan("8x2,1x16,gn:8x32", "0,1,2", [""])}
    planned[rt.Cell("bn", 1, 16, 0)] = 2
    return out, rt.collect(str(out), planned)


def _csv_rows(path):
    with open(path) as f:
        return {(r["row"], r["statistic"]): r for r in csv.DictReader(f)}


@pytest.mark.parametrize("last", [1, 2])
def test_table_is_the_metrics_files_seeds_mean_min_max(grid, last):
    out, results = grid
    assert len(results) == len(RUNS_8X2) + 1  # the unfinished and unrun cells are left out
    table = rt.table_rows(results, last)
    rt.write_tables(str(out), table, "about", last)
    rows = _csv_rows(out / "table2.csv")
    col = "(8,2)"
    for norm in rt.NORMS:
        values = [sum(top1[-last:]) / last for (n, _), top1 in sorted(RUNS_8X2.items())
                  if n == norm]
        row = norm.upper()
        assert int(rows[(row, "seeds")][col]) == len(values)
        assert float(rows[(row, "mean")][col]) == pytest.approx(sum(values) / len(values),
                                                                abs=5e-4)
        assert float(rows[(row, "min")][col]) == pytest.approx(min(values), abs=5e-4)
        assert float(rows[(row, "max")][col]) == pytest.approx(max(values), abs=5e-4)
    assert rows[("BN", "paper")][col] == "65.3"
    assert rows[("BN", "seeds")]["(1,16)"] == "1" and rows[("SN", "seeds")]["(1,16)"] == ""
    assert float(rows[("BN", "mean")]["(1,16)"]) == (90.0 if last == 1 else 85.0)
    assert rows[("BN", "sd")]["(1,16)"] == "" and rows[("GN", "mean")]["(8,32)"] == ""


def test_differences_are_paired_seed_by_seed(grid):
    out, results = grid
    table = rt.table_rows(results, 2)
    j = rt.SETTINGS.index((8, 2))
    # last-2 means: BN 55, 63, 71; GN 70, 67, 74; SN 78, 61 (no seed 2)
    sn_bn = table["SN-BN"][j]
    assert sn_bn.seeds == (0, 1) and sn_bn.values == (23.0, -2.0)
    assert (sn_bn.mean, sn_bn.min, sn_bn.max) == (10.5, -2.0, 23.0)
    # not the difference of the means (69.5 - 63.0 = 6.5): seed 2 of BN has no SN partner
    assert sn_bn.mean != table["SN"][j].mean - table["BN"][j].mean
    gn_bn = table["GN-BN"][j]
    assert gn_bn.values == (15.0, 4.0, 3.0) and gn_bn.n == 3
    # paired min/max differ from the extremes of the cells: min(GN) - max(BN) = -4
    assert (gn_bn.min, gn_bn.max) == (3.0, 15.0)
    assert table["SN-GN"][j].values == (8.0, -6.0)
    assert table["SN-BN"][rt.SETTINGS.index((1, 16))] is None  # SN (1,16) unfinished
    rt.write_tables(str(out), table, "about", 2)
    rows = _csv_rows(out / "table2.csv")
    assert [rows[("SN-BN", s)]["(8,2)"] for s in ("seeds", "mean", "min", "max")] == \
        ["2", "10.500", "-2.000", "23.000"]
    md = (out / "table2.md").read_text()
    assert "| SN-BN | - | - | - | - | 10.5 [-2.0, 23.0] \u00d72 |" in md
    assert "| BN | - | - | - | - | 63.0 [55.0, 71.0] \u00d73 | 85.0 \u00d71 |" in md
    assert "mean of the last 2 epochs" in md


def test_runs_csv_lists_every_run_with_its_cost(grid):
    out, results = grid
    rt.write_runs(str(out), results, 2)
    with open(out / "table2_runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == len(results)
    sn0 = next(r for r in runs if (r["norm"], r["setting"], r["seed"]) == ("sn", "(8,2)", "0"))
    assert (sn0["top1_final"], sn0["top1_last2"], sn0["top1_best"]) == ("76.00", "78.00", "80.00")
    assert (sn0["wall_seconds"], sn0["cpu_seconds"]) == ("100.0", "90.0")


def test_spread_of_last_epoch_and_last_two(grid):
    _, results = grid
    md = rt.spread_markdown(results, 2)
    # BN (8,2): last epochs 60, 64, 72 (sd 6.11, range 12); last-2 means 55, 63, 71 (sd 8, 16)
    assert "| BN (8,2) | 3 | 6.11 | 8.00 | 12.00 | 16.00 |" in md
    assert "| SN (8,2) | 2 | 9.90 | 12.02 | 14.00 | 17.00 |" in md
    assert "(1,16)" not in md  # one seed: no spread
    assert rt.spread_markdown(results, 1).replace("last epoch).", "mean of the last 2 epochs).") \
        == md  # the same comparison whichever the table's measure


def test_last_epochs_skip_epochs_without_validation():
    rows = [{"epoch": 1, "val_top1": 10.0}, {"epoch": 2, "val_top1": 30.0},
            {"epoch": 3, "train_top1": 1.0}, {"epoch": 4, "val_top1": 50.0}]
    assert rt.run_top1(rows, 1) == 50.0 and rt.run_top1(rows, 2) == 40.0
    assert rt.run_top1(rows[:1], 2) == 10.0


def test_fig3_band_is_the_seeds_range():
    runs = [[{"epoch": 1, "val_top1": 10.0}, {"epoch": 2, "val_top1": 40.0}],
            [{"epoch": 1, "val_top1": 20.0}, {"epoch": 2, "val_top1": 60.0}],
            [{"epoch": 1, "val_top1": 30.0}]]  # epoch 2 missing: left out of the curve
    assert rt.curve_band(runs, "val_top1") == ([1], [20.0], [10.0], [30.0])
    assert rt.curve_band(runs[:2], "val_top1") == ([1, 2], [15.0, 50.0], [10.0, 40.0],
                                                    [20.0, 60.0])


def test_paper_numbers_are_consistent():
    paper = rt.PAPER_TABLE2
    for row in ("GN-BN", "SN-BN", "SN-GN"):
        a, b = row.split("-")
        for j, value in enumerate(paper[row]):
            if value is not None:
                assert value == pytest.approx(paper[a][j] - paper[b][j], abs=0.051)


# -- the ETA --------------------------------------------------------------------------------------
def test_eta_fits_per_sample_and_per_iteration_costs():
    eta = rt.Eta()
    assert eta.predict(rt.Cell("bn", 8, 32), 10) is None
    eta.add(rt.Cell("bn", 8, 32), 10, 10 * (2.0 + 64.0 / 256))
    eta.add(rt.Cell("bn", 8, 2), 10, 10 * (2.0 + 64.0 / 16))
    assert eta.predict(rt.Cell("sn", 8, 1), 5) == pytest.approx(5 * (2.0 + 64.0 / 8))


def test_eta_prefers_other_seeds_then_scaled_measurements():
    prior = {("sn", (8, 2)): 30.0, ("gn", (8, 2)): 10.0, ("bn", (8, 2)): 20.0}
    eta = rt.Eta(prior)
    assert eta.predict(rt.Cell("sn", 8, 2, 1), 20) == 600.0  # nothing ran: the prior
    eta.add(rt.Cell("gn", 8, 2, 0), 20, 20 * 15.0)  # this machine runs 1.5x slower
    assert eta.predict(rt.Cell("gn", 8, 2, 1), 10) == 150.0  # the same cell's own time
    assert eta.predict(rt.Cell("sn", 8, 2, 1), 20) == pytest.approx(20 * 30.0 * 1.5)
    assert eta.predict(rt.Cell("sn", 1, 8), 2) is not None  # no prior: the fit


def test_schedule_lays_cells_on_the_free_slots():
    assert rt.schedule_seconds([], [10, 10, 10, 10], 2) == 20
    assert rt.schedule_seconds([5], [10, 10], 2) == 15
    assert rt.schedule_seconds([30], [10, 10], 2) == 30
    assert rt.schedule_seconds([], [], 2) == 0


def test_measured_times_cover_the_default_grid():
    prior = rt.MEASURED_EPOCH_SECONDS["demo"]
    for cell in rt.plan("all", "0", rt.DEFAULT_EXTRA_SEEDS["demo"]):
        assert prior[(cell.norm, cell.setting)] > 0, cell


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


def test_demo_gn_groups_divide_the_first_stage():
    """GN keeps 2 channels per group in the first stage (as 32 groups of 64 in the paper)."""
    from engine.config import load_config
    for path in glob.glob(os.path.join(ROOT, "configs/demo/table2/resnet18_gn_*.yaml")):
        cfg = load_config(path)
        assert cfg.model.width // cfg.model.norm_kwargs["num_groups"] == 2, path


# -- a CI-sized run ---------------------------------------------------------------------------
TINY = ["data.demo_variant=shapes", "data.demo_size=40", "data.image_size=32", "data.val_resize=36",
        "data.val_crop=32", "data.min_scale=0.5", "data.workers=0", "model.num_classes=4",
        "model.width=8", "model.stem=small", "train.batch_average_samples=16",
        "log.tensorboard=false", "train.print_freq=1000", "train.compile=false"]


def _softmax(logits):
    return torch.softmax(logits.double(), 0).tolist()


def test_two_cells_write_the_report_and_are_skipped_when_run_again(tmp_path):
    root = tiny_dataset(tmp_path)  # 4 classes x 24 training images, 40 px
    out = tmp_path / "grid"
    argv = ["--cells", "bn:1x8,sn:1x8", "--epochs", "1", "--jobs", "2", "--out", out,
            f"data.root={root}"] + TINY
    rc, stdout, err = run_main(rt.main, argv)
    assert rc == 0, stdout + err
    assert "[1/2]" in stdout and "[2/2]" in stdout and "top-1" in stdout
    assert "trained 2 cell(s) in" in stdout and "CPU" in stdout
    for name in ("table2.md", "table2.csv", "table2_runs.csv", "fig3_curves.png",
                 "fig3_curves.svg", "fig4_ratios.png", "fig4_ratios.csv", "fig4_layers.png",
                 "fig4_layers.csv"):
        assert (out / name).is_file(), name

    # the table holds the metrics files' numbers (the mean of the last 2 epochs, the default,
    # is the one epoch here: the hand-made grids above test the mean of two)
    rows = _csv_rows(out / "table2.csv")
    top1 = {}
    for norm in ("bn", "sn"):
        with open(out / f"{norm}_1x8_s0" / "metrics.jsonl") as f:
            val = [json.loads(line)["val_top1"] for line in f]
        assert len(val) == 1
        top1[norm] = val[0]
        timing = json.loads((out / f"{norm}_1x8_s0" / "reproduce_table2.json").read_text())
        assert timing["cpu_seconds"] > 0 and timing["seconds"] > 0
    for row, value in (("BN", top1["bn"]), ("SN", top1["sn"]),
                       ("SN-BN", top1["sn"] - top1["bn"])):
        assert float(rows[(row, "mean")]["(1,8)"]) == pytest.approx(value, abs=5e-4)
        assert float(rows[(row, "min")]["(1,8)"]) == pytest.approx(value, abs=5e-4)
        assert rows[(row, "seeds")]["(1,8)"] == "1"
    assert rows[("BN", "paper")]["(1,8)"] == "75.4" and rows[("GN", "mean")]["(1,8)"] == ""

    # the per-layer ratios are the checkpoint's softmax of each layer's logits, in order
    state = torch.load(out / "sn_1x8_s0" / "checkpoint_last.pth", weights_only=True)
    logits = {k[:-len(".mean_weight")]: (v, state["model"][k[:-len("mean_weight")] + "var_weight"])
              for k, v in state["model"].items() if k.endswith(".mean_weight")}
    with open(out / "fig4_layers.csv") as f:
        layers = list(csv.DictReader(f))
    assert [r["layer"] for r in layers] == list(logits) and len(layers) == 20
    for r in layers:
        mean_w, var_w = logits[r["layer"]]
        got = [float(r[f"{s}_{n}"]) for s in ("mean", "var") for n in ("in", "ln", "bn")]
        assert got == pytest.approx(_softmax(mean_w) + _softmax(var_w), abs=1e-4)
    with open(out / "fig4_ratios.csv") as f:
        avg = next(csv.DictReader(f))
    assert avg["setting"] == "(1,8)" and avg["seeds"] == "1"
    assert float(avg["mean_bn"]) == pytest.approx(
        sum(float(r["mean_bn"]) for r in layers) / 20, abs=2e-4)
    assert "## SN's ratios layer by layer" in (out / "table2.md").read_text()

    rc, stdout, err = run_main(rt.main, argv)  # again: nothing left to train
    assert rc == 0, stdout + err
    assert stdout.count("seed 0: finished earlier: top-1") == 2
    for cell in ("bn_1x8_s0", "sn_1x8_s0"):
        assert (out / cell / "train.log").read_text().count("==== ") == 1  # started once
