#!/usr/bin/env python
"""Draw the paper's importance-ratio figures (Fig. 1/4, 5, 7, 8) for checkpoints and runs.

    python tools/plot_ratios.py --checkpoint runs/resnet_sn --out figures/       # a run
    python tools/plot_ratios.py --checkpoint sn_8x32.pth sn_8x4.pth sn_8x1.pth --out figures/
    python tools/plot_ratios.py --checkpoint e30.pth e60.pth e90.pth --out figures/

Each --checkpoint is a checkpoint file (ours or the authors') or a run's
output_dir (its checkpoint_last.pth, and the per-epoch ratios of its
TensorBoard events in tb/). Written to --out, as PNG and SVG:

  fig4_average            ratios averaged over all SN layers, a bar group per input
                          (labelled by its batch setting (#GPUs, #samples per GPU))
  fig5_layers_<label>     each SN layer's ratios of mu and sigma, in network order
  fig7_mean_<run>         each layer's ratios of mu over training (run: TensorBoard
  fig7_var_<run>          events of an output_dir; or 2+ checkpoint files of one
  fig7_divergence_<run>   architecture, ordered by epoch) and D(mu || sigma)
  fig8_hard_<run>         hard ratios (argmax) at several snapshots (--snapshots)

and the numbers: average.csv, layers.csv, dynamics.csv, hard.csv and all of
them in ratios.json. How the receptive field of a layer is computed, and the
epsilon of the divergence, are explained in analysis/ratio_figures.py.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import re
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from analysis.ratio_figures import (DEFAULT_EPS, NORMALIZERS, LayerInfo,  # noqa: E402
                                    RatioHistory, RatioSnapshot, average_figure,
                                    changed_layers, differing_layers, divergence_figure,
                                    dynamics_figure, hard_choices, hard_ratio_figure,
                                    history_from_tensorboard, layers_figure, network_average,
                                    save_figure, snapshot, symmetric_kl)
from engine.cli import run_cli  # noqa: E402
from models.checkpoint import model_from_state  # noqa: E402
from tools.convert_checkpoint import read_checkpoint  # noqa: E402

__all__ = ["Source", "load_source", "plot", "main"]

SNAPSHOT_FRACTIONS = (0.3, 0.6, 0.9)  # the paper's epochs 30, 60, 90 of 100


@dataclass
class Source:
    """One input: its ratios now, its layers, and (for a run) its ratios over training."""

    path: str
    snap: RatioSnapshot
    infos: List[LayerInfo]
    history: Optional[RatioHistory] = None
    setting: str = ""  # the label before epochs were added: checkpoints of one run share it


def _checkpoint_in(folder: str) -> str:
    for name in ("checkpoint_last.pth", "checkpoint_best.pth"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    raise FileNotFoundError(f"{folder}: no checkpoint_last.pth or checkpoint_best.pth in it")


def _label(path: str, state: dict) -> str:
    """The batch setting of the stored config, else one in the file name, else its name."""
    cfg = state.get("config")
    if isinstance(cfg, dict) and isinstance(cfg.get("batch"), dict):
        return f"({cfg['batch'].get('gpus')}, {cfg['batch'].get('per_gpu')})"
    name = os.path.basename(path)
    m = re.search(r"\((\d+),\s*(\d+)\)", name) or re.search(r"(\d+)x(\d+)", name)
    return f"({m.group(1)}, {m.group(2)})" if m else os.path.splitext(name)[0]


def load_source(path: str, label: Optional[str] = None, tensorboard: bool = True) -> Source:
    """A checkpoint file or a run's output_dir as a Source."""
    run = path if os.path.isdir(path) else None
    ckpt = _checkpoint_in(path) if run else path
    state = read_checkpoint(ckpt)
    model, _ = model_from_state(ckpt, state)
    epoch = state.get("epoch") if isinstance(state.get("epoch"), int) else None
    snap = snapshot(model, label or _label(ckpt, state), epoch)
    history = None
    tb = os.path.join(run, "tb") if run else None
    if tensorboard and tb and os.path.isdir(tb):
        history = history_from_tensorboard(tb, snap.label)
    return Source(path, snap, snap.infos, history, snap.label)


def _unique_labels(sources: Sequence[Source]):
    """Inputs that share a label get their epoch (or file name) added."""
    for src in sources:
        same = [s for s in sources if s.snap.label == src.snap.label]
        if len(same) > 1:
            for s in same:
                tag = f"epoch {s.snap.epoch}" if s.snap.epoch is not None else \
                    os.path.basename(os.path.normpath(s.path))
                s.snap.label = f"{s.snap.label} {tag}"
                if s.history is not None:
                    s.history.label = s.snap.label


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") or "model"


def _pick_epochs(epochs: Sequence[int], spec: Optional[str]) -> List[int]:
    """The snapshot epochs: --snapshots "all", "e1,e2,..." or 30/60/90% of the run."""
    if spec == "all":
        return list(epochs)
    if spec:
        wanted = [int(e) for e in spec.split(",") if e.strip()]
        missing = [e for e in wanted if e not in epochs]
        if missing:
            raise ValueError(f"--snapshots: epochs {missing} are not logged "
                             f"(logged: {epochs[0]}..{epochs[-1]})")
        return wanted
    picks = [min(epochs, key=lambda e: abs(e - f * epochs[-1])) for f in SNAPSHOT_FRACTIONS]
    return sorted(set(picks))


# -- tables ---------------------------------------------------------------------------------------
def _ratio_cells(r: Dict[str, object]) -> Dict[str, float]:
    return {f"{stat}_{n}": round(float(r[stat][j]), 6) for stat in ("mean", "var")
            for j, n in enumerate(NORMALIZERS)}


def _average_rows(sources: Sequence[Source]) -> List[dict]:
    rows = []
    for s in sources:
        avg = network_average(s.snap)
        rows.append({"label": s.snap.label, "epoch": s.snap.epoch, "layers": len(s.snap.ratios),
                     **_ratio_cells(avg), "path": s.path})
    return rows


def _layer_rows(src: Source, eps: float) -> List[dict]:
    hard = hard_choices(src.snap)
    info = {i.name: i for i in src.infos}
    rows = []
    for k, (name, r) in enumerate(src.snap.ratios.items()):
        i = info.get(name)
        rows.append({"label": src.snap.label, "index": k, "layer": name,
                     "kind": i.kind if i else "", "rf": i.rf if i else None, **_ratio_cells(r),
                     "hard_mean": hard[name]["mean"], "hard_var": hard[name]["var"],
                     "divergence": round(symmetric_kl(r["mean"], r["var"], eps), 6)})
    return rows


def _dynamics_rows(label: str, history: RatioHistory, eps: float) -> List[dict]:
    div = history.divergence(eps)
    rows = []
    for name, series in history.series.items():
        for t, epoch in enumerate(history.epochs):
            r = {stat: series[stat][t] for stat in ("mean", "var")}
            rows.append({"run": label, "epoch": epoch, "layer": name, **_ratio_cells(r),
                         "divergence": round(float(div[name][t]), 6)})
    return rows


def _write_csv(path: str, rows: List[dict]):
    if not rows:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# -- figures --------------------------------------------------------------------------------
class _Writer:
    def __init__(self, out: str, formats: Sequence[str], dpi: int):
        self.out, self.formats, self.dpi = out, formats, dpi
        self.files: List[str] = []

    def __call__(self, fig, name: str):
        self.files += save_figure(fig, os.path.join(self.out, name), self.formats, self.dpi)


def _runs(sources: Sequence[Source]) -> List[tuple]:
    """(label, history, infos): each run's TensorBoard history, and the checkpoint files
    of one architecture and batch setting at 2+ epochs, taken as snapshots of one run."""
    runs = [(s.snap.label, s.history, s.infos) for s in sources if s.history is not None]
    files = [s for s in sources if not os.path.isdir(s.path)]
    groups: Dict[tuple, List[Source]] = {}
    for s in files:
        groups.setdefault((tuple(s.snap.layers), s.setting), []).append(s)
    for group in groups.values():
        epochs = {s.snap.epoch for s in group}
        if len(group) > 1 and None not in epochs and len(epochs) == len(group):
            label = "checkpoints" if len(groups) == 1 else f"checkpoints {group[0].setting}"
            runs.append((label, RatioHistory.from_snapshots([s.snap for s in group], label),
                         group[0].infos))
    return runs


def _hard_snapshots(label: str, history: RatioHistory, infos, spec) -> List[RatioSnapshot]:
    epochs = history.epochs if label.startswith("checkpoints") and not spec else \
        _pick_epochs(history.epochs, spec)
    return [history.at(e, infos) for e in epochs]


def _report_hard(label: str, snaps: Sequence[RatioSnapshot]) -> dict:
    out = {"snapshots": {}, "changes": {}}
    for s in snaps:
        diff = differing_layers(s)
        print(f"{label} {s.label}: {len(diff)}/{len(s.ratios)} layers pick different "
              "normalizers for mu and sigma")
        out["snapshots"][s.label] = {"differ": diff, "choices": hard_choices(s)}
    for a, b in zip(snaps, snaps[1:]):
        changed = changed_layers(a, b)
        print(f"{label} {a.label} -> {b.label}: {len(changed)} layers changed their hard ratios")
        out["changes"][f"{a.label} -> {b.label}"] = changed
    return out


def plot(paths: Sequence[str], out: str, labels: Optional[Sequence[str]] = None,
         snapshots: Optional[str] = None, formats: Sequence[str] = ("png", "svg"),
         eps: float = DEFAULT_EPS, dpi: int = 100) -> dict:
    """Every figure and table for ``paths`` into ``out``; returns the numbers (as JSON)."""
    if labels and len(labels) != len(paths):
        raise ValueError(f"--labels: {len(labels)} labels for {len(paths)} inputs")
    sources = [load_source(p, labels[i] if labels else None) for i, p in enumerate(paths)]
    skipped = [s.path for s in sources if not s.snap.ratios]
    for path in skipped:
        print(f"note: {path} has no SN layer; skipped", file=sys.stderr)
    sources = [s for s in sources if s.snap.ratios]
    if not sources:
        raise ValueError("none of the inputs has an SN layer: nothing to plot")
    if not labels:
        _unique_labels(sources)
    os.makedirs(out, exist_ok=True)
    write = _Writer(out, formats, dpi)
    write(average_figure([s.snap for s in sources]), "fig4_average")
    result = {"average": _average_rows(sources), "layers": [], "dynamics": [], "hard": {},
              "skipped": skipped, "eps": eps}
    for s in sources:
        write(layers_figure(s.snap), f"fig5_layers_{_slug(s.snap.label)}")
        result["layers"] += _layer_rows(s, eps)
    for label, history, infos in _runs(sources):
        slug = _slug(label)
        write(dynamics_figure(history, "mean", infos), f"fig7_mean_{slug}")
        write(dynamics_figure(history, "var", infos), f"fig7_var_{slug}")
        write(divergence_figure(history, infos, eps), f"fig7_divergence_{slug}")
        snaps = _hard_snapshots(label, history, infos, snapshots)
        write(hard_ratio_figure(snaps, f"Hard ratios (argmax) of each SN layer \u2014 {label}"),
              f"fig8_hard_{slug}")
        result["dynamics"] += _dynamics_rows(label, history, eps)
        result["hard"][label] = _report_hard(label, snaps)
    _write_tables(out, result)
    result["files"] = write.files
    return result


def _write_tables(out: str, result: dict):
    _write_csv(os.path.join(out, "average.csv"), result["average"])
    _write_csv(os.path.join(out, "layers.csv"), result["layers"])
    _write_csv(os.path.join(out, "dynamics.csv"), result["dynamics"])
    hard_rows = [{"run": run, "snapshot": snap, "layer": layer, "hard_mean": c["mean"],
                  "hard_var": c["var"], "differ": c["mean"] != c["var"]}
                 for run, h in result["hard"].items()
                 for snap, s in h["snapshots"].items() for layer, c in s["choices"].items()]
    _write_csv(os.path.join(out, "hard.csv"), hard_rows)
    with open(os.path.join(out, "ratios.json"), "w") as f:
        json.dump(result, f, indent=1)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--checkpoint", nargs="+", required=True, metavar="K",
                    help="checkpoint files (ours or the authors') or runs' output_dirs")
    ap.add_argument("--out", required=True, help="folder for the figures and tables")
    ap.add_argument("--labels", nargs="+", help="one label per input (default: its batch "
                    "setting from the stored config or the file name)")
    ap.add_argument("--snapshots", help="epochs of the hard-ratio figure of a run: 'all' or "
                    "e.g. '30,60,90' (default: at 30%%, 60%%, 90%% of the run)")
    ap.add_argument("--formats", default="png,svg", help="figure formats (default png,svg)")
    ap.add_argument("--eps", type=float, default=DEFAULT_EPS,
                    help="smoothing of the divergence (default 1e-6)")
    ap.add_argument("--dpi", type=int, default=100, help="resolution of PNGs")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    def run():
        result = plot(args.checkpoint, args.out, args.labels, args.snapshots,
                      [f.strip() for f in args.formats.split(",") if f.strip()], args.eps,
                      args.dpi)
        print(f"wrote {len(result['files'])} figures and 5 tables to {args.out}")
    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
