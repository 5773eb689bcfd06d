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
from dataclasses import dataclass
from typing import Any, Mapping

ACTIVATIONS = ("gelu_tanh", "gelu", "relu")
POS_ENCODINGS = ("learned", "sinusoidal")


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
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
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
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be a number in [0, 1), got {self.dropout!r}")
        if isinstance(self.layer_norm_eps, bool) or not isinstance(self.layer_norm_eps, (int, float)) or not self.layer_norm_eps > 0:
            raise ValueError(f"GPTConfig.layer_norm_eps must be a positive number, got {self.layer_norm_eps!r}")
        if not isinstance(self.bias, bool):
            raise ValueError(f"GPTConfig.bias must be true or false, got {self.bias!r}")

    @property
    def head_dim(self) -> int:
        """D, the width of one attention head: C / H."""
        return self.n_embd // self.n_head

    @property
    def ffn_dim(self) -> int:
        """The MLP's hidden width: 4C, as in GPT-2 and the original transformer."""
        return 4 * self.n_embd

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
