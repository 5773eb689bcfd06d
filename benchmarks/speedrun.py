"""Speedrun: the best validation bits per byte on tiny Shakespeare in a fixed wall time on this machine's CPU.

    python benchmarks/speedrun.py --data ../shared/data/tinyshakespeare.txt --minutes 5 [--threads 2] [--concurrent]

Both recipes train on the first 90% of the file and are scored on the last 10% (cut at the line break just before
90%, by `gpt2lab prepare --val-fraction 0.1`), for the same wall time on the same machine, and are scored the same
way: every val token is predicted once, in consecutive windows of the recipe's context length, and the summed loss is
turned into bits per byte of text (so char-level and BPE recipes compare).

- baseline: nanoGPT's classic char-level Shakespeare recipe on CPU, as its README runs it
  (train_shakespeare_char with --device=cpu --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
  --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0: lr 1e-3 warmed up over 100 steps and cosine-decayed to 1e-4
  at step 2000, AdamW betas (0.9, 0.99), weight decay 0.1, gradient clipping 1.0, fp32). nanoGPT's code is not used:
  gpt2lab's model and loop stand in for it with those hyperparameters. If 2000 steps finish early it keeps going at
  min_lr, so it gets the whole wall time too.
- gpt2lab: the recipe chosen for this budget, configs/speedrun.toml (see RECIPES and docs/training.md).

`--concurrent` trains the recipes at the same time, one thread each, so a noisy shared machine slows both alike;
without it they run one after the other with `--threads` each.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch

from _procs import run_concurrently

RECIPES = {
    "baseline": dict(
        tokenizer="char", model=dict(n_ctx=64, n_layer=4, n_head=4, n_embd=128), batch_size=12, seq_len=64,
        lr=1e-3, min_lr=1e-4, warmup_steps=100, decay_steps=2000, beta2=0.99, clock_schedule=False,
    ),
    "gpt2lab": dict(  # configs/speedrun.toml: Muon on the block matrices, AdamW on the rest, clock-timed cosine
        tokenizer="char", model=dict(n_ctx=64, n_layer=4, n_head=4, n_embd=128), batch_size=12, seq_len=64,
        lr=3e-3, min_lr=1e-4, warmup_steps=30, decay_steps=0, beta2=0.99, clock_schedule=True,
        optimizer="muon", muon_lr=0.05,
    ),
    "adamw": dict(  # the previous winner: the same with AdamW everywhere (the quickstart's recipe)
        tokenizer="char", model=dict(n_ctx=64, n_layer=4, n_head=4, n_embd=128), batch_size=12, seq_len=64,
        lr=3e-3, min_lr=1e-4, warmup_steps=30, decay_steps=0, beta2=0.99, clock_schedule=True,
    ),
    "ctx128": dict(  # the quickstart's shape: 4x more tokens per step, a 128-character context
        tokenizer="char", model=dict(n_ctx=128, n_layer=4, n_head=4, n_embd=128), batch_size=16, seq_len=128,
        lr=3e-3, min_lr=1e-4, warmup_steps=30, decay_steps=0, beta2=0.99, clock_schedule=True,
    ),
}  # fmt: skip


def prepare_data(text_path: str, tokenizer: str, root: Path) -> Path:
    from gpt2lab.data import prepare

    out = root / f"data-{tokenizer.replace('/', '_')}"
    if not (out / "meta.json").is_file():
        prepare(text_path, out, tokenizer=tokenizer, val_fraction=0.1, workers=1, progress=False)
    return out


@torch.no_grad()
def val_bits_per_byte(model, data, seq_len: int) -> float:
    """Every val token predicted once: consecutive windows of seq_len (+1 for the targets), summed nats -> bits/byte."""
    import numpy as np

    model.eval()
    tokens = np.concatenate([np.asarray(s) for s in data.splits["val"]]).astype(np.int64)
    total, count = 0.0, 0
    for start in range(0, len(tokens) - 1, seq_len * 32):
        chunk = tokens[start:start + seq_len * 32 + 1]
        n = (len(chunk) - 1) // seq_len * seq_len
        if n == 0:
            x, y = torch.from_numpy(chunk[:-1])[None], torch.from_numpy(chunk[1:])[None]
        else:
            x = torch.from_numpy(chunk[:n]).view(-1, seq_len)  # (B, T)
            y = torch.from_numpy(chunk[1:n + 1]).view(-1, seq_len)  # (B, T)
        logits = model(x)
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        count += y.numel()
        if n and n < len(chunk) - 1:  # the leftover tail of the last chunk
            x, y = torch.from_numpy(chunk[n:-1])[None], torch.from_numpy(chunk[n + 1:])[None]
            total += torch.nn.functional.cross_entropy(model(x)[0], y[0], reduction="sum").item()
            count += y.numel()
    return total / math.log(2) / data.meta["splits"]["val"]["bytes"]


def run_recipe(name: str, recipe: dict, text_path: str, minutes: float, threads: int, root: str, queue=None) -> dict:
    from gpt2lab.checkpoint import load_model
    from gpt2lab.config import GPTConfig, TrainConfig
    from gpt2lab.data import TokenData
    from gpt2lab.train import train

    recipe = dict(recipe)
    data_dir = prepare_data(text_path, recipe.pop("tokenizer"), Path(root))
    model = GPTConfig(**recipe.pop("model"))
    run = dict(max_steps=10**7, max_minutes=minutes, threads=threads, eval_interval=10**7, eval_iters=5,
               log_interval=50) | recipe  # a recipe may set its own max_steps (a step-count comparison)
    config = TrainConfig(data_dir=str(data_dir), out_dir=str(Path(root) / f"run-{name}"), model=model, **run)
    result = train(config, overwrite=True, progress=False)
    torch.set_num_threads(threads)
    best = load_model(Path(config.out_dir) / "last")
    bpb = val_bits_per_byte(best, TokenData(data_dir), config.seq_len)
    row = {"recipe": name, "steps": result.state.step, "tokens": result.state.tokens, "seconds": result.state.elapsed_s,
           "val_bpb": bpb, "params": best.num_parameters()}
    if queue is not None:
        queue.put(row)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="tinyshakespeare.txt (char-rnn's input.txt)")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--recipes", default="baseline,gpt2lab")
    parser.add_argument("--concurrent", action="store_true", help="train the recipes at once, one thread each")
    args = parser.parse_args()
    names = args.recipes.split(",")
    with tempfile.TemporaryDirectory(prefix="speedrun-") as root:
        for name in names:  # tokenize up front so data preparation is outside the timed budget of every recipe
            prepare_data(args.data, RECIPES[name]["tokenizer"], Path(root))
        t0 = time.time()
        if args.concurrent:
            rows = run_concurrently(run_recipe, [(n, RECIPES[n], args.data, args.minutes, 1, root) for n in names])
        else:
            rows = [run_recipe(n, RECIPES[n], args.data, args.minutes, args.threads, root) for n in names]
    threads = 1 if args.concurrent else args.threads
    print(f"speedrun: tiny Shakespeare, {args.minutes:g} min of training per recipe, {threads} thread(s) each"
          f"{', concurrently' if args.concurrent else ''}, torch {torch.__version__} ({time.time() - t0:.0f} s total)")
    print(f"{'recipe':>10} {'params':>8} {'steps':>7} {'steps/s':>8} {'tokens':>10} {'seconds':>8} "
          f"{'val bits/byte':>14}")
    for row in sorted(rows, key=lambda r: names.index(r["recipe"])):
        print(f"{row['recipe']:>10} {row['params'] / 1e6:>7.2f}M {row['steps']:>7} "
              f"{row['steps'] / row['seconds']:>8.2f} {row['tokens']:>10,} {row['seconds']:>8.0f} "
              f"{row['val_bpb']:>14.4f}")
    by = {r["recipe"]: r for r in rows}
    if "baseline" in by:
        base = by["baseline"]
        for name in (n for n in names if n != "baseline"):
            row = by[name]
            print(f"{name} / baseline: bits/byte {row['val_bpb'] / base['val_bpb']:.3f}x "
                  f"({1 - row['val_bpb'] / base['val_bpb']:+.1%} fewer), steps/s "
                  f"{row['steps'] / row['seconds'] / (base['steps'] / base['seconds']):.2f}x")


if __name__ == "__main__":
    main()
