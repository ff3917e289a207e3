"""The importance-ratio figures of the paper, as matplotlib figures (Agg, no pyplot state).

* Fig. 1 / 4 (``average_figure``): the ratios of IN, LN and BN averaged over
  all SN layers of a network, for the mean and the variance; one bar group per
  model (e.g. per batch setting).
* Fig. 5 (``layers_figure``): the ratios of every SN layer, in network order,
  as stacked bars for the mean (mu) and the variance (sigma). Layers after a
  3x3 conv are hatched ``///``, after the stem conv ``xx``, after a residual
  sum or pooling (pre-activation ResNets) dotted; layers after a 1x1 conv are
  flat; shortcut (downsample) layers carry a black square.
* Fig. 7 (``dynamics_figure``, ``divergence_figure``): the ratios of each layer
  over training, and the symmetric divergence
  ``D(l_mu || l_sigma) = KL(l_mu || l_sigma) + KL(l_sigma || l_mu)`` per layer.
* Fig. 8 (``hard_ratio_figure``): the hard ratios (argmax) of each layer at
  several snapshots, with the number of layers whose mean and variance pick
  different normalizers.

The same three colours mark the normalizers everywhere: IN blue, LN red, BN
green (the paper's Fig. 8).

Receptive field (RF) of a layer: the side, in input pixels, of the input
window that one position of the layer's input depends on. It is computed
from the architecture by tracing the model with ``torch.fx`` and walking
its graph in execution order: every conv and pooling of kernel ``k``, stride
``s`` and dilation ``d`` maps ``(rf, jump)`` to ``(rf + d (k - 1) jump,
jump * s)``; any other op (ReLU, norm, residual sum) takes the largest RF of
its inputs, so a residual sum has the RF of its longer branch. The input has
``(1, 1)``. (A ResNet-50 v1 gives 7 after the stem conv and 427 at the end of
the last stage, the range of the paper's Fig. 7.) When the model cannot be
traced, RF is left out and layer kinds are guessed from module names.

Divergences are computed with epsilon smoothing: each ratio vector ``p``
becomes ``(p + eps) / (1 + k eps)`` (``eps = 1e-6`` by default), so ``D`` is
finite when a ratio is exactly 0 (hard ratios, SSN). Two different one-hot
vectors then give ``D`` of about ``2 ln(1 / eps)`` (27.6).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch.nn as nn
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from normalization import switch_layers
from normalization.fold import trace_modules

__all__ = ["NORMALIZERS", "COLORS", "LayerInfo", "RatioSnapshot", "RatioHistory", "layer_infos",
           "snapshot", "network_average", "symmetric_kl", "average_figure", "layers_figure",
           "dynamics_figure", "divergence_figure", "hard_ratio_figure", "ratio_figures",
           "hard_choices", "differing_layers", "changed_layers", "save_figure",
           "history_from_tensorboard", "RF_BINS"]

NORMALIZERS = ("in", "ln", "bn")
COLORS = {"in": "#1f77b4", "ln": "#d62728", "bn": "#2ca02c"}  # IN blue, LN red, BN green
LABELS = {"in": "IN", "ln": "LN", "bn": "BN"}
STATS = (("mean", "\u03bc (mean)"), ("var", "\u03c3 (variance)"))
HATCHES = {"conv3x3": "///", "stem": "xx", "preact": "..", "conv1x1": "", "shortcut": "",
           "other": ""}
KIND_LABELS = {"stem": "after the stem conv", "conv3x3": "after a 3x3 conv",
               "conv1x1": "after a 1x1 conv", "shortcut": "in a shortcut",
               "preact": "after a residual sum / pooling", "other": "other"}
#: The receptive-field ranges of the paper's Fig. 7 (pixels, lower bound inclusive).
RF_BINS = ((0, 49), (49, 99), (99, 199), (199, 299), (299, 428))
DEFAULT_EPS = 1e-6


# -- the architecture: kinds and receptive fields of the SN layers ---------------------------
@dataclass(frozen=True)
class LayerInfo:
    """An SN layer: module name, place in the network and receptive field (None: unknown)."""

    name: str
    kind: str
    rf: Optional[int]
    normalizers: Tuple[str, ...] = NORMALIZERS


def _window(module: nn.Module) -> Optional[Tuple[int, int, int]]:
    """(kernel, stride, dilation) of a conv or pooling module; None for other modules."""
    if not isinstance(module, (nn.modules.conv._ConvNd, nn.MaxPool2d, nn.AvgPool2d)):
        return None

    def first(v):
        return int(max(v)) if isinstance(v, (tuple, list)) else int(v)
    dilation = getattr(module, "dilation", 1)
    return first(module.kernel_size), first(module.stride), first(dilation)


def _walk(model: nn.Module, graph) -> Tuple[Dict[str, int], Dict[str, object]]:
    """RF of every module's input and the graph node feeding it, in execution order."""
    state: Dict[object, Tuple[float, float]] = {}
    rf_in: Dict[str, int] = {}
    source: Dict[str, object] = {}
    for node in graph.nodes:
        inputs = [state[a] for a in node.all_input_nodes if a in state]
        rf, jump = (max(r for r, _ in inputs), max(j for _, j in inputs)) if inputs else (1, 1)
        if node.op == "call_module":
            module = model.get_submodule(node.target)
            rf_in.setdefault(node.target, int(rf) if math.isfinite(rf) else None)
            source.setdefault(node.target, node.args[0] if node.args else None)
            window = _window(module)
            if window is not None:
                k, s, d = window
                rf, jump = rf + d * (k - 1) * jump, jump * s
            elif isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
                rf = math.inf
        state[node] = (rf, jump)
    return rf_in, source


def _kind_from_graph(model: nn.Module, name: str, src) -> str:
    if "downsample" in name or "shortcut" in name:
        return "shortcut"
    if src is None or getattr(src, "op", None) != "call_module":
        return "preact"
    conv = model.get_submodule(src.target)
    window = _window(conv)
    if window is None or not isinstance(conv, nn.modules.conv._ConvNd):
        return "preact"  # after pooling or an activation of a residual sum
    if any(getattr(a, "op", None) == "placeholder" for a in src.all_input_nodes):
        return "stem"
    return f"conv{window[0]}x{window[0]}"


def _kind_from_name(model: nn.Module, name: str) -> str:
    """Guess without a graph: bnK follows convK of the same parent (torchvision's names)."""
    if "downsample" in name or "shortcut" in name:
        return "shortcut"
    parent, _, leaf = name.rpartition(".")
    conv_name = (parent + "." if parent else "") + leaf.replace("bn", "conv")
    try:
        window = _window(model.get_submodule(conv_name))
    except AttributeError:
        window = None
    if window is None:
        return "other"
    return "stem" if not parent else f"conv{window[0]}x{window[0]}"


def layer_infos(model: nn.Module) -> List[LayerInfo]:
    """Every SN layer of ``model`` in network order (module order), with kind and RF."""
    layers = switch_layers(model)
    graph = trace_modules(model) if layers else None
    rf_in, source = _walk(model, graph) if graph is not None else ({}, {})
    infos = []
    for name, layer in layers:
        if graph is not None and name in source:
            kind = _kind_from_graph(model, name, source[name])
        else:
            kind = _kind_from_name(model, name)
        infos.append(LayerInfo(name, kind, rf_in.get(name), tuple(layer.normalizers)))
    return infos


# -- the numbers ------------------------------------------------------------------------------
def _full(ratio: Sequence[float], normalizers: Sequence[str]) -> np.ndarray:
    """A ratio vector over (IN, LN, BN); normalizers a layer lacks get 0."""
    out = np.zeros(len(NORMALIZERS))
    for value, norm in zip(ratio, normalizers):
        out[NORMALIZERS.index(norm)] = float(value)
    return out


@dataclass
class RatioSnapshot:
    """The ratios of one model: ``ratios[layer]["mean" | "var"]`` over (IN, LN, BN)."""

    label: str
    ratios: Dict[str, Dict[str, np.ndarray]]
    epoch: Optional[int] = None
    infos: List[LayerInfo] = field(default_factory=list)

    @property
    def layers(self) -> List[str]:
        return list(self.ratios)


def snapshot(model: nn.Module, label: str = "", epoch: Optional[int] = None,
             infos: Optional[List[LayerInfo]] = None) -> RatioSnapshot:
    """The ratios every SN layer of ``model`` uses now (softmax, sparsestmax or hard)."""
    ratios = {}
    for name, layer in switch_layers(model):
        mean, var = layer.switch_ratios()
        ratios[name] = {"mean": _full(mean.tolist(), layer.normalizers),
                        "var": _full(var.tolist(), layer.normalizers)}
    return RatioSnapshot(label, ratios, epoch, layer_infos(model) if infos is None else infos)


def network_average(snap: RatioSnapshot) -> Dict[str, np.ndarray]:
    """Fig. 1/4: the ratios averaged over all SN layers, for "mean" and "var"."""
    if not snap.ratios:
        return {stat: np.zeros(len(NORMALIZERS)) for stat, _ in STATS}
    return {stat: np.mean([r[stat] for r in snap.ratios.values()], axis=0) for stat, _ in STATS}


def symmetric_kl(p: Sequence[float], q: Sequence[float], eps: float = DEFAULT_EPS) -> float:
    """``KL(p || q) + KL(q || p)`` of two ratio vectors after epsilon smoothing."""
    p = (np.asarray(p, dtype=np.float64) + eps)
    q = (np.asarray(q, dtype=np.float64) + eps)
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum((p - q) * (np.log(p) - np.log(q))))


def hard_choices(snap: RatioSnapshot) -> Dict[str, Dict[str, str]]:
    """``{layer: {"mean": "bn", "var": "ln"}}``: the argmax of each ratio vector."""
    return {name: {stat: NORMALIZERS[int(np.argmax(r[stat]))] for stat, _ in STATS}
            for name, r in snap.ratios.items()}


@dataclass
class RatioHistory:
    """Ratios over training: ``series[layer][stat]`` is an (epochs, 3) array."""

    epochs: List[int]
    series: Dict[str, Dict[str, np.ndarray]]
    label: str = ""

    @property
    def layers(self) -> List[str]:
        return list(self.series)

    def at(self, epoch: int, infos: Sequence[LayerInfo] = ()) -> RatioSnapshot:
        i = self.epochs.index(epoch)
        ratios = {name: {stat: s[stat][i] for stat, _ in STATS} for name, s in self.series.items()}
        return RatioSnapshot(f"epoch {epoch}", ratios, epoch, list(infos))

    def divergence(self, eps: float = DEFAULT_EPS) -> Dict[str, np.ndarray]:
        """``D(l_mu || l_sigma)`` of every layer at every epoch."""
        return {name: np.array([symmetric_kl(m, v, eps) for m, v in zip(s["mean"], s["var"])])
                for name, s in self.series.items()}

    @classmethod
    def from_snapshots(cls, snaps: Sequence[RatioSnapshot], label: str = "") -> "RatioHistory":
        snaps = sorted(snaps, key=lambda s: s.epoch if s.epoch is not None else -1)
        layers = snaps[0].layers
        series = {name: {stat: np.stack([s.ratios[name][stat] for s in snaps])
                         for stat, _ in STATS} for name in layers}
        return cls([s.epoch if s.epoch is not None else i for i, s in enumerate(snaps)],
                   series, label)


# -- drawing helpers ----------------------------------------------------------------------------
def _infos_for(layers: Sequence[str], infos: Sequence[LayerInfo]) -> List[LayerInfo]:
    """Infos of ``layers``: in the order of ``infos`` (network order), unknown ones last."""
    present = set(layers)
    ordered = [i for i in infos if i.name in present]
    known = {i.name for i in ordered}
    return ordered + [LayerInfo(n, "other", None) for n in layers if n not in known]


def _tick(info: LayerInfo) -> str:
    return f"{info.name} ({info.rf})" if info.rf is not None else info.name


def _stage(name: str) -> str:
    return name.split(".")[0] if name.startswith("layer") else name


def _mark_stages(ax, infos: Sequence[LayerInfo], label: bool):
    """Dotted lines between stages (layer1 ... layer4), their names above."""
    stages = [_stage(i.name) for i in infos]
    starts = [j for j in range(len(stages)) if j == 0 or stages[j] != stages[j - 1]]
    for a, b in zip(starts, starts[1:] + [len(stages)]):
        if a:
            ax.axvline(a - 0.5, color="0.5", lw=0.8, ls=":")
        if label and b - a > 1:
            ax.text((a + b - 1) / 2, 1.09, stages[a], ha="center", va="bottom", fontsize=8,
                    transform=ax.get_xaxis_transform())


def _legend_handles(kinds: Sequence[str]) -> list:
    handles = [Patch(facecolor=COLORS[n], label=LABELS[n]) for n in NORMALIZERS]
    for kind in ("stem", "conv3x3", "conv1x1", "preact"):
        if kind in kinds:
            handles.append(Patch(facecolor="white", edgecolor="black", hatch=HATCHES[kind],
                                 label=KIND_LABELS[kind]))
    if "shortcut" in kinds:
        handles.append(Line2D([], [], marker="s", color="black", ls="", markersize=5,
                              label=KIND_LABELS["shortcut"]))
    return handles


def _stacked(ax, values: np.ndarray, infos: Sequence[LayerInfo]):
    """Stacked bars of (layers, 3) ratios, hatched by kind, a square above shortcuts."""
    x = np.arange(len(infos))
    hatches = [HATCHES.get(i.kind, "") for i in infos]
    bottom = np.zeros(len(infos))
    for j, norm in enumerate(NORMALIZERS):
        ax.bar(x, values[:, j], bottom=bottom, width=0.85, color=COLORS[norm],
               edgecolor="white", linewidth=0.3, hatch=hatches)
        bottom += values[:, j]
    short = [k for k, i in enumerate(infos) if i.kind == "shortcut"]
    if short:
        ax.plot(short, [1.03] * len(short), "s", color="black", markersize=4, clip_on=False)
    ax.set_xlim(-0.6, len(infos) - 0.4)
    ax.set_ylim(0, 1)


def _layer_axis(ax, infos: Sequence[LayerInfo], rf_known: bool):
    ax.set_xticks(np.arange(len(infos)))
    ax.set_xticklabels([_tick(i) for i in infos], rotation=90, fontsize=7)
    ax.set_xlabel("SN layer in network order" + (" (receptive field in pixels)" if rf_known
                                                  else ""))


# -- the figures ----------------------------------------------------------------------------------
def average_figure(snaps: Sequence[RatioSnapshot], title: Optional[str] = None) -> Figure:
    """Fig. 1/4: network-averaged ratios of IN, LN, BN; a bar group per snapshot."""
    n = max(len(snaps), 1)
    if n <= 3:  # mu and sigma side by side
        fig = Figure(figsize=(max(6.0, 2.2 + 1.5 * n * 2), 4.2), layout="constrained")
        axes = fig.subplots(1, 2, sharey=True)
    else:  # many groups: mu above sigma, so the figure keeps a readable shape
        fig = Figure(figsize=(max(6.0, 2.0 + 1.1 * n), 7.0), layout="constrained")
        axes = fig.subplots(2, 1, sharex=True)
    width = 0.8 / len(NORMALIZERS)
    for ax, (stat, stat_label) in zip(axes, STATS):
        for g, snap in enumerate(snaps):
            avg = network_average(snap)[stat]
            for j, norm in enumerate(NORMALIZERS):
                x = g + (j - 1) * width
                ax.bar(x, avg[j], width * 0.95, color=COLORS[norm])
                ax.text(x, avg[j] + 0.01, f"{avg[j]:.2f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(snaps)))
        ax.set_xticklabels([s.label or f"model {g + 1}" for g, s in enumerate(snaps)], fontsize=9)
        ax.set_title(f"importance weights of {stat_label}", fontsize=10)
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes if n > 3 else axes[:1]:
        ax.set_ylabel("ratio averaged over SN layers")
    axes[1].legend(handles=_legend_handles(()), loc="upper right", fontsize=8)
    layers = sorted({len(s.ratios) for s in snaps})
    fig.suptitle(title or "Importance weights of IN, LN, BN averaged over all SN layers "
                 f"({'/'.join(map(str, layers))} layers)", fontsize=11)
    return fig


def layers_figure(snap: RatioSnapshot, title: Optional[str] = None) -> Figure:
    """Fig. 5: the ratios of every SN layer (stacked bars) for mu (top) and sigma (bottom)."""
    infos = _infos_for(snap.layers, snap.infos)
    n = len(infos)
    fig = Figure(figsize=(max(8.0, 2.5 + 0.22 * n), 7.5), layout="constrained")
    axes = fig.subplots(2, 1, sharex=True)
    for ax, (stat, stat_label) in zip(axes, STATS):
        values = np.array([snap.ratios[i.name][stat] for i in infos]).reshape(n, 3)
        _stacked(ax, values, infos)
        _mark_stages(ax, infos, label=ax is axes[0])
        ax.set_ylabel(f"ratios of {stat_label}")
    _layer_axis(axes[1], infos, any(i.rf is not None for i in infos))
    axes[0].legend(handles=_legend_handles({i.kind for i in infos}), fontsize=7, ncol=4,
                   loc="lower left", bbox_to_anchor=(0, 1.12), frameon=False)
    name = f" \u2014 {snap.label}" if snap.label else ""
    fig.suptitle(title or f"Importance weights of each SN layer ({n} layers){name}", fontsize=11)
    return fig


def _grid(n_panels: int, cols: int = 8) -> Tuple[Figure, List]:
    """A grid of small panels with fixed margins (a layout engine is slow on many axes)."""
    cols = max(1, min(cols, n_panels))
    rows = math.ceil(n_panels / cols)
    width, height = 1.9 * cols + 0.7, 1.45 * rows + 1.1
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(left=0.8 / width, right=1 - 0.15 / width, bottom=0.55 / height,
                        top=1 - 0.75 / height, wspace=0.12, hspace=0.45)
    axes = np.atleast_1d(fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False))
    axes = list(axes.ravel())
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    for ax in axes[max(0, n_panels - cols):n_panels]:  # the lowest panel of each column
        ax.xaxis.set_tick_params(labelbottom=True)
    return fig, axes


def _panel_title(ax, info: LayerInfo):
    rf = f" RF {info.rf}" if info.rf is not None else ""
    ax.set_title(f"{info.name}{rf}", fontsize=7)
    ax.tick_params(labelsize=6)


def dynamics_figure(history: RatioHistory, stat: str, infos: Sequence[LayerInfo] = (),
                    title: Optional[str] = None) -> Figure:
    """Fig. 7 (a, b): the ratios of ``stat`` ("mean" or "var") of each layer over training."""
    layers = _infos_for(history.layers, infos)
    fig, axes = _grid(len(layers))
    epochs = np.asarray(history.epochs)
    for ax, info in zip(axes, layers):
        values = history.series[info.name][stat]
        for j, norm in enumerate(NORMALIZERS):
            if norm in info.normalizers:
                ax.plot(epochs, values[:, j], color=COLORS[norm], lw=1.2)
        ax.set_ylim(-0.02, 1.02)
        _panel_title(ax, info)
    fig.supxlabel("epoch", fontsize=9)
    fig.supylabel("ratio", fontsize=9, x=0.1 / fig.get_figwidth())
    fig.legend(handles=_legend_handles(()), loc="upper right", ncol=3, fontsize=8,
               frameon=False)
    label = dict(STATS)[stat]
    fig.suptitle(title or f"Ratios of {label} of each SN layer during training"
                 + (f" \u2014 {history.label}" if history.label else ""), fontsize=11)
    return fig


def _rf_groups(infos: Sequence[LayerInfo]) -> List[Tuple[str, List[str]]]:
    groups = []
    if any(i.rf is not None for i in infos):
        for lo, hi in RF_BINS:
            names = [i.name for i in infos if i.rf is not None and lo <= i.rf < hi]
            if names:
                groups.append((f"RF {lo}\u2013{hi - 1}" if lo else f"RF < {hi}", names))
    groups.append(("ALL layers", [i.name for i in infos]))
    return groups


def divergence_figure(history: RatioHistory, infos: Sequence[LayerInfo] = (),
                      eps: float = DEFAULT_EPS, title: Optional[str] = None) -> Figure:
    """Fig. 7 (c): D(l_mu || l_sigma) of each layer over training, and averages by RF range."""
    layers = _infos_for(history.layers, infos)
    div = history.divergence(eps)
    groups = _rf_groups(layers)
    fig, axes = _grid(len(layers) + len(groups))
    epochs = np.asarray(history.epochs)
    for ax, info in zip(axes, layers):
        ax.plot(epochs, div[info.name], color="black", lw=1.2)
        _panel_title(ax, info)
    for ax, (name, members) in zip(axes[len(layers):], groups):
        ax.plot(epochs, np.mean([div[m] for m in members], axis=0), color="purple", lw=1.5)
        ax.set_title(f"{name} (mean of {len(members)})", fontsize=7, color="purple")
        ax.tick_params(labelsize=6)
    fig.supxlabel("epoch", fontsize=9)
    fig.supylabel("D(\u03bb\u03bc \u2016 \u03bb\u03c3)", fontsize=9, x=0.1 / fig.get_figwidth())
    fig.suptitle(title or "Divergence D(\u03bb\u03bc \u2016 \u03bb\u03c3) = KL(\u03bc\u2016\u03c3)"
                 " + KL(\u03c3\u2016\u03bc) between the ratios of \u03bc and \u03c3 of each SN "
                 "layer" + (f" \u2014 {history.label}" if history.label else "")
                 + f" (\u03b5 = {eps:g})", fontsize=11)
    return fig


def differing_layers(snap: RatioSnapshot) -> List[str]:
    """Layers whose hard ratios pick different normalizers for mu and sigma."""
    return [n for n, c in hard_choices(snap).items() if c["mean"] != c["var"]]


def changed_layers(a: RatioSnapshot, b: RatioSnapshot) -> List[str]:
    """Layers whose hard ratio of mu or sigma differs between two snapshots."""
    ha, hb = hard_choices(a), hard_choices(b)
    return [n for n in ha if n in hb and ha[n] != hb[n]]


def hard_ratio_figure(snaps: Sequence[RatioSnapshot], title: Optional[str] = None) -> Figure:
    """Fig. 8: the hard ratios (argmax) of sigma and mu of each layer at several snapshots."""
    infos = _infos_for(snaps[0].layers, snaps[0].infos)
    n = len(infos)
    fig = Figure(figsize=(max(8.0, 2.5 + 0.22 * n), 1.3 + 1.6 * len(snaps) + 1.2),
                 layout="constrained")
    axes = np.atleast_1d(fig.subplots(len(snaps), 1, sharex=True, squeeze=False)).ravel()
    for ax, snap in zip(axes, snaps):
        choices = hard_choices(snap)
        for row, stat in ((1, "var"), (0, "mean")):
            colors = [COLORS[choices[i.name][stat]] for i in infos]
            ax.bar(np.arange(n), 0.8, bottom=row - 0.4, width=0.85, color=colors,
                   edgecolor="white", linewidth=0.3, hatch=[HATCHES.get(i.kind, "")
                                                           for i in infos])
        short = [k for k, i in enumerate(infos) if i.kind == "shortcut"]
        if short:
            ax.plot(short, [1.58] * len(short), "s", color="black", markersize=4)
        ax.set_yticks([0, 1])
        ax.set_yticklabels(["\u03bc", "\u03c3"])
        ax.set_ylim(-0.5, 1.75)
        ax.set_xlim(-0.6, n - 0.4)
        diff = len(differing_layers(snap))
        ax.set_title(f"{snap.label}: {diff}/{n} layers ({100 * diff / max(n, 1):.0f}%) pick "
                     "different normalizers for \u03bc and \u03c3", fontsize=9, loc="left")
    _layer_axis(axes[-1], infos, any(i.rf is not None for i in infos))
    fig.legend(handles=_legend_handles({i.kind for i in infos}), loc="outside lower center",
               ncol=8, fontsize=7)
    changes = [f"{a.label} \u2192 {b.label}: {len(changed_layers(a, b))}"
               for a, b in zip(snaps, snaps[1:])]
    sub = f"\nlayers whose hard ratios changed: {'; '.join(changes)}" if changes else ""
    fig.suptitle((title or "Hard ratios (argmax) of each SN layer") + sub, fontsize=10)
    return fig


def ratio_figures(model: nn.Module, label: str = "") -> Dict[str, Figure]:
    """The figures of the current ``model`` for TensorBoard: ``{"ratios/average": Fig. 1/4
    style, "ratios/layers": Fig. 5 style}``; empty when it has no SN layer."""
    snap = snapshot(model, label)
    if not snap.ratios:
        return {}
    return {"ratios/average": average_figure([snap]), "ratios/layers": layers_figure(snap)}


def save_figure(fig: Figure, stem: str, formats: Sequence[str] = ("png", "svg"),
                dpi: int = 100) -> List[str]:
    """Write ``stem.<fmt>`` for every format; returns the paths."""
    paths = []
    for fmt in formats:
        path = f"{stem}.{fmt}"
        fig.savefig(path, dpi=dpi)
        paths.append(path)
    return paths


def history_from_tensorboard(logdir: str, label: str = "") -> Optional[RatioHistory]:
    """The ratios the trainer logs each epoch (scalars ``ratios/<layer>/<mean|var>/<norm>``)
    from the TensorBoard events in ``logdir``; None when there are none. A step logged
    twice (a resumed run) keeps its last value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(logdir, size_guidance={"scalars": 0})
    acc.Reload()
    values: Dict[str, Dict[str, Dict[str, Dict[int, float]]]] = {}
    for tag in acc.Tags().get("scalars", []):
        if not tag.startswith("ratios/"):
            continue
        layer, stat, norm = tag[len("ratios/"):].rsplit("/", 2)
        if stat not in ("mean", "var") or norm not in NORMALIZERS:
            continue
        steps = values.setdefault(layer, {}).setdefault(stat, {}).setdefault(norm, {})
        for event in acc.Scalars(tag):
            steps[event.step] = event.value
    if not values:
        return None
    epochs = sorted({s for layer in values.values() for stat in layer.values()
                     for norm in stat.values() for s in norm})
    series = {layer: {stat: np.array([[by_norm.get(n, {}).get(e, 0.0) for n in NORMALIZERS]
                                      for e in epochs]) for stat, by_norm in stats.items()}
              for layer, stats in values.items()}
    return RatioHistory(epochs, series, label)
