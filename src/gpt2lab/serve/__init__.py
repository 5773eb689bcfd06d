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
error object, work is bounded before it is done, and `net` times out and caps slow or idle connections and
refuses requests a web page could forge against a local server.

Endpoints: `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/completions` (OpenAI's legacy completions, the right
API for a base model; GPT-2 is not a chat model), `GET /health`, and the playground at `/`. Errors are OpenAI-style
objects, `{"error": {"message", "type", "param", "code"}}`, with the HTTP status that fits (see docs/serving.md).

    >>> app = create_app(model, tokenizer, ServerConfig(model_id="tiny"))
    >>> with BackgroundServer(app) as server:           # uvicorn on 127.0.0.1, a free port
    ...     openai.OpenAI(base_url=server.url + "/v1", api_key="-").completions.create(model="tiny", prompt="Hi")

The modules, each importing only those above it in this list:

    config     ServerConfig: what one server allows and how it batches
    errors     APIError: an OpenAI-style error object with its HTTP status
    request    parse_completion_request: a JSON body -> a validated, tokenized CompletionRequest
    choices    ChoiceText: one choice's tokens -> text deltas, offsets, logprobs (generate's text assembler)
    batcher    BatchWorker: the decode thread, rows decoded together with generate.decode_steps
    net        the network edge: header deadline, connection cap, browser guard, log flood filter
    app        create_app: the endpoints in a Starlette app
    run        uvicorn_config, BackgroundServer, load_app, serve
"""

from gpt2lab.serve.app import STATIC_DIR, CompletionServer, create_app
from gpt2lab.serve.batcher import BatchWorker, Row
from gpt2lab.serve.choices import ChoiceText, Delta, TokenInfo, logprobs_object, score_prompt, token_text
from gpt2lab.serve.config import LOOPBACK_HOSTS, ServerConfig
from gpt2lab.serve.errors import APIError
from gpt2lab.serve.request import CompletionRequest, max_token_bytes, parse_completion_request
from gpt2lab.serve.run import LOG_LEVELS, BackgroundServer, load_app, serve, uvicorn_config

__all__ = ["APIError", "BackgroundServer", "BatchWorker", "ChoiceText", "CompletionRequest", "CompletionServer",
           "Delta", "LOG_LEVELS", "LOOPBACK_HOSTS", "Row", "STATIC_DIR", "ServerConfig", "TokenInfo", "create_app",
           "load_app", "logprobs_object", "max_token_bytes", "parse_completion_request", "score_prompt", "serve",
           "token_text", "uvicorn_config"]
