"""The built-in demo dataset: ten classes of shapes on cluttered backgrounds.

Generated once, deterministically, in ImageNet's folder layout
(``<root>/{train,val}/<class>/*.JPEG``, 10 x 300 training and 10 x 50
validation images by default), so it goes through exactly the same loading
path as ImageNet.  Each image shows one large shape of its class (circle,
square, triangle, cross, star, ring, stripes, checkerboard, crescent, arrow)
at a random position, scale, rotation and colour, on a textured gradient
background with distractor clutter (lines, dots, blobs, irregular polygons,
now and then a small shape of another class), some of it drawn over the
shape.  A small CNN learns it well above chance within minutes on two CPU
cores (about 35-55% after 4-8 epochs of 3000 images), but not to 100% quickly.

``variant="clean"`` draws the same classes without the clutter: a gradient
background with noise, one large high-contrast shape, no confusers. A network
learns it in a few hundred large-batch steps (the Table 2 grid at small scale,
``tools/reproduce_table2.py``, trains its (8, 32) cells for about 300), while
rotation, scale, colour and noise keep it from 100%.

The images depend only on their seeds (identical for identical numpy/Pillow
versions).  The dataset is written to a temporary folder and renamed into
place when complete, under a file lock, so concurrent ranks never see half
of it and only one of them draws it.
"""
from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import random
import shutil
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["ensure_demo_dataset", "default_demo_root", "DEMO_CLASSES", "DEMO_VARIANTS",
           "render_demo_image"]

VERSION = 1
DEMO_CLASSES = ("circle", "square", "triangle", "cross", "star", "ring", "stripes",
                "checkerboard", "crescent", "arrow")
TRAIN_PER_CLASS, VAL_PER_CLASS = 300, 50
#: How cluttered an image is: background clutter items (a randint range), how often a small
#: shape of another class is drawn (a choice), clutter drawn over the shape (a randint range),
#: and the shape's least luminance contrast with what lies under it.
DEMO_VARIANTS = {
    "shapes": dict(clutter=(2, 7), confusers=(0, 0, 0, 1), over=(0, 2), contrast=60),
    "clean": dict(clutter=(0, 1), confusers=(0,), over=(0, 0), contrast=80),
}
_SEED = 20190501
Color = Tuple[int, int, int]


# --- shapes: each returns a boolean mask of shape (n, n) --------------------

def _coords(n: int, cx: float, cy: float, angle: float):
    """Pixel coordinates rotated by ``-angle`` around (cx, cy): the shape's own frame."""
    y, x = np.mgrid[0:n, 0:n].astype(np.float32) + 0.5
    x, y = x - cx, y - cy
    c, s = math.cos(angle), math.sin(angle)
    return c * x + s * y, -s * x + c * y


def _polygon_mask(n: int, points: List[Tuple[float, float]]) -> np.ndarray:
    mask = Image.new("L", (n, n), 0)
    ImageDraw.Draw(mask).polygon(points, fill=255)
    return np.asarray(mask) > 127


def _rotated(points, cx, cy, angle):
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + c * u - s * v, cy + s * u + c * v) for u, v in points]


def _regular(k: int, r: float, start: float = -math.pi / 2):
    return [(r * math.cos(start + 2 * math.pi * i / k), r * math.sin(start + 2 * math.pi * i / k))
            for i in range(k)]


def _star_points(r: float):
    outer, inner = _regular(5, r), _regular(5, r * 0.42, -math.pi / 2 + math.pi / 5)
    return [p for pair in zip(outer, inner) for p in pair]


def _arrow_points(r: float):
    w, head = 0.22 * r, 0.55 * r
    return [(-r, -w), (r - head, -w), (r - head, -0.7 * r), (r, 0), (r - head, 0.7 * r),
            (r - head, w), (-r, w)]


def _shape_mask(name: str, n: int, cx: float, cy: float, r: float, angle: float,
                rng: random.Random) -> np.ndarray:
    u, v = _coords(n, cx, cy, angle)
    if name == "circle":
        return u * u + v * v < r * r
    if name == "ring":
        d = np.sqrt(u * u + v * v)
        return (d < r) & (d > r * rng.uniform(0.5, 0.7))
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) < r * 0.85
    if name == "cross":
        w = r * rng.uniform(0.25, 0.35)
        return ((np.abs(u) < w) & (np.abs(v) < r)) | ((np.abs(v) < w) & (np.abs(u) < r))
    if name == "stripes" or name == "checkerboard":
        period = r * rng.uniform(0.35, 0.5)
        inside = np.maximum(np.abs(u), np.abs(v)) < r * 0.9
        cells = np.floor(u / period) + (np.floor(v / period) if name == "checkerboard" else 0)
        return inside & (cells % 2 == 0)
    if name == "crescent":
        off = r * rng.uniform(0.35, 0.5)
        return (u * u + v * v < r * r) & ((u - off) ** 2 + v * v > (r * 0.85) ** 2)
    points = {"triangle": _regular(3, r * 1.1), "star": _star_points(r * 1.1),
              "arrow": _arrow_points(r)}[name]
    return _polygon_mask(n, _rotated(points, cx, cy, angle))


# --- backgrounds and clutter ------------------------------------------------

def _random_color(rng: random.Random) -> Color:
    return tuple(rng.randrange(256) for _ in range(3))


def _luma(color) -> float:
    return 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]


def _background(n: int, rng: random.Random, nrng: np.random.Generator) -> np.ndarray:
    """A two-colour gradient with low-frequency blotches and pixel noise, float (n, n, 3)."""
    a, b = np.array(_random_color(rng), np.float32), np.array(_random_color(rng), np.float32)
    u, _ = _coords(n, n / 2, n / 2, rng.uniform(0, 2 * math.pi))
    t = np.clip(u / n + 0.5, 0, 1)[..., None]
    img = a * (1 - t) + b * t
    coarse = nrng.normal(0, 18, (3, 6, 6)).astype(np.float32)
    img += np.stack([np.asarray(Image.fromarray(c).resize((n, n), Image.BICUBIC)) for c in coarse],
                    axis=-1)
    img += nrng.normal(0, rng.uniform(3, 10), (n, n, 3)).astype(np.float32)
    return img


def _clutter(draw: ImageDraw.ImageDraw, n: int, rng: random.Random, count: int,
             scale: float = 1.0) -> None:
    """Lines, dots, small blobs and irregular polygons in random colours."""
    for _ in range(count):
        kind = rng.choice(("line", "line", "dot", "blob", "poly"))
        color = _random_color(rng)
        x, y = rng.uniform(0, n), rng.uniform(0, n)
        size = rng.uniform(0.04, 0.12) * n * scale
        if kind == "line":
            a = rng.uniform(0, 2 * math.pi)
            length = rng.uniform(0.2, 0.6) * n
            draw.line([(x, y), (x + length * math.cos(a), y + length * math.sin(a))],
                      fill=color, width=max(1, int(rng.uniform(0.01, 0.03) * n)))
        elif kind == "dot":
            s = size * 0.4
            draw.ellipse([x - s, y - s, x + s, y + s], fill=color)
        elif kind == "blob":
            draw.ellipse([x - size, y - size * rng.uniform(0.3, 0.8), x + size,
                          y + size * rng.uniform(0.3, 0.8)], fill=color)
        else:
            k = rng.randint(4, 7)
            pts = [(x + size * rng.uniform(0.4, 1.2) * math.cos(2 * math.pi * i / k),
                    y + size * rng.uniform(0.4, 1.2) * math.sin(2 * math.pi * i / k))
                   for i in range(k)]
            draw.polygon(pts, fill=color)


def _paint(img: np.ndarray, mask: np.ndarray, rng: random.Random, nrng: np.random.Generator,
           min_contrast: float) -> None:
    """Fill ``mask`` with a colour that differs from what lies under it by some luminance,
    flat or with a gradient, plus noise."""
    local = img[mask].mean(axis=0) if mask.any() else img.mean(axis=(0, 1))
    color = _random_color(rng)
    for _ in range(20):
        if abs(_luma(color) - _luma(local)) > min_contrast:
            break
        color = _random_color(rng)
    n = img.shape[0]
    fill = np.broadcast_to(np.array(color, np.float32), img.shape).copy()
    if rng.random() < 0.3:
        u, _ = _coords(n, n / 2, n / 2, rng.uniform(0, 2 * math.pi))
        fill += (u / n)[..., None] * np.array(_random_color(rng), np.float32) * 0.5 - 32
    fill += nrng.normal(0, rng.uniform(4, 16), (n, n, 1)).astype(np.float32)
    img[mask] = fill[mask]


def render_demo_image(label: int, size: int, seed: int, variant: str = "shapes") -> Image.Image:
    """One ``size`` x ``size`` RGB image of class ``DEMO_CLASSES[label]``."""
    knobs = DEMO_VARIANTS[variant]
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    n = 2 * size  # drawn at twice the size, then downsampled: antialiased edges
    canvas = Image.fromarray(np.clip(_background(n, rng, nrng), 0, 255).astype(np.uint8))
    _clutter(ImageDraw.Draw(canvas), n, rng, rng.randint(*knobs["clutter"]))
    img = np.asarray(canvas).astype(np.float32)
    for _ in range(rng.choice(knobs["confusers"])):  # small shapes of other classes: confusers
        other = rng.choice([c for c in DEMO_CLASSES if c != DEMO_CLASSES[label]])
        r = rng.uniform(0.06, 0.11) * n
        mask = _shape_mask(other, n, rng.uniform(0, n), rng.uniform(0, n), r,
                           rng.uniform(0, 2 * math.pi), rng)
        _paint(img, mask, rng, nrng, 20)
    r = rng.uniform(0.2, 0.38) * n
    cx, cy = rng.uniform(r * 0.6, n - r * 0.6), rng.uniform(r * 0.6, n - r * 0.6)
    mask = _shape_mask(DEMO_CLASSES[label], n, cx, cy, r, rng.uniform(0, 2 * math.pi), rng)
    _paint(img, mask, rng, nrng, knobs["contrast"])
    canvas = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    _clutter(ImageDraw.Draw(canvas), n, rng, rng.randint(*knobs["over"]), scale=0.6)
    return canvas.resize((size, size), Image.BOX)


# --- generation -------------------------------------------------------------

def default_demo_root(size: int = 72, variant: str = "shapes",
                      val_per_class: Optional[int] = None) -> Path:
    """Where ``ensure_demo_dataset(None, size, variant=variant, val_per_class=...)`` keeps
    the dataset (10 classes of 300 training images; ``val_per_class`` None: 50)."""
    counts = (len(DEMO_CLASSES), TRAIN_PER_CLASS, val_per_class or VAL_PER_CLASS)
    return _default_root(size, counts, variant)


def _default_root(size: int, counts: Tuple[int, int, int], variant: str = "shapes") -> Path:
    base = Path(os.environ.get("SN_DEMO_DIR") or Path.home() / ".cache" / "switchable_norm")
    suffix = "" if counts == (len(DEMO_CLASSES), TRAIN_PER_CLASS, VAL_PER_CLASS) \
        else "_{}c_{}x{}".format(*counts)
    kind = "" if variant == "shapes" else f"_{variant}"
    return base / f"demo_v{VERSION}_{size}{kind}{suffix}"


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` (a no-op where fcntl is missing); the atomic rename below
    keeps concurrent generation safe even where the lock is not honoured."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _image_seed(split: str, label: int, index: int) -> int:
    digest = hashlib.blake2b(f"{_SEED}/{split}/{label}/{index}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little")


def _write_class(job: Tuple[str, str, int, int, int, str]) -> int:
    folder, split, label, count, size, variant = job
    name = DEMO_CLASSES[label]
    class_dir = Path(folder) / split / name
    class_dir.mkdir(parents=True)
    for i in range(count):
        render_demo_image(label, size, _image_seed(split, label, i), variant).save(
            class_dir / f"{name}_{split}_{i:05d}.JPEG", quality=90)
    return count


def _generate(folder: Path, size: int, counts: Tuple[int, int, int],
              variant: str = "shapes", into: Optional[Path] = None) -> None:
    """Render every class folder, in parallel processes where ``fork`` exists (the
    images depend only on their seeds, not on the process that draws them). Prints one
    line that grows with the progress: ``generating the demo dataset (N images of S px)
    into PATH: 10% 20% ... 100% (T s)`` (``into``: the final folder, else ``folder``)."""
    num_classes, train_per_class, val_per_class = counts
    jobs = [(str(folder), split, label, count, size, variant)
            for split, count in (("train", train_per_class), ("val", val_per_class))
            for label in range(num_classes)]
    total = num_classes * (train_per_class + val_per_class)
    print(f"generating the demo dataset ({total} images of {size} px) into {into or folder}:",
          end="", flush=True)
    start = time.perf_counter()
    processes = min(len(jobs), os.cpu_count() or 1, 8)
    if processes > 1 and "fork" in multiprocessing.get_all_start_methods():
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            _show_progress(pool.imap_unordered(_write_class, jobs, chunksize=1), total)
    else:
        _show_progress(map(_write_class, jobs), total)
    print(f" ({time.perf_counter() - start:.0f} s)", flush=True)


def _show_progress(counts: Iterator[int], total: int) -> None:
    """Consume ``counts`` (images written per job), printing every 10% reached."""
    done = shown = 0
    for count in counts:
        done += count
        while shown < 10 * done // total:
            shown += 1
            print(f" {10 * shown}%", end="", flush=True)


def _manifest(size: int, counts: Tuple[int, int, int], variant: str = "shapes") -> Dict:
    manifest = {"version": VERSION, "size": size, "classes": list(DEMO_CLASSES[:counts[0]]),
                "train_per_class": counts[1], "val_per_class": counts[2]}
    if variant != "shapes":  # the first datasets have no "variant" entry: "shapes"
        manifest["variant"] = variant
    return manifest


def _check_existing(root: Path, manifest: Dict, requested: Tuple[str, ...]) -> None:
    """``root`` must be a generated demo dataset that agrees on the ``requested`` keys."""
    path = root / "demo.json"
    if not path.is_file():
        raise ValueError(f"{root}: exists but is not a generated demo dataset (no demo.json); "
                         f"pass another data.root")
    found = json.loads(path.read_text())
    found.setdefault("variant", "shapes")
    manifest = dict(manifest, variant=manifest.get("variant", "shapes"))
    wrong = {k: found.get(k) for k in requested if found.get(k) != manifest[k]}
    if wrong:
        raise ValueError(f"{root}: demo dataset generated with {wrong}, requested "
                         f"{ {k: manifest[k] for k in wrong} }; delete the folder, pass another "
                         f"data.root or set data.demo_size to match")


def ensure_demo_dataset(root: Optional[str] = None, size: int = 72, *,
                        num_classes: Optional[int] = None,
                        train_per_class: Optional[int] = None,
                        val_per_class: Optional[int] = None,
                        variant: Optional[str] = None) -> Path:
    """The demo dataset's root, generated first if missing.

    ``root`` None: ``$SN_DEMO_DIR`` (default ``~/.cache/switchable_norm``) /
    ``demo_v1_<size>`` (``demo_v1_<size>_<variant>`` for another variant than
    ``shapes``).  The counts default to 10 classes of 300 training and 50
    validation images; an existing dataset must have the ``size`` and the counts
    and variant that are given.  Safe to call from every rank at once.
    """
    if variant is not None and variant not in DEMO_VARIANTS:
        raise ValueError(f"variant: {variant!r} is not one of {', '.join(DEMO_VARIANTS)}")
    requested = ("version", "size") + (("variant",) if variant is not None else ()) + tuple(
        key for key, value in (("classes", num_classes), ("train_per_class", train_per_class),
                               ("val_per_class", val_per_class)) if value is not None)
    num_classes = len(DEMO_CLASSES) if num_classes is None else num_classes
    if not 1 <= num_classes <= len(DEMO_CLASSES):
        raise ValueError(f"num_classes: must be in [1, {len(DEMO_CLASSES)}], got {num_classes}")
    counts = (num_classes, train_per_class or TRAIN_PER_CLASS, val_per_class or VAL_PER_CLASS)
    variant = variant or "shapes"
    root = Path(root).expanduser() if root is not None else _default_root(size, counts, variant)
    manifest = _manifest(size, counts, variant)
    if root.exists():
        _check_existing(root, manifest, requested)
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(root.parent / f".{root.name}.lock"):
        if not root.exists():  # else generated by another process while we waited
            _generate_atomically(root, size, counts, manifest, variant)
    _check_existing(root, manifest, requested)
    return root


def _generate_atomically(root: Path, size: int, counts: Tuple[int, int, int],
                         manifest: Dict, variant: str = "shapes") -> None:
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _generate(tmp, size, counts, variant, into=root)
        (tmp / "demo.json").write_text(json.dumps(manifest, indent=1))
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / "demo.json").is_file():  # lost a race where locks do not work
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
