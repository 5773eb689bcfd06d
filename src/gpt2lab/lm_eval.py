"""lm-evaluation-harness runs gpt2lab models in-process: an lm-eval `LM` backed by our model, tokenizer and decoder.

EleutherAI's lm-evaluation-harness (`pip install -e ".[eval]"`) scores a model through three questions, and this
adapter answers each with gpt2lab's own batched forward pass and KV-cached decoding, in any inference precision:

- `loglikelihood`: log p(continuation | context) and whether greedy decoding would produce it (multiple choice).
- `loglikelihood_rolling`: log p(text) over windows of the model's context (perplexity tasks).
- `generate_until`: a greedy continuation that ends at the task's stop strings.

Tokenization of (context, continuation) pairs is lm-eval's own (`TemplateLM`), so the tokens scored are exactly those
`--model hf` scores on a `save_pretrained` export of the same model.

    python -m gpt2lab.lm_eval --model gpt2lab --model_args pretrained=DIR,dtype=bf16 --tasks lambada_openai

    import lm_eval
    lm_eval.simple_evaluate(model=HarnessModel("DIR", batch_size=16), tasks=["hellaswag"])

lm-eval 0.4.13 has no plugin entry point for models, so a bare `lm_eval --model gpt2lab` cannot find this class;
`python -m gpt2lab.lm_eval` registers it under the name "gpt2lab" and hands every argument to lm-eval's command line.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterator, Sequence

import torch

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # the optional `eval` extra is not installed
    raise ImportError(f"the lm-eval adapter needs lm-evaluation-harness ({e}); install it with: "
                      "pip install -e \".[eval]\"") from None

from gpt2lab import checks
from gpt2lab.cpu import default_threads
from gpt2lab.generate import decode_steps, vocab_limit_for
from gpt2lab.inference import INFERENCE_DTYPES, load_tokenizer_for, prepare_for_inference
from gpt2lab.sampling import SamplingParams
from gpt2lab.model import GPT
from gpt2lab.native_step import threads_adapt

DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256

Request = tuple[Any, list[int], list[int]]  # (cache key, context ids, continuation ids), as TemplateLM builds them


def _positive(name: str, value: int | str | None, default: int) -> int:
    """An lm-eval argument that must be a positive integer (lm-eval passes model_args as strings), or `default`."""
    if value is None:
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = value  # checks.integer names it
    return checks.integer(name, number, 1)


def _batch_size(value: int | str | None) -> int:
    """lm-eval passes `batch_size` as an int, a digit string or "auto[:N]"; auto means our default."""
    if isinstance(value, str) and value.startswith("auto"):
        return DEFAULT_BATCH_SIZE
    return _positive("batch_size", value, DEFAULT_BATCH_SIZE)


def scoring_windows(requests: Sequence[Request], max_length: int) -> list[tuple[list[int], list[int]]]:
    """Each request as (input ids, target ids): the inputs are context + continuation without its last token (it
    predicts nothing), keeping the last `max_length`; the targets are the continuation tokens that the last
    len(targets) input positions predict.

    >>> scoring_windows([(None, [1, 2], [3, 4])], max_length=8)
    [([1, 2, 3], [3, 4])]
    """
    windows = []
    for _, context, continuation in requests:
        if not continuation:
            raise ValueError("a loglikelihood request has an empty continuation; there is nothing to score")
        tokens = (list(context) + list(continuation))[-(max_length + 1):]
        inputs = tokens[:-1]
        windows.append((inputs, tokens[-min(len(continuation), len(inputs)):]))
    return windows


def _longest_first(lengths: Sequence[int], batch_size: int) -> Iterator[list[int]]:
    """Request indices in batches of similar length, longest first (padding is wasted work; a memory error, if any,
    comes at the start)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


@register_model("gpt2lab")
class HarnessModel(TemplateLM):
    """A gpt2lab model as lm-eval sees it.

    - pretrained: a model directory or hub name (as `gpt2lab generate --model`), or a `GPT` already in memory.
    - dtype: fp32 (exact), bf16, int8 or int4 weights, as `prepare_for_inference`.
    - batch_size: sequences per forward pass / per decode batch; "auto" picks our default.
    - tokenizer: a tokenizer spec, or a tokenizer object (default: the model directory's, else GPT-2's).
    - max_length: the context window scored (default and maximum: the model's n_ctx).
    - max_gen_toks: tokens generated when a task does not say (lm-eval's default, 256).
    - device: "cpu" (every dtype) or another torch device (fp32 only).
    """

    def __init__(self, pretrained: str | GPT, dtype: str = "fp32", batch_size: int | str | None = DEFAULT_BATCH_SIZE,
                 tokenizer: Any = None, max_length: int | str | None = None, max_gen_toks: int | str | None = None,
                 device: str | None = None, threads: int | str | None = None, **ignored: Any) -> None:
        super().__init__()
        if dtype not in INFERENCE_DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose one of: {', '.join(INFERENCE_DTYPES)}")
        # threads: given, or gpt2lab.cpu.default_threads (shared busy cores slow decoding several times)
        torch.set_num_threads(_positive("threads", threads, 1) if threads is not None
                              else default_threads(threads_adapt()))
        self.model, self.tokenizer = _load(pretrained, dtype, tokenizer, device)
        if getattr(self.tokenizer, "eot_token", None) is None:
            raise ValueError("lm-eval needs an end-of-text token (its empty-context prefix); this tokenizer has none")
        n_ctx = self.model.config.n_ctx
        self._max_length = _positive("max_length", max_length, n_ctx)
        if self._max_length > n_ctx:
            raise ValueError(f"max_length must be at most the model's n_ctx={n_ctx}, got {self._max_length}")
        self._max_gen_toks = _positive("max_gen_toks", max_gen_toks, DEFAULT_MAX_GEN_TOKS)
        self.batch_size = _batch_size(batch_size)
        self.dtype = dtype

    # ----------------------------------------------------------------------------------------- what lm-eval asks
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_token

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def device(self) -> torch.device:
        return self.model.ln_f.weight.device

    @property
    def tokenizer_name(self) -> str:
        return type(self.tokenizer).__name__

    def get_model_info(self) -> dict[str, Any]:
        return {"model_num_parameters": self.model.num_parameters(), "model_dtype": self.dtype}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Text -> ids; special-token text such as <|endoftext|> maps to its id, as Hugging Face tokenizers do."""
        return self.tokenizer.encode(string, allowed_special="all")

    def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(tokens)

    # ------------------------------------------------------------------------------------------------ scoring
    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(log-probability, is greedy) of each request's continuation, in the order given."""
        windows = scoring_windows(requests, self.max_length)
        results: list[tuple[float, bool]] = [(0.0, False)] * len(windows)
        bar = _progress(len(windows), "loglikelihood", disable_tqdm)
        for batch in _longest_first([len(w[0]) for w in windows], self.batch_size):
            for i, answer in zip(batch, self._score_batch([windows[i] for i in batch])):
                results[i] = answer
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
            bar.update(len(batch))
        bar.close()
        return results

    @torch.inference_mode()
    def _score_batch(self, windows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """One right-padded forward pass; only the scored positions go through the LM head.

        Right padding needs no mask: attention is causal, so a row's real positions never see its padding."""
        T = max(len(inputs) for inputs, _ in windows)
        idx = torch.zeros(len(windows), T, dtype=torch.long)  # (B, T), padded with id 0
        for row, (inputs, _) in enumerate(windows):
            idx[row, :len(inputs)] = torch.tensor(inputs, dtype=torch.long)
        self.model.eval()
        hidden = self.model.hidden_states(idx.to(self.device))  # (B, T, C)
        rows = [torch.full((len(targets),), row) for row, (_, targets) in enumerate(windows)]
        cols = [torch.arange(len(inputs) - len(targets), len(inputs)) for inputs, targets in windows]
        picked = hidden[torch.cat(rows).to(self.device), torch.cat(cols).to(self.device)]  # (N, C): scored positions
        logprobs = torch.log_softmax(self.model.lm_head(picked[None])[0].float(), dim=-1)  # (N, V)
        targets = torch.tensor([t for _, row in windows for t in row], device=self.device)  # (N,)
        chosen = logprobs.gather(1, targets[:, None]).squeeze(1)  # (N,)
        greedy = logprobs.argmax(dim=-1) == targets  # (N,)
        answers, start = [], 0
        for _, row in windows:
            n = len(row)
            answers.append((float(chosen[start:start + n].sum()), bool(greedy[start:start + n].all())))
            start += n
        return answers

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """log p(text) with every token predicted once, in disjoint windows of at most `max_length` tokens, each with
        as much earlier text as fits (lm-eval's rolling windows; the first token is conditioned on end-of-text)."""
        owners, windows = [], []
        for n, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                owners.append(n)
                windows.append((None, context, continuation))
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owners, scores):
            totals[n] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # --------------------------------------------------------------------------------------------- generation
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, with do_sample, sampled) continuations, each cut at the first of its stop strings; requests
        with the same settings decode together in batches."""
        results: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for n, req in enumerate(requests):
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(n)
        bar = _progress(len(requests), "generate_until", disable_tqdm)
        for members in groups.values():
            kwargs = normalize_gen_kwargs(requests[members[0]].args[1], self.max_gen_toks)
            stops = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok_decode([self.eot_token_id]))
            max_new, sampling = int(kwargs.pop("max_gen_toks")), _sampling(kwargs)
            prompts = [self._prompt(requests[n].args[0], max_new) for n in members]
            for batch in _longest_first([len(p) for p in prompts], self.batch_size):
                texts = self._generate_batch([prompts[i] for i in batch], max_new, sampling, stops)
                for i, text in zip(batch, texts):
                    context, gen_kwargs = requests[members[i]].args
                    results[members[i]] = text
                    self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
                bar.update(len(batch))
        bar.close()
        return results

    def _prompt(self, context: str, max_new: int) -> list[int]:
        """The context's ids, cut from the left to leave room for `max_new` tokens ([eot] for an empty context)."""
        room = self.max_length - max_new
        if room < 1:
            raise ValueError(f"max_gen_toks={max_new} leaves no room for a prompt in max_length={self.max_length}")
        ids = self.tok_encode(context)[-room:]
        return ids or [self.eot_token_id]

    def _generate_batch(self, prompts: list[list[int]], max_new: int, sampling: SamplingParams,
                        stops: list[str]) -> list[str]:
        """Decode the prompts together; a row leaves the batch at end-of-text or as soon as a stop string appears."""
        out = [bytearray() for _ in prompts]
        done = [False] * len(prompts)
        steps = decode_steps(self.model, prompts, max_new, sampling, eos_token_id=self.eot_token_id,
                             should_stop=lambda row: done[row], logprobs=False,
                             vocab_limit=vocab_limit_for(self.model, self.tokenizer))
        for events in steps:
            for row, event in enumerate(events):
                if event is None or event.token == self.eot_token_id:
                    continue
                out[row] += self.tokenizer.decode_bytes([event.token])
                text = out[row].decode("utf-8", errors="replace")
                done[row] = any(s and s in text for s in stops)
        texts = [b.decode("utf-8", errors="replace") for b in out]
        return [postprocess_generated_text(generation=t, stop=stops, think_end_token=None) for t in texts]


def _sampling(kwargs: dict[str, Any]) -> SamplingParams:
    """lm-eval's normalized generation kwargs -> our SamplingParams (greedy unless do_sample with temperature > 0)."""
    if not kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0)) == 0.0:
        return SamplingParams(temperature=0.0)
    return SamplingParams(temperature=float(kwargs["temperature"]), top_k=kwargs.get("top_k"),
                          top_p=kwargs.get("top_p"))


def _progress(total: int, what: str, disable: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"gpt2lab {what}", disable=disable, file=sys.stderr)


def _load(pretrained: str | GPT, dtype: str, tokenizer: Any, device: str | None) -> tuple[GPT, Any]:
    """The model in its inference precision and its tokenizer (a model object needs its tokenizer passed)."""
    from gpt2lab.checkpoint import load_model, resolve_model_dir
    from gpt2lab.tokenizer import load_tokenizer

    on_cpu = _runs_on_cpu(device, dtype)
    if isinstance(pretrained, GPT):
        if tokenizer is None:
            raise ValueError("pass the tokenizer together with a model object (tokenizer=...)")
        model = pretrained
    else:
        directory = resolve_model_dir(pretrained)
        model = load_model(directory)
        if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
            spec = None if tokenizer is None else str(tokenizer)
            tokenizer = load_tokenizer_for(str(directory), model.config.vocab_size, spec)
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(str(tokenizer))
    model = prepare_for_inference(model, dtype) if on_cpu else model.eval().to(device)
    return model, tokenizer


def _runs_on_cpu(device: str | None, dtype: str) -> bool:
    """Whether to run on the CPU. lm-eval's command line asks for "cuda:0" by default, so as its own `hf` model does,
    a CUDA device without CUDA falls back to the CPU; bf16 and int8 are CPU kernels and always run there."""
    if device in (None, "cpu"):
        return True
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        return True
    if dtype != "fp32":
        print(f"gpt2lab: dtype={dtype} runs on the CPU (device {device!r} is for fp32)", file=sys.stderr)
        return True
    return False


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m gpt2lab.lm_eval ...`: lm-eval's own command line, with "gpt2lab" registered as a model."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
