"""The HTTP face: an OpenAI-compatible completions API and a playground page, a thin layer over generate.py.

    client ──HTTP──► Starlette app (event loop)           one decode thread
                     parse + validate the request  ─rows─►  waits a few ms for company, then
                     stream deltas back (SSE)      ◄─deltas─ decode_steps(batch of rows) ─► text, stop strings

Every completion choice becomes a *row*. Rows that arrive together are decoded together in one left-padded batch by
`generate.decode_steps` (up to `max_batch_size` rows), so sixteen clients cost far less than sixteen one-by-one
decodes: at batch 1 a CPU spends its time reading the weights, and a batch reads them once for all its rows. The
decode thread also turns tokens into text (never splitting a UTF-8 character, holding back what might be the start
of a stop string), so a stop string or a disconnected client retires its row at the very next step.

One client cannot hurt another: a failure ends only its own row (see `BatchWorker`), every bad input is a 4xx
error object, work is bounded before it is done, and `server_net` times out and caps slow or idle connections and
refuses requests a web page could forge against a local server.

Endpoints: `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/completions` (OpenAI's legacy completions, the right
API for a base model; GPT-2 is not a chat model), `GET /health`, and the playground at `/`. Errors are OpenAI-style
objects, `{"error": {"message", "type", "param", "code"}}`, with the HTTP status that fits (see docs/serving.md).

    >>> app = create_app(model, tokenizer, ServerConfig(model_id="tiny"))
    >>> with BackgroundServer(app) as server:           # uvicorn on 127.0.0.1, a free port
    ...     openai.OpenAI(base_url=server.url + "/v1", api_key="-").completions.create(model="tiny", prompt="Hi")
"""

from __future__ import annotations

import asyncio
import codecs
import dataclasses
import functools
import hmac
import json
import logging
import math
import threading
import time
import uuid
from collections import deque
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence

import torch

try:
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Mount, Route
    from starlette.middleware import Middleware
    from starlette.staticfiles import StaticFiles

    from gpt2lab.server_net import BrowserGuard, GuardedH11Protocol, bind_socket, quiet_repeats
except ImportError as e:  # pragma: no cover - exercised only without the extra installed
    raise ImportError(f"serving needs starlette and uvicorn ({e}); "
                      "install them with: pip install 'gpt2lab[serve]'") from e

from gpt2lab.generate import SamplingParams, TokenEvent, decode_steps, prompt_logprobs
from gpt2lab.generate import _first_stop as first_stop, held_back  # the text assembler of generate's streaming

log = logging.getLogger("gpt2lab.server")

STATIC_DIR = Path(__file__).parent / "static"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")

# OpenAI's legacy completions fields, then our extensions (top_k, repetition_penalty: vLLM offers the same two).
KNOWN_FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "logprobs",
                "echo", "stop", "seed", "suffix", "presence_penalty", "frequency_penalty", "best_of", "logit_bias",
                "user", "top_k", "repetition_penalty")


# ------------------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class ServerConfig:
    """What one server allows and how it batches; each field has a `gpt2lab serve` flag.

    - `model_id`: the name clients pass as `model` and `/v1/models` lists.
    - `api_key`: when set, every `/v1` request needs `Authorization: Bearer <key>`.
    - `max_batch_size`: rows decoded together. Larger batches raise throughput until the matmuls stop being
      memory-bound; each row also holds a KV cache of up to n_ctx positions.
    - `batch_wait_ms`: how long the decode thread waits for company after a row arrives alone. A few ms costs a
      lone client little and lets requests sent "at the same time" (really a few ms apart) share a batch.
    - `max_tokens`: the largest `max_tokens` a request may ask for (None: the model's context).
    - `default_max_tokens`: used when a request gives none (16, as OpenAI's completions API).
    - `max_request_bytes`: larger request bodies get 413 before they are parsed.
    - `max_choices`: prompts × n in one request (lm-eval sends `batch_size` prompts in one).
    - `max_logprobs`: the largest `logprobs` (top alternatives per token); OpenAI allows 5.
    - `max_stop`: stop strings per request (OpenAI allows 4), not counting the end-of-text token's text.
    - `max_stop_length`: characters in one stop string (each is searched for after every token).
    - `max_pending`: rows waiting or decoding before new requests get 503.
    - `max_connections`: open connections. At the limit a new request gets 503 (uvicorn's `limit_concurrency`);
      a connection beyond it is closed at once, so idle clients cannot use up the process's file descriptors.
    - `header_timeout_s`: a connection that has not sent a request's headers this long after it opened (or after
      its previous response) is closed.
    - `body_timeout_s`: a request whose body has not fully arrived this long after its headers gets 408.
    - `keep_alive_s`: an idle keep-alive connection is closed after this long (uvicorn's `timeout_keep_alive`).
    - `allowed_hosts`: the names this server answers to in the `Host` header ("*": any). The loopback names by
      default, so a web page whose domain resolves to 127.0.0.1 (DNS rebinding) cannot reach a local server.
    - `allowed_origins`: web origins (e.g. "http://localhost:3000") allowed to POST besides the server's own.
    """

    model_id: str = "gpt2lab"
    api_key: str | None = None
    max_batch_size: int = 8
    batch_wait_ms: float = 5.0
    max_tokens: int | None = None
    default_max_tokens: int = 16
    max_request_bytes: int = 1_000_000
    max_choices: int = 16
    max_logprobs: int = 5
    max_stop: int = 4
    max_stop_length: int = 256
    max_pending: int = 256
    max_connections: int = 100
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_s: float = 5.0
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    allowed_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.model_id, str) or not self.model_id:
            raise ValueError(f"ServerConfig.model_id must be a non-empty string, got {self.model_id!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ValueError("ServerConfig.api_key must be a non-empty string or None")
        positive = ("max_batch_size", "default_max_tokens", "max_request_bytes", "max_choices", "max_stop",
                    "max_stop_length", "max_pending")
        for name in positive:
            _check_config_int(name, getattr(self, name), 1)
        _check_config_int("max_connections", self.max_connections, 2)
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
            _check_config_seconds(name, getattr(self, name))
        for name in ("allowed_hosts", "allowed_origins"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"ServerConfig.{name} must be a tuple of non-empty strings, got {value!r}")
        if not self.allowed_hosts:
            raise ValueError("ServerConfig.allowed_hosts is empty; list the host names to answer to, or '*' for any")
        _check_config_int("max_logprobs", self.max_logprobs, 0)
        if self.max_tokens is not None:
            _check_config_int("max_tokens", self.max_tokens, 1)
        if isinstance(self.batch_wait_ms, bool) or not isinstance(self.batch_wait_ms, (int, float)) \
                or not 0 <= self.batch_wait_ms <= 1000:
            raise ValueError("ServerConfig.batch_wait_ms must be a number of milliseconds in [0, 1000], "
                             f"got {self.batch_wait_ms!r}")


def _check_config_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"ServerConfig.{name} must be an integer >= {low}, got {value!r}")


def _check_config_seconds(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 3600:
        raise ValueError(f"ServerConfig.{name} must be a number of seconds in (0, 3600], got {value!r}")


# ------------------------------------------------------------------------------------------------------- errors
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 408: "invalid_request_error",
               413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error",
               500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error the client gets as an OpenAI-style object: the HTTP status, a message naming the bad value and what
    is allowed, and the request field (`param`) it concerns."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def error_response(error: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.to_dict(), status_code=error.status, headers=headers)


# ------------------------------------------------------------------------------------------------------ request
@dataclass(frozen=True)
class CompletionRequest:
    """A validated `/v1/completions` request: prompts already tokenized, sampling already checked.

    One request asks for `len(prompts) * n` choices; choice `i * n + j` is the j-th completion of prompt i.
    `logprobs` is None (not asked) or the number of top alternatives per token.
    """

    prompts: tuple[tuple[int, ...], ...]
    prompt_texts: tuple[str, ...]
    max_tokens: int
    sampling: SamplingParams
    n: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None
    echo: bool = False

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n


def _invalid(param: str, message: str, status: int = 400, code: str = "invalid_value") -> APIError:
    return APIError(status, message, param=param, code=code)


def _get_int(body: Mapping[str, Any], name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _invalid(name, f"'{name}' must be an integer in [{low}, {high}], got {value!r}")
    return value


def _get_number(body: Mapping[str, Any], name: str, default: float | None, low: float, high: float,
                low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    bad_type = isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    if bad_type or value > high or value < low or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise _invalid(name, f"'{name}' must be a number in {interval}, got {value!r}")
    return float(value)


def _get_bool(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _invalid(name, f"'{name}' must be true or false, got {value!r}")
    return value


def _check_fields(body: Any) -> None:
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    unknown = sorted(set(body) - set(KNOWN_FIELDS))
    if unknown:
        raise _invalid(unknown[0], f"unknown field(s) {', '.join(map(repr, unknown))}; "
                                   f"allowed: {', '.join(KNOWN_FIELDS)}", code="unknown_field")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise _invalid("user", f"'user' must be a string, got {body['user']!r}")
    # Known OpenAI fields that a plain GPT-2 sampler does not implement: refuse anything but their neutral value.
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name) not in (None, 0, 0.0) or isinstance(body.get(name), bool):
            raise _invalid(name, f"'{name}' is not supported by this server (only 0); use 'repetition_penalty' instead",
                           code="unsupported")
    if body.get("suffix") not in (None, ""):
        raise _invalid("suffix", "'suffix' (insertion) is not supported: GPT-2 only continues text", code="unsupported")
    if body.get("logit_bias") not in (None, {}):
        raise _invalid("logit_bias", "'logit_bias' is not supported by this server", code="unsupported")


def _prompt_list(value: Any) -> list[str | list[int]]:
    """OpenAI's four prompt shapes -> a list of prompts, each a string or a list of token ids."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(p, str) for p in value):
            return list(value)
        if all(_is_id(t) for t in value):
            return [list(value)]
        if all(isinstance(p, list) and p and all(_is_id(t) for t in p) for p in value):
            return [list(p) for p in value]
    raise _invalid("prompt", "'prompt' must be a string, a non-empty list of strings, a list of token ids or a list of "
                             f"lists of token ids; got {_short(value)}")


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _get_stop(body: Mapping[str, Any], max_stop: int, max_length: int, tokenizer: Any) -> tuple[str, ...]:
    """The stop strings, at most `max_stop` of them. The end-of-text token's own text is not counted: clients such
    as lm-eval add it to every list, and that token ends a choice anyway. It stays in the list, so the same
    characters spelled by ordinary tokens still stop the text."""
    value = body.get("stop")
    if value is None:
        return ()
    eot = tokenizer.eot_token
    end_of_text = tokenizer.decode_bytes([eot]).decode("utf-8", errors="replace") if eot is not None else None
    stops = [value] if isinstance(value, str) else value
    valid = isinstance(stops, list) and all(isinstance(s, str) and 0 < len(s) <= max_length for s in stops)
    if not valid or len([s for s in stops if s != end_of_text]) > max_stop:
        raise _invalid("stop", f"'stop' must be a string or a list of at most {max_stop} strings (besides "
                               f"{end_of_text or 'the end-of-text token'!r}), each of 1 to {max_length} characters; "
                               f"got {_short(value)}")
    return tuple(dict.fromkeys(stops))


MAX_JSON_DEPTH = 8  # a valid request nests 3 deep (body, list of prompts, token ids)


def check_json_values(body: Any) -> None:
    """Refuse (400) JSON nested deeper than MAX_JSON_DEPTH and strings holding lone surrogates (an escape such as
    "\\ud800", which decodes to no character: it cannot be tokenized or written back as UTF-8). Iterative, so any
    depth is safe to walk."""
    stack = [(body, 1, None)]
    while stack:
        value, depth, field = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise APIError(400, f"the request body nests more than {MAX_JSON_DEPTH} levels deep", param=field,
                           code="invalid_json")
        if isinstance(value, dict):
            for key, item in value.items():
                _check_utf8(key, field or key)
                stack.append((item, depth + 1, field or key))
        elif isinstance(value, list):
            stack.extend((item, depth + 1, field) for item in value)
        elif isinstance(value, str):
            _check_utf8(value, field)


def _check_utf8(text: str, field: str | None) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        where = f"'{field}'" if field else "the request body"
        raise APIError(400, f"{where} holds a lone surrogate {text[e.start]!r} at index {e.start}, which is not a "
                            "character; send valid UTF-8 text", param=field, code="invalid_text") from None


def max_token_bytes(tokenizer: Any) -> int:
    """The most bytes any one token stands for: a text of more than n_ctx times this many characters cannot fit the
    context, whatever its tokens, so it is refused before the (costly) tokenization."""
    return max(len(tokenizer.decode_bytes([i])) for i in range(tokenizer.vocab_size))


def _check_prompt_sizes(prompts: list[str | list[int]], n_ctx: int, token_bytes: int) -> None:
    """413 for a prompt that cannot fit the context, judged by its length alone (before any tokenizing)."""
    for i, p in enumerate(prompts):
        where = f"prompt {i}" if len(prompts) > 1 else "the prompt"
        if isinstance(p, str) and len(p) > n_ctx * token_bytes:
            raise APIError(413, f"{where} is {len(p)} characters long; this model's context of {n_ctx} tokens holds "
                                f"at most {n_ctx * token_bytes} characters", param="prompt", code="prompt_too_long")
        if isinstance(p, list) and len(p) > n_ctx:
            raise APIError(413, f"{where} is {len(p)} tokens long, but this model's context is {n_ctx} tokens",
                           param="prompt", code="prompt_too_long")


def _tokenize_prompts(prompts: list[str | list[int]], tokenizer: Any) -> tuple[list[tuple[int, ...]], list[str]]:
    """Strings are encoded (`<|endoftext|>` in the text is the special token, as in OpenAI's API); id lists are
    checked against the vocabulary. An empty prompt becomes `<|endoftext|>`, the token GPT-2 saw before every
    document, so the model starts a fresh text instead of failing on zero positions. Text the tokenizer cannot
    encode (a character outside a char-level vocabulary) is a 400 naming the character."""
    ids_list, texts = [], []
    for p in prompts:
        if isinstance(p, str):
            try:
                ids = tokenizer.encode(p, allowed_special="all")
            except ValueError as e:
                raise _invalid("prompt", f"'prompt' cannot be tokenized: {e}", code="invalid_text") from None
            text = p
        else:
            bad = next((t for t in p if not 0 <= t < tokenizer.vocab_size), None)
            if bad is not None:
                raise _invalid("prompt", f"token id {bad} in 'prompt' is out of range "
                                         f"(allowed: 0..{tokenizer.vocab_size - 1})")
            ids, text = p, tokenizer.decode(p)
        if not ids:
            if tokenizer.eot_token is None:
                raise _invalid("prompt", "'prompt' is empty and this tokenizer has no <|endoftext|> token "
                                         "to start from")
            ids = [tokenizer.eot_token]
        ids_list.append(tuple(ids))
        texts.append(text)
    return ids_list, texts


def parse_completion_request(body: Any, tokenizer: Any, n_ctx: int, config: ServerConfig,
                             token_bytes: int | None = None) -> CompletionRequest:
    """Validate a decoded JSON body and tokenize its prompts; raise APIError naming the first problem.

    Status codes, as OpenAI's API answers them (its clients raise `BadRequestError` for 400 only): 400 for a body
    that is not an object, is nested too deep or holds lone surrogates, unknown fields, wrong types, out-of-range
    values, text the tokenizer cannot encode, and a request that overflows the context (prompt + max_tokens > n_ctx,
    OpenAI's `context_length_exceeded`); 413 for a prompt that alone exceeds the context (refused by its length
    before tokenizing, given `token_bytes`, the tokenizer's `max_token_bytes`); 404 for a model name this server
    does not serve.
    """
    check_json_values(body)
    _check_fields(body)
    model = body.get("model")
    if model is not None and model != config.model_id:
        if not isinstance(model, str):
            raise _invalid("model", f"'model' must be a string, got {model!r}")
        raise APIError(404, f"model {model!r} is not served here; available: {config.model_id!r}", param="model",
                       code="model_not_found")
    if "prompt" not in body:
        raise _invalid("prompt", "'prompt' is required (a string or a list of strings)", code="missing_field")
    prompts = _prompt_list(body["prompt"])
    token_limit = min(config.max_tokens or n_ctx, n_ctx)
    max_tokens = _get_int(body, "max_tokens", min(config.default_max_tokens, token_limit), 0, token_limit)
    temperature = _get_number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _get_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    top_k = _get_int(body, "top_k", 0, 0, tokenizer.vocab_size)
    repetition_penalty = _get_number(body, "repetition_penalty", 1.0, 0.0, 10.0, low_open=True)
    n = _get_int(body, "n", 1, 1, config.max_choices)
    best_of = _get_int(body, "best_of", n, 1, config.max_choices)
    if best_of != n:
        raise _invalid("best_of", f"'best_of' other than n is not supported (got best_of={best_of}, n={n})",
                       code="unsupported")
    if len(prompts) * n > config.max_choices:
        raise _invalid("n", f"{len(prompts)} prompt(s) × n={n} asks for {len(prompts) * n} completions; "
                            f"this server allows at most {config.max_choices} per request")
    logprobs = _get_int(body, "logprobs", None, 0, config.max_logprobs)
    seed = _get_int(body, "seed", None, -(2**63), 2**63 - 1)
    stream, echo = _get_bool(body, "stream"), _get_bool(body, "echo")
    include_usage = _get_stream_options(body, stream)
    stop = _get_stop(body, config.max_stop, config.max_stop_length, tokenizer)
    try:
        sampling = SamplingParams(temperature=temperature, top_k=top_k or None, top_p=None if top_p == 1.0 else top_p,
                                  repetition_penalty=None if repetition_penalty == 1.0 else repetition_penalty)
    except ValueError as e:  # SamplingParams names the field; our ranges above should already have caught it
        raise _invalid("sampling", str(e)) from None
    _check_prompt_sizes(prompts, n_ctx, token_bytes if token_bytes is not None else max_token_bytes(tokenizer))
    ids, texts = _tokenize_prompts(prompts, tokenizer)
    _check_context(ids, max_tokens, n_ctx)
    return CompletionRequest(prompts=tuple(ids), prompt_texts=tuple(texts), max_tokens=max_tokens, sampling=sampling,
                             n=n, stop=stop, seed=seed, stream=stream, include_usage=include_usage, logprobs=logprobs,
                             echo=echo)


def _get_stream_options(body: Mapping[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise _invalid("stream_options", "'stream_options' is only allowed with \"stream\": true")
    valid = isinstance(options, dict) and not set(options) - {"include_usage"}
    if not valid or not isinstance(options.get("include_usage", False), bool):
        raise _invalid("stream_options", "'stream_options' must be {\"include_usage\": true|false}, "
                                         f"got {_short(options)}")
    return options.get("include_usage", False)


def _check_context(prompts: Sequence[Sequence[int]], max_tokens: int, n_ctx: int) -> None:
    for i, ids in enumerate(prompts):
        where = f"prompt {i}" if len(prompts) > 1 else "the prompt"
        if len(ids) > n_ctx:
            raise APIError(413, f"{where} is {len(ids)} tokens long, but this model's context is {n_ctx} tokens",
                           param="prompt", code="prompt_too_long")
        if len(ids) + max_tokens > n_ctx:
            raise APIError(400, f"this model's maximum context length is {n_ctx} tokens, but {where} "
                                f"({len(ids)} tokens) plus max_tokens ({max_tokens}) is {len(ids) + max_tokens}; "
                                f"reduce the prompt or max_tokens to at most {n_ctx - len(ids)}", param="max_tokens",
                           code="context_length_exceeded")


# ---------------------------------------------------------------------------------------------- tokens to text
@dataclass(frozen=True)
class TokenInfo:
    """One token as the API reports it: its text, where it starts in the choice's text, its log-probability and the
    top alternatives (text -> logprob). The first token of an echoed prompt has no log-probability (None)."""

    text: str
    offset: int
    logprob: float | None
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Delta:
    """What one choice adds at one step: new text, the tokens that start in it, and the finish reason on its last."""

    text: str
    tokens: tuple[TokenInfo, ...] = ()
    finish_reason: str | None = None


def token_text(tokenizer: Any, token: int) -> str:
    """A token's own text; a token that is only part of a UTF-8 character is shown as OpenAI does,
    `bytes:\\xe2\\x80`."""
    raw = tokenizer.decode_bytes([token])
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def token_start(decoder: codecs.IncrementalDecoder, raw: bytes) -> int:
    """How many characters the `decoder` will emit for earlier tokens' bytes before the text of the token `raw`.

    A token that completes a character started by the tokens before it starts at that character (0). But when the
    decoder holds the start of a character that `raw` does not continue, those bytes become U+FFFD first (1), and
    the token's own text starts after it.
    """
    held, _ = decoder.getstate()
    if not held or not raw:
        return 0
    strict = codecs.getincrementaldecoder("utf-8")()
    strict.setstate((held, 0))
    try:
        strict.decode(raw[:1])
    except UnicodeDecodeError:
        return 1  # the decoder only ever holds a valid incomplete prefix: it becomes one U+FFFD
    return 0


def score_prompt(model: torch.nn.Module, tokenizer: Any, ids: Sequence[int], top_logprobs: int,
                 token_names: Callable[[int], str] | None = None) -> tuple[TokenInfo, ...]:
    """The prompt's tokens with their log-probabilities (`generate.prompt_logprobs`), for `echo` with `logprobs`.

    Offsets index the prompt's decoded text, counted as `ChoiceText` counts a completion's: a token that ends inside a
    UTF-8 character adds no text until the token that completes it.
    """
    name = token_names or (lambda t: token_text(tokenizer, t))
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    infos, offset = [], 0
    for token, event in zip(ids, prompt_logprobs(model, ids, top_logprobs)):
        raw = tokenizer.decode_bytes([token])
        top = tuple((name(t), float(lp)) for t, lp in event.top_logprobs) if event is not None else ()
        start = offset + token_start(decoder, raw)
        infos.append(TokenInfo(name(token), start, float(event.logprob) if event is not None else None, top))
        offset += len(decoder.decode(raw))
    return tuple(infos)


class ChoiceText:
    """Turns one choice's token events into text deltas, with the text assembler of `generate.stream_text`.

    Text is decoded incrementally from the tokens' bytes, so a character split across two tokens appears whole with
    the second; text that might begin a stop string is held back until it can be told apart (`held_back`); a stop
    string ends the choice and is cut from the text, as in OpenAI's API. The end-of-text token ends the choice
    without text, but is reported like any token (its log-probability, and it counts in `num_tokens`), as OpenAI's
    API reports the token it sampled.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = (),
                 token_names: Callable[[int], str] | None = None) -> None:
        self._tokenizer = tokenizer
        self._stop = tuple(stop)
        self._longest_stop = max(map(len, self._stop), default=0)
        self._name = token_names or (lambda t: token_text(tokenizer, t))
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending: list[TokenInfo] = []
        self.text = ""  # decoded so far; text[:released] has been sent
        self.released = 0
        self.num_tokens = 0
        self.finish_reason: str | None = None

    def add(self, event: TokenEvent, eos_token_id: int | None) -> Delta | None:
        """Take one token event; return the text that can be sent now (None if nothing yet)."""
        if self.finish_reason is not None:
            return None
        if event.token == eos_token_id and event.finish_reason == "stop":
            self.text += self._decoder.decode(b"", final=True)  # a dangling partial character belongs before it
            self._record(event, len(self.text))
            return self.finish("stop")
        raw = self._tokenizer.decode_bytes([event.token])
        self._record(event, len(self.text) + token_start(self._decoder, raw))
        self.text += self._decoder.decode(raw)
        cut = self._find_stop()
        if cut is not None:
            self.text = self.text[:cut]
            return self.finish("stop", flush=False)
        if event.finish_reason is not None:
            return self.finish(event.finish_reason)
        return self._release(len(self.text) - held_back(self.text, self._stop))

    def finish(self, reason: str, flush: bool = True) -> Delta:
        """End the choice: send all text still held back (a dangling partial character becomes U+FFFD) with its
        tokens, and a token that adds no text at the very end (end-of-text). Tokens of a cut stop string are not
        reported."""
        if flush:
            self.text += self._decoder.decode(b"", final=True)
        self.finish_reason = reason
        delta = self._release(len(self.text), include_end=flush)
        self._pending = []
        return Delta(delta.text if delta else "", delta.tokens if delta else (), reason)

    def _record(self, event: TokenEvent, offset: int) -> None:
        self.num_tokens += 1
        top = tuple((self._name(t), float(lp)) for t, lp in event.top_logprobs)
        self._pending.append(TokenInfo(self._name(event.token), offset, float(event.logprob), top))

    def _find_stop(self) -> int | None:
        """Where the earliest stop string starts, searching only text that could hold one not yet seen."""
        if not self._stop:
            return None
        start = max(0, self.released - self._longest_stop + 1)
        cut = first_stop(self.text[start:], self._stop)
        return None if cut is None else start + cut

    def _release(self, upto: int, include_end: bool = False) -> Delta | None:
        """Send text[released:upto] with the tokens that start in it (and those that start at its end, if
        `include_end`)."""
        if upto <= self.released and not (include_end and self._pending):
            return None
        tokens = tuple(t for t in self._pending if t.offset < upto or (include_end and t.offset == upto))
        self._pending = self._pending[len(tokens):]
        text, self.released = self.text[self.released:upto], max(self.released, upto)
        return Delta(text, tokens)


# ------------------------------------------------------------------------------------------------ the batcher
@dataclass(eq=False)
class Row:
    """One choice on its way through the decode thread. `deliver` is called from that thread with each Delta, then
    None when the row is done (or an APIError if decoding failed); `cancelled` is set by the HTTP side. `tokens`
    holds the ids generated so far, so a row can be resumed alone if its batch fails."""

    prompt: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams
    generator: torch.Generator | None
    top_logprobs: int
    text: ChoiceText
    deliver: Callable[[Any], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    failed: bool = False

    @property
    def done(self) -> bool:
        return self.failed or self.cancelled.is_set() or self.text.finish_reason is not None


class BatchWorker:
    """One thread that decodes queued rows in batches with `generate.decode_steps`.

    A batch is formed from the rows waiting when the previous one ends (after `batch_wait_ms` of waiting if the
    queue held fewer than `max_batch_size`). Left padding makes a batch as long as its longest prompt plus its
    longest completion, so a row joins only if that still fits the context; otherwise it waits, first in line, for
    the next batch. A batch runs until all its rows are done: rows that arrive meanwhile wait for the next one.

    A failure stays in its row: an error while turning one row's tokens into text ends that row alone, and an error
    inside the batched decode re-runs each unfinished row alone from the tokens it already has, so only a row that
    fails by itself gets the error (a 500 for its request) and the others finish their text.
    """

    def __init__(self, model: torch.nn.Module, eos_token_id: int | None, max_batch_size: int, batch_wait_ms: float,
                 max_pending: int) -> None:
        self.model = model
        self.eos_token_id = eos_token_id
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait_ms / 1000
        self.max_pending = max_pending
        self.n_ctx = model.config.n_ctx
        self._queue: deque[Row] = deque()
        self._active = 0
        self._arriving = 0  # requests being read and parsed: their rows are about to be submitted
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.batches_run = 0  # statistics, read by tests and /health
        self.rows_run = 0
        self.tokens_decoded = 0
        self.largest_batch = 0

    def submit(self, rows: Sequence[Row]) -> None:
        with self._cond:
            if self._closed:
                raise APIError(503, "the server is shutting down", code="shutting_down")
            if len(self._queue) + self._active + len(rows) > self.max_pending:
                busy = len(self._queue) + self._active
                raise APIError(503, f"the server is busy ({busy} completions queued or running, limit "
                                    f"{self.max_pending}); retry shortly", code="overloaded")
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="gpt2lab-decode", daemon=True)
                self._thread.start()
            self._queue.extend(rows)
            self._cond.notify()

    @contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark a request as on its way (being read, parsed, tokenized) while the block runs: a batch about to start
        waits for it (up to 10 × batch_wait_ms), so requests sent together are decoded together even when parsing
        them takes longer than the batch window."""
        with self._cond:
            self._arriving += 1
        try:
            yield
        finally:
            with self._cond:
                self._arriving -= 1
                self._cond.notify()

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closed = True
            for row in self._queue:
                row.cancelled.set()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if batch:
                self._decode(batch)

    def _next_batch(self) -> list[Row] | None:
        with self._cond:
            while not self._queue and not self._closed:
                self._cond.wait()
            start = time.monotonic()
            while len(self._queue) < self.max_batch_size and not self._closed:
                waited = time.monotonic() - start
                limit = 10 * self.batch_wait if self._arriving else self.batch_wait
                if waited >= limit:
                    break
                self._cond.wait(limit - waited)
            if self._closed:
                return None
            batch, waiting, longest_prompt, longest_new = [], deque(), 0, 0
            for row in self._queue:
                if row.cancelled.is_set():
                    row.deliver(None)
                    continue
                prompt, new = max(longest_prompt, len(row.prompt)), max(longest_new, row.max_new_tokens)
                if len(batch) < self.max_batch_size and (not batch or prompt + new <= self.n_ctx):
                    batch.append(row)
                    longest_prompt, longest_new = prompt, new
                else:
                    waiting.append(row)
            self._queue = waiting
            self._active = len(batch)
            return batch

    def _decode(self, batch: list[Row]) -> None:
        self.batches_run += 1
        self.rows_run += len(batch)
        self.largest_batch = max(self.largest_batch, len(batch))
        try:
            try:
                self._run(batch)
            except Exception as e:  # one row may be the cause: each unfinished row continues alone
                if len(batch) == 1:
                    self._fail(batch[0], e)
                for row in batch:
                    if not row.done:
                        try:
                            self._run([row])
                        except Exception as e:
                            self._fail(row, e)
            for row in batch:
                if not row.failed:
                    row.deliver(None)
        finally:
            with self._cond:
                self._active = 0

    def _run(self, rows: list[Row]) -> None:
        """Decode `rows` together, each continuing after the tokens it already has, until all are done."""
        with torch.inference_mode():
            steps = decode_steps(self.model, [list(r.prompt) + r.tokens for r in rows],
                                 [r.max_new_tokens - len(r.tokens) for r in rows], [r.sampling for r in rows],
                                 eos_token_id=self.eos_token_id, generators=[r.generator for r in rows],
                                 top_logprobs=max(r.top_logprobs for r in rows), should_stop=lambda i: rows[i].done)
            for events in steps:
                for row, event in zip(rows, events):
                    if event is not None and not row.done:
                        self._accept(row, event)
        for row in rows:
            if not row.done:  # decode_steps ended it silently (no tokens left to generate)
                self._deliver(row, lambda r: r.text.finish("length"))

    def _accept(self, row: Row, event: TokenEvent) -> None:
        self.tokens_decoded += 1
        row.tokens.append(event.token)
        if row.top_logprobs < len(event.top_logprobs):
            event = dataclasses.replace(event, top_logprobs=list(event.top_logprobs[:row.top_logprobs]))
        self._deliver(row, lambda r: r.text.add(event, self.eos_token_id))

    def _deliver(self, row: Row, make_delta: Callable[[Row], Delta | None]) -> None:
        """Send the row's next delta; an error while making or sending it ends this row only."""
        try:
            delta = make_delta(row)
            if delta is not None:
                row.deliver(delta)
        except Exception as e:
            self._fail(row, e)

    def _fail(self, row: Row, error: Exception) -> None:
        row.failed = True
        log.error("a completion failed: %s: %s", type(error).__name__, error)
        try:
            row.deliver(APIError(500, f"generation failed: {type(error).__name__}: {error}",
                                 code="generation_failed"))
        except Exception:  # the row's own delivery is what failed: nobody can be told
            pass

    @property
    def idle(self) -> bool:
        with self._cond:
            return not self._queue and self._active == 0


# ------------------------------------------------------------------------------------------------ responses
def logprobs_object(tokens: Iterable[TokenInfo], base_offset: int, include_sampled: bool = True,
                    prompt: Sequence[TokenInfo] = ()) -> dict[str, Any]:
    """OpenAI's legacy logprobs: parallel lists of token texts, their logprobs, the top alternatives (plus the
    sampled token, so there may be k + 1) and each token's character offset in the choice's text.

    With `echo`, the `prompt` tokens come first (offsets from 0; the very first has null logprob and alternatives, as
    in OpenAI's API), then the completion's `tokens`, whose offsets start at `base_offset` (the echoed text's length).
    """
    tokens = [*prompt, *(dataclasses.replace(t, offset=base_offset + t.offset) for t in tokens)]
    top: list[dict[str, float] | None] = []
    for t in tokens:
        if t.logprob is None:
            top.append(None)
            continue
        alternatives = dict(t.top)
        if include_sampled:
            alternatives.setdefault(t.text, t.logprob)
        top.append(alternatives)
    return {"tokens": [t.text for t in tokens], "token_logprobs": [t.logprob for t in tokens], "top_logprobs": top,
            "text_offset": [t.offset for t in tokens]}


def sse(data: Any) -> str:
    """One server-sent event carrying a JSON object (or the literal `[DONE]`)."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


class EventStream(StreamingResponse):
    """A server-sent-event response that runs `on_close` however it ends: finished, failed or client gone."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


class Completion:
    """One request in flight: its rows, and the asyncio queue their deltas arrive on, as (choice index, item)."""

    def __init__(self, request: CompletionRequest, make_row: Callable[[int, Callable[[Any], None]], Row]) -> None:
        self.request = request
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self.rows = [make_row(i, self._deliverer(i)) for i in range(request.num_choices)]

    def _deliverer(self, index: int) -> Callable[[Any], None]:
        def deliver(item: Any) -> None:  # called on the decode thread
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, item))
            except RuntimeError:  # the event loop has closed (server shutdown): nobody is listening any more
                pass
        return deliver

    def cancel(self) -> None:
        for row in self.rows:
            row.cancelled.set()

    async def deltas(self, live: Sequence[int]) -> AsyncIterator[tuple[int, Delta]]:
        """Deltas of the rows in `live` as they come; raises the APIError of a failed batch."""
        remaining = set(live)
        while remaining:
            index, item = await self.queue.get()
            if isinstance(item, APIError):
                raise item
            if item is None:
                remaining.discard(index)
            else:
                yield index, item


# --------------------------------------------------------------------------------------------------- the app
class CompletionServer:
    """The endpoints, holding the model, tokenizer, config and decode thread. `create_app` wires it into Starlette."""

    def __init__(self, model: torch.nn.Module, tokenizer: Any, config: ServerConfig) -> None:
        if tokenizer.vocab_size > model.config.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                             f"{model.config.vocab_size}; serve a model with its own tokenizer")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.n_ctx = model.config.n_ctx
        self.created = int(time.time())
        self.worker = BatchWorker(model, tokenizer.eot_token, config.max_batch_size, config.batch_wait_ms,
                                  config.max_pending)
        self.token_bytes = max_token_bytes(tokenizer)
        self._names: dict[int, str] = {}

    # ------------------------------------------------------------------------------------------- endpoints
    async def playground(self, request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    async def health(self, request: Request) -> Response:
        w = self.worker
        return JSONResponse({"status": "ok", "model": self.config.model_id, "batches": w.batches_run,
                             "rows": w.rows_run, "tokens": w.tokens_decoded, "largest_batch": w.largest_batch,
                             "idle": w.idle})

    async def list_models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def get_model(self, request: Request) -> Response:
        self._authorize(request)
        name = request.path_params["model_id"]
        if name != self.config.model_id:
            raise APIError(404, f"model {name!r} is not served here; available: {self.config.model_id!r}",
                           param="model", code="model_not_found")
        return JSONResponse(self._model_card())

    async def completions(self, request: Request) -> Response:
        self._authorize(request)
        _require_json(request)
        body = await read_json(request, self.config.max_request_bytes, self.config.body_timeout_s)
        with self.worker.arriving():  # only once the body is in: a slow upload must not hold other batches back
            req = await run_in_threadpool(parse_completion_request, body, self.tokenizer, self.n_ctx, self.config,
                                          self.token_bytes)
            completion = Completion(req, self._make_row(req))
            live = [i for i, row in enumerate(completion.rows) if row.max_new_tokens > 0]
            self.worker.submit([completion.rows[i] for i in live])
        prompts: list[tuple[TokenInfo, ...]] = []
        if req.echo and req.logprobs is not None:  # scored here, while the decode thread already generates
            try:
                prompts = await run_in_threadpool(self._score_prompts, req)
            except BaseException:
                completion.cancel()
                raise
        if req.stream:
            return EventStream(self._stream(completion, live, prompts), on_close=completion.cancel)
        collect = asyncio.ensure_future(self._collect(completion, live, prompts))
        gone = asyncio.ensure_future(_wait_for_disconnect(request))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            completion.cancel()
            gone.cancel()
        if not collect.done():  # the client left: stop its rows and answer no one
            collect.cancel()
            return Response(status_code=499)
        return JSONResponse(collect.result())

    # ------------------------------------------------------------------------------------------- helpers
    def _authorize(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if not header:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                           code="invalid_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.config.api_key.encode()):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    def _model_card(self) -> dict[str, Any]:
        cfg = self.model.config
        return {"id": self.config.model_id, "object": "model", "created": self.created, "owned_by": "gpt2lab",
                "context_length": self.n_ctx,
                "limits": {"max_tokens": min(self.config.max_tokens or self.n_ctx, self.n_ctx),
                           "max_logprobs": self.config.max_logprobs, "max_choices": self.config.max_choices,
                           "max_stop": self.config.max_stop, "max_request_bytes": self.config.max_request_bytes,
                           "max_batch_size": self.config.max_batch_size},
                "architecture": {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
                                 "vocab_size": cfg.vocab_size}}

    def _token_name(self, token: int) -> str:
        name = self._names.get(token)
        if name is None:
            name = self._names[token] = token_text(self.tokenizer, token)
        return name

    def _make_row(self, req: CompletionRequest) -> Callable[[int, Callable[[Any], None]], Row]:
        device = next(self.model.parameters()).device

        def make(index: int, deliver: Callable[[Any], None]) -> Row:
            generator = None
            if req.seed is not None and not req.sampling.greedy:
                # A seeded choice has its own generator, so it gives the same text whatever else shares its batch;
                # choice i of n uses seed + i, so the n choices differ. Unseeded rows share torch's default
                # generator, which lets decode_steps sample the whole batch in one call.
                generator = torch.Generator(device=device).manual_seed((req.seed + index) % 2**63)
            return Row(prompt=req.prompts[index // req.n], max_new_tokens=req.max_tokens, sampling=req.sampling,
                       generator=generator, top_logprobs=req.logprobs or 0,
                       text=ChoiceText(self.tokenizer, req.stop, self._token_name), deliver=deliver)
        return make

    def _header(self) -> dict[str, Any]:
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.config.model_id}

    def _usage(self, completion: Completion) -> dict[str, int]:
        prompt_tokens = sum(len(p) for p in completion.request.prompts)
        completion_tokens = sum(row.text.num_tokens for row in completion.rows)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def _echo(self, req: CompletionRequest, index: int) -> str:
        return req.prompt_texts[index // req.n] if req.echo else ""

    def _score_prompts(self, req: CompletionRequest) -> list[tuple[TokenInfo, ...]]:
        """Each prompt's tokens with their log-probabilities (one forward per prompt, shared by its n choices)."""
        return [score_prompt(self.model, self.tokenizer, ids, req.logprobs or 0, self._token_name)
                for ids in req.prompts]

    async def _collect(self, completion: Completion, live: Sequence[int],
                       prompts: Sequence[tuple[TokenInfo, ...]] = ()) -> dict[str, Any]:
        req = completion.request
        texts = [self._echo(req, i) for i in range(req.num_choices)]
        tokens: list[list[TokenInfo]] = [[] for _ in range(req.num_choices)]
        async for index, delta in completion.deltas(live):
            texts[index] += delta.text
            tokens[index].extend(delta.tokens)
        choices = []
        for i, row in enumerate(completion.rows):
            logprobs = None
            if req.logprobs is not None:
                prompt = prompts[i // req.n] if prompts else ()
                logprobs = logprobs_object(tokens[i], len(self._echo(req, i)), prompt=prompt)
            choices.append({"text": texts[i], "index": i, "logprobs": logprobs,
                            "finish_reason": row.text.finish_reason or "length"})
        return {**self._header(), "choices": choices, "usage": self._usage(completion)}

    async def _stream(self, completion: Completion, live: Sequence[int],
                      prompts: Sequence[tuple[TokenInfo, ...]] = ()) -> AsyncIterator[str]:
        req = completion.request
        header = self._header()
        empty_logprobs = logprobs_object([], 0) if req.logprobs is not None else None

        def chunk(index: int, text: str, logprobs: Any, finish_reason: str | None) -> str:
            return sse({**header, "choices": [{"text": text, "index": index, "logprobs": logprobs,
                                               "finish_reason": finish_reason}]})
        for i in range(req.num_choices):
            if req.echo:  # the prompt first, with its tokens' log-probabilities when asked
                echoed = logprobs_object([], 0, prompt=prompts[i // req.n]) if prompts else empty_logprobs
                yield chunk(i, self._echo(req, i), echoed, None)
            if i not in live:  # max_tokens = 0: nothing to generate
                yield chunk(i, "", empty_logprobs, "length")
        try:
            async for index, delta in completion.deltas(live):
                logprobs = None
                if req.logprobs is not None:
                    logprobs = logprobs_object(delta.tokens, len(self._echo(req, index)))
                yield chunk(index, delta.text, logprobs, delta.finish_reason)
        except APIError as e:
            yield sse(e.to_dict())
        if req.include_usage:
            yield sse({**header, "choices": [], "usage": self._usage(completion)})
        yield sse("[DONE]")


async def _wait_for_disconnect(request: Request) -> None:
    """Return when the client hangs up. The body has been read, so the next ASGI message is the disconnect."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _require_json(request: Request) -> None:
    """415 unless the body is declared JSON. A web page can send a cross-origin POST without asking first only as
    text/plain or a form; requiring application/json makes the browser ask (a CORS preflight), which we never grant."""
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise APIError(415, f"the request's Content-Type is {media_type or 'missing'!r}; send the JSON body with "
                            "'Content-Type: application/json'", code="unsupported_media_type")


async def read_json(request: Request, limit: int, timeout_s: float | None = None) -> Any:
    """The request body as JSON, refusing more than `limit` bytes (413), a body still arriving after `timeout_s`
    seconds (408) and anything that is not JSON (400)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"request body is {int(declared)} bytes; the limit is {limit}", code="request_too_large")
    try:
        async with asyncio.timeout(timeout_s):
            raw = await _read_body(request, limit)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s", code="request_timeout") from None
    if not raw.strip():
        raise APIError(400, "the request body is empty; send a JSON object such as {\"prompt\": \"Hello\"}",
                       code="invalid_json")
    try:
        return json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise APIError(400, f"the request body nests more than {MAX_JSON_DEPTH} levels deep",
                       code="invalid_json") from None


async def _read_body(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def create_app(model: torch.nn.Module, tokenizer: Any, config: ServerConfig | None = None) -> Starlette:
    """The ASGI app serving `model` with `tokenizer`. Run it with uvicorn, `BackgroundServer`, or `serve`."""
    server = CompletionServer(model, tokenizer, config or ServerConfig())

    async def api_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, APIError)
        return error_response(exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        messages = {404: f"no route {request.url.path!r}; see GET /v1/models and POST /v1/completions",
                    405: f"method {request.method} is not allowed on {request.url.path}"}
        message = messages.get(exc.status_code, str(exc.detail))
        return error_response(APIError(exc.status_code, message))

    async def server_error(request: Request, exc: Exception) -> Response:
        return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error"))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(server.worker.close)

    routes = [
        Route("/", server.playground, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/v1/models", server.list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", server.get_model, methods=["GET"]),
        Route("/v1/completions", server.completions, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    cfg = server.config
    guard = Middleware(BrowserGuard, allowed_hosts=cfg.allowed_hosts, allowed_origins=cfg.allowed_origins,
                       error_body=lambda status, code, message: APIError(status, message, code=code).to_dict())
    app = Starlette(routes=routes, lifespan=lifespan, middleware=[guard],
                    exception_handlers={APIError: api_error, HTTPException: http_error, Exception: server_error})
    app.state.server = server
    return app


def uvicorn_config(app: Starlette, host: str, port: int, log_level: str, **kwargs: Any) -> Any:
    """uvicorn's Config for an app from `create_app`, with the connection limits of its ServerConfig: uvicorn's own
    keep-alive timeout and request limit, and `GuardedH11Protocol` for the header deadline and connection cap. The
    listen backlog is also what asyncio accepts in one go, so it is kept to `max_connections`: a burst of
    connections cannot take more file descriptors than the cap allows before the cap closes them."""
    import uvicorn

    cfg: ServerConfig = app.state.server.config
    protocol = functools.partial(GuardedH11Protocol, header_timeout_s=cfg.header_timeout_s,
                                 max_connections=cfg.max_connections)
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol, lifespan="on",
                          limit_concurrency=cfg.max_connections, timeout_keep_alive=cfg.keep_alive_s,
                          backlog=min(2048, cfg.max_connections), **kwargs)


# --------------------------------------------------------------------------------------------- running it
class BackgroundServer:
    """uvicorn serving an app from a daemon thread: for tests, benchmarks and notebooks.

        with BackgroundServer(app) as server:   # port 0 picks a free port
            requests.get(server.url + "/v1/models")
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        import uvicorn

        self._server = uvicorn.Server(uvicorn_config(app, host, port, log_level, timeout_graceful_shutdown=2))
        self._thread = threading.Thread(target=self._server.run, name="gpt2lab-uvicorn", daemon=True)
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"the server did not start on {self.host}:{self.port} within {timeout:g} s")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def load_app(model: str, dtype: str = "fp32", config: ServerConfig | None = None, model_name: str | None = None,
             tokenizer: str | None = None) -> Starlette:
    """Load a model directory (or a hub name such as "gpt2") with its tokenizer and build the app.

    The tokenizer is `tokenizer` if given, else the directory's own, else GPT-2's for a GPT-2-vocabulary model (see
    `generate.load_for_inference`). The served id is `model_name`, else the hub name or the directory's name.
    """
    from gpt2lab.generate import load_for_inference

    network, tok = load_for_inference(model, dtype, tokenizer)
    name = model_name or (Path(model).resolve().name if Path(model).is_dir() else model)
    return create_app(network, tok, dataclasses.replace(config or ServerConfig(), model_id=name))


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, dtype: str = "fp32",
          config: ServerConfig | None = None, model_name: str | None = None, tokenizer: str | None = None,
          log_level: str = "info") -> None:
    """Load `model` and serve it until interrupted (Ctrl-C). Binds to localhost unless `host` says otherwise.

    The port is taken before the model is loaded, so a port in use (OSError) costs nothing. Repeated log messages
    are held to one line per 10 s (see `server_net.RepeatFilter`).
    """
    import uvicorn

    if log_level not in LOG_LEVELS:
        raise ValueError(f"unknown log level {log_level!r}; choose one of: {', '.join(LOG_LEVELS)}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an integer in [0, 65535] (0: any free port), got {port!r}")
    sock = bind_socket(host, port, backlog=min(2048, (config or ServerConfig()).max_connections))
    try:
        app = load_app(model, dtype, config, model_name, tokenizer)
        server = uvicorn.Server(uvicorn_config(app, host, port, log_level, timeout_graceful_shutdown=5))
        quiet_repeats()  # after uvicorn has configured its loggers
        bound = f"[{host}]" if ":" in host else host
        # uvicorn announces the address only when it binds the socket itself; it is listening already
        logging.getLogger("uvicorn.error").info("Uvicorn running on http://%s:%d (Press CTRL+C to quit)", bound,
                                                sock.getsockname()[1])
        server.run(sockets=[sock])
    finally:
        sock.close()
