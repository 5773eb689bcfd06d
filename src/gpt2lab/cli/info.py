"""`gpt2lab info` and `gpt2lab tokenize`: look at a model's architecture or a text's tokens."""

from __future__ import annotations

import argparse

from gpt2lab.cli.args import POSITIVE, THREADS, THREADS_HELP, nonempty, read_text_file


# ----------------------------------------------------------------------------------------------------------------- info
def add_info(sub: argparse._SubParsersAction) -> None:
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
def add_tokenize(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenize", help="print the token ids (or with --show the pieces) of a text")
    p.add_argument("text", nargs="?", help="the text to tokenize (or use --file)")
    p.add_argument("--file", type=nonempty, help="read the text from this UTF-8 file instead")
    p.add_argument("--tokenizer", default="gpt2", type=nonempty,
                   help="gpt2, a tokenizer or model directory, or a .tiktoken file")
    p.add_argument("--show", action="store_true", help="print one token per line: id and the text it stands for")
    p.add_argument("--special", action="store_true", help="map special-token text such as <|endoftext|> to its id")
    p.set_defaults(run=_run_tokenize)


def _run_tokenize(args: argparse.Namespace) -> None:
    from gpt2lab.tokenizer import load_tokenizer

    if (args.text is None) == (args.file is None):
        raise ValueError("give the text either as an argument or with --file, not both and not neither")
    text = args.text if args.file is None else read_text_file(args.file, "--file")
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
