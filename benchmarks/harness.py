"""lm-evaluation-harness speed: gpt2lab's adapter (`--model gpt2lab`) vs lm-eval's `--model hf`, same export, one run.

    python benchmarks/harness.py [--preset gpt2] [--batch-size 8] [--threads 2] [--rounds 2] [--dtypes fp32,bf16,int8]

Both models evaluate the same three local tasks through `lm_eval.simple_evaluate` (its hub datasets are unreachable
here, so the tasks are written to a temporary directory from a fixed word list):

- mc: multiple choice, 24 questions x 4 choices of ~120-token contexts (loglikelihood requests);
- rolling: loglikelihood_rolling over 6 documents of ~1,500 tokens (perplexity);
- gen: generate_until, 12 prompts, up to 32 greedy tokens, 4 stop strings.

The weights are random (GPT-2's init), saved once by `save_pretrained` and loaded by both. Each model is built once;
the timed part is `simple_evaluate` alone, alternated (ours, hf, ours, ...) so a noisy machine slows both alike, and
the best round of each is reported with the ratio hf / ours (> 1: gpt2lab faster). The script also prints the largest
difference between the two models' per-request log-likelihoods and whether the generations agree, so a speed-up
that changed the answers would show.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import torch

from _machine import cpu_description

WORDS = ("the of and to in a is that for it as was with be by on not he I this are or his from at which but have an "
         "they you were her she there one all we their been has when who will more no if out so said what up its "
         "about into than them can only other new some could time these two may then do first any my now such like "
         "our over man me even most made after also did many before must through back years where much your way "
         "well down should because each just those people how too little state good very make world still own see "
         "men work long get here between both life being under never day same another know while last might us "
         "great old year off come since against go came right used take three").split()


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words)).capitalize() + "."


def write_tasks(root: Path) -> list[str]:
    rng = random.Random(0)
    mc = [{"q": _text(rng, 100), "choices": [_text(rng, 6) for _ in range(4)], "answer": 0} for _ in range(24)]
    roll = [{"text": _text(rng, 1300)} for _ in range(6)]
    gen = [{"prompt": _text(rng, 60), "answer": "x"} for _ in range(12)]
    bodies = {
        "bench_mc": (mc, 'output_type: multiple_choice\ndoc_to_text: "{{q}}"\ndoc_to_choice: "{{choices}}"\n'
                         'doc_to_target: "{{answer}}"\nmetric_list:\n  - metric: acc\n'),
        "bench_roll": (roll, 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                             'metric_list:\n  - metric: bits_per_byte\n'),
        "bench_gen": (gen, 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
                           'generation_kwargs:\n  until: ["\\n\\n", "Question:", "?", ";"]\n  do_sample: false\n'
                           '  max_gen_toks: 32\nmetric_list:\n  - metric: exact_match\n'),
    }
    for name, (docs, body) in bodies.items():
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (root / f"{name}.yaml").write_text(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                           f"    test: {data}\ntest_split: test\n{body}")
    return list(bodies)


def run(lm: object, tasks: list[str], task_manager: object) -> tuple[float, dict]:
    import lm_eval

    start = time.perf_counter()
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=task_manager, log_samples=True,
                                  verbosity="ERROR")
    return time.perf_counter() - start, out


def loglikelihoods(results: dict, task: str) -> list[float]:
    values = []
    for sample in sorted(results["samples"][task], key=lambda s: s["doc_id"]):
        for resp in sample["resps"]:
            first = resp[0]
            values.append(float(first[0] if isinstance(first, (list, tuple)) else first))
    return values


def generations(results: dict) -> list[str]:
    return [s["resps"][0][0] for s in sorted(results["samples"]["bench_gen"], key=lambda s: s["doc_id"])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="gpt2")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dtypes", default="fp32", help="our precisions to time, comma-separated (fp32,bf16,int8)")
    args = p.parse_args()
    os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                       "TOKENIZERS_PARALLELISM": "false"})
    torch.set_num_threads(args.threads)
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from gpt2lab import GPT, GPTConfig
    from gpt2lab.lm_eval import HarnessModel
    from gpt2lab.tokenizer import Tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        GPT(GPTConfig.preset(args.preset)).save_pretrained(root / "model", tokenizer=Tokenizer.gpt2())
        (root / "tasks").mkdir()
        tasks = write_tasks(root / "tasks")
        manager = TaskManager(include_path=str(root / "tasks"))
        models = {f"gpt2lab {d}": HarnessModel(str(root / "model"), dtype=d, batch_size=args.batch_size)
                  for d in args.dtypes.split(",")}
        models["hf"] = HFLM(pretrained=str(root / "model"), batch_size=args.batch_size, device="cpu")
        best: dict[str, float] = {}
        outputs: dict[str, dict] = {}
        for r in range(args.rounds):
            for name, lm in models.items():
                seconds, outputs[name] = run(lm, tasks, manager)
                best[name] = min(best.get(name, float("inf")), seconds)
                print(f"round {r + 1}: {name:14s} {seconds:7.1f} s", flush=True)
    print(f"\n{args.preset}, batch size {args.batch_size}, {args.threads} threads, best of {args.rounds} rounds")
    print(f"CPU: {cpu_description()}")
    reference = {t: loglikelihoods(outputs["hf"], t) for t in ("bench_mc", "bench_roll")}
    for name in models:
        ratio = best["hf"] / best[name]
        diffs = [abs(a - b) for t in reference for a, b in zip(loglikelihoods(outputs[name], t), reference[t])]
        same = generations(outputs[name]) == generations(outputs["hf"])
        print(f"{name:14s} {best[name]:7.1f} s   hf / this {ratio:5.2f}x   max |Δ loglik| {max(diffs):.2e}   "
              f"generations {'identical' if same else 'DIFFER'}")


if __name__ == "__main__":
    main()
