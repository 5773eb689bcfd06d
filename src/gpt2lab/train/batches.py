"""The data stream: micro-batch number `index` of a split, a pure function of (seed, index).

Micro-batch g is drawn with a generator seeded from (seed, g). Process r of W takes numbers r, r + W, r + 2W, ...,
so every process reads different windows, and one process with grad_accum × W micro-batches reads exactly the
windows W processes read together. Resuming needs only the count of micro-batches consumed, not a sampler state.
"""

from __future__ import annotations

import hashlib

import torch

from gpt2lab.config import TrainConfig
from gpt2lab.data import TokenData


def batch_seed(seed: int, index: int, stream: str = "train") -> int:
    """A 63-bit seed for micro-batch `index` of a stream: a hash, so nearby indices give unrelated windows."""
    digest = hashlib.sha256(f"{stream}:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def get_batch(data: TokenData, split: str, index: int, config: TrainConfig,
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch number `index` of a split: (x, y), each (B, T), on `device`."""
    generator = torch.Generator().manual_seed(batch_seed(config.seed, index, split))
    x, y = data.batch(split, config.batch_size, config.seq_len, generator)
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x, y


def check_data_fits(data: TokenData, seq_len: int) -> None:
    """Both splits must hold one window of seq_len + 1 tokens in a single shard, or training could not draw its
    first batch (train) or would fail at its first eval (val), after the work of eval_interval steps."""
    for split in ("train", "val"):
        shards = data.splits.get(split, [])
        if max((shard.size for shard in shards), default=0) >= seq_len + 1:
            continue
        hint = "use more text or lower seq_len"
        if split == "val":
            fraction = data.meta.get("val_fraction")
            hint = (f"prepare the data again with a larger --val-fraction (it was {fraction}) or more text, "
                    "or lower seq_len")
        raise ValueError(f"the {split} split of {data.dir} has {sum(shard.size for shard in shards)} tokens, too few "
                         f"for one window of seq_len + 1 = {seq_len + 1} tokens; {hint}")
