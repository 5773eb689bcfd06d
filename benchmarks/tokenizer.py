"""Tokenizer speed: gpt2lab's pure-Python byte-level BPE against tiktoken (Rust), in one run, as ratios.

    python benchmarks/tokenizer.py [--data PATH] [--workers N] [--repeat R] [--vocab-size V]

Prints encode MB/s (one thread; ours with an empty piece cache at the start of each run, as in a one-pass data
preparation), ours in N processes, decode MB/s, and the time to train a V-token BPE on the same text (with
Hugging Face `tokenizers`' Rust trainer for reference, if installed). It also checks that the ids are identical.
The machine is noisy: compare the ratios, each the best of R runs. tiktoken is a benchmark peer only.
"""

from __future__ import annotations

import argparse
import base64
import os
import time
from pathlib import Path

from gpt2lab.download import cache_dir
from gpt2lab.tokenizer import EOT, Tokenizer, train_bpe

REPO = Path(__file__).resolve().parent.parent


def best_of(repeat: int, fn, setup=lambda: None) -> tuple[float, object]:
    """Fastest wall time of `repeat` calls of fn (setup runs untimed before each) and the last result."""
    best, result = float("inf"), None
    for _ in range(repeat):
        setup()
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def cpu_seconds(fn, setup=lambda: None) -> tuple[float, object]:
    """CPU time of fn, this process and its (finished) child processes together."""
    import resource

    def used() -> float:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    setup()
    start = used()
    result = fn()
    return used() - start, result


def _spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


def available_parallelism(workers: int) -> float:
    """Speed-up of `workers` processes on pure busy work: what this machine offers right now (others share it)."""
    from multiprocessing import get_context

    n = 3_000_000
    start = time.perf_counter()
    for _ in range(workers):
        _spin(n)
    serial = time.perf_counter() - start
    with get_context("fork").Pool(workers) as pool:
        start = time.perf_counter()
        pool.map(_spin, [n] * workers)
        return serial / (time.perf_counter() - start)


def tiktoken_oracle(ranks_file: Path):
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str

    ranks = {}
    for line in ranks_file.read_bytes().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={EOT: 50256})


def hf_train_seconds(text: str, vocab_size: int) -> float | None:
    try:
        from tokenizers import ByteLevelBPETokenizer
    except ImportError:
        return None
    start = time.perf_counter()
    ByteLevelBPETokenizer().train_from_iterator([text], vocab_size=vocab_size, special_tokens=[EOT], show_progress=False)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "tinyshakespeare.txt"))
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes for parallel encoding")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--vocab-size", type=int, default=4096, help="for the training benchmark")
    parser.add_argument("--copies", type=int, default=4, help="the text repeated this often for the CPU efficiency")
    args = parser.parse_args()

    text = Path(args.data).read_text(encoding="utf-8")
    mb = len(text.encode("utf-8")) / 1e6
    start = time.perf_counter()
    ours = Tokenizer.gpt2()
    load_s = time.perf_counter() - start
    peer = tiktoken_oracle(cache_dir() / "gpt2.tiktoken")
    print(f"data: {args.data} ({mb:.2f} MB), cpus: {os.cpu_count()}, Tokenizer.gpt2() load: {load_s:.2f} s")

    cold = ours._cache.clear  # each timed encode starts with an empty piece cache
    t_ours, ids = best_of(args.repeat, lambda: ours.encode(text), setup=cold)
    t_warm, _ = best_of(args.repeat, lambda: ours.encode(text))
    t_peer, peer_ids = best_of(args.repeat, lambda: peer.encode_ordinary(text))
    print(f"identical ids to tiktoken: {ids == peer_ids} ({len(ids)} tokens)")
    print(f"encode, 1 thread   ours {mb / t_ours:6.2f} MB/s (warm cache {mb / t_warm:.2f})   "
          f"tiktoken {mb / t_peer:6.2f} MB/s   ours/tiktoken {t_peer / t_ours:.2f}")

    n = args.workers
    print(f"machine check: {n} processes of busy work run x{available_parallelism(n):.2f} faster than one")
    t_par, par_ids = best_of(args.repeat, lambda: ours.encode(text, num_workers=n), setup=cold)
    ours.encode(text)  # forked workers inherit the parent's (now warm) cache
    t_par_warm, _ = best_of(args.repeat, lambda: ours.encode(text, num_workers=n))
    t_peer_par, _ = best_of(args.repeat, lambda: peer.encode_ordinary_batch(text.split("\n\n"), num_threads=n))
    assert par_ids == ids, "parallel encoding changed the ids"
    print(f"encode, {n} workers  ours {mb / t_par:6.2f} MB/s (x{t_ours / t_par:.2f} vs 1 process; warm "
          f"{mb / t_par_warm:.2f} MB/s, x{t_warm / t_par_warm:.2f}; pool start included)   "
          f"tiktoken {n} threads {mb / t_peer_par:6.2f} MB/s   ours/tiktoken {t_peer_par / t_par:.2f}")
    # Wall time needs free cores; CPU time does not. Efficiency = CPU of 1 process / total CPU of n workers, on a
    # larger text: with free cores, n workers would run about n x efficiency times faster than one.
    big = text * args.copies
    cpu_one, _ = cpu_seconds(lambda: ours.encode(big), setup=cold)
    cpu_par, _ = cpu_seconds(lambda: ours.encode(big, num_workers=n), setup=cold)
    print(f"parallel CPU efficiency on {mb * args.copies:.1f} MB (cold caches): {cpu_one / cpu_par:.2f} "
          f"(1 process {cpu_one:.2f} CPU s, {n} workers {cpu_par:.2f} CPU s in all)")

    t_dec, decoded = best_of(args.repeat, lambda: ours.decode(ids))
    t_peer_dec, _ = best_of(args.repeat, lambda: peer.decode(ids))
    assert decoded == text
    print(f"decode             ours {mb / t_dec:6.1f} MB/s   tiktoken {mb / t_peer_dec:6.1f} MB/s   "
          f"ours/tiktoken {t_peer_dec / t_dec:.2f}")

    start = time.perf_counter()
    trained = train_bpe(text, vocab_size=args.vocab_size)
    t_train = time.perf_counter() - start
    t_hf = hf_train_seconds(text, args.vocab_size)
    peer_train = f"   HF tokenizers (Rust) {t_hf:.2f} s   ours/HF {t_hf / t_train:.2f}" if t_hf else ""
    print(f"train BPE to {trained.vocab_size} ids on {mb:.2f} MB   ours {t_train:.2f} s{peer_train}")


if __name__ == "__main__":
    main()
