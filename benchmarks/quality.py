"""What bf16, int8 and int4 weights cost in quality, against float32 on the same model.

    python -u benchmarks/quality.py [--tokens 300] [--train-steps 300] [--gpt2-steps 300] [--data FILE]
                                    [--models random,char,gpt2]

Three models:
- GPT-2 124M with random weights (the architecture and tensor sizes of the real one; its outputs are near-uniform,
  so only the logit error means something there);
- a small character-level model trained here for a minute or two on ../shared/data/tinyshakespeare.txt, whose
  distributions are peaked like a trained model's (greedy agreement is meaningful);
- the "mini" preset with GPT-2's vocabulary trained for `--gpt2-steps` steps on the same text in GPT-2's tokens (as
  benchmarks/llama_cpp.py trains its agreement model), so the 50257-row head is a trained one.

For each precision, and for each int8 kernel this machine runs (int8pack: bf16 activations; fbgemm: activations
quantized per row to 7 or 8 bits), the largest and the mean absolute logit error relative to the logits' standard
deviation, the mean KL(fp32 || low) of next-token distributions, the top-1 agreement with fp32 along fp32's own
greedy continuation (teacher-forced), and the length of the prefix where free-running greedy decoding matches fp32
token for token. "int8" is what `prepare_for_inference(model, "int8")` picks on this CPU.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def train_char_model(steps: int, path: Path):
    from gpt2lab import GPT, GPTConfig

    text = path.read_text(encoding="utf-8")
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=len(chars), n_ctx=128, n_layer=4, n_head=4, n_embd=128))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    start, step = time.perf_counter(), 0
    while step < steps:  # a fixed count, so every run compares the same trained model
        ix = torch.randint(0, data.numel() - 129, (32,))
        x = torch.stack([data[i:i + 128] for i in ix])
        y = torch.stack([data[i + 1:i + 129] for i in ix])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    print(f"trained a {model.num_parameters() / 1e6:.1f}M char model for {step} steps in "
          f"{time.perf_counter() - start:.0f} s: loss {loss.item():.3f}")
    return model.eval(), data


def variants() -> dict:
    """name -> function converting a float32 model: bf16, the CPU's int8, every int8 kernel that runs here, int4."""
    from gpt2lab import quantize
    from gpt2lab.inference import prepare_for_inference

    out = {"bf16": lambda m: prepare_for_inference(m, "bf16"), "int8": lambda m: prepare_for_inference(m, "int8"),
           "int8pack": lambda m: quantize.convert_int8(m, "int8pack")}
    if quantize.fbgemm_int8():
        for bits in (7, 8):
            out[f"fbgemm-{bits}bit"] = lambda m, bits=bits: quantize.convert_int8(m, "fbgemm", bits)
    out["int4"] = lambda m: prepare_for_inference(m, "int4")
    return out


def train_gpt2_vocab_model(steps: int, path: Path):
    """The "mini" preset with GPT-2's vocabulary, AdamW on 64-token windows of the text in GPT-2's tokens."""
    from gpt2lab import GPT, GPTConfig, Tokenizer

    ids = torch.tensor(Tokenizer.gpt2().encode(path.read_text(encoding="utf-8")), dtype=torch.long)
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("mini", vocab_size=50257))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    cut = int(len(ids) * 0.9)  # prompts come from the last 10%, which training never sees
    windows = ids[:cut].unfold(0, 65, 1)  # (N, 65)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(steps):  # a fixed count, so every run compares the same trained model
        batch = windows[torch.randint(0, len(windows), (8,), generator=g)]  # (8, 65)
        loss = model.loss(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    print(f"trained the mini preset with GPT-2's vocabulary for {steps} steps in {time.perf_counter() - start:.0f} s: "
          f"loss {loss.item():.3f}")
    return model.eval(), ids[cut:]


def compare(name: str, ref, prompt: torch.Tensor, tokens: int) -> None:
    from gpt2lab.generate import generate

    greedy = generate(ref, prompt, tokens, temperature=0)  # fp32's own continuation
    n_ctx = ref.config.n_ctx
    with torch.no_grad():
        windows = [greedy[:, i:i + n_ctx] for i in range(0, greedy.size(1) - 1, n_ctx)]
        ref_logits = torch.cat([ref(w) for w in windows], dim=1)[:, prompt.size(1) - 1:-1]  # (1, tokens, V)
    print(f"\n{name}: {tokens} greedy tokens of fp32 as the reference")
    print(f"{'dtype':<12} {'max|dlogit|/std':>15} {'mean|dlogit|/std':>16} {'KL nats':>9} {'top-1 agree':>11} "
          f"{'same prefix':>11}")
    for dtype, convert in variants().items():
        model = convert(copy.deepcopy(ref).eval())
        with torch.no_grad():
            logits = torch.cat([model(w) for w in windows], dim=1)[:, prompt.size(1) - 1:-1]
        std = ref_logits.std()
        err = (logits - ref_logits).abs()
        kl = F.kl_div(logits.log_softmax(-1), ref_logits.log_softmax(-1), log_target=True, reduction="none").sum(-1)
        agree = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()
        own = generate(model, prompt, tokens, temperature=0)[0, prompt.size(1):]
        diverge = (own != greedy[0, prompt.size(1):]).nonzero()
        prefix = int(diverge[0]) if diverge.numel() else tokens
        print(f"{dtype:<12} {float(err.max() / std):>15.4f} {float(err.mean() / std):>16.5f} {float(kl.mean()):>9.2e} "
              f"{float(agree):>11.1%} {prefix:>7}/{tokens}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--gpt2-steps", type=int, default=300, help="training steps of the GPT-2-vocabulary model")
    parser.add_argument("--data", type=Path, default=DATA, help=f"the training text (default {DATA})")
    parser.add_argument("--models", default="random,char,gpt2",
                        help="which models to compare: random (GPT-2 124M), char, gpt2 (the GPT-2-vocabulary one)")
    args = parser.parse_args()
    from gpt2lab import GPT, GPTConfig

    models = set(args.models.split(","))
    if "random" in models:
        torch.manual_seed(0)
        gpt2 = GPT(GPTConfig.preset("gpt2")).eval()
        compare("GPT-2 124M, random weights", gpt2, torch.randint(0, 50257, (1, 16)), min(args.tokens, 200))
        del gpt2
    if "char" in models:
        model, data = train_char_model(args.train_steps, args.data)
        compare("4-layer char model trained on tinyshakespeare", model, data[None, :32], args.tokens)
    if "gpt2" in models:
        model, held_out = train_gpt2_vocab_model(args.gpt2_steps, args.data)
        compare("mini preset, GPT-2 vocabulary, trained on tinyshakespeare", model, held_out[None, :16], args.tokens)


if __name__ == "__main__":
    main()
