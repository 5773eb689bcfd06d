"""The completions server: OpenAI protocol (checked with the official `openai` client), batching, disconnects, errors.

The model is a tiny random-weight GPT-2 with GPT-2's real tokenizer, so prompts, byte-level tokens and multi-token
characters behave as in production. Its embedding is scaled up so the next-token distribution is peaked: greedy
choices then have clear margins, and batched and one-at-a-time decoding must agree token for token. The oracle for
greedy output is a plain loop over full forward passes, independent of generate.py.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
import torch

from gpt2lab import GPT, GPTConfig
from gpt2lab.generate import TokenEvent
from gpt2lab.serve import (APIError, BackgroundServer, ChoiceText, ServerConfig, create_app,
                            parse_completion_request)

openai = pytest.importorskip("openai")  # in the `test` extra; importorskip only keeps a bare checkout importable

MODEL_ID = "tiny-gpt2"
N_CTX = 64


# ------------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tokenizer():
    from gpt2lab.tokenizer import Tokenizer

    return Tokenizer.gpt2()


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(1234)
    net = GPT(GPTConfig(vocab_size=50257, n_ctx=N_CTX, n_layer=2, n_head=2, n_embd=32)).eval()
    with torch.no_grad():
        net.wte.weight.normal_(0.0, 0.6)  # peaked logits: clear greedy margins, varied text
    return net


@pytest.fixture(scope="module")
def server(model, tokenizer):
    app = create_app(model, tokenizer, ServerConfig(model_id=MODEL_ID, max_batch_size=4, batch_wait_ms=30,
                                                    max_request_bytes=20_000))
    with BackgroundServer(app) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(server, body, headers=None, **kwargs) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    headers = {"Content-Type": "application/json", **(headers or {})}
    return httpx.post(server.url + "/v1/completions", content=content, timeout=60, headers=headers, **kwargs)


def greedy_reference(model: GPT, ids: list[int], max_new_tokens: int, eos: int = 50256
                     ) -> tuple[list[int], list[float]]:
    """Greedy decoding the slow, obvious way: a full forward pass per token. Returns tokens and their logprobs."""
    ids, out, logprobs = list(ids), [], []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            lp = torch.log_softmax(model(torch.tensor([ids]))[0, -1].float(), dim=-1)  # (V,)
            token = int(lp.argmax())
            if token == eos:
                break
            out.append(token)
            logprobs.append(float(lp[token]))
            ids.append(token)
    return out, logprobs


# --------------------------------------------------------------------------------------------- the protocol
def test_models_endpoint_lists_the_served_model(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    card = httpx.get(f"{server.url}/v1/models/{MODEL_ID}").json()
    assert card["context_length"] == N_CTX and card["limits"]["max_tokens"] == N_CTX


def test_greedy_completion_matches_reference_loop(client, model, tokenizer):
    prompt = "The quick brown fox"
    result = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=12, temperature=0)
    tokens, _ = greedy_reference(model, tokenizer.encode(prompt), 12)
    choice = result.choices[0]
    assert choice.text == tokenizer.decode(tokens)
    assert choice.finish_reason == ("length" if len(tokens) == 12 else "stop")
    assert result.usage.prompt_tokens == len(tokenizer.encode(prompt))
    assert result.usage.completion_tokens == len(tokens) + (choice.finish_reason == "stop")  # end-of-text counts
    assert result.usage.total_tokens == result.usage.prompt_tokens + result.usage.completion_tokens
    assert result.object == "text_completion" and result.model == MODEL_ID and result.id.startswith("cmpl-")


def test_streamed_completion_equals_plain_one(client):
    kwargs = dict(model=MODEL_ID, prompt="Once upon a time", max_tokens=20, temperature=0)
    plain = client.completions.create(**kwargs).choices[0]
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert len([c for c in chunks if c.choices]) > 2  # it really streamed, piece by piece
    assert text == plain.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == plain.finish_reason and not any(finishes[:-1])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20


def test_streamed_choices_interleave_by_index(client):
    kwargs = dict(model=MODEL_ID, prompt=["One", "Two"], max_tokens=6, temperature=0)
    plain = [c.text for c in client.completions.create(**kwargs).choices]
    texts = ["", ""]
    for chunk in client.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert texts == plain


def test_stream_ends_with_done_event(server):
    with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                      json={"prompt": "Hi", "max_tokens": 3, "temperature": 0, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_logprobs_zero_still_reports_each_chosen_tokens_logprob(client, model, tokenizer):
    """logprobs=0 asks for no alternatives but for the chosen tokens' log-probabilities, which the decode loop then
    computes (a request without `logprobs` lets it skip them)."""
    prompt = "Hello there"
    result = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=5, temperature=0, logprobs=0)
    _, logprobs = greedy_reference(model, tokenizer.encode(prompt), 5)
    assert result.choices[0].logprobs.token_logprobs == pytest.approx(logprobs, abs=1e-4)
    assert client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=5, temperature=0).choices[0].logprobs \
        is None


def test_logprobs_are_the_models_and_offsets_index_the_text(client, model, tokenizer):
    prompt = "Hello there"
    result = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=8, temperature=0, logprobs=3)
    lp = result.choices[0].logprobs
    tokens, logprobs = greedy_reference(model, tokenizer.encode(prompt), 8)
    assert len(lp.tokens) == len(tokens) == result.usage.completion_tokens
    assert lp.token_logprobs == pytest.approx(logprobs, abs=1e-4)
    for chosen, chosen_lp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 3 <= len(top) <= 4  # top 3, plus the sampled token when it is not among them
        assert max(top.values()) == pytest.approx(chosen_lp, abs=1e-5)  # greedy: the chosen one is the best
        assert top[chosen] == pytest.approx(chosen_lp, abs=1e-5)
    text = result.choices[0].text
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for token, start in zip(lp.tokens, lp.text_offset):
        if not token.startswith("bytes:"):
            assert text[start:start + len(token)] == token


def test_echo_prepends_the_prompt_plain_and_streamed(client):
    kwargs = dict(model=MODEL_ID, prompt="Echo me", max_tokens=4, temperature=0)
    plain = client.completions.create(**kwargs).choices[0].text
    echoed = client.completions.create(echo=True, **kwargs).choices[0].text
    assert echoed == "Echo me" + plain
    streamed = "".join(c.choices[0].text for c in client.completions.create(echo=True, stream=True, **kwargs))
    assert streamed == echoed


def prompt_reference(model: GPT, ids: list[int]) -> list[float | None]:
    """log p(token t | tokens before it) from one plain forward; None for the first token."""
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids]))[0].double(), dim=-1)  # (T, V)
    return [None] + [float(lp[t - 1, ids[t]]) for t in range(1, len(ids))]


def test_echo_with_logprobs_scores_the_prompt_then_the_completion(client, model, tokenizer):
    prompt = "Score café this prompt"  # é is two bytes: offsets still index the text
    ids = tokenizer.encode(prompt)
    result = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=6, temperature=0, logprobs=2,
                                       echo=True)
    choice = result.choices[0]
    lp = choice.logprobs
    tokens, logprobs = greedy_reference(model, ids, 6)
    assert choice.text == prompt + tokenizer.decode(tokens)
    assert len(lp.tokens) == len(ids) + len(tokens)  # the prompt's tokens first, then the completion's
    assert lp.tokens[:len(ids)] == [tokenizer.decode([t]) for t in ids]
    expected = prompt_reference(model, ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(expected[1:], abs=1e-4)
    assert lp.token_logprobs[len(ids):] == pytest.approx(logprobs, abs=1e-4)
    for token, token_lp, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert 2 <= len(top) <= 3 and top[token] == pytest.approx(token_lp, abs=1e-5)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert lp.text_offset[len(ids)] == len(prompt)
    for token, start in zip(lp.tokens, lp.text_offset):
        assert choice.text[start:start + len(token)] == token
    # streamed: the echo chunk carries the prompt's logprobs, later chunks the completion's
    chunks = list(client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=6, temperature=0, logprobs=2,
                                            echo=True, stream=True))
    streamed = {"tokens": [], "token_logprobs": [], "text_offset": []}
    for c in chunks:
        for key in streamed:
            streamed[key] += getattr(c.choices[0].logprobs, key)
    assert streamed == {"tokens": lp.tokens, "token_logprobs": lp.token_logprobs, "text_offset": lp.text_offset}


def test_echo_with_logprobs_and_no_new_tokens_scores_each_prompt(server, model, tokenizer):
    prompts = ["The first text to score", "A second one"]
    body = {"prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 0, "n": 2}
    response = post(server, body)
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert len(choices) == 4
    for c in choices:
        ids = tokenizer.encode(prompts[c["index"] // 2])
        assert c["text"] == prompts[c["index"] // 2] and c["finish_reason"] == "length"
        assert c["logprobs"]["token_logprobs"][0] is None
        assert c["logprobs"]["token_logprobs"][1:] == pytest.approx(prompt_reference(model, ids)[1:], abs=1e-4)
        assert [len(top) for top in c["logprobs"]["top_logprobs"][1:]] == [1] * (len(ids) - 1)  # just the token


def test_list_prompts_and_n_give_one_choice_each_in_order(client, model, tokenizer):
    prompts = ["First prompt", "A second, longer prompt here"]
    result = client.completions.create(model=MODEL_ID, prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    for c in result.choices:
        tokens, _ = greedy_reference(model, tokenizer.encode(prompts[c.index // 2]), 6)
        assert c.text == tokenizer.decode(tokens)
    assert result.usage.prompt_tokens == sum(len(tokenizer.encode(p)) for p in prompts)


def test_token_id_prompts_are_accepted(client, model, tokenizer):
    ids = tokenizer.encode("Token ids in")
    by_ids = client.completions.create(model=MODEL_ID, prompt=ids, max_tokens=5, temperature=0)
    by_text = client.completions.create(model=MODEL_ID, prompt="Token ids in", max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text


def test_seed_makes_sampling_reproducible_and_choices_differ(client, server):
    kwargs = dict(model=MODEL_ID, prompt="Random", max_tokens=10, temperature=1.0, n=3, seed=42)
    first = [c.text for c in client.completions.create(**kwargs).choices]
    second = [c.text for c in client.completions.create(**kwargs).choices]
    assert first == second
    assert len(set(first)) > 1
    other = [c.text for c in client.completions.create(**{**kwargs, "seed": 43}).choices]
    assert other != first
    for bad in (-1, 2**63):  # torch keeps 63 bits of a seed: outside 0..2**63-1 two seeds would share a stream
        reply = post(server, {**kwargs, "seed": bad})
        assert reply.status_code == 400 and "seed" in reply.json()["error"]["message"]


def test_stop_string_cuts_text_plain_and_streamed(client, tokenizer):
    kwargs = dict(model=MODEL_ID, prompt="Stop test", max_tokens=24, temperature=0)
    full = client.completions.create(**kwargs).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert len(stop) == 3 and stop.strip()
    expected = full[:full.index(stop)]
    plain = client.completions.create(stop=[stop, "never-appears"], **kwargs).choices[0]
    assert (plain.text, plain.finish_reason) == (expected, "stop")
    chunks = list(client.completions.create(stop=stop, stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_max_tokens_zero_with_echo_returns_the_prompt(client):
    result = client.completions.create(model=MODEL_ID, prompt="Just the prompt", max_tokens=0, echo=True)
    assert result.choices[0].text == "Just the prompt"
    assert result.choices[0].finish_reason == "length" and result.usage.completion_tokens == 0


# ------------------------------------------------------------------------------------------ end-of-text, offsets
@pytest.fixture(scope="module")
def eot_server(tokenizer):
    """A model that always predicts <|endoftext|> next: its final norm maps every position to one direction `e`,
    and the end-of-text token's embedding points along it."""
    torch.manual_seed(0)
    net = GPT(GPTConfig(vocab_size=50257, n_ctx=N_CTX, n_layer=1, n_head=2, n_embd=16)).eval()
    with torch.no_grad():
        e = torch.zeros(16)
        e[0] = 1.0
        net.ln_f.weight.zero_()
        net.ln_f.bias.copy_(e)
        net.wte.weight[50256] = 20 * e
    with BackgroundServer(create_app(net, tokenizer, ServerConfig(model_id=MODEL_ID))) as running:
        yield running


@pytest.mark.parametrize("stream", [False, True])
def test_a_sampled_end_of_text_is_reported_in_logprobs(eot_server, tokenizer, stream):
    """lm-eval scores a continuation from echo + logprobs + max_tokens 1, dropping the last (sampled) token's entry:
    that entry must be there even when the sampled token is <|endoftext|>, as in OpenAI's API."""
    prompt = "Hello world"
    ids = tokenizer.encode(prompt)
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 1, "echo": True, "stream": stream}
    if not stream:
        reply = post(eot_server, body).json()
        choice, usage = reply["choices"][0], reply["usage"]
        logprobs = choice["logprobs"]
    else:
        body["stream_options"] = {"include_usage": True}
        events = [json.loads(line[6:]) for line in post(eot_server, body).text.splitlines()
                  if line.startswith("data: {")]
        choices = [e["choices"][0] for e in events if e["choices"]]
        usage = events[-1]["usage"]
        choice = {"text": "".join(c["text"] for c in choices), "finish_reason": choices[-1]["finish_reason"]}
        logprobs = {key: [v for c in choices for v in c["logprobs"][key]] for key in ("tokens", "token_logprobs")}
        logprobs["text_offset"] = [v for c in choices for v in c["logprobs"]["text_offset"]]
    assert choice["text"] == prompt and choice["finish_reason"] == "stop"
    assert logprobs["tokens"] == [tokenizer.decode([t]) for t in ids] + ["<|endoftext|>"]
    assert logprobs["token_logprobs"][-1] == pytest.approx(0.0, abs=1e-3)
    assert logprobs["text_offset"][-1] == len(prompt)
    assert usage["completion_tokens"] == 1  # counted, as OpenAI counts the stop token


def test_echoed_offsets_after_an_invalid_byte(server, tokenizer):
    lead = byte_token(tokenizer, 0xE2)
    ids = [*tokenizer.encode("a"), lead, *tokenizer.encode("x"), lead]
    reply = post(server, {"prompt": ids, "max_tokens": 0, "echo": True, "logprobs": 0}).json()
    choice = reply["choices"][0]
    assert choice["text"] == "a\ufffdx\ufffd"
    assert choice["logprobs"]["text_offset"] == [0, 1, 2, 3]  # "x" starts after the U+FFFD its lead byte became


def test_end_of_text_does_not_count_as_a_stop_string(server, model):
    five = ["\n\n", ".", "Q:", "?", "<|endoftext|>"]
    assert post(server, {"prompt": "Hi", "max_tokens": 2, "stop": five}).status_code == 200
    reply = post(server, {"prompt": "Hi", "max_tokens": 2, "stop": [*five[:4], "!"]})
    assert reply.status_code == 400 and "at most 4" in reply.json()["error"]["message"]


def test_raised_limits_accept_more_stop_strings_and_prompts(model, tokenizer):
    config = ServerConfig(model_id=MODEL_ID, max_stop=6, max_choices=20)
    with BackgroundServer(create_app(model, tokenizer, config)) as running:
        assert post(running, {"prompt": ["a"] * 20, "max_tokens": 1, "stop": list("abcdef")}).status_code == 200
        assert post(running, {"prompt": ["a"] * 21, "max_tokens": 1}).status_code == 400


# ------------------------------------------------------------------------------------------------ text assembly

def events_for(tokenizer, text: str, finish: str = "length") -> list[TokenEvent]:
    ids = tokenizer.encode(text)
    return [TokenEvent(t, -1.0, [], finish if i == len(ids) - 1 else None) for i, t in enumerate(ids)]


def test_choice_text_never_splits_characters(tokenizer):
    text = "naïve café 🦜 漢字 — ok"
    choice = ChoiceText(tokenizer)
    deltas = [d for e in events_for(tokenizer, text) if (d := choice.add(e, 50256)) is not None]
    assert "".join(d.text for d in deltas) == text
    assert not any("\ufffd" in d.text for d in deltas)
    tokens = [t for d in deltas for t in d.tokens]
    assert len(tokens) == len(tokenizer.encode(text)) and any(t.text.startswith("bytes:") for t in tokens)


@pytest.mark.parametrize("stop, expected", [("END", "before "), ("fore", "be"), ("nothing", "before END after")])
def test_choice_text_cuts_at_stop_strings_split_over_tokens(tokenizer, stop, expected):
    choice = ChoiceText(tokenizer, stop=[stop])
    deltas = [d for e in events_for(tokenizer, "before END after") if (d := choice.add(e, 50256)) is not None]
    assert "".join(d.text for d in deltas) == expected
    assert deltas[-1].finish_reason == ("stop" if stop != "nothing" else "length")
    assert all(t.offset < len(expected) for d in deltas for t in d.tokens)


def test_choice_text_end_of_text_token_finishes_without_text_but_is_reported(tokenizer):
    choice = ChoiceText(tokenizer)
    assert choice.add(TokenEvent(tokenizer.encode("Hi")[0], -0.5, [], None), 50256).text == "Hi"
    delta = choice.add(TokenEvent(50256, -0.1, [(50256, -0.1)], "stop"), 50256)
    assert (delta.text, delta.finish_reason, choice.num_tokens, choice.text) == ("", "stop", 2, "Hi")
    assert [(t.text, t.offset, t.logprob, t.top) for t in delta.tokens] == [("<|endoftext|>", 2, -0.1,
                                                                             (("<|endoftext|>", -0.1),))]


def byte_token(tokenizer, value: int) -> int:
    return next(i for i in range(256) if tokenizer.decode_bytes([i]) == bytes([value]))


def test_choice_text_offsets_after_an_invalid_byte(tokenizer):
    """A lone lead byte becomes U+FFFD when the next token does not continue it: that token starts after it."""
    lead, x, eot = byte_token(tokenizer, 0xE2), tokenizer.encode("x")[0], 50256
    choice = ChoiceText(tokenizer)
    deltas = [choice.add(TokenEvent(t, -1.0, [], r), eot) for t, r in ((lead, None), (x, None), (lead, None),
                                                                      (eot, "stop"))]
    tokens = [t for d in deltas if d is not None for t in d.tokens]
    assert choice.text == "\ufffdx\ufffd"
    assert [(t.text, t.offset) for t in tokens] == [("bytes:\\xe2", 0), ("x", 1), ("bytes:\\xe2", 2),
                                                    ("<|endoftext|>", 3)]
    # a token that completes the character starts where the character does
    euro = tokenizer.encode("\u20ac")
    choice = ChoiceText(tokenizer)
    deltas = [choice.add(TokenEvent(t, -1.0, [], None), eot) for t in [*tokenizer.encode("a"), *euro]]
    assert [t.offset for d in deltas if d is not None for t in d.tokens] == [0] + [1] * len(euro)



def test_choice_text_a_stop_string_completed_by_the_final_flush_still_stops(tokenizer):
    """A dangling lead byte becomes U+FFFD when the choice ends; a stop string it completes cuts the text there, as
    in generate's streaming (one assembler for both)."""
    lead, a = byte_token(tokenizer, 0xE2), tokenizer.encode("a")[0]
    choice = ChoiceText(tokenizer, stop=["\ufffd"])
    assert choice.add(TokenEvent(a, -1.0, [], None), 50256).text == "a"
    delta = choice.add(TokenEvent(lead, -1.0, [], "length"), 50256)
    assert (delta.text, delta.tokens, delta.finish_reason, choice.text) == ("", (), "stop", "a")

# ---------------------------------------------------------------------------------------------- concurrency
def run_concurrently(fn, args_list):
    results = [None] * len(args_list)

    def work(i, args):
        results[i] = fn(*args)
    threads = [threading.Thread(target=work, args=(i, a)) for i, a in enumerate(args_list)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_concurrent_requests_share_a_batch_and_match_solo_decoding(server, model, tokenizer):
    before = httpx.get(server.url + "/health").json()
    prompts = ["Alpha", "Beta gamma delta", "Epsilon is a letter", "Zeta"]

    def ask(prompt):
        return post(server, {"prompt": prompt, "max_tokens": 10, "temperature": 0}).json()["choices"][0]["text"]
    texts = run_concurrently(ask, [(p,) for p in prompts])
    after = httpx.get(server.url + "/health").json()
    for prompt, text in zip(prompts, texts):
        assert text == tokenizer.decode(greedy_reference(model, tokenizer.encode(prompt), 10)[0])
    assert after["largest_batch"] >= 2  # the four arrived within the batch window
    assert after["batches"] - before["batches"] < len(prompts)


def test_rows_that_would_overflow_the_context_together_are_decoded_apart(server, model, tokenizer):
    long_prompt = tokenizer.decode(list(range(1000, 1050)))  # 50 tokens; + 10 new fits N_CTX = 64
    long_ids = tokenizer.encode(long_prompt)
    cases = [(long_prompt, N_CTX - len(long_ids)), ("Short", 50)]  # together: 50 + 50 > 64

    def ask(prompt, n):
        return post(server, {"prompt": prompt, "max_tokens": n, "temperature": 0}).json()["choices"][0]["text"]
    texts = run_concurrently(ask, cases)
    for (prompt, n), text in zip(cases, texts):
        assert text == tokenizer.decode(greedy_reference(model, tokenizer.encode(prompt), n)[0])


@pytest.fixture
def slow_server(model, tokenizer):
    """A server whose model takes 20 ms a step, so a disconnect lands mid-generation."""
    handle = model.register_forward_pre_hook(lambda module, args: time.sleep(0.02))
    app = create_app(model, tokenizer, ServerConfig(model_id=MODEL_ID, batch_wait_ms=0))
    try:
        with BackgroundServer(app) as running:
            yield running, app.state.server.worker
    finally:
        handle.remove()


def wait_idle(worker, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not worker.idle and time.monotonic() < deadline:
        time.sleep(0.01)
    assert worker.idle


@pytest.mark.parametrize("stream", [True, False])
def test_disconnected_client_stops_its_generation(slow_server, stream):
    server, worker = slow_server
    body = json.dumps({"prompt": "Long story", "max_tokens": 60, "temperature": 0, "stream": stream}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        if stream:
            received = b""
            while b"data: " not in received:  # the headers, then the first tokens
                received += sock.recv(4096)
            assert received.startswith(b"HTTP/1.1 200")
        else:
            deadline = time.monotonic() + 30
            while worker.tokens_decoded == 0 and time.monotonic() < deadline:  # let it start decoding
                time.sleep(0.005)
    wait_idle(worker)
    assert 0 < worker.tokens_decoded < 30  # 60 were asked for; the row was retired soon after the client left
    # and the server still serves
    assert post(server, {"prompt": "Still there?", "max_tokens": 2}).status_code == 200


# --------------------------------------------------------------------------------------------------- bad input
BAD_REQUESTS = [
    # (body, status, param, code, words in the message)
    (b"{not json", 400, None, "invalid_json", "not valid JSON"),
    (b"", 400, None, "invalid_json", "empty"),
    (b"[1, 2]", 400, None, "invalid_json", "JSON object"),
    (b'{"prompt": "x", "temperature": NaN}', 400, None, "invalid_json", "NaN"),
    ({"prompt": "x", "temperature": -0.5}, 400, "temperature", "invalid_value", "[0, 2]"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature", "invalid_value", "'hot'"),
    ({"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens", "invalid_value", "integer"),
    ({"prompt": "x", "max_tokens": 10_000}, 400, "max_tokens", "invalid_value", f"[0, {N_CTX}]"),
    ({"prompt": "x", "max_tokens": -1}, 400, "max_tokens", "invalid_value", "-1"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p", "invalid_value", "(0, 1]"),
    ({"prompt": "x", "n": 0}, 400, "n", "invalid_value", "n"),
    ({"prompt": "x", "logprobs": 6}, 400, "logprobs", "invalid_value", "[0, 5]"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream", "invalid_value", "true or false"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "invalid_value", "at most 4"),
    ({"prompt": "x", "max_token": 5}, 400, "max_token", "unknown_field", "'max_token'"),
    ({"prompt": 5}, 400, "prompt", "invalid_value", "'prompt' must be"),
    ({"prompt": [[1, 2], "mixed"]}, 400, "prompt", "invalid_value", "'prompt' must be"),
    ({"prompt": [70000]}, 400, "prompt", "invalid_value", "70000"),
    ({"max_tokens": 5}, 400, "prompt", "missing_field", "required"),
    ({"prompt": "x", "frequency_penalty": 0.5}, 400, "frequency_penalty", "unsupported", "repetition_penalty"),
    ({"prompt": "x", "repetition_penalty": 0.005}, 400, "repetition_penalty", "invalid_value", "[0.01, 10]"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", "invalid_value", "stream"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model", "model_not_found", "'gpt-4'"),
    ({"prompt": " hello" * 70}, 413, "prompt", "prompt_too_long", "70 tokens"),
    ({"prompt": " hello" * 50, "max_tokens": 20}, 400, "max_tokens", "context_length_exceeded", "at most 14"),
    ({"prompt": "x" * 30_000}, 413, None, "request_too_large", "limit"),
    (b'{"prompt": "ab\\ud800c"}', 400, "prompt", "invalid_text", "lone surrogate"),
    (b'{"prompt": "x", "user": "\\udfff"}', 400, "user", "invalid_text", "lone surrogate"),
    (b'{"prompt": "x", "stop": ["\\ud83d"]}', 400, "stop", "invalid_text", "lone surrogate"),
    (b'{"prompt": "x", "model": "\\ud800"}', 400, "model", "invalid_text", "lone surrogate"),
    (b"[" * 9_000 + b"]" * 9_000, 400, None, "invalid_json", "nests more than"),
    ({"prompt": [[[[[[[[[1]]]]]]]]]}, 400, "prompt", "invalid_json", "nests more than"),
    ({"prompt": "x", "stop": "z" * 257}, 400, "stop", "invalid_value", "1 to 256 characters"),
]


@pytest.mark.parametrize("body, status, param, code, words", BAD_REQUESTS,
                         ids=[f"{c}-{p}-{i}" for i, (_, s, p, c, w) in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, body, status, param, code, words):
    response = post(server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == code
    assert words in error["message"]
    assert error["type"] == ("invalid_request_error" if status != 404 else "not_found_error")
    assert post(server, {"prompt": "ok", "max_tokens": 1}).status_code == 200


def test_playground_and_static_files_are_served(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "/static/playground.js" in page.text and "http" not in page.text.split("<body>")[0].replace("http-equiv", "")
    script = httpx.get(server.url + "/static/playground.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert httpx.get(server.url + "/v1/models/other").status_code == 404


def test_unknown_routes_and_methods_get_error_objects(server):
    missing = httpx.get(server.url + "/v1/chat/completions")
    assert missing.status_code == 404 and "no route" in missing.json()["error"]["message"]
    wrong_method = httpx.get(server.url + "/v1/completions")
    assert wrong_method.status_code == 405 and "GET" in wrong_method.json()["error"]["message"]


def test_openai_client_raises_typed_errors(client):
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL_ID, prompt="x", temperature=-1)
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model=MODEL_ID, prompt=" hi" * 60, max_tokens=10)


def test_api_key_is_required_when_configured(model, tokenizer):
    app = create_app(model, tokenizer, ServerConfig(model_id=MODEL_ID, api_key="s3cret"))
    with BackgroundServer(app) as server:
        body = {"prompt": "x", "max_tokens": 1}
        missing = post(server, body)
        assert missing.status_code == 401 and "missing API key" in missing.json()["error"]["message"]
        wrong = post(server, body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(server.url + "/v1/models").status_code == 401
        assert httpx.get(server.url + "/health").status_code == 200  # liveness stays open
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model=MODEL_ID, prompt="x", max_tokens=2).usage.completion_tokens >= 1
        bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=MODEL_ID, prompt="x", max_tokens=2)


def test_parse_request_normalises_sampling(tokenizer):
    config = ServerConfig(model_id="m")
    req = parse_completion_request({"prompt": "", "temperature": 0, "top_p": 1, "top_k": 0}, tokenizer, 64, config)
    assert req.prompts == ((50256,),)  # an empty prompt starts from <|endoftext|>
    assert req.sampling.greedy and req.sampling.top_p is None and req.sampling.top_k is None
    assert req.max_tokens == config.default_max_tokens
    with pytest.raises(APIError) as info:
        parse_completion_request({"prompt": "x", "best_of": 3}, tokenizer, 64, config)
    assert info.value.param == "best_of"


def test_server_config_rejects_bad_limits():
    with pytest.raises(ValueError, match="max_batch_size"):
        ServerConfig(max_batch_size=0)
    with pytest.raises(ValueError, match="batch_wait_ms"):
        ServerConfig(batch_wait_ms=-1)


# ---------------------------------------------------------------------------------------------------------- CLI
def test_cli_serve_loads_a_model_directory_and_answers(model, tokenizer, tmp_path):
    import os
    import re
    import subprocess
    import sys

    model.save_pretrained(tmp_path / "my-model", tokenizer=tokenizer)
    env = {**os.environ, "GPT2LAB_API_KEY": "k"}
    proc = subprocess.Popen([sys.executable, "-m", "gpt2lab.cli", "serve", "--model", str(tmp_path / "my-model"),
                             "--port", "0", "--max-batch-size", "2"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        seen = []
        for line in proc.stderr:  # uvicorn logs the address it bound, port 0 resolved
            seen.append(line)
            match = re.search(r"running on (http://127\.0\.0\.1:\d+)", line)
            if match:
                break
        assert match, "".join(seen)
        url = match.group(1)
        reply = httpx.post(url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "temperature": 0},
                           headers={"Authorization": "Bearer k"}, timeout=60).json()
        assert reply["model"] == "my-model" and reply["usage"]["completion_tokens"] == 3
        assert httpx.get(url + "/").text.startswith("<!doctype html>")
    finally:
        proc.terminate()
        proc.wait(30)


def test_cli_serve_reports_a_missing_model_in_one_line(capsys):
    from gpt2lab.cli import main

    assert main(["serve", "--model", "/no/such/dir"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("gpt2lab serve: error:") and "/no/such/dir" in err and len(err.splitlines()) == 1


# ------------------------------------------------------------------------------------------ one row, one fault
def test_a_tiny_top_p_in_a_batch_harms_no_one(server, model, tokenizer):
    cases = [("Alpha", None), ("Beta gamma", 1e-50), ("Epsilon", None)]

    def ask(prompt, top_p):
        body = {"prompt": prompt, "max_tokens": 6, "temperature": 0 if top_p is None else 1.0, "top_p": top_p}
        return post(server, {k: v for k, v in body.items() if v is not None})
    replies = run_concurrently(ask, cases)
    assert [r.status_code for r in replies] == [200, 200, 200], [r.text for r in replies]
    for (prompt, top_p), reply in zip(cases, replies):  # a nucleus of one token is greedy decoding
        expected = tokenizer.decode(greedy_reference(model, tokenizer.encode(prompt), 6)[0])
        assert reply.json()["choices"][0]["text"] == expected


def test_a_near_zero_temperature_is_greedy_not_empty(server, model, tokenizer):
    reply = post(server, {"prompt": "Alpha", "max_tokens": 6, "temperature": 1e-300})
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["text"] == tokenizer.decode(greedy_reference(model, tokenizer.encode("Alpha"),
                                                                                   6)[0])


class PoisonedText(ChoiceText):
    """Text assembly that fails at the row's third token."""

    def add(self, event, eos_token_id):
        if self.num_tokens == 2:
            raise RuntimeError("poisoned text")
        return super().add(event, eos_token_id)


def worker_rows(model, tokenizer, prompts, poison):
    """Rows for a BatchWorker, each collecting what it is sent; `poison` maps a row index to how it is broken."""
    from gpt2lab.sampling import SamplingParams
    from gpt2lab.serve import Row

    received = [[] for _ in prompts]
    rows = []
    for i, prompt in enumerate(prompts):
        kind = poison.get(i)
        sampling = SamplingParams(temperature=1.0) if kind == "generator" else SamplingParams(temperature=0)
        text = (PoisonedText if kind == "text" else ChoiceText)(tokenizer)
        rows.append(Row(prompt=tuple(tokenizer.encode(prompt)), max_new_tokens=8, sampling=sampling,
                        generator="not a generator" if kind == "generator" else None, top_logprobs=0, text=text,
                        deliver=received[i].append))
    return rows, received


@pytest.mark.parametrize("kind", ["generator", "text"])
def test_a_poisoned_row_fails_alone_and_its_batch_mates_finish(model, tokenizer, kind):
    from gpt2lab.serve import BatchWorker, Delta

    prompts = ["Alpha", "Beta gamma delta", "Zeta"]
    rows, received = worker_rows(model, tokenizer, prompts, {1: kind})
    worker = BatchWorker(model, tokenizer.eot_token, max_batch_size=4, batch_wait_ms=0, max_pending=16)
    worker._decode(rows)  # one batch, on this thread
    for i, prompt in enumerate(prompts):
        if i == 1:
            assert isinstance(received[i][-1], APIError) and received[i][-1].status == 500
            assert not any(item is None for item in received[i])
            continue
        assert received[i][-1] is None and not any(isinstance(item, APIError) for item in received[i])
        text = "".join(item.text for item in received[i] if isinstance(item, Delta))
        assert text == tokenizer.decode(greedy_reference(model, tokenizer.encode(prompt), 8)[0])


# ------------------------------------------------------------------------------------------------ bad input
def test_an_escaped_emoji_is_text_not_a_lone_surrogate(server):
    reply = post(server, b'{"prompt": "\\ud83d\\ude00", "max_tokens": 1}')
    assert reply.status_code == 200, reply.text


@pytest.fixture(scope="module")
def char_server():
    from gpt2lab.tokenizer import CharTokenizer

    tokenizer = CharTokenizer([chr(c) for c in range(32, 127)])
    torch.manual_seed(0)
    net = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, n_ctx=32, n_layer=2, n_head=2, n_embd=16)).eval()
    with BackgroundServer(create_app(net, tokenizer, ServerConfig(model_id="char"))) as running:
        yield running


@pytest.mark.parametrize("prompt, shown", [("It\u2019s", "'\u2019'"), ("hi \U0001F600", "'\U0001F600'")])
def test_characters_outside_a_char_vocabulary_are_a_400(char_server, prompt, shown):
    reply = post(char_server, {"prompt": prompt, "max_tokens": 2})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["param"] == "prompt" and shown in error["message"] and "char-level vocabulary" in error["message"]
    assert post(char_server, {"prompt": "It's", "max_tokens": 2}).status_code == 200


def test_a_prompt_that_cannot_fit_is_refused_before_tokenizing(tokenizer):
    from gpt2lab.serve import max_token_bytes

    class NoTokenizing:
        vocab_size, eot_token = tokenizer.vocab_size, tokenizer.eot_token

        def encode(self, *args, **kwargs):
            raise AssertionError("the prompt was tokenized")

    limit = 64 * max_token_bytes(tokenizer)
    with pytest.raises(APIError) as info:
        parse_completion_request({"prompt": "a" * (limit + 1)}, NoTokenizing(), 64, ServerConfig(), limit // 64)
    assert info.value.status == 413 and f"at most {limit} characters" in info.value.message


def test_a_request_must_declare_json(server):
    reply = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "x"}',
                       headers={"Content-Type": "text/plain"}, timeout=30)
    assert reply.status_code == 415 and reply.json()["error"]["code"] == "unsupported_media_type"
    missing = httpx.post(server.url + "/v1/completions", content=b'{"prompt": "x"}', timeout=30)
    assert missing.status_code == 415 and "missing" in missing.json()["error"]["message"]


# ------------------------------------------------------------------------------------------- browser safety
def test_cross_origin_posts_are_refused_and_same_origin_ones_served(server):
    body = {"prompt": "x", "max_tokens": 1}
    evil = post(server, body, headers={"Origin": "https://evil.example"})
    assert evil.status_code == 403 and evil.json()["error"]["code"] == "cross_origin"
    assert post(server, body, headers={"Origin": "null"}).status_code == 403
    own = post(server, body, headers={"Origin": server.url})
    assert own.status_code == 200, own.text


def test_a_host_the_server_does_not_answer_to_is_refused(server):
    # DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 is "same-origin" with itself
    for path in ("/", "/v1/models"):
        reply = httpx.get(server.url + path, headers={"Host": "evil.example:8000"}, timeout=30)
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "invalid_host"
    assert httpx.get(server.url + "/", headers={"Host": "localhost"}, timeout=30).status_code == 200


def test_allowed_origins_and_hosts_extend_the_defaults(model, tokenizer):
    config = ServerConfig(model_id=MODEL_ID, allowed_hosts=("*",), allowed_origins=("http://localhost:3000",))
    with BackgroundServer(create_app(model, tokenizer, config)) as server:
        reply = post(server, {"prompt": "x", "max_tokens": 1},
                     headers={"Origin": "http://localhost:3000", "Host": "anything.example"})
        assert reply.status_code == 200, reply.text


# ------------------------------------------------------------------------------------------- slow clients
@pytest.fixture
def strict_server(model, tokenizer):
    config = ServerConfig(model_id=MODEL_ID, max_connections=4, header_timeout_s=0.5, body_timeout_s=0.5,
                          keep_alive_s=0.5, batch_wait_ms=0)
    app = create_app(model, tokenizer, config)
    with BackgroundServer(app) as running:
        yield running, app.state.server.worker


def read_until_closed(sock, timeout=10.0) -> bytes:
    """Everything the server sends until it closes the connection (or `timeout` passes: then the test fails)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_a_client_that_never_finishes_its_headers_is_closed(strict_server):
    server, _ = strict_server
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and then nothing
        assert read_until_closed(sock) == b""


def test_a_stalled_upload_gets_408_and_holds_no_batch_back(strict_server):
    server, worker = strict_server
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        time.sleep(0.2)
        assert worker._arriving == 0  # a body still on its way does not make batches wait for it
        assert post(server, {"prompt": "Meanwhile", "max_tokens": 2}).status_code == 200
        reply = read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 408") and b"request_timeout" in reply


def test_connections_beyond_the_limit_are_closed_and_service_resumes(strict_server):
    server, _ = strict_server
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(4)]
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as extra:
            extra.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert read_until_closed(extra) == b""  # closed at once, nothing answered
        for sock in idle:  # the idle ones time out ...
            assert read_until_closed(sock) == b""
    finally:
        for sock in idle:
            sock.close()
    assert httpx.get(server.url + "/health", timeout=10).status_code == 200  # ... and the server serves again


def test_repeated_log_messages_are_held_back():
    import logging

    from gpt2lab.serve.net import RepeatFilter

    log_filter = RepeatFilter(interval_s=60)
    records = [logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, "Invalid HTTP request received.",
                                 None, None) for _ in range(1000)]
    assert sum(log_filter.filter(r) for r in records) == 1
    # asyncio's failed accept(): a new multi-line text each time (the fd exhaustion flood)
    accepts = [logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "socket.accept() out of system resource\n"
                                 f"handle: <TimerHandle when={i}.5>", None, None) for i in range(1000)]
    assert sum(log_filter.filter(r) for r in accepts) == 1
    other = logging.LogRecord("uvicorn.error", logging.WARNING, __file__, 1, "something else", None, None)
    assert log_filter.filter(other)


# ---------------------------------------------------------------------------------------------- CLI limits
@pytest.mark.parametrize("argv, words", [
    (["--api-key", ""], "--api-key is empty"),
    (["--port", "-1"], "--port must be in [0, 65535]"),
    (["--log-level", "loud"], "--log-level must be one of"),
    (["--max-connections", "1"], "max_connections must be an integer >= 2"),
    (["--body-timeout", "0"], "body_timeout_s must be a number in (0, 3600] (seconds), got 0"),
    (["--max-stop", "0"], "max_stop must be an integer >= 1"),
    (["--max-choices", "0"], "max_choices must be an integer >= 1"),
])
def test_cli_serve_bad_flags_are_one_line(argv, words, capsys):
    from gpt2lab.cli import main

    assert main(["serve", "--model", "/no/such/dir", *argv]) == 1
    err = capsys.readouterr().err
    assert words in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_cli_serve_reports_a_port_in_use_before_loading_the_model(capsys):
    from gpt2lab.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", "--model", "/no/such/dir", "--port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and "/no/such/dir" not in err and len(err.splitlines()) == 1


def test_cli_serve_an_empty_key_in_the_environment_is_an_error(monkeypatch, capsys):
    from gpt2lab.cli import main

    monkeypatch.setenv("GPT2LAB_API_KEY", "")
    assert main(["serve", "--model", "/no/such/dir"]) == 1
    assert "GPT2LAB_API_KEY is empty" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- the package
SERVE_MODULES = ["config", "errors", "request", "choices", "batcher", "net", "app", "run"]


def test_serve_modules_import_only_those_below_them():
    import ast
    from pathlib import Path

    import gpt2lab.serve

    root = Path(gpt2lab.serve.__file__).parent
    assert sorted(p.stem for p in root.glob("*.py") if p.stem != "__init__") == sorted(SERVE_MODULES)
    for i, name in enumerate(SERVE_MODULES):
        tree = ast.parse((root / f"{name}.py").read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
        inside = {m.rsplit(".", 1)[1] for m in imported if m.startswith("gpt2lab.serve.")}
        assert inside <= set(SERVE_MODULES[:i]), f"serve/{name}.py imports {sorted(inside - set(SERVE_MODULES[:i]))}"
        assert "gpt2lab.cli" not in imported and "gpt2lab.server" not in imported


def test_the_old_module_path_still_works_with_a_warning():
    import importlib
    import sys

    import gpt2lab.serve

    sys.modules.pop("gpt2lab.server", None)
    with pytest.warns(DeprecationWarning, match="gpt2lab.serve"):
        old = importlib.import_module("gpt2lab.server")
    assert old.create_app is gpt2lab.serve.create_app and old.ServerConfig is ServerConfig
