"""The playground page in a real browser: headless Chromium (Debian's package) driven by Playwright.

It loads `/`, types a prompt, presses Greedy, watches the text stream in, and checks the result against the API's
greedy completion for the same settings; hovering a token must show its alternatives; Stop must end the request on
the server. A screenshot is kept as an artifact (in $GPT2LAB_ARTIFACTS_DIR when set, else the test's tmp_path).

Chromium comes from Debian (`.ci/install-browser`); Playwright's own browser download is never used. Without
chromium the test skips on a developer machine, but fails in CI (CI=true), where a skip would hide a broken page.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest
import torch

from gpt2lab import GPT, GPTConfig
from gpt2lab.serve import BackgroundServer, ServerConfig, create_app

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STEP_SECONDS = 0.02  # the model is slowed down so that streaming is observable


def find_chromium() -> str | None:
    """Debian's chromium, when it and the playwright package are both installed; else None."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return None
    return os.environ.get("GPT2LAB_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


CHROMIUM = find_chromium()
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
MISSING = "headless browser test needs Debian's chromium and the playwright package (.ci/install-browser)"
pytestmark = pytest.mark.skipif(CHROMIUM is None and not IN_CI, reason=MISSING)


@pytest.fixture(scope="module")
def served():
    """A tiny random-weight model with GPT-2's tokenizer, slowed to ~20 ms a step, served on 127.0.0.1."""
    from gpt2lab.tokenizer import Tokenizer

    torch.manual_seed(7)
    model = GPT(GPTConfig(vocab_size=50257, n_ctx=128, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        model.wte.weight.normal_(0.0, 0.6)
    model.register_forward_pre_hook(lambda module, args: time.sleep(STEP_SECONDS))
    app = create_app(model, Tokenizer.gpt2(), ServerConfig(model_id="tiny-playground", batch_wait_ms=0))
    with BackgroundServer(app) as server:
        yield server, app.state.server.worker


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One headless Chromium for the module, with a fresh profile directory."""
    if CHROMIUM is None:  # only reached in CI, where the skip marker is off: a skip there would hide a broken page
        pytest.fail(MISSING + "; CI must run it")
    executable = CHROMIUM
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(str(tmp_path_factory.mktemp("chromium-profile")),
                                                       executable_path=executable, headless=True, args=CHROMIUM_FLAGS,
                                                       viewport={"width": 1280, "height": 760})
        context.set_default_timeout(30_000)
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser):
    tab = browser.new_page()
    try:
        yield tab
    finally:
        tab.close()


def artifact_path(tmp_path: Path, name: str) -> Path:
    directory = Path(os.environ.get("GPT2LAB_ARTIFACTS_DIR") or tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    return directory / name


def test_greedy_generation_in_the_page_streams_and_matches_the_api(served, page, tmp_path):
    server, _ = served
    page.goto(server.url + "/")
    page.wait_for_function("document.getElementById('model-info').textContent.includes('tiny-playground')")
    prompt = "The playground shows"
    page.fill("#prompt", prompt)
    page.fill("#max-tokens", "24")
    page.fill("#top-k", "40")
    page.click("#greedy")
    # streaming: tokens are on the page while the request is still running
    page.wait_for_function("document.querySelectorAll('#completion .tok').length >= 3 "
                           "&& document.body.dataset.state === 'generating'")
    page.wait_for_selector("body[data-state=done]")
    shown = page.evaluate("document.getElementById('completion').textContent")

    api = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "model": "tiny-playground", "prompt": prompt, "max_tokens": 24, "temperature": 0, "top_k": 40, "top_p": 1,
        "logprobs": 5}).json()
    assert shown == api["choices"][0]["text"]
    assert page.text_content("#prompt-echo") == prompt
    spans = page.locator("#completion .tok")
    assert spans.count() == api["usage"]["completion_tokens"] == 24
    assert "Done: 24 tokens" in page.text_content("#status")
    colours = {spans.nth(i).evaluate("e => getComputedStyle(e).backgroundColor") for i in range(spans.count())}
    assert colours and "rgba(0, 0, 0, 0)" not in colours  # every token is coloured by its probability

    spans.nth(2).hover()
    tooltip = page.locator("#tooltip")
    tooltip.wait_for(state="visible")
    rows = tooltip.locator("tr")
    assert 5 <= rows.count() <= 6 and tooltip.locator("tr.is-chosen").count() == 1
    assert "%" in tooltip.text_content()
    page.screenshot(path=str(artifact_path(tmp_path, "playground.png")))


def test_stop_button_ends_the_request_on_the_server(served, page):
    server, worker = served
    page.goto(server.url + "/")
    page.fill("#prompt", "A long text that we interrupt")
    page.fill("#max-tokens", "100")
    page.click("#greedy")
    page.wait_for_function("document.querySelectorAll('#completion .tok').length >= 2")
    before = worker.tokens_decoded
    page.click("#stop-button")
    page.wait_for_selector("body[data-state=stopped]")
    deadline = time.monotonic() + 10
    while not worker.idle and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.idle
    assert worker.tokens_decoded - before < 50  # the row was retired long before its 100 tokens
    assert "Stopped" in page.text_content("#status")


def test_server_errors_are_shown_in_the_page(served, page):
    server, _ = served
    page.goto(server.url + "/")
    page.fill("#prompt", "x")
    page.fill("#max-tokens", "100000")
    page.click("#greedy")  # the button bypasses the form's own checks, so the server's message is shown
    page.wait_for_selector("body[data-state=error]")
    assert "max_tokens" in page.text_content("#status")
