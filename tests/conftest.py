"""Shared fixtures. Files go under tmp_path only; models are tiny so the suite stays fast on 2 CPU cores."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from safetensors.torch import load_file

from gpt2lab import GPT, GPTConfig
from gpt2lab.config import TrainConfig
from gpt2lab.data import prepare


@pytest.fixture(autouse=True)
def _torch_threads():
    """Each test starts with torch's thread count as the one before it found it (the CLI and the lm-eval adapter
    set it for the process, which in tests is the test process)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    """The native decode kernel is built once per session into a temporary cache, before any test module (some ask
    for it when imported, to decide their skips) could build it into the user's cache."""
    import os
    import shutil
    import tempfile

    from gpt2lab import native

    folder = tempfile.mkdtemp(prefix="gpt2lab-native-")
    before = os.environ.get("GPT2LAB_CACHE")
    os.environ["GPT2LAB_CACHE"] = folder
    try:
        native.library()
    finally:
        if before is None:
            del os.environ["GPT2LAB_CACHE"]
        else:
            os.environ["GPT2LAB_CACHE"] = before
    config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))


@pytest.fixture
def tiny_config() -> GPTConfig:
    return GPTConfig(vocab_size=97, n_ctx=32, n_layer=2, n_head=2, n_embd=16)


@pytest.fixture
def tiny_model(tiny_config: GPTConfig) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config).eval()


def hf_config(cfg: GPTConfig):
    """The transformers GPT2Config describing the same architecture (test oracle only)."""
    from transformers import GPT2Config

    from gpt2lab.checkpoint import ACTIVATION_TO_HF

    return GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.n_ctx, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                      n_head=cfg.n_head, activation_function=ACTIVATION_TO_HF[cfg.activation],
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=cfg.layer_norm_eps)


# The config families of the generation and decode-step tests: learned and sinusoidal positions, three activations,
# with and without biases, one to four heads.
CONFIGS = {
    "tiny": GPTConfig(vocab_size=97, n_ctx=32, n_layer=2, n_head=2, n_embd=16),
    "wide": GPTConfig(vocab_size=211, n_ctx=48, n_layer=3, n_head=4, n_embd=32, activation="gelu"),
    "relu-nobias": GPTConfig(vocab_size=64, n_ctx=40, n_layer=2, n_head=1, n_embd=24, activation="relu", bias=False),
    "sinusoidal": GPTConfig(vocab_size=80, n_ctx=24, n_layer=2, n_head=2, n_embd=16, pos_encoding="sinusoidal"),
}


def make_model(cfg: GPTConfig, seed: int = 0) -> GPT:
    """An eval-mode GPT whose weights are 8x GPT-2's init, so its distributions are sharper and more varied."""
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)
    return model


# ------------------------------------------------------------------------------------- training (tests/test_train_*.py)
LINES = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer",
         "The slings and arrows of outrageous fortune,", "Or to take arms against a sea of troubles",
         "And by opposing end them. To die: to sleep;", "No more; and by a sleep to say we end"]


@pytest.fixture(scope="session")
def char_data(tmp_path_factory) -> Path:
    """A small char-level corpus (~12 KB), prepared once for the session."""
    root = tmp_path_factory.mktemp("char-data")
    text = "\n".join(LINES[(i * 7) % len(LINES)] for i in range(300)) + "\n"
    (root / "hamlet.txt").write_text(text)
    prepare(str(root / "hamlet.txt"), root / "data", tokenizer="char", progress=False)
    return root / "data"


def tiny_run(data_dir: Path, out_dir: Path, **overrides) -> TrainConfig:
    """A 2-layer, 32-wide run of 8 steps on `data_dir`, changed by `overrides`; fast enough for 2 CPU cores."""
    base = TrainConfig(data_dir=str(data_dir), out_dir=str(out_dir),
                       model=GPTConfig(n_ctx=32, n_layer=2, n_head=2, n_embd=32),
                       batch_size=4, seq_len=16, lr=3e-3, min_lr=3e-4, warmup_steps=2, max_steps=8,
                       eval_interval=4, eval_iters=2, log_interval=1, threads=1, seed=7)  # fmt: skip
    return dataclasses.replace(base, **overrides)


def weights(directory: Path) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint's model.safetensors, by name."""
    return load_file(str(directory / "model.safetensors"))


# ------------------------------------------------------------------------------------- lm-eval: a model and its tasks
# A small byte-level BPE and a 2-layer model are trained for a few seconds on a repetitive text, so greedy decoding
# produces real words and reaches the stop strings (random weights repeat one token, and agreement on them proves
# little). Task files are written locally: lm-eval's hub datasets are unreachable here.
HARNESS_TEXT = ("Q: What is the color of the sky? A: blue.\n\nQ: What do cows say? A: moo.\n\n"
                "The cat sat on the mat. The dog ran in the park. Is it raining? Yes, it is raining.\n\n")
HARNESS_STOPS = ["\n\n", ".", "Q:", "?"]  # four task stop strings; lm-eval adds end-of-text as a fifth


class HarnessFiles(NamedTuple):
    model_dir: Path  # a saved model with its tokenizer files
    tasks: Path  # lm-eval task YAML files tiny_mc (multiple choice), tiny_roll (rolling), tiny_gen (generate-until)


def write_lm_eval_tasks(root: Path, prefix: str, mc: list[dict], roll: list[dict], gen: list[dict],
                        stops: list[str], target_delimiter: str | None = None) -> Path:
    """lm-eval task files {prefix}_mc (multiple choice), {prefix}_roll (rolling log-likelihood) and {prefix}_gen
    (generate-until with `stops`, greedy, 12 tokens) over local JSON lines; returns the task directory."""
    tasks = root / "tasks"
    tasks.mkdir()
    delimiter = "" if target_delimiter is None else f"target_delimiter: {json.dumps(target_delimiter)}\n"
    bodies = {
        f"{prefix}_mc": ("mc", 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
                               f'doc_to_choice: "{{{{choices}}}}"\n{delimiter}doc_to_target: "{{{{answer}}}}"\n'
                               'metric_list:\n  - metric: acc\n'),
        f"{prefix}_roll": ("roll", 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
                                   'metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n'),
        f"{prefix}_gen": ("gen", 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
                                 f'generation_kwargs:\n  until: {json.dumps(stops)}\n  do_sample: false\n'
                                 '  max_gen_toks: 12\nmetric_list:\n  - metric: exact_match\n'),
    }
    for name, docs in (("mc", mc), ("roll", roll), ("gen", gen)):
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    for task, (data, body) in bodies.items():
        (tasks / f"{task}.yaml").write_text(f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                            f"    test: {tasks / (data + '.jsonl')}\ntest_split: test\n{body}")
    return tasks


def train_harness_model(text: str, directory: Path, n_ctx: int = 64) -> None:
    """A byte-level BPE (320 ids) and a 2-layer model trained for 150 steps on `text` (special tokens allowed),
    saved with the tokenizer to `directory`: small, but greedy decoding produces real words."""
    from gpt2lab.tokenizer import train_bpe

    tok = train_bpe(text * 4, vocab_size=320)
    ids = torch.tensor(tok.encode(text * 8, allowed_special="all"))
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, n_ctx=n_ctx, n_layer=2, n_head=2, n_embd=32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        starts = torch.randint(0, len(ids) - 33, (8,)).tolist()
        x = torch.stack([ids[s:s + 32] for s in starts])  # (B, T)
        y = torch.stack([ids[s + 1:s + 33] for s in starts])  # (B, T)
        loss = model.loss(x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(directory, tokenizer=tok)


@pytest.fixture(scope="session")
def harness_files(tmp_path_factory: pytest.TempPathFactory) -> HarnessFiles:
    """A small trained model and local lm-eval task files, built once for the adapter's and the CLI's tests."""
    root = tmp_path_factory.mktemp("lm_eval")
    mc = [{"question": "Q: What do cows say? A:", "choices": ["moo.", "blue.", "park."], "answer": 0},
          {"question": "Q: What is the color of the sky? A:", "choices": ["moo.", "blue.", "raining."], "answer": 1},
          {"question": "The cat sat on the", "choices": ["mat.", "park.", "sky."], "answer": 0},
          {"question": "", "choices": ["The dog", "The mat", "Yes"], "answer": 0}]
    roll = [{"text": HARNESS_TEXT * 3}, {"text": "Is it raining? " * 20}, {"text": "<|endoftext|>The cat"}]
    gen = [{"prompt": "Q: What do cows say? A:", "answer": " moo"}, {"prompt": "The dog ran", "answer": " in"},
           {"prompt": "Is it", "answer": " raining"}, {"prompt": "Q:", "answer": " What"}]
    train_harness_model(HARNESS_TEXT, root / "model")
    return HarnessFiles(root / "model", write_lm_eval_tasks(root, "tiny", mc, roll, gen, HARNESS_STOPS))




def lm_eval_responses(results: dict, task: str) -> list:
    """lm-eval's responses to one task's requests, in document order."""
    return [s["resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def assert_same_lm_eval_scores(ours: dict, theirs: dict, prefix: str, stops: list[str]) -> None:
    """Two lm-eval runs of the {prefix}_mc / _roll / _gen tasks agree: accuracy, bits per byte, and the greedy
    generations, which are non-empty and cut at the stop strings."""
    assert ours["results"][f"{prefix}_mc"]["acc,none"] == theirs["results"][f"{prefix}_mc"]["acc,none"]
    assert ours["results"][f"{prefix}_roll"]["bits_per_byte,none"] == pytest.approx(
        theirs["results"][f"{prefix}_roll"]["bits_per_byte,none"], rel=1e-5)
    generated = lm_eval_responses(ours, f"{prefix}_gen")
    assert generated == lm_eval_responses(theirs, f"{prefix}_gen")
    texts = [r[0] for r in generated]
    assert any(texts), "the trained model should generate text before a stop string"
    assert not any(s in t for t in texts for s in stops)  # cut at the stop strings


# ------------------------------------------------------------------------------------------------------ benchmarks
def load_benchmark(name: str):
    """benchmarks/{name}.py as a module (benchmarks/ is not a package, so it is loaded from its file), registered in
    sys.modules as benchmarks_{name}, where dataclasses look their module up. While it loads, benchmarks/ is first on
    sys.path, as it is for `python benchmarks/{name}.py`, so its shared helpers (`import _procs`) are found."""
    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", Path(folder) / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module


def run_benchmark_without_the_kernel(name: str, monkeypatch) -> None:
    """Run benchmarks/{name}.py's main() with no arguments as if the native kernel could not be built (its reason:
    "no C++ compiler found"); a benchmark that needs the kernel must say why and return."""
    from gpt2lab import native

    bench = load_benchmark(name)
    monkeypatch.setattr(native, "library", lambda: None)
    monkeypatch.setattr(native, "unavailable_reason", lambda: "no C++ compiler found")
    monkeypatch.setattr(sys, "argv", [f"{name}.py"])
    bench.main()


# ------------------------------------------------------------------------------------------------------ decoding
def modules_and_step(model, step, prompt, tokens, positions=None, mask=None, max_length=None, reference=None):
    """Each step's logits through the modules and through `step` (FlatStep's signature), from two caches filled by
    the same prefill; returns ((module logits, step logits), (module cache, step cache)). `reference` (default
    `model`) is the model whose modules make the prefill and the module logits, for a step whose layers compute
    differently from their own forward (the native step on bf16 or int8 layers)."""
    from gpt2lab.kv_cache import KVCache

    reference = reference or model
    B, T = prompt.shape
    caches = [KVCache.for_model(model, B, max_length or T + len(tokens)) for _ in range(2)]
    out = ([], [])
    with torch.no_grad():
        for cache in caches:
            reference(prompt, kv_cache=cache, attention_mask=None if mask is None else mask[:, :T],
                      position_ids=None if positions is None else positions[:, :T])
        for i, tok in enumerate(tokens):
            pos = None if positions is None else positions[:, T + i:T + i + 1]  # (B, 1)
            m = None if mask is None else mask[:, :T + i + 1]  # (B, S)
            out[0].append(reference(tok[:, None], kv_cache=caches[0], position_ids=pos, attention_mask=m)[:, -1])
            out[1].append(step(tok, caches[1], pos, m))
    return out, caches


def assert_step_refuses_a_full_cache_or_wrong_batch(model, step) -> None:
    """A decode step (FlatStep's signature) raises, naming the numbers, on a full cache or a batch the cache does
    not hold."""
    from gpt2lab.kv_cache import KVCache

    cache = KVCache.for_model(model, 2, max_length=3)
    with torch.no_grad():
        model(torch.zeros(2, 3, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="KV cache overflow: 3 cached"):
        step(torch.zeros(2, dtype=torch.long), cache)
    cache.reset()
    with pytest.raises(ValueError, match="holds 2 active rows, got 3"):
        step(torch.zeros(3, dtype=torch.long), cache)
