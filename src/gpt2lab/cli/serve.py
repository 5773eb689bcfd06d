"""`gpt2lab serve`: an OpenAI-compatible HTTP server with a playground page (the `serve` extra)."""

from __future__ import annotations

import argparse
import sys

from gpt2lab.cli.args import DTYPE_HELP, INFERENCE_DTYPES, THREADS, THREADS_HELP, nonempty, set_threads


# --------------------------------------------------------------------------------------------------------------- serve
def add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API, with a playground page at /")
    p.add_argument("--model", default="gpt2", type=nonempty, help="a model directory (config.json + "
                   "model.safetensors + tokenizer files) or a hub name such as gpt2 (default: gpt2)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000; 0 picks a free one)")
    p.add_argument("--dtype", default="fp32", choices=INFERENCE_DTYPES, help=DTYPE_HELP)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 (default: the "
                   "GPT2LAB_API_KEY environment variable, else no key)")
    p.add_argument("--model-name", default=None, help="the id clients pass as `model` (default: the directory "
                   "name, or the hub name as given)")
    p.add_argument("--tokenizer", default=None, type=nonempty,
                   help="tokenizer (default: the model directory's, else gpt2)")
    p.add_argument("--max-batch-size", type=int, default=None, help="completions decoded together (default: 8)")
    p.add_argument("--batch-wait-ms", type=float, default=None, help="how long the batcher waits for more rows "
                   "while fewer than --max-batch-size wait (default: 5)")
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
    p.add_argument("--threads", type=THREADS, default=None, help=THREADS_HELP)
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
    set_threads(args.threads)
    if args.host not in LOOPBACK_HOSTS and config.api_key is None:
        print(f"gpt2lab serve: warning: listening on {args.host} without --api-key; anyone who can reach this "
              "address can use the model", file=sys.stderr)
    serve(args.model, host=args.host, port=args.port, dtype=args.dtype, config=config, model_name=args.model_name,
          tokenizer=args.tokenizer, log_level=args.log_level)
