#!/usr/bin/env python
"""Reproduce the paper's Table 2, Fig. 3 and Fig. 4 (Luo et al., Sec. 4.1) with the real trainer.

    python tools/reproduce_table2.py                               # demo scale, 2-core CPU
    python tools/reproduce_table2.py --cells bn:8x32,sn:8x2 --seeds 0,1 --epochs 10
    python tools/reproduce_table2.py --dry-run                     # print the commands only
    python tools/reproduce_table2.py --scale imagenet --nproc 8 data.root=/data/imagenet

The grid is Table 2's: norms BN, GN, SN x settings (#GPUs, #samples per GPU)
(8,32) (8,16) (8,8) (8,4) (8,2) (1,16) (1,32) (8,1) (1,8); BN is left out at
(8,1) (it does not converge; name ``bn:8x1`` in --cells to run it anyway) and SN
runs without its BN branch there, as in the paper. Every cell is one
``python train.py --config CONFIG key=value ...`` (or ``torchrun
--nproc_per_node=K train.py ...`` with --nproc K, K reduced to a divisor of the
cell's #GPUs), in its own run folder ``--out/<norm>_<G>x<n>_s<seed>``, with the
trainer's console output in ``train.log`` there. CONFIG is
``configs/demo/table2/resnet18_<norm>_<G>x<n>.yaml`` (--scale demo) or
``configs/imagenet/table2/resnet50_<norm>_<G>x<n>.yaml`` (--scale imagenet);
trailing ``key=value`` overrides (``data.root=...``) go to every cell.

A cell whose metrics.jsonl holds all its epochs is skipped; any other cell is
(re)started with the same output_dir, so the trainer resumes it from
checkpoint_last.pth. Ctrl-C or SIGTERM asks the running cells to save and stop:
run the same command to continue. One progress line per cell, with the ETA of
the rest from the measured times of finished cells.

Written to --out: ``table2.md`` and ``table2.csv`` (the paper's layout: rows BN,
GN, SN, GN-BN, SN-BN, SN-GN, a column per setting; last-epoch validation top-1,
mean +- standard deviation over seeds, the paper's number beside each),
``fig3_curves.{png,svg}`` (Fig. 3: SN's validation curves per setting; train
and validation curves of BN, GN, SN at (8,32) and (8,2)), ``fig4_ratios.{png,svg}``
and ``fig4_ratios.csv`` (Fig. 4: SN's importance ratios of IN, LN, BN averaged
over its layers, for the mean and the variance, per setting).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

__all__ = ["Cell", "NORMS", "SETTINGS", "PAPER_TABLE2", "parse_cells", "plan", "cell_command",
           "is_finished", "collect", "table_rows", "write_tables", "fig3", "fig4", "main"]

NORMS = ("bn", "gn", "sn")
SETTINGS: Tuple[Tuple[int, int], ...] = ((8, 32), (8, 16), (8, 8), (8, 4), (8, 2), (1, 16),
                                         (1, 32), (8, 1), (1, 8))
LEFT_OUT = {("bn", (8, 1))}  # BN does not converge with one sample per GPU (Table 2: "-")
ROWS = ("BN", "GN", "SN", "GN-BN", "SN-BN", "SN-GN")
CONFIGS = {"demo": "configs/demo/table2/resnet18_{norm}_{g}x{n}.yaml",
           "imagenet": "configs/imagenet/table2/resnet50_{norm}_{g}x{n}.yaml"}
DEFAULT_EXTRA_SEEDS = {"demo": "8x32,8x2=1", "imagenet": ""}

#: The paper's Table 2 (top-1 % on ImageNet val, ResNet-50, 100 epochs), as printed, in the
#: order of SETTINGS; None is its "-" (BN does not converge at (8, 1)).
PAPER_TABLE2: Dict[str, Tuple[Optional[float], ...]] = {
    "BN": (76.4, 76.3, 75.2, 72.7, 65.3, 76.2, 76.5, None, 75.4),
    "GN": (75.9, 75.8, 76.0, 75.8, 75.9, 75.9, 75.8, 75.5, 75.5),
    "SN": (76.9, 76.7, 76.7, 75.9, 75.6, 76.3, 76.6, 75.0, 75.9),
    "GN-BN": (-0.5, -0.5, 0.8, 3.1, 10.6, -0.3, -0.7, None, 0.1),
    "SN-BN": (0.5, 0.4, 1.5, 3.2, 10.3, 0.1, 0.1, None, 0.5),
    "SN-GN": (1.0, 0.9, 0.7, 0.1, -0.3, 0.4, 0.8, -0.5, 0.4),
}


# -- the grid -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    """One training run: a normalizer in a batch setting with a seed."""

    norm: str
    gpus: int
    per_gpu: int
    seed: int = 0

    @property
    def setting(self) -> Tuple[int, int]:
        return (self.gpus, self.per_gpu)

    @property
    def name(self) -> str:
        return f"{self.norm}:{self.gpus}x{self.per_gpu}"

    @property
    def folder(self) -> str:
        return f"{self.norm}_{self.gpus}x{self.per_gpu}_s{self.seed}"

    @property
    def batch(self) -> int:
        return self.gpus * self.per_gpu


def _label(setting: Tuple[int, int]) -> str:
    return f"({setting[0]},{setting[1]})"


def _valid_names() -> List[str]:
    return [f"{norm}:{g}x{n}" for (g, n) in SETTINGS for norm in NORMS]


def _matching(item: str) -> List[Tuple[str, Tuple[int, int]]]:
    """The (norm, setting) pairs of one --cells item; a named cell may be a left-out one."""
    everything = [(nm, st) for st in SETTINGS for nm in NORMS]
    if item == "all":
        return [p for p in everything if p not in LEFT_OUT]
    if ":" in item:
        return [p for p in everything if f"{p[0]}:{p[1][0]}x{p[1][1]}" == item]
    if item in NORMS:
        return [p for p in everything if p[0] == item and p not in LEFT_OUT]
    return [p for p in everything if f"{p[1][0]}x{p[1][1]}" == item and p not in LEFT_OUT]


def parse_cells(spec: str, flag: str = "--cells") -> List[Tuple[str, Tuple[int, int]]]:
    """``(norm, setting)`` pairs of a comma list of ``norm:GxN``, ``norm`` (its settings),
    ``GxN`` (all norms) or ``all``, in table order; an unknown item is a one-line error."""
    wanted = set()
    for item in (s.strip().lower() for s in spec.split(",") if s.strip()):
        pairs = _matching(item)
        if not pairs:
            raise ValueError(f"{flag}: unknown cell {item!r}; valid: all, a norm "
                             f"({', '.join(NORMS)}), a setting such as 8x2, or a cell: "
                             f"{', '.join(_valid_names())}")
        wanted.update(pairs)
    if not wanted:
        raise ValueError(f"{flag}: no cell given")
    return [(nm, st) for st in SETTINGS for nm in NORMS if (nm, st) in wanted]


def _parse_seeds(text: str, flag: str) -> List[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"{flag}: expected integers such as 0,1, got {text!r}") from None
    if not seeds:
        raise ValueError(f"{flag}: no seed given")
    return seeds


def plan(cells: str, seeds: str, extra_seeds: Sequence[str] = ()) -> List[Cell]:
    """The runs, in order: every cell with ``seeds``, then the extra seeds of chosen cells
    (``--extra-seeds CELLS=SEEDS``, e.g. ``8x32,8x2=1``), each run once."""
    chosen = parse_cells(cells)
    runs = [Cell(nm, st[0], st[1], s) for s in _parse_seeds(seeds, "--seeds")
            for nm, st in chosen]
    for spec in extra_seeds:
        if not spec.strip():
            continue
        where, eq, more = spec.partition("=")
        if not eq:
            raise ValueError(f"--extra-seeds: expected CELLS=SEEDS such as 8x32,8x2=1, "
                             f"got {spec!r}")
        targets = set(parse_cells(where, "--extra-seeds"))
        runs += [Cell(nm, st[0], st[1], s) for s in _parse_seeds(more, "--extra-seeds")
                 for nm, st in chosen if (nm, st) in targets]
    unique: List[Cell] = []
    for cell in runs:
        if cell not in unique:
            unique.append(cell)
    return unique


# -- one cell: its command, whether it is done, its results -----------------------------------
def config_path(scale: str, cell: Cell) -> str:
    return os.path.join(ROOT, CONFIGS[scale].format(norm=cell.norm, g=cell.gpus, n=cell.per_gpu))


def scaled_milestones(milestones: Sequence[float], from_epochs: int, epochs: int) -> List[int]:
    """The step epochs of a schedule of ``from_epochs`` at the same fractions of ``epochs``."""
    steps = sorted({round(m * epochs / from_epochs) for m in milestones})
    return [m for m in steps if 0 < m < epochs] or [epochs]


def cell_overrides(args, cell: Cell, out: str) -> Tuple[List[str], int]:
    """A cell's overrides of its config, and its epochs. ``--epochs`` keeps the step epochs
    at their fractions of training (the paper's 30/60/90 of 100 become 6/12/18 of 20)."""
    from engine.config import load_config
    own = [f"output_dir={os.path.join(out, cell.folder)}", f"train.seed={cell.seed}"]
    cfg = load_config(config_path(args.scale, cell), own + list(args.overrides))
    if args.epochs is None:
        return own + list(args.overrides), cfg.train.epochs
    steps = scaled_milestones(cfg.schedule.milestones, cfg.train.epochs, args.epochs)
    own += [f"train.epochs={args.epochs}", f"schedule.milestones=[{','.join(map(str, steps))}]"]
    return own + list(args.overrides), args.epochs


def world_size(gpus: int, nproc: int) -> int:
    """The largest number of processes up to ``nproc`` that divides #GPUs."""
    return max(k for k in range(1, max(1, min(nproc, gpus)) + 1) if gpus % k == 0)


def cell_command(scale: str, cell: Cell, overrides: Sequence[str], nproc: int = 0) -> List[str]:
    """``train.py`` (``nproc`` 0) or ``torchrun --nproc_per_node=K train.py`` for a cell."""
    launcher = [sys.executable, "train.py"]
    if nproc:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={world_size(cell.gpus, nproc)}", "train.py"]
    return launcher + ["--config", config_path(scale, cell)] + list(overrides)


def read_metrics(run_dir: str) -> List[dict]:
    """The rows of a run's metrics.jsonl, the last one of each epoch (a resume rewrites)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    rows: Dict[int, dict] = {}
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:  # a line cut by a crash
                continue
            if isinstance(row, dict) and isinstance(row.get("epoch"), int):
                rows[row["epoch"]] = row
    return [rows[e] for e in sorted(rows)]


def is_finished(run_dir: str, epochs: int) -> bool:
    """All ``epochs`` are in metrics.jsonl, the last one validated, a checkpoint beside."""
    rows = read_metrics(run_dir)
    return (len(rows) >= epochs and "val_top1" in rows[-1]
            and os.path.isfile(os.path.join(run_dir, "checkpoint_last.pth")))


# -- running the grid -----------------------------------------------------------------------------
@dataclass
class Job:
    """A cell to run: its command, run folder and length; the process while it runs."""

    cell: Cell
    command: List[str]
    run_dir: str
    epochs: int
    env: Optional[dict] = None
    proc: Optional[subprocess.Popen] = None
    started: float = 0.0
    log: Optional[object] = None


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _timing_path(run_dir: str) -> str:
    return os.path.join(run_dir, "reproduce_table2.json")


def stored_seconds(run_dir: str) -> float:
    """Wall seconds this tool has spent on a cell so far (over all invocations)."""
    try:
        with open(_timing_path(run_dir)) as f:
            return float(json.load(f).get("seconds", 0.0))
    except (OSError, ValueError, AttributeError):
        return 0.0


class Eta:
    """Predicts a cell's wall time from finished cells: seconds per epoch = a + b / batch
    (per-sample work plus per-iteration overhead), fitted by least squares; with one batch
    size measured, the per-iteration part is taken as the work of 32 samples."""

    def __init__(self):
        self.samples: List[Tuple[float, float]] = []  # (1 / batch, seconds per epoch)

    def add(self, cell: Cell, epochs: int, seconds: float):
        if seconds > 0 and epochs > 0:
            self.samples.append((1.0 / cell.batch, seconds / epochs))

    def _coefficients(self) -> Optional[Tuple[float, float]]:
        if not self.samples:
            return None
        xs, ys = zip(*self.samples)
        if len(set(xs)) > 1:
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            b = sum((x - mx) * (y - my) for x, y in self.samples) / \
                sum((x - mx) ** 2 for x in xs)
            a = my - b * mx
            if a > 0 and b >= 0:
                return a, b
        scale = sum(y / (1 + 32 * x) for x, y in self.samples) / len(self.samples)
        return scale, 32 * scale

    def predict(self, cell: Cell, epochs: int) -> Optional[float]:
        coef = self._coefficients()
        return None if coef is None else epochs * (coef[0] + coef[1] / cell.batch)


def _start(job: Job):
    os.makedirs(job.run_dir, exist_ok=True)
    job.log = open(os.path.join(job.run_dir, "train.log"), "a")
    job.log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} reproduce_table2: "
                  f"{subprocess.list2cmdline(job.command)}\n")
    job.log.flush()
    job.started = time.time()
    # a session of its own: Ctrl-C reaches this tool, which asks the cell to save first
    job.proc = subprocess.Popen(job.command, cwd=ROOT, stdout=job.log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=job.env, start_new_session=True)


def _finish(job: Job) -> float:
    """Close the job's log, add its wall time to the cell's record; returns the total."""
    job.log.close()
    seconds = stored_seconds(job.run_dir) + time.time() - job.started
    with open(_timing_path(job.run_dir), "w") as f:
        json.dump({"seconds": round(seconds, 1), "epochs": job.epochs, "exit": job.proc.returncode,
                   "command": job.command}, f, indent=1)
    return seconds


def _last_line(run_dir: str) -> str:
    """The last error-looking (else last) line of a cell's train.log."""
    try:
        with open(os.path.join(run_dir, "train.log"), errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith(("error:", "Traceback")) or "Error" in line]
    return (errors or lines or [""])[-1][:200]


def _outcome(job: Job, seconds: float) -> Tuple[bool, str]:
    rows = read_metrics(job.run_dir)
    if is_finished(job.run_dir, job.epochs):
        best = max(r["val_top1"] for r in rows if "val_top1" in r)
        return True, f"top-1 {rows[-1]['val_top1']:.2f}% (best {best:.2f}%) in {_hms(seconds)}"
    why = f"exit {job.proc.returncode}" if job.proc.returncode else \
        f"only {len(rows)}/{job.epochs} epochs"
    return False, f"FAILED ({why}) after {_hms(seconds)}: {_last_line(job.run_dir)} " \
                  f"(log: {os.path.join(job.run_dir, 'train.log')})"


class Runner:
    """Runs jobs ``parallel`` at a time and prints one progress line per cell."""

    def __init__(self, jobs: List[Job], parallel: int, eta: Eta, done: int, total: int):
        self.pending, self.running = list(jobs), []  # type: List[Job], List[Job]
        self.parallel, self.eta, self.done, self.total = parallel, eta, done, total
        self.failed: List[Cell] = []

    def remaining_seconds(self) -> Optional[float]:
        now, left = time.time(), 0.0
        for job in self.pending + self.running:
            guess = self.eta.predict(job.cell, job.epochs)
            if guess is None:
                return None
            left += max(0.0, guess - (now - job.started if job in self.running else 0.0))
        return left / self.parallel

    def progress(self, cell: Cell, text: str):
        self.done += 1
        left = self.remaining_seconds() if self.pending or self.running else 0.0
        eta = "ETA ?" if left is None else f"ETA {_hms(left)}" if left else "grid done"
        print(f"[{self.done:>{len(str(self.total))}}/{self.total}] {cell.name:<8} seed "
              f"{cell.seed}: {text} | {eta}", flush=True)

    def _reap(self):
        for job in [j for j in self.running if j.proc.poll() is not None]:
            self.running.remove(job)
            seconds = _finish(job)
            ok, text = _outcome(job, seconds)
            if ok:
                self.eta.add(job.cell, job.epochs, seconds)
            else:
                self.failed.append(job.cell)
            self.progress(job.cell, text)

    def run(self):
        """Until every job ended; KeyboardInterrupt (Ctrl-C, SIGTERM) stops them first."""
        try:
            while self.pending or self.running:
                while self.pending and len(self.running) < self.parallel:
                    job = self.pending.pop(0)
                    self.running.append(job)  # first: an interrupt in _start still stops it
                    _start(job)
                time.sleep(0.2)
                self._reap()
        except KeyboardInterrupt:
            self.stop()
            raise

    def stop(self):
        """SIGTERM to every running cell (the trainer saves and exits 0), then wait;
        a second interrupt kills them."""
        print(f"interrupted: asking {len(self.running)} running cell(s) to save ...", flush=True)
        signum = signal.SIGTERM
        self.running = [j for j in self.running if j.proc is not None]
        while self.running:
            try:
                for job in self.running:
                    if job.proc.poll() is None:
                        os.killpg(job.proc.pid, signum)
                for job in list(self.running):
                    job.proc.wait()
                    _finish(job)
                    self.running.remove(job)
            except KeyboardInterrupt:
                signum = signal.SIGKILL
            except ProcessLookupError:
                continue


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


# -- Table 2 --------------------------------------------------------------------------------------
Stat = Tuple[float, Optional[float], int]  # mean, standard deviation (None: one seed), seeds


def collect(out: str, epochs: Dict[Cell, int]) -> Dict[Cell, List[dict]]:
    """The metrics rows of every finished cell."""
    return {cell: read_metrics(os.path.join(out, cell.folder)) for cell, n in epochs.items()
            if is_finished(os.path.join(out, cell.folder), n)}


def _stat(values: Sequence[float]) -> Optional[Stat]:
    if not values:
        return None
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, None, 1
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return mean, sd, len(values)


def _difference(a: Optional[Stat], b: Optional[Stat]) -> Optional[Stat]:
    if a is None or b is None:
        return None
    sd = math.sqrt(a[1] ** 2 + b[1] ** 2) if a[1] is not None and b[1] is not None else None
    return a[0] - b[0], sd, min(a[2], b[2])


def table_rows(results: Dict[Cell, List[dict]]) -> Dict[str, List[Optional[Stat]]]:
    """Table 2's rows from the last-epoch validation top-1 of each cell, over its seeds."""
    finals: Dict[Tuple[str, Tuple[int, int]], List[float]] = {}
    for cell, rows in sorted(results.items(), key=lambda kv: kv[0].seed):
        finals.setdefault((cell.norm, cell.setting), []).append(float(rows[-1]["val_top1"]))
    table = {norm.upper(): [_stat(finals.get((norm, st), [])) for st in SETTINGS]
             for norm in NORMS}
    for row in ROWS[len(NORMS):]:
        a, b = row.split("-")
        table[row] = [_difference(x, y) for x, y in zip(table[a], table[b])]
    return table


def _fmt(stat: Optional[Stat]) -> str:
    if stat is None:
        return "-"
    return f"{stat[0]:.1f}" + (f" ± {stat[1]:.1f}" if stat[1] is not None else "")


def _paper(row: str, j: int) -> str:
    value = PAPER_TABLE2[row][j]
    return "-" if value is None else f"{value:.1f}"


def _seed_note(table: Dict[str, List[Optional[Stat]]]) -> str:
    counts = {}
    for row in ("BN", "GN", "SN"):
        for j, stat in enumerate(table[row]):
            if stat is not None:
                counts.setdefault(stat[2], []).append(f"{row} {_label(SETTINGS[j])}")
    parts = [f"{n} seed{'s' if n > 1 else ''}: {', '.join(c)}" for n, c in sorted(counts.items())]
    return "; ".join(parts) if parts else "no finished cell"


def format_console(table: Dict[str, List[Optional[Stat]]], title: str) -> str:
    """The measured table with the paper's numbers on the line below each row."""
    head = [_label(st) for st in SETTINGS]
    cells = {row: [_fmt(s) for s in table[row]] for row in ROWS}
    width = max(7, *(len(t) for row in cells.values() for t in row))
    lines = [title, " " * 8 + "".join(f"{h:>{width + 2}}" for h in head)]
    for row in ROWS:
        lines.append(f"{row:<8}" + "".join(f"{t:>{width + 2}}" for t in cells[row]))
        lines.append(f"{'  paper':<8}" + "".join(f"{_paper(row, j):>{width + 2}}"
                                                  for j in range(len(SETTINGS))))
    return "\n".join(lines)


def format_markdown(table: Dict[str, List[Optional[Stat]]], about: str) -> str:
    head = "| | " + " | ".join(_label(st) for st in SETTINGS) + " |"
    lines = ["# Table 2, reproduced at small scale", "", about, "",
             "Top-1 accuracy (%) on the validation set, last epoch: measured mean ± standard "
             "deviation over seeds, then the paper's number (ResNet-50 on ImageNet, its "
             "Table 2) in brackets. `-`: not run (BN at (8,1) does not converge in the paper).",
             "", head, "|---|" + "---:|" * len(SETTINGS)]
    for row in ROWS:
        entries = [f"{_fmt(s)} ({_paper(row, j)})" for j, s in enumerate(table[row])]
        lines.append(f"| {row} | " + " | ".join(entries) + " |")
    lines += ["", f"Seeds per cell: {_seed_note(table)}."]
    return "\n".join(lines) + "\n"


def write_tables(out: str, table: Dict[str, List[Optional[Stat]]], about: str) -> List[str]:
    """table2.md and table2.csv (rows x settings; statistics mean, sd, seeds, paper)."""
    md, path_csv = os.path.join(out, "table2.md"), os.path.join(out, "table2.csv")
    with open(md, "w") as f:
        f.write(format_markdown(table, about))
    with open(path_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "statistic"] + [_label(st) for st in SETTINGS])
        for row in ROWS:
            stats = table[row]
            writer.writerow([row, "mean"] + [_num(s and s[0], 3) for s in stats])
            writer.writerow([row, "sd"] + [_num(s and s[1], 3) for s in stats])
            writer.writerow([row, "seeds"] + [s[2] if s else "" for s in stats])
            writer.writerow([row, "paper"] + [_num(v, 1) for v in PAPER_TABLE2[row]])
    return [md, path_csv]


def _num(value: Optional[float], digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


# -- Fig. 3 and Fig. 4 ----------------------------------------------------------------------------
NORM_COLORS = {"bn": "#2ca02c", "gn": "#1f77b4", "sn": "#d62728"}


def mean_curve(runs: Sequence[List[dict]], key: str) -> Tuple[List[int], List[float]]:
    """(epochs counted from 1, ``key`` averaged over the runs) where every run has it."""
    per_epoch: Dict[int, List[float]] = {}
    for rows in runs:
        for row in rows:
            if key in row:
                per_epoch.setdefault(row["epoch"], []).append(float(row[key]))
    epochs = [e for e in sorted(per_epoch) if len(per_epoch[e]) == len(runs)]
    return epochs, [sum(per_epoch[e]) / len(runs) for e in epochs]


def _runs_of(results: Dict[Cell, List[dict]], norm: str, setting) -> List[List[dict]]:
    return [rows for cell, rows in results.items()
            if cell.norm == norm and cell.setting == tuple(setting)]


def _panel_sn(ax, results: Dict[Cell, List[dict]]):
    """Fig. 3 (a): SN's validation curves, one per setting."""
    import matplotlib
    cmap = matplotlib.colormaps["viridis"]
    for j, st in enumerate(SETTINGS):
        runs = _runs_of(results, "sn", st)
        if runs:
            ax.plot(*mean_curve(runs, "val_top1"), color=cmap(j / (len(SETTINGS) - 1)),
                    label=f"SN {_label(st)}")
    ax.set_title("(a) validation curves of SN", fontsize=10)


def _panel_norms(ax, results: Dict[Cell, List[dict]], setting: Tuple[int, int], tag: str):
    """Fig. 3 (b)/(c): train (dashed) and validation (solid) top-1 of BN, GN, SN."""
    for norm in NORMS:
        runs = _runs_of(results, norm, setting)
        if runs:
            color = NORM_COLORS[norm]
            name = norm.upper()
            ax.plot(*mean_curve(runs, "train_top1"), "--", color=color, label=f"{name} train")
            ax.plot(*mean_curve(runs, "val_top1"), "-", color=color, label=f"{name} val")
    ax.set_title(f"({tag}) train and validation curves of {_label(setting)}", fontsize=10)


def fig3(results: Dict[Cell, List[dict]], stem: str, formats: Sequence[str] = ("png", "svg")
         ) -> List[str]:
    """Fig. 3 from the cells' metrics.jsonl (curves averaged over seeds)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    from analysis.ratio_figures import save_figure
    fig = Figure(figsize=(15, 4.4), layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    _panel_sn(axes[0], results)
    _panel_norms(axes[1], results, (8, 32), "b")
    _panel_norms(axes[2], results, (8, 2), "c")
    for ax in axes:
        if ax.lines:
            ax.legend(fontsize=7, loc="lower right")
        else:
            ax.text(0.5, 0.5, "not run", ha="center", va="center", transform=ax.transAxes)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 accuracy (%)")
    fig.suptitle("Learning curves (paper Fig. 3), mean over seeds", fontsize=11)
    return save_figure(fig, stem, formats)


def sn_snapshots(out: str, results: Dict[Cell, List[dict]]) -> list:
    """One ratio snapshot per SN setting (its checkpoint_last.pth; averaged over seeds)."""
    import numpy as np
    from analysis.ratio_figures import RatioSnapshot
    from tools.plot_ratios import load_source
    snaps = []
    for st in SETTINGS:
        cells = sorted((c for c in results if c.norm == "sn" and c.setting == st),
                       key=lambda c: c.seed)
        seeds = [load_source(os.path.join(out, c.folder), _label(st), tensorboard=False).snap
                 for c in cells]
        if seeds:
            ratios = {layer: {stat: np.mean([s.ratios[layer][stat] for s in seeds], axis=0)
                              for stat in ("mean", "var")} for layer in seeds[0].ratios}
            snaps.append(RatioSnapshot(_label(st), ratios, None, seeds[0].infos))
    return snaps


def fig4(out: str, results: Dict[Cell, List[dict]], stem: str,
         formats: Sequence[str] = ("png", "svg")) -> List[str]:
    """Fig. 4 (``analysis.ratio_figures.average_figure``) and its numbers as CSV."""
    from analysis.ratio_figures import NORMALIZERS, average_figure, network_average, save_figure
    snaps = sn_snapshots(out, results)
    if not snaps:
        return []
    fig = average_figure(snaps, "SN's ratios per setting (Fig. 4)")
    files = save_figure(fig, stem, formats)
    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["setting"] + [f"{stat}_{n}" for stat in ("mean", "var")
                                       for n in NORMALIZERS])
        for snap in snaps:
            avg = network_average(snap)
            writer.writerow([snap.label] + [f"{avg[stat][j]:.4f}" for stat in ("mean", "var")
                                             for j in range(len(NORMALIZERS))])
    return files + [stem + ".csv"]


# -- the command ----------------------------------------------------------------------------------
def make_jobs(args, cells: List[Cell], out: str) -> List[Job]:
    """A Job per cell; every cell's config is loaded first, so a bad override fails here."""
    env = None
    if args.jobs > 1 and not args.nproc and "OMP_NUM_THREADS" not in os.environ:
        # N cells at once on C cores: C / N threads each (more is several times slower)
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // args.jobs)))
    jobs = []
    for cell in cells:
        overrides, epochs = cell_overrides(args, cell, out)
        jobs.append(Job(cell, cell_command(args.scale, cell, overrides, args.nproc),
                        os.path.join(out, cell.folder), epochs, env))
    return jobs


def _cell_config(args, cell: Cell, out: str):
    from engine.config import load_config
    return load_config(config_path(args.scale, cell), cell_overrides(args, cell, out)[0])


def data_overrides(args, cell: Cell, out: str) -> List[str]:
    """``data.root`` of the generated dataset the demo configs name (size and variant),
    unless one is given: every cell then reads the same folder."""
    cfg = _cell_config(args, cell, out)
    if cfg.data.dataset != "demo" or cfg.data.root is not None:
        return []
    from data.demo import default_demo_root
    return [f"data.root={default_demo_root(cfg.data.demo_size, cfg.data.demo_variant)}"]


def prepare_data(args, job: Job):
    """Generate the demo dataset once, before any cell starts (not inside the first one)."""
    cfg = _cell_config(args, job.cell, os.path.dirname(job.run_dir))
    if cfg.data.dataset == "demo":
        from data import ensure_demo_dataset
        root = ensure_demo_dataset(cfg.data.root, cfg.data.demo_size,
                                   variant=cfg.data.demo_variant)
        print(f"demo dataset ({cfg.data.demo_variant}): {root}", flush=True)


def _summary(job: Job, earlier: bool) -> str:
    rows = read_metrics(job.run_dir)
    seconds = stored_seconds(job.run_dir)
    took = f" in {_hms(seconds)}" if seconds else ""
    return f"{'finished earlier: ' if earlier else ''}top-1 {rows[-1]['val_top1']:.2f}%{took}"


def train_grid(args, jobs: List[Job], out: str) -> int:
    """Run the unfinished cells; 0 when all finished, 1 when one failed, 130 interrupted."""
    finished = [j for j in jobs if is_finished(j.run_dir, j.epochs)]
    todo = [j for j in jobs if j not in finished]
    eta = Eta()
    for job in finished:
        eta.add(job.cell, job.epochs, stored_seconds(job.run_dir))
    print(f"{len(jobs)} cells, {len(finished)} finished earlier, {args.jobs} at a time -> {out} "
          f"(each cell's trainer output: {out}/<cell>/train.log)", flush=True)
    runner = Runner(todo, args.jobs, eta, 0, len(jobs))
    for job in finished:
        runner.progress(job.cell, _summary(job, True))
    if todo:
        prepare_data(args, todo[0])
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        runner.run()
    except KeyboardInterrupt:
        print("stopped; the cells saved their checkpoints: run the same command to resume",
              flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    if runner.failed:
        print(f"{len(runner.failed)} cell(s) failed: {', '.join(c.folder for c in runner.failed)}")
    return 1 if runner.failed else 0


def _about(args, jobs: List[Job], argv: Sequence[str]) -> str:
    """The protocol of the grid in one paragraph (from its first cell's config)."""
    cfg = _cell_config(args, jobs[0].cell, os.path.dirname(jobs[0].run_dir))
    sched = cfg.schedule
    steps = ", ".join(f"{m:g}" for m in sched.milestones)
    warmup = f", {sched.warmup_epochs:g} epoch(s) of warm-up" if sched.warmup_epochs else ""
    return (f"Scale `{args.scale}`: `{CONFIGS[args.scale]}`, {cfg.model.name} (width "
            f"{cfg.model.width}), {'/'.join(sorted({str(j.epochs) for j in jobs}))} epochs, "
            f"lr {cfg.optim.base_lr:g} per {cfg.optim.reference_batch} samples scaled by the "
            f"total batch{warmup}, {sched.name} schedule (x{sched.gamma:g} at epochs {steps}), "
            f"weight decay {cfg.optim.weight_decay:g}. Command: `python "
            f"tools/reproduce_table2.py {subprocess.list2cmdline(list(argv))}`.")


def report(out: str, jobs: List[Job], about: str) -> List[str]:
    """Table 2, Fig. 3 and Fig. 4 from the finished cells; prints the table."""
    os.makedirs(out, exist_ok=True)
    results = collect(out, {j.cell: j.epochs for j in jobs})
    table = table_rows(results)
    files = write_tables(out, table, about)
    files += fig3(results, os.path.join(out, "fig3_curves"))
    files += fig4(out, results, os.path.join(out, "fig4_ratios"))
    print(format_console(table, f"Table 2: top-1 (%) of {len(results)} finished run(s), "
                                f"the paper's below each row"))
    print("wrote " + ", ".join(os.path.relpath(f, out) for f in files) + f" in {out}")
    return files


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--scale", choices=tuple(CONFIGS), default="demo",
                    help="demo: configs/demo/table2 (CPU); imagenet: configs/imagenet/table2")
    ap.add_argument("--cells", default="all", help="comma list: all, bn, 8x2, sn:8x2, ... "
                    "(default all: the 26 cells of Table 2)")
    ap.add_argument("--seeds", default="0", help="seeds of every cell (default 0)")
    ap.add_argument("--extra-seeds", action="append", metavar="CELLS=SEEDS",
                    help="more seeds for some cells, e.g. 8x32,8x2=1 (the demo default; the "
                    "imagenet default is none; --extra-seeds= for none); repeatable")
    ap.add_argument("--out", help="run folder of the grid (default runs/table2_<scale>)")
    ap.add_argument("--epochs", type=int, help="epochs of every cell (default: the configs'); "
                    "the step epochs follow at 30/60/90%%")
    ap.add_argument("--nproc", type=int, default=0, help="run each cell under torchrun with "
                    "this many processes (reduced to a divisor of its #GPUs); 0: one process")
    ap.add_argument("--jobs", type=int, help="cells trained at once, each with cores/jobs "
                    "threads unless OMP_NUM_THREADS is set (default: 2 at the demo scale on 2+ "
                    "cores, else 1)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    ap.add_argument("--report-only", action="store_true",
                    help="only write the tables and figures of the finished cells")
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="config overrides for every cell, e.g. data.root=/data/imagenet")
    return ap.parse_args(argv)


def _check(args):
    for name, low in (("epochs", 1), ("nproc", 0), ("jobs", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise ValueError(f"--{name}: must be >= {low}, got {value}")
    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ValueError(f"overrides must be key=value, got {bad[0]!r}")


def run(args, argv: Sequence[str]) -> int:
    if args.jobs is None:
        args.jobs = 2 if args.scale == "demo" and (os.cpu_count() or 1) >= 2 and \
            not args.nproc else 1
    _check(args)
    out = os.path.abspath(args.out or os.path.join(ROOT, "runs", f"table2_{args.scale}"))
    extra = args.extra_seeds if args.extra_seeds is not None else \
        [DEFAULT_EXTRA_SEEDS[args.scale]]
    cells = plan(args.cells, args.seeds, extra)
    args.overrides = list(args.overrides) + data_overrides(args, cells[0], out)
    jobs = make_jobs(args, cells, out)
    if args.dry_run:
        for job in jobs:
            done = "  # finished: skipped" if is_finished(job.run_dir, job.epochs) else ""
            print(subprocess.list2cmdline(job.command) + done)
        return 0
    status = 0 if args.report_only else train_grid(args, jobs, out)
    report(out, jobs, _about(args, jobs, argv))
    return status


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from engine.cli import run_cli
    return run_cli(lambda: run(args, argv))


if __name__ == "__main__":
    sys.exit(main())
