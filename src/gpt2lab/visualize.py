"""Pictures of what the model attends to: attention weights over a prompt, drawn as heatmaps.

Row i of a head's (T, T) pattern is the distribution query position i spreads over positions 0..i: a head that copies
the previous token lights up the sub-diagonal, an induction head a diagonal shifted by a repeat's period, and many
heads park their attention on the first token when they have nothing to do. The weights come from the explicit
softmax path (`model.explicit_attention_weights`), the same numbers the fused kernel computes without materialising.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import torch

from gpt2lab import checks
from gpt2lab.files import claim_file, holds_mark
from gpt2lab.model import explicit_attention_weights

if TYPE_CHECKING:  # pragma: no cover
    from gpt2lab.model import GPT

MAX_LABELS = 48  # beyond this many tokens the axis labels are left off (they would overlap)


def attention_weights(model: "GPT", idx: torch.Tensor, layer: int) -> torch.Tensor:
    """The attention patterns of every head of `layer` for one prompt idx (T,): (H, T, T) float32, rows sum to 1.

    Runs the model's own forward pass and catches what `layer`'s attention receives, so the queries and keys are the
    ones the model computes (whatever its position encoding); the pattern is then softmax(Q Kᵀ / √D) made explicit.
    """
    cfg = model.config
    checks.integer("layer", layer, 0, cfg.n_layer - 1, note=f"this model has {cfg.n_layer} layers")
    if idx.dim() != 1 or idx.numel() == 0:
        raise ValueError(f"idx must be a non-empty 1-D tensor of token ids, got shape {tuple(idx.shape)}")
    T = idx.numel()
    if T > cfg.n_ctx:
        raise ValueError(f"the prompt is {T} tokens long, more than the model's context n_ctx={cfg.n_ctx}")
    attn = model.h[layer].attn
    seen: list[torch.Tensor] = []
    hook = attn.register_forward_pre_hook(lambda module, args: seen.append(args[0]))  # the layer's input, after ln_1
    try:
        with torch.no_grad():
            model.hidden_states(idx.to(model.ln_f.weight.device)[None])  # (1, T) -> the forward pass, as it runs
            q, k, _ = attn.heads(seen[0])  # 2 × (1, H, T, D)
    finally:
        hook.remove()
    return explicit_attention_weights(q, k, None)[0].float()  # (H, T, T)


def token_labels(tokenizer, ids: Sequence[int]) -> list[str]:
    """Readable labels for tokens: their text with whitespace made visible."""
    labels = []
    for i in ids:
        text = tokenizer.decode_bytes([i]).decode("utf-8", errors="replace")
        labels.append(text.replace(" ", "·").replace("\n", "\\n").replace("\t", "\\t") or "∅")
    return labels


IMAGE_KINDS = ("png", "svg", "pdf")  # the formats whose metadata carries IMAGE_MARK as plain text
IMAGE_MARK = "gpt2lab attention picture"  # in the image's metadata (PNG Software, SVG and PDF Creator)


def image_kind(path: str | os.PathLike[str]) -> str:
    """The format a picture at `path` is written in, from its extension: png, svg or pdf; anything else is refused."""
    kind = Path(path).suffix.lstrip(".").lower()
    if kind not in IMAGE_KINDS:
        raise ValueError(f"the picture's file type comes from its extension, one of .{', .'.join(IMAGE_KINDS)}; "
                         f"got {str(path)!r}")
    return kind


def own_image(path: Path) -> bool:
    """Whether `path` is an attention picture gpt2lab drew: its metadata, stored as plain text in all three formats,
    names IMAGE_MARK."""
    return holds_mark(path, IMAGE_MARK)


def plot_attention(weights: torch.Tensor, labels: Sequence[str], out: str | os.PathLike[str], *, layer: int,
                   heads: Optional[Sequence[int]] = None, title: str | None = None, overwrite: bool = False) -> Path:
    """Draw (H, T, T) weights as heatmaps (queries down, keys across) for `heads` (default: all) into `out`.

    The file type follows the extension (png, svg, pdf). Written to a temporary file first, then renamed; an
    existing `out` is replaced only with `overwrite`, and only if it is an attention picture gpt2lab drew (its
    metadata names IMAGE_MARK); any other file is refused.
    """
    kind = image_kind(out)
    out = claim_file(out, overwrite, is_own=own_image, description="an attention picture")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = list(range(weights.size(0))) if heads is None else list(heads)
    cols = min(4, len(heads))
    rows = (len(heads) + cols - 1) // cols
    T = weights.size(-1)
    size = 4.5 if len(heads) == 1 else 3.2
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols + 1, size * rows + 0.6), squeeze=False)
    for ax in axes.flat[len(heads):]:
        ax.axis("off")
    for ax, h in zip(axes.flat, heads):
        image = ax.imshow(weights[h].cpu().numpy(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"layer {layer}, head {h}", fontsize=9)
        if T <= MAX_LABELS:
            font = max(4, min(8, 300 // max(T, 1)))
            ax.set_xticks(range(T), labels, rotation=90, fontsize=font)
            ax.set_yticks(range(T), labels, fontsize=font)
        ax.set_xlabel("key (attended to)", fontsize=8)
        ax.set_ylabel("query", fontsize=8)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8, label="attention weight")
    if title:
        fig.suptitle(title, fontsize=10)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp-{os.getpid()}{out.suffix}")
    try:
        fig.savefig(tmp, dpi=150, bbox_inches="tight", format=kind,
                    metadata={"Software" if kind == "png" else "Creator": IMAGE_MARK})
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return out
