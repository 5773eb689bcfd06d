"""The ASGI app: the endpoints (`CompletionServer`) wired into Starlette by `create_app`. Requests are validated
(`request`), their choices queued as rows on the decode thread (`batcher`), and the deltas sent back as JSON or
server-sent events."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

import torch

try:
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles
except ImportError as e:  # pragma: no cover - exercised only without the extra installed
    raise ImportError(f"serving needs starlette and uvicorn ({e}); "
                      "install them with: pip install 'gpt2lab[serve]'") from e

from gpt2lab import checks
from gpt2lab.generate import vocab_limit_for
from gpt2lab.serve.batcher import BatchWorker, Row
from gpt2lab.serve.choices import ChoiceText, Delta, TokenInfo, logprobs_object, score_prompt, token_text
from gpt2lab.serve.config import ServerConfig
from gpt2lab.serve.errors import APIError
from gpt2lab.serve.net import BrowserGuard
from gpt2lab.serve.request import MAX_JSON_DEPTH, CompletionRequest, max_token_bytes, parse_completion_request

STATIC_DIR = Path(__file__).parent / "static"


def error_response(error: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.to_dict(), status_code=error.status, headers=headers)


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
                                  config.max_pending, vocab_limit_for(model, tokenizer))
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
                # choice i of n uses seed + i (past MAX_SEED it wraps to 0), so the n choices differ. Unseeded rows
                # share torch's default generator, which lets decode_steps sample the whole batch in one call.
                generator = torch.Generator(device=device).manual_seed((req.seed + index) % (checks.MAX_SEED + 1))
            return Row(prompt=req.prompts[index // req.n], max_new_tokens=req.max_tokens, sampling=req.sampling,
                       generator=generator, top_logprobs=req.logprobs or 0,
                       text=ChoiceText(self.tokenizer, req.stop, self._token_name), deliver=deliver,
                       logprobs=req.logprobs is not None)
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
