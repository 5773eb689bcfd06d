"""Decode speed while other programs keep cores busy: fixed thread counts against the native step's thread tuner.

    python benchmarks/threads_under_load.py [--preset gpt2] [--dtypes fp32,int8] [--busy 0,1,2] [--tokens 128]
                                            [--rounds 3] [--spin-us 20]

For each count of busy programs (`python -c "while True: pass"` at normal priority, started before the round and
killed after), the model prepared by `prepare_for_inference` in each dtype (random weights, GPT-2's init, seed 0)
decodes `--tokens` greedy tokens after a 16-token prompt in one `generate` call, three ways in turn each round:

- 1 thread, fixed;
- torch's thread count, fixed (`NativeStep(adaptive_threads=False)`);
- torch's thread count as the upper bound of the thread tuner (the default), with a fresh tuner per call: what one
  CLI call on a loaded machine sees (a long-lived program's tuner has learned already).

Prints the median tok/s of `--rounds` rounds, the tuner's speed over the better fixed count's, and the tuner's probes
and switches in its last call. `--spin-us` lists barrier spin times to run everything under (20 is the kernel's
default; a long one, e.g. 5000, behaves like OpenMP's own barrier). Without the native kernel it says why and exits 0.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import subprocess
import sys
import time

import torch

from gpt2lab import GPT, GPTConfig, native
from gpt2lab import native_step
from gpt2lab.cpu import cpu_flags
from gpt2lab.generate import generate
from gpt2lab.inference import prepare_for_inference
from gpt2lab.native_step import NativeStep


def tokens_per_second(model: GPT, prompt: torch.Tensor, tokens: int, threads: int, adaptive: bool):
    """Decode tok/s of one `generate` call (the one-token call's time, prefill and set-up, taken off) and the
    tuner's (threads, probes, switches) after it, or None without one."""
    torch.set_num_threads(threads)

    def make_step(m):
        return NativeStep(m, adaptive_threads=adaptive)

    times = []
    for n in (1, tokens):
        native_step._TUNERS.pop(model, None)  # a fresh tuner per call
        start = time.perf_counter()
        generate(model, prompt, n, temperature=0, make_step=make_step)
        times.append(time.perf_counter() - start)
    tuner = native_step._TUNERS.get(model) if adaptive else None
    state = None if tuner is None else (tuner.ladder[tuner.level], tuner.probes, tuner.switches)
    return (tokens - 1) / max(times[1] - times[0], 1e-9), state


def busy_programs(count: int) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    time.sleep(0.5 if count else 0)  # let the scheduler place them
    return procs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="gpt2")
    ap.add_argument("--dtypes", default="fp32,int8")
    ap.add_argument("--busy", default="0,1,2")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--spin-us", default="20")
    args = ap.parse_args()
    print("CPU flags: " + " ".join(cpu_flags()))
    if native.library() is None:
        print(f"the native kernel is unavailable here: {native.unavailable_reason()}; nothing to measure")
        return
    most = torch.get_num_threads()
    torch.manual_seed(0)
    base = GPT(GPTConfig.preset(args.preset)).eval()
    prompt = torch.randint(0, base.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    models = {dtype: prepare_for_inference(copy.deepcopy(base), dtype) for dtype in args.dtypes.split(",")}
    ways = [("1 thread", 1, False), (f"{most} fixed", most, False), (f"{most} tuned", most, True)]
    try:
        run_ways(args, models, prompt, ways)
    finally:
        torch.set_num_threads(most)


def run_ways(args: argparse.Namespace, models: dict, prompt: torch.Tensor, ways: list) -> None:
    """Each count of busy programs, spin and dtype: the three ways in turn, `--rounds` times; one line each."""
    print(f"{args.preset}, {args.tokens} tokens after 16, batch 1, median of {args.rounds} rounds; tok/s")
    for busy in (int(b) for b in args.busy.split(",")):
        procs = busy_programs(busy)
        try:
            for spin in (float(s) for s in args.spin_us.split(",")):
                native.set_barrier_spin(spin)
                for dtype, model in models.items():
                    rates: dict[str, list[float]] = {name: [] for name, _, _ in ways}
                    state = None
                    for _ in range(args.rounds):
                        for name, threads, adaptive in ways:
                            rate, got = tokens_per_second(model, prompt, args.tokens, threads, adaptive)
                            rates[name].append(rate)
                            state = got or state
                    med = {name: statistics.median(r) for name, r in rates.items()}
                    fixed = max(med[ways[0][0]], med[ways[1][0]])
                    cells = ", ".join(f"{name} {rate:.1f}" for name, rate in med.items())
                    tuner = ("no tuner (this model does not decode through the native step)" if state is None else
                             f"tuner's last call ended at {state[0]} thread(s) after {state[1]} probe(s), "
                             f"{state[2]} switch(es)")
                    print(f"busy {busy} (load {os.getloadavg()[0]:.1f}) spin {spin:g} us {dtype}: {cells}; "
                          f"tuned / best fixed {med[ways[2][0]] / fixed:.2f}x; {tuner}", flush=True)
        finally:
            for p in procs:
                p.kill()
                p.wait()
            native.set_barrier_spin(20)


if __name__ == "__main__":
    main()
