"""The generated demo dataset's variants (data/demo.py): 'shapes' (the demo, unchanged) and
'clean' (the Table 2 grid at small scale, tools/reproduce_table2.py)."""
import json

import numpy as np
import pytest

from data import DataConfig, ensure_demo_dataset
from data.demo import DEMO_VARIANTS, default_demo_root, render_demo_image

SMALL = dict(size=24, num_classes=2, train_per_class=2, val_per_class=1)


def test_variants_are_deterministic_and_differ():
    for variant in DEMO_VARIANTS:
        a = np.asarray(render_demo_image(4, 32, 7, variant))
        assert np.array_equal(a, np.asarray(render_demo_image(4, 32, 7, variant)))
    assert np.array_equal(np.asarray(render_demo_image(4, 32, 7)),
                          np.asarray(render_demo_image(4, 32, 7, "shapes")))
    assert not np.array_equal(np.asarray(render_demo_image(4, 32, 7, "clean")),
                              np.asarray(render_demo_image(4, 32, 7, "shapes")))


def test_clean_variant_has_its_own_folder_and_manifest(tmp_path, monkeypatch):
    monkeypatch.setenv("SN_DEMO_DIR", str(tmp_path))
    assert default_demo_root(40, "clean") == tmp_path / "demo_v1_40_clean"
    assert default_demo_root(40) == tmp_path / "demo_v1_40"
    root = ensure_demo_dataset(**SMALL, variant="clean")
    assert root == tmp_path / "demo_v1_24_clean_2c_2x1"
    assert json.loads((root / "demo.json").read_text())["variant"] == "clean"
    assert ensure_demo_dataset(root, 24) == root  # variant not given: any
    with pytest.raises(ValueError, match="variant"):
        ensure_demo_dataset(root, 24, variant="shapes")


def test_first_datasets_without_a_variant_entry_are_shapes(tmp_path):
    root = ensure_demo_dataset(tmp_path / "d", **SMALL)
    assert "variant" not in json.loads((root / "demo.json").read_text())
    assert ensure_demo_dataset(root, 24, variant="shapes") == root
    with pytest.raises(ValueError, match="variant"):
        ensure_demo_dataset(root, 24, variant="clean")


def test_unknown_variant_is_one_line_error():
    with pytest.raises(ValueError, match="not one of shapes, clean"):
        ensure_demo_dataset(variant="noisy")
    with pytest.raises(ValueError, match="data.demo_variant: 'noisy' is not one of shapes, clean"):
        DataConfig(dataset="demo", demo_variant="noisy").validate()
