"""The training loop: data, model, optimizer -> epochs of SGD, validation, checkpoints, logs.

``Trainer(cfg, dist_info).fit()`` runs a resolved config. One process per
device under torchrun (DDP, gloo or NCCL) or a single process; each process
holds ``batch.virtual_gpus`` of the paper's GPUs (ghost batches of
``batch.per_gpu`` samples in every batch-statistics normalizer).

Outputs in ``output_dir``: config.yaml, metrics.jsonl (one object per epoch),
checkpoint_last.pth / checkpoint_best.pth (atomic, checksummed), TensorBoard
events in tb/. Restarting with the same output_dir resumes from
checkpoint_last.pth when the config is the same (engine.runfolder), mid-epoch
included (sampler position, every rank's RNG state and running meters).

SIGTERM (to the trainer, or to its whole process group as torchrun, SLURM and
job control send it; the DataLoader workers ignore it) is noted and acted on at
the next iteration: every rank saves that iteration and the run exits 0.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import time
from contextlib import nullcontext
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import normalization
from data import build_loader, ensure_demo_dataset
from models import build_model

from .checkpoint import (FORMAT, CheckpointError, load_checkpoint, remove_stale_temporaries,
                         save_checkpoint)
from .config import Config, config_fingerprint, format_config, to_dict
from .distributed import (DistInfo, all_gather_floats, all_reduce_max, all_reduce_sum,
                          average_running_stats, broadcast_flag, gather_rng_states, set_rng_state,
                          thread_oversubscription)
from .host_memory import keep_freed_memory
from .optim import build_optimizer, build_scheduler, clip_gradients
from .runfolder import RunFolder, check_free_space, inspect_run_folder, naming, write_text

__all__ = ["Trainer", "evaluate", "model_from_config", "NonFiniteLossError", "set_determinism"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def set_determinism(seed: int, deterministic: bool):
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True


def model_from_config(cfg: Config) -> nn.Module:
    """The model of ``cfg.model`` with the batch setting's ghost batches (virtual GPUs)."""
    m = cfg.model
    kwargs = dict(m.norm_kwargs)
    if m.norm in normalization.BATCH_STAT_NAMES and cfg.batch.virtual_gpus:
        # synced normalizers pool every virtual GPU anyway; the others compute statistics
        # per virtual GPU, as the paper's GPUs do
        ghost = None if m.norm in normalization.SYNC_NAMES else cfg.batch.per_gpu
        kwargs.setdefault("ghost_batch_size", ghost)
    return build_model(m.name, m.num_classes, m.norm, kwargs, zero_init_last=m.zero_init_last,
                       dropout=m.dropout, stem=m.stem, width=m.width,
                       input_size=cfg.data.image_size, drop_path_rate=m.drop_path_rate,
                       stem_pool=m.stem_pool)


def _unwrap(model: nn.Module) -> nn.Module:
    model = model.module if isinstance(model, DistributedDataParallel) else model
    return getattr(model, "_orig_mod", model)


@torch.no_grad()
def evaluate(model: nn.Module, loader, device: torch.device, amp: str = "none",
             channels_last: bool = False) -> Dict[str, float]:
    """Single-crop top-1/top-5 over every validation image exactly once (summed over ranks)."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    for images, targets in loader:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with _autocast(device, amp):
            logits = model(images)
        logits = logits.float()
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top5 == targets[:, None]
        sums += torch.stack([F.cross_entropy(logits, targets, reduction="sum").double(),
                             hit[:, 0].sum().double(), hit.any(1).sum().double(),
                             torch.tensor(float(len(targets)), device=device,
                                          dtype=torch.float64)])
    loss, c1, c5, n = all_reduce_sum(sums.tolist(), device)
    n = max(n, 1.0)
    return {"val_loss": loss / n, "val_top1": 100.0 * c1 / n, "val_top5": 100.0 * c5 / n,
            "val_count": int(n), "bad_images": int(all_reduce_sum(
                [float(getattr(loader, "bad_images", 0))], device)[0])}


def _autocast(device: torch.device, amp: str):
    if amp == "none" or device.type != "cuda":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


class _Meters:
    """This rank's sums of the epoch so far (on the device: no synchronisation per step)."""

    def __init__(self, device, state: Optional[List[float]] = None):
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top1, samples
        self.seconds = 0.0
        self.bad = 0
        self.clock = time.perf_counter()
        if state:
            self.sums.copy_(torch.tensor(state[:3], dtype=torch.float64))
            self.seconds, self.bad = state[3], int(state[4])

    def tick(self):
        """Count the time since the last tick in ``seconds``. Ticked at every progress line
        and before every save, so a checkpoint's seconds cover the samples it counts."""
        now = time.perf_counter()
        self.seconds += now - self.clock
        self.clock = now

    def update(self, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor):
        n = targets.numel()
        correct = (logits.argmax(1) == targets).sum()
        self.sums += torch.stack([loss.detach().double() * n, correct.double(),
                                  torch.tensor(float(n), device=self.sums.device,
                                               dtype=torch.float64)])

    def gather(self) -> List[List[float]]:
        """Every rank's ``[loss, top1, samples, seconds, bad]`` (a collective)."""
        return all_gather_floats(self.sums.tolist() + [self.seconds, float(self.bad)],
                                 self.sums.device)

    @staticmethod
    def own(stored, rank: int, world_size: int) -> Optional[List[float]]:
        """This rank's share of the meters stored in a checkpoint. Another world size (or a
        checkpoint that kept rank 0's only): rank 0 takes the sums, the others none."""
        if not stored:
            return None
        if isinstance(stored, dict):  # written before meters were kept per rank
            stored = [stored["sums"] + [stored["seconds"], stored["bad"]]]
        if len(stored) == world_size:
            return list(stored[rank])
        total = [sum(column) for column in zip(*stored)]
        total[3] = max(r[3] for r in stored)
        return total if rank == 0 else [0.0, 0.0, 0.0, total[3], 0.0]


class Trainer:
    """``folder``: what ``output_dir`` holds (``inspect_run_folder(cfg)`` when None); a
    complete run is for the caller to report (train.py), not to build a trainer for."""

    def __init__(self, cfg: Config, info: DistInfo, folder: Optional[RunFolder] = None):
        self.cfg, self.info = cfg, info
        self.device = info.device
        keep_freed_memory(self.device)   # on the CPU: no page faults on every step's buffers
        self.out = cfg.output_dir
        self.started = time.perf_counter()  # the closing summary counts set-up too
        folder = folder or inspect_run_folder(cfg)
        if folder.complete:
            raise ValueError(folder.complete)
        set_determinism(cfg.train.seed, cfg.train.deterministic)
        self._build_data()
        self._build_model()
        self.epoch, self.iter, self.global_step = 0, 0, 0
        self.best_top1, self.best_epoch = 0.0, 0
        self.meters_state: Optional[List[float]] = None
        self.stop_requested = False
        self.history: list = []
        self._resume_or_init(folder)
        self.writer = self._tensorboard()

    # -- construction --------------------------------------------------------------------------
    def _build_data(self):
        cfg, info = self.cfg, self.info
        if cfg.data.dataset == "demo" and cfg.data.root is None:
            cfg.data.root = str(ensure_demo_dataset(None, cfg.data.demo_size,
                                                    variant=cfg.data.demo_variant))
        common = dict(rank=info.rank, world_size=info.world_size, seed=cfg.train.seed,
                      device=self.device)
        self.train_loader = build_loader(cfg.data, "train", cfg.batch.per_process, **common)
        self.val_loader = build_loader(cfg.data, "val", cfg.batch.per_process, **common)
        self.log(self.train_loader.reason)
        if self.train_loader.num_classes != cfg.model.num_classes:
            raise ValueError(f"model.num_classes={cfg.model.num_classes} but the data at "
                             f"{cfg.data.root} has {self.train_loader.num_classes} classes")
        if len(self.train_loader) == 0:
            raise ValueError(f"the training set ({self.train_loader.dataset_size} images) has "
                             f"fewer than one batch of {cfg.batch.per_process} per process")

    def _build_model(self):
        cfg = self.cfg
        torch.manual_seed(cfg.train.seed)
        model = model_from_config(cfg).to(self.device)
        model.set_grad_checkpointing(cfg.train.grad_checkpointing)
        if cfg.train.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.optimizer = build_optimizer(cfg, model)
        normalization.hold_frozen_ratios(model, self.optimizer)  # SSN: frozen ratios stay
        self.scheduler = build_scheduler(cfg, self.optimizer, len(self.train_loader))
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.train.amp == "fp16"
                                           and self.device.type == "cuda")
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)
        net = model
        if self.info.distributed:
            # Each process keeps its own GPUs' statistics: no buffer broadcast before forward.
            # (DDP still syncs the buffers once here, at construction, where every rank holds
            # the same freshly initialised ones; a resumed checkpoint is loaded after.)
            net = DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                forward_sync_buffers=False)
        if cfg.train.compile:
            net = torch.compile(net, backend=cfg.train.compile_backend)
        self.net = net
        self.has_ssn = any(isinstance(m, normalization.SparseSwitchNorm2d)
                           for m in model.modules())

    @property
    def last_path(self) -> str:
        return os.path.join(self.out, "checkpoint_last.pth")

    @property
    def best_path(self) -> str:
        return os.path.join(self.out, "checkpoint_best.pth")

    def _resume_or_init(self, folder: RunFolder):
        cfg = self.cfg
        if folder.state is not None:
            self._load(folder.state, folder.path, forced=bool(folder.forced))
            folder.state = None  # the tensors now live in the model and optimizer
            self.log(f"resumed from {folder.path}: epoch {self.epoch + 1}/{cfg.train.epochs} "
                     f"after iteration {self.iter}/{len(self.train_loader)}")
        elif cfg.checkpoint.init:
            from models.checkpoint import load_weights
            state = load_checkpoint(cfg.checkpoint.init)
            load_weights(self.model, state.get("model", state), cfg.checkpoint.init)
            self.log(f"initialised the weights from {cfg.checkpoint.init}")
        if self.info.main:
            os.makedirs(self.out, exist_ok=True)
            for path in remove_stale_temporaries(self.out):
                self.log(f"removed {path}, left by a checkpoint write that was killed")
            check_free_space(self.out, sum(t.numel() * t.element_size()
                                           for t in self.model.state_dict().values()))
            if folder.forced:
                self._keep_old_config(folder)
            write_text(os.path.join(self.out, "config.yaml"), format_config(cfg))
            self._trim_metrics()

    def _keep_old_config(self, folder: RunFolder):
        """train.resume=force: config.yaml still describes the steps so far; keep it."""
        old = os.path.join(self.out, "config.yaml")
        kept = os.path.join(self.out, f"config.before_step{self.global_step}.yaml")
        if os.path.isfile(old):
            os.replace(old, kept)
        keys = ", ".join(key for key, _, _ in folder.forced)
        self.log(f"train.resume=force: continuing with changed {keys}; the config of the "
                 f"first {self.global_step} iterations is {kept}")

    def _load(self, state: dict, path: str, forced: bool = False):
        from models.checkpoint import load_weights
        load_weights(self.model, state["model"], path)  # one line naming the keys that differ
        fresh = [{k: v for k, v in g.items() if k != "params"}
                 for g in self.optimizer.param_groups]
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            if state.get("scaler"):
                self.scaler.load_state_dict(state["scaler"])
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: the optimizer state does not fit this model's "
                                  f"parameter groups ({str(e).strip().splitlines()[0]})") from None
        if forced:  # this config's hyperparameters, the checkpoint's momentum buffers
            for group, new in zip(self.optimizer.param_groups, fresh):
                group.update(new)
            self.scheduler.base_lrs = [g["initial_lr"] for g in self.optimizer.param_groups]
        self._apply_schedule()
        self.epoch, self.iter = state["epoch"], state["iter"]
        self.global_step, self.best_top1 = state["global_step"], state["best_top1"]
        self.best_epoch = state.get("best_epoch", 0)
        self.meters_state = _Meters.own(state.get("meters"), self.info.rank,
                                        self.info.world_size)
        set_rng_state(state.get("rng", []), self.info.rank, self.device)

    def _apply_schedule(self):
        """The learning rate of the restored step under this config's schedule (it may
        differ from the stored one: train.epochs extended, or train.resume=force)."""
        sched = self.scheduler
        lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        sched._last_lr = lrs

    def _trim_metrics(self):
        """Keep the metrics of the epochs finished before the resumed one."""
        path = os.path.join(self.out, "metrics.jsonl")
        if not os.path.isfile(path):
            return
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        self.history = [r for r in rows if r["epoch"] <= self.epoch]  # epochs count from 1
        write_text(path, "".join(json.dumps(r) + "\n" for r in self.history))

    def _tensorboard(self):
        if not (self.cfg.log.tensorboard and self.info.main):
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("log.tensorboard is true but TensorBoard is not installed: pip "
                             "install tensorboard, or pass log.tensorboard=false") from None
        if self.cfg.log.ratio_figures and not _importable("matplotlib"):
            raise ValueError("log.ratio_figures is true but matplotlib is not installed: pip "
                             "install matplotlib, or pass log.ratio_figures=false")
        _quiet_tensorboard_threads()
        with self._tensorboard_writes():
            return SummaryWriter(self.tb_dir, purge_step=self.global_step)

    @property
    def tb_dir(self) -> str:
        return os.path.join(self.out, "tb")

    def _tensorboard_writes(self):
        """A failed TensorBoard write (a full disk) as one line naming the events folder."""
        return naming(self.tb_dir, "the TensorBoard events")

    # -- logging ---------------------------------------------------------------------------------
    def log(self, msg: str):
        if self.info.main:
            print(msg, flush=True)

    def _scalar(self, tag: str, value: float, step: int):
        if self.writer is not None:
            with self._tensorboard_writes():
                self.writer.add_scalar(tag, value, step)

    # -- checkpoints -----------------------------------------------------------------------------
    def _state(self, meters: Optional[_Meters]) -> dict:
        """The checkpoint dict (collectives inside: every rank calls it)."""
        return {"format": FORMAT, "config": to_dict(self.cfg),
                "config_fingerprint": config_fingerprint(self.cfg),
                "model": _unwrap(self.net).state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "epoch": self.epoch, "iter": self.iter, "global_step": self.global_step,
                "best_top1": self.best_top1, "best_epoch": self.best_epoch,
                "meters": meters.gather() if meters else None,
                "rng": gather_rng_states(self.device),
                "metrics": self.history[-1] if self.history else {}}

    def save(self, meters: Optional[_Meters] = None, best: bool = False):
        """checkpoint_last.pth (and _best) with rank-averaged BN statistics; all ranks call."""
        if meters is not None:
            meters.tick()  # the stored seconds cover every stored sample
        average_running_stats(self.model)
        state = self._state(meters)
        if self.info.main:
            save_checkpoint(self.last_path, state)
            if best:
                save_checkpoint(self.best_path, state)

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self) -> Dict[str, float]:
        cfg = self.cfg
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            warning = thread_oversubscription()
            if warning and self.info.main:
                print(warning, file=sys.stderr, flush=True)
            self.log(f"training {cfg.model.name} with {cfg.model.norm} at (gpus, per_gpu) = "
                     f"({cfg.batch.gpus}, {cfg.batch.per_gpu}) on {self.info.world_size} "
                     f"process(es) x {cfg.batch.virtual_gpus} virtual GPU(s), lr {cfg.optim.lr:g}"
                     f", {len(self.train_loader)} iterations/epoch -> {self.out}")
            first = (self.epoch, self.iter)  # where this process starts
            while self.epoch < cfg.train.epochs:
                if not self._train_epoch():
                    break
            if not self.stop_requested:
                self._summary(first)
            return self.history[-1] if self.history else {}
        finally:
            signal.signal(signal.SIGTERM, previous)
            if self.writer is not None:
                self.writer.close()

    def _on_sigterm(self, signum, frame):
        self.stop_requested = True

    def _ssn_radius(self) -> float:
        epochs = self.cfg.train.ssn_radius_epochs or self.cfg.train.epochs
        return min(1.0, self.global_step / (epochs * len(self.train_loader)))

    def _choose_crop(self):
        """Resize + RandomCrop in the last ``data.resize_crop_last_epochs`` epochs."""
        d, last = self.cfg.data, self.cfg.data.resize_crop_last_epochs
        on = last > 0 and self.epoch >= self.cfg.train.epochs - last
        if on != self.train_loader.resize_crop:
            self.train_loader.set_resize_crop(on)
            self.log(f"epoch {self.epoch + 1}: training crops are now Resize({d.val_resize}) + "
                     f"RandomCrop({d.image_size}) (data.resize_crop_last_epochs={last})")

    def _train_epoch(self) -> bool:
        """One epoch (or its remainder); False when training must stop early."""
        cfg, loader = self.cfg, self.train_loader
        meters = _Meters(self.device, self.meters_state)
        self.meters_state = None
        self.net.train()
        self._choose_crop()
        loader.set_epoch(self.epoch, self.iter)
        window = {"start": time.perf_counter(), "data": 0.0, "iters": 0}
        meters.clock = window["start"]
        bad = torch.full((), -1, dtype=torch.long, device=self.device)
        # on GPUs a check synchronises with the host: every 10 iterations at most
        check_every = 1 if self.device.type == "cpu" else min(cfg.train.print_freq, 10)
        bad_before = meters.bad  # skipped images of this epoch before a resume
        tick = time.perf_counter()
        for images, targets in loader:
            window["data"] += time.perf_counter() - tick
            loss, logits = self._step(images, targets)
            meters.bad = bad_before + loader.bad_images
            bad = torch.where((bad < 0) & ~torch.isfinite(loss.detach()),
                              torch.tensor(self.global_step, device=self.device), bad)
            meters.update(loss, logits, targets)
            self.iter += 1
            self.global_step += 1
            window["iters"] += 1
            last = self.iter == len(loader) or self.global_step == cfg.train.max_iters
            if self.iter % check_every == 0 or last or self._checkpoint_due():
                if self._check(bad, meters, window, last):
                    return False
            if self._checkpoint_due():
                self.save(meters)
            if cfg.train.max_iters is not None and self.global_step >= cfg.train.max_iters:
                break
            tick = time.perf_counter()
        meters.bad = bad_before + loader.bad_images
        self._end_epoch(meters)
        return not (cfg.train.max_iters is not None and self.global_step >= cfg.train.max_iters)

    def _step(self, images: torch.Tensor, targets: torch.Tensor):
        cfg = self.cfg
        if cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.has_ssn:
            normalization.set_ssn_radius(self.model, self._ssn_radius())
        with _autocast(self.device, cfg.train.amp):
            logits = self.net(images)
            loss = self.criterion(logits.float(), targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.optim.grad_clip is not None or cfg.optim.ratio_grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            clip_gradients(cfg, self.optimizer)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss, logits.detach()

    def _checkpoint_due(self) -> bool:
        every = self.cfg.checkpoint.every_iters
        return bool(every) and self.global_step % every == 0 and self.iter < len(self.train_loader)

    def _check(self, bad: torch.Tensor, meters: _Meters, window: dict, last: bool) -> bool:
        """Synchronise: stop on a non-finite loss or SIGTERM; print progress. True = stop."""
        bad_step = int(all_reduce_max(float(bad), self.device))
        if bad_step >= 0:  # some rank saw a non-finite loss at global step bad_step
            per_epoch = len(self.train_loader)
            kept = self.last_path if os.path.isfile(self.last_path) else "none written yet"
            raise NonFiniteLossError(
                f"non-finite loss at iteration {bad_step + 1} (epoch {bad_step // per_epoch + 1}, "
                f"step {bad_step % per_epoch + 1}/{per_epoch}); stopped without saving, the last "
                f"good checkpoint is {kept}")
        if broadcast_flag(self.stop_requested, self.device):
            self.save(meters)
            self.log(f"SIGTERM: saved {self.last_path} in epoch {self.epoch + 1}/"
                     f"{self.cfg.train.epochs} after iteration {self.iter}/"
                     f"{len(self.train_loader)}; run the same command to resume")
            return True
        if self.iter % self.cfg.train.print_freq == 0 or last:
            self._progress(meters, window)
        return False

    def _progress(self, meters: _Meters, window: dict):
        cfg, loader = self.cfg, self.train_loader
        loss_sum, correct, n = meters.sums.tolist()
        elapsed = time.perf_counter() - window["start"]
        per_iter = elapsed / max(window["iters"], 1)
        meters.tick()
        ips = cfg.batch.total / per_iter if per_iter > 0 else 0.0
        remaining = cfg.train.epochs * len(loader) - self.global_step
        if cfg.train.max_iters is not None:
            remaining = min(remaining, cfg.train.max_iters - self.global_step)
        lr = self.optimizer.param_groups[0]["lr"]
        self.log(f"epoch {self.epoch + 1}/{cfg.train.epochs} iter {self.iter}/{len(loader)} "
                 f"loss {loss_sum / max(n, 1):.4f} top1 {100 * correct / max(n, 1):5.2f}% "
                 f"lr {lr:.5f} {ips:7.1f} img/s data {100 * window['data'] / max(elapsed, 1e-9):3.0f}% "
                 f"eta {_hms((len(loader) - self.iter) * per_iter)} "
                 f"(total {_hms(remaining * per_iter)})")
        self._scalar("train/loss", loss_sum / max(n, 1), self.global_step)
        self._scalar("train/lr", lr, self.global_step)
        self._scalar("train/images_per_sec", ips, self.global_step)
        window.update(start=time.perf_counter(), data=0.0, iters=0)

    def _end_epoch(self, meters: _Meters):
        """Reduce the epoch's sums, validate, log, save; then print the epoch's line."""
        cfg, start = self.cfg, time.perf_counter()
        meters.tick()
        loss_sum, correct, n, bad = all_reduce_sum(meters.sums.tolist() + [float(meters.bad)],
                                                   self.device)
        seconds = meters.seconds
        average_running_stats(self.model)
        metrics = {"epoch": self.epoch + 1, "lr": self.optimizer.param_groups[0]["lr"],
                   "train_loss": loss_sum / max(n, 1), "train_top1": 100 * correct / max(n, 1),
                   "images_per_sec": n / seconds if seconds > 0 else 0.0, "seconds": seconds,
                   "train_bad_images": int(bad)}
        last_epoch = self.epoch + 1 == cfg.train.epochs or (
            cfg.train.max_iters is not None and self.global_step >= cfg.train.max_iters)
        if (self.epoch + 1) % cfg.train.eval_every == 0 or last_epoch:
            tick = time.perf_counter()
            metrics.update(self.validate())
            metrics["val_seconds"] = time.perf_counter() - tick
        self.epoch, self.iter = self.epoch + 1, 0
        best = metrics.get("val_top1", -1.0) > self.best_top1
        if best:
            self.best_top1, self.best_epoch = metrics["val_top1"], self.epoch
        self.history.append(metrics)
        self._log_epoch(metrics)  # metrics.jsonl before the checkpoint that skips past it
        self.save(best=best)
        self._print_epoch(metrics, time.perf_counter() - start)

    def validate(self) -> Dict[str, float]:
        cfg = self.cfg
        if cfg.train.batch_average_samples:
            self._batch_average(cfg.train.batch_average_samples)
        return evaluate(self.net, self.val_loader, self.device, cfg.train.amp,
                        cfg.train.channels_last)

    def _batch_average(self, samples: int):
        """Paper Sec. 4.1.3: BN-branch statistics averaged over training minibatches."""
        loader = self.train_loader
        loader.set_epoch(1_000_000 + self.epoch)  # an order of its own, reproducible
        batches = (x for x, _ in loader)
        num_batches = max(1, math.ceil(samples / self.cfg.batch.total))
        n = normalization.update_batch_average(self.model, batches, num_batches)
        self.log(f"batch average: BN statistics from {int(n)} samples per layer")

    def _log_epoch(self, metrics: dict):
        """metrics.jsonl and TensorBoard (scalars, SN ratios, ratio figures)."""
        if not self.info.main:
            return
        write_text(os.path.join(self.out, "metrics.jsonl"), json.dumps(metrics) + "\n", "a")
        for key, value in metrics.items():
            if key != "epoch" and isinstance(value, (int, float)):
                self._scalar(f"epoch/{key}", value, self.epoch)
        for name, layer in normalization.switch_layers(self.model):
            for kind, w in zip(("mean", "var"), layer.switch_ratios()):
                for norm, value in zip(layer.normalizers, w.tolist()):
                    self._scalar(f"ratios/{name}/{kind}/{norm}", value, self.epoch)
        if self.writer is not None and self.cfg.log.ratio_figures:
            from analysis import ratio_figures  # matplotlib: imported only when needed
            for tag, figure in ratio_figures(self.model, f"epoch {self.epoch}").items():
                with self._tensorboard_writes():
                    self.writer.add_figure(tag, figure, self.epoch)

    def _print_epoch(self, metrics: dict, after: float):
        """The epoch's line; its time is the whole epoch: training, then ``after`` seconds of
        validation, logs and checkpoint."""
        val = (f"; val top1 {metrics['val_top1']:.2f}% top5 {metrics['val_top5']:.2f}% "
               f"({metrics['val_count']} images)" if "val_top1" in metrics else "")
        val_s = metrics.get("val_seconds", 0.0)
        self.log(f"epoch {self.epoch}/{self.cfg.train.epochs} done in "
                 f"{_hms(metrics['seconds'] + after)} (train {_hms(metrics['seconds'])} at "
                 f"{metrics['images_per_sec']:.1f} img/s, val {_hms(val_s)}, checkpoint and "
                 f"logs {_hms(after - val_s)}): train loss {metrics['train_loss']:.4f} top1 "
                 f"{metrics['train_top1']:.2f}%{val}")

    def _summary(self, first: tuple):
        """The closing lines: the best top-1 and its epoch, the time, where the outputs are."""
        if not self.info.main:
            return
        last = next((r for r in reversed(self.history) if "val_top1" in r), None)
        resumed = f", resumed in epoch {first[0] + 1}" if first != (0, 0) else ""
        stopped = (f" (stopped at train.max_iters={self.cfg.train.max_iters})"
                   if self.epoch < self.cfg.train.epochs else "")
        best = (f"best val top-1 {self.best_top1:.2f}% at epoch {self.best_epoch}, last "
                f"{last['val_top1']:.2f}%" if last else "not validated")
        self.log(f"finished epoch {self.epoch}/{self.cfg.train.epochs}{stopped} in "
                 f"{_hms(time.perf_counter() - self.started)} (set-up included{resumed}): "
                 f"{best}")
        self.log(f"outputs in {self.out.rstrip('/')}/: metrics.jsonl, checkpoint_best.pth, "
                 f"checkpoint_last.pth, config.yaml" + (", tb/ (tensorboard --logdir "
                 f"{self.out}/tb)" if self.writer is not None else ""))


def _importable(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def _quiet_tensorboard_threads():
    """TensorBoard writes from a thread of its own: a failed write (a full disk) prints that
    thread's traceback, then the trainer's next call to the writer raises the same error,
    which the trainer reports in one line naming the folder. Keep only that line."""
    previous = threading.excepthook
    if getattr(previous, "quiet_tensorboard", False):
        return

    def hook(args):
        if not (issubclass(args.exc_type, OSError)
                and type(args.thread).__module__.startswith("tensorboard.")):
            previous(args)
    hook.quiet_tensorboard = True
    threading.excepthook = hook


def _hms(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
