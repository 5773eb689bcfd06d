"""The quickstart recipe: prepare Shakespeare (char-level), train a small model for a few minutes on the CPU, and
print samples from it.

It uses two jobs, training and generation, so it sits in the api layer above them (docs/architecture.md), and
cli/ runs it as `gpt2lab quickstart`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any

import torch

from gpt2lab.checkpoint import load_model
from gpt2lab.config import GPTConfig, TrainConfig
from gpt2lab.data import TokenData, prepare, read_meta
from gpt2lab.generate import generate
from gpt2lab.model import GPT
from gpt2lab.tokenizer import load_tokenizer
from gpt2lab.train import BEST, CONFIG_FILE, LAST, LOG_FILE, PLOT_FILE, RunResult, find_checkpoint, train

QUICKSTART_SOURCE = "shakespeare"
QUICKSTART_TOKENIZER = "char"
QUICKSTART = TrainConfig(
    data_dir="data/shakespeare-char",
    out_dir="runs/quickstart",
    model=GPTConfig(n_ctx=64, n_layer=4, n_head=4, n_embd=128),
    batch_size=12,
    seq_len=64,
    optimizer="muon",
    muon_lr=0.05,
    lr=3e-3,
    min_lr=1e-4,
    warmup_steps=30,
    max_steps=100_000,  # the clock stops it; the cosine follows the clock
    max_minutes=5.0,
    weight_decay=0.1,
    beta2=0.99,
    eval_interval=100,
    eval_iters=10,
    log_interval=10,
)
"""The quickstart run: nanoGPT's CPU example size (4 x 128, 64 characters of context, batch 12) with the speedrun's
winning recipe (Muon on the block matrices at 0.05, AdamW at 3e-3 on the rest, cosine timed by the clock).
configs/quickstart.toml holds the same values (a test keeps them equal)."""


def ensure_prepared(source: str, tokenizer: str, data_dir: str | os.PathLike[str], progress: bool = True) -> Path:
    """Prepare `source` into `data_dir` unless a complete preparation of the same source and tokenizer is there.

    A damaged preparation of the same source and tokenizer is gpt2lab's own and is prepared again; anything else in
    `data_dir` is refused by `prepare` (the caller chooses another directory)."""
    same = False
    with contextlib.suppress(OSError, ValueError):
        meta = read_meta(data_dir)
        same = meta.get("source") == source and meta.get("tokenizer") == tokenizer
        if same:
            TokenData(data_dir)  # checks every shard against meta.json
            return Path(data_dir)
    prepare(source, data_dir, tokenizer=tokenizer, progress=progress, overwrite=same)
    return Path(data_dir)


def sample_texts(model: GPT, tokenizer: Any, prompts: list[str], max_new_tokens: int, temperature: float = 0.8,
                 top_k: int | None = 40, seed: int = 0) -> list[str]:
    """Continue each prompt (top-k sampling, seeded); returns prompt + continuation, one per prompt."""
    model.eval()
    generator = torch.Generator(device=model.device).manual_seed(seed)
    out = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=model.device)  # (1, T)
        new = generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k,  # slides past n_ctx
                       eos_token_id=tokenizer.eot_token, generator=generator)  # (1, T + N)
        tokens = [t for t in new[0].tolist() if t != tokenizer.eot_token]
        out.append(tokenizer.decode(tokens))
    return out


def quickstart(minutes: float = QUICKSTART.max_minutes, out_dir: str = QUICKSTART.out_dir,
               data_dir: str = QUICKSTART.data_dir, samples: int = 3, progress: bool = True,
               echo: Any = print, overwrite: bool = False) -> tuple[RunResult, list[str]]:
    """Prepare the complete works of Shakespeare (char-level), train the quickstart model for `minutes`, and
    return the run and a few samples from the best checkpoint (also echoed). An earlier run in `out_dir` is
    replaced only with `overwrite` (checked before any work)."""
    earlier = find_checkpoint(Path(out_dir)) if Path(out_dir).is_dir() else None
    if earlier is not None and not overwrite:
        raise FileExistsError(f"{out_dir} already holds a run (checkpoint {earlier}); pass --overwrite "
                              "(overwrite=True) to train the quickstart there again, or choose another --out")
    echo(f"[1/3] preparing {QUICKSTART_SOURCE!r} ({QUICKSTART_TOKENIZER} tokens) in {data_dir}")
    ensure_prepared(QUICKSTART_SOURCE, QUICKSTART_TOKENIZER, data_dir, progress=progress)
    config = dataclasses.replace(QUICKSTART, out_dir=str(out_dir), data_dir=str(data_dir), max_minutes=float(minutes))
    echo(f"[2/3] training a {config.model.n_layer}-layer, {config.model.n_embd}-wide model for {minutes:g} min "
         f"into {out_dir}")
    result = train(config, overwrite=overwrite, progress=progress)
    s = result.state
    echo(f"      {s.step} steps, {s.tokens:,} tokens in {s.elapsed_s:.0f} s; val loss {s.last_val_loss:.4f} "
         f"({s.last_val_bpb:.3f} bits/byte), train loss {s.last_train_loss:.4f}")
    best = find_checkpoint(Path(out_dir), BEST) or Path(out_dir) / LAST
    model, tokenizer = load_model(best), load_tokenizer(best)
    prompts = ["ROMEO:\n", "JULIET:\n", "KING HENRY:\n", "HAMLET:\n", "First Citizen:\n"][:samples]
    texts = sample_texts(model, tokenizer, prompts, max_new_tokens=200, seed=config.seed) if samples else []
    echo(f"[3/3] samples from {best} (temperature 0.8, top-k 40):")
    for text in texts:
        echo("-" * 60 + "\n" + text)
    run = Path(out_dir)
    echo("-" * 60 + f"\nmodel directory: {best} (loads with GPT.from_pretrained or transformers' GPT2LMHeadModel)\n"
         f"log: {run / LOG_FILE}, loss curve: {run / PLOT_FILE}, config: {run / CONFIG_FILE}")
    return result, texts
