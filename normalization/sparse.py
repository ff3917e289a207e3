"""Sparse Switchable Normalization (Shao et al., "SSN: Learning Sparse Switchable
Normalization via SparsestMax", CVPR 2019).

``sparsestmax(z, r)`` is the Euclidean projection of the logits ``z`` onto the
part of the probability simplex at distance >= ``r`` from its centre: first
``sparsemax(z)`` (projection onto the simplex), then, when the point lies
closer than ``r`` to the centre ``u`` of the face it lies on, it is pushed
radially from ``u`` to distance ``r``; when that leaves the simplex it is
projected onto the smaller face and the remaining radius shrinks by
Pythagoras. As ``r`` grows from 0 to 1 over training the ratios become
one-hot (for 3 normalizers, at ``r >= sqrt(2/3)``); once one-hot, a layer's
ratios are frozen. Everything is tensor arithmetic with a fixed number of
steps, so the forward pass never synchronises host and device, and autograd
differentiates it (as do torch.compile and torch.fx). Rows of a 2-D input
(mean and variance logits) are projected together.

At the exact centre of a face (all active logits equal) the radial direction
is undefined and the point is left where sparsemax puts it.
"""
from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor

from . import functional as fn
from .switchable import SwitchNorm2d

__all__ = ["sparsemax", "sparsestmax", "SparseSwitchNorm2d", "set_ssn_radius",
           "hold_frozen_ratios"]

_ONE_HOT_TOL = 1e-6


def _sparsemax(z: Tensor) -> Tensor:
    """Sparsemax of each row (differentiable: a fixed sequence of tensor ops)."""
    zs, _ = torch.sort(z, dim=-1, descending=True)
    k = torch.arange(1, z.shape[-1] + 1, dtype=z.dtype, device=z.device)
    cs = torch.cumsum(zs, -1) - 1.0
    support = (zs * k > cs).sum(-1, keepdim=True)
    tau = cs.gather(-1, support - 1) / support
    return torch.clamp(z - tau, min=0.0)


def _norm(v: Tensor) -> Tensor:
    """Row norms with a finite gradient at 0 (clamped before the square root)."""
    return v.square().sum(-1, keepdim=True).clamp_min(1e-24).sqrt()


def _sparsestmax(z: Tensor, radius: Tensor, k: int) -> Tensor:
    """Rows of ``z`` (R, K = k) -> their projections (R, K), differentiable by autograd.

    Each level of the loop leaves a face of one dimension less; every branch is
    a ``torch.where`` whose unused side stays finite, so the gradient is the
    derivative of the branch each row takes (the piecewise-linear and radial
    maps of SSN), with no host-device synchronisation.
    """
    p = _sparsemax(z)
    rad2 = radius.to(z.dtype).square().expand(z.shape[0], 1)
    going = None
    u_prev = None
    levels = k - 1
    for level in range(levels):
        active = (p > 0).to(z.dtype)
        u = active / active.sum(-1, keepdim=True)
        if u_prev is not None:
            rad2 = torch.where(going, (rad2 - (u - u_prev).square().sum(-1, keepdim=True))
                               .clamp_min(0.0), rad2)
        diff = p - u
        dist = _norm(diff)
        # a single-point support has dist 0; at the exact centre the direction is undefined
        push = (dist > 1e-12) & (dist.square() < rad2)
        if going is not None:
            push = push & going
        q = u + diff * (rad2.clamp_min(1e-24).sqrt() / dist)
        overshoot = push & (q.min(-1, keepdim=True).values < 0)
        q2 = q.clamp(0.0, 1.0) if level == levels - 1 else _sparsemax(q)
        p = torch.where(push, torch.where(overshoot, q2, q), p)
        going = overshoot
        u_prev = u
    return p.clamp(0.0, 1.0)


def sparsemax(z: Tensor) -> Tensor:
    """Euclidean projection of each row of ``z`` onto the probability simplex
    (Martins & Astudillo, 2016); differentiable."""
    return sparsestmax(z, 0.0)


def sparsestmax(z: Tensor, radius) -> Tensor:
    """Project each row of ``z`` onto {p in simplex : ||p - centre|| >= radius};
    differentiable (autograd through a fixed sequence of tensor ops)."""
    radius = torch.as_tensor(radius, dtype=z.dtype, device=z.device)
    if z.dim() == 1:
        return _sparsestmax(z[None], radius, z.shape[-1])[0]
    return _sparsestmax(z, radius, z.shape[-1])


def sparsest_ratios(mean_logits: Tensor, var_logits: Tensor, radius: Tensor,
                    mean_fixed: Tensor, var_fixed: Tensor) -> Tensor:
    """SSN's ratios (2, K): sparsestmax of both logit vectors at ``radius`` (1,); a vector
    whose flag (``mean_fixed``, ``var_fixed``: (1,) long) is set is the one-hot of its
    argmax, with no gradient."""
    logits = torch.stack([mean_logits, var_logits])
    z = logits.to(fn.acc_dtype(logits))
    soft = _sparsestmax(z, radius[0], z.shape[-1])
    frozen = F.one_hot(z.detach().argmax(-1), z.shape[-1]).to(z.dtype)
    fixed = torch.cat([mean_fixed, var_fixed]).bool()[:, None]
    return torch.where(fixed, frozen, soft)


@torch.no_grad()
def freeze_one_hot(ratios: Tensor, mean_logits: Tensor, var_logits: Tensor,
                   mean_fixed: Tensor, var_fixed: Tensor):
    """Flag each ratio vector (rows of ``ratios``, (2, K)) that became one-hot and write
    the one-hot into its logits."""
    r = ratios
    one_hot = (r.max(-1).values - r.min(-1).values) >= 1.0 - _ONE_HOT_TOL
    fixed = torch.cat([mean_fixed, var_fixed]).bool()
    newly = (one_hot & ~fixed)[:, None]
    hot = F.one_hot(r.argmax(-1), r.shape[-1]).to(mean_logits.dtype)
    logits = torch.where(newly, hot, torch.stack([mean_logits, var_logits]))
    mean_logits.copy_(logits[0])
    var_logits.copy_(logits[1])
    fixed = (fixed | one_hot).long()
    mean_fixed.copy_(fixed[:1])
    var_fixed.copy_(fixed[1:])


# called with the layer's parameters and buffers: one node each while torch.fx traces,
# so the flags and the radius are read when the graph runs, not baked in at trace time
torch.fx.wrap("sparsest_ratios")
torch.fx.wrap("freeze_one_hot")


class SparseSwitchNorm2d(SwitchNorm2d):
    """SSN: SwitchNorm2d whose ratios are ``sparsestmax(logits, radius)``.

    Buffers as the authors' SSN layer (``radius``, ``mean_fixed``,
    ``var_fixed``), so their checkpoints load. Once a ratio vector becomes
    one-hot in training its flag is set and the one-hot is written into the
    logits; from then on the layer uses it with no gradient.
    """

    def __init__(self, num_features: int, *args, **kwargs):
        super().__init__(num_features, *args, **kwargs)
        self.register_buffer("radius", torch.zeros(1))
        self.register_buffer("mean_fixed", torch.zeros(1, dtype=torch.long))
        self.register_buffer("var_fixed", torch.zeros(1, dtype=torch.long))

    def reset_parameters(self):
        super().reset_parameters()
        for name in ("radius", "mean_fixed", "var_fixed"):
            if hasattr(self, name):
                getattr(self, name).zero_()

    def set_radius(self, r: float):
        self.radius.fill_(float(r))

    def _ratios(self) -> Tensor:
        if self.hard_ratios:
            return super()._ratios()
        return sparsest_ratios(self.mean_weight, self.var_weight, self.radius, self.mean_fixed,
                               self.var_fixed)

    def _after_ratios(self, ratios):
        """Freeze a ratio vector that became one-hot: flag it, write the one-hot into its logits."""
        if self.training and not self.collecting:
            freeze_one_hot(ratios, self.mean_weight, self.var_weight, self.mean_fixed,
                           self.var_fixed)


def hold_frozen_ratios(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """Make frozen SSN ratios untouchable by ``optimizer``, as the authors' SSN does by
    detaching them (their gradient is None, so momentum and weight decay skip them).

    A frozen vector already gets a zero gradient; after every optimizer step this hook
    puts it back to its one-hot and zeroes its optimizer state (momentum, Adam moments),
    so neither the velocity it had nor weight decay moves it. Device-side only: no host
    synchronisation. Returns the hook handle (None without SSN layers).
    """
    layers = [m for m in model.modules() if isinstance(m, SparseSwitchNorm2d)]
    if not layers:
        return None

    @torch.no_grad()
    def restore(opt, args, kwargs):
        for layer in layers:
            for p, flag in ((layer.mean_weight, layer.mean_fixed),
                            (layer.var_weight, layer.var_fixed)):
                fixed = flag.bool()
                hot = F.one_hot(p.argmax(), p.numel()).to(p.dtype)
                p.copy_(torch.where(fixed, hot, p))
                for value in opt.state.get(p, {}).values():
                    if torch.is_tensor(value) and value.shape == p.shape:
                        value.copy_(torch.where(fixed, torch.zeros_like(value), value))
    return optimizer.register_step_post_hook(restore)


@torch.no_grad()
def set_ssn_radius(model: torch.nn.Module, radius: float) -> int:
    """Set the sparsestmax radius of every SSN layer (the trainer calls this each
    iteration with ``radius = progress in [0, 1]``). Returns the number of layers."""
    n = 0
    for m in model.modules():
        if isinstance(m, SparseSwitchNorm2d):
            m.set_radius(radius)
            n += 1
    return n
