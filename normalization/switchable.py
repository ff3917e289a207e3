"""Switchable Normalization (Luo et al., ICLR 2019): Eq. (3)-(5) of the paper.

``y = gamma * (x - sum_k w_k mu_k) / sqrt(sum_k w'_k var_k + eps) + beta`` with
``k`` in (IN, LN, BN), ``w = softmax(mean_weight)``, ``w' = softmax(var_weight)``.
All statistics come from the IN statistics (Eq. 4) in one pass over the input;
see ``algebra.py`` for the (N, C) algebra, ``ops.py`` for the passes over the
input, ``functional.py`` for how a call runs (eager, compiled, fx) and
``batch_stats.py`` for ghost batches, SyncSN and batch-average inference.

Conventions (documented in docs/normalization.md):

* ``momentum`` follows the authors: ``running = momentum * running + (1 -
  momentum) * batch``, so the default 0.9 keeps 0.9 of the old value (PyTorch's
  BatchNorm uses the opposite convention; our ``bn`` keeps PyTorch's).
* ``variance="biased"`` is Eq. (2); ``variance="authors"`` reproduces the
  authors' released code: the IN variance with Bessel's correction
  (``HW - 1``), LN and BN variances derived from it by Eq. (4).
* ``using_moving_average=False``: training leaves the running statistics
  alone; they are set by the batch-average procedure before evaluation.
* ``hard_ratios=True``: the softmax is replaced by the one-hot of its argmax
  for mean and variance (sparse SN, paper Table 3); the logits then get no
  gradient. In eval mode a layer whose hard ratios pick BN for both is a
  per-channel affine and skips the statistics pass.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import functional as fn
from .batch_stats import BatchStatsMixin

__all__ = ["SwitchNorm1d", "SwitchNorm2d", "SwitchNorm3d", "SyncSwitchNorm2d", "check_input"]

VARIANCES = ("biased", "authors")


def check_input(module: nn.Module, x: Tensor, dims: Tuple[int, ...], layout: str):
    """ValueError naming the expected shape when ``x`` has the wrong rank or channels
    (skipped while torch.fx traces with proxies, whose shapes are unknown)."""
    if fn.fx_tracing():
        return
    c = module.num_features
    if x.dim() not in dims or x.shape[1] != c:
        expected = " or ".join(layout.replace("C", str(c)).split("|"))
        raise ValueError(f"{type(module).__name__}(num_features={c}) expects input of shape "
                         f"{expected}, got {tuple(x.shape)}")


class _SwitchNormBase(BatchStatsMixin, nn.Module):
    """Shared implementation of SwitchNorm1d/2d/3d; subclasses fix the input rank."""

    _dims: Tuple[int, ...] = (4,)
    _layout = "(N, C, H, W)"
    _family = ("in", "ln", "bn")

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.9,
                 using_moving_average: bool = True, using_bn: bool = True,
                 last_gamma: bool = False, ghost_batch_size: Optional[int] = None,
                 variance: str = "biased", hard_ratios: bool = False,
                 sync: bool = False, process_group=None):
        super().__init__()
        if variance not in VARIANCES:
            raise ValueError(f"variance must be one of {VARIANCES}, got {variance!r}")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.using_moving_average = using_moving_average
        self.using_bn = using_bn
        self.last_gamma = last_gamma
        self.variance = variance
        self.hard_ratios = hard_ratios
        self.normalizers = tuple(k for k in self._family if using_bn or k != "bn")
        k = len(self.normalizers)
        self.weight = nn.Parameter(torch.empty(num_features))
        self.bias = nn.Parameter(torch.empty(num_features))
        self.mean_weight = nn.Parameter(torch.empty(k))
        self.var_weight = nn.Parameter(torch.empty(k))
        if using_bn:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))
        else:
            self.running_mean = None
            self.running_var = None
        self._init_batch_stats(ghost_batch_size, sync, process_group)
        self._hard_cache = None
        self.reset_parameters()

    # -- construction ---------------------------------------------------------------
    def reset_running_stats(self):
        if self.using_bn:
            self.running_mean.zero_()
            self.running_var.fill_(1.0)

    def reset_parameters(self):
        """gamma = 1 (0 with last_gamma), beta = 0, ratio logits = 1 (uniform ratios)."""
        self.reset_running_stats()
        with torch.no_grad():
            self.weight.fill_(0.0 if self.last_gamma else 1.0)
            self.bias.zero_()
            self.mean_weight.fill_(1.0)
            self.var_weight.fill_(1.0)

    def config(self) -> dict:
        """Constructor arguments, so conversions can rebuild the layer."""
        return dict(num_features=self.num_features, eps=self.eps, momentum=self.momentum,
                    using_moving_average=self.using_moving_average, using_bn=self.using_bn,
                    last_gamma=self.last_gamma, ghost_batch_size=self.ghost_batch_size,
                    variance=self.variance, hard_ratios=self.hard_ratios)

    def extra_repr(self) -> str:
        s = f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, " \
            f"normalizers={'/'.join(self.normalizers)}"
        for key in ("ghost_batch_size", "hard_ratios", "sync"):
            if getattr(self, key):
                s += f", {key}={getattr(self, key)}"
        if self.variance != "biased":
            s += f", variance={self.variance}"
        if not self.using_moving_average:
            s += ", using_moving_average=False"
        return s

    # -- ratios -------------------------------------------------------------------------
    def _ratios(self) -> Tensor:
        """The importance weights of Eq. (5), (2, K) (mean, var): softmax, or hard one-hot."""
        ratio_fn = fn.hard_ratios if self.hard_ratios else fn.softmax_ratios
        return ratio_fn(self.mean_weight, self.var_weight)

    @torch.no_grad()
    def switch_ratios(self) -> Tuple[Tensor, Tensor]:
        """The importance weights (mean, var) this layer uses, ordered as ``normalizers``."""
        w = self._ratios().detach().float()
        return w[0].clone(), w[1].clone()

    def _hard_bn_only(self) -> bool:
        """Eval with hard ratios that pick BN for mean and variance (cached on host)."""
        if not (self.hard_ratios and self.using_bn) or torch.compiler.is_compiling() \
                or fn.fx_tracing():
            return False  # (under torch.compile/export/fx: the general path, no host reads)
        key = (self.mean_weight._version, self.var_weight._version,
               self.mean_weight.data_ptr(), self.var_weight.data_ptr())
        if self._hard_cache is None or self._hard_cache[0] != key:
            bn = self.normalizers.index("bn")
            picks = (int(self.mean_weight.argmax()) == bn and int(self.var_weight.argmax()) == bn)
            self._hard_cache = (key, picks)
        return self._hard_cache[1]

    # -- forward ----------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        check_input(self, x, self._dims, self._layout)
        self._check_mode()
        use_batch = self.using_bn and (self.training or self.collecting)
        if not use_batch and not self.training and self._hard_bn_only():
            return fn.autocast_output(F.batch_norm(x, self.running_mean, self.running_var,
                                                   self.weight, self.bias, False, 0.0, self.eps))
        ratios = self._ratios()
        running = (self.running_mean, self.running_var) if self.using_bn and not use_batch \
            else None
        out = fn.switch_norm(x, self.normalizers, self.eps, self.weight, self.bias, ratios,
                             batch=self._batch_spec(x) if use_batch else None,
                             running=running, unbiased=self._unbiased())
        if use_batch:       # (indexed, not unpacked: a proxy while torch.fx traces)
            self._after_batch(x, out[1], None)
        self._after_ratios(ratios)
        return out[0]

    def _unbiased(self) -> Optional[str]:
        """The authors' variance convention: Bessel-corrected IN variances (2d, 3d)."""
        return "in" if self.variance == "authors" else None

    def _after_ratios(self, ratios):
        """Hook for SSN (freezing one-hot ratios)."""

    @torch.no_grad()
    def _update_running(self, stats, spatial):
        """running = momentum * running + (1 - momentum) * mean over chunks (authors' convention)."""
        if self.using_moving_average:
            w = 1.0 - self.momentum
            for buf, stat in ((self.running_mean, stats.mean), (self.running_var, stats.var)):
                buf.lerp_(fn.chunk_average(stat, buf.dtype), w)

    # -- checkpoints ------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        # The authors store gamma/beta as (1, C, 1, 1) and running stats as (1, C, 1).
        for name in ("weight", "bias", "running_mean", "running_var"):
            t = state_dict.get(prefix + name)
            if t is not None and t.dim() > 1 and t.numel() == self.num_features:
                state_dict[prefix + name] = t.reshape(-1)
        k = len(self.normalizers)
        for name in ("mean_weight", "var_weight"):
            t = state_dict.get(prefix + name)
            if t is not None and t.numel() != k:
                hint = ("it was trained without the BN branch: build this layer with "
                        "using_bn=False" if t.numel() == k - 1 else
                        "it was trained with the BN branch: build this layer with using_bn=True"
                        if t.numel() == k + 1 else "the layer types differ")
                raise ValueError(
                    f"{prefix}{name} has {t.numel()} ratio entries but {type(self).__name__} "
                    f"mixes {k} ({', '.join(self.normalizers)}): {hint}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)



class SwitchNorm2d(_SwitchNormBase):
    """SN for (N, C, H, W): IN over (H, W), LN over (C, H, W), BN over (N, H, W)."""


class SwitchNorm3d(_SwitchNormBase):
    """SN for video (N, C, T, H, W): statistics over (T, H, W) as in the Kinetics experiment.
    ``momentum`` defaults to the authors' 0.997 for this layer."""

    _dims = (5,)
    _layout = "(N, C, T, H, W)"

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.997, **kwargs):
        super().__init__(num_features, eps, momentum, **kwargs)


class SwitchNorm1d(_SwitchNormBase):
    """SN for (N, C) and (N, C, L) (MLPs, LSTMs): LN and BN, as in the paper's NAS experiment.

    LN pools over (C, L) per sample, BN over (N, L) per channel; the ratio
    vectors are ordered (LN, BN), or (LN,) with ``using_bn=False``.
    ``momentum`` defaults to the authors' 0.997 for this layer, and
    ``variance="authors"`` is their 1d layer: LN and BN variances with Bessel's
    correction over their own pixel sets (over C, and over N, for (N, C)).
    """

    _dims = (2, 3)
    _layout = "(N, C)|(N, C, L)"
    _family = ("ln", "bn")

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.997, **kwargs):
        super().__init__(num_features, eps, momentum, **kwargs)

    def _unbiased(self) -> Optional[str]:
        return "pooled" if self.variance == "authors" else None


class SyncSwitchNorm2d(SwitchNorm2d):
    """SwitchNorm2d whose BN branch is synchronised over a process group (SyncSN).

    Only the BN statistics (and their gradients) are reduced; IN and LN are
    per sample. Local in eval and when no process group is initialised.
    """

    def __init__(self, num_features: int, *args, process_group=None, **kwargs):
        kwargs.pop("sync", None)
        super().__init__(num_features, *args, sync=True, process_group=process_group, **kwargs)
