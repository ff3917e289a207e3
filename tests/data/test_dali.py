"""The DALI backend on the CPU (device_id=None), against the torchvision backend."""
import pytest
import torch

from data import DataConfig, IMAGENET_STD, build_loader
from data.dali import check_image_file
from data.datasets import BadImageError

from .conftest import make_folder_dataset, requires_dali, write_image, write_list

pytestmark = requires_dali

#: Validation tensors of the two backends, in 8-bit intensity levels, when val_resize >
#: val_crop: the same decoder (libjpeg-turbo), the same output size and crop, and resize
#: filters that differ by at most one level.
VAL_MAX_LEVELS, VAL_MEAN_LEVELS = 1.0, 0.3


def _cfg(root, backend="dali", **kw):
    base = dict(root=str(root), backend=backend, workers=2, image_size=24, val_resize=28,
                val_crop=24)
    base.update(kw)
    return DataConfig(**base)


def _epoch(loader, epoch=0, start_iter=0):
    loader.set_epoch(epoch, start_iter)
    return [(x.clone(), y.clone()) for x, y in loader]


def _levels(a, b):
    return (a - b).abs() * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255


def test_dali_train_end_to_end(folder_root):
    loader = build_loader(_cfg(folder_root), "train", 5, seed=3)
    assert loader.backend == "dali" and "CPU decoding" in loader.reason
    assert (len(loader), loader.num_samples, loader.dataset_size) == (4, 20, 24)
    assert loader.classes == ["n01", "n02", "n10"]
    batches = _epoch(loader)
    assert len(batches) == 4
    for x, y in batches:
        assert x.shape == (5, 3, 24, 24) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and y.shape == (5,)
        assert -3 < x.min() and x.max() < 3.5
    again = build_loader(_cfg(folder_root, workers=1), "train", 5, seed=3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, _epoch(again)))


def test_dali_order_is_the_torchvision_order_and_resumes(folder_root):
    dali = build_loader(_cfg(folder_root), "train", 3, seed=11)
    tv = build_loader(_cfg(folder_root, "torchvision", workers=0), "train", 3, seed=11)
    labels = [y.tolist() for _, y in _epoch(dali, 2)]
    assert labels == [y.tolist() for _, y in _epoch(tv, 2)]
    assert [y.tolist() for _, y in _epoch(dali, 2, start_iter=5)] == labels[5:]
    assert [y.tolist() for _, y in _epoch(dali, 3)] != labels


@pytest.mark.parametrize("resize, crop", [(28, 24), (40, 32), (256, 224)])
def test_dali_val_matches_torchvision(folder_root, resize, crop):
    out = {}
    for backend in ("dali", "torchvision"):
        loader = build_loader(_cfg(folder_root, backend, val_resize=resize, val_crop=crop),
                              "val", 4)
        batches = _epoch(loader)
        out[backend] = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])
    assert torch.equal(out["dali"][1], out["torchvision"][1])
    levels = _levels(out["dali"][0], out["torchvision"][0])
    assert out["dali"][0].shape == (15, 3, crop, crop)
    assert levels.max() <= VAL_MAX_LEVELS + 1e-3 and levels.mean() <= VAL_MEAN_LEVELS


def test_dali_val_reused_across_epochs_and_sharded(folder_root):
    loader = build_loader(_cfg(folder_root), "val", 4)
    first = _epoch(loader, 0)
    second = _epoch(loader, 1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second))
    single = torch.cat([x for x, _ in first])
    for rank in range(2):
        shard = build_loader(_cfg(folder_root), "val", 3, rank=rank, world_size=2)
        images = torch.cat([x for x, _ in _epoch(shard)])
        assert shard.num_samples == len(images) == len(range(rank, 15, 2))
        assert _levels(images, single[rank::2]).max() == 0
    empty = build_loader(_cfg(folder_root), "val", 3, rank=20, world_size=21)
    assert len(empty) == 0 and _epoch(empty) == []


def test_dali_leaves_out_bad_files(tmp_path):
    root = make_folder_dataset(tmp_path / "ds", 4, 2, kinds=("jpeg", "cmyk", "gray", "png"))
    write_image(root / "train" / "n02" / "n02_bad.JPEG", 1, "truncated")
    (root / "train" / "n01" / "n01_text.JPEG").write_text("not an image")
    with pytest.warns(UserWarning, match="leaving out 2 unreadable"):
        loader = build_loader(_cfg(root), "train", 5, drop_last=False)
    assert loader.dataset_size == 14 and loader.bad_images == 2 and loader.num_samples == 12
    assert sum(len(y) for _, y in _epoch(loader)) == 12 and loader.bad_images == 2
    with pytest.raises(BadImageError, match="n01_text.JPEG|n02_bad.JPEG"):
        build_loader(_cfg(root, on_bad_image="error"), "train", 5)


def test_check_image_file(tmp_path):
    for kind in ("jpeg", "cmyk", "gray", "png"):
        assert check_image_file(str(write_image(tmp_path / f"{kind}.JPEG", 1, kind))) is None
    truncated = str(write_image(tmp_path / "t.JPEG", 1, "truncated"))
    assert "truncated" in check_image_file(truncated)
    assert check_image_file(truncated, "decode") is not None
    (tmp_path / "empty.JPEG").write_bytes(b"")
    assert check_image_file(str(tmp_path / "empty.JPEG")) == "empty file"


def test_dali_list_layout(folder_root):
    tv = build_loader(_cfg(folder_root, "torchvision", workers=0), "val", 4)
    lines = [f"{tv.images.paths[i].decode()} {tv.images.labels[i]}" for i in range(15)]
    write_list(folder_root / "val.txt", lines)
    loader = build_loader(_cfg(folder_root, layout="list", val_list="val.txt"), "val", 4)
    assert torch.equal(torch.cat([y for _, y in _epoch(loader)]),
                       torch.cat([y for _, y in _epoch(tv)]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dali_gpu_decoding_matches_torchvision(folder_root):
    """nvJPEG decoding and GPU resizing: not bit-exact with libjpeg-turbo/Pillow, so only a
    mean tolerance (not measured here: no GPU was available when this was written)."""
    device = torch.device("cuda")
    out = {}
    for backend in ("dali", "torchvision"):
        loader = build_loader(_cfg(folder_root, backend), "val", 4, device=device)
        assert loader.backend == backend
        batches = _epoch(loader)
        assert all(x.device.type == "cuda" and y.device.type == "cuda" for x, y in batches)
        out[backend] = torch.cat([x for x, _ in batches]).cpu(), torch.cat([y for _, y in batches])
    assert torch.equal(out["dali"][1], out["torchvision"][1])
    assert _levels(out["dali"][0], out["torchvision"][0]).mean() <= 2.0
    train = build_loader(_cfg(folder_root), "train", 5, device=device)
    assert "GPU" in train.reason and all(x.is_cuda for x, _ in _epoch(train))
