"""The commands that load a trained model: `generate`, `eval` (perplexity on a text, or lm-eval tasks) and
`attention` (a heatmap of attention weights)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gpt2lab.checks import MAX_SEED
from gpt2lab.cli.args import (MAX_NEW_TOKENS, MODEL_HELP, POSITIVE, TEXT_FIELD_HELP, THREADS, THREADS_HELP,
                              TOKENIZER_HELP, DTYPE_HELP, INFERENCE_DTYPES, image_file, integer, limit,
                              nonempty, number, read_text_file, set_threads)


# ---------------------------------------------------------------------------------------------------------- loading
def _load_model(model: str, dtype: str, tokenizer: str | None) -> tuple[Any, Any]:
    """The model and tokenizer for generate, eval and attention; refuses a tokenizer with ids the model lacks."""
    from gpt2lab.inference import load_for_inference

    network, tok = load_for_inference(model, dtype, tokenizer)
    _check_vocabularies(model, network, tok)
    return network, tok


def _check_vocabularies(model: str, network: Any, tok: Any) -> None:
    """Refuse a tokenizer with ids the model lacks (the embedding lookup would fail midway)."""
    if tok.vocab_size > network.config.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids but the model {model!r} only "
                         f"{network.config.vocab_size}; pass the tokenizer the model was trained with (--tokenizer)")


# ---------------------------------------------------------------------------------------------------------- generate
def add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt, streamed to stdout")
    p.add_argument("--model", default="gpt2", type=nonempty, help=MODEL_HELP)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="the prompt text (default: stdin if piped, else unconditional)")
    src.add_argument("--prompt-file", default=None, type=nonempty,
                     help="read the prompt from this UTF-8 file ('-' for stdin)")
    p.add_argument("--max-new-tokens", type=integer(0, MAX_NEW_TOKENS), default=100,
                   help=f"tokens to generate per sample, 0..{MAX_NEW_TOKENS:,} (default: 100)")
    # sampling defaults live in generate.SamplingParams; None here means "its default". Any temperature >= 0 and
    # top-p in (0, 1] is safe (a near-zero one is the greedy limit); the penalty is bounded because a more extreme
    # one overflows float32 logits into NaN.
    p.add_argument("--temperature", type=number(0), default=None, help="0 = greedy; <1 sharper, >1 flatter "
                   "(default: 1, the model's own distribution)")
    p.add_argument("--top-k", type=POSITIVE, default=None, help="sample among the k most likely tokens only")
    p.add_argument("--top-p", type=number(0, 1, above=True), default=None, help="nucleus sampling, p in (0, 1]: "
                   "the smallest set of tokens holding probability p")
    p.add_argument("--repetition-penalty", type=number(0.01, 1e4), default=None,
                   help="in [0.01, 10000]; > 1 discourages tokens already present (CTRL's penalty)")
    p.add_argument("--seed", type=integer(0, MAX_SEED), default=None,
                   help="random seed in 0..2**64-1, for reproducible samples")
    p.add_argument("--num-samples", type=POSITIVE, default=1, help="independent samples to generate (default: 1)")
    p.add_argument("--stop", action="append", default=[], type=nonempty, metavar="STR",
                   help="end a sample at this text (repeatable; the stop text is not printed)")
    p.add_argument("--dtype", default="fp32", choices=INFERENCE_DTYPES, help=DTYPE_HELP)
    p.add_argument("--tokenizer", default=None, type=nonempty, help=TOKENIZER_HELP)
    p.add_argument("--threads", type=THREADS, default=None, help=THREADS_HELP)
    p.add_argument("--no-echo", action="store_true", help="print only the generated text, not the prompt")
    p.set_defaults(run=_run_generate)


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return args.prompt
    if args.prompt_file == "-" or (args.prompt_file is None and not sys.stdin.isatty()):
        return sys.stdin.read()
    if args.prompt_file is not None:
        return read_text_file(args.prompt_file, "--prompt-file")
    return ""  # unconditional: generation starts from <|endoftext|>


def _run_generate(args: argparse.Namespace) -> None:
    import torch

    from gpt2lab.generate import stream_text
    from gpt2lab.sampling import SamplingParams

    given = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
             "repetition_penalty": args.repetition_penalty}
    sampling = SamplingParams(**{k: v for k, v in given.items() if v is not None})  # checks before loading
    set_threads(args.threads)
    prompt = _read_prompt(args)
    model, tokenizer = _load_model(args.model, args.dtype, args.tokenizer)
    generator = torch.Generator().manual_seed(args.seed) if args.seed is not None else None
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"{'=' * 30} sample {i + 1} {'=' * 30}", flush=True)
        pieces = stream_text(model, tokenizer, prompt, args.max_new_tokens, stop=args.stop, generator=generator,
                             **vars(sampling))  # checks the prompt before anything is printed
        if not args.no_echo:
            print(prompt, end="", flush=True)
        for piece in pieces:
            print(piece, end="", flush=True)
        print(flush=True)


# -------------------------------------------------------------------------------------------------------------- eval
EVAL_RESULTS_FORMAT = "gpt2lab-lm-eval-results"  # the "format" of the results files `eval --output-path` writes
EVAL_INSTALL = 'pip install -e ".[eval]"'


def add_eval(sub: argparse._SubParsersAction) -> None:
    from gpt2lab.config import EVAL_BATCH_SIZE

    p = sub.add_parser("eval", help="perplexity and bits per byte on a text (--data), or lm-eval tasks (--task)")
    p.add_argument("--model", default="gpt2", type=nonempty, help=MODEL_HELP)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", type=nonempty, help="a built-in dataset (shakespeare, tinyshakespeare), a text file, "
                      "a directory of .txt files or a .jsonl file")
    what.add_argument("--task", nargs="+", type=nonempty, metavar="NAME", help="lm-evaluation-harness tasks, e.g. "
                      f"hellaswag lambada_openai, or ones from --include-path (needs {EVAL_INSTALL})")
    p.add_argument("--batch-size", type=POSITIVE, default=None, help="windows (--data) or sequences (--task) per "
                   f"forward pass; more use more memory (default: {EVAL_BATCH_SIZE}, or the adapter's with --task)")
    p.add_argument("--dtype", default="fp32", choices=INFERENCE_DTYPES, help=DTYPE_HELP)
    p.add_argument("--tokenizer", default=None, type=nonempty, help=TOKENIZER_HELP)
    p.add_argument("--threads", type=THREADS, default=None, help=THREADS_HELP)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    text = p.add_argument_group("with --data")
    text.add_argument("--stride", type=POSITIVE, default=None, help="tokens between window starts, 1..context "
                      "(default: context / 2; = context for disjoint chunks)")
    text.add_argument("--context", type=integer(2), default=None, help="window length, 2..n_ctx (default: the "
                      "model's n_ctx)")
    text.add_argument("--text-field", default=None, type=nonempty, help=TEXT_FIELD_HELP)
    text.add_argument("--no-progress", action="store_true", help="no progress bar (it shows only on a terminal)")
    tasks = p.add_argument_group("with --task")
    tasks.add_argument("--limit", type=limit, default=None, help="examples per task: a count, or a fraction in "
                       "(0, 1) (default: all; a limited score is for testing, not for reporting)")
    tasks.add_argument("--num-fewshot", type=integer(0), default=None, help="examples in each prompt (default: "
                       "the task's)")
    tasks.add_argument("--include-path", type=nonempty, default=None, metavar="DIR", help="a directory of task "
                       "YAML files of your own")
    tasks.add_argument("--output-path", type=nonempty, default=None, metavar="FILE", help="also write the results "
                       "as JSON to this file")
    tasks.add_argument("--overwrite", action="store_true", help="replace an earlier --output-path results file")
    p.set_defaults(run=_run_eval)


def _run_eval(args: argparse.Namespace) -> None:
    if args.task is not None:
        _run_eval_tasks(args)
        return
    import dataclasses

    from gpt2lab.config import EVAL_BATCH_SIZE
    from gpt2lab.data import read_text_source
    from gpt2lab.evaluate import evaluate_text

    _refuse_flags(args, "--data", ["limit", "num_fewshot", "include_path", "output_path", "overwrite"])
    set_threads(args.threads)
    text = read_text_source(args.data, text_field=args.text_field or "text")
    model, tokenizer = _load_model(args.model, args.dtype, args.tokenizer)
    result = evaluate_text(model, tokenizer, text, stride=args.stride, context=args.context,
                           batch_size=args.batch_size or EVAL_BATCH_SIZE, progress=not args.no_progress)
    print(json.dumps(dataclasses.asdict(result)) if args.json else result.summary())


def _refuse_flags(args: argparse.Namespace, mode: str, names: list[str]) -> None:
    """Refuse flags of the other kind of evaluation, which would otherwise be ignored without a word."""
    given = [f"--{name.replace('_', '-')}" for name in names if getattr(args, name) not in (None, False)]
    if given:
        raise ValueError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to {mode} evaluation; "
                         "see gpt2lab eval --help")


def _run_eval_tasks(args: argparse.Namespace) -> None:
    """lm-evaluation-harness tasks through gpt2lab's adapter: lm-eval's table, or its results as JSON."""
    import importlib.util

    from gpt2lab.files import claim_file

    _refuse_flags(args, "--task", ["stride", "context", "text_field", "no_progress"])
    if importlib.util.find_spec("lm_eval") is None:
        raise OSError(f"gpt2lab eval --task needs lm-evaluation-harness; install it with: {EVAL_INSTALL}")
    if args.include_path is not None and not Path(args.include_path).is_dir():
        raise ValueError(f"--include-path {args.include_path!r} is not a directory of task YAML files")
    if args.output_path is not None:  # before the evaluation, which can take hours
        claim_file(args.output_path, args.overwrite, is_own=_is_eval_results, description="a results file")
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable, make_table

    from gpt2lab.lm_eval import HarnessModel

    harness = HarnessModel(args.model, dtype=args.dtype, batch_size=args.batch_size, tokenizer=args.tokenizer,
                           threads=args.threads)  # the adapter sets torch's count: given, or the CLI's default
    _check_vocabularies(args.model, harness.model, harness.tokenizer)
    task_manager = TaskManager(include_path=args.include_path)
    _check_task_names(args.task, task_manager)
    try:
        results = lm_eval.simple_evaluate(model=harness, tasks=args.task, num_fewshot=args.num_fewshot,
                                          limit=args.limit, task_manager=task_manager, log_samples=False)
    except Exception as e:  # a task file's template or data that lm-eval cannot use: one line, as for any bad input
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"lm-eval failed on --task {' '.join(args.task)}: {type(e).__name__}: {first}") from e
    dumped = json.dumps({"format": EVAL_RESULTS_FORMAT, **results}, indent=2, default=handle_non_serializable,
                        ensure_ascii=False)
    if args.output_path is not None:
        from gpt2lab.download import write_file_atomic

        write_file_atomic(args.output_path, dumped + "\n")
    if args.json:
        print(dumped)
        return
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))


def _is_eval_results(path: Path) -> bool:
    from gpt2lab.files import read_json_field

    return read_json_field(path, "format") == EVAL_RESULTS_FORMAT


def _check_task_names(names: list[str], task_manager: Any) -> None:
    """Refuse unknown task names in one line, suggesting close ones (lm-eval's own error comes from deep inside its
    task loading)."""
    import difflib
    import os

    known = set(task_manager.all_tasks)
    unknown = [n for n in names if n not in known and not os.path.isfile(n)]
    if not unknown:
        return
    close = dict.fromkeys(m for n in unknown for m in difflib.get_close_matches(n, known, n=3))  # best first
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise ValueError(f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}{hint}; list "
                     "lm-eval's tasks with `lm-eval ls tasks`, or pass --include-path DIR for task YAML files of your "
                     "own")


# --------------------------------------------------------------------------------------------------------- attention
def add_attention(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attention", help="draw a heatmap of attention weights over a prompt's tokens")
    p.add_argument("--model", default="gpt2", type=nonempty, help=MODEL_HELP)
    p.add_argument("--prompt", required=True, help="the text whose attention to draw")
    p.add_argument("--layer", type=integer(0), default=0, help="layer index, from 0 (default: 0)")
    p.add_argument("--head", type=integer(0), default=None,
                   help="head index, from 0 (default: every head of the layer)")
    p.add_argument("--out", required=True, type=image_file, help="image file to write (.png, .svg or .pdf)")
    p.add_argument("--tokenizer", default=None, type=nonempty, help=TOKENIZER_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--threads", type=THREADS, default=None, help=THREADS_HELP)
    p.set_defaults(run=_run_attention)


def _run_attention(args: argparse.Namespace) -> None:
    import torch

    from gpt2lab.visualize import attention_weights, plot_attention, token_labels

    set_threads(args.threads)
    model, tokenizer = _load_model(args.model, "fp32", args.tokenizer)
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise ValueError("the prompt is empty; pass some text with --prompt")
    weights = attention_weights(model, torch.tensor(ids), args.layer)  # (H, T, T)
    if args.head is not None and not 0 <= args.head < weights.size(0):
        raise ValueError(f"--head must be in [0, {weights.size(0) - 1}] for this model, got {args.head}")
    heads = None if args.head is None else [args.head]
    out = plot_attention(weights, token_labels(tokenizer, ids), args.out, layer=args.layer, heads=heads,
                         title=f"{args.model}: {len(ids)} tokens", overwrite=args.overwrite)
    print(f"wrote {out}")
