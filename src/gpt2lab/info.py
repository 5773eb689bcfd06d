"""`gpt2lab info`: what a model is made of, how long one forward pass takes on this machine, and what this CPU gets.

    $ gpt2lab info gpt2
    gpt2: 12 layers, 12 heads of 64, width 768, context 1024, vocab 50257, gelu_tanh, learned positions
    component                       shape           parameters
    ...
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from gpt2lab import native, quantize
from gpt2lab.config import PRESETS, GPTConfig
from gpt2lab.cpu import cpu_features, default_threads
from gpt2lab.model import GPT
from gpt2lab.native_step import threads_adapt


def parameter_table(config: GPTConfig) -> list[tuple[str, str, int]]:
    """(component, shape, count) rows for one model, computed from the config alone (no allocation).

    One block's rows are shown once with a ×n_layer row after them, the tied LM head shows 0 new parameters.
    """
    C, V, F, L = config.n_embd, config.vocab_size, config.ffn_dim, config.n_layer
    b = 1 if config.bias else 0
    rows = [("wte (token embedding)", f"{V} x {C}", V * C)]
    if config.pos_encoding == "learned":
        rows.append(("wpe (position embedding)", f"{config.n_ctx} x {C}", config.n_ctx * C))
    else:
        rows.append(("wpe (sinusoidal, fixed)", f"{config.n_ctx} x {C}", 0))
    block = [
        ("  ln_1", f"{C}", C + b * C),
        ("  attn.c_attn (q, k, v)", f"{C} x {3 * C}", 3 * C * C + b * 3 * C),
        ("  attn.c_proj", f"{C} x {C}", C * C + b * C),
        ("  ln_2", f"{C}", C + b * C),
        ("  mlp.c_fc", f"{C} x {F}", C * F + b * F),
        ("  mlp.c_proj", f"{F} x {C}", F * C + b * C),
    ]
    rows.append(("h[i] (one block)", "", sum(n for _, _, n in block)))
    rows += block
    rows.append((f"h (x {L} blocks)", "", L * sum(n for _, _, n in block)))
    rows.append(("ln_f", f"{C}", C + b * C))
    rows.append(("lm_head (tied to wte)", f"{C} x {V}", 0))
    return rows


def count_parameters(config: GPTConfig) -> int:
    """Total parameters by formula; equals `GPT(config).num_parameters()` (tested)."""
    skip = {"h[i] (one block)"}
    return sum(n for name, _, n in parameter_table(config) if name not in skip and not name.startswith("  "))


def time_forward(model: GPT, seq_len: int, repeats: int = 3) -> float:
    """Best wall time in seconds of one (1, seq_len) forward pass, after one warm-up."""
    idx = torch.randint(0, model.config.vocab_size, (1, seq_len), device=model.device)
    best = float("inf")
    with torch.inference_mode():
        model(idx)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(idx)
            best = min(best, time.perf_counter() - t0)
    return best


def _load(spec: str) -> tuple[str, GPT]:
    """A preset by name, else a model directory; anything path-like goes to load_model, which says what is wrong
    with it (no such directory, no config.json, a mismatched file)."""
    if spec in PRESETS:
        return spec, GPT(GPTConfig.preset(spec)).eval()
    if Path(spec).is_dir() or "/" in spec or os.sep in spec:
        from gpt2lab.checkpoint import load_model

        return str(spec), load_model(spec)
    raise ValueError(f"{spec!r} is neither a preset ({', '.join(PRESETS)}) nor a model directory")


def describe(spec: str, seq_len: int | None = None, threads: int | None = None) -> str:
    """The text `gpt2lab info` prints: architecture line, parameter table, forward-pass timing."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    name, model = _load(spec)
    cfg = model.config
    seq_len = min(cfg.n_ctx, 1024) if seq_len is None else seq_len
    if not 1 <= seq_len <= cfg.n_ctx:
        raise ValueError(f"--seq-len must be in 1..{cfg.n_ctx} (the model's n_ctx), got {seq_len}")
    lines = [
        f"{name}: {cfg.n_layer} layers, {cfg.n_head} heads of {cfg.head_dim}, width {cfg.n_embd}, context {cfg.n_ctx}, "
        f"vocab {cfg.vocab_size}, {cfg.activation}, {cfg.pos_encoding} positions, bias={cfg.bias}, dropout={cfg.dropout}",
        "",
        f"{'component':<28} {'shape':>14} {'parameters':>14}",
    ]
    for component, shape, n in parameter_table(cfg):
        lines.append(f"{component:<28} {shape:>14} {n:>14,}")
    total = model.num_parameters()
    lines.append(f"{'total (tied head counted once)':<28} {'':>14} {total:>14,}")
    lines.append(f"{'without embeddings':<28} {'':>14} {model.num_parameters(exclude_embeddings=True):>14,}")
    seconds = time_forward(model, seq_len)
    lines += ["", f"forward (1, {seq_len}) fp32 on {torch.get_num_threads()} thread(s): {seconds * 1000:.1f} ms "
                  f"= {seq_len / seconds:,.0f} tokens/s"]
    return "\n".join(lines + cpu_report())


def cpu_report() -> list[str]:
    """What this CPU reports and the decode layers and thread count gpt2lab picks from it (gpt2lab.cpu,
    quantize.choose_kernels)."""
    features = cpu_features()
    threads = torch.get_num_threads()
    adapt = threads_adapt()
    tuning = ("the native step tunes the count per step, 1 to this, as other programs' load comes and goes" if adapt
              else "other programs' load counted now")
    lines = ["", f"CPU: {features.name}; threads for the CLI now: {default_threads(adapt)} ({tuning})"]
    lib = native.library()
    paths = ", ".join(sorted(native.kernel_paths())) or native.fallback_note() or "AVX2"
    lines.append(f"  decode step: the native kernel ({paths}), built at {lib._name}" if lib is not None else
                 f"  decode step: PyTorch's flat step (native kernel unavailable: {native.unavailable_reason()})")
    for dtype in quantize.WEIGHT_DTYPES:
        plan = quantize.plan_for_this_cpu(dtype)
        lines.append(f"  {dtype} layers on {threads} thread(s): blocks {plan.block.__name__}, head {plan.head.__name__}")
    return lines
