"""Model configuration: one frozen dataclass with GPT-2's field names, and named presets.

A config is a value, not a bag: it is frozen, validated once in `__post_init__`, and changed only by making a new one
with `dataclasses.replace`. Derived sizes (`head_dim`, `ffn_dim`) are properties so they can never disagree with the
fields they come from.

    >>> cfg = GPTConfig.preset("gpt2")
    >>> cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.head_dim
    (12, 12, 768, 64)
    >>> small = dataclasses.replace(cfg, n_layer=2)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from gpt2lab import checks

ACTIVATIONS = ("gelu_tanh", "gelu", "relu")
POS_ENCODINGS = ("learned", "sinusoidal")
# The largest model a config may describe. Far above anything gpt2lab trains or serves, it turns absurd sizes (a
# typo, a hostile config.json) into a clear error before any tensor is allocated.
MAX_PARAMETERS = 10**12


@dataclass(frozen=True)
class GPTConfig:
    """The architecture of a GPT-2-style decoder.

    Field names follow the GPT-2 checkpoint (`n_layer`, `n_head`, `n_embd`, `n_ctx`) so a reader of the paper, of
    OpenAI's code or of a Hugging Face `config.json` recognises them. The defaults are GPT-2 small (124M).

    - `vocab_size`: rows of the token embedding (and columns of the tied LM head). GPT-2: 50257 byte-level BPE tokens.
    - `n_ctx`: the longest sequence; also the rows of the learned position table.
    - `n_layer`, `n_head`, `n_embd`: depth, attention heads per layer, residual-stream width C. C must divide by H.
    - `activation`: the MLP non-linearity. `gelu_tanh` is the tanh approximation GPT-2 was trained with (Hugging Face
      calls it `gelu_new`); `gelu` is the exact erf form; `relu` is the original transformer's.
    - `pos_encoding`: `learned` (GPT-2's trained table) or `sinusoidal` (the fixed encoding of "Attention Is All You
      Need", no parameters).
    - `dropout`: one rate for embeddings, attention weights and residual branches; 0 for inference and for exact
      comparisons.
    - `layer_norm_eps`: GPT-2 uses 1e-5.
    - `bias`: biases in the linear layers and LayerNorms (GPT-2 has them; False is a common modern simplification).
    """

    vocab_size: int = 50257
    n_ctx: int = 1024
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    activation: str = "gelu_tanh"
    pos_encoding: str = "learned"
    dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    bias: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_ctx", "n_layer", "n_head", "n_embd"):
            checks.integer(f"GPTConfig.{name}", getattr(self, name), low=1)
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}); "
                f"allowed n_head values for this width: {_divisors(self.n_embd)}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"GPTConfig.activation {self.activation!r} is unknown; choose one of: {', '.join(ACTIVATIONS)}")
        if self.pos_encoding not in POS_ENCODINGS:
            raise ValueError(
                f"GPTConfig.pos_encoding {self.pos_encoding!r} is unknown; choose one of: {', '.join(POS_ENCODINGS)}"
            )
        checks.number("GPTConfig.dropout", self.dropout, 0, 1, high_open=True)
        checks.number("GPTConfig.layer_norm_eps", self.layer_norm_eps, low=0, low_open=True)
        checks.flag("GPTConfig.bias", self.bias)
        if self.parameter_count > MAX_PARAMETERS:
            sizes = ", ".join(f"{name}={_magnitude(getattr(self, name))}" for name in ("n_layer", "n_embd", "vocab_size", "n_ctx"))
            raise ValueError(f"GPTConfig describes {_magnitude(self.parameter_count)} parameters ({sizes}); "
                             f"at most {MAX_PARAMETERS:.0e} are allowed")

    @property
    def head_dim(self) -> int:
        """D, the width of one attention head: C / H."""
        return self.n_embd // self.n_head

    @property
    def ffn_dim(self) -> int:
        """The MLP's hidden width: 4C, as in GPT-2 and the original transformer."""
        return 4 * self.n_embd

    @property
    def parameter_count(self) -> int:
        """Trainable parameters of the model this config describes (tied head counted once), computed without
        building it: embeddings V×C (+ n_ctx×C when learned), per layer 12C² of matmuls plus LayerNorm gains and
        biases, and the final LayerNorm.

        >>> GPTConfig.preset("gpt2").parameter_count
        124439808
        """
        C, b = self.n_embd, int(self.bias)
        positions = self.n_ctx * C if self.pos_encoding == "learned" else 0
        per_layer = 12 * C * C + 2 * C + b * 11 * C  # c_attn 3C², c_proj C², c_fc 4C², mlp.c_proj 4C²; ln_1, ln_2
        return self.vocab_size * C + positions + self.n_layer * per_layer + C + b * C

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "GPTConfig":
        """The named preset, optionally with some fields replaced. Lookup is exact.

        >>> GPTConfig.preset("tiny", vocab_size=65).vocab_size
        65
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides) if overrides else PRESETS[name]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GPTConfig":
        """Build from a mapping (a TOML table, a JSON object); unknown keys are errors, missing ones take defaults.

        A `preset` key names the starting point that the other keys override.
        """
        data = dict(data)
        base = cls.preset(data.pop("preset")) if "preset" in data else cls()
        unknown = sorted(set(data) - set(field_names()))
        if unknown:
            raise ValueError(f"unknown model config key(s) {', '.join(map(repr, unknown))}; allowed: preset, {', '.join(field_names())}")
        return dataclasses.replace(base, **data)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def field_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(GPTConfig))


def _magnitude(n: int) -> str:
    """A size for a message: exact when readable, else its power of ten (a 4000-digit int is not a message).

    >>> _magnitude(124439808), _magnitude(3 * 10**40)
    ('124439808', 'about 10^40')
    """
    return str(n) if n < 10**15 else f"about 10^{int(n.bit_length() * math.log10(2))}"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, min(n, 64) + 1) if n % d == 0]


# The four released GPT-2 sizes (Radford et al. 2019, table 2, with the corrected layer counts of the released code)
# and small configs that train in minutes on a laptop CPU.
PRESETS: dict[str, GPTConfig] = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),
    # CPU-sized: `tiny` for unit tests, `mini` for minutes-long CPU runs, `nano` is nanoGPT's Shakespeare size.
    "tiny": GPTConfig(n_ctx=128, n_layer=2, n_head=2, n_embd=64),
    "mini": GPTConfig(n_ctx=256, n_layer=4, n_head=4, n_embd=128),
    "nano": GPTConfig(n_ctx=256, n_layer=6, n_head=6, n_embd=384),
}

# Windows per forward pass in `gpt2lab eval` (and gpt2lab.evaluate): a few windows at once beat one at a time on
# small models, while each window of GPT-2's 1024 tokens at stride 512 holds 513 x 50257 float32 logits (0.1 GB, about
# three times that while its loss is computed), so a larger batch mostly adds memory.
EVAL_BATCH_SIZE = 4


# ------------------------------------------------------------------------------------------------------ training run
DTYPES = ("fp32", "bf16")
OPTIMIZERS = ("adamw", "muon")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that describes one training run; saved beside every checkpoint so the run can be reproduced.

    A run file is TOML with these keys at the top level and the architecture in a `[model]` table (a `preset`,
    default `mini`, plus GPTConfig fields that override it); `load_train_config` reads it and `--set key=value` (dotted for the model: `model.n_layer=4`)
    overrides single fields. `model.vocab_size` is not set here: it always comes from the data's tokenizer.

    - Data and output: `data_dir` (written by `gpt2lab prepare`), `out_dir` (log, loss curve, checkpoints),
      `init_from` ("gpt2" or a model directory to fine-tune; its architecture replaces `[model]`).
    - Batch: `batch_size` sequences of `seq_len` tokens per micro-step per process; `grad_accum` micro-steps per
      optimizer step. Tokens per step = batch_size × seq_len × grad_accum × processes.
    - Schedule: linear warmup over `warmup_steps` to `lr`, then cosine decay to `min_lr` at `decay_steps` (default
      `max_steps`); with `max_minutes` and `clock_schedule` (default) the decay also follows elapsed time,
      whichever budget is further along, so a run stopped by the clock still ends at `min_lr`.
    - AdamW: `beta1`, `beta2`, `weight_decay` (2-D weights only: matmuls and embeddings, not biases or LayerNorm),
      `grad_clip` on the global gradient norm (0 turns it off).
    - `optimizer`: "adamw" for every parameter (GPT-2's), or "muon": Muon (momentum, then the update orthogonalised
      by Newton-Schulz iterations) on the blocks' matmul weights at peak rate `muon_lr`, AdamW at `lr` on the
      embeddings, LayerNorms and biases. Both follow the same schedule; the model itself is unchanged.
    - Speed: `dtype` fp32 or bf16 (autocast; weights and optimizer stay fp32), `compile` (torch.compile), `threads`
      (0: all cores shared among the processes on this machine), `device` auto | cpu | cuda.
    - Bookkeeping: `eval_interval` steps between evals of `eval_iters` batches, `checkpoint_interval` steps between
      checkpoints (0: only at evals and at the end), `log_interval` steps between log lines, `seed`, and the stop
      conditions `max_steps` and `max_minutes` (0: no time limit).
    """

    data_dir: str = "data/shakespeare-char"
    out_dir: str = "runs/default"
    model: GPTConfig = PRESETS["mini"]
    init_from: str = ""
    batch_size: int = 16
    seq_len: int = 256
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    decay_steps: int = 0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str = "fp32"
    compile: bool = False
    threads: int = 0
    device: str = "auto"
    eval_interval: int = 250
    eval_iters: int = 20
    checkpoint_interval: int = 0
    log_interval: int = 10
    seed: int = 1337
    max_steps: int = 5000
    max_minutes: float = 0.0
    clock_schedule: bool = True
    optimizer: str = "adamw"
    muon_lr: float = 0.02

    def __post_init__(self) -> None:
        if not isinstance(self.model, GPTConfig):
            raise TypeError(f"TrainConfig.model must be a GPTConfig, got {type(self.model).__name__}")
        for name in ("data_dir", "out_dir", "init_from"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"TrainConfig.{name} must be a string, got {getattr(self, name)!r}")
        for name in ("data_dir", "out_dir"):
            if not getattr(self, name):
                raise ValueError(f"TrainConfig.{name} must not be empty")
        for name in ("batch_size", "seq_len", "grad_accum", "eval_interval", "eval_iters", "log_interval", "max_steps"):
            checks.integer(f"TrainConfig.{name}", getattr(self, name), low=1)
        for name in ("warmup_steps", "decay_steps", "checkpoint_interval", "threads", "seed"):
            checks.integer(f"TrainConfig.{name}", getattr(self, name), low=0)
        checks.number("TrainConfig.lr", self.lr, low=0, low_open=True)
        for name in ("min_lr", "weight_decay", "grad_clip", "max_minutes"):
            checks.number(f"TrainConfig.{name}", getattr(self, name), low=0)
        if self.min_lr > self.lr:
            raise ValueError(f"TrainConfig.min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        for name in ("beta1", "beta2"):
            checks.number(f"TrainConfig.{name}", getattr(self, name), 0, 1, high_open=True)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig.optimizer {self.optimizer!r} is unknown; "
                             f"choose one of: {', '.join(OPTIMIZERS)}")
        checks.number("TrainConfig.muon_lr", self.muon_lr, 0, low_open=True)
        if self.dtype not in DTYPES:
            raise ValueError(f"TrainConfig.dtype {self.dtype!r} is unknown; choose one of: {', '.join(DTYPES)}")
        if self.device not in DEVICES:
            raise ValueError(f"TrainConfig.device {self.device!r} is unknown; choose one of: {', '.join(DEVICES)}")
        for name in ("compile", "clock_schedule"):
            checks.flag(f"TrainConfig.{name}", getattr(self, name))
        if self.seq_len > self.model.n_ctx and not self.init_from:
            raise ValueError(f"TrainConfig.seq_len ({self.seq_len}) exceeds the model's context model.n_ctx "
                             f"({self.model.n_ctx}); lower seq_len or raise model.n_ctx")

    @property
    def schedule_steps(self) -> int:
        """The step at which the cosine decay reaches `min_lr`."""
        return self.decay_steps or self.max_steps

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (the model as a nested table, without vocab_size), as written to `config.toml`."""
        data = dataclasses.asdict(self)
        data["model"].pop("vocab_size")
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TrainConfig":
        """Build from a mapping such as a parsed TOML file; unknown keys are errors that list the allowed ones."""
        data = dict(data)
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ValueError(f"unknown training config key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}")
        model = data.pop("model", {})
        if isinstance(model, GPTConfig):
            model = model.to_dict()
        if not isinstance(model, Mapping):
            raise ValueError(f"'model' must be a table (preset and GPTConfig fields), got {model!r}")
        if "vocab_size" in model:
            raise ValueError("model.vocab_size cannot be set: it comes from the data's tokenizer (see gpt2lab prepare)")
        model = dict(model)
        model.setdefault("preset", "mini")  # a partial table changes the default architecture, not GPT-2 small
        return cls(model=GPTConfig.from_dict(model), **data)


def parse_override(item: str) -> tuple[str, Any]:
    """'key=value' -> (key, value), the value read as a TOML value when it is one, else as a plain string.

    >>> parse_override("model.n_layer=4"), parse_override("dtype=bf16"), parse_override("compile=true")
    (('model.n_layer', 4), ('dtype', 'bf16'), ('compile', True))
    """
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError(f"--set expects key=value, got {item!r}")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key, value


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply `key=value` strings to a config mapping (dotted keys reach into the model table); returns a new dict."""
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
    for item in overrides:
        key, value = parse_override(item)
        if key.startswith("model."):
            out.setdefault("model", {})
            if isinstance(out["model"], GPTConfig):
                out["model"] = out["model"].to_dict()
            if not isinstance(out["model"], dict):
                raise ValueError(f"--set {key}: 'model' must be a table of GPTConfig fields (model.preset = "
                                 f"\"tiny\" picks a preset), got {out['model']!r}")
            out["model"][key.removeprefix("model.")] = value
        elif "." in key:
            raise ValueError(f"unknown training config key {key!r}; only model.<field> may be dotted")
        else:
            out[key] = value
    return out


def load_train_config(path: str | os.PathLike[str] | None = None, overrides: Iterable[str] = ()) -> TrainConfig:
    """Read a run file (TOML) and apply `key=value` overrides; without a path, start from the defaults."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise IsADirectoryError(f"training config {str(p)!r} is a directory; give a .toml run file")
        if not p.is_file():
            raise FileNotFoundError(f"training config {str(p)!r} does not exist")
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{p}: not valid TOML ({e})") from None
    return TrainConfig.from_dict(apply_overrides(data, overrides))


def train_config_to_toml(config: TrainConfig) -> str:
    """The run config as a TOML document that `load_train_config` reads back to an equal TrainConfig."""
    data = config.to_dict()
    model = data.pop("model")
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items()]
    lines += ["", "[model]"] + [f"{k} = {_toml_value(v)}" for k, v in model.items()]
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    raise TypeError(f"cannot write {value!r} to TOML")
