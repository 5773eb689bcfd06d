"""The commands that make a model: `train-tokenizer`, `prepare` (text to token shards), `train`, and `quickstart`
(all three steps on Shakespeare, then samples)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gpt2lab.cli.args import MAX_THREADS, TEXT_FIELD_HELP, integer, nonempty, number


# ----------------------------------------------------------------------------------------------------- train-tokenizer
def add_train_tokenizer(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train-tokenizer", help="train a byte-level BPE tokenizer on text files")
    p.add_argument("--input", nargs="+", required=True, type=nonempty, metavar="FILE",
                   help="UTF-8 text files to learn from")
    p.add_argument("--vocab-size", type=integer(257), required=True,
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
    from gpt2lab.tokenizer.formats import own_bpe_files, refuse_another_tokenizer

    # before the training, which can take minutes
    for path in args.input:
        if not Path(path).is_file():
            why = "a directory, not a text file" if Path(path).is_dir() else "no such file"
            raise ValueError(f"--input {path}: {why}")
    claim_files(args.out, BPE_FILES, args.overwrite, is_own=own_bpe_files, description="a tokenizer")
    refuse_another_tokenizer(Path(args.out), "bpe")
    tok = train_bpe(files=args.input, vocab_size=args.vocab_size, special_tokens=args.special, progress=True)
    out = tok.save_pretrained(args.out, overwrite=args.overwrite)
    print(f"saved {tok.vocab_size} ids ({len(tok.merges)} merges, specials {tok.special_tokens}) to {out}")


# ----------------------------------------------------------------------------------------------------------- prepare
def add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokenize text into training shards (+ meta.json) for `gpt2lab train`")
    p.add_argument("source", type=nonempty, help="a built-in dataset (shakespeare, tinyshakespeare), a text file, a "
                   "directory of .txt files, or a .jsonl file")
    p.add_argument("--tokenizer", default="gpt2", type=nonempty,
                   help="gpt2, char, or a tokenizer directory (default: gpt2)")
    p.add_argument("--out", default=None, type=nonempty, help="output directory (default: data/<source>-<tokenizer>)")
    p.add_argument("--val-fraction", type=number(0, 1, below=True), default=0.1,
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
def add_train(sub: argparse._SubParsersAction) -> None:
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

    if args.resume is not None and (args.overwrite or args.init_from is not None):
        other = "--overwrite (start the run again)" if args.overwrite else "--init-from (start from another model)"
        raise ValueError(f"--resume continues a run from its checkpoint and {other} does not; pass one of them")
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
def add_quickstart(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quickstart", help="prepare Shakespeare, train a small model on the CPU, print samples")
    p.add_argument("--minutes", type=number(0, above=True), default=None, help="training wall time, > 0 "
                   "(default: 5)")
    p.add_argument("--out", default=None, type=nonempty, help="run directory (default: runs/quickstart)")
    p.add_argument("--data-dir", default=None, type=nonempty,
                   help="prepared data directory (default: data/shakespeare-char)")
    p.add_argument("--samples", type=integer(0), default=3, help="samples to print at the end, >= 0 (default: 3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    p.set_defaults(run=_run_quickstart)


def _run_quickstart(args: argparse.Namespace) -> None:
    from gpt2lab.quickstart import QUICKSTART, quickstart
    from gpt2lab.train import TrainingInterrupted

    minutes = QUICKSTART.max_minutes if args.minutes is None else args.minutes
    try:
        quickstart(minutes=minutes, out_dir=args.out or QUICKSTART.out_dir,
                   data_dir=args.data_dir or QUICKSTART.data_dir, samples=args.samples, progress=not args.no_progress,
                   overwrite=args.overwrite)
    except TrainingInterrupted as e:
        raise _interrupted_exit(e) from None
