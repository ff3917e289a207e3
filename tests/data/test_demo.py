import json
import multiprocessing

import numpy as np
import pytest
from PIL import Image

from data import DEMO_CLASSES, DataConfig, build_loader, ensure_demo_dataset

SMALL = dict(size=24, num_classes=3, train_per_class=4, val_per_class=2)


def _pixels(root):
    return {str(p.relative_to(root)): np.asarray(Image.open(p))
            for p in sorted(root.rglob("*.JPEG"))}


def test_layout_counts_and_determinism(tmp_path):
    a = ensure_demo_dataset(tmp_path / "a", **SMALL)
    assert sorted(p.name for p in (a / "train").iterdir()) == sorted(DEMO_CLASSES[:3])
    assert len(list((a / "train").rglob("*.JPEG"))) == 12
    assert len(list((a / "val").rglob("*.JPEG"))) == 6
    with Image.open(next((a / "val").rglob("*.JPEG"))) as img:
        assert img.size == (24, 24) and img.mode == "RGB" and img.format == "JPEG"
    assert json.loads((a / "demo.json").read_text())["train_per_class"] == 4
    b = ensure_demo_dataset(tmp_path / "b", **SMALL)
    pa, pb = _pixels(a), _pixels(b)
    assert pa.keys() == pb.keys() and all(np.array_equal(pa[k], pb[k]) for k in pa)
    images = list(pa.values())
    assert not any(np.array_equal(images[0], v) for v in images[1:])  # all different
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary folder was renamed


def test_existing_dataset_is_reused_and_checked(tmp_path):
    root = ensure_demo_dataset(tmp_path / "d", **SMALL)
    stamp = (root / "demo.json").stat().st_mtime_ns
    assert ensure_demo_dataset(root, **SMALL) == root
    assert (root / "demo.json").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="generated with"):
        ensure_demo_dataset(root, **dict(SMALL, train_per_class=5))
    with pytest.raises(ValueError, match="demo_size"):
        ensure_demo_dataset(root, size=32)
    assert ensure_demo_dataset(root, size=24) == root  # counts not given: any
    (tmp_path / "other").mkdir()
    with pytest.raises(ValueError, match="not a generated demo dataset"):
        ensure_demo_dataset(tmp_path / "other", **SMALL)


def test_default_root_uses_sn_demo_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SN_DEMO_DIR", str(tmp_path))
    root = ensure_demo_dataset(**SMALL)
    assert root == tmp_path / "demo_v1_24_3c_4x2"


def _generate(root):
    ensure_demo_dataset(root, **SMALL)


def test_concurrent_ranks_share_one_generation(tmp_path):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_generate, args=(tmp_path / "shared",)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len(list((tmp_path / "shared").rglob("*.JPEG"))) == 18
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == ["shared"]


def test_demo_goes_through_the_folder_loader(tmp_path):
    root = ensure_demo_dataset(tmp_path / "demo", **SMALL)
    cfg = DataConfig(dataset="demo", root=str(root), demo_size=24, backend="torchvision",
                     workers=0, image_size=16, val_resize=24, val_crop=16)
    loader = build_loader(cfg, "val", 4)
    assert loader.classes == sorted(DEMO_CLASSES[:3]) and loader.dataset_size == 6
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 16, 16)
