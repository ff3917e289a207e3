"""The model zoo: the authors' checkpoint layout (3- and 2-entry ratios) loads, evaluates with
evaluate.py and equals an independent computation of their forward; bad files give one-line
errors naming the keys; convert_checkpoint round-trips; verify_zoo checks MD5s; the zoo
file lists every released checkpoint with a config that exists."""
import hashlib
import json
import os

import pytest
import torch
import torch.nn.functional as F
import yaml

from engine.checkpoint import CheckpointError
from engine.config import load_config, resolve
from models import build_model, load_model
from normalization.reference import reference_switch_norm

from . import ROOT, authors_layout, randomize, run_main, save_ours, tiny_config_dict, \
    tiny_dataset, tiny_model, write_config

from tools import convert_checkpoint, verify_zoo  # tools/ is a namespace package


# -- the authors' layout ------------------------------------------------------------------------
def authors_forward(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """The authors' ResNetV1SN-18 in eval, computed from their state dict (float64): their
    SwitchNorm2d per layer (unbiased IN variance, LN/BN variance as E[var + mu^2] - mu^2,
    BN from the running statistics), torch.nn.functional for the rest."""
    p = {k[len("module."):]: v.double() for k, v in sd.items()}

    def sn(x, name):
        normalizers = ("in", "ln", "bn") if p[name + ".mean_weight"].numel() == 3 else ("in", "ln")
        running = ((p[name + ".running_mean"].view(-1), p[name + ".running_var"].view(-1))
                   if "bn" in normalizers else None)
        return reference_switch_norm(
            x, p[name + ".weight"].view(-1), p[name + ".bias"].view(-1),
            torch.softmax(p[name + ".mean_weight"], 0), torch.softmax(p[name + ".var_weight"], 0),
            normalizers, eps=1e-5, running=running, authors=True)

    x = F.max_pool2d(F.relu(sn(F.conv2d(x, p["conv1.weight"], stride=2, padding=3), "sn1")),
                     3, 2, 1)
    for i in range(1, 5):
        j = 0
        while f"layer{i}.{j}.conv1.weight" in p:
            pre, stride = f"layer{i}.{j}.", 2 if i > 1 and j == 0 else 1
            out = F.relu(sn(F.conv2d(x, p[pre + "conv1.weight"], stride=stride, padding=1),
                            pre + "sn1"))
            out = sn(F.conv2d(out, p[pre + "conv2.weight"], padding=1), pre + "sn2")
            if pre + "downsample.0.weight" in p:
                x = sn(F.conv2d(x, p[pre + "downsample.0.weight"], stride=stride),
                       pre + "downsample.1")
            x = F.relu(out + x)
            j += 1
    return F.linear(x.mean((2, 3)), p["fc.weight"], p["fc.bias"])


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """Authors'-layout files of a ResNet-18 v1 + SN with 3-entry and 2-entry ratios, and a
    tiny dataset with a 64 px crop."""
    base = tmp_path_factory.mktemp("zoo")
    files = {}
    for entries, kwargs in ((3, {}), (2, {"using_bn": False})):
        torch.manual_seed(entries)
        model = randomize(build_model("resnet18_v1", 4, "sn", dict(variance="authors", **kwargs)),
                          seed=entries)
        state = authors_layout(model, "resnetv1sn18")
        files[entries] = str(base / f"ResNet18v1+SN(8,{entries}).pth")
        torch.save(state, files[entries])
    cfg = tiny_config_dict(tiny_dataset(base), data={"image_size": 64, "val_resize": 72,
                                                      "val_crop": 64})
    return files, write_config(base / "tiny64.yaml", cfg)


@pytest.mark.parametrize("entries", [3, 2])
def test_authors_file_loads_and_equals_their_forward(zoo, entries):
    files, _ = zoo
    state = torch.load(files[entries], weights_only=True)
    model = load_model(files[entries]).double()
    layer = model.layer1[0].bn1
    assert len(layer.normalizers) == entries and layer.variance == "authors"
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), authors_forward(state["state_dict"], x),
                                   rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("entries", [3, 2])
def test_evaluate_py_on_an_authors_file(zoo, tmp_path, entries):
    import evaluate
    from data import build_loader
    files, config = zoo
    js = tmp_path / "eval.json"
    rc, _, err = run_main(evaluate.main, ["--checkpoint", files[entries], "--config", config,
                                          "--json", js])
    assert rc == 0, err
    got = json.load(open(js))
    sd = torch.load(files[entries], weights_only=True)["state_dict"]
    cfg = resolve(load_config(config), 1)
    loader = build_loader(cfg.data, "val", 16)
    loader.set_epoch(0)
    loss, top1, n = 0.0, 0, 0
    for images, targets in loader:
        logits = authors_forward(sd, images.double())
        loss += float(F.cross_entropy(logits, targets, reduction="sum"))
        top1 += int((logits.argmax(1) == targets).sum())
        n += len(targets)
    assert got["val_count"] == n == 24
    assert got["val_top1"] == pytest.approx(100.0 * top1 / n)
    assert got["val_loss"] == pytest.approx(loss / n, rel=1e-5)


# -- bad files ----------------------------------------------------------------------------------
def _one_line(err: str):
    assert err.strip() and err.strip().count("\n") == 0, err


def test_corrupt_and_mismatched_checkpoints_name_the_problem(zoo, tmp_path):
    files, _ = zoo
    bogus = tmp_path / "random.pth"
    bogus.write_bytes(os.urandom(1000))
    rc, _, err = run_main(convert_checkpoint.main, [bogus, tmp_path / "o.pth"])
    assert rc == 1 and "not a readable PyTorch checkpoint" in err and str(bogus) in err
    _one_line(err)
    state = torch.load(files[3], weights_only=True)
    del state["state_dict"]["module.layer1.0.sn1.weight"]
    state["state_dict"]["module.layer9.bogus"] = torch.zeros(1)
    bad = tmp_path / "mismatch.pth"
    torch.save(state, bad)
    rc, _, err = run_main(convert_checkpoint.main, [bad, tmp_path / "o.pth"])
    assert rc == 1 and "missing keys: layer1.0.bn1.weight" in err
    assert "unexpected keys: layer9.bogus" in err
    _one_line(err)
    with pytest.raises(CheckpointError, match="layer9.bogus"):
        load_model(str(bad))
    torch.save([1, 2, 3], tmp_path / "list.pth")
    rc, _, err = run_main(convert_checkpoint.main, [tmp_path / "list.pth", tmp_path / "o.pth"])
    assert rc == 1 and "not a checkpoint" in err
    _one_line(err)


# -- conversion ------------------------------------------------------------------------------------
def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_convert_round_trips(zoo, tmp_path):
    files, config = zoo
    ours = tmp_path / "ours.pth"
    rc, _, err = run_main(convert_checkpoint.main, [files[2], ours, "--config", config])
    assert rc == 0, err
    state = torch.load(ours, weights_only=True)
    assert state["config"]["model"]["norm_kwargs"] == {"variance": "authors", "using_bn": False}
    assert state["config"]["data"]["val_crop"] == 64
    _same_weights(load_model(files[2]), load_model(str(ours)))
    st = tmp_path / "ours.safetensors"
    assert run_main(convert_checkpoint.main, [ours, st, "--safetensors"])[0] == 0
    assert convert_checkpoint.is_safetensors(str(st))
    from safetensors import safe_open
    with safe_open(str(st), framework="pt") as f:
        assert json.loads(f.metadata()["config"])["model"]["name"] == "resnet18_v1"
    back = tmp_path / "back.pth"
    assert run_main(convert_checkpoint.main, [st, back])[0] == 0
    _same_weights(load_model(str(ours)), load_model(str(back)))
    tiny = save_ours(tmp_path / "tiny.pth", randomize(tiny_model()), tiny_config_dict("/x"))
    again = tmp_path / "tiny_again.pth"
    assert run_main(convert_checkpoint.main, [tiny, again])[0] == 0
    _same_weights(load_model(tiny), load_model(str(again)))


# -- the zoo file and verify_zoo ------------------------------------------------------------------
def test_zoo_file_lists_every_released_checkpoint():
    models = verify_zoo.load_zoo()
    assert len(models) == 12  # 7 SN (Switchable-Normalization) + 5 SSN (Sparse_SwitchNorm)
    assert sum(m["norm"] == "ssn" for m in models) == 5
    for m in models:
        assert os.path.isfile(os.path.join(ROOT, m["config"])), m["config"]
        cfg = load_config(os.path.join(ROOT, m["config"]))
        assert (cfg.model.name, cfg.model.norm) == (m["model"], m["norm"]), m["id"]
        assert [cfg.batch.gpus, cfg.batch.per_gpu] == m["batch"], m["id"]
        assert m["download"]["google_drive"].startswith("https://drive.google.com/")
        assert m["download"]["baidu_pan"].startswith("https://pan.baidu.com/")
        assert m["md5"] is None or len(m["md5"]) == 32
    assert all(m["md5"] for m in models if m["norm"] == "ssn")


def test_verify_zoo_reports_each_status(tmp_path):
    files = {"good.pth": b"good weights", "bad.pth": b"tampered", "renamed.pth": b"other",
             "nomd5.pth": b"x", "extra.pth": b"y"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)

    def md5(data):
        return hashlib.md5(data).hexdigest()
    zoo = {"models": [
        {"id": "a", "file": "good.pth", "md5": md5(b"good weights")},
        {"id": "b", "file": "bad.pth", "md5": md5(b"original")},
        {"id": "c", "file": "missing.pth", "md5": md5(b"absent")},
        {"id": "d", "file": "listed_name.pth", "md5": md5(b"other")},
        {"id": "e", "file": "nomd5.pth", "md5": None}]}
    zoo_path = write_config(tmp_path / "zoo.yaml", zoo)
    rc, stdout, _ = run_main(verify_zoo.main, [tmp_path, "--zoo", zoo_path])
    assert rc == 1  # a mismatch
    status = {line.split()[1]: line.split()[0] for line in stdout.splitlines()[:-1]}
    assert status == {"good.pth": "OK", "bad.pth": "MISMATCH", "missing.pth": "MISSING",
                      "listed_name.pth": "OK", "nomd5.pth": "NO-MD5", "extra.pth": "UNKNOWN"}
    assert "found as renamed.pth" in stdout
    os.remove(tmp_path / "bad.pth")
    assert run_main(verify_zoo.main, [tmp_path, "--zoo", zoo_path])[0] == 0
    assert yaml.safe_load(open(zoo_path))["models"][0]["id"] == "a"
