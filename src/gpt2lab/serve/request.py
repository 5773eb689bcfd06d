"""Request validation: a `/v1/completions` JSON body becomes a `CompletionRequest`, or an `APIError` naming the first
problem. Work is bounded before it is done: a prompt's length is judged before it is tokenized."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

from gpt2lab import checks
from gpt2lab.sampling import SamplingParams
from gpt2lab.serve.config import ServerConfig
from gpt2lab.serve.errors import APIError

# OpenAI's legacy completions fields, then our extensions (top_k, repetition_penalty: vLLM offers the same two).
KNOWN_FIELDS = ("model", "prompt", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "logprobs",
                "echo", "stop", "seed", "suffix", "presence_penalty", "frequency_penalty", "best_of", "logit_bias",
                "user", "top_k", "repetition_penalty")


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


def _checked(name: str, check: Callable[..., Any], value: Any, *args: Any, **kwargs: Any) -> Any:
    """`check` (one of gpt2lab.checks) on the field `name`, its ValueError turned into a 400 that names the field."""
    try:
        return check(f"'{name}'", value, *args, **kwargs)
    except ValueError as e:
        raise _invalid(name, str(e)) from None


def _get_int(body: Mapping[str, Any], name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name)
    return default if value is None else _checked(name, checks.integer, value, low, high)


def _get_number(body: Mapping[str, Any], name: str, default: float | None, low: float, high: float,
                low_open: bool = False) -> float | None:
    value = body.get(name)
    return default if value is None else _checked(name, checks.number, value, low, high, low_open=low_open)


def _get_bool(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    return False if value is None else _checked(name, checks.flag, value)


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
    repetition_penalty = _get_number(body, "repetition_penalty", 1.0, 0.01, 10.0)
    n = _get_int(body, "n", 1, 1, config.max_choices)
    best_of = _get_int(body, "best_of", n, 1, config.max_choices)
    if best_of != n:
        raise _invalid("best_of", f"'best_of' other than n is not supported (got best_of={best_of}, n={n})",
                       code="unsupported")
    if len(prompts) * n > config.max_choices:
        raise _invalid("n", f"{len(prompts)} prompt(s) × n={n} asks for {len(prompts) * n} completions; "
                            f"this server allows at most {config.max_choices} per request")
    logprobs = _get_int(body, "logprobs", None, 0, config.max_logprobs)
    seed = _get_int(body, "seed", None, 0, checks.MAX_SEED)
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
