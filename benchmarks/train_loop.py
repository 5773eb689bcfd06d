"""Training steps per second: `gpt2lab.train` against a stand-in for nanoGPT's train.py, same recipe, one run.

    python benchmarks/train_loop.py --data ../shared/data/tinyshakespeare.txt [--steps 1000] [--rounds 2]
                                    [--threads 2] [--concurrent] [--bias] [--compile]

The recipe is nanoGPT's CPU example (its README: config/train_shakespeare_char.py with --device=cpu --compile=False
--eval_iters=20 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --dropout=0.0): a char-level
4 x 128 model with 64 characters of context, batch 12, fp32, AdamW (betas 0.9, 0.99, weight decay 0.1 on 2-D
weights), lr 1e-3 warmed up over 100 steps and cosine-decayed to 1e-4, gradient clipping at 1.0, an eval of 20
batches every 250 steps, a log line every 10. Both models have nanoGPT's defaults: no biases, exact GELU (`--bias`
gives both biases).

- nanogpt: nanoGPT's code is not available here (no network, not on PyPI), so this file holds a stand-in written
  from its train.py and model.py, step for step: a fresh np.memmap of the uint16 train.bin for every batch, 12
  random offsets, x and y stacked from int64 slices; the lr set on every param group; `logits, loss = model(X, Y)`
  (the full (B, T, V) logits, then F.cross_entropy); the next batch drawn before backward; clip_grad_norm_(1.0);
  `torch.optim.AdamW` without `fused` (nanoGPT asks for fused only on CUDA, so on a CPU torch picks its default
  per-tensor loop); zero_grad(set_to_none=True); `loss.item()` only every 10 steps; at each eval 20 batches of
  train and of val, and `torch.save` of model and optimizer when the val loss improved.
- gpt2lab: `gpt2lab.train.train` on the same recipe, the real loop as `gpt2lab train` runs it: progress bar,
  log.jsonl, the clock, evals with best/ and last/ checkpoints and the loss plot, a checkpoint at the end.

Each contender's figure is its steps over the wall time of the whole call (model building, evals, checkpoints
included). Without `--concurrent` the two run one after the other, `--rounds` times, alternating, with `--threads`
each; the ratio is of the medians. With `--concurrent` they run at once in two processes, one thread each, so that a
noisy machine slows both alike. `--compile` adds gpt2lab with `compile = true` (its compile time is in its wall time).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from _procs import run_concurrently

RECIPE = dict(batch_size=12, block_size=64, n_layer=4, n_head=4, n_embd=128, lr=1e-3, min_lr=1e-4, warmup=100,
              beta1=0.9, beta2=0.99, weight_decay=0.1, grad_clip=1.0, eval_interval=250, eval_iters=20,
              log_interval=10)


# ------------------------------------------------------------------------------------ the nanoGPT stand-in: model
class NanoAttention(nn.Module):
    """nanoGPT's CausalSelfAttention: one c_attn matmul for q, k, v; sdpa with is_causal; c_proj."""

    def __init__(self, n_embd: int, n_head: int, bias: bool) -> None:
        super().__init__()
        self.n_head = n_head
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, D)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))  # (B, T, C)


class NanoMLP(nn.Module):
    """nanoGPT's MLP: c_fc, exact GELU, c_proj."""

    def __init__(self, n_embd: int, bias: bool) -> None:
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))  # (B, T, C) -> (B, T, 4C) -> (B, T, C)


class NanoBlock(nn.Module):
    """nanoGPT's Block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); biases optional (its default has none)."""

    def __init__(self, n_embd: int, n_head: int, bias: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = NanoAttention(n_embd, n_head, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = NanoMLP(n_embd, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))  # (B, T, C)
        return x + self.mlp(self.ln_2(x))  # (B, T, C)


class NanoGPT(nn.Module):
    """nanoGPT's GPT: token + position embeddings, blocks, ln_f, tied lm_head; forward(idx, targets) returns the
    (B, T, V) logits and F.cross_entropy over them."""

    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int, n_embd: int, bias: bool) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(block_size, n_embd)
        self.h = nn.ModuleList(NanoBlock(n_embd, n_head, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, 0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(0, idx.size(1), dtype=torch.long)  # (T,)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss


# ------------------------------------------------------------------------------------- the nanoGPT stand-in: loop
def nano_lr(it: int, max_iters: int) -> float:
    """nanoGPT's get_lr: linear warmup, cosine to min_lr at lr_decay_iters (= max_iters in the README recipe)."""
    r = RECIPE
    if it < r["warmup"]:
        return r["lr"] * (it + 1) / (r["warmup"] + 1)
    if it > max_iters:
        return r["min_lr"]
    ratio = (it - r["warmup"]) / (max_iters - r["warmup"])
    return r["min_lr"] + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (r["lr"] - r["min_lr"])


def nano_batch(data_dir: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """nanoGPT's get_batch on a CPU: a fresh memmap each call (it avoids a memory leak), random offsets, stacks."""
    r = RECIPE
    data = np.memmap(data_dir / f"{split}.bin", dtype=np.uint16, mode="r")
    ix = torch.randint(len(data) - r["block_size"], (r["batch_size"],))
    x = torch.stack([torch.from_numpy(data[i:i + r["block_size"]].astype(np.int64)) for i in ix])  # (B, T)
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + r["block_size"]].astype(np.int64)) for i in ix])  # (B, T)
    return x, y


def run_nanogpt(data_dir: Path, out_dir: Path, steps: int, threads: int, vocab_size: int, bias: bool) -> dict:
    """nanoGPT's train.py loop for `steps` iterations (max_iters = lr_decay_iters = steps - 1: it stops after the
    iteration numbered max_iters); returns the steps and the wall time of the whole call."""
    t_start = time.perf_counter()
    r = RECIPE
    torch.set_num_threads(threads)
    torch.manual_seed(1337)
    model = NanoGPT(vocab_size, r["block_size"], r["n_layer"], r["n_head"], r["n_embd"], bias)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": r["weight_decay"]},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=r["lr"], betas=(r["beta1"], r["beta2"]))  # no fused on a CPU
    max_iters = steps - 1

    @torch.no_grad()
    def estimate_loss() -> dict[str, float]:
        model.eval()
        out = {}
        for split in ("train", "val"):
            losses = torch.zeros(r["eval_iters"])
            for k in range(r["eval_iters"]):
                _, loss = model(*nano_batch(data_dir, split))
                losses[k] = loss.item()
            out[split] = float(losses.mean())
        model.train()
        return out

    X, Y = nano_batch(data_dir, "train")
    iter_num, best_val_loss, t0 = 0, 1e9, time.time()
    while True:
        lr = nano_lr(iter_num, max_iters)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if iter_num % r["eval_interval"] == 0:
            losses = estimate_loss()
            print(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            if losses["val"] < best_val_loss:
                best_val_loss = losses["val"]
                if iter_num > 0:
                    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                "iter_num": iter_num, "best_val_loss": best_val_loss}, out_dir / "ckpt.pt")
        _, loss = model(X, Y)
        X, Y = nano_batch(data_dir, "train")  # prefetch-style: the next batch before backward
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t1 = time.time()
        dt, t0 = t1 - t0, t1
        if iter_num % r["log_interval"] == 0:
            print(f"iter {iter_num}: loss {loss.item():.4f}, time {dt * 1000:.2f}ms")
        iter_num += 1
        if iter_num > max_iters:
            break
    return {"steps": iter_num, "seconds": time.perf_counter() - t_start}


# ----------------------------------------------------------------------------------------------------- gpt2lab
def run_gpt2lab(data_dir: Path, out_dir: Path, steps: int, threads: int, bias: bool, compile: bool) -> dict:
    """`gpt2lab.train.train` with the same recipe; returns the steps and the wall time of the whole call."""
    from gpt2lab.config import GPTConfig, TrainConfig
    from gpt2lab.train import train

    t_start = time.perf_counter()
    r = RECIPE
    model = GPTConfig(n_ctx=r["block_size"], n_layer=r["n_layer"], n_head=r["n_head"], n_embd=r["n_embd"],
                      bias=bias, activation="gelu", dropout=0.0)
    config = TrainConfig(data_dir=str(data_dir), out_dir=str(out_dir), model=model, batch_size=r["batch_size"],
                         seq_len=r["block_size"], lr=r["lr"], min_lr=r["min_lr"], warmup_steps=r["warmup"],
                         beta1=r["beta1"], beta2=r["beta2"], weight_decay=r["weight_decay"], grad_clip=r["grad_clip"],
                         eval_interval=r["eval_interval"], eval_iters=r["eval_iters"],
                         log_interval=r["log_interval"], max_steps=steps, threads=threads, compile=compile)
    result = train(config, overwrite=True, progress=True)
    return {"steps": result.state.step, "seconds": time.perf_counter() - t_start}


# -------------------------------------------------------------------------------------------------------- harness
def prepare(text: str, root: Path) -> tuple[Path, Path, int]:
    """gpt2lab's char-level shards (90/10 split) and the same tokens as nanoGPT's train.bin / val.bin (uint16)."""
    from gpt2lab.data import TokenData, prepare as prepare_shards

    ours = root / "data-char"
    prepare_shards(text, ours, tokenizer="char", val_fraction=0.1, workers=1, progress=False)
    data = TokenData(ours)
    nano = root / "data-nanogpt"
    nano.mkdir()
    for split in ("train", "val"):
        tokens = np.concatenate([np.asarray(s) for s in data.splits[split]]).astype(np.uint16)
        tokens.tofile(nano / f"{split}.bin")
    return ours, nano, data.vocab_size


def run_one(name: str, args: argparse.Namespace, paths: tuple[Path, Path, int], root: Path, round_: int,
            threads: int, queue=None) -> dict:
    """One contender's run with its printing sent to /dev/null (both print a line every few steps)."""
    ours, nano, vocab = paths
    out = root / f"{name}-{round_}"
    out.mkdir()
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        if name == "nanogpt":
            row = run_nanogpt(nano, out, args.steps, threads, vocab, args.bias)
        else:
            row = run_gpt2lab(ours, out, args.steps, threads, args.bias, compile=name == "gpt2lab-compiled")
    row["name"] = name
    if queue is not None:
        queue.put(row)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="tinyshakespeare.txt (char-rnn's input.txt)")
    parser.add_argument("--steps", type=int, default=1000, help="training steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each contender")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--concurrent", action="store_true", help="run the contenders at once, one thread each")
    parser.add_argument("--bias", action="store_true", help="biases in both models (nanoGPT's default has none)")
    parser.add_argument("--compile", action="store_true", help="also gpt2lab with compile = true")
    args = parser.parse_args()
    names = ["nanogpt", "gpt2lab"] + (["gpt2lab-compiled"] if args.compile else [])
    rates: dict[str, list[float]] = {n: [] for n in names}  # steps/s of each round
    with tempfile.TemporaryDirectory(prefix="train-loop-") as d:
        root = Path(d)
        paths = prepare(args.data, root)
        for round_ in range(args.rounds):
            order = names if round_ % 2 == 0 else names[::-1]
            if args.concurrent:
                rows = run_concurrently(run_one, [(n, args, paths, root, round_, 1) for n in order])
            else:
                rows = [run_one(n, args, paths, root, round_, args.threads) for n in order]
            for row in rows:
                rates[row["name"]].append(row["steps"] / row["seconds"])
                print(f"round {round_ + 1}: {row['name']} {row['steps'] / row['seconds']:.2f} steps/s "
                      f"({row['steps']} steps, {row['seconds']:.1f} s)", flush=True)  # survives a killed run
    threads = 1 if args.concurrent else args.threads
    print(f"train loop: nanoGPT's CPU recipe (4x128, block 64, batch 12, fp32{', biases' if args.bias else ''}), "
          f"{args.steps} steps x {args.rounds} round(s), {threads} thread(s) each"
          f"{', concurrently' if args.concurrent else ', alternating'}, torch {torch.__version__}")
    print(f"{'loop':>17} {'steps/s (median)':>17}  per round")
    for name in names:
        print(f"{name:>17} {statistics.median(rates[name]):>17.2f}  {' '.join(f'{r:.2f}' for r in rates[name])}")
    for name in names[1:]:
        ratios = [ours / base for ours, base in zip(rates[name], rates["nanogpt"])]  # each round's own pair
        print(f"{name} / nanogpt: steps/s {statistics.median(ratios):.3f}x (median of the rounds' ratios: "
              f"{' '.join(f'{r:.3f}' for r in ratios)})")


if __name__ == "__main__":
    main()
