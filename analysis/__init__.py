"""Analysis of trained SN models: the importance-ratio figures of the paper (Fig. 1, 4, 5, 7, 8).

``ratio_figures(model)`` returns the figures of one model for TensorBoard;
``tools/plot_ratios.py`` draws them for checkpoints and runs, with the
numbers as CSV/JSON.
"""
from .ratio_figures import (COLORS, LayerInfo, RatioHistory, RatioSnapshot, average_figure,
                            divergence_figure, dynamics_figure, hard_ratio_figure, layer_infos,
                            layers_figure, network_average, ratio_figures, snapshot,
                            symmetric_kl)

__all__ = ["COLORS", "LayerInfo", "RatioHistory", "RatioSnapshot", "average_figure",
           "divergence_figure", "dynamics_figure", "hard_ratio_figure", "layer_infos",
           "layers_figure", "network_average", "ratio_figures", "snapshot", "symmetric_kl"]
