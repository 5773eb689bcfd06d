"""Load test of `gpt2lab serve`: requests/s and tokens/s at 1, 4 and 16 concurrent clients, batched vs one by one.

The peer is the same server with batching switched off (`max_batch_size=1`), i.e. serving requests one by one; both
run in this one invocation on the same model and the script prints the ratio. Traffic stays on 127.0.0.1: the server
runs in a child process bound to loopback, and each level sends a fixed number of requests, then stops.

    python benchmarks/serve.py                         # GPT-2 small architecture (124M, random weights), fp32
    python benchmarks/serve.py --preset tiny --requests 16 --max-tokens 16   # a quick smoke run
    python benchmarks/serve.py --model path/to/model-dir --dtype int8

Each request asks for `--max-tokens` tokens (random weights rarely emit end-of-text; requests that do are counted
by the tokens they actually got), sampled at `--temperature` (default 0.8, no seed, as most clients send), from
prompts of 8 to 40 words.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import sys
import time
from dataclasses import dataclass

PROMPT_WORDS = ("the king said that his people would not wait for the winter to come again before the river "
                "rose and the town was lost under the water of the long night").split()


def server_process(port_queue, preset: str, model_dir: str | None, dtype: str, max_batch_size: int,
                   threads: int | None) -> None:
    """Child process: build the model and serve it on 127.0.0.1 until terminated; report the port it bound."""
    import torch

    from gpt2lab import GPT, GPTConfig
    from gpt2lab.inference import prepare_for_inference
    from gpt2lab.serve import BackgroundServer, ServerConfig, create_app
    from gpt2lab.tokenizer import Tokenizer, load_tokenizer

    if threads:
        torch.set_num_threads(threads)
    if model_dir:
        from gpt2lab.checkpoint import load_model

        model, tokenizer = load_model(model_dir), load_tokenizer(model_dir)
    else:
        torch.manual_seed(0)
        model, tokenizer = GPT(GPTConfig.preset(preset)).eval(), Tokenizer.gpt2()
    model = prepare_for_inference(model, dtype)
    config = ServerConfig(model_id="bench", max_batch_size=max_batch_size, batch_wait_ms=5, max_pending=1024)
    server = BackgroundServer(create_app(model, tokenizer, config), host="127.0.0.1", port=0).start()
    port_queue.put(server.port)
    parent = os.getppid()
    while os.getppid() == parent:  # exit with the benchmark, even when it was killed
        time.sleep(1)


@dataclass
class Level:
    clients: int
    requests: int
    seconds: float
    tokens: int
    latencies: list[float]

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def prompt_for(i: int) -> str:
    n = 8 + (i * 7) % 33  # 8..40 words, varied so batches are ragged and need padding
    return " ".join(PROMPT_WORDS[(i + k) % len(PROMPT_WORDS)] for k in range(n))


async def run_level(url: str, clients: int, total: int, max_tokens: int, timeout: float, temperature: float = 0.8
                    ) -> Level:
    """`clients` workers share a fixed list of `total` requests; returns when all are answered."""
    import httpx

    todo = list(range(total))
    latencies: list[float] = []
    tokens = 0

    async def worker(client: "httpx.AsyncClient") -> None:
        nonlocal tokens
        while todo:
            i = todo.pop()
            body = {"model": "bench", "prompt": prompt_for(i), "max_tokens": max_tokens, "temperature": temperature}
            start = time.perf_counter()
            response = await client.post(url + "/v1/completions", json=body)
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)
            tokens += response.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        seconds = time.perf_counter() - start
    return Level(clients, total, seconds, tokens, latencies)


def start_server(args: argparse.Namespace, max_batch_size: int) -> tuple[mp.Process, str]:
    ctx = mp.get_context("spawn")
    port_queue = ctx.Queue()
    process = ctx.Process(target=server_process, args=(port_queue, args.preset, args.model, args.dtype,
                                                       max_batch_size, args.threads), daemon=True)
    process.start()
    port = port_queue.get(timeout=300)
    return process, f"http://127.0.0.1:{port}"


def measure(args: argparse.Namespace) -> dict[str, dict[int, Level]]:
    """Both servers run side by side (only one is sent traffic at a time); each level measures one, then the other,
    so a change in the machine's load during the run hits both alike."""
    servers = {"batched": start_server(args, args.max_batch_size), "one by one": start_server(args, 1)}
    results: dict[str, dict[int, Level]] = {name: {} for name in servers}
    try:
        for name, (_, url) in servers.items():  # warm-up: first-call allocations, thread pools
            asyncio.run(run_level(url, 1, 2, 4, args.timeout))
        for k, clients in enumerate(args.clients):
            total = args.requests or max(4, 2 * clients)
            order = list(servers) if k % 2 == 0 else list(reversed(servers))
            for name in order:
                level = asyncio.run(run_level(servers[name][1], clients, total, args.max_tokens, args.timeout,
                                              args.temperature))
                results[name][clients] = level
                print(f"  {name:<10} clients={clients:<3} requests={total:<3} {level.requests_per_s:6.2f} req/s "
                      f"{level.tokens_per_s:8.1f} tok/s", file=sys.stderr, flush=True)
        return results
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.join(30)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="gpt2", help="architecture with random weights (default: gpt2, 124M)")
    parser.add_argument("--model", default=None, help="a model directory instead of a random preset")
    parser.add_argument("--dtype", default="fp32", help="fp32, bf16 or int8")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrency levels")
    parser.add_argument("--requests", type=int, default=0,
                        help="requests per level (default: 2 per client, at least 4)")
    parser.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default: 32)")
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy")
    parser.add_argument("--max-batch-size", type=int, default=16, help="the batched server's limit (default: 16)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the server")
    parser.add_argument("--timeout", type=float, default=600, help="per-request timeout in seconds")
    args = parser.parse_args(argv)

    import torch

    print(f"# gpt2lab serve load test: {args.model or args.preset + ' (random weights)'}, {args.dtype}, "
          f"{args.requests or '2 per client'} requests x {args.max_tokens} tokens per level, "
          f"temperature {args.temperature}, "
          f"torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    results = measure(args)
    batched, one_by_one = results["batched"], results["one by one"]
    print()
    print("| clients | requests | server | req/s | tok/s | p50 latency (s) | p95 latency (s) |")
    print("|--:|--:|:--|--:|--:|--:|--:|")
    for clients in args.clients:
        for name, level in ((f"batched (max {args.max_batch_size})", batched[clients]),
                            ("one by one", one_by_one[clients])):
            print(f"| {clients} | {level.requests} | {name} | {level.requests_per_s:.2f} | {level.tokens_per_s:.1f} | "
                  f"{statistics.median(level.latencies):.2f} | {percentile(level.latencies, 0.95):.2f} |")
    print()
    for clients in args.clients:
        ratio = batched[clients].tokens_per_s / one_by_one[clients].tokens_per_s
        print(f"clients={clients}: batched / one-by-one throughput = {ratio:.2f}x")


if __name__ == "__main__":
    main()
