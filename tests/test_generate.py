"""Generation: the cache is exact, batches and padding are exact, sampling is controlled and reproducible, streaming
never splits characters or stop strings. (The inference precisions are tested in test_quantize.py, the command line
in test_cli_generate.py.)

Oracles: decoding without the cache (the model's plain forward), and `transformers`' `generate` on the same weights.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gpt2lab import GPT, GPTConfig
from gpt2lab import generate as generation
from gpt2lab.fast_step import FlatStep
from gpt2lab.generate import Decoder, TokenEvent, decode_steps, default_step, generate, prompt_logprobs, stream_text
from gpt2lab.kv_cache import KVCache
from gpt2lab.sampling import (SamplingParams, apply_repetition_penalty, apply_top_k, apply_top_p, choose_tokens,
                              draw_uniforms, process_logits, sample_inverse_cdf)

from conftest import CONFIGS, make_model  # the config families and sharpened weights shared with test_fast_step


def greedy_without_cache(model: GPT, idx: torch.Tensor, n: int, keep: int | None = None) -> torch.Tensor:
    """The definition: run the whole sequence through the model for every token; slide the window like Decoder."""
    n_ctx = model.config.n_ctx
    keep = keep if keep is not None else max(1, 3 * n_ctx // 4)
    seq, start = idx.clone(), 0
    with torch.no_grad():
        for _ in range(n):
            if seq.size(1) - start > n_ctx:
                start = seq.size(1) - keep
            nxt = model(seq[:, start:])[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    return seq


def to_transformers(model: GPT, tmp_path):
    from transformers import GPT2LMHeadModel

    model.save_pretrained(tmp_path / "m")
    return GPT2LMHeadModel.from_pretrained(tmp_path / "m").eval()


# ------------------------------------------------------------------------------------------------------- KV cache
def test_kv_cache_writes_columns_and_returns_views():
    cache = KVCache(n_layer=2, batch_size=2, n_head=3, max_length=6, head_dim=4)
    k1, v1 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    k, v = cache.update(1, k1, v1)
    assert k.shape == (2, 3, 4, 4) and torch.equal(k, k1) and torch.equal(v, v1)
    cache.advance(4)
    k2 = torch.randn(2, 3, 1, 4)
    k, _ = cache.update(1, k2, k2)
    assert k.shape == (2, 3, 5, 4) and torch.equal(k[:, :, 4:], k2) and torch.equal(k[:, :, :4], k1)
    assert k.data_ptr() == cache.k[1].data_ptr()  # a view of the preallocated buffer, not a copy
    cache.advance(1)
    with pytest.raises(ValueError, match="overflow"):
        cache.update(0, torch.randn(2, 3, 2, 4), torch.randn(2, 3, 2, 4))


def test_kv_cache_keep_rows_moves_rows_to_front():
    cache = KVCache(n_layer=1, batch_size=3, n_head=1, max_length=4, head_dim=2)
    k = torch.arange(3 * 2 * 2, dtype=torch.float32).view(3, 1, 2, 2)
    cache.update(0, k, -k)
    cache.advance(2)
    cache.keep_rows(torch.tensor([2, 0]))
    assert cache.batch_size == 2
    assert torch.equal(cache.k[0, :2, :, :2], k[[2, 0]]) and torch.equal(cache.v[0, :2, :, :2], -k[[2, 0]])


# ----------------------------------------------------------------------------------------- greedy is exact
@pytest.mark.parametrize("name", list(CONFIGS))
def test_greedy_with_cache_equals_without(name):
    model = make_model(CONFIGS[name])
    idx = torch.randint(0, model.config.vocab_size, (3, 5), generator=torch.Generator().manual_seed(1))
    out = generate(model, idx, 12, temperature=0)
    assert out.shape == (3, 17) and torch.equal(out[:, :5], idx)
    assert torch.equal(out, greedy_without_cache(model, idx, 12))


@pytest.mark.parametrize("name", ["tiny", "wide", "relu-nobias"])
def test_greedy_equals_transformers(name, tmp_path):
    model = make_model(CONFIGS[name])
    hf = to_transformers(model, tmp_path)
    idx = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(2))
    ours = model.generate(idx, 15, temperature=0)
    theirs = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=15, min_new_tokens=15,
                         do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(ours, theirs)


def test_left_padded_batch_equals_transformers_and_rows_alone(tmp_path):
    model = make_model(CONFIGS["wide"], seed=3)
    hf = to_transformers(model, tmp_path)
    g = torch.Generator().manual_seed(4)
    lengths = [7, 3, 5, 1]
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=g) for n in lengths]
    T = max(lengths)
    pad = 5
    idx = torch.full((len(prompts), T), pad)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, T - len(p):] = p
        mask[i, T - len(p):] = 1
    ours = generate(model, idx, 10, temperature=0, attention_mask=mask)
    theirs = hf.generate(idx, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                         pad_token_id=pad, eos_token_id=None)
    assert torch.equal(ours, theirs)
    for i, p in enumerate(prompts):  # padding changes nothing: each row decodes as it would alone
        alone = generate(model, p[None], 10, temperature=0)
        assert torch.equal(ours[i, T:], alone[0, len(p):])


def test_each_row_stops_at_its_own_eos_like_transformers(tmp_path):
    model = make_model(CONFIGS["tiny"], seed=5)
    hf = to_transformers(model, tmp_path)
    idx = torch.randint(0, 97, (4, 4), generator=torch.Generator().manual_seed(6))
    free = generate(model, idx, 12, temperature=0)
    eos = int(free[0, 4 + 3])  # row 0 produces this token at its 4th step; other rows may later or never
    ours = generate(model, idx, 12, temperature=0, eos_token_id=eos)
    theirs = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=12, do_sample=False,
                         pad_token_id=eos, eos_token_id=eos)
    assert torch.equal(ours[:, :theirs.size(1)], theirs)
    assert torch.equal(ours[0, 8:], torch.full((8,), eos))  # after its end a row holds eos only
    for row in range(4):
        gen, ref = ours[row, 4:], free[row, 4:]
        stop = int((ref == eos).nonzero()[0]) + 1 if bool((ref == eos).any()) else 12
        assert torch.equal(gen[:stop], ref[:stop]) and bool((gen[stop:] == eos).all())


@pytest.mark.parametrize("name", ["tiny", "sinusoidal"])
def test_generation_past_n_ctx_slides_the_window(name):
    model = make_model(CONFIGS[name], seed=7)
    n_ctx = model.config.n_ctx
    idx = torch.randint(0, model.config.vocab_size, (2, n_ctx - 3), generator=torch.Generator().manual_seed(8))
    n = 2 * n_ctx
    out = generate(model, idx, n, temperature=0)
    assert out.shape == (2, n_ctx - 3 + n)
    assert torch.equal(out, greedy_without_cache(model, idx, n))


def test_sliding_window_with_padding_matches_rows_alone():
    model = make_model(CONFIGS["tiny"], seed=9)
    a, b = [3, 1, 4, 1, 5, 9, 2, 6], [5, 3]
    events = list(decode_steps(model, [a, b], 40, SamplingParams(temperature=0)))
    for i, p in enumerate([a, b]):
        got = [e[i].token for e in events]
        alone = generate(model, torch.tensor([p]), 40, temperature=0)[0, len(p):].tolist()
        assert got == alone


def test_decoder_keep_controls_the_slide():
    model = make_model(CONFIGS["tiny"], seed=10)
    idx = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(11))
    decoder = Decoder(model, idx, max_new_tokens=10, keep=8)
    with torch.no_grad():
        logits = decoder.prefill()
        for _ in range(5):
            logits = decoder.step(logits.argmax(-1))
    assert decoder.length == 35 and decoder.start == 35 - 8 - 2  # slid at 33 tokens, then 2 cached steps
    with pytest.raises(ValueError, match="keep"):
        Decoder(model, idx, keep=0)


def test_the_default_step_is_built_again_after_each_re_encoding_of_the_window(monkeypatch):
    """The re-encoding runs the modules on the model's weights of now, so the default step is built anew after it
    (a native step reads the weights it was built with: a decode must not mix two sets); a given `make_step`, which
    may be costly (a compiled step) or hand back one prebuilt step, is called once."""
    from gpt2lab import generate as generation

    model = make_model(CONFIGS["tiny"], seed=10)
    built = []
    default = generation.default_step

    def counting(m):
        built.append(m)
        return default(m)

    monkeypatch.setattr(generation, "default_step", counting)
    idx = torch.randint(0, 97, (1, 30), generator=torch.Generator().manual_seed(11))
    for make_step, calls in ((None, 2), (counting, 1)):
        built.clear()
        decoder = Decoder(model, idx, max_new_tokens=10, keep=8, make_step=make_step)
        with torch.no_grad():
            logits = decoder.prefill()
            for _ in range(5):
                logits = decoder.step(logits.argmax(-1))
        assert len(built) == calls and decoder.start > 0  # at construction (and after the one slide)


# --------------------------------------------------------------------------------------------------- decode steps
def test_the_default_step_is_the_native_or_flat_step_where_it_applies(monkeypatch):
    from gpt2lab import native
    from gpt2lab.native_step import NativeStep

    model = make_model(CONFIGS["tiny"])
    prompt = torch.tensor([[3, 1, 4]])
    expected = NativeStep if native.library() is not None else FlatStep
    assert type(default_step(model)) is expected
    assert type(Decoder(model, prompt, max_new_tokens=2).fast_step) is expected
    monkeypatch.setattr(native, "library", lambda: None)  # no kernel here: the flat step
    assert type(default_step(model)) is FlatStep
    monkeypatch.undo()
    model.train()
    assert default_step(model) is None  # dropout: the modules run
    model.eval()


def test_a_custom_step_is_called_for_every_token_after_the_prefill():
    """`make_step` gets the model once per decode; its step replaces the flat one and computes the same tokens."""
    model = make_model(CONFIGS["tiny"], seed=12)
    prompts = [[3, 1, 4, 1, 5], [9, 2]]  # left padding: the step gets positions and a mask
    made, calls = [], []

    def make_step(m):
        made.append(m)
        flat = FlatStep(m)

        def step(tokens, cache, positions=None, attention_mask=None):
            calls.append((tokens.shape, positions is not None, attention_mask is not None))
            return flat(tokens, cache, positions, attention_mask)
        return step

    plain = list(decode_steps(model, prompts, 6, SamplingParams(temperature=0)))
    custom = list(decode_steps(model, prompts, 6, SamplingParams(temperature=0), make_step=make_step))
    assert [[e.token for e in ev] for ev in custom] == [[e.token for e in ev] for ev in plain]
    assert made == [model] and calls == [((2,), True, True)] * 5  # 6 tokens: the prefill's, then 5 steps
    idx = torch.tensor([prompts[0]])
    assert torch.equal(generate(model, idx, 4, temperature=0, make_step=make_step),
                       generate(model, idx, 4, temperature=0))
    assert len(made) == 2 and len(calls) == 5 + 3


def test_the_step_decides_the_logits_and_none_runs_the_modules():
    model = make_model(CONFIGS["tiny"], seed=13)
    idx = torch.tensor([[5, 6, 7]])

    def always_seven(m):
        def step(tokens, cache, positions=None, attention_mask=None):
            cache.advance(1)
            logits = torch.zeros(tokens.size(0), m.config.vocab_size)  # (B, V)
            logits[:, 7] = 1.0
            return logits
        return step

    out = generate(model, idx, 5, temperature=0, make_step=always_seven)
    assert out[0, 4:].tolist() == [7] * 4  # the first new token comes from the prefill, the rest from the step
    assert out[0, 3] == generate(model, idx, 1, temperature=0)[0, 3]
    calls = []
    handle = model.h[0].register_forward_hook(lambda *args: calls.append(1))  # counts the modules' forwards
    try:
        modules = generate(model, idx, 5, temperature=0, make_step=lambda m: None)
    finally:
        handle.remove()
    assert len(calls) == 5 and torch.equal(modules, generate(model, idx, 5, temperature=0))


def test_decoding_asks_default_step_at_call_time(monkeypatch):
    """The one place that picks the default step: replacing `default_step` changes what every decode uses."""
    model = make_model(CONFIGS["tiny"])
    asked = []
    monkeypatch.setattr(generation, "default_step", lambda m: asked.append(m))  # -> None: the modules
    generate(model, torch.tensor([[1, 2]]), 3, temperature=0)
    list(decode_steps(model, [[1, 2]], 3, SamplingParams(temperature=0)))
    assert asked == [model, model]


def test_a_bad_make_step_is_refused_by_name():
    model = make_model(CONFIGS["tiny"])
    idx = torch.tensor([[1, 2]])
    with pytest.raises(TypeError, match="make_step must be a function model -> decode step .*, got str"):
        generate(model, idx, 3, make_step="flat")
    with pytest.raises(TypeError, match="make_step must be a function"):
        decode_steps(model, [[1, 2]], 3, SamplingParams(), make_step=42)
    with pytest.raises(TypeError, match="make_step returned int, not a decode step"):
        generate(model, idx, 3, make_step=lambda m: 1)


# ------------------------------------------------------------------------------------------------------- sampling
def test_sampling_is_reproducible_with_a_seed_and_varies_without():
    model = make_model(CONFIGS["tiny"])
    idx = torch.zeros(2, 1, dtype=torch.long)
    kw = dict(temperature=1.3, top_k=40, top_p=0.95)
    a = generate(model, idx, 20, generator=torch.Generator().manual_seed(0), **kw)
    b = generate(model, idx, 20, generator=torch.Generator().manual_seed(0), **kw)
    c = generate(model, idx, 20, generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_inverse_cdf_sampling_matches_the_target_distribution():
    target = torch.tensor([0.30, 0.0, 0.25, 0.15, 0.0, 0.12, 0.10, 0.08])  # zeros inside, none at the ends
    n = 40_000
    logits = target.log().expand(n, -1)  # (n, V): n independent draws from one distribution
    counts = torch.bincount(choose_tokens(logits, SamplingParams(), generator=torch.Generator().manual_seed(0)),
                            minlength=8)
    assert counts[target == 0].sum() == 0  # impossible tokens never come up
    expected = n * target[target > 0]
    chi2 = float(((counts[target > 0] - expected) ** 2 / expected).sum())
    assert chi2 < 25.7  # 5 degrees of freedom: exceeded with probability 1e-4 by a correct sampler
    # with the filters: top-k 3 of these is [0.30, 0.25, 0.15] renormalised
    counts = torch.bincount(choose_tokens(logits, SamplingParams(top_k=3), generator=torch.Generator().manual_seed(1)),
                            minlength=8)
    kept = torch.tensor([0.30, 0.25, 0.15]) / 0.70
    assert counts.sum() == counts[[0, 2, 3]].sum() == n
    chi2 = float(((counts[[0, 2, 3]] - n * kept) ** 2 / (n * kept)).sum())
    assert chi2 < 18.5  # 2 degrees of freedom, p = 1e-4


def test_inverse_cdf_edges_never_pick_impossible_tokens():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]] * 4)
    u = torch.tensor([0.0, 0.5 - 1e-12, 0.5, 1 - 2**-53], dtype=torch.float64)
    assert sample_inverse_cdf(probs, u).tolist() == [1, 1, 3, 3]  # both ends of [0, 1) and the boundary
    # unnormalised rows, and float32 probabilities that sum to a bit more or less than 1
    assert sample_inverse_cdf(torch.tensor([[3.0, 0.0, 1.0]]), torch.tensor([0.74], dtype=torch.float64)).item() == 0
    assert sample_inverse_cdf(torch.tensor([[3.0, 0.0, 1.0]]), torch.tensor([0.76], dtype=torch.float64)).item() == 2
    probs = torch.randn(64, 1000, generator=torch.Generator().manual_seed(0)).mul(4).softmax(-1)
    probs[:, -1] = 0
    top = sample_inverse_cdf(probs, torch.full((64,), 1 - 2**-53, dtype=torch.float64))
    assert (top < 999).all() and (probs[torch.arange(64), top] > 0).all()


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch():
    logits = torch.randn(16, 300, generator=torch.Generator().manual_seed(0)) * 2
    params = SamplingParams(temperature=0.9, top_p=0.95)
    gens = lambda: [torch.Generator().manual_seed(100 + r) for r in range(16)]  # noqa: E731
    batch_gens, row_gens = gens(), gens()
    for _ in range(5):  # five steps: each row's generator advances by one draw per step, whatever the batch
        together = choose_tokens(logits, params, generator=batch_gens)
        alone = [choose_tokens(logits[r:r + 1], params, generator=row_gens[r]).item() for r in range(16)]
        assert together.tolist() == alone
    again = [choose_tokens(logits, params, generator=gens()).tolist() for _ in range(2)]
    assert again[0] == again[1] and len(set(again[0])) > 3  # reproducible, and not one token for every row
    shuffled = torch.randperm(16, generator=torch.Generator().manual_seed(1))
    reordered = choose_tokens(logits[shuffled], params, generator=[gens()[r] for r in shuffled.tolist()])
    assert torch.equal(reordered, torch.tensor(again[0])[shuffled])
    with pytest.raises(ValueError, match="2 generators for 3 rows"):
        draw_uniforms(3, [None, None])


def test_decode_steps_rows_with_own_generators_match_rows_alone():
    model = make_model(CONFIGS["tiny"], seed=5)
    prompts = [[1, 2, 3], [4], [5, 6], [7, 8]]
    params = SamplingParams(temperature=1.2, top_k=20)
    seeds = (11, 12, None, 13)  # the unseeded row draws from torch's default generator
    gens = lambda: [torch.Generator().manual_seed(s) if s is not None else None for s in seeds]  # noqa: E731
    together = list(decode_steps(model, prompts, 8, params, generators=gens()))
    for i in (0, 1, 3):
        alone = list(decode_steps(model, [prompts[i]], 8, params, generators=[gens()[i]]))
        assert [s[i].token for s in together] == [s[0].token for s in alone]


def test_top_k_one_is_greedy_and_low_temperature_approaches_it():
    model = make_model(CONFIGS["wide"])
    idx = torch.randint(0, 211, (2, 4), generator=torch.Generator().manual_seed(3))
    greedy = generate(model, idx, 10, temperature=0)
    assert torch.equal(generate(model, idx, 10, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0)), greedy)
    assert torch.equal(generate(model, idx, 10, temperature=1e-4, generator=torch.Generator().manual_seed(0)), greedy)


def test_filters_match_transformers_logits_processors():
    from transformers import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3
    ids = torch.randint(0, 50, (4, 7), generator=g)
    seen = torch.zeros(4, 50, dtype=torch.bool).scatter_(1, ids, True)
    assert torch.equal(apply_repetition_penalty(logits, seen, 1.7), RepetitionPenaltyLogitsProcessor(1.7)(ids, logits.clone()))
    assert torch.equal(apply_top_k(logits, 5), TopKLogitsWarper(5)(ids, logits.clone()))
    for p in (0.1, 0.5, 0.9, 0.999):
        ours, theirs = apply_top_p(logits, p), TopPLogitsWarper(p)(ids, logits.clone())
        assert torch.equal(torch.isinf(ours), torch.isinf(theirs)), p
    params = SamplingParams(temperature=0.7, top_k=10, top_p=0.8, repetition_penalty=1.3)
    expected = ids, logits.clone()
    expected = RepetitionPenaltyLogitsProcessor(1.3)(*expected)
    for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(10), TopPLogitsWarper(0.8)):
        expected = warper(ids, expected)
    assert torch.allclose(process_logits(logits, params, seen), expected)


def test_top_p_keeps_the_smallest_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda p: (~torch.isinf(apply_top_p(logits, p))).sum().item()  # noqa: E731
    assert [kept(p) for p in (0.1, 0.5, 0.6, 0.8, 0.85, 0.96, 1.0)] == [1, 1, 2, 2, 3, 4, 4]


def full_sort_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Reference nucleus filter, written plainly: sort each whole row, mass in float64. (B, V) bool: kept."""
    keep = torch.zeros_like(logits, dtype=torch.bool)
    for r, row in enumerate(logits):
        ranked, order = torch.sort(row, descending=True)
        probs = ranked.double().softmax(dim=-1)
        keep[r, order[(probs.cumsum(dim=-1) - probs) < p]] = True
    return keep


def test_top_p_matches_a_full_sort_on_flat_peaked_and_wide_rows():
    # GPT-2's vocabulary: scale 0.05 (nearly flat: nucleus of ~45k tokens, past every candidate set, so sorted
    # whole), 3 (~2k tokens: past the first candidate set), 8 and 20 (peaked: settled within 256 candidates).
    g = torch.Generator().manual_seed(5)
    rows = torch.randn(8, 50257, generator=g) * torch.tensor([0.05, 3, 8, 20, 3, 8, 20, 0.05])[:, None]
    for p in (0.05, 0.5, 0.9, 0.99):
        out = apply_top_p(rows, p)
        assert torch.equal(~torch.isinf(out), full_sort_top_p(rows, p)), p
        assert torch.equal(out[~torch.isinf(out)], rows[~torch.isinf(out)])  # survivors keep their logits


def test_top_p_ties_at_the_boundary_follow_the_sort():
    # Eight equal logits on top, then lower ones: a nucleus that ends inside the tie keeps as many of them as the
    # full sort does; one that covers the tie keeps all of them and stops exactly where the sort does.
    logits = torch.full((2, 5000), -5.0)
    logits[:, 100:108] = 4.0
    logits[1, 3000:3010] = 2.0
    for p in (0.2, 0.5, 0.99):
        kept, ref = ~torch.isinf(apply_top_p(logits, p)), full_sort_top_p(logits, p)
        assert torch.equal(kept.sum(dim=-1), ref.sum(dim=-1)), p
        for r in range(2):  # the same multiset of kept logits
            assert torch.equal(logits[r][kept[r]].sort().values, logits[r][ref[r]].sort().values), p


def test_top_p_after_temperature_and_top_k_matches_a_full_sort():
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 50257, generator=g) * 4
    for params in (SamplingParams(temperature=0.6, top_p=0.9), SamplingParams(temperature=1.7, top_k=3000, top_p=0.95),
                   SamplingParams(top_k=40, top_p=0.999)):
        scaled = apply_top_k(logits / params.temperature, params.top_k) if params.top_k else logits / params.temperature
        out = process_logits(logits, params)
        assert torch.equal(~torch.isinf(out), full_sort_top_p(scaled, params.top_p) & ~torch.isinf(scaled)), params


def test_repetition_penalty_discourages_repeats():
    model = make_model(CONFIGS["tiny"], seed=1)
    idx = torch.tensor([[1, 2, 3]])
    plain = generate(model, idx, 30, temperature=0)[0, 3:]
    penalized = generate(model, idx, 30, temperature=0, repetition_penalty=1e4)[0, 3:]
    assert len(set(penalized.tolist())) == 30 > len(set(plain.tolist()))  # nothing repeats, not even the prompt
    assert not set(penalized.tolist()) & {1, 2, 3}


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.5), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=0), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(repetition_penalty=0), "repetition_penalty"),
])
def test_sampling_params_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_generate_rejects_bad_input():
    model = make_model(CONFIGS["tiny"])
    with pytest.raises(ValueError, match="n_ctx"):
        generate(model, torch.zeros(1, 33, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), -1)
    with pytest.raises(ValueError, match="eos_token_id"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), 2, eos_token_id=97)
    with pytest.raises(ValueError, match="T >= 1"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, torch.zeros(1, 3, dtype=torch.long), 2, temperature=-1)


def test_generate_restores_training_mode_and_zero_tokens():
    model = make_model(CONFIGS["tiny"]).train()
    idx = torch.tensor([[4, 5]])
    assert torch.equal(generate(model, idx, 0), idx)
    generate(model, idx, 2)
    assert model.training and all(m.training for m in model.modules())


def test_generate_runs_every_module_in_eval_mode_and_leaves_an_eval_model_so():
    """A model in eval mode with one module left training (its dropout would be live) decodes with every module in
    eval mode, and stays in eval mode after, as `model.eval()` would leave it; a wholly eval model is not touched."""
    model = make_model(GPTConfig(vocab_size=97, n_ctx=32, n_layer=2, n_head=2, n_embd=16, dropout=0.5))
    idx = torch.tensor([[4, 5]])
    want = generate(model, idx, 4, temperature=0)
    model.h[0].train()
    assert torch.equal(generate(model, idx, 4, temperature=0), want)  # no dropout
    assert not any(m.training for m in model.modules())


# --------------------------------------------------------------------------------------------------- decode_steps
def test_decode_steps_events_logprobs_and_finish_reasons():
    model = make_model(CONFIGS["wide"], seed=2)
    prompts = [[1, 2, 3, 4], [7], [9, 9]]
    events = list(decode_steps(model, prompts, [5, 2, 3], SamplingParams(temperature=0), top_logprobs=3))
    assert len(events) == 5
    assert [sum(e is not None for e in step) for step in events] == [3, 3, 2, 1, 1]
    for i, p in enumerate(prompts):
        mine = [step[i] for step in events if step[i] is not None]
        assert [e.finish_reason for e in mine] == [None] * (len(mine) - 1) + ["length"]
        tokens = [e.token for e in mine]
        assert tokens == generate(model, torch.tensor([p]), len(mine), temperature=0)[0, len(p):].tolist()
        with torch.no_grad():  # log-probs are log-softmax of the model's own logits at each step
            logits = model(torch.tensor([p + tokens]))[0, len(p) - 1:-1]
        ref = torch.log_softmax(logits, -1)
        for t, e in enumerate(mine):
            assert e.logprob == pytest.approx(ref[t, e.token].item(), abs=1e-4)
            top = torch.topk(ref[t], 3)
            assert [a for a, _ in e.top_logprobs] == top.indices.tolist()
            assert e.top_logprobs[0][0] == e.token  # greedy picks the most likely


def test_decode_steps_stop_reason_should_stop_and_per_row_settings():
    model = make_model(CONFIGS["tiny"], seed=4)
    prompts = [[1, 2], [3, 4], [5, 6]]
    free = list(decode_steps(model, prompts, 8, SamplingParams(temperature=0)))
    eos = free[2][0].token
    row0 = [s[0].token for s in free]
    polls: list[int] = []

    def should_stop(row: int) -> bool:  # row 1's client goes away before its third step
        polls.append(row)
        return row == 1 and polls.count(1) > 2

    stopped = list(decode_steps(model, prompts, 8, SamplingParams(temperature=0), eos_token_id=eos,
                                should_stop=should_stop))
    first = [s[0] for s in stopped if s[0] is not None]
    assert first[-1].token == eos and first[-1].finish_reason == "stop" and len(first) == row0.index(eos) + 1
    assert all(e.finish_reason is None for e in first[:-1])
    assert sum(s[1] is not None for s in stopped) == 2  # retired after two events, without a final event
    sampled = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.5, top_k=3), SamplingParams(temperature=0)]
    gens = lambda: [torch.Generator().manual_seed(s) for s in (1, 2, 3)]  # noqa: E731
    together = list(decode_steps(model, prompts, 6, sampled, generators=gens()))
    for i in range(3):  # a row with its own generator samples the same tokens whatever else is in the batch
        alone = list(decode_steps(model, [prompts[i]], 6, sampled[i], generators=[gens()[i]]))
        assert [s[i].token for s in together] == [s[0].token for s in alone]


def test_decode_steps_leaves_grad_mode_alone_between_steps():
    model = make_model(CONFIGS["tiny"]).train()
    steps = decode_steps(model, [[1, 2]], 5, SamplingParams(temperature=0))
    next(steps)
    assert torch.is_grad_enabled() and not model.training  # the consumer runs with its own grad mode
    steps.close()
    assert model.training  # restored when the generator ends


def test_decode_steps_validates():
    model = make_model(CONFIGS["tiny"])
    with pytest.raises(ValueError, match="empty"):
        decode_steps(model, [[1], []], 3, SamplingParams())
    with pytest.raises(ValueError, match=r"a token id of prompt 0 must be an integer in \[0, 96\], got 200"):
        decode_steps(model, [[1, 200]], 3, SamplingParams())
    with pytest.raises(ValueError, match="2 entries"):
        decode_steps(model, [[1]], [3, 4], SamplingParams())
    with pytest.raises(TypeError, match="SamplingParams"):
        decode_steps(model, [[1]], 3, {"temperature": 0})
    assert list(decode_steps(model, [[1]], 0, SamplingParams())) == []


def test_prompt_logprobs_are_log_softmax_of_a_plain_forward():
    model = make_model(CONFIGS["wide"], seed=6).train()
    ids = [5, 17, 200, 3, 3, 99, 42]
    events = prompt_logprobs(model, ids, top_logprobs=4)
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([ids]))[0].double(), dim=-1)  # (T, V)
    assert len(events) == len(ids) and events[0] is None  # nothing predicts the first token
    for t in range(1, len(ids)):
        e = events[t]
        assert e.token == ids[t] and e.finish_reason is None
        assert e.logprob == pytest.approx(ref[t - 1, ids[t]].item(), abs=1e-4)
        top = torch.topk(ref[t - 1], 4)
        assert [a for a, _ in e.top_logprobs] == top.indices.tolist()
        assert [lp for _, lp in e.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)
    assert all(not e.top_logprobs for e in prompt_logprobs(model, ids)[1:])
    assert prompt_logprobs(model, [7]) == [None]
    # the same figures as decode_steps reports for the tokens it generates
    generated = [s[0] for s in decode_steps(model, [ids[:3]], 4, SamplingParams(temperature=0))]
    scored = prompt_logprobs(model, ids[:3] + [e.token for e in generated])[3:]
    assert [e.logprob for e in scored] == pytest.approx([e.logprob for e in generated], abs=1e-4)


def test_prompt_logprobs_validates():
    model = make_model(CONFIGS["tiny"])
    for ids, match in (([], "empty"), ([1, 97], r"a token id of the prompt must be an integer in \[0, 96\], got 97"),
                       ([1] * 33, "n_ctx")):
        with pytest.raises(ValueError, match=match):
            prompt_logprobs(model, ids)
    with pytest.raises(ValueError, match="top_logprobs"):
        prompt_logprobs(model, [1, 2], top_logprobs=-1)


# ----------------------------------------------------------------------------------------------------- streaming
class ByteTokenizer:
    """Tokens 0..255 are bytes, 256 is end-of-text: enough to exercise stream_text without GPT-2's vocabulary."""

    eot_token = 256

    def encode(self, text, allowed_special=frozenset()):
        return list(text.encode("utf-8"))

    def decode_bytes(self, ids):
        return bytes(i for i in ids if i < 256)


def test_stream_text_equals_generate_and_stops():
    model = make_model(GPTConfig(vocab_size=257, n_ctx=64, n_layer=2, n_head=2, n_embd=32), seed=12)
    tok = ByteTokenizer()
    prompt = "héllo"
    ids = torch.tensor([tok.encode(prompt)])
    out = generate(model, ids, 20, temperature=0, eos_token_id=256)[0, ids.size(1):].tolist()
    body = out[:out.index(256)] if 256 in out else out
    expected = tok.decode_bytes(body).decode("utf-8", errors="replace")
    pieces = list(stream_text(model, tok, prompt, 20, temperature=0))
    assert "".join(pieces) == expected
    assert len(expected) > 3  # this seed's continuation is long enough to hold a stop string
    stop = expected[2:4]
    cut = "".join(stream_text(model, tok, prompt, 20, stop=[stop], temperature=0))
    assert cut == expected[:expected.index(stop)]
    assert "".join(stream_text(model, tok, prompt, 20, stop=stop, temperature=0)) == cut  # a string: one stop
    with pytest.raises(ValueError, match="n_ctx"):
        stream_text(model, tok, "x" * 65, 3)  # checked at the call, before any text is produced
    with pytest.raises(ValueError, match="temperature"):
        stream_text(model, tok, "x", 3, temperature=-1)


class PaddedByteTokenizer(ByteTokenizer):
    """ByteTokenizer for a model whose vocabulary is padded past it: ids 257.. do not decode (raise, as ours do)."""

    vocab_size = 257

    def decode_bytes(self, ids):
        bad = [i for i in ids if i >= self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is not in the vocabulary")
        return super().decode_bytes(ids)


def test_a_model_padded_past_its_tokenizer_never_picks_an_id_the_tokenizer_lacks():
    model = make_model(GPTConfig(vocab_size=320, n_ctx=64, n_layer=2, n_head=2, n_embd=32), seed=3)
    with torch.no_grad():
        model.wte.weight[257:] *= 20.0  # the padded ids dominate the logits: unmasked, they would be chosen
    tok = PaddedByteTokenizer()
    assert generate(model, torch.tensor([[104, 105]]), 8, temperature=0)[0, 2:].max() >= 257  # the trap is set
    for sampling in (dict(temperature=0), dict(temperature=1.0)):
        text = "".join(stream_text(model, tok, "hi", 30, eos_token_id=None, **sampling))
        assert isinstance(text, str)
    steps = decode_steps(model, [[104, 105]] * 3, 30, SamplingParams(temperature=1.0), vocab_limit=257,
                         top_logprobs=2)
    tokens = [e.token for step in steps for e in step if e is not None]
    assert len(tokens) == 90 and max(tokens) < 257
    for bad in (0, 321):
        with pytest.raises(ValueError, match="vocab_limit"):
            decode_steps(model, [[1]], 1, SamplingParams(), vocab_limit=bad)


def test_token_events_carry_alternatives_only_when_asked_and_are_frozen():
    model = make_model(CONFIGS["tiny"], seed=1)
    (step,) = list(decode_steps(model, [[1, 2]], 1, SamplingParams(temperature=0)))
    (event,) = step
    assert isinstance(event, TokenEvent)
    assert event.top_logprobs == [] and event.finish_reason == "length"
    with pytest.raises(dataclasses.FrozenInstanceError):  # one event may be shared by several consumers
        event.token = 0


def test_generate_skips_the_log_softmax_that_decode_steps_reports(monkeypatch):
    """`generate` returns tokens only, so its loop leaves out the per-step log-softmax over the vocabulary, as
    `decode_steps(logprobs=False)` does (stream_text, lm-eval's generate_until); by default `decode_steps` still
    reports each token's log-probability."""
    model = make_model(CONFIGS["tiny"])
    prompt = torch.tensor([[1, 2, 3]])
    expected = generate(model, prompt, 4, temperature=0)
    events = [e[0] for e in decode_steps(model, [[1, 2, 3]], 4, SamplingParams(temperature=0))]
    assert [e.token for e in events] == expected[0, 3:].tolist() and all(e.logprob <= 0 for e in events)

    def refuse(*args, **kwargs):
        raise AssertionError("log_softmax computed for generate")

    monkeypatch.setattr(generation.torch, "log_softmax", refuse)
    assert torch.equal(generate(model, prompt, 4, temperature=0), expected)
    quiet = [e[0] for e in decode_steps(model, [[1, 2, 3]], 4, SamplingParams(temperature=0), logprobs=False)]
    assert [e.token for e in quiet] == [e.token for e in events] and all(e.logprob != e.logprob for e in quiet)  # NaN


def test_generate_refuses_float_ids_and_right_padding():
    model = make_model(CONFIGS["tiny"], seed=1)
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(TypeError, match="integer token ids"):
        generate(model, ids.float() + 0.7, 2)  # would have run as ids 1, 2, 3
    for mask in ([[1, 1, 0]], [[0, 0, 0]]):  # right-padded, or no token at all
        with pytest.raises(ValueError, match="pad prompts on the left"):
            generate(model, ids, 2, attention_mask=torch.tensor(mask))
    assert generate(model, ids, 2, temperature=0, attention_mask=torch.tensor([[0, 1, 1]])).shape == (1, 5)
