"""Config: _base_ inheritance, dotted overrides, the schema's errors, derived batch values."""
import glob
import os
import re
import subprocess
import sys

import pytest
import yaml

from engine.config import ConfigError, load_config, resolve, to_dict

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TABLE2 = sorted(glob.glob(os.path.join(ROOT, "configs/imagenet/table2/*.yaml")))


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_base_inheritance_and_overrides(tmp_path):
    base = _write(tmp_path / "base.yaml", {"model": {"norm": "bn", "width": 32},
                                            "train": {"epochs": 7}, "data": {"dataset": "demo"}})
    mid = _write(tmp_path / "mid.yaml", {"_base_": "base.yaml", "model": {"norm": "gn"}})
    top = _write(tmp_path / "top.yaml", {"_base_": ["mid.yaml"], "train": {"seed": 3}})
    cfg = load_config(top, ["train.epochs=2", "model.norm_kwargs={num_groups: 8}",
                            "schedule.milestones=[1, 2]"])
    assert cfg.model.norm == "gn" and cfg.model.width == 32  # merged key by key
    assert cfg.train.epochs == 2 and cfg.train.seed == 3
    assert cfg.model.norm_kwargs == {"num_groups": 8}
    assert cfg.schedule.milestones == [1.0, 2.0]
    assert cfg.output_dir == os.path.join("runs", "top")


@pytest.mark.parametrize("override,message", [
    (["modle.norm=sn"], "unknown config key 'modle.norm'; did you mean 'model.norm'"),
    (["optim.lr_base=0.1"], "did you mean 'optim.base_lr'"),
    (["epochs=3"], "did you mean 'train.epochs'"),
    (["train.epochs=ten"], "train.epochs: expected int, got 'ten'"),
    (["train.deterministic=3"], "train.deterministic: expected bool"),
    (["model.stem=huge"], "model.stem: 'huge' is not one of imagenet, small"),
    (["data.backend=fast"], "data.backend"),
    (["train.epochs"], "expected key=value"),
])
def test_errors_name_the_key_and_closest_valid_one(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.dataset=demo"] + override)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = _write(tmp_path / "bad.yaml", {"train": {"epochz": 1}})
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown config key 'train\.epochz'"):
        load_config(bad)
    cyc = tmp_path / "cyc.yaml"
    cyc.write_text("_base_: cyc.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(cyc))


def test_world_size_must_divide_gpus():
    cfg = load_config(None, ["data.dataset=demo", "batch.gpus=8"])
    with pytest.raises(ConfigError, match="not divisible by the world size 3"):
        resolve(cfg, 3)


@pytest.mark.parametrize("path", TABLE2, ids=os.path.basename)
@pytest.mark.parametrize("world", [1, 8])
def test_table2_lr_and_virtual_gpus(path, world):
    gpus, per_gpu = map(int, re.search(r"_(\d+)x(\d+)\.yaml$", path).groups())
    norm = re.search(r"resnet50_(\w+?)_", os.path.basename(path)).group(1)
    cfg = load_config(path)
    if gpus % world:
        with pytest.raises(ConfigError):
            resolve(cfg, world)
        return
    b = resolve(cfg, world).batch
    assert (b.gpus, b.per_gpu, b.world_size) == (gpus, per_gpu, world)
    assert b.virtual_gpus == gpus // world
    assert b.per_process == per_gpu * gpus // world
    assert b.total == gpus * per_gpu
    assert cfg.optim.lr == pytest.approx(0.1 * gpus * per_gpu / 256)
    assert cfg.model.norm == norm and cfg.model.name == "resnet50_v1"
    assert cfg.train.epochs == 100 and cfg.schedule.milestones == [30, 60, 90]
    assert cfg.optim.weight_decay == 1e-4 and cfg.optim.norm_weight_decay is None
    assert cfg.model.norm_kwargs.get("using_bn", True) == ((gpus, per_gpu) != (8, 1) or norm != "sn")


def test_all_training_configs_load():
    paths = glob.glob(os.path.join(ROOT, "configs/imagenet/**/*.yaml"), recursive=True) + \
        glob.glob(os.path.join(ROOT, "configs/demo/*.yaml"))
    assert len(paths) == 27 + 12 + 3
    for path in paths:
        resolve(load_config(path), 1)


def test_print_config_cli_shows_derived_values():
    path = os.path.join(ROOT, "configs/imagenet/table2/resnet50_sn_8x2.yaml")
    out = subprocess.run([sys.executable, "train.py", "--config", path, "--print-config",
                          "train.epochs=3"], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "WORLD_SIZE": "2"}, check=True).stdout
    cfg = yaml.safe_load(out)
    assert cfg["batch"] == {"gpus": 8, "per_gpu": 2, "world_size": 2, "virtual_gpus": 4,
                            "per_process": 8, "total": 16}
    assert cfg["optim"]["lr"] == pytest.approx(0.00625)
    assert cfg["train"]["epochs"] == 3


def test_cli_bad_override_is_one_line_error():
    path = os.path.join(ROOT, "configs/demo/resnet_sn.yaml")
    proc = subprocess.run([sys.executable, "train.py", "--config", path, "model.nrom=gn"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "did you mean 'model.norm'" in proc.stderr


def test_roundtrip_through_dict():
    from engine.config import from_dict
    cfg = resolve(load_config(None, ["data.dataset=demo", "model.norm=ssn"]), 2)
    again = from_dict(to_dict(cfg))
    assert to_dict(again) == to_dict(cfg)


def test_no_moving_average_needs_batch_average():
    """SN with using_moving_average false never updates its running statistics: without
    batch-average statistics (paper Sec. 4.1.3) validation would use their initial values."""
    off = ["data.dataset=demo", "model.norm_kwargs={using_moving_average: false}"]
    with pytest.raises(ConfigError) as e:
        load_config(None, off)
    assert "model.norm_kwargs.using_moving_average" in str(e.value)
    assert "train.batch_average_samples" in str(e.value) and "\n" not in str(e.value)
    load_config(None, off + ["train.batch_average_samples=50000"])


def test_fingerprint_ignores_resumable_and_derived_keys():
    from engine.config import config_differences, config_fingerprint
    base = resolve(load_config(None, ["data.dataset=demo"]), 1)
    same = resolve(load_config(None, ["data.dataset=demo", "train.epochs=200", "data.workers=0",
                                      "output_dir=elsewhere", "batch.gpus=4"]), 2)
    assert config_fingerprint(base) != config_fingerprint(same)  # batch.gpus differs
    assert [d[0] for d in config_differences(to_dict(base), same)] == ["batch.gpus"]
    moved = resolve(load_config(None, ["data.dataset=demo", "train.epochs=200",
                                       "data.root=/elsewhere", "output_dir=x"]), 4)
    assert config_fingerprint(base) == config_fingerprint(moved)
    old = to_dict(base)
    del old["train"]["resume"]  # written before the schema had the key: its default counts
    assert config_differences(old, moved) == []


def test_docs_list_the_resumable_keys():
    from engine.config import RESUMABLE_KEYS
    page = open(os.path.join(ROOT, "docs", "training.md")).read()
    training = page[page.index("# Training"):page.index("## Batch settings")]
    for key in RESUMABLE_KEYS:
        assert f"`{key}`" in training or f"`{key.split('.')[0]}.*`" in training, key


def test_config_names_are_the_registries():
    """The names the config accepts without importing torch are the ones the factories build."""
    from engine.config import MODEL_NAMES, NORM_NAMES
    from models import list_models
    from normalization import list_norms
    assert list(NORM_NAMES) == list_norms() and list(MODEL_NAMES) == list_models()


def _train_cli(capsys, *argv):
    """train.py's main in this process: (exit status, stdout, stderr)."""
    import train
    status = train.main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("override,message", [
    ("model.norm=sm", "model.norm: 'sm' is not one of bn, syncbn, gn, in, ln, sn, syncsn, ssn, "
                      "none; did you mean 'sn'?"),
    ("model.name=resnet19_v1", "model.name: 'resnet19_v1' is not one of resnet18_v1,"),
    ("data.dataset=imagenette", "data.dataset: 'imagenette' is not one of imagenet, demo"),
])
def test_print_config_rejects_unknown_names(capsys, override, message):
    """--print-config checks what a run checks: an unknown normalizer, model or dataset."""
    demo = os.path.join(ROOT, "configs/demo/resnet_sn.yaml")
    status, out, err = _train_cli(capsys, "--config", demo, "--print-config", override)
    assert (status, out) == (2, "")
    assert err == f"error: override {override!r}: {message}" + err.split(message, 1)[1]
    assert err.count("\n") == 1


def test_override_errors_name_the_override_and_file_errors_the_file(capsys, tmp_path):
    demo = os.path.join(ROOT, "configs/demo/resnet_sn.yaml")
    status, _, err = _train_cli(capsys, "--config", demo, "train.epoch=3")
    assert status == 2 and err == ("error: override 'train.epoch=3': unknown config key "
                                   "'train.epoch'; did you mean 'train.epochs'?\n")
    bad = _write(tmp_path / "bad.yaml", {"_base_": demo, "model": {"norm": "sm"}})
    status, _, err = _train_cli(capsys, "--config", bad, "train.epochs=3", "--print-config")
    assert status == 2 and err.startswith(f"error: {bad}: model.norm: 'sm' is not one of")
    status, _, err = _train_cli(capsys, "--config", bad, "model={norm: gn, widht: 8}")
    assert err.startswith("error: override 'model={norm: gn, widht: 8}': unknown config key "
                          "'model.widht'; did you mean 'model.width'?")


@pytest.mark.parametrize("args", [["--help-config"],
                                  ["--config", "configs/demo/resnet_sn.yaml", "--print-config"]])
def test_help_and_print_config_do_not_import_torch(args):
    """They answer at once: torch (seconds to import) is not on their path."""
    code = ("import runpy, sys; sys.modules['torch'] = None; "  # any 'import torch' fails
            f"sys.argv = ['train.py'] + {args!r}; runpy.run_path('train.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "resnet" in proc.stdout and "norm" in proc.stdout and proc.stderr == ""
