"""GPU readiness in one command: the CUDA tests, then GPT-2 124M training and generation speed against transformers.

    python benchmarks/gpu.py [--batch 16] [--seq 1024] [--steps 30] [--gen-tokens 128] [--skip-tests]

On one CUDA GPU it finishes in under 8 minutes: each part runs in its own process under a time limit (`--tests-s`,
`--train-s`, `--generate-s`, 450 s together by default), stops its timed loop early when its time runs short, and a
part that runs out of time is reported as such while the others still run.

1. tests: `pytest -m cuda -q` (tests/test_cuda.py: logits, attention kernels, bf16 and compiled training steps,
   cached generation and checkpoints on the GPU against the CPU).
2. train: GPT-2 124M, one step = forward, backward, gradient clipping at 1.0, AdamW, zeroing the gradients, on
   B x T tokens, bf16 autocast with fp32 weights, torch.compile, fused AdamW (`train.make_optimizer`, the same decay
   groups for both), PyTorch's SDPA attention (the flash kernel on the causal path), TF32 on as `gpt2lab train` sets it:
   - ours:   `train.TrainingLoss`, the loss module `gpt2lab train` compiles;
   - theirs: transformers' `GPT2LMHeadModel(attn_implementation="sdpa")` on the same weights, `model(input_ids,
     labels=...).loss`, compiled the same way.
   Steps alternate (ours, theirs, ours, ...) on the same batch, so a GPU that clocks down slows both; the first step
   of each (compilation) and `--warmup` more are not timed. Reported: the median step, tokens/s, MFU against the
   GPU's dense bf16 peak (`train.GPU_PEAK_BF16`, found by device name) and ours / theirs.
3. generate: greedy decoding of `--gen-tokens` tokens after a 16-token prompt at batch 1 and 8, bf16 weights, gpt2lab's
   `generate` against transformers' `generate` (its default dynamic cache). Decode tokens/s counts the per-token cost
   alone: (generate N tokens) - (generate 1 token), which is the prefill plus one step, as benchmarks/generate.py does;
   best of the rounds that fit the time.

The summary marks the goals of issue 16, set for an H100/H200-class GPU: our MFU >= 50%, and >= 1.3x transformers'
training tokens/s. Without a CUDA device the script prints one line and exits 0. docs/training.md ("On a GPU") says
how to record the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from gpt2lab import GPTConfig
from gpt2lab.train import flops_per_token, gpu_peak_bf16

ROOT = Path(__file__).resolve().parents[1]
PROMPT = 16  # tokens of the generation prompt
GOAL_MFU, GOAL_RATIO = 0.50, 1.30  # issue 16's goals on an H100/H200-class GPU
GOAL_CLASS = ("H100", "H200")
TOTAL_LIMIT_S = 480  # the promise: under 8 minutes on one GPU


# ---------------------------------------------------------------------------------------------- pure helpers
def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; refuses limits that add up to more than 8 minutes (the promise the script keeps)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=positive_int, default=16, help="training batch B (default 16)")
    p.add_argument("--seq", type=positive_int, default=1024, help="training sequence T (default 1024, GPT-2's n_ctx)")
    p.add_argument("--steps", type=positive_int, default=30, help="timed training steps per contender, at most")
    p.add_argument("--warmup", type=positive_int, default=3, help="untimed steps per contender after compiling")
    p.add_argument("--gen-tokens", type=positive_int, default=128, help="greedy tokens per generate call")
    p.add_argument("--gen-batches", default="1,8", help="generation batch sizes, comma-separated (default 1,8)")
    p.add_argument("--tests-s", type=positive_int, default=100, help="time limit of the CUDA tests, seconds")
    p.add_argument("--train-s", type=positive_int, default=270, help="time limit of the training part, seconds")
    p.add_argument("--generate-s", type=positive_int, default=80, help="time limit of the generation part, seconds")
    p.add_argument("--skip-tests", action="store_true", help="measure speed only")
    p.add_argument("--preset", default="gpt2", help="model preset (default gpt2, the 124M the goals are about)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: a dry run of the script's code paths (try --preset tiny --seq 64 --batch 2); no figures")
    p.add_argument("--part", choices=("train", "generate"), help=argparse.SUPPRESS)  # a child process's one part
    p.add_argument("--result", help=argparse.SUPPRESS)  # where the child writes its JSON
    args = p.parse_args(argv)
    try:
        args.gen_batches = [int(b) for b in args.gen_batches.split(",")]
    except ValueError:
        p.error(f"--gen-batches: comma-separated positive integers, got {args.gen_batches!r}")
    if not args.gen_batches or min(args.gen_batches) < 1:
        p.error(f"--gen-batches: comma-separated positive integers, got {args.gen_batches!r}")
    try:
        n_ctx = GPTConfig.preset(args.preset).n_ctx
    except ValueError as e:
        p.error(f"--preset: {e}")
    if args.seq > n_ctx:
        p.error(f"--seq {args.seq} exceeds the context of {args.preset!r}, {n_ctx} positions")
    total = (0 if args.skip_tests else args.tests_s) + args.train_s + args.generate_s
    if total > TOTAL_LIMIT_S and not args.part:  # a child runs one part, under the limit its parent gave it
        p.error(f"the time limits add up to {total} s; keep them within {TOTAL_LIMIT_S} s (8 minutes)")
    return args


def peak_bf16_flops(gpu_name: str) -> float | None:
    """The dense bf16 FLOP/s of a GPU by its CUDA name (`train.gpu_peak_bf16`); None when it is not listed."""
    return gpu_peak_bf16(gpu_name)


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the peak (None when the peak is unknown)."""
    return tokens_per_s * flops_per_token / peak if peak else None


def decode_tokens_per_s(batch: int, new_tokens: int, seconds_n: float, seconds_1: float) -> float:
    """Tokens/s of cached decoding alone: a call making N tokens minus one making 1 (prefill + one step) leaves
    N - 1 decode steps of `batch` tokens each."""
    return batch * (new_tokens - 1) / max(seconds_n - seconds_1, 1e-9)


def goal_class(gpu_name: str) -> bool:
    """Whether the goals apply as set: an H100 or H200 (a GH200's GPU is an H100-class part too)."""
    return any(key in gpu_name for key in GOAL_CLASS)


def goal_lines(train: dict[str, Any] | None, gpu_name: str) -> list[str]:
    """The summary's two goal lines, each `met`, `not met`, or `not measured`, with the figure."""
    note = "" if goal_class(gpu_name) else f" (the goal is set for H100/H200; this is {gpu_name})"
    train = train or {}
    ours_mfu, ratio = train.get("ours_mfu"), train.get("ratio")
    lines = []
    if ours_mfu is not None:
        lines.append(f"goal MFU >= {GOAL_MFU:.0%}: {'met' if ours_mfu >= GOAL_MFU else 'not met'} "
                     f"({ours_mfu:.1%}){note}")
    else:
        unknown_peak = "; this GPU's peak is not in train.GPU_PEAK_BF16" if "ours_tok_s" in train else ""
        lines.append(f"goal MFU >= {GOAL_MFU:.0%}: not measured{unknown_peak}")
    if ratio is None:
        lines.append(f"goal >= {GOAL_RATIO}x transformers' training tokens/s: not measured")
    else:
        lines.append(f"goal >= {GOAL_RATIO}x transformers' training tokens/s: "
                     f"{'met' if ratio >= GOAL_RATIO else 'not met'} ({ratio:.2f}x){note}")
    return lines


def pytest_summary(output: str) -> str:
    """The last line of `pytest -q` that counts outcomes ("12 passed, 1 skipped in 40.1s"), or the last line."""
    lines = [line.strip("= ") for line in output.strip().splitlines() if line.strip()]
    counted = [line for line in lines if any(w in line for w in ("passed", "failed", "skipped", "error"))]
    return (counted or lines or ["no output"])[-1]


# ------------------------------------------------------------------------------------------------- the parent
def run_tests(limit_s: int) -> dict[str, Any]:
    """`pytest -m cuda -q` in a child process, within `limit_s`."""
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
               "--continue-on-collection-errors", "tests"]  # a test module that cannot import stops no CUDA test
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit_s)
    except subprocess.TimeoutExpired:
        return {"ok": False, "summary": f"timed out after {limit_s} s"}
    failures = [line for line in done.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
    return {"ok": done.returncode == 0, "summary": pytest_summary(done.stdout + done.stderr), "failures": failures}


def run_part(part: str, args: argparse.Namespace, limit_s: int) -> dict[str, Any]:
    """One part in a child process (its own CUDA context and memory), killed at `limit_s`; returns its JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--part", part, "--result", str(result),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--gen-tokens", str(args.gen_tokens),
                   "--gen-batches", ",".join(map(str, args.gen_batches)), f"--{part}-s", str(limit_s),
                   "--preset", args.preset, "--device", args.device]
        try:
            done = subprocess.run(command, cwd=ROOT, timeout=limit_s, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        except subprocess.TimeoutExpired:
            stage = read_json(result).get("stage")
            return {"error": f"timed out after {limit_s} s{' while ' + stage if stage else ''}"}
        found = read_json(result)
        if not found or "stage" in found:
            return {"error": f"the {part} process exited with status {done.returncode} and no result"}
        return found


def read_json(path: Path) -> dict[str, Any]:
    """A child's result file, or {} when there is none (or only half of one: a child stopped while writing)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def print_summary(name: str, tests: dict[str, Any] | None, train: dict[str, Any], gen: dict[str, Any],
                  seconds: float) -> None:
    print(f"\n=== summary: {name}, {seconds:.0f} s ===")
    print(f"CUDA tests: {'skipped (--skip-tests)' if tests is None else tests['summary']}")
    for line in (tests or {}).get("failures", []):
        print(f"  {line}")
    if "error" in train:
        print(f"training: {train['error']}")
    else:
        for who in ("ours", "theirs"):
            share = train[f"{who}_mfu"]
            print(f"training {who:6s}: {train[f'{who}_tok_s']:>10,.0f} tokens/s, {train[f'{who}_ms']:7.1f} ms/step, "
                  f"MFU {'unknown' if share is None else f'{share:.1%}'}")
    if "error" in gen:
        print(f"generation: {gen['error']}")
    else:
        for batch, row in gen["decode"].items():
            print(f"generation batch {batch}: ours {row['ours']:>8,.0f} tokens/s, transformers "
                  f"{row['theirs']:>8,.0f}, ours / theirs {row['ours'] / row['theirs']:.2f}x")
        print(f"generation: greedy tokens equal to transformers' for the first {gen['same_greedy_tokens']} (batch 1)")
    for line in goal_lines(None if "error" in train else train, name):
        print(line)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.part:
        return run_child(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device; benchmarks/gpu.py measures nothing here (the CUDA tests skip without one too)")
        return 0
    import transformers

    start = time.perf_counter()
    name = device_name(torch.device(args.device))
    peak = peak_bf16_flops(name)
    print(f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}, transformers {transformers.__version__}; "
          f"dense bf16 peak {'unknown' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}", flush=True)
    tests = None
    if not args.skip_tests:
        print(f"[1/3] pytest -m cuda (limit {args.tests_s} s)", flush=True)
        tests = run_tests(args.tests_s)
        print(f"      {tests['summary']}", flush=True)
    print(f"[2/3] training, {args.preset}, {args.batch} x {args.seq} tokens a step (limit {args.train_s} s)",
          flush=True)
    train = run_part("train", args, args.train_s)
    print(f"[3/3] generation, {args.preset}, bf16 (limit {args.generate_s} s)", flush=True)
    gen = run_part("generate", args, args.generate_s)
    print_summary(name, tests, train, gen, time.perf_counter() - start)
    return 0 if (tests is None or tests["ok"]) and "error" not in train and "error" not in gen else 1


# -------------------------------------------------------------------------------------------------- the parts
def run_child(args: argparse.Namespace) -> int:
    """A part, in its own process: measure, write the JSON result, or write {"error": ...} if it fails. While it
    runs, the file names the stage it is in ({"stage": ...}), so a part stopped at its time limit says where."""
    deadline = time.perf_counter() + getattr(args, f"{args.part}_s") - 10  # leave time to write the result

    def stage(what: str) -> None:
        Path(args.result).write_text(json.dumps({"stage": what}))

    try:
        result = (measure_training(args, deadline, stage) if args.part == "train"
                  else measure_generation(args, deadline, stage))
    except torch.cuda.OutOfMemoryError:
        result = {"error": f"out of memory ({args.part}); try a smaller --batch"}
    Path(args.result).write_text(json.dumps(result))
    return 0


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run: no figures)"


def model_pair(preset: str, dtype: torch.dtype, device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A gpt2lab preset from GPT-2's init (seeded) and transformers' GPT2LMHeadModel on the same weights."""
    from transformers import GPT2LMHeadModel

    from gpt2lab import GPT

    torch.manual_seed(0)
    ours = GPT(GPTConfig.preset(preset))
    with tempfile.TemporaryDirectory() as d:
        ours.save_pretrained(d)
        theirs = GPT2LMHeadModel.from_pretrained(d, attn_implementation="sdpa")
    return ours.to(device=device, dtype=dtype), theirs.to(device=device, dtype=dtype)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of `fn`, synchronised with the GPU before and after, so that queued work counts where it belongs."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    synchronize()
    t0 = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - t0


def measure_training(args: argparse.Namespace, deadline: float, stage: Callable[[str], None]) -> dict[str, Any]:
    from gpt2lab.config import TrainConfig
    from gpt2lab.train import TrainingLoss, autocast, make_optimizer

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as `gpt2lab train` sets them
    device = torch.device(args.device)
    stage("loading the models")
    ours, theirs = model_pair(args.preset, torch.float32, device)
    ours.train(), theirs.train()
    settings = TrainConfig(model=ours.config, batch_size=args.batch, seq_len=args.seq)
    g = torch.Generator().manual_seed(0)
    window = torch.randint(0, ours.config.vocab_size, (args.batch, args.seq + 1), generator=g).to(device)
    x, y = window[:, :-1].contiguous(), window[:, 1:].contiguous()  # (B, T) inputs and next-token targets
    loss_ours = torch.compile(TrainingLoss(ours))
    forward_theirs = torch.compile(theirs)

    def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_of: Callable[[], torch.Tensor]):
        def run() -> torch.Tensor:
            with autocast(device, "bf16"):
                loss = loss_of()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return loss.detach()

        return run

    steps = {
        "ours": step(ours, make_optimizer(ours, settings, device), lambda: loss_ours(x, y)),
        "theirs": step(theirs, make_optimizer(theirs, settings, device),  # labels are shifted inside transformers
                       lambda: forward_theirs(input_ids=x, labels=x).loss),
    }
    compile_s, first_loss = {}, {}
    for name, fn in steps.items():  # the first call compiles
        stage(f"compiling {name}")
        t0 = time.perf_counter()
        first_loss[name] = float(fn())
        compile_s[name] = time.perf_counter() - t0
        print(f"      {name}: first step (compiling) {compile_s[name]:.0f} s, loss {first_loss[name]:.4f}", flush=True)
    stage("warming up")
    for _ in range(args.warmup):
        for fn in steps.values():
            fn()
    stage("timing")
    times: dict[str, list[float]] = {name: [] for name in steps}
    while len(times["ours"]) < args.steps and time.perf_counter() < deadline:
        for name, fn in steps.items():
            times[name].append(timed(fn, device))
    result: dict[str, Any] = {"steps": len(times["ours"]), "compile_s": compile_s, "first_loss": first_loss}
    if not result["steps"]:
        return {"error": f"no timed step fitted in the time limit (compiling took {sum(compile_s.values()):.0f} s)"}
    tokens = args.batch * args.seq
    per_token = flops_per_token(ours.config, args.seq)  # the same architecture, so the same FLOPs for both
    peak = peak_bf16_flops(device_name(device))
    for name, values in times.items():
        seconds = statistics.median(values)
        result[f"{name}_ms"] = seconds * 1000
        result[f"{name}_tok_s"] = tokens / seconds
        result[f"{name}_mfu"] = mfu(tokens / seconds, per_token, peak)
    result["ratio"] = result["ours_tok_s"] / result["theirs_tok_s"]
    memory = f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if device.type == "cuda" else ""
    print(f"      {result['steps']} timed steps each: ours {result['ours_ms']:.1f} ms, theirs "
          f"{result['theirs_ms']:.1f} ms a step{memory}", flush=True)
    return result


def measure_generation(args: argparse.Namespace, deadline: float, stage: Callable[[str], None]) -> dict[str, Any]:
    from gpt2lab.generate import generate

    device = torch.device(args.device)
    stage("loading the models")
    ours, theirs = model_pair(args.preset, torch.bfloat16, device)
    ours.eval(), theirs.eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, ours.config.vocab_size, (max(args.gen_batches), PROMPT), generator=g).to(device)  # (B, P)

    def ours_fn(batch: int, n: int) -> Callable[[], torch.Tensor]:
        return lambda: generate(ours, prompt[:batch], n, temperature=0)  # (B, P + n)

    def theirs_fn(batch: int, n: int) -> Callable[[], torch.Tensor]:
        ids = prompt[:batch]
        return lambda: theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                       do_sample=False, pad_token_id=0)  # (B, P + n); no early end-of-text

    n = args.gen_tokens
    fns = {(who, b, k): make(b, k) for who, make in (("ours", ours_fn), ("theirs", theirs_fn))
           for b in args.gen_batches for k in (1, n)}
    stage("the first generation")
    with torch.no_grad():
        same = int((ours_fn(1, n)()[0, PROMPT:] == theirs_fn(1, n)()[0, PROMPT:]).cumprod(0).sum())
        for fn in fns.values():  # warm-up: kernels chosen, caches allocated
            fn()
        best = {key: float("inf") for key in fns}
        rounds = 0
        while rounds < 5 and (rounds == 0 or time.perf_counter() < deadline - 15):
            for key, fn in fns.items():
                best[key] = min(best[key], timed(fn, device))
            rounds += 1
    decode = {str(b): {who: decode_tokens_per_s(b, n, best[(who, b, n)], best[(who, b, 1)])
                       for who in ("ours", "theirs")} for b in args.gen_batches}
    print(f"      best of {rounds} rounds; greedy tokens equal to transformers' for the first {same} of {n} "
          "(bf16 rounding may part them)", flush=True)
    return {"decode": decode, "rounds": rounds, "same_greedy_tokens": same}


if __name__ == "__main__":
    sys.exit(main())
