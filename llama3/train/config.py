"""`TrainConfig`: every setting of a training run, from flags or a JSON/TOML file, in groups.

    cfg.data        what it reads: the text, the tokenizer, the batch and window sizes
    cfg.optimizer   AdamW: weight decay, betas, gradient clipping
    cfg.schedule    how long and how fast: steps, peak lr, its floor, warmup
    cfg.lora        LoRA adapters for `llama3 sft` (rank 0: full fine-tuning)
    cfg.parallel    where it runs: device, autocast dtype, compile, DDP/FSDP, the peak for MFU
    cfg.<name>      the run itself: out, preset, model, seed, evaluation, logging, checkpoints

Each setting also has one flat name (nanoGPT's knobs, without its `exec`): the flag (`--batch-size`),
the key in a config file (`batch_size = 16`, or `[data] batch_size = 16`), the keyword of
`TrainConfig(batch_size=16)` and of `to_dict()`, which is what train_config.json and checkpoints
store.  LoRA's are `lora_rank` ...; the data's own source is `data`.  Unknown names raise.
Precedence: defaults < --config FILE < explicit flags.

Batch sizes: each optimizer step sees
    global batch = batch_size * grad_accum * world_size   windows of seq_len tokens,
so one process with batch 8 and four processes with batch 2 train the same way.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from llama3.errors import Llama3Error, refuse_unknown

STRATEGIES = ("auto", "none", "ddp", "fsdp")
DEFAULT_MIN_LR = 3e-4
AMP_DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class DataSettings:
    source: str | None = None              # text, JSONL or a folder of them, or a `llama3 prepare` folder; none: the built-in corpus
    tokenizer: str | None = None           # tokenizer source (folder, .gguf, name); none: a byte-level BPE learned from the data
    vocab_size: int = 4096                 # vocabulary size of that learned BPE
    batch_size: int = 16                   # windows per micro-batch, per process
    grad_accum: int = 1                    # micro-batches per optimizer step
    seq_len: int = 256                     # T: tokens per window
    val_fraction: float = 0.05             # share of documents held out for validation
    pack: bool = True                      # pack several chat examples per row (attention stays within each)


@dataclass
class OptimizerSettings:
    weight_decay: float = 0.1              # applied to matrices only, never to norms
    beta1: float = 0.9                     # AdamW momentum of the gradient
    beta2: float = 0.95                    # AdamW momentum of the squared gradient
    grad_clip: float = 1.0                 # max global gradient norm; 0 disables


@dataclass
class ScheduleSettings:
    steps: int = 700                       # optimizer steps
    lr: float = 3e-3                       # peak learning rate (after warmup)
    min_lr: float | None = None            # floor of the cosine decay (default: 3e-4, or lr/10 when that is lower)
    warmup_steps: int = 50                 # steps of linear learning-rate warmup from 0


@dataclass
class LoRASettings:
    rank: int = 0                          # LoRA rank r: train r x (in + out) adapter numbers per matrix; 0 = full
    alpha: float = 16.0                    # LoRA scale numerator: the detour is multiplied by alpha / r
    dropout: float = 0.0                   # dropout on the LoRA input during training
    targets: str = "wq,wk,wv,wo"           # comma-separated block linears to adapt (wq wk wv wo w1 w2 w3)


@dataclass
class ParallelSettings:
    device: str = "auto"                   # auto: cuda when available, else cpu
    amp_dtype: str = "auto"                # bf16 autocast on GPUs that have it; auto means fp32 on CPU
    compile: bool = False                  # torch.compile the model
    strategy: str = "auto"                 # auto: ddp when launched by torchrun with >1 process; none; ddp; fsdp
    peak_flops: float | None = None        # hardware peak FLOP/s for the MFU estimate (known GPUs are looked up)


GROUPS = {"data": DataSettings, "optimizer": OptimizerSettings, "schedule": ScheduleSettings,
          "lora": LoRASettings, "parallel": ParallelSettings}


def _flat_name(group: str, name: str) -> str:
    """The flag / file key of a group's field: lora.rank -> lora_rank, data.source -> data, else its name."""
    if group == "lora":
        return f"lora_{name}"
    return "data" if (group, name) == ("data", "source") else name


@dataclass(init=False)
class TrainConfig:
    out: str = "out"                       # the model folder to write (checkpoints/ and metrics inside)
    preset: str = "tiny-cpu"               # model shape from llama3.config.PRESETS (its vocab_size follows the tokenizer)
    model: str | None = None               # start from this model (folder, .gguf, hf:ORG/NAME, built-in name), not from scratch
    seed: int = 1337                       # decides the initial weights and the data order
    eval_interval: int = 100               # steps between validation runs (0: only at the end)
    eval_batches: int = 8                  # micro-batches per validation run
    log_interval: int = 10                 # steps between metrics.jsonl lines
    checkpoint_interval: int = 100         # steps between training checkpoints (0: only at the end)
    keep_checkpoints: int = 2              # how many training checkpoints to keep
    sample_prompt: str | None = ""         # text sampled from the model at the end ("" = just <bos>; none = no sample)
    resume: bool = False                   # continue from out/checkpoints/latest
    allow_changes: bool = False            # with --resume: continue even if settings that change the run differ
    overwrite: bool = False                # replace an earlier run in --out (its checkpoints, metrics, loss curve)
    progress: bool = True                  # tqdm progress bar
    data: DataSettings = field(default_factory=DataSettings)
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    schedule: ScheduleSettings = field(default_factory=ScheduleSettings)
    lora: LoRASettings = field(default_factory=LoRASettings)
    parallel: ParallelSettings = field(default_factory=ParallelSettings)

    def __init__(self, **settings):
        """Flat names (`TrainConfig(out="kjv", batch_size=8, lora_rank=4)`, see `flat_fields()`), or whole
        groups (`optimizer=OptimizerSettings(...)` or a dict of that group's fields)."""
        known = flat_fields()
        refuse_unknown([k for k, v in settings.items() if not (k in GROUPS and isinstance(v, (GROUPS[k], dict)))],
                       known, "unknown training settings {unknown}; known ones are {known}")
        groups = {name: {} for name in GROUPS}
        for key, value in settings.items():
            if key in GROUPS and isinstance(value, (GROUPS[key], dict)):
                as_dict = dataclasses.asdict(value) if isinstance(value, GROUPS[key]) else value
                groups[key].update({_field_of(key, k): v for k, v in as_dict.items()})
            elif key in known and known[key][0] is not None:
                groups[known[key][0]][known[key][1].name] = value
            else:
                setattr(self, key, value)
        for f in dataclasses.fields(self):
            if f.name in GROUPS:
                try:
                    setattr(self, f.name, GROUPS[f.name](**groups[f.name]))
                except TypeError:
                    unknown = sorted(set(groups[f.name]) - {g.name for g in dataclasses.fields(GROUPS[f.name])})
                    raise Llama3Error(f"unknown {f.name} settings {unknown}") from None
            elif f.name not in vars(self):
                setattr(self, f.name, f.default)
        self._check()

    def _check(self) -> None:
        for flat, (group, f) in flat_fields().items():
            owner = self if group is None else getattr(self, group)
            setattr(owner, f.name, _checked_type(f, getattr(owner, f.name), flat))
        s, d = self.schedule, self.data
        if isinstance(self.sample_prompt, str) and self.sample_prompt.strip().lower() in ("none", "null"):
            self.sample_prompt = None  # what a user means by --sample-prompt None: no sample, not the text "None"
        if s.min_lr is None:
            s.min_lr = min(DEFAULT_MIN_LR, s.lr / 10) if s.lr > 0 else DEFAULT_MIN_LR
        positive = {"steps": s.steps, "batch_size": d.batch_size, "grad_accum": d.grad_accum, "seq_len": d.seq_len,
                    "vocab_size": d.vocab_size, "eval_batches": self.eval_batches, "log_interval": self.log_interval,
                    "keep_checkpoints": self.keep_checkpoints}
        for name, value in positive.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise Llama3Error(f"{name}={value!r} must be a positive integer")
        for name, value in {"eval_interval": self.eval_interval, "checkpoint_interval": self.checkpoint_interval,
                            "warmup_steps": s.warmup_steps, "lora_rank": self.lora.rank}.items():
            if value < 0:
                raise Llama3Error(f"{name}={value} must be >= 0")
        if not s.lr > 0 or s.min_lr < 0 or s.min_lr > s.lr:
            raise Llama3Error(f"need 0 <= min_lr <= lr and lr > 0, got lr={s.lr}, min_lr={s.min_lr}")
        if not 0 < d.val_fraction < 1:
            raise Llama3Error(f"val_fraction={d.val_fraction} must be between 0 and 1")
        if self.parallel.strategy not in STRATEGIES:
            raise Llama3Error(f"strategy={self.parallel.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.parallel.amp_dtype not in AMP_DTYPES:
            raise Llama3Error(f"amp_dtype={self.parallel.amp_dtype!r}; choose one of {', '.join(AMP_DTYPES)}")

    def to_dict(self) -> dict:
        """Every setting under its flat name (what train_config.json and checkpoints store)."""
        return {flat: getattr(self if group is None else getattr(self, group), f.name)
                for flat, (group, f) in flat_fields().items()}

    def replace(self, **flat) -> "TrainConfig":
        """A copy with some settings (flat names) changed."""
        return TrainConfig(**{**self.to_dict(), **flat})

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Flat keys, or a table per group (`{"optimizer": {"weight_decay": 0.1}}`, TOML's `[optimizer]`)."""
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides) -> "TrainConfig":
        """Read a .json or .toml file (flat keys or group tables, names as the flags); `overrides` win."""
        return cls.from_dict({**read_config_file(path), **overrides})


def _field_of(group: str, key: str) -> str:
    """A key inside a group's table -> the group's field name (lora_rank or rank, data or source)."""
    for f in dataclasses.fields(GROUPS[group]):
        if key in (f.name, _flat_name(group, f.name)):
            return f.name
    return key


def flat_fields() -> dict[str, tuple[str | None, dataclasses.Field]]:
    """flat name -> (its group, or None for the run's own settings; its dataclass field), in flag order."""
    table: dict[str, tuple[str | None, dataclasses.Field]] = {}
    for f in dataclasses.fields(TrainConfig):
        if f.name in GROUPS:
            for g in dataclasses.fields(GROUPS[f.name]):
                table[_flat_name(f.name, g.name)] = (f.name, g)
        else:
            table[f.name] = (None, f)
    return table


_KINDS = {"int": int, "float": float, "str": str, "bool": bool}


def _checked_type(field: dataclasses.Field, value, name: str | None = None):
    """`value` as the type the field declares (an int where a float is wanted, "3e-3" for a float, "5" for an
    int are converted); anything else raises Llama3Error naming the setting."""
    declared = str(field.type)
    optional = "None" in declared
    kind = _KINDS[declared.split("|")[0].strip()]
    if value is None and optional:
        return None
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is str:
        if isinstance(value, str):
            return value
    elif not isinstance(value, bool):
        if kind is float and isinstance(value, (int, float)):
            return float(value)
        if kind is int and isinstance(value, int):
            return value
        if kind is int and isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return kind(value.strip())
            except ValueError:
                pass
    wanted = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[kind]
    raise Llama3Error(f"{name or field.name}={value!r} must be {wanted}" + (" (or unset)" if optional else "")
                      + "; fix that setting")


def read_config_file(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise Llama3Error(f"{path}: config file not found")
    try:
        import tomllib  # Python 3.11+
    except ImportError:
        tomllib = None
    if path.suffix.lower() == ".toml" and tomllib is None:
        raise Llama3Error(f"{path}: reading TOML needs Python 3.11 or newer; use a .json file")
    try:
        if path.suffix.lower() == ".toml":
            return tomllib.loads(path.read_text(encoding="utf-8"))
        if path.suffix.lower() == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise Llama3Error(f"{path}: expected a JSON object of settings")
            return data
    except (ValueError, json.JSONDecodeError) as e:  # TOMLDecodeError is a ValueError
        raise Llama3Error(f"{path}: cannot parse ({e})") from None
    raise Llama3Error(f"{path}: use a .json or .toml config file")


def add_arguments(parser, fields: list[str]) -> None:
    """Add `--flag` options for the named flat settings, defaulting to None (= not given), in one argument
    group per settings group, help text taken from the field comments above; booleans become on/off switches."""
    import argparse
    import inspect
    import re

    comments = {}
    for owner in (TrainConfig, *GROUPS.values()):
        comments[owner] = dict(re.findall(r"^\s+(\w+):.*?#\s*(.+)$", inspect.getsource(owner), re.M))
    table = flat_fields()
    sections = {}
    for name in fields:
        group, f = table[name]
        if group not in sections:
            sections[group] = parser if group is None else parser.add_argument_group(f"{group} settings")
        flag = "--" + name.replace("_", "-")
        help_text = comments[TrainConfig if group is None else GROUPS[group]].get(f.name, "")
        help_text += f" (default: {f.default})" if f.default not in (None, "") else ""
        if f.type in ("bool", bool):
            sections[group].add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                                         help=help_text)
        else:
            kind = int if "int" in str(f.type) else float if "float" in str(f.type) else str
            metavar = {int: "N", float: "X"}.get(kind, name.split("_")[-1].upper())
            sections[group].add_argument(flag, dest=name, type=kind, default=None, metavar=metavar, help=help_text)


def config_from_args(args, fields: list[str], defaults: dict | None = None, **fixed) -> TrainConfig:
    """TrainConfig from parsed flags: field defaults < `defaults` < args.config file < flags given < `fixed`."""
    given = {name: getattr(args, name) for name in fields if getattr(args, name, None) is not None}
    base = _flatten(read_config_file(args.config)) if getattr(args, "config", None) else {}
    explicit = {**base, **given, **fixed}
    settings = {**(defaults or {}), **explicit}
    if explicit.get("min_lr") is None and "min_lr" in settings:
        # a default floor never rises above lr/10, so a lower --lr alone is always valid
        default_min_lr = settings.pop("min_lr")
        cfg = TrainConfig.from_dict(settings)
        if default_min_lr is not None:
            min_lr = _checked_type(flat_fields()["min_lr"][1], default_min_lr, "min_lr")
            cfg.schedule.min_lr = min(min_lr, cfg.schedule.lr / 10)
        return cfg
    return TrainConfig.from_dict(settings)


def _flatten(settings: dict) -> dict:
    """A config file's group tables spread into flat names ({"lora": {"rank": 8}} -> {"lora_rank": 8})."""
    flat = {}
    for key, value in settings.items():
        if key in GROUPS and isinstance(value, dict):
            names = {f.name: _flat_name(key, f.name) for f in dataclasses.fields(GROUPS[key])}
            flat.update({names.get(_field_of(key, k), k): v for k, v in value.items()})
        else:
            flat[key] = value
    return flat
