"""The typed configuration: YAML with ``_base_`` inheritance, dotted overrides, derived values.

One schema of dataclasses, one per section, every key with a default and a
help text (``python train.py --help-config`` prints them). Loading:

1. ``_base_`` (a path or a list of paths, relative to the file) is loaded
   first, recursively, and the file's own keys are merged on top (dicts merge
   key by key; any other value replaces);
2. command-line overrides ``a.b=value`` are applied (values parsed as YAML);
3. the result is checked against the schema: an unknown key or a wrong type
   is a one-line ``ConfigError`` naming the key and the closest valid key;
4. ``resolve(cfg, world_size)`` fills in the derived values (virtual GPUs per
   process, per-process batch, total batch, scaled learning rate).

Only ``train.py``, ``evaluate.py`` and the ``build_*`` factories read it.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import yaml

from data.config import DataConfig

__all__ = ["Config", "ConfigError", "MODEL_NAMES", "NORM_NAMES", "load_config",
           "config_from_dict", "resolve", "to_dict", "from_dict", "strip_derived",
           "apply_overrides", "format_config", "describe_schema", "RESUMABLE_KEYS",
           "config_fingerprint", "config_differences"]


class ConfigError(ValueError):
    """A bad config file or override; the message names the key (and the file or the
    override it came from). ``key``: the dotted key at fault, when there is one."""

    def __init__(self, message: str, key: Optional[str] = None):
        super().__init__(message)
        self.key = key


#: The names ``models.build_model`` and ``normalization.build_norm`` accept, kept here so that
#: a config is checked (``--print-config``, ``--help-config``) without importing torch;
#: tests/engine/test_config.py checks that they equal the registries.
MODEL_NAMES = tuple(f"resnet{depth}_{version}" for version in ("v1", "v2")
                    for depth in (18, 34, 50, 101, 152))
NORM_NAMES = ("bn", "syncbn", "gn", "in", "ln", "sn", "syncsn", "ssn", "none")


def _h(text: str, **extra) -> dict:
    return {"help": text, **extra}


@dataclass
class ModelConfig:
    name: str = field(default="resnet50_v1", metadata=_h(
        "architecture: resnet{18,34,50,101,152}_{v1,v2}", choices=MODEL_NAMES))
    norm: str = field(default="sn", metadata=_h(
        "normalizer: bn, syncbn, gn, in, ln, sn, syncsn, ssn, none", choices=NORM_NAMES))
    num_classes: int = field(default=1000, metadata=_h("number of output classes"))
    norm_kwargs: Dict[str, Any] = field(default_factory=dict, metadata=_h(
        "extra arguments of the normalizer, e.g. {using_bn: false} for SN at (8, 1), "
        "{momentum: 0.9}, {variance: authors}, {num_groups: 32} for GN"))
    zero_init_last: bool = field(default=True, metadata=_h(
        "zero-initialise the last norm's gamma of each residual block (the authors' last_gamma)"))
    dropout: float = field(default=0.0, metadata=_h("dropout before the classifier"))
    stem: str = field(default="imagenet", metadata=_h(
        "'imagenet' (7x7/2 conv + max-pool) or 'small' (3x3/1 conv, for tiny images)",
        choices=("imagenet", "small")))
    stem_pool: str = field(default="torchvision", metadata=_h(
        "the imagenet stem's 3x3/2 max-pool: 'torchvision' (padding 1) or 'ceil' (no padding, "
        "ceil mode: the authors' ResNetV1SSN, Sparse_SwitchNorm)",
        choices=("torchvision", "ceil")))
    width: int = field(default=64, metadata=_h("channels of the stem and the first stage"))
    drop_path_rate: float = field(default=0.0, metadata=_h(
        "stochastic depth of the last residual block, linear from 0 over the blocks "
        "(timm's drop_path_rate); 0: none, as in the paper"))


@dataclass
class BatchConfig:
    gpus: int = field(default=8, metadata=_h(
        "#GPUs of the paper's batch setting (#GPUs, #samples per GPU); the processes of a "
        "run share them as virtual GPUs (each process holds gpus / world_size)"))
    per_gpu: int = field(default=32, metadata=_h(
        "#samples per GPU: batch statistics are computed over chunks of this many samples"))
    world_size: Optional[int] = field(default=None, metadata=_h(
        "derived: number of processes", derived=True))
    virtual_gpus: Optional[int] = field(default=None, metadata=_h(
        "derived: GPUs of the setting held by each process (gpus / world_size)", derived=True))
    per_process: Optional[int] = field(default=None, metadata=_h(
        "derived: samples loaded per process and iteration (per_gpu * virtual_gpus)",
        derived=True))
    total: Optional[int] = field(default=None, metadata=_h(
        "derived: samples per iteration over all processes (gpus * per_gpu)", derived=True))


@dataclass
class OptimConfig:
    base_lr: float = field(default=0.1, metadata=_h(
        "learning rate per reference_batch samples (linear scaling rule)"))
    reference_batch: int = field(default=256, metadata=_h(
        "batch size that base_lr refers to"))
    lr: Optional[float] = field(default=None, metadata=_h(
        "derived: base_lr * gpus * per_gpu / reference_batch", derived=True))
    momentum: float = field(default=0.9, metadata=_h("SGD momentum"))
    nesterov: bool = field(default=False, metadata=_h("Nesterov momentum"))
    weight_decay: float = field(default=1e-4, metadata=_h("weight decay of the weights"))
    norm_weight_decay: Optional[float] = field(default=None, metadata=_h(
        "weight decay of normalization affine parameters (gamma, beta); null: weight_decay "
        "(the paper decays all parameters)"))
    ratio_weight_decay: Optional[float] = field(default=None, metadata=_h(
        "weight decay of SN's ratio logits (mean_weight, var_weight); null: weight_decay "
        "(the SSN recipe uses 0)"))
    bias_weight_decay: Optional[float] = field(default=None, metadata=_h(
        "weight decay of other biases (the classifier's); null: weight_decay"))
    ratio_lr_scale: float = field(default=1.0, metadata=_h(
        "learning-rate multiplier of the ratio logits (the SSN recipe uses 0.1)"))
    grad_clip: Optional[float] = field(default=None, metadata=_h(
        "clip the global gradient norm to this value (null: off)"))
    ratio_grad_clip: Optional[float] = field(default=None, metadata=_h(
        "clip the gradient norm of the ratio logits to this value (the SSN recipe uses 1.0)"))
    label_smoothing: float = field(default=0.0, metadata=_h("label smoothing of the loss"))


@dataclass
class ScheduleConfig:
    name: str = field(default="step", metadata=_h(
        "'step' (x gamma at each milestone) or 'cosine'; both per iteration, after warm-up",
        choices=("step", "cosine")))
    warmup_epochs: float = field(default=0.0, metadata=_h(
        "linear warm-up length in epochs (from warmup_factor * lr to lr)"))
    warmup_factor: float = field(default=0.0, metadata=_h(
        "learning rate at the start of warm-up, as a fraction of lr"))
    milestones: List[float] = field(default_factory=lambda: [30, 60, 90], metadata=_h(
        "step: epochs at which the learning rate is multiplied by gamma"))
    gamma: float = field(default=0.1, metadata=_h("step: decay factor"))
    min_lr: float = field(default=0.0, metadata=_h("cosine: final learning rate"))


@dataclass
class TrainConfig:
    epochs: int = field(default=100, metadata=_h("training epochs"))
    seed: int = field(default=0, metadata=_h(
        "seed of the weights' initialisation, the data order and the augmentation"))
    deterministic: bool = field(default=False, metadata=_h(
        "deterministic algorithms (bit-identical reruns and resumes on the CPU; slower on GPUs)"))
    device: str = field(default="auto", metadata=_h(
        "'auto' (CUDA when available), 'cuda' or 'cpu'", choices=("auto", "cuda", "cpu")))
    amp: str = field(default="none", metadata=_h(
        "mixed precision on GPUs: 'none', 'bf16' or 'fp16' (with a gradient scaler)",
        choices=("none", "bf16", "fp16")))
    channels_last: bool = field(default=False, metadata=_h("NHWC memory format on GPUs"))
    compile: bool = field(default=False, metadata=_h("torch.compile the model"))
    compile_backend: str = field(default="inductor", metadata=_h(
        "torch.compile backend with train.compile (inductor; aot_eager to check tracing "
        "without code generation)"))
    grad_checkpointing: bool = field(default=False, metadata=_h(
        "recompute each residual block in the backward pass instead of storing its "
        "activations (less memory, more compute); running statistics still move once"))
    print_freq: int = field(default=50, metadata=_h("iterations between progress lines"))
    max_iters: Optional[int] = field(default=None, metadata=_h(
        "stop after this many iterations in total (smoke tests); null: the whole schedule"))
    eval_every: int = field(default=1, metadata=_h("validate every this many epochs"))
    batch_average_samples: int = field(default=0, metadata=_h(
        "before each validation, replace the BN-branch statistics by their average over "
        "training minibatches of about this many samples in all (paper Sec. 4.1.3: 50000); "
        "0: use the moving average"))
    ssn_radius_epochs: Optional[float] = field(default=None, metadata=_h(
        "SSN: the sparsestmax radius grows linearly from 0 to 1 over this many epochs "
        "(null: the whole training)"))
    resume: str = field(default="auto", metadata=_h(
        "output_dir holding checkpoint_last.pth: 'auto' resumes it when the config is the "
        "same except the keys of engine.config.RESUMABLE_KEYS (e.g. train.epochs to extend "
        "the run) and refuses otherwise; 'force' continues it with this config anyway (the "
        "old config.yaml is kept as config.before_step<N>.yaml)", choices=("auto", "force")))


@dataclass
class CheckpointConfig:
    every_iters: int = field(default=0, metadata=_h(
        "also write checkpoint_last.pth every this many iterations (0: only at epoch ends)"))
    resume: bool = field(default=True, metadata=_h(
        "kept for old configs (see train.resume): true resumes as train.resume says; false "
        "refuses to start in an output_dir that already holds a checkpoint"))
    init: Optional[str] = field(default=None, metadata=_h(
        "initialise the weights from this checkpoint (finetuning), before training"))


@dataclass
class LogConfig:
    tensorboard: bool = field(default=True, metadata=_h("write TensorBoard events"))
    ratio_figures: bool = field(default=True, metadata=_h(
        "write the SN ratio figures to TensorBoard at each epoch"))


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)
    output_dir: Optional[str] = field(default=None, metadata=_h(
        "where the run writes; null: runs/<config file name>"))


#: The keys that may differ between a run's checkpoint and the config that resumes it (the
#: one list; docs/training.md quotes it). They say how long to train, where the data are and
#: how the run is executed and logged, never what is trained. Derived values (world size,
#: virtual GPUs per process, per-process batch, lr) follow from the others and are not
#: compared either, so a run may resume on another number of processes.
RESUMABLE_KEYS = (
    "output_dir",                                     # the folder may be moved
    "train.epochs", "train.max_iters",                # extend (or end) the run
    "train.print_freq", "train.eval_every", "train.compile", "train.compile_backend",
    "train.resume",
    "train.grad_checkpointing",                       # same gradients and buffers
    "data.root", "data.workers", "data.prefetch_factor", "data.pin_memory",
    "data.dali_verify", "data.on_bad_image",
    "checkpoint.every_iters", "checkpoint.init", "checkpoint.resume",
    "log.tensorboard", "log.ratio_figures",
)


# -- reading files ----------------------------------------------------------------------------
def _read_yaml(path: str) -> dict:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _load_with_bases(path: str, seen: tuple = ()) -> dict:
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"{path}: _base_ inheritance cycle")
    data = _read_yaml(path)
    bases = data.pop("_base_", [])
    if isinstance(bases, str):
        bases = [bases]
    merged: dict = {}
    for base in bases:
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        merged = _merge(merged, _load_with_bases(base_path, seen + (path,)))
    return _merge(merged, data)


# -- overrides --------------------------------------------------------------------------------
def apply_overrides(data: dict, overrides: List[str]) -> dict:
    """``a.b=value`` pairs (values parsed as YAML) merged into ``data``."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. train.epochs=1")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = value
    return data


# -- schema checking ----------------------------------------------------------------------------
def _fields(cls) -> Dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _all_keys(cls, prefix: str = "") -> List[str]:
    hints = typing.get_type_hints(cls)
    keys = []
    for name in _fields(cls):
        key = prefix + name
        if dataclasses.is_dataclass(hints[name]):
            keys += _all_keys(hints[name], key + ".")
        else:
            keys.append(key)
    return keys


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, _all_keys(Config), n=1, cutoff=0.5)
    if not close:
        last = key.rsplit(".", 1)[-1]
        close = [k for k in _all_keys(Config) if k.rsplit(".", 1)[-1] == last]
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}", key)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str):
    try:
        return _coerce_value(value, tp, key)
    except ConfigError as e:
        raise ConfigError(str(e), key) from None


def _coerce_value(value, tp, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce_value(value, inner[0], key)
    if tp is Any:
        return value
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce_value(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-4 (no dot, no exponent sign) as a string
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp is bool and isinstance(value, bool):
        return value
    if tp is str and isinstance(value, str):
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} "
                      f"({type(value).__name__})")


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            while isinstance(value, dict) and value:  # report the full dotted key
                sub, value = next(iter(value.items()))
                key = f"{key}.{sub}"
            raise _unknown(prefix + key)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value or {}, prefix + key + ".")
        else:
            kwargs[key] = _coerce(value, tp, prefix + key)
            _check_choice(prefix + key, kwargs[key], fields[key].metadata.get("choices"))
    return cls(**kwargs)


def _check_choice(key: str, value, choices: Optional[tuple]):
    if not choices or value in choices:
        return
    close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, choices))}{hint}",
                      key)


def from_dict(data: dict) -> Config:
    """Check a nested dict against the schema and build the Config."""
    cfg = _build(Config, data)
    try:
        cfg.data.validate()
    except ValueError as e:  # "data.<key>: ..."
        raise ConfigError(str(e), str(e).split(":", 1)[0]) from None
    _check_statistics(cfg)
    return cfg


def _check_statistics(cfg: Config):
    """SN without moving averages (paper Sec. 4.1.3) is evaluated with batch averages only."""
    if not cfg.model.norm_kwargs.get("using_moving_average", True) and \
            cfg.train.batch_average_samples <= 0:
        raise ConfigError(
            "model.norm_kwargs.using_moving_average is false, so the running statistics never "
            "change and validation would use their initial values: set "
            "train.batch_average_samples > 0 (paper Sec. 4.1.3: 50000)",
            "model.norm_kwargs.using_moving_average")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def strip_derived(data: dict) -> dict:
    """A copy of a config dict without the values ``resolve`` derives (a stored config
    becomes loadable again for another world size)."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        if dataclasses.is_dataclass(hints[f.name]) and isinstance(out.get(f.name), dict):
            for sub in dataclasses.fields(hints[f.name]):
                if sub.metadata.get("derived"):
                    out[f.name].pop(sub.name, None)
    return out


def _comparable(data: dict) -> Dict[str, Any]:
    """``section.key -> value`` of a config dict, without derived and resumable keys."""
    flat: Dict[str, Any] = {}
    for name, value in strip_derived(data).items():
        if isinstance(value, dict) and name in _fields(Config):
            flat.update((f"{name}.{key}", v) for key, v in value.items())
        else:
            flat[name] = value
    return {k: v for k, v in flat.items() if k not in RESUMABLE_KEYS}


def config_fingerprint(cfg) -> str:
    """A hash of what a run trains: the config without derived and ``RESUMABLE_KEYS``."""
    data = to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    text = json.dumps(_comparable(data), sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def config_differences(stored: dict, cfg: Config) -> List[Tuple[str, Any, Any]]:
    """``(key, stored value, cfg's value)`` for every key that may not change on resume.
    A key the schema gained since ``stored`` was written counts with its default; a key it
    lost is ignored."""
    old, new = _comparable(stored), _comparable(to_dict(cfg))
    defaults = _comparable(to_dict(Config()))
    return [(key, old.get(key, defaults.get(key)), value) for key, value in sorted(new.items())
            if old.get(key, defaults.get(key)) != value]


def load_config(path: Optional[str], overrides: Optional[List[str]] = None) -> Config:
    """Load ``path`` (with its bases) and the overrides into a checked Config."""
    cfg = config_from_dict(_load_with_bases(path) if path else {}, overrides, path)
    if cfg.output_dir is None and path:
        cfg.output_dir = os.path.join("runs", os.path.splitext(os.path.basename(path))[0])
    return cfg


def config_from_dict(data: dict, overrides: Optional[List[str]] = None,
                     origin: Optional[str] = None) -> Config:
    """``data`` with the overrides applied, checked. An error names where the bad value
    came from: the command-line override that set its key, else ``origin`` (the file)."""
    overrides = list(overrides or [])
    data = apply_overrides(data, overrides)
    try:
        return from_dict(data)
    except ConfigError as e:
        item = _override_of(e.key, overrides)
        where = f"override {item!r}" if item else origin
        raise ConfigError(f"{where}: {e}" if where else str(e), e.key) from None


def _override_of(key: Optional[str], overrides: List[str]) -> Optional[str]:
    """The last override that set ``key`` (itself or a section above it), if any."""
    if not key:
        return None
    key = key.split("[", 1)[0]
    for item in reversed(overrides):
        name = item.split("=", 1)[0].strip()
        if key == name or key.startswith(name + "."):
            return item
    return None


# -- derived values -----------------------------------------------------------------------------
def resolve(cfg: Config, world_size: int) -> Config:
    """Fill in the derived values of the batch setting for ``world_size`` processes."""
    b = cfg.batch
    if b.gpus < 1 or b.per_gpu < 1:
        raise ConfigError(f"batch.gpus and batch.per_gpu must be >= 1, got ({b.gpus}, {b.per_gpu})")
    if b.gpus % world_size:
        raise ConfigError(
            f"batch.gpus={b.gpus} is not divisible by the world size {world_size}: each process "
            f"must hold the same number of virtual GPUs; run with a world size that divides "
            f"{b.gpus} (e.g. {', '.join(str(d) for d in _divisors(b.gpus))})")
    b.world_size = world_size
    b.virtual_gpus = b.gpus // world_size
    b.per_process = b.per_gpu * b.virtual_gpus
    b.total = b.gpus * b.per_gpu
    cfg.optim.lr = cfg.optim.base_lr * b.total / cfg.optim.reference_batch
    return cfg


def _divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def format_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def describe_schema(cls=Config, prefix: str = "") -> str:
    """Every key with its default and help text, for ``--help-config``."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = prefix + f.name
        if dataclasses.is_dataclass(hints[f.name]):
            lines.append(f"\n{key}:")
            lines.append(describe_schema(hints[f.name], key + "."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  {key} = {default!r}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)
