"""lm-evaluation-harness through the server: lm-eval's `local-completions` model against `gpt2lab serve` gives what
lm-eval's `--model hf` gives on the same export (per-item log-likelihoods, accuracies, greedy generations).

A small byte-level BPE and a 2-layer model are trained for a few seconds on short documents that end with
`<|endoftext|>`, so greedy decoding produces real words, reaches the stop strings, and predicts end-of-text after a
finished answer: the token lm-eval asks for after an echoed prompt is then `<|endoftext|>`, whose log-probability the
server must report. Task files are written locally (lm-eval's hub datasets are unreachable here). The generation task
has four stop strings, so lm-eval sends five (it adds end-of-text).

Rolling texts fit one window: `local-completions` sends each window as a prompt plus one generated token, so its
windows are two tokens shorter than `hf`'s, and texts longer than that would be cut differently (not a server error).

The model and the task files are built by conftest.py's helpers, shared with tests/test_lm_eval.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is a test dependency: pip install -e '.[test]'")
pytest.importorskip("tenacity", reason="lm-eval's local-completions needs lm-eval[api] (in the test extra)")
httpx = pytest.importorskip("httpx")

from gpt2lab.serve import BackgroundServer, ServerConfig, load_app  # noqa: E402

from conftest import (assert_same_lm_eval_scores, lm_eval_responses, train_harness_model,  # noqa: E402
                      write_lm_eval_tasks)

DOCS = ["Q: What is the color of the sky? A: blue.", "Q: What do cows say? A: moo.",
        "The cat sat on the mat. The dog ran in the park.", "Is it raining? Yes, it is raining."]
TEXT = "".join(d + "<|endoftext|>" for d in DOCS)
TASKS = ["serve_mc", "serve_roll", "serve_gen"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
STOPS = ["\n\n", ".", "Q:", "?"]  # four task stop strings; lm-eval adds end-of-text as a fifth
N_CTX = 64


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(model directory with tokenizer files, task directory)."""
    root = tmp_path_factory.mktemp("serve_lm_eval")
    mc = [{"question": "Q: What do cows say? A:", "choices": [" moo.", " blue.", " park."], "answer": 0},
          {"question": "Q: What is the color of the sky? A:", "choices": [" moo.", " blue.", " raining."], "answer": 1},
          {"question": "The cat sat on the", "choices": [" mat.", " park.", " sky."], "answer": 0},
          {"question": "Is it raining?", "choices": [" Yes, it is raining.", " A: moo.", " The dog"], "answer": 0}]
    roll = [{"text": DOCS[2]}, {"text": "Is it raining? " * 3}, {"text": "<|endoftext|>The cat"}]
    gen = [{"prompt": "Q: What do cows say? A:", "answer": " moo"}, {"prompt": "The dog ran", "answer": " in"},
           {"prompt": "Is it", "answer": " raining"}, {"prompt": "Q:", "answer": " What"}]
    train_harness_model(TEXT, root / "model", n_ctx=N_CTX)
    return root / "model", write_lm_eval_tasks(root, "serve", mc, roll, gen, STOPS, target_delimiter="")


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No hub: lm-eval and transformers read only the files the test wrote."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in OFFLINE.items():
            patch.setenv(name, value)
        yield


def _evaluate(model: str, model_args: str, tasks: Path, **kwargs: object) -> dict:
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=TASKS, log_samples=True,
                                   task_manager=TaskManager(include_path=str(tasks)), **kwargs)


@pytest.fixture(scope="module")
def server(exported: tuple[Path, Path]):
    """`gpt2lab serve`'s app (loaded from the directory as the CLI loads it) on a free local port."""
    app = load_app(str(exported[0]), config=ServerConfig(max_choices=32), model_name="tiny")
    with BackgroundServer(app) as running:
        yield running


@pytest.fixture(scope="module")
def served_results(exported: tuple[Path, Path], server: BackgroundServer) -> dict:
    model_dir, tasks = exported
    # max_length: lm-eval keeps one position for the token it asks for, so prompt + 1 fits the model's context
    args = (f"model=tiny,base_url={server.url}/v1/completions,tokenizer_backend=huggingface,tokenizer={model_dir},"
            f"max_length={N_CTX},batch_size=32")
    return _evaluate("local-completions", args, tasks)


@pytest.fixture(scope="module")
def hf_results(exported: tuple[Path, Path]) -> dict:
    pytest.importorskip("accelerate", reason="lm-eval's --model hf needs accelerate (in the test extra)")
    model_dir, tasks = exported
    return _evaluate("hf", f"pretrained={model_dir}", tasks, batch_size=4, device="cpu")


def _scores(results: dict, task: str) -> list[tuple[float, bool | None]]:
    """Per request: (log-likelihood, is_greedy), is_greedy None for rolling requests."""
    out = []
    for responses in lm_eval_responses(results, task):
        for r in responses:
            r = r[0] if isinstance(r[0], (list, tuple)) else r
            out.append((r[0], r[1]) if isinstance(r, (list, tuple)) and len(r) > 1 else (r[0], None))
    return out


def test_the_model_predicts_end_of_text_after_an_answer(exported: tuple[Path, Path],
                                                        server: BackgroundServer) -> None:
    """The case lm-eval used to score as 0.0: the one token asked for after the echoed text is <|endoftext|>."""
    reply = httpx.post(server.url + "/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": "Q: What do cows say? A: moo.", "max_tokens": 1, "temperature": 0, "logprobs": 1,
        "echo": True}).json()
    choice = reply["choices"][0]
    assert choice["logprobs"]["tokens"][-1] == "<|endoftext|>" and choice["finish_reason"] == "stop"
    assert choice["logprobs"]["token_logprobs"][-1] < 0


def test_local_completions_against_the_server_equals_hf(served_results: dict, hf_results: dict) -> None:
    for task in ("serve_mc", "serve_roll"):
        served, hf = _scores(served_results, task), _scores(hf_results, task)
        assert len(served) == len(hf) > 0
        for (lp, greedy), (hf_lp, hf_greedy) in zip(served, hf):
            assert lp == pytest.approx(hf_lp, abs=1e-4)
            assert greedy == hf_greedy
    assert_same_lm_eval_scores(served_results, hf_results, "serve", STOPS)
