import numpy as np
import pytest
from PIL import Image

from data.datasets import (BadImageError, BadSample, ImageDataset, load_rgb, read_list_file,
                           scan_folder)
from data.presets import ClassificationPresetEval

from .conftest import CLASSES, make_folder_dataset, write_image, write_list


def test_folder_labels_follow_sorted_class_names(folder_root):
    images = scan_folder(folder_root / "train")
    assert images.classes == sorted(CLASSES) == ["n01", "n02", "n10"]
    assert len(images) == 24
    for i in range(len(images)):
        folder = images.path(i).split("/")[-2]
        assert images.labels[i] == images.classes.index(folder)


def test_val_classes_must_match_train(tmp_path):
    root = make_folder_dataset(tmp_path, 1, 1)
    (root / "val" / "n99").mkdir()
    write_image(root / "val" / "n99" / "a.JPEG", 1)
    with pytest.raises(ValueError, match="differ from the training split.*n99"):
        scan_folder(root / "val", scan_folder(root / "train").classes)


@pytest.mark.parametrize("kind", ["jpeg", "cmyk", "gray", "png"])
def test_every_imagenet_oddity_decodes_as_rgb(tmp_path, kind):
    path = write_image(tmp_path / f"x_{kind}.JPEG", 3, kind, (37, 29))
    img = load_rgb(str(path))
    assert img.mode == "RGB" and img.size == (37, 29)
    reference = Image.open(write_image(tmp_path / "ref.png", 3, "png", (37, 29)))
    if kind == "gray":
        reference = reference.convert("L").convert("RGB")
    assert np.abs(np.asarray(img, dtype=int) - np.asarray(reference)).mean() < 12  # same picture


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        scan_folder(tmp_path / "nope")
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match="no class folders"):
        scan_folder(tmp_path / "train")
    write_image(tmp_path / "train" / "a" / "x.JPEG", 0)
    (tmp_path / "train" / "b").mkdir()
    (tmp_path / "train" / "b" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"train/b: class folder has no images"):
        scan_folder(tmp_path / "train")


def test_list_file(tmp_path):
    for i in range(3):
        write_image(tmp_path / "train" / f"n0{i}" / f"img {i}.JPEG", i)  # a space in a name
    lst = write_list(tmp_path / "train.txt", ["n00/img 0.JPEG 0", "", "n01/img 1.JPEG 1",
                                              "n02/img 2.JPEG 2"])
    images = read_list_file(lst, tmp_path / "train")
    assert list(images.labels) == [0, 1, 2] and images.num_classes == 3
    assert images.classes == ["n00", "n01", "n02"]  # names from the path's folders
    assert images.path(0).endswith("train/n00/img 0.JPEG")
    assert read_list_file(lst, tmp_path / "train", num_classes=5).classes == \
        ["0", "1", "2", "3", "4"]


@pytest.mark.parametrize("line, message", [
    ("n00/a.JPEG", r"train.txt:2: expected '<relative/path> <label>'"),
    ("n00/a.JPEG zero", r"train.txt:2: label 'zero' is not an integer"),
    ("n00/a.JPEG 7", r"train.txt:2: label 7 is out of range \[0, 3\)"),
    ("n00/a.JPEG -1", r"train.txt:2: label -1 is out of range"),
])
def test_list_file_errors_name_the_line(tmp_path, line, message):
    write_image(tmp_path / "train" / "n00" / "a.JPEG", 0)
    lst = write_list(tmp_path / "train.txt", ["n00/a.JPEG 0", line])
    with pytest.raises(ValueError, match=message):
        read_list_file(lst, tmp_path / "train", num_classes=3)


def test_list_file_missing_and_wrong_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt: list file not found"):
        read_list_file(tmp_path / "missing.txt", tmp_path)
    (tmp_path / "val").mkdir()
    lst = write_list(tmp_path / "val.txt", ["n00/a.JPEG 0"])
    with pytest.raises(FileNotFoundError, match="relative to"):
        read_list_file(lst, tmp_path / "val")


def _bad_dataset(tmp_path, policy):
    write_image(tmp_path / "c" / "good.JPEG", 1)
    bad = write_image(tmp_path / "c" / "zz_bad.JPEG", 2, "truncated")
    images = scan_folder(tmp_path)
    return ImageDataset(images, ClassificationPresetEval(16, 20).prepare, policy), bad


def test_truncated_image_skip_and_error(tmp_path):
    dataset, bad = _bad_dataset(tmp_path, "skip")
    image, shift, label = dataset[(0, 123)]
    assert image.dtype.is_floating_point is False and image.shape == (3, 16, 16)
    sample = dataset[(1, 0)]
    assert isinstance(sample, BadSample) and sample.path == str(bad)
    dataset.on_bad_image = "error"
    with pytest.raises(BadImageError, match="zz_bad.JPEG"):
        dataset[(1, 0)]
