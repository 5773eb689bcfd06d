"""The `gpt2lab` command line: parsing and dispatch only.

Each subcommand has a `_add_<name>(subparsers)` function that declares its flags and a `_run_<name>(args)` function
that calls into the package. Defaults come from the config dataclasses so each default exists once. Errors that a
user can fix (ValueError, TypeError, OSError) are printed as one line on stderr with a non-zero exit, no traceback.
Nothing imports this module.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Sequence

USER_ERRORS = (ValueError, TypeError, OSError)


# -------------------------------------------------------------------------------------------------------- value types
# One argparse type per kind of value. A bad value fails at parse time, before any model is loaded, with one line
# that names the flag (argparse adds "argument --flag:") and what is allowed.
MAX_THREADS = 1024  # torch stores the thread count in a C int; far more threads than cores only slows it down
MAX_NEW_TOKENS = 1_000_000  # the decoder holds a token buffer this long
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed


def integer(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [low, high] (no upper limit when `high` is None)."""
    allowed = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value

    return parse


def number(low: float, high: float = math.inf, *, zero: bool = False, above: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number in [low, high] ((low, high] when `above` is set), or exactly 0 as well when
    `zero` is set."""
    opening = "(" if above else "["
    bounds = f"{'>' if above else '>='} {low:g}" if high == math.inf else f"in {opening}{low:g}, {high:g}]"
    allowed = f"0 or a finite number {bounds}" if zero else f"a finite number {bounds}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        inside = (low < value if above else low <= value) and value <= high
        if not (math.isfinite(value) and (inside or (zero and value == 0))):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {text!r}")
        return value

    return parse


def nonempty(text: str) -> str:
    """An argparse type for names, paths and texts where an empty string would silently mean something else
    (the current directory, a default)."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return text


POSITIVE = integer(1)
THREADS = integer(1, MAX_THREADS)
THREADS_HELP = f"torch threads, 1..{MAX_THREADS} (default: torch's choice)"
TEXT_FIELD_HELP = "the field holding the text in a .jsonl source (default: text)"
MODEL_HELP = "a model directory or a hub name such as gpt2 (default: gpt2)"
TOKENIZER_HELP = "tokenizer (default: the model directory's, else gpt2)"


class OneLineParser(argparse.ArgumentParser):
    """argparse with usage errors on one line: the message and where the usage is, instead of the usage itself."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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


def _set_threads(threads: int | None) -> None:
    """Use `threads` torch threads (None: torch's choice)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------------- info
def _add_info(sub: argparse._SubParsersAction) -> None:
    from gpt2lab.config import PRESETS

    p = sub.add_parser("info", help="print a model's architecture, parameter table and forward-pass time")
    p.add_argument("model", nargs="?", default="gpt2", type=nonempty,
                   help=f"a preset ({', '.join(PRESETS)}) or a model directory (default: gpt2)")
    p.add_argument("--seq-len", type=POSITIVE, default=None,
                   help="tokens in the timed forward pass (default: min(n_ctx, 1024))")
    p.add_argument("--threads", type=THREADS, default=None, help=THREADS_HELP)
    p.set_defaults(run=_run_info)


def _run_info(args: argparse.Namespace) -> None:
    from gpt2lab.info import describe

    print(describe(args.model, seq_len=args.seq_len, threads=args.threads))


# ------------------------------------------------------------------------------------------------------------ tokenize
def _add_tokenize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenize", help="print the token ids (or with --show the pieces) of a text")
    p.add_argument("text", nargs="?", help="the text to tokenize (or use --file)")
    p.add_argument("--file", type=nonempty, help="read the text from this UTF-8 file instead")
    p.add_argument("--tokenizer", default="gpt2", type=nonempty,
                   help="gpt2, a tokenizer or model directory, or a .tiktoken file")
    p.add_argument("--show", action="store_true", help="print one token per line: id and the text it stands for")
    p.add_argument("--special", action="store_true", help="map special-token text such as <|endoftext|> to its id")
    p.set_defaults(run=_run_tokenize)


def _run_tokenize(args: argparse.Namespace) -> None:
    from pathlib import Path

    from gpt2lab.tokenizer import load_tokenizer

    if (args.text is None) == (args.file is None):
        raise ValueError("give the text either as an argument or with --file, not both and not neither")
    text = args.text if args.file is None else Path(args.file).read_text(encoding="utf-8")
    tok = load_tokenizer(args.tokenizer)
    ids = tok.encode(text, allowed_special="all" if args.special else ())
    if not args.show:
        print(" ".join(map(str, ids)))
        return
    for i in ids:
        piece = tok.decode_bytes([i])
        try:
            shown = repr(piece.decode("utf-8"))
        except UnicodeDecodeError:  # part of a multi-byte character
            shown = repr(piece)
        print(f"{i}\t{shown}")


# ----------------------------------------------------------------------------------------------------- train-tokenizer
def _add_train_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer on text files")
    p.add_argument("--input", nargs="+", required=True, type=nonempty, metavar="FILE",
                   help="UTF-8 text files to learn from")
    p.add_argument("--vocab-size", type=POSITIVE, required=True,
                   help="ids in the result: 256 bytes + merges + specials")
    p.add_argument("--out", required=True, type=nonempty,
                   help="directory for vocab.json, merges.txt, tokenizer_config.json")
    p.add_argument("--special", nargs="*", default=["<|endoftext|>"], type=nonempty, metavar="TOKEN",
                   help="special tokens, given the last ids (default: <|endoftext|>)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace tokenizer files already in --out")
    p.set_defaults(run=_run_train_tokenizer)


def _run_train_tokenizer(args: argparse.Namespace) -> None:
    from gpt2lab.files import claim_files
    from gpt2lab.tokenizer import BPE_FILES, train_bpe

    claim_files(args.out, BPE_FILES, args.overwrite)  # before the training, which can take minutes
    tok = train_bpe(files=args.input, vocab_size=args.vocab_size, special_tokens=args.special, progress=True)
    out = tok.save_pretrained(args.out, overwrite=args.overwrite)
    print(f"saved {tok.vocab_size} ids ({len(tok.merges)} merges, specials {tok.special_tokens}) to {out}")


# --------------------------------------------------------------------------------------------------------------- serve
def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API, with a playground page at /")
    p.add_argument("--model", default="gpt2", help="a model directory (config.json + model.safetensors + tokenizer "
                   "files) or a hub name such as gpt2 (default: gpt2)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000; 0 picks a free one)")
    p.add_argument("--dtype", default="fp32", help="inference precision: fp32, bf16 or int8 (default: fp32)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 (default: the "
                   "GPT2LAB_API_KEY environment variable, else no key)")
    p.add_argument("--model-name", default=None, help="the id clients pass as `model` (default: the directory name)")
    p.add_argument("--tokenizer", default=None, help="tokenizer (default: the model directory's, else gpt2)")
    p.add_argument("--max-batch-size", type=int, default=None, help="completions decoded together (default: 8)")
    p.add_argument("--batch-wait-ms", type=float, default=None, help="how long a lone request waits for company "
                   "before its batch starts (default: 5)")
    p.add_argument("--max-tokens", type=int, default=None, help="the largest max_tokens a request may ask for "
                   "(default: the model's context)")
    p.add_argument("--max-request-bytes", type=int, default=None, help="largest request body (default: 1000000)")
    p.add_argument("--max-choices", type=int, default=None, help="completions per request, prompts × n (default: "
                   "16); raise it for clients that send many prompts at once, such as lm-eval's batch_size")
    p.add_argument("--max-stop", type=int, default=None, help="stop strings per request, besides the end-of-text "
                   "token's (default: 4, as OpenAI)")
    p.add_argument("--max-logprobs", type=int, default=None, help="the largest `logprobs` (top alternatives per "
                   "token) a request may ask for (default: 5, as OpenAI)")
    p.add_argument("--max-connections", type=int, default=None, help="open connections; at the limit requests get "
                   "503 and further connections are closed (default: 100)")
    p.add_argument("--header-timeout", type=float, default=None, metavar="SECONDS", help="close a connection that "
                   "has not sent a request's headers within this time (default: 10)")
    p.add_argument("--body-timeout", type=float, default=None, metavar="SECONDS", help="answer 408 to a request "
                   "whose body has not arrived within this time (default: 30)")
    p.add_argument("--keep-alive", type=float, default=None, metavar="SECONDS", help="close an idle keep-alive "
                   "connection after this time (default: 5)")
    p.add_argument("--allowed-host", action="append", default=None, metavar="NAME", help="a host name clients may "
                   "reach the server by (repeatable; '*': any; default: the loopback names when --host is one, "
                   "else any)")
    p.add_argument("--allowed-origin", action="append", default=None, metavar="ORIGIN", help="a web origin such as "
                   "http://localhost:3000 that may POST besides the server's own page (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--log-level", default="info", help="uvicorn log level: critical, error, warning, info, debug, "
                   "trace (default: info)")
    p.set_defaults(run=_run_serve)


def _run_serve(args: argparse.Namespace) -> None:
    import os

    try:
        from gpt2lab.serve import LOG_LEVELS, LOOPBACK_HOSTS, ServerConfig, serve
    except ImportError as e:  # the `serve` extra is not installed
        raise OSError(str(e)) from None
    if args.log_level not in LOG_LEVELS:
        raise ValueError(f"--log-level must be one of: {', '.join(LOG_LEVELS)}; got {args.log_level!r}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in [0, 65535] (0: any free port), got {args.port}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    api_key = args.api_key if args.api_key is not None else os.environ.get("GPT2LAB_API_KEY")
    if api_key is not None and not api_key.strip():
        where = "--api-key" if args.api_key is not None else "GPT2LAB_API_KEY"
        raise ValueError(f"{where} is empty; give a key, or leave it unset to serve without one")
    hosts = args.allowed_host or (list(LOOPBACK_HOSTS) if args.host in LOOPBACK_HOSTS else ["*"])
    limits = {"api_key": api_key, "max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms,
              "max_tokens": args.max_tokens, "max_request_bytes": args.max_request_bytes,
              "max_choices": args.max_choices, "max_stop": args.max_stop, "max_logprobs": args.max_logprobs,
              "max_connections": args.max_connections, "header_timeout_s": args.header_timeout,
              "body_timeout_s": args.body_timeout, "keep_alive_s": args.keep_alive, "allowed_hosts": tuple(hosts),
              "allowed_origins": tuple(args.allowed_origin or ())}
    config = ServerConfig(**{k: v for k, v in limits.items() if v is not None})
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.host not in LOOPBACK_HOSTS and config.api_key is None:
        print(f"gpt2lab serve: warning: listening on {args.host} without --api-key; anyone who can reach this "
              "address can use the model", file=sys.stderr)
    serve(args.model, host=args.host, port=args.port, dtype=args.dtype, config=config, model_name=args.model_name,
          tokenizer=args.tokenizer, log_level=args.log_level)


# ----------------------------------------------------------------------------------------------------------- prepare
def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokenize text into training shards (+ meta.json) for `gpt2lab train`")
    p.add_argument("source", type=nonempty, help="a built-in dataset (shakespeare, tinyshakespeare), a text file, a "
                   "directory of .txt files, or a .jsonl file")
    p.add_argument("--tokenizer", default="gpt2", type=nonempty,
                   help="gpt2, char, or a tokenizer directory (default: gpt2)")
    p.add_argument("--out", default=None, type=nonempty, help="output directory (default: data/<source>-<tokenizer>)")
    p.add_argument("--val-fraction", type=number(0, 1), default=0.1,
                   help="tail of each document kept for validation, in [0, 1) (default: 0.1)")
    p.add_argument("--workers", type=integer(0, MAX_THREADS), default=0,
                   help=f"encoding processes, 0..{MAX_THREADS} (default 0: one per CPU core)")
    p.add_argument("--text-field", default="text", type=nonempty, help=TEXT_FIELD_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier preparation in --out (other files "
                   "there are kept)")
    p.set_defaults(run=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> None:
    from gpt2lab.data import default_out_dir, prepare

    out = args.out or default_out_dir(args.source, args.tokenizer)
    meta = prepare(args.source, out, tokenizer=args.tokenizer, val_fraction=args.val_fraction, workers=args.workers,
                   text_field=args.text_field, overwrite=args.overwrite)
    for split, info in meta["splits"].items():
        print(f"{split}: {info['tokens']:,} tokens from {info['bytes']:,} bytes in {len(info['shards'])} shard(s)")
    print(f"wrote {out} (vocab {meta['vocab_size']}, {meta['dtype']})")


# ------------------------------------------------------------------------------------------------------------- train
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (under torchrun: on many processes with DDP)")
    p.add_argument("--config", default=None, type=nonempty,
                   help="run file (TOML); see configs/ and docs/training.md")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config field, e.g. --set lr=3e-4 --set model.n_layer=6 (repeatable)")
    p.add_argument("--init-from", default=None, type=nonempty, metavar="gpt2|DIR",
                   help="fine-tune this model (same as --set init_from=...)")
    p.add_argument("--resume", nargs="?", const=True, default=None, type=nonempty, metavar="RUN_DIR",
                   help="continue from the run's last checkpoint (RUN_DIR: use its saved config.toml, or the config "
                        "in its checkpoint if that file is gone)")
    p.add_argument("--fresh-optimizer", action="store_true", help="with --resume: start AdamW's moments from zero "
                   "(needed when the checkpoint has no optimizer.safetensors; the run then differs from an "
                   "uninterrupted one)")
    p.add_argument("--overwrite", action="store_true", help="start again even if out_dir already holds a run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines still go to log.jsonl)")
    p.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> None:
    from gpt2lab.config import load_train_config
    from gpt2lab.train import TrainingInterrupted, load_run_config, train

    overrides = list(args.overrides)
    run_dir = args.resume if isinstance(args.resume, str) else None  # a bare --resume is True: the config's out_dir
    if run_dir:  # a run directory: its saved config, unless --config is given
        overrides.insert(0, f"out_dir={json.dumps(run_dir)}")
    if args.init_from is not None:
        overrides.append(f"init_from={json.dumps(args.init_from)}")
    if run_dir and args.config is None:
        config = load_run_config(run_dir, overrides)
    else:
        config = load_train_config(args.config, overrides)
    try:
        result = train(config, resume=args.resume is not None, overwrite=args.overwrite,
                       fresh_optimizer=args.fresh_optimizer, progress=not args.no_progress)
    except TrainingInterrupted as e:
        raise _interrupted_exit(e) from None
    finally:
        import torch.distributed

        if torch.distributed.is_available() and torch.distributed.is_initialized():  # under torchrun
            torch.distributed.destroy_process_group()
    s = result.state
    if result.checkpoint is not None and s.step:
        print(f"step {s.step}: train loss {s.last_train_loss:.4f}, val loss {s.last_val_loss:.4f} "
              f"({s.last_val_bpb:.4f} bits/byte); checkpoint {result.checkpoint}")


def _interrupted_exit(e: KeyboardInterrupt) -> SystemExit:
    """A training run stopped by SIGINT / SIGTERM after saving: say where in one line; exit with 128 + the signal."""
    print(f"gpt2lab train: {e}", file=sys.stderr)
    return SystemExit(128 + getattr(e, "signum", 2))


# -------------------------------------------------------------------------------------------------------- quickstart
def _add_quickstart(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="prepare Shakespeare, train a small model on the CPU, print samples")
    p.add_argument("--minutes", type=number(0, above=True), default=None, help="training wall time, > 0 "
                   "(default: 5)")
    p.add_argument("--out", default=None, type=nonempty, help="run directory (default: runs/quickstart)")
    p.add_argument("--data-dir", default=None, type=nonempty,
                   help="prepared data directory (default: data/shakespeare-char)")
    p.add_argument("--samples", type=integer(0), default=3, help="samples to print at the end, >= 0 (default: 3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_quickstart)


def _run_quickstart(args: argparse.Namespace) -> None:
    from gpt2lab.quickstart import QUICKSTART, quickstart
    from gpt2lab.train import TrainingInterrupted

    minutes = QUICKSTART.max_minutes if args.minutes is None else args.minutes
    try:
        quickstart(minutes=minutes, out_dir=args.out or QUICKSTART.out_dir,
                   data_dir=args.data_dir or QUICKSTART.data_dir, samples=args.samples, progress=not args.no_progress)
    except TrainingInterrupted as e:
        raise _interrupted_exit(e) from None


# ---------------------------------------------------------------------------------------------------------- generate
def _add_generate(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--dtype", default="fp32", help="inference precision: fp32, bf16 or int8 (default: fp32)")
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
        with open(args.prompt_file, encoding="utf-8") as f:
            return f.read()
    return ""  # unconditional: generation starts from <|endoftext|>


def _run_generate(args: argparse.Namespace) -> None:
    import torch

    from gpt2lab.generate import stream_text
    from gpt2lab.sampling import SamplingParams

    given = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
             "repetition_penalty": args.repetition_penalty}
    sampling = SamplingParams(**{k: v for k, v in given.items() if v is not None})  # checks before loading
    _set_threads(args.threads)
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


def limit(text: str) -> int | float:
    """An argparse type for lm-eval's --limit: a count of examples per task (>= 1), or a fraction in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if value >= 1 and value == int(value) and math.isfinite(value):
        return int(value)
    if 0 < value < 1:
        return value
    raise argparse.ArgumentTypeError(f"must be a whole number of examples >= 1 or a fraction in (0, 1), got {text!r}")


def _add_eval(sub: argparse._SubParsersAction) -> None:
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
    p.add_argument("--dtype", default="fp32", help="inference precision: fp32, bf16 or int8 (default: fp32)")
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
    _set_threads(args.threads)
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
        claim_file(args.output_path, args.overwrite, is_own=_is_eval_results, description="results file")
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable, make_table

    from gpt2lab.lm_eval import HarnessModel

    _set_threads(args.threads)
    harness = HarnessModel(args.model, dtype=args.dtype, batch_size=args.batch_size, tokenizer=args.tokenizer)
    _check_vocabularies(args.model, harness.model, harness.tokenizer)
    task_manager = TaskManager(include_path=args.include_path)
    _check_task_names(args.task, task_manager)
    results = lm_eval.simple_evaluate(model=harness, tasks=args.task, num_fewshot=args.num_fewshot,
                                      limit=args.limit, task_manager=task_manager, log_samples=False)
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
def _add_attention(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attention", help="draw a heatmap of attention weights over a prompt's tokens")
    p.add_argument("--model", default="gpt2", type=nonempty, help=MODEL_HELP)
    p.add_argument("--prompt", required=True, help="the text whose attention to draw")
    p.add_argument("--layer", type=integer(0), default=0, help="layer index, from 0 (default: 0)")
    p.add_argument("--head", type=integer(0), default=None,
                   help="head index, from 0 (default: every head of the layer)")
    p.add_argument("--out", required=True, type=nonempty, help="image file to write (.png, .svg or .pdf)")
    p.add_argument("--tokenizer", default=None, type=nonempty, help=TOKENIZER_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=_run_attention)


def _run_attention(args: argparse.Namespace) -> None:
    import torch

    from gpt2lab.visualize import attention_weights, plot_attention, token_labels

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


# ------------------------------------------------------------------------------------------------------------- parsing
# One entry per subcommand, in the order `gpt2lab --help` lists them. Each adds its parser and sets `run`.
COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_quickstart,
    _add_info,
    _add_tokenize,
    _add_train_tokenizer,
    _add_prepare,
    _add_train,
    _add_generate,
    _add_eval,
    _add_attention,
    _add_serve,
]


def build_parser() -> argparse.ArgumentParser:
    from gpt2lab import __version__

    parser = OneLineParser(prog="gpt2lab", description="A faithful, from-scratch GPT-2.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed its one-line error, the help or the version
        return e.code if isinstance(e.code, int) else 2
    try:
        args.run(args)
    except KeyboardInterrupt:
        print("gpt2lab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except USER_ERRORS as e:
        print(f"gpt2lab {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
