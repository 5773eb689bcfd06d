"""Running the app: uvicorn's configuration with the server's connection limits, `BackgroundServer` (a thread, for
tests and notebooks), and `load_app` / `serve`, which load a model directory the way `gpt2lab serve` does."""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn

from starlette.applications import Starlette

from gpt2lab import checks
from gpt2lab.inference import load_for_inference
from gpt2lab.serve.app import create_app
from gpt2lab.serve.config import ServerConfig
from gpt2lab.serve.net import GuardedH11Protocol, bind_socket, quiet_repeats


def uvicorn_config(app: Starlette, host: str, port: int, log_level: str, **kwargs: Any) -> Any:
    """uvicorn's Config for an app from `create_app`, with the connection limits of its ServerConfig: uvicorn's own
    keep-alive timeout and request limit, and `GuardedH11Protocol` for the header deadline and connection cap. The
    listen backlog is also what asyncio accepts in one go, so it is kept to `max_connections`: a burst of
    connections cannot take more file descriptors than the cap allows before the cap closes them."""
    cfg: ServerConfig = app.state.server.config
    protocol = functools.partial(GuardedH11Protocol, header_timeout_s=cfg.header_timeout_s,
                                 max_connections=cfg.max_connections)
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=protocol, lifespan="on",
                          limit_concurrency=cfg.max_connections, timeout_keep_alive=cfg.keep_alive_s,
                          backlog=min(2048, cfg.max_connections), **kwargs)


class BackgroundServer:
    """uvicorn serving an app from a daemon thread: for tests, benchmarks and notebooks.

        with BackgroundServer(app) as server:   # port 0 picks a free port
            requests.get(server.url + "/v1/models")
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
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
    network, tok = load_for_inference(model, dtype, tokenizer)
    name = model_name or (Path(model).resolve().name if Path(model).is_dir() else model)
    return create_app(network, tok, dataclasses.replace(config or ServerConfig(), model_id=name))


LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, dtype: str = "fp32",
          config: ServerConfig | None = None, model_name: str | None = None, tokenizer: str | None = None,
          log_level: str = "info") -> None:
    """Load `model` and serve it until interrupted (Ctrl-C). Binds to localhost unless `host` says otherwise.

    The port is taken before the model is loaded, so a port in use (OSError) costs nothing. Repeated log messages
    are held to one line per 10 s (see `net.RepeatFilter`).
    """
    if log_level not in LOG_LEVELS:
        raise ValueError(f"unknown log level {log_level!r}; choose one of: {', '.join(LOG_LEVELS)}")
    checks.integer("port", port, 0, 65535, note="0: any free port")
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
