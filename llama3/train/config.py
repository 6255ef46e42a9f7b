"""`TrainConfig`: every setting of a training run, from flags or a JSON/TOML file.

One flat dataclass (nanoGPT's knobs, without its `exec`): the command line, a
config file and the Python API all fill the same fields, and unknown keys
raise.  Precedence: defaults < --config FILE < explicit flags.

Batch sizes: each optimizer step sees
    global batch = batch_size * grad_accum * world_size   windows of seq_len tokens,
so one process with batch 8 and four processes with batch 2 train the same way.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from llama3.errors import Llama3Error, refuse_unknown

STRATEGIES = ("auto", "none", "ddp", "fsdp")
DEFAULT_MIN_LR = 3e-4
AMP_DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class TrainConfig:
    out: str = "out"                       # the model folder to write (checkpoints/ and metrics inside)
    data: str | None = None                # text, JSONL or a folder of them, or a `llama3 prepare` folder; none: the built-in corpus
    tokenizer: str | None = None           # tokenizer source (folder, .gguf, name); none: a byte-level BPE learned from the data
    vocab_size: int = 4096                 # vocabulary size of that learned BPE
    preset: str = "tiny-cpu"               # model shape from llama3.config.PRESETS (its vocab_size follows the tokenizer)
    model: str | None = None               # start from this model (folder, .gguf, built-in name), not from scratch
    # optimisation
    steps: int = 700                       # optimizer steps
    batch_size: int = 16                   # windows per micro-batch, per process
    grad_accum: int = 1                    # micro-batches per optimizer step
    seq_len: int = 256                     # T: tokens per window
    lr: float = 3e-3                       # peak learning rate (after warmup)
    min_lr: float | None = None            # floor of the cosine decay (default: 3e-4, or lr/10 when that is lower)
    warmup_steps: int = 50                 # steps of linear learning-rate warmup from 0
    weight_decay: float = 0.1              # applied to matrices only, never to norms
    beta1: float = 0.9                     # AdamW momentum of the gradient
    beta2: float = 0.95                    # AdamW momentum of the squared gradient
    grad_clip: float = 1.0                 # max global gradient norm; 0 disables
    seed: int = 1337                       # decides the initial weights and the data order
    # evaluation, logging, checkpoints
    eval_interval: int = 100               # steps between validation runs (0: only at the end)
    eval_batches: int = 8                  # micro-batches per validation run
    log_interval: int = 10                 # steps between metric lines in metrics.jsonl
    checkpoint_interval: int = 100         # steps between training checkpoints (0: only at the end)
    keep_checkpoints: int = 2              # how many training checkpoints to keep
    val_fraction: float = 0.05             # share of documents held out for validation
    sample_prompt: str | None = ""         # text sampled from the model at the end ("" = just <bos>; None = skip)
    # fine-tuning (llama3 sft)
    lora_rank: int = 0                     # LoRA rank r: train r x (in + out) adapter numbers per matrix; 0 = full
    lora_alpha: float = 16.0               # LoRA scale numerator: the detour is multiplied by alpha / r
    lora_dropout: float = 0.0              # dropout on the LoRA input during training
    lora_targets: str = "wq,wk,wv,wo"      # comma-separated block linears to adapt (wq wk wv wo w1 w2 w3)
    pack: bool = True                      # pack several chat examples per row (attention stays within each)
    # hardware
    device: str = "auto"                   # auto: cuda when available, else cpu
    amp_dtype: str = "auto"                # bf16 autocast on GPUs that have it; auto means fp32 on CPU
    compile: bool = False                  # torch.compile the model
    strategy: str = "auto"                 # auto: ddp when launched by torchrun with >1 process; none; ddp; fsdp
    peak_flops: float | None = None        # hardware peak FLOP/s for the MFU estimate (known GPUs are looked up)
    resume: bool = False                   # continue from out/checkpoints/latest
    progress: bool = True                  # tqdm progress bar

    def __post_init__(self):
        for field in dataclasses.fields(self):
            setattr(self, field.name, _checked_type(field, getattr(self, field.name)))
        if self.min_lr is None:
            self.min_lr = min(DEFAULT_MIN_LR, self.lr / 10) if self.lr > 0 else DEFAULT_MIN_LR
        positive = ("steps", "batch_size", "grad_accum", "seq_len", "vocab_size", "eval_batches",
                    "log_interval", "keep_checkpoints")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise Llama3Error(f"{name}={value!r} must be a positive integer")
        for name in ("eval_interval", "checkpoint_interval", "warmup_steps", "lora_rank"):
            if getattr(self, name) < 0:
                raise Llama3Error(f"{name}={getattr(self, name)} must be >= 0")
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise Llama3Error(f"need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if not 0 < self.val_fraction < 1:
            raise Llama3Error(f"val_fraction={self.val_fraction} must be between 0 and 1")
        if self.strategy not in STRATEGIES:
            raise Llama3Error(f"strategy={self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if self.amp_dtype not in AMP_DTYPES:
            raise Llama3Error(f"amp_dtype={self.amp_dtype!r}; choose one of {', '.join(AMP_DTYPES)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        refuse_unknown(d, {f.name for f in dataclasses.fields(cls)},
                       "unknown training settings {unknown}; known ones are {known}")
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **overrides) -> "TrainConfig":
        """Read a .json or .toml file (flat keys, names as the fields); `overrides` win."""
        return cls.from_dict({**read_config_file(path), **overrides})


_KINDS = {"int": int, "float": float, "str": str, "bool": bool}


def _checked_type(field: dataclasses.Field, value):
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
    raise Llama3Error(f"{field.name}={value!r} must be {wanted}" + (" (or unset)" if optional else "")
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
    """Add `--flag` options for the named TrainConfig fields, defaulting to None (= not given),
    help text taken from the field comments above; booleans become on/off switches."""
    import argparse
    import inspect
    import re

    comments = dict(re.findall(r"^\s+(\w+):.*?#\s*(.+)$", inspect.getsource(TrainConfig), re.M))
    types = {f.name: f for f in dataclasses.fields(TrainConfig)}
    for name in fields:
        field = types[name]
        flag = "--" + name.replace("_", "-")
        help_text = comments.get(name, "")
        default = field.default
        help_text += f" (default: {default})" if default not in (None, "") else ""
        if field.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = int if "int" in str(field.type) else float if "float" in str(field.type) else str
            metavar = {int: "N", float: "X"}.get(kind, name.split("_")[-1].upper())
            parser.add_argument(flag, type=kind, default=None, metavar=metavar, help=help_text)


def config_from_args(args, fields: list[str], defaults: dict | None = None, **fixed) -> TrainConfig:
    """TrainConfig from parsed flags: field defaults < `defaults` < args.config file < flags given < `fixed`."""
    given = {name: getattr(args, name) for name in fields if getattr(args, name, None) is not None}
    base = read_config_file(args.config) if getattr(args, "config", None) else {}
    explicit = {**base, **given, **fixed}
    settings = {**(defaults or {}), **explicit}
    if explicit.get("min_lr") is None and "min_lr" in settings:
        # a default floor never rises above lr/10, so a lower --lr alone is always valid
        default_min_lr = settings.pop("min_lr")
        cfg = TrainConfig.from_dict(settings)
        if default_min_lr is not None:
            cfg.min_lr = min(_checked_type(_FIELDS["min_lr"], default_min_lr), cfg.lr / 10)
        return cfg
    return TrainConfig.from_dict(settings)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
