"""The cached one-token decode step, written flat for speed: the same function as `GPT.forward` at T = 1.

A decode step at batch 1 multiplies one activation vector by every weight matrix, so its time is the time to stream
the weights from memory plus a fixed cost per operation. Through the modules that fixed cost is paid some 300 times a
token on GPT-2 small, once per small tensor operation, each with nn.Module's call machinery, shape checks, and views
built for a general T. This file runs the same arithmetic as a loop over precollected tensors and layer callables,
with views that are only valid for one new position, which cuts that overhead; it matters most for bf16 and int8,
whose matmuls are quickest.

One layer of the step, for B rows with S positions cached after this token is written (shapes):

    x (B, 1, C) ─ LayerNorm ─ c_attn ─► qkv (B, 1, 3C) viewed (B, 3, H, D): no transposes at T = 1
        q = qkv[:, 0] (B, H, 1, D);  k, v = qkv[:, 1], qkv[:, 2] (B, H, D) written into cache column S - 1
        attention of q over cache[:, :, :S] (B, H, S, D) ─► (B, H, 1, D) viewed (B, 1, C) ─ c_proj ─► x += ...
    x ─ LayerNorm ─ c_fc ─ activation ─ c_proj ─► x += ...

The model's modules stay the reference: `FlatStep` reads their tensors and calls their linear layers' `forward`
(any kind: float32, bf16, int8), except that a plain float32 `nn.Linear` on the CPU runs through the float32 decode
kernel of gpt2lab.quantize over the same weight tensor (`fast_float32_forward`), so that where the native step
(native_step.py) cannot run, a freshly loaded model still decodes at the prepared fp32 speed with no extra call. It
is used only where it computes exactly what they do: an eval-mode `GPT` built from the stock blocks with fused
attention and no hooks (`FlatStep.applies`). Tests compare it with the modules.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from gpt2lab.kv_cache import KVCache
from gpt2lab.model import GPT, MLP, Block, CausalSelfAttention
from gpt2lab.quantize import fast_float32_forward


class FlatStep:
    """`step(tokens, cache)` == `model(tokens[:, None], kv_cache=cache, logits_to_keep=1)[:, -1]`, faster.

    - tokens: (B,) the newest token of each active row; B is the cache's active batch.
    - positions: (B, 1) position ids of a left-padded batch, default the cache length (the same for every row).
    - attention_mask: (B, S) 1 for real tokens and 0 for padding over all cached positions plus the new one.

    Returns (B, V) logits and advances the cache by one position, as the model's forward does.
    """

    def __init__(self, model: GPT) -> None:
        cfg = model.config
        self.model = model
        self.n_embd, self.n_head, self.eps = cfg.n_embd, cfg.n_head, cfg.layer_norm_eps
        fast = fast_float32_forward  # plain float32 layers get the decode kernel; prepared ones keep their own
        self.layers = [
            (b.ln_1.weight, b.ln_1.bias, fast(b.attn.c_attn), fast(b.attn.c_proj),
             b.ln_2.weight, b.ln_2.bias, fast(b.mlp.c_fc), b.mlp.act, fast(b.mlp.c_proj))
            for b in model.h
        ]
        self.ln_f = (model.ln_f.weight, model.ln_f.bias)
        self.head = fast(model.lm_head)
        self.positions = model.wpe.weight  # (n_ctx, C): the learned table, or the sinusoids' buffer

    @staticmethod
    def applies(model: GPT) -> bool:
        """Whether the flat step computes what the modules would: eval mode, stock blocks, fused attention, no hooks
        (a hook would be skipped) and no dropout."""
        module = torch.nn.modules.module  # hooks registered for every module (register_module_forward_hook)
        if model.training or getattr(module, "_global_forward_hooks", None) \
                or getattr(module, "_global_forward_pre_hooks", None):
            return False
        for b in model.h:
            if (type(b) is not Block or type(b.attn) is not CausalSelfAttention or type(b.mlp) is not MLP
                    or not b.attn.use_sdpa):
                return False
        return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, cache: KVCache, positions: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, C, H = tokens.size(0), self.n_embd, self.n_head
        D = C // H
        pos = cache.length  # the column this token's key and value go to
        end = pos + 1
        cache.check_room(B, 1, "token")
        # every row at position `pos` (a row of the table, no index tensor), or each padded row at its own
        pos_emb = self.positions[pos] if positions is None else self.positions[positions.view(-1)]  # (C,) or (B, C)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
        x = (self.model.wte(tokens) + pos_emb).unsqueeze(1)  # (B, 1, C)
        for i, (ln1_w, ln1_b, c_attn, attn_proj, ln2_w, ln2_b, c_fc, act, mlp_proj) in enumerate(self.layers):
            qkv = c_attn(F.layer_norm(x, (C,), ln1_w, ln1_b, self.eps)).view(B, 3, H, D)  # (B, 3, H, D)
            k_all, v_all = cache.k[i, :B], cache.v[i, :B]  # (B, H, S_max, D)
            k_all[:, :, pos].copy_(qkv[:, 1])  # (B, H, D) into column pos
            v_all[:, :, pos].copy_(qkv[:, 2])
            y = F.scaled_dot_product_attention(qkv[:, 0].unsqueeze(2), k_all[:, :, :end], v_all[:, :, :end],
                                               attn_mask=mask)  # (B, H, 1, D)
            x = x + attn_proj(y.view(B, 1, C))  # (B, 1, C): heads side by side, as (B, H, 1, D) lies in memory
            x = x + mlp_proj(act(c_fc(F.layer_norm(x, (C,), ln2_w, ln2_b, self.eps))))  # (B, 1, C)
        cache.advance(1)
        return self.head(F.layer_norm(x, (C,), *self.ln_f, self.eps))[:, 0]  # (B, V)
