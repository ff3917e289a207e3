"""Normalization layers of the Switchable Normalization framework.

One factory over every normalizer of the paper (``build_norm``), the fused SN
implementation, sparse SN, SyncBN/SyncSN, ghost batches, batch-average
inference, and the helpers to read and switch the importance ratios.
"""
__version__ = "0.1.0"

from .batch_average import (abort_batch_average, batch_stat_layers, begin_batch_average,
                            finalize_batch_average, set_ghost_batches, update_batch_average)
from .batchnorm import BatchNorm2d, SyncBatchNorm2d
from .convert import convert_norm, convert_sync, replace_modules
from .ratios import ratios, set_hard_ratios, switch_layers
from .registry import (BATCH_STAT_NAMES, NORM_LAYERS, SWITCH_LAYERS, SYNC_NAMES, build_norm,
                       get_norm_layer, list_norms)
from .simple import GroupNorm, InstanceNorm2d, LayerNorm2d, NoNorm
from .sparse import (SparseSwitchNorm2d, hold_frozen_ratios, set_ssn_radius, sparsemax,
                     sparsestmax)
from .switchable import SwitchNorm1d, SwitchNorm2d, SwitchNorm3d, SyncSwitchNorm2d

__all__ = [
    "build_norm", "get_norm_layer", "list_norms", "NORM_LAYERS", "SWITCH_LAYERS",
    "BATCH_STAT_NAMES", "SYNC_NAMES",
    "BatchNorm2d", "SyncBatchNorm2d", "GroupNorm", "InstanceNorm2d", "LayerNorm2d", "NoNorm",
    "SwitchNorm1d", "SwitchNorm2d", "SwitchNorm3d", "SyncSwitchNorm2d", "SparseSwitchNorm2d",
    "sparsemax", "sparsestmax", "set_ssn_radius", "hold_frozen_ratios",
    "ratios", "set_hard_ratios", "switch_layers",
    "convert_norm", "convert_sync", "replace_modules",
    "begin_batch_average", "finalize_batch_average", "abort_batch_average",
    "update_batch_average", "batch_stat_layers", "set_ghost_batches",
]
