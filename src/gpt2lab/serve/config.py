"""What one server allows and how it batches: `ServerConfig`, whose fields `gpt2lab serve` sets from its flags."""

from __future__ import annotations

from dataclasses import dataclass

from gpt2lab import checks

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


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
            checks.integer(f"ServerConfig.{name}", getattr(self, name), low=1)
        checks.integer("ServerConfig.max_connections", self.max_connections, low=2)
        for name in ("header_timeout_s", "body_timeout_s", "keep_alive_s"):
            checks.number(f"ServerConfig.{name}", getattr(self, name), 0, 3600, low_open=True, note="seconds")
        for name in ("allowed_hosts", "allowed_origins"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"ServerConfig.{name} must be a tuple of non-empty strings, got {value!r}")
        if not self.allowed_hosts:
            raise ValueError("ServerConfig.allowed_hosts is empty; list the host names to answer to, or '*' for any")
        checks.integer("ServerConfig.max_logprobs", self.max_logprobs, low=0)
        if self.max_tokens is not None:
            checks.integer("ServerConfig.max_tokens", self.max_tokens, low=1, note="None: the model's context")
        checks.number("ServerConfig.batch_wait_ms", self.batch_wait_ms, 0, 1000, note="milliseconds")
