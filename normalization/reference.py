"""Plain reference implementation of SN: the oracle for tests and benchmarks.

Each statistic is computed directly over its own pixel set as in Eq. (2) (no
reuse of the IN statistics), combined by Eq. (3) with the softmax of Eq. (5),
and differentiated by autograd. It is written for clarity, not speed: its cost
is what the authors' algorithm (plain PyTorch ops) costs, which the
benchmarks report next to the fused implementation.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["reference_switch_norm", "ReferenceSwitchNorm2d", "reference_sparsestmax"]


def _var(x: Tensor, dims, unbiased: bool) -> Tensor:
    return x.var(dim=dims, unbiased=unbiased, keepdim=True)


def reference_switch_norm(x: Tensor, weight: Tensor, bias: Tensor, mean_ratio: Tensor,
                          var_ratio: Tensor, normalizers: Sequence[str] = ("in", "ln", "bn"),
                          eps: float = 1e-5, ghost_batch_size: Optional[int] = None,
                          running: Optional[tuple] = None, authors: bool = False) -> Tensor:
    """SN of ``x`` (N, C, *spatial) with explicit ratio vectors.

    ``running=(mean, var)`` uses those BN statistics (eval); otherwise BN uses
    the batch, per ghost chunk. ``authors=True`` uses the unbiased IN variance
    and the LN/BN variances the authors derive from it.
    """
    n, c = x.shape[:2]
    xf = x.reshape(n, c, -1)
    m = xf.shape[-1]
    stats = {}
    mu_in = xf.mean(-1, keepdim=True)
    var_in = _var(xf, -1, authors and m > 1)
    stats["in"] = (mu_in, var_in)
    if authors:  # E[var_in + mu_in^2] - E[mu_in]^2 over the pooled axes, as released
        second = var_in + mu_in ** 2
        mu_ln = mu_in.mean(1, keepdim=True)
        stats["ln"] = (mu_ln, second.mean(1, keepdim=True) - mu_ln ** 2)
    else:
        stats["ln"] = (xf.mean((1, 2), keepdim=True), _var(xf, (1, 2), False))
    if "bn" in normalizers:
        if running is not None:
            stats["bn"] = (running[0].view(1, c, 1), running[1].view(1, c, 1))
        else:
            g = ghost_batch_size or n
            means, variances = [], []
            for chunk in torch.split(xf, g, 0):
                if authors:
                    cm = chunk.mean(-1, keepdim=True)
                    cs = _var(chunk, -1, m > 1) + cm ** 2
                    bm = cm.mean(0, keepdim=True)
                    bv = cs.mean(0, keepdim=True) - bm ** 2
                else:
                    bm, bv = chunk.mean((0, 2), keepdim=True), _var(chunk, (0, 2), False)
                means.append(bm.expand(chunk.shape[0], c, 1))
                variances.append(bv.expand(chunk.shape[0], c, 1))
            stats["bn"] = (torch.cat(means), torch.cat(variances))
    mean = sum(w * stats[k][0] for w, k in zip(mean_ratio, normalizers))
    var = sum(w * stats[k][1] for w, k in zip(var_ratio, normalizers))
    y = (xf - mean) / torch.sqrt(var + eps)
    y = y * weight.view(1, c, 1) + bias.view(1, c, 1)
    return y.view_as(x)


class ReferenceSwitchNorm2d(torch.nn.Module):
    """The straightforward SN layer: the authors' algorithm in plain PyTorch ops."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.9):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = torch.nn.Parameter(torch.ones(num_features))
        self.bias = torch.nn.Parameter(torch.zeros(num_features))
        self.mean_weight = torch.nn.Parameter(torch.ones(3))
        self.var_weight = torch.nn.Parameter(torch.ones(3))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        xf = x.view(n, c, -1)
        mean_in = xf.mean(-1, keepdim=True)
        var_in = xf.var(-1, keepdim=True, unbiased=False)
        mean_ln = mean_in.mean(1, keepdim=True)
        temp = var_in + mean_in ** 2
        var_ln = temp.mean(1, keepdim=True) - mean_ln ** 2
        if self.training:
            mean_bn = mean_in.mean(0, keepdim=True)
            var_bn = temp.mean(0, keepdim=True) - mean_bn ** 2
            with torch.no_grad():
                self.running_mean.lerp_(mean_bn.view(-1), 1 - self.momentum)
                self.running_var.lerp_(var_bn.view(-1), 1 - self.momentum)
        else:
            mean_bn = self.running_mean.view(1, c, 1)
            var_bn = self.running_var.view(1, c, 1)
        mw = torch.softmax(self.mean_weight, 0)
        vw = torch.softmax(self.var_weight, 0)
        mean = mw[0] * mean_in + mw[1] * mean_ln + mw[2] * mean_bn
        var = vw[0] * var_in + vw[1] * var_ln + vw[2] * var_bn
        xf = (xf - mean) / (var + self.eps).sqrt()
        return xf.view(n, c, h, w) * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)


def _ref_sparsemax(v: Tensor) -> Tensor:
    zs, _ = torch.sort(v, descending=True)
    cs = torch.cumsum(zs, 0) - 1
    k = torch.arange(1, len(v) + 1, dtype=v.dtype)
    cond = zs - cs / k > 0
    rho = int(cond.nonzero().max()) + 1
    return torch.clamp(v - cs[rho - 1] / rho, min=0)


def reference_sparsestmax(v: Tensor, rad: float, u_in: Optional[Tensor] = None) -> Tensor:
    """Recursive sparsestmax with host-side control flow, as SSN describes it."""
    w = _ref_sparsemax(v)
    if int((w > 0).sum()) == 1:  # a vertex (one-hot)
        return w
    ind = (w > 0).to(v.dtype)
    u = ind / ind.sum()
    if u_in is not None:
        rad = max(rad ** 2 - float(((u - u_in) ** 2).sum()), 0.0) ** 0.5
    dist = float((w - u).norm())
    if dist >= rad or dist == 0.0:
        return w
    p = rad * (w - u) / dist + u
    if float(p.min()) < 0:
        return reference_sparsestmax(p, rad, u)
    return p.clamp(0, 1)
