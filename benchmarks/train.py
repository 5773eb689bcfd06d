"""Training throughput: gpt2lab's training step vs transformers' GPT2LMHeadModel, same config, batch, threads, one run.

    python benchmarks/train.py [--preset nano] [--batch 8] [--seq 256] [--threads 2] [--dtypes fp32,bf16] [--compile]

A step is forward + backward + AdamW update + zeroing the gradients, on the same weights and the same batch:

- ours:    gpt2lab's step as `gpt2lab train` runs it (GPT.loss: LM head and loss fused in fp32 on a CPU, fused
           AdamW, bf16 autocast);
- ours-unfused: the same model and optimizer with the plain loss, `F.cross_entropy(model(x), y)`, to show what the
           fused head + loss (gpt2lab.loss) is worth;
- theirs:  `GPT2LMHeadModel(input_ids, labels=...)` with `torch.optim.AdamW` at its defaults (the foreach kernel),
           i.e. what a transformers user writes; the line "theirs+fused" gives them our fused AdamW too, so the
           ratio splits into model and optimizer.

Steps are interleaved (ours, theirs, theirs+fused, ours, ...) so a noisy machine slows all alike; the median step
time of each is reported with tokens/s, the ratio ours / theirs (> 1: gpt2lab faster) and our MFU against the peak
that train.peak_flops computes (docs/training.md). `--compile` adds torch.compile of our model (compile time shown).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch


def make_models(args: argparse.Namespace):
    from transformers import GPT2LMHeadModel

    from gpt2lab import GPT, GPTConfig

    config = GPTConfig.preset(args.preset, vocab_size=args.vocab, n_ctx=max(args.seq, GPTConfig.preset(args.preset).n_ctx))
    torch.manual_seed(0)
    ours = GPT(config).train()
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        theirs = GPT2LMHeadModel.from_pretrained(d, attn_implementation="sdpa").train()
        theirs_fused = GPT2LMHeadModel.from_pretrained(d, attn_implementation="sdpa").train()
    return config, ours, theirs, theirs_fused


def step_fns(args: argparse.Namespace, dtype: str, ours, theirs, theirs_fused, x, y):
    from gpt2lab.config import TrainConfig
    from gpt2lab.loss import cross_entropy
    from gpt2lab.train import TrainingLoss, autocast, make_optimizer

    cpu = torch.device("cpu")
    opt_ours = make_optimizer(ours, TrainConfig(model=ours.config, seq_len=args.seq), cpu)  # fused, decay groups
    opt_theirs = torch.optim.AdamW(theirs.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    opt_theirs_fused = torch.optim.AdamW(theirs_fused.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1,
                                         fused=True)
    step_loss = torch.compile(TrainingLoss(ours)) if args.compile else TrainingLoss(ours)

    def ours_step() -> float:
        with autocast(cpu, dtype):
            loss = step_loss(x, y)
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)
        return loss.item()

    plain = copy.deepcopy(ours)
    opt_plain = make_optimizer(plain, TrainConfig(model=plain.config, seq_len=args.seq), cpu)

    def plain_step() -> float:  # our model, unfused: logits, then F.cross_entropy
        with autocast(cpu, dtype):
            loss = cross_entropy(plain(x), y)
        loss.backward()
        opt_plain.step()
        opt_plain.zero_grad(set_to_none=True)
        return loss.item()

    def peer_step(model, opt):
        def step() -> float:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss.item()

        return step

    return {"ours": ours_step, "ours-unfused": plain_step, "theirs": peer_step(theirs, opt_theirs), "theirs+fused": peer_step(theirs_fused, opt_theirs_fused)}


def measure(fns: dict, steps: int, warmup: int) -> tuple[dict[str, float], float]:
    t0 = time.perf_counter()
    for fn in fns.values():  # warm-up (and, with --compile, compilation)
        fn()
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="nano", help="gpt2lab preset for the architecture (default: nano, 6x384)")
    parser.add_argument("--vocab", type=int, default=50257, help="vocabulary size (default: GPT-2's 50257)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=6, help="timed steps per contender")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--compile", action="store_true", help="torch.compile our model (reports compile time)")
    args = parser.parse_args()

    import transformers

    from gpt2lab.train import flops_per_token, peak_flops

    torch.set_num_threads(args.threads)
    config, ours, theirs, theirs_fused = make_models(args)
    tokens = args.batch * args.seq
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, config.vocab_size, (args.batch, args.seq + 1), generator=g)
    x, y = x[:, :-1].contiguous(), x[:, 1:].contiguous()
    print(f"training step, gpt2lab vs transformers {transformers.__version__}: {args.preset} ({config.n_layer}x{config.n_embd}, "
          f"vocab {config.vocab_size}, {ours.num_parameters() / 1e6:.1f}M params), batch {args.batch}x{args.seq}, "
          f"{args.threads} thread(s), torch {torch.__version__}{', compiled' if args.compile else ''}")
    print(f"{'dtype':>5} {'contender':>14} {'ms/step':>9} {'tok/s':>9} {'ours/this':>10} {'MFU':>6}")
    for dtype in args.dtypes.split(","):
        fns = step_fns(args, dtype, ours, theirs, theirs_fused, x, y)
        med, first = measure(fns, args.steps, args.warmup)
        peak, how = peak_flops(torch.device("cpu"), dtype, args.threads)
        for name, t in med.items():
            mfu = tokens * flops_per_token(config, args.seq) / t / peak
            ratio = med[name] / med["ours"]
            print(f"{dtype:>5} {name:>14} {t * 1000:>9.1f} {tokens / t:>9,.0f} {ratio:>9.2f}x {mfu:>6.1%}")
        print(f"      peak: {how}; first round (warm-up{' + compile' if args.compile else ''}): {first:.1f} s")


if __name__ == "__main__":
    main()
