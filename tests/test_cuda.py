"""CUDA: the GPU paths compute what the CPU paths compute, and training steps run there as `gpt2lab train` runs them.

Every test is marked `cuda` (`pytest -m cuda` selects exactly these) and skips without a CUDA GPU, so CI, which has
none, reports them as skipped. `python benchmarks/gpu.py` runs them first on a GPU machine.

fp32 comparisons switch TF32 off (the `exact_fp32` fixture): `train` switches it on for speed, and TF32 rounds matmul
inputs to 10 mantissa bits, which no tight tolerance survives. bf16 results are compared with bf16's own tolerances.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch

from gpt2lab import GPT, GPTConfig
from gpt2lab import train as T
from gpt2lab.checkpoint import load_model
from gpt2lab.config import TrainConfig
from gpt2lab.data import prepare
from gpt2lab.generate import generate

from conftest import CONFIGS, make_model  # the config families and sharpened weights of the generation tests

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
SMALL = GPTConfig(vocab_size=503, n_ctx=128, n_layer=3, n_head=4, n_embd=64)  # a few blocks, 16-wide heads


@pytest.fixture(autouse=True)
def exact_fp32():
    """True fp32 matmuls for the test, whatever an earlier test (or `train`) set; the flags are put back after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def random_ids(config: GPTConfig, B: int, T: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))  # (B, T)


def on_cuda(model: GPT) -> GPT:
    return copy.deepcopy(model).to(CUDA)


# ---------------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_on_cuda_equal_cpu_in_fp32(name):
    model = make_model(CONFIGS[name])
    idx = random_ids(model.config, 3, model.config.n_ctx)
    mask = torch.ones_like(idx)
    mask[1, :5] = 0  # a left-padded row takes the masked attention path
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            want = model(idx, **kwargs)  # (B, T, V)
            got = on_cuda(model)(idx.to(CUDA), **{k: v.to(CUDA) for k, v in kwargs.items()})
            torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)


def test_loss_on_cuda_equals_cpu_in_fp32():
    """On the CPU `GPT.loss` runs the fused head + loss; on CUDA the plain one. Both are the same cross-entropy."""
    model = make_model(SMALL)
    idx, targets = random_ids(SMALL, 2, 64), random_ids(SMALL, 2, 64, seed=1)
    want = model.loss(idx, targets)
    got = on_cuda(model).loss(idx.to(CUDA), targets.to(CUDA))
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------------------- attention
def flash_capable() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_attention_on_cuda_equals_the_explicit_path(dtype):
    """Model level: SDPA (flash or memory-efficient kernels on a GPU) and the spelled-out softmax agree, with and
    without padding and with a KV cache."""
    torch.manual_seed(0)
    model = GPT(SMALL).eval().to(device=CUDA, dtype=dtype)  # GPT-2's init: logits near 1, where bf16 steps are 1/128
    idx = random_ids(SMALL, 2, 96).to(CUDA)
    mask = torch.ones_like(idx)
    mask[0, :7] = 0
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.05}
    with torch.no_grad():
        for kwargs in ({}, {"attention_mask": mask}):
            fused = model.set_attention(True)(idx, **kwargs).float()
            explicit = model.set_attention(False)(idx, **kwargs).float()
            torch.testing.assert_close(fused, explicit, **tol)


@pytest.mark.skipif(not flash_capable(), reason="flash attention needs compute capability 8.0 or newer")
def test_flash_kernel_itself_equals_the_explicit_path():
    """Forcing the flash backend: it must accept the causal, unmasked call that training makes (or this fails with
    "No available kernel"), and match the explicit path in bf16, forward and backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from gpt2lab.model import explicit_attention, sdpa_attention

    g = torch.Generator(device=CUDA).manual_seed(0)
    q, k, v = (torch.randn(2, 4, 256, 64, device=CUDA, generator=g, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))  # (B, H, T, D)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        fused = sdpa_attention(q, k, v, None)  # (B, H, T, D)
    grads_fused = torch.autograd.grad(fused.float().square().sum(), (q, k, v))
    explicit = explicit_attention(q.float(), k.float(), v.float(), None)
    grads_explicit = torch.autograd.grad(explicit.square().sum(), (q, k, v))
    torch.testing.assert_close(fused.float(), explicit, atol=2e-2, rtol=2e-2)
    for a, b in zip(grads_fused, grads_explicit):
        torch.testing.assert_close(a.float(), b.float(), atol=0.1, rtol=0.05)


# -------------------------------------------------------------------------------------------------- training
def train_steps(model: GPT, step_loss: torch.nn.Module, idx: torch.Tensor, targets: torch.Tensor,
                steps: int) -> list[float]:
    """`steps` optimizer steps on one batch as `gpt2lab train` takes them: bf16 autocast, fused AdamW, clipping."""
    optimizer = T.make_optimizer(model, TrainConfig(model=model.config, seq_len=idx.size(1), lr=1e-3), CUDA)
    assert all(group.get("fused") for group in optimizer.param_groups)  # the CUDA kernel, not the fallback
    losses = []
    for _ in range(steps):
        with T.autocast(CUDA, "bf16"):
            loss = step_loss(idx, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def test_bf16_autocast_training_step_runs_and_lowers_the_loss():
    torch.manual_seed(0)
    model = GPT(SMALL).to(CUDA).train()
    idx, targets = random_ids(SMALL, 4, 64).to(CUDA), random_ids(SMALL, 4, 64, seed=1).to(CUDA)
    with T.autocast(CUDA, "bf16"):
        logits = model(idx)
    assert logits.dtype == torch.bfloat16  # autocast reached the matmuls
    losses = train_steps(model, T.TrainingLoss(model), idx, targets, steps=20)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0]  # one batch, memorised
    assert model.wte.weight.dtype == torch.float32  # master weights stay fp32


def test_compiled_training_step_on_cuda_equals_eager_and_lowers_the_loss():
    torch.manual_seed(0)
    eager = GPT(SMALL).to(CUDA).train()
    compiled = copy.deepcopy(eager)
    idx, targets = random_ids(SMALL, 4, 64).to(CUDA), random_ids(SMALL, 4, 64, seed=1).to(CUDA)
    step_loss = torch.compile(T.TrainingLoss(compiled))
    with T.autocast(CUDA, "bf16"):
        first_eager, first_compiled = T.TrainingLoss(eager)(idx, targets), step_loss(idx, targets)
    torch.testing.assert_close(first_compiled, first_eager, atol=2e-2, rtol=1e-2)
    losses = train_steps(compiled, step_loss, idx, targets, steps=20)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.8 * losses[0]


# ------------------------------------------------------------------------------------------------- generation
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_kv_cached_greedy_generation_on_cuda_equals_cpu(name):
    """Greedy tokens from the cached decode (the flat decode step, left padding, and the sliding window past n_ctx)
    are the CPU's. The weights are sharpened (conftest.make_model) so that no two logits tie within float rounding."""
    model = make_model(CONFIGS[name])
    n_ctx = model.config.n_ctx
    idx = random_ids(model.config, 3, 6)
    mask = torch.ones_like(idx)
    mask[2, :3] = 0
    for kwargs in ({}, {"attention_mask": mask}):
        want = generate(model, idx, n_ctx + 8, temperature=0, **kwargs)  # slides past the context
        got = generate(on_cuda(model), idx.to(CUDA), n_ctx + 8, temperature=0,
                       **{k: v.to(CUDA) for k, v in kwargs.items()})
        assert torch.equal(got.cpu(), want)


def test_seeded_sampling_on_cuda_is_reproducible():
    model = on_cuda(make_model(CONFIGS["tiny"]))
    idx = random_ids(model.config, 2, 4).to(CUDA)
    runs = [generate(model, idx, 20, temperature=1.0, top_k=20,
                     generator=torch.Generator(device=CUDA).manual_seed(3)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


# ------------------------------------------------------------------------------------------------- checkpoints
def test_model_saved_on_cuda_loads_on_cpu_with_the_same_logits(tmp_path):
    model = on_cuda(make_model(SMALL))
    model.save_pretrained(tmp_path / "model")
    loaded = load_model(tmp_path / "model")  # the default device is the CPU
    assert loaded.device == CPU
    for name, p in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p.cpu()), name
    idx = random_ids(SMALL, 2, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx), model(idx.to(CUDA)).cpu(), atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def char_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("char-data")
    (root / "text.txt").write_text("To be, or not to be, that is the question:\n" * 200)
    prepare(str(root / "text.txt"), root / "data", tokenizer="char", progress=False)
    return root / "data"


def test_a_run_trained_on_cuda_resumes_on_the_cpu(char_data, tmp_path):
    """`gpt2lab train` on the GPU (bf16, pinned batches, fused AdamW, the CUDA RNG in the checkpoint), then the same
    run continued on the CPU: the AdamW moments come back onto the CPU and the model directory loads there."""
    base = TrainConfig(data_dir=str(char_data), out_dir=str(tmp_path / "run"),
                       model=GPTConfig(n_ctx=32, n_layer=2, n_head=2, n_embd=32, dropout=0.1),
                       batch_size=4, seq_len=16, lr=3e-3, warmup_steps=2, max_steps=4, eval_interval=4,
                       eval_iters=2, log_interval=1, threads=1, seed=7, dtype="bf16", device="cuda")
    on_gpu = T.train(base, progress=False)
    assert on_gpu.state.step == 4 and all(torch.isfinite(torch.tensor(on_gpu.losses)))
    later = T.train(dataclasses.replace(base, max_steps=6, dtype="fp32", device="cpu"), resume=True, progress=False)
    assert later.state.step == 6 and all(torch.isfinite(torch.tensor(later.losses)))
    assert load_model(tmp_path / "run" / "last").device == CPU
    with torch.no_grad():
        assert load_model(tmp_path / "run" / "last")(torch.zeros(1, 4, dtype=torch.long)).isfinite().all()
