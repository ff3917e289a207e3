#!/usr/bin/env python
"""Reproduce the paper's Table 2, Fig. 3 and Fig. 4 (Luo et al., Sec. 4.1) with the real trainer.

    python tools/reproduce_table2.py                               # demo scale, 2-core CPU
    python tools/reproduce_table2.py --cells bn:8x32,sn:8x2 --seeds 0,1 --epochs 10
    python tools/reproduce_table2.py --dry-run                     # print the commands only
    python tools/reproduce_table2.py --scale imagenet --nproc 8 data.root=/data/imagenet

The grid is Table 2's: norms BN, GN, SN x settings (#GPUs, #samples per GPU)
(8,32) (8,16) (8,8) (8,4) (8,2) (1,16) (1,32) (8,1) (1,8); BN is left out at
(8,1) (it does not converge; name ``bn:8x1`` in --cells to run it anyway) and SN
runs without its BN branch there, as in the paper. At the demo scale the cells
the paper's claims rest on (BN, GN, SN at (8,32), (8,8), (8,2), (1,16)) run with
seeds 0, 1, 2 (and 3, 4 at (8,32), where the seeds spread most) and the others with
seed 0: 56 runs. Every cell is one
``python train.py --config CONFIG key=value ...`` (or ``torchrun
--nproc_per_node=K train.py ...`` with --nproc K, K reduced to a divisor of the
cell's #GPUs), in its own run folder ``--out/<norm>_<G>x<n>_s<seed>``, with the
trainer's console output in ``train.log`` there. CONFIG is
``configs/demo/table2/resnet18_<norm>_<G>x<n>.yaml`` (--scale demo) or
``configs/imagenet/table2/resnet50_<norm>_<G>x<n>.yaml`` (--scale imagenet);
trailing ``key=value`` overrides (``data.root=...``) go to every cell. At the demo
scale every cell reads one generated dataset (made before the first cell starts)
with 200 validation images per class.

A cell whose metrics.jsonl holds all its epochs is skipped; any other cell is
(re)started with the same output_dir, so the trainer resumes it from
checkpoint_last.pth. Ctrl-C or SIGTERM asks the running cells to save and stop:
run the same command to continue. One progress line per cell with its wall and
CPU time (user + system of the trainer and its workers), and the ETA of the rest:
per-cell times of finished runs of the same cell, else times measured for this
recipe (scaled by how fast this machine ran the finished cells), laid out on the
``--jobs`` slots.

Written to --out: ``table2.md`` and ``table2.csv`` (the paper's layout: rows BN,
GN, SN, GN-BN, SN-BN, SN-GN, a column per setting; per cell the number of seeds
and the mean, min and max over them of each run's validation top-1 (the mean of
its last ``--last-epochs`` epochs); the differences taken seed by seed; the
paper's numbers), ``table2_runs.csv`` (every run's numbers and wall/CPU time),
``fig3_curves.{png,svg}`` (Fig. 3: SN's validation curves per setting; train
and validation curves of BN, GN, SN at (8,32) and (8,2); the seeds' range
shaded), ``fig4_ratios.{png,svg,csv}`` (Fig. 4: SN's importance ratios of IN,
LN, BN averaged over its layers, for the mean and the variance, per setting,
with every seed) and ``fig4_layers.{png,svg,csv}`` (the same ratios layer by
layer, per setting, from each run's checkpoint_last.pth).
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

__all__ = ["Cell", "NORMS", "SETTINGS", "CLAIM_SETTINGS", "PAPER_TABLE2", "Stat", "parse_cells",
           "plan", "cell_command", "is_finished", "collect", "run_top1", "table_rows",
           "paired", "write_tables", "write_runs", "Eta", "schedule_seconds", "fig3", "fig4",
           "fig_layers", "main"]

NORMS = ("bn", "gn", "sn")
SETTINGS: Tuple[Tuple[int, int], ...] = ((8, 32), (8, 16), (8, 8), (8, 4), (8, 2), (1, 16),
                                         (1, 32), (8, 1), (1, 8))
LEFT_OUT = {("bn", (8, 1))}  # BN does not converge with one sample per GPU (Table 2: "-")
ROWS = ("BN", "GN", "SN", "GN-BN", "SN-BN", "SN-GN")
CONFIGS = {"demo": "configs/demo/table2/resnet18_{norm}_{g}x{n}.yaml",
           "imagenet": "configs/imagenet/table2/resnet50_{norm}_{g}x{n}.yaml"}
#: The settings whose cells carry the paper's claims (SN-BN at small and large per-GPU batches,
#: BN's fall and GN's flat row): their cells get more seeds at the demo scale.
CLAIM_SETTINGS = ((8, 32), (8, 8), (8, 2), (1, 16))
#: ``--extra-seeds`` by default: 3 seeds in those cells, 5 at (8, 32), whose 143 steps leave
#: a run's top-1 anywhere in a range of 14-26 points (docs/table2_demo/recipe.md).
DEFAULT_EXTRA_SEEDS = {"demo": ("8x32,8x8,8x2,1x16=1,2", "8x32=3,4"), "imagenet": ()}
#: Validation images per class of the generated dataset of the demo grid (10 classes).
VAL_PER_CLASS = 200
#: Wall seconds per epoch of each cell at the demo scale, as the default grid ran on this
#: project's 2-core machine (--jobs 2, one thread a cell; docs/table2_demo/table2_runs.csv,
#: the mean over seeds); the ETA uses them until cells of the same norm and setting finish,
#: scaled by how fast the finished cells ran against them.
MEASURED_EPOCH_SECONDS: Dict[str, Dict[Tuple[str, Tuple[int, int]], float]] = {"demo": {
    ("bn", (8, 32)): 9.7, ("gn", (8, 32)): 8.9, ("sn", (8, 32)): 11.1,
    ("bn", (8, 16)): 10.6, ("gn", (8, 16)): 9.3, ("sn", (8, 16)): 12.1,
    ("bn", (8, 8)): 11.7, ("gn", (8, 8)): 9.8, ("sn", (8, 8)): 13.4,
    ("bn", (8, 4)): 13.4, ("gn", (8, 4)): 10.3, ("sn", (8, 4)): 16.7,
    ("bn", (8, 2)): 18.8, ("gn", (8, 2)): 13.1, ("sn", (8, 2)): 23.5,
    ("bn", (1, 16)): 14.0, ("gn", (1, 16)): 13.7, ("sn", (1, 16)): 23.1,
    ("bn", (1, 32)): 11.8, ("gn", (1, 32)): 11.1, ("sn", (1, 32)): 16.9,
    ("gn", (8, 1)): 18.3, ("sn", (8, 1)): 27.6,
    ("bn", (1, 8)): 18.4, ("gn", (1, 8)): 17.9, ("sn", (1, 8)): 34.2}}

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
    cpu: float = 0.0  # user + system seconds of the cell's process tree, once it ended


def _hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, m, s = seconds // 3600, seconds // 60 % 60, seconds % 60
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _timing_path(run_dir: str) -> str:
    return os.path.join(run_dir, "reproduce_table2.json")


def stored_timing(run_dir: str) -> dict:
    """What this tool has spent on a cell so far (over all invocations): ``seconds`` (wall)
    and ``cpu_seconds`` (user + system of the trainer and its workers); {} when nothing."""
    try:
        with open(_timing_path(run_dir)) as f:
            timing = json.load(f)
    except (OSError, ValueError):
        return {}
    return timing if isinstance(timing, dict) else {}


def stored_seconds(run_dir: str) -> float:
    """Wall seconds this tool has spent on a cell so far (over all invocations)."""
    try:
        return float(stored_timing(run_dir).get("seconds", 0.0))
    except (TypeError, ValueError):
        return 0.0


class Eta:
    """Predicts a cell's wall time: the mean seconds per epoch of finished runs of the same
    norm and setting (other seeds); else ``prior`` (seconds per epoch measured for that
    norm and setting) scaled by how fast the finished cells ran against their priors; else
    seconds per epoch = a + b / batch (per-sample work plus per-iteration overhead) fitted
    to the finished cells by least squares (with one batch size measured, the
    per-iteration part is taken as the work of 32 samples)."""

    def __init__(self, prior: Optional[Dict[Tuple[str, Tuple[int, int]], float]] = None):
        self.prior = dict(prior or {})
        self.samples: List[Tuple[Cell, float]] = []  # (cell, seconds per epoch)

    def add(self, cell: Cell, epochs: int, seconds: float):
        if seconds > 0 and epochs > 0:
            self.samples.append((cell, seconds / epochs))

    def _speed(self) -> float:
        """Measured over prior seconds of the finished cells that have a prior (1: none)."""
        pairs = [(s, self.prior[(c.norm, c.setting)]) for c, s in self.samples
                 if (c.norm, c.setting) in self.prior]
        return sum(s for s, _ in pairs) / sum(p for _, p in pairs) if pairs else 1.0

    def _coefficients(self) -> Optional[Tuple[float, float]]:
        if not self.samples:
            return None
        points = [(1.0 / c.batch, s) for c, s in self.samples]
        xs, ys = zip(*points)
        if len(set(xs)) > 1:
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            b = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
            a = my - b * mx
            if a > 0 and b >= 0:
                return a, b
        scale = sum(y / (1 + 32 * x) for x, y in points) / len(points)
        return scale, 32 * scale

    def predict(self, cell: Cell, epochs: int) -> Optional[float]:
        same = [s for c, s in self.samples if (c.norm, c.setting) == (cell.norm, cell.setting)]
        if same:
            return epochs * sum(same) / len(same)
        if (cell.norm, cell.setting) in self.prior:
            return epochs * self.prior[(cell.norm, cell.setting)] * self._speed()
        coef = self._coefficients()
        return None if coef is None else epochs * (coef[0] + coef[1] / cell.batch)


def schedule_seconds(running: Sequence[float], pending: Sequence[float], parallel: int) -> float:
    """Wall time until the last job ends: ``running`` jobs' remaining seconds, then the
    ``pending`` ones in order, each on the first of ``parallel`` slots to come free."""
    slots = sorted(list(running) + [0.0] * max(0, parallel - len(running)))
    for seconds in pending:
        slots[0] += seconds
        slots.sort()
    return max(slots) if slots else 0.0


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


def _reaped(job: Job, block: bool = False) -> bool:
    """Whether the cell's process has ended (then its exit status and CPU time are set).
    ``os.wait4`` rather than ``Popen.poll``: its usage covers the trainer and every worker
    process it waited for (DataLoader workers, torchrun's ranks)."""
    if job.proc.returncode is not None:
        return True
    try:
        pid, status, usage = os.wait4(job.proc.pid, 0 if block else os.WNOHANG)
    except ChildProcessError:  # reaped elsewhere: no usage to read
        job.proc.poll()
        return job.proc.returncode is not None
    if pid == 0:
        return False
    job.proc.returncode = os.waitstatus_to_exitcode(status)
    job.cpu = usage.ru_utime + usage.ru_stime
    return True


def _finish(job: Job) -> Tuple[float, float]:
    """Close the job's log, add its wall and CPU time to the cell's record; returns the
    totals (seconds, cpu_seconds)."""
    job.log.close()
    before = stored_timing(job.run_dir)
    seconds = float(before.get("seconds", 0.0)) + time.time() - job.started
    cpu = float(before.get("cpu_seconds", 0.0)) + job.cpu
    with open(_timing_path(job.run_dir), "w") as f:
        json.dump({"seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
                   "epochs": job.epochs, "exit": job.proc.returncode, "command": job.command},
                  f, indent=1)
    return seconds, cpu


def _last_line(run_dir: str) -> str:
    """The last error-looking (else last) line of a cell's train.log."""
    try:
        with open(os.path.join(run_dir, "train.log"), errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith(("error:", "Traceback")) or "Error" in line]
    return (errors or lines or [""])[-1][:200]


def _took(seconds: float, cpu: float) -> str:
    return f"{_hms(seconds)}" + (f" (CPU {_hms(cpu)})" if cpu else "")


def _outcome(job: Job, seconds: float, cpu: float) -> Tuple[bool, str]:
    rows = read_metrics(job.run_dir)
    if is_finished(job.run_dir, job.epochs):
        best = max(r["val_top1"] for r in rows if "val_top1" in r)
        return True, f"top-1 {rows[-1]['val_top1']:.2f}% (best {best:.2f}%) in " \
                     f"{_took(seconds, cpu)}"
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
        self.spent = [0.0, 0.0]  # wall and CPU seconds of the cells run by this invocation

    def remaining_seconds(self) -> Optional[float]:
        """The rest of the grid's wall time: predicted cell times laid out on the slots."""
        now = time.time()
        running, pending = [], []
        for job in self.running + self.pending:
            guess = self.eta.predict(job.cell, job.epochs)
            if guess is None:
                return None
            if job in self.running:
                running.append(max(0.0, guess - (now - job.started)))
            else:
                pending.append(guess)
        return schedule_seconds(running, pending, self.parallel)

    def progress(self, cell: Cell, text: str):
        self.done += 1
        left = self.remaining_seconds() if self.pending or self.running else 0.0
        eta = "ETA ?" if left is None else f"ETA {_hms(left)}" if left else "grid done"
        print(f"[{self.done:>{len(str(self.total))}}/{self.total}] {cell.name:<8} seed "
              f"{cell.seed}: {text} | {eta}", flush=True)

    def _reap(self):
        for job in [j for j in self.running if _reaped(j)]:
            self.running.remove(job)
            seconds, cpu = _finish(job)
            self.spent[0] += time.time() - job.started
            self.spent[1] += job.cpu
            ok, text = _outcome(job, seconds, cpu)
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
                    if not _reaped(job):
                        os.killpg(job.proc.pid, signum)
                for job in list(self.running):
                    _reaped(job, block=True)
                    _finish(job)
                    self.running.remove(job)
            except KeyboardInterrupt:
                signum = signal.SIGKILL
            except ProcessLookupError:
                continue


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


# -- Table 2 --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stat:
    """One entry of the table: a value per seed (a cell's top-1, or a paired difference)."""

    values: Tuple[float, ...]
    seeds: Tuple[int, ...]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values)

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def max(self) -> float:
        return max(self.values)

    @property
    def sd(self) -> Optional[float]:
        """Sample standard deviation over the seeds (None with one seed)."""
        if self.n < 2:
            return None
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (self.n - 1))


def collect(out: str, epochs: Dict[Cell, int]) -> Dict[Cell, List[dict]]:
    """The metrics rows of every finished cell."""
    return {cell: read_metrics(os.path.join(out, cell.folder)) for cell, n in epochs.items()
            if is_finished(os.path.join(out, cell.folder), n)}


def run_top1(rows: Sequence[dict], last: int = 1) -> float:
    """A run's result: validation top-1 averaged over its last ``last`` validated epochs."""
    validated = [float(r["val_top1"]) for r in rows if "val_top1" in r][-last:]
    return sum(validated) / len(validated)


def cell_results(results: Dict[Cell, List[dict]], last: int = 1
                 ) -> Dict[Tuple[str, Tuple[int, int]], Dict[int, float]]:
    """``{(norm, setting): {seed: top-1}}`` of the finished runs."""
    per: Dict[Tuple[str, Tuple[int, int]], Dict[int, float]] = {}
    for cell, rows in results.items():
        per.setdefault((cell.norm, cell.setting), {})[cell.seed] = run_top1(rows, last)
    return per


def _stat(by_seed: Dict[int, float]) -> Optional[Stat]:
    seeds = tuple(sorted(by_seed))
    return Stat(tuple(by_seed[s] for s in seeds), seeds) if seeds else None


def paired(a: Dict[int, float], b: Dict[int, float]) -> Optional[Stat]:
    """``a - b`` seed by seed, over the seeds both have (a seed only one has is left out)."""
    return _stat({s: a[s] - b[s] for s in a if s in b})


def table_rows(results: Dict[Cell, List[dict]], last: int = 1
               ) -> Dict[str, List[Optional[Stat]]]:
    """Table 2's rows: per setting, each norm's top-1 over its seeds, and the differences
    GN-BN, SN-BN, SN-GN taken seed by seed (paired: same seed, same data order)."""
    per = cell_results(results, last)
    table = {norm.upper(): [_stat(per.get((norm, st), {})) for st in SETTINGS]
             for norm in NORMS}
    for row in ROWS[len(NORMS):]:
        a, b = (x.lower() for x in row.split("-"))
        table[row] = [paired(per.get((a, st), {}), per.get((b, st), {})) for st in SETTINGS]
    return table


def _fmt(stat: Optional[Stat]) -> str:
    """``mean [min, max] xN`` (``mean x1`` for one seed); ``-`` when not run."""
    if stat is None:
        return "-"
    spread = f" [{stat.min:.1f}, {stat.max:.1f}]" if stat.n > 1 else ""
    return f"{stat.mean:.1f}{spread} \u00d7{stat.n}"


def _paper(row: str, j: int) -> str:
    value = PAPER_TABLE2[row][j]
    return "-" if value is None else f"{value:.1f}"


def _measure(last: int) -> str:
    return "last epoch" if last == 1 else f"mean of the last {last} epochs"


def format_console(table: Dict[str, List[Optional[Stat]]], title: str) -> str:
    """The measured table (``mean [min, max] xN``) with the paper's number below each row."""
    head = [_label(st) for st in SETTINGS]
    cells = {row: [_fmt(s) for s in table[row]] for row in ROWS}
    width = max(7, *(len(t) for row in cells.values() for t in row))
    lines = [title, " " * 8 + "".join(f"{h:>{width + 2}}" for h in head)]
    for row in ROWS:
        lines.append(f"{row:<8}" + "".join(f"{t:>{width + 2}}" for t in cells[row]))
        lines.append(f"{'  paper':<8}" + "".join(f"{_paper(row, j):>{width + 2}}"
                                                  for j in range(len(SETTINGS))))
    return "\n".join(lines)


def format_markdown(table: Dict[str, List[Optional[Stat]]], about: str, last: int = 1,
                    extra: str = "") -> str:
    head = "| | " + " | ".join(_label(st) for st in SETTINGS) + " |"
    rule = "|---|" + "---:|" * len(SETTINGS)
    lines = ["# Table 2, reproduced at small scale", "", about, "",
             f"Top-1 accuracy (%) on the validation set, {_measure(last)} of each run: the mean "
             "over seeds, [the lowest, the highest] seed, and the number of seeds (\u00d7N). "
             "The differences are taken seed by seed (the same seed gives the same "
             "initialisation and data order to both normalizers) over the seeds both cells "
             "have: their mean, [min, max] and count. `-`: not run.", "", head, rule]
    for row in ROWS:
        lines.append(f"| {row} | " + " | ".join(_fmt(s) for s in table[row]) + " |")
    lines += ["", "The paper's Table 2 (ResNet-50 on ImageNet, 100 epochs; `-`: BN does not "
              "converge at (8,1)):", "", head, rule]
    for row in ROWS:
        lines.append(f"| {row} | " + " | ".join(_paper(row, j) for j in range(len(SETTINGS)))
                     + " |")
    return "\n".join(lines) + "\n" + (f"\n{extra}" if extra else "")


def write_tables(out: str, table: Dict[str, List[Optional[Stat]]], about: str, last: int = 1,
                 extra: str = "") -> List[str]:
    """table2.md and table2.csv (rows x settings; statistics seeds, mean, min, max, sd, paper)."""
    md, path_csv = os.path.join(out, "table2.md"), os.path.join(out, "table2.csv")
    with open(md, "w") as f:
        f.write(format_markdown(table, about, last, extra))
    with open(path_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "statistic"] + [_label(st) for st in SETTINGS])
        for row in ROWS:
            stats = table[row]
            writer.writerow([row, "seeds"] + [s.n if s else "" for s in stats])
            for name in ("mean", "min", "max", "sd"):
                writer.writerow([row, name] + [_num(s and getattr(s, name), 3) for s in stats])
            writer.writerow([row, "paper"] + [_num(v, 1) for v in PAPER_TABLE2[row]])
    return [md, path_csv]


def write_runs(out: str, results: Dict[Cell, List[dict]], last: int) -> str:
    """table2_runs.csv: every finished run's numbers (the table's inputs) and its cost."""
    path = os.path.join(out, "table2_runs.csv")
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["norm", "setting", "seed", "epochs", "top1_final", f"top1_last{last}",
                         "top1_best", "wall_seconds", "cpu_seconds"])
        for cell in sorted(results, key=lambda c: (SETTINGS.index(c.setting),
                                                   NORMS.index(c.norm), c.seed)):
            rows, timing = results[cell], stored_timing(os.path.join(out, cell.folder))
            writer.writerow([cell.norm, _label(cell.setting), cell.seed, len(rows),
                             _num(run_top1(rows, 1), 2), _num(run_top1(rows, last), 2),
                             _num(max(float(r["val_top1"]) for r in rows if "val_top1" in r), 2),
                             _num(timing.get("seconds"), 1), _num(timing.get("cpu_seconds"), 1)])
    return path


def _num(value: Optional[float], digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


# -- Fig. 3 and Fig. 4 ----------------------------------------------------------------------------
NORM_COLORS = {"bn": "#2ca02c", "gn": "#1f77b4", "sn": "#d62728"}
RATIO_STATS = (("mean", "\u03bc (mean)"), ("var", "\u03c3 (variance)"))


def curve_band(runs: Sequence[List[dict]], key: str
               ) -> Tuple[List[int], List[float], List[float], List[float]]:
    """(epochs counted from 1, mean, min, max of ``key`` over the runs) where every run has
    it."""
    per_epoch: Dict[int, List[float]] = {}
    for rows in runs:
        for row in rows:
            if key in row:
                per_epoch.setdefault(row["epoch"], []).append(float(row[key]))
    epochs = [e for e in sorted(per_epoch) if len(per_epoch[e]) == len(runs)]
    return (epochs, [sum(per_epoch[e]) / len(runs) for e in epochs],
            [min(per_epoch[e]) for e in epochs], [max(per_epoch[e]) for e in epochs])


def mean_curve(runs: Sequence[List[dict]], key: str) -> Tuple[List[int], List[float]]:
    """(epochs counted from 1, ``key`` averaged over the runs) where every run has it."""
    return curve_band(runs, key)[:2]


def _runs_of(results: Dict[Cell, List[dict]], norm: str, setting) -> List[List[dict]]:
    return [rows for cell, rows in results.items()
            if cell.norm == norm and cell.setting == tuple(setting)]


def _band(ax, runs: Sequence[List[dict]], key: str, style: str, color, label: str):
    """The mean over seeds as a line, the seeds' min-max as a shaded band (2+ seeds)."""
    epochs, mean, low, high = curve_band(runs, key)
    ax.plot(epochs, mean, style, color=color, label=f"{label} (\u00d7{len(runs)})")
    if len(runs) > 1:
        ax.fill_between(epochs, low, high, color=color, alpha=0.15, linewidth=0)


def _panel_sn(ax, results: Dict[Cell, List[dict]]):
    """Fig. 3 (a): SN's validation curves, one per setting."""
    import matplotlib
    cmap = matplotlib.colormaps["viridis"]
    for j, st in enumerate(SETTINGS):
        runs = _runs_of(results, "sn", st)
        if runs:
            _band(ax, runs, "val_top1", "-", cmap(j / (len(SETTINGS) - 1)), f"SN {_label(st)}")
    ax.set_title("(a) validation curves of SN", fontsize=10)


def _panel_norms(ax, results: Dict[Cell, List[dict]], setting: Tuple[int, int], tag: str):
    """Fig. 3 (b)/(c): train (dashed) and validation (solid) top-1 of BN, GN, SN."""
    for norm in NORMS:
        runs = _runs_of(results, norm, setting)
        if runs:
            color, name = NORM_COLORS[norm], norm.upper()
            ax.plot(*mean_curve(runs, "train_top1"), "--", color=color, label=f"{name} train")
            _band(ax, runs, "val_top1", "-", color, f"{name} val")
    ax.set_title(f"({tag}) train and validation curves of {_label(setting)}", fontsize=10)


def fig3(results: Dict[Cell, List[dict]], stem: str, formats: Sequence[str] = ("png", "svg")
         ) -> List[str]:
    """Fig. 3 from the cells' metrics.jsonl: mean over seeds, the seeds' range shaded."""
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
    fig.suptitle("Learning curves (paper Fig. 3): mean over seeds (\u00d7N), shaded from the "
                 "lowest to the highest seed", fontsize=11)
    return save_figure(fig, stem, formats)


def sn_ratios(out: str, results: Dict[Cell, List[dict]]
              ) -> Dict[Tuple[int, int], List[Tuple[int, object]]]:
    """``{setting: [(seed, RatioSnapshot of its checkpoint_last.pth), ...]}`` of the SN runs."""
    from tools.plot_ratios import load_source
    snaps: Dict[Tuple[int, int], List[Tuple[int, object]]] = {}
    for st in SETTINGS:
        for cell in sorted((c for c in results if c.norm == "sn" and c.setting == st),
                           key=lambda c: c.seed):
            source = load_source(os.path.join(out, cell.folder), _label(st), tensorboard=False)
            snaps.setdefault(st, []).append((cell.seed, source.snap))
    return snaps


def _averages(seeds: Sequence[Tuple[int, object]]):
    """Network-averaged ratios per seed: array (seeds, 2 statistics, 3 normalizers)."""
    import numpy as np
    from analysis.ratio_figures import network_average
    return np.array([[network_average(snap)[stat] for stat, _ in RATIO_STATS]
                     for _, snap in seeds])


def fig4(out: str, results: Dict[Cell, List[dict]], stem: str,
         formats: Sequence[str] = ("png", "svg"), ratios=None) -> List[str]:
    """Fig. 4 (SN's ratios averaged over its layers, per setting: the mean over seeds as
    bars, every seed as a dot, their range as an error bar) and its numbers as CSV."""
    import numpy as np
    from matplotlib.figure import Figure
    from analysis.ratio_figures import COLORS, NORMALIZERS, save_figure
    ratios = sn_ratios(out, results) if ratios is None else ratios
    if not ratios:
        return []
    settings = list(ratios)
    fig = Figure(figsize=(max(6.0, 2.0 + 1.1 * len(settings)), 7.0), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    width = 0.8 / len(NORMALIZERS)
    for i, (ax, (_, stat_label)) in enumerate(zip(axes, RATIO_STATS)):
        for g, st in enumerate(settings):
            values = _averages(ratios[st])[:, i, :]  # (seeds, normalizers)
            for j, norm in enumerate(NORMALIZERS):
                x, v = g + (j - 1) * width, values[:, j]
                ax.bar(x, v.mean(), width * 0.95, color=COLORS[norm], alpha=0.85)
                if len(v) > 1:
                    ax.errorbar(x, v.mean(), yerr=[[v.mean() - v.min()], [v.max() - v.mean()]],
                                color="black", capsize=2, lw=0.8)
                    ax.plot([x] * len(v), v, ".", color="black", markersize=3)
                ax.text(x, v.max() + 0.015, f"{v.mean():.2f}", ha="center", va="bottom",
                        fontsize=6)
        ax.axhline(1 / 3, color="0.4", lw=0.8, ls=":")
        ax.set_title(f"importance weights of {stat_label}", fontsize=10)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("ratio averaged over SN layers")
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xticks(range(len(settings)))
    axes[1].set_xticklabels([f"{_label(st)} \u00d7{len(ratios[st])}" for st in settings])
    from matplotlib.patches import Patch
    axes[0].legend(handles=[Patch(color=COLORS[n], label=n.upper()) for n in NORMALIZERS],
                   fontsize=8, loc="upper right")
    fig.suptitle("SN's ratios per setting (Fig. 4), averaged over its layers: bars the mean "
                 "over seeds (\u00d7N), dots the seeds, dotted 1/3", fontsize=10)
    files = save_figure(fig, stem, formats)
    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.writer(f)
        names = [f"{stat}_{n}" for stat, _ in RATIO_STATS for n in NORMALIZERS]
        writer.writerow(["setting", "seeds"] + names + [f"{c}_min" for c in names]
                        + [f"{c}_max" for c in names])
        for st in settings:
            v = _averages(ratios[st]).reshape(len(ratios[st]), -1)
            writer.writerow([_label(st), len(v)] + [f"{x:.4f}" for x in np.concatenate(
                [v.mean(0), v.min(0), v.max(0)])])
    return files + [stem + ".csv"]


def _layer_values(seeds: Sequence[Tuple[int, object]]):
    """(layer names in network order, array (seeds, layers, 2 statistics, 3 normalizers))."""
    import numpy as np
    layers = seeds[0][1].layers
    return layers, np.array([[[snap.ratios[name][stat] for stat, _ in RATIO_STATS]
                              for name in layers] for _, snap in seeds])


def _stage_lines(ax, layers: Sequence[str]):
    stages = [name.split(".")[0] for name in layers]
    for k in range(1, len(stages)):
        if stages[k] != stages[k - 1]:
            ax.axvline(k - 0.5, color="0.6", lw=0.6, ls=":")


def fig_layers(ratios, stem: str, formats: Sequence[str] = ("png", "svg")) -> List[str]:
    """SN's ratios layer by layer, a row per setting (mu left, sigma right): each
    normalizer's share per layer, the mean over seeds as a line and their range shaded;
    fig4_layers.csv holds every seed's value of every layer."""
    from matplotlib.figure import Figure
    from analysis.ratio_figures import COLORS, NORMALIZERS, save_figure
    if not ratios:
        return []
    settings = list(ratios)
    fig = Figure(figsize=(13, 1.2 + 1.9 * len(settings)), layout="constrained")
    axes = fig.subplots(len(settings), 2, sharex=True, sharey=True, squeeze=False)
    for r, st in enumerate(settings):
        layers, values = _layer_values(ratios[st])
        x = range(len(layers))
        for c, (_, stat_label) in enumerate(RATIO_STATS):
            ax = axes[r][c]
            for j, norm in enumerate(NORMALIZERS):
                v = values[:, :, c, j]
                ax.plot(x, v.mean(0), ".-", color=COLORS[norm], lw=1, markersize=3,
                        label=norm.upper())
                if len(v) > 1:
                    ax.fill_between(x, v.min(0), v.max(0), color=COLORS[norm], alpha=0.2, lw=0)
            ax.axhline(1 / 3, color="0.4", lw=0.6, ls=":")
            _stage_lines(ax, layers)
            ax.set_title(f"{_label(st)} \u00d7{len(values)}: {stat_label}", fontsize=9)
            ax.set_ylim(0, 1)
            ax.grid(axis="y", alpha=0.3)
        axes[r][0].set_ylabel("share")
    for c in range(2):
        axes[-1][c].set_xticks(range(len(layers)))
        axes[-1][c].set_xticklabels(layers, rotation=90, fontsize=6)
    axes[0][1].legend(fontsize=7, loc="upper right", ncol=3)
    fig.suptitle("SN's ratios layer by layer, per setting: the mean over seeds (\u00d7N), "
                 "shaded from the lowest to the highest seed; dotted 1/3", fontsize=10)
    files = save_figure(fig, stem, formats)
    with open(stem + ".csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["setting", "seed", "layer_index", "layer"]
                        + [f"{stat}_{n}" for stat, _ in RATIO_STATS for n in NORMALIZERS])
        for st in settings:
            layers, values = _layer_values(ratios[st])
            for (seed, _), per_layer in zip(ratios[st], values):
                for k, name in enumerate(layers):
                    writer.writerow([_label(st), seed, k, name]
                                    + [f"{v:.4f}" for v in per_layer[k].reshape(-1)])
    return files + [stem + ".csv"]


def spread_markdown(results: Dict[Cell, List[dict]], last: int) -> str:
    """Per cell with 2+ seeds: the seeds' standard deviation and range of the last epoch's
    top-1 and of the mean of the last ``max(last, 2)`` epochs, the evidence for choosing
    the table's measure (``last``)."""
    other = max(last, 2)
    final, averaged = cell_results(results, 1), cell_results(results, other)
    keys = [(n, st) for st in SETTINGS for n in NORMS if len(final.get((n, st), {})) > 1]
    if not keys:
        return ""
    lines = [f"## The last epoch or the mean of the last {other}", "",
             f"The spread over seeds of each cell with 2+ seeds: the standard deviation and "
             f"the range (max - min) of the last epoch's top-1 and of the mean of the last "
             f"{other} epochs (the table's measure: the {_measure(last)}).", "",
             "| cell | seeds | sd, last epoch | sd, last " f"{other} | range, last epoch | "
             f"range, last {other} |", "|---|---:|---:|---:|---:|---:|"]
    sums = [0.0, 0.0]
    for key in keys:
        a, b = _stat(final[key]), _stat(averaged[key])
        sums[0], sums[1] = sums[0] + a.sd, sums[1] + b.sd
        lines.append(f"| {key[0].upper()} {_label(key[1])} | {a.n} | {a.sd:.2f} | {b.sd:.2f} | "
                     f"{a.max - a.min:.2f} | {b.max - b.min:.2f} |")
    lines.append(f"| mean over {len(keys)} cells | | {sums[0] / len(keys):.2f} | "
                 f"{sums[1] / len(keys):.2f} | | |")
    return "\n".join(lines) + "\n"


def layer_ranges_markdown(ratios) -> str:
    """A table of each share's range over SN's layers (seed means) beside its network
    average, per setting: how far the layers move where the averages barely do."""
    from analysis.ratio_figures import NORMALIZERS
    if not ratios:
        return ""
    cols = [(c, j, f"{stat} {n.upper()}") for c, (stat, _) in enumerate(RATIO_STATS)
            for j, n in enumerate(NORMALIZERS)]
    lines = ["## SN's ratios layer by layer", "",
             "Each share's network average (Fig. 4) and, after it, its lowest and highest "
             "value over SN's layers, from the final checkpoints (the mean over seeds of each "
             "layer); every seed's value of every layer is in `fig4_layers.csv`.", "",
             "| setting | " + " | ".join(name for _, _, name in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for st, seeds in ratios.items():
        values = _layer_values(seeds)[1].mean(0)  # (layers, stats, normalizers)
        lines.append(f"| {_label(st)} \u00d7{len(seeds)} | " + " | ".join(
            f"{values[:, c, j].mean():.2f} ({values[:, c, j].min():.2f}\u2013"
            f"{values[:, c, j].max():.2f})" for c, j, _ in cols) + " |")
    return "\n".join(lines) + "\n"


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
    """``data.root`` of the generated dataset the demo configs name (size and variant, with
    VAL_PER_CLASS validation images per class), unless one is given: every cell then reads
    the same folder, generated once by prepare_data."""
    cfg = _cell_config(args, cell, out)
    if cfg.data.dataset != "demo" or cfg.data.root is not None:
        return []
    from data.demo import default_demo_root
    root = default_demo_root(cfg.data.demo_size, cfg.data.demo_variant, VAL_PER_CLASS)
    args.generate_val = VAL_PER_CLASS  # prepare_data makes this folder with that many
    return [f"data.root={root}"]


def prepare_data(args, job: Job):
    """Generate the demo dataset once, before any cell starts (not inside the first one)."""
    cfg = _cell_config(args, job.cell, os.path.dirname(job.run_dir))
    if cfg.data.dataset == "demo":
        from data import ensure_demo_dataset
        root = ensure_demo_dataset(cfg.data.root, cfg.data.demo_size,
                                   variant=cfg.data.demo_variant,
                                   val_per_class=getattr(args, "generate_val", None))
        print(f"demo dataset ({cfg.data.demo_variant}): {root}", flush=True)


def _summary(job: Job, earlier: bool) -> str:
    rows = read_metrics(job.run_dir)
    timing = stored_timing(job.run_dir)
    took = f" in {_took(float(timing['seconds']), float(timing.get('cpu_seconds', 0.0)))}" \
        if timing.get("seconds") else ""
    return f"{'finished earlier: ' if earlier else ''}top-1 {rows[-1]['val_top1']:.2f}%{took}"


def _estimate(eta: Eta, jobs: Sequence[Job], parallel: int) -> str:
    """The grid's predicted wall time before it starts (from measured per-cell times)."""
    guesses = [eta.predict(j.cell, j.epochs) for j in jobs]
    if not jobs or any(g is None for g in guesses):
        return ""
    return f"; estimated {_hms(schedule_seconds([], guesses, parallel))} for the " \
           f"{len(jobs)} to run (per-cell times measured on a 2-core machine, one thread a cell)"


def train_grid(args, jobs: List[Job], out: str) -> int:
    """Run the unfinished cells; 0 when all finished, 1 when one failed, 130 interrupted."""
    finished = [j for j in jobs if is_finished(j.run_dir, j.epochs)]
    todo = [j for j in jobs if j not in finished]
    eta = Eta(MEASURED_EPOCH_SECONDS.get(args.scale) if not args.nproc else None)
    for job in finished:
        eta.add(job.cell, job.epochs, stored_seconds(job.run_dir))
    print(f"{len(jobs)} cells, {len(finished)} finished earlier, {args.jobs} at a time -> {out} "
          f"(each cell's trainer output: {out}/<cell>/train.log){_estimate(eta, todo, args.jobs)}",
          flush=True)
    runner = Runner(todo, args.jobs, eta, 0, len(jobs))
    for job in finished:
        runner.progress(job.cell, _summary(job, True))
    if todo:
        prepare_data(args, todo[0])
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    start = time.time()
    try:
        runner.run()
    except KeyboardInterrupt:
        print("stopped; the cells saved their checkpoints: run the same command to resume",
              flush=True)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    if todo:
        print(f"trained {len(todo)} cell(s) in {_hms(time.time() - start)} wall, "
              f"CPU {_hms(runner.spent[1])} (user + system, all cells)", flush=True)
    if runner.failed:
        print(f"{len(runner.failed)} cell(s) failed: {', '.join(c.folder for c in runner.failed)}")
    return 1 if runner.failed else 0


def _about(args, jobs: List[Job], argv: Sequence[str]) -> str:
    """The protocol of the grid in one paragraph (from its first cell's config)."""
    cfg = _cell_config(args, jobs[0].cell, os.path.dirname(jobs[0].run_dir))
    sched, d = cfg.schedule, cfg.data
    steps = ", ".join(f"{m:g}" for m in sched.milestones)
    warmup = f", {sched.warmup_epochs:g} epoch(s) of warm-up" if sched.warmup_epochs else ""
    data = f"data `{d.dataset}`" + (f" ({d.demo_variant}, {getattr(args, 'generate_val', 0)} "
                                    f"validation images per class)"
                                    if getattr(args, "generate_val", None) else "")
    return (f"Scale `{args.scale}`: `{CONFIGS[args.scale]}`, {cfg.model.name} (width "
            f"{cfg.model.width}, {cfg.model.stem} stem), {d.image_size}-px crops, {data}, "
            f"{'/'.join(sorted({str(j.epochs) for j in jobs}))} epochs, "
            f"lr {cfg.optim.base_lr:g} per {cfg.optim.reference_batch} samples scaled by the "
            f"total batch{warmup}, {sched.name} schedule (x{sched.gamma:g} at epochs {steps}), "
            f"weight decay {cfg.optim.weight_decay:g}. A run's top-1 is the {_measure(args.last)}"
            f". Command: `python tools/reproduce_table2.py {subprocess.list2cmdline(list(argv))}`.")


def report(out: str, jobs: List[Job], about: str, last: int = 1) -> List[str]:
    """Table 2, Fig. 3, Fig. 4 and the per-layer ratios from the finished cells; prints the
    table."""
    os.makedirs(out, exist_ok=True)
    results = collect(out, {j.cell: j.epochs for j in jobs})
    table = table_rows(results, last)
    ratios = sn_ratios(out, results)
    extra = "\n".join(x for x in (spread_markdown(results, last), layer_ranges_markdown(ratios))
                      if x)
    files = write_tables(out, table, about, last, extra)
    files.append(write_runs(out, results, last))
    files += fig3(results, os.path.join(out, "fig3_curves"))
    files += fig4(out, results, os.path.join(out, "fig4_ratios"), ratios=ratios)
    files += fig_layers(ratios, os.path.join(out, "fig4_layers"))
    print(format_console(table, f"Table 2: top-1 (%, {_measure(last)}) of {len(results)} "
                                f"finished run(s), mean [min, max] \u00d7seeds; the paper's "
                                f"below each row"))
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
                    help=f"more seeds for some cells (demo default: "
                    f"{' '.join(DEFAULT_EXTRA_SEEDS['demo'])}: the cells Table 2's claims rest "
                    "on; imagenet default: none; --extra-seeds= for none); repeatable")
    ap.add_argument("--out", help="run folder of the grid (default runs/table2_<scale>)")
    ap.add_argument("--epochs", type=int, help="epochs of every cell (default: the configs'); "
                    "the step epochs keep their fractions of training")
    # the last epoch by default: at the demo scale the mean of the last 2 gave the same
    # spread over seeds (docs/reproducing.md)
    ap.add_argument("--last-epochs", dest="last", type=int, default=1, help="a run's top-1 "
                    "is the mean of its last N validated epochs (default 1: the last epoch; "
                    "table2.md compares its spread with the mean of the last 2)")
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
    for name, low in (("epochs", 1), ("nproc", 0), ("jobs", 1), ("last", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            flag = "last-epochs" if name == "last" else name
            raise ValueError(f"--{flag}: must be >= {low}, got {value}")
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
        list(DEFAULT_EXTRA_SEEDS[args.scale])
    cells = plan(args.cells, args.seeds, extra)
    args.overrides = list(args.overrides) + data_overrides(args, cells[0], out)
    jobs = make_jobs(args, cells, out)
    if args.dry_run:
        for job in jobs:
            done = "  # finished: skipped" if is_finished(job.run_dir, job.epochs) else ""
            print(subprocess.list2cmdline(job.command) + done)
        return 0
    status = 0 if args.report_only else train_grid(args, jobs, out)
    report(out, jobs, _about(args, jobs, argv), args.last)
    return status


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    from engine.cli import run_cli
    return run_cli(lambda: run(args, argv))


if __name__ == "__main__":
    sys.exit(main())
