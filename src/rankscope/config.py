"""The typed configuration tree of a run, loaded from YAML with `--set a.b=c` overrides.

Unknown keys and invalid values raise `ConfigError` naming the key and the closest valid keys.
The method section is dynamic: its keys are the chosen method's own `Settings` dataclass,
whose defaults depend on the model preset (e.g. the literature's rank per scale).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rankscope.errors import ConfigError, did_you_mean

# The full-rank method every other one is compared against (studies, analysis, scaling, bench):
# named once, here. (MethodSection.name's default spells it as a literal: the CLI reads defaults
# from the source without importing it.)
REFERENCE_METHOD = "full"


@dataclass
class ModelSection:
    """Which LLaMA shape to build: a preset, optionally with fields of it overridden."""

    preset: str = "tiny"  # model size: one of rankscope.models.PRESETS (tiny for tests and CPU demos)
    # Fields of `LlamaConfig` to override, e.g. {"num_layers": 2}. vocab_size defaults to the
    # tokenizer's size (rounded up to a multiple of 64) unless given here.
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    # "embedded" (the corpus shipped with the install), a local .txt / .jsonl / .json.gz file or a
    # folder of them, or "hf:NAME[:CONFIG]" / a local `datasets` folder for Hugging Face data sets.
    source: str = "embedded"
    # "bpe": a byte-level BPE trained on the training text and cached; otherwise any name or local
    # path that transformers.AutoTokenizer loads (e.g. "t5-base" where the HF cache has it).
    tokenizer: str = "bpe"
    vocab_size: int = 8192  # vocabulary of the bpe tokenizer trained here (data.tokenizer bpe)
    seq_len: int = 128  # tokens per training sequence
    val_sequences: int = 128  # held-out sequences for the validation loss
    probe_sequences: int = 64  # the fixed probe set that analysis evaluates every checkpoint on
    text_field: str = "text"  # the field of a .jsonl / .json.gz record (or HF example) that holds the text
    hf_split: str = "train"  # the Hugging Face split to train on
    hf_val_split: str = "validation"  # the Hugging Face split for validation and probe data
    streaming: bool = False  # read a Hugging Face data set as a stream instead of downloading it whole
    # Upper bound on training tokens read from the source (0 = everything); bounds streaming reads.
    max_train_tokens: int = 0
    # Where tokenizers and token shards are cached; "" = $RANKSCOPE_CACHE or ~/.cache/rankscope.
    cache_dir: str = ""


@dataclass
class OptimConfig:
    # None means "the method's default" (each method declares the literature's values).
    lr: float | None = None  # peak learning rate
    weight_decay: float | None = None  # AdamW-style decoupled weight decay (None = the method's default)
    # Which parameters decay: "all" (every trainable tensor) or "matrices" (not norm gains, biases
    # or scalar scales). None = the method's official harness (see docs/methods.md).
    weight_decay_scope: str | None = None
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float | None = None  # the optimizer's epsilon (None = the method's default)
    grad_clip: float | None = None  # max global gradient norm, 0 = no clipping (None = the method's default)
    # Per-role settings for the parameters that are not the method's (rankscope.optim.roles):
    # the token embeddings, the LM head and the norm gains. None = what the method's optimizer
    # gives them (its main lr and weight decay, as every official harness does); a value moves them
    # into a group of their own at that absolute value, for every method alike.
    embed_lr: float | None = None
    head_lr: float | None = None
    norm_lr: float | None = None
    embed_weight_decay: float | None = None
    head_weight_decay: float | None = None
    norm_weight_decay: float | None = None
    warmup_ratio: float = 0.1  # linear warmup over this fraction of train.steps (unless warmup_steps is set)
    warmup_steps: int | None = None  # linear warmup steps; None = warmup_ratio x train.steps
    min_lr_ratio: float = 0.1  # the cosine decay ends at min_lr_ratio x lr
    # dtype of the optimizer's moment/projector state: "fp32" (default, every method: Adam's second
    # moment cannot decay in bf16, since v * 0.999 rounds back to v) or "param" (the parameter's
    # dtype, i.e. bf16 under train.precision=bf16-pure: the papers' bf16 harness, bit for bit).
    state_dtype: str = "fp32"


@dataclass
class TrainConfig:
    steps: int = 300  # optimizer steps
    batch_size: int = 8  # global batch, in sequences
    micro_batch_size: int = 0  # per process and forward pass; 0 = the whole per-process batch
    seed: int = 0  # model init, data order and every random choice of the method
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "fp32"  # fp32 | bf16-autocast | bf16-pure (the literature's protocol)
    compile: bool = False  # torch.compile the model
    # Recompute each decoder layer's activations in the backward pass (less memory, ~1/3 more compute).
    activation_checkpointing: bool = False
    # On CUDA, let fp32 matmuls use TensorFloat-32 (torch.set_float32_matmul_precision("high")).
    tf32: bool = True
    # Data parallelism over processes (torchrun): "ddp" replicates the model; "fsdp" shards it (FSDP2).
    parallel: str = "ddp"
    dist_timeout_min: float = 60.0  # process-group timeout: how long ranks wait for rank 0's checkpoint or measurement
    eval_every: int = 100  # steps between validation losses; 0 = only at the end
    eval_batch_size: int = 16  # sequences per validation forward pass
    log_every: int = 10  # steps between lines of metrics.jsonl
    checkpoint_every: int = 0  # steps between checkpoints; 0 = none besides checkpoint_steps and the last step
    checkpoint_steps: list[int] = field(default_factory=list)  # extra checkpoint steps, e.g. 100,200,300
    keep_last_checkpoints: int = 0  # 0 keeps every checkpoint (analysis needs them)
    nonfinite: str = "stop"  # stop | skip
    tensorboard: bool = False  # also write the metrics to RUN_DIR/tensorboard
    # Training dynamics (rankscope.train.dynamics): every `dynamics_every` steps, the spectral
    # norms of each targeted matrix's update, weight and factors, and per-group gradient norms,
    # go to metrics.jsonl; 0 turns them and the loss-spike detector off.
    dynamics_every: int = 100
    dynamics_power_iters: int = 30  # block power-iteration steps per spectral norm (warm-started)
    spike_factor: float = 1.2  # a loss above spike_factor x the running median is a spike
    spike_window: int = 50  # steps in that running median


@dataclass
class MethodSection:
    name: str = "full"  # the training method (`rankscope methods` lists them)
    settings: Any = None  # the method's Settings dataclass instance, resolved by `resolve_method`


@dataclass
class RunConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodSection = field(default_factory=MethodSection)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


CHOICES = {
    "train.precision": ("fp32", "bf16-autocast", "bf16-pure"),
    "train.nonfinite": ("stop", "skip"),
    "train.parallel": ("ddp", "fsdp"),
    "optim.state_dtype": ("fp32", "param"),
}

POSITIVE = {
    "data.vocab_size", "data.seq_len", "data.val_sequences", "data.probe_sequences",
    "train.steps", "train.batch_size", "train.eval_batch_size", "train.log_every",
    "train.dist_timeout_min",
}


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass



def merge_trees(base: dict, extra: dict | None) -> dict:
    """A deep copy of the config tree `base` with `extra` merged over it (mappings merge key by
    key; any other value of `extra` replaces `base`'s)."""
    out = copy.deepcopy(base)
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_trees(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out

def config_to_dict(obj: Any) -> Any:
    if isinstance(obj, MethodSection):
        out = {"name": obj.name}
        if obj.settings is not None:
            out.update(config_to_dict(obj.settings))
        return out
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: config_to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [config_to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: config_to_dict(v) for k, v in obj.items()}
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert `value` (from YAML or a --set string) to the annotated type `tp`, or raise."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if tp is Any:
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]  # `--set train.checkpoint_steps=20` reads as one number
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [coerce(v, item_tp, key) for v in value]
    if origin is tuple:
        args = [a for a in typing.get_args(tp) if a is not Ellipsis] or [Any]
        if isinstance(value, str):
            value = [v for v in (s.strip() for s in value.split(",")) if v]
        elif isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(coerce(v, args[0], key) for v in value)
    if origin is dict or tp is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value) or {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                try:
                    as_float = float(value)
                except ValueError:
                    as_float = None
                if as_float is not None and as_float.is_integer():
                    return int(as_float)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{key}: cannot read {value!r} as {_type_name(tp)}")


def dataclass_from_dict(cls: type, data: dict, prefix: str, base: Any = None) -> Any:
    """Build (or update a copy of `base`) dataclass `cls` from a mapping, validating every key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    obj = dataclasses.replace(base) if base is not None else cls()
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            full_names = [f"{prefix}.{n}" if prefix else n for n in names]
            hint = did_you_mean(full, full_names) or f" (valid keys here: {', '.join(full_names)})"
            raise ConfigError(f"unknown config key {full!r}{hint}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            setattr(obj, key, dataclass_from_dict(tp, value, full, getattr(obj, key)))
        else:
            setattr(obj, key, coerce(value, tp, full))
    return obj


def resolve_method(cfg: RunConfig, method_overrides: dict | None = None) -> None:
    """Fill `cfg.method.settings` with the method's defaults for the preset, then the overrides."""
    from rankscope import methods
    from rankscope.models import get_preset

    method_cls = methods.get(cfg.method.name)
    try:
        model_cfg = get_preset(cfg.model.preset)
    except Exception as exc:  # unknown preset: the message already names the fix
        raise ConfigError(str(exc)) from None
    current = cfg.method.settings
    if current is None or not isinstance(current, method_cls.Settings):
        current = method_cls.default_settings(cfg.model.preset, model_cfg)
    if method_overrides:
        current = dataclass_from_dict(method_cls.Settings, method_overrides, "method", current)
    cfg.method.settings = current


def config_from_dict(data: dict) -> RunConfig:
    data = dict(data or {})
    method_data = data.pop("method", None) or {}
    if not isinstance(method_data, dict):
        raise ConfigError(
            f"config key 'method' must be a mapping with the method's name and settings, got {method_data!r}; "
            f"write it as `method: {{name: {method_data}}}`"
        )
    method_data = dict(method_data)
    cfg = dataclass_from_dict(RunConfig, data, "")
    cfg.method.name = str(method_data.pop("name", cfg.method.name))
    resolve_method(cfg, method_data)
    validate(cfg)
    return cfg


def _set_path(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set expects KEY=VALUE (e.g. method.rank=64), got {text!r}")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects KEY=VALUE, got {text!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def build_config(
    base: dict | None = None, overrides: list[str] | tuple[str, ...] = (), **fields: Any
) -> RunConfig:
    """Merge a YAML mapping, `a.b=c` overrides and keyword fields ("train.steps": 10) into a config.

    When the method changes, settings from the base that the new method does not have are
    dropped only if they came from a resolved config of another method (method.name differs).
    """
    tree: dict = _deep_copy(base or {})
    for text in overrides:
        key, value = parse_override(text)
        _set_path(tree, key, value)
    for key, value in fields.items():
        if value is not None:
            _set_path(tree, key, value)
    return config_from_dict(tree)


def _deep_copy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _deep_copy(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_deep_copy(v) for v in tree]
    return tree


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {str(path)!r} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
            "save it as UTF-8"
        ) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}".splitlines()[0]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    return build_config(load_yaml(path) if path else {}, overrides)


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the config as YAML, atomically (a crash leaves the old file or the new one)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)


DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def check_device_name(name: str, key: str) -> None:
    """ConfigError unless `name` is a device rankscope can run on (availability is checked later)."""
    if not DEVICE_PATTERN.match(str(name)):
        raise ConfigError(f"{key}: unknown device {name!r}; use auto, cpu, cuda or cuda:N")


def validate(cfg: RunConfig) -> None:
    flat = {}
    for section in ("data", "optim", "train"):
        for f in dataclasses.fields(getattr(cfg, section)):
            flat[f"{section}.{f.name}"] = getattr(getattr(cfg, section), f.name)
    for key, choices in CHOICES.items():
        if flat[key] not in choices:
            raise ConfigError(f"{key}: {flat[key]!r} is not one of {', '.join(choices)}{did_you_mean(str(flat[key]), choices)}")
    for key in POSITIVE:
        if flat[key] <= 0:
            raise ConfigError(f"{key} must be positive, got {flat[key]}")
    t = cfg.train
    for key in ("train.eval_every", "train.checkpoint_every", "train.micro_batch_size", "train.keep_last_checkpoints",
                "train.dynamics_every"):
        if flat[key] < 0:
            raise ConfigError(f"{key} must be >= 0, got {flat[key]}")
    if t.micro_batch_size and t.batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.batch_size ({t.batch_size}) must be a multiple of train.micro_batch_size ({t.micro_batch_size})"
        )
    if t.dynamics_power_iters < 1:
        raise ConfigError(f"train.dynamics_power_iters must be at least 1, got {t.dynamics_power_iters}")
    if not t.spike_factor > 1.0:
        raise ConfigError(f"train.spike_factor must be above 1 (a loss that many times the running median is a spike), "
                          f"got {t.spike_factor}")
    if t.spike_window < 2:
        raise ConfigError(f"train.spike_window must be at least 2 steps, got {t.spike_window}")
    bad = [s for s in t.checkpoint_steps if s <= 0 or s > t.steps]
    if bad:
        raise ConfigError(
            f"train.checkpoint_steps {bad} fall outside 1..{t.steps} (train.steps); drop them or raise --steps"
        )
    o = cfg.optim
    from rankscope.methods.base import WEIGHT_DECAY_SCOPES

    if o.weight_decay_scope is not None and o.weight_decay_scope not in WEIGHT_DECAY_SCOPES:
        raise ConfigError(
            f"optim.weight_decay_scope: {o.weight_decay_scope!r} is not one of {', '.join(WEIGHT_DECAY_SCOPES)}"
            f"{did_you_mean(str(o.weight_decay_scope), WEIGHT_DECAY_SCOPES)}"
        )
    # Written as `not (x > 0)` so that NaN, which fails every comparison, is refused too.
    for key, value, rule, ok in (
        ("optim.lr", o.lr, "a positive number", lambda v: v > 0),
        ("optim.weight_decay", o.weight_decay, "a number >= 0", lambda v: v >= 0),
        ("optim.eps", o.eps, "a positive number", lambda v: v > 0),
        ("optim.grad_clip", o.grad_clip, "a number >= 0 (0 turns clipping off)", lambda v: v >= 0),
        ("optim.min_lr_ratio", o.min_lr_ratio, "in [0, 1]", lambda v: 0.0 <= v <= 1.0),
        ("optim.warmup_ratio", o.warmup_ratio, "in [0, 1)", lambda v: 0.0 <= v < 1.0),
        ("optim.beta1", o.beta1, "in [0, 1)", lambda v: 0.0 <= v < 1.0),
        ("optim.beta2", o.beta2, "in [0, 1)", lambda v: 0.0 <= v < 1.0),
    ):
        if value is not None and not (math.isfinite(value) and ok(value)):
            raise ConfigError(f"{key} must be {rule}, got {value}")
    for key in ("optim.warmup_steps", "data.max_train_tokens", "train.seed"):
        value = flat[key]
        if value is not None and value < 0:
            raise ConfigError(f"{key} must be >= 0, got {value}")
    check_device_name(t.device, "train.device (--device)")
    from rankscope.models import PRESETS

    if cfg.model.preset not in PRESETS:
        raise ConfigError(f"unknown preset {cfg.model.preset!r}{did_you_mean(cfg.model.preset, PRESETS)}")
    from rankscope.models import LlamaConfig

    valid_model_keys = [f.name for f in dataclasses.fields(LlamaConfig)]
    for key, value in cfg.model.overrides.items():
        if key not in valid_model_keys:
            raise ConfigError(f"unknown config key 'model.overrides.{key}'{did_you_mean(key, valid_model_keys)}")
        # Every LlamaConfig field is a size or a positive constant.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ConfigError(f"model.overrides.{key} must be a positive number, got {value!r}")
    max_seq_len = cfg.model.overrides.get("max_seq_len", PRESETS[cfg.model.preset].max_seq_len)
    if cfg.data.seq_len > max_seq_len:
        # RoPE itself has no limit, but the model (and its Hugging Face export's
        # max_position_embeddings) would claim a shorter context than it was trained on.
        raise ConfigError(
            f"data.seq_len {cfg.data.seq_len} is longer than the model's max_seq_len {max_seq_len} "
            f"(preset {cfg.model.preset}); set model.overrides.max_seq_len={cfg.data.seq_len} or a data.seq_len "
            f"of at most {max_seq_len}"
        )
