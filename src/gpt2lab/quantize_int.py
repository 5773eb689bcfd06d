"""Integer weights for CPU decoding: per-channel int8 quantization, the FBGEMM int8 layer, and the choice of the int8
kernel from what the CPU reports.

A decode step at batch 1 streams every weight once, so an int8 weight (one byte) should run near twice as fast as a
bf16 one. Two kernels compute x · Wᵀ with W held in int8:

- "fbgemm" (`FbgemmInt8Linear`): FBGEMM's dynamically quantized linear, the kernel behind
  `torch.ao.nn.quantized.dynamic.Linear`. It quantizes each activation row to unsigned integers on the fly and runs an
  integer GEMM over the packed weight, as llama.cpp's q8_0 does with its 32-value blocks. On AVX2 the integer dot
  products are `vpmaddubsw`, which sums two byte products into 16 bits and could saturate with 8-bit activations,
  so activations get 7 bits (`reduce_range`); AVX-512-VNNI's `vpdpbusd` sums into 32 bits, so they get 8 there.
- "int8pack" (`quantize.Int8Linear`): `torch._weight_int8pack_mm`, which widens the weights to bf16 and keeps the
  activations in bf16: exact in the activations, but slower than FBGEMM on CPUs with AVX2, and the portable choice
  for CPUs without FBGEMM (ARM, or a torch built without it).

int4 (`quantize_int4`, `quantize.Int4Linear`) halves the bytes again: llama.cpp's q4_0 groups of 32 weights, each
group's scale an integer multiple of one float per row. Only the native decode kernel multiplies by int4 weights
directly (activations rounded per row to int8, as for int8), in decode steps and in prompts it encodes; other paths
widen them to float32 (`dequantize_int4`).

`choose_int8_kernel` and `activation_bits` are pure functions of the CPU's features (`gpt2lab.cpu.CPUFeatures`, read
by gpt2lab.cpu) and of whether FBGEMM works in this torch, so each branch is tested with the features of another
machine. docs/benchmarks.md has the measurements behind the choice.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Iterator, Optional

import torch
import torch.nn as nn

from gpt2lab.cpu import CPUFeatures

INT8_KERNELS = ("fbgemm", "int8pack")


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (Q (N, K) int8, scale (N,) float32) with weight ≈ Q * scale[:, None], symmetric, no zero point.

    >>> q, s = quantize_per_channel(torch.tensor([[1.0, -0.25], [0.1, 0.4]]))
    >>> q.tolist()
    [[127, -32], [32, 127]]
    """
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp_(min=1e-12)  # (N,)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)  # (N, K)
    return q.contiguous(), scale


# int4: weights in groups of 32 along a row, a scale per group as an integer multiple of one float per row, two
# weights per byte
INT4_GROUP = 32
INT4_SCALE_LEVELS = 255  # group scales are integers in [-255, 255] times the row's float scale


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> (packed (N, K/2) uint8, group_scale (N, K/32) int16, row_scale (N,) float32), with
    weight ≈ q · group_scale · row_scale per group of 32 and q in [-8, 7]. K must be a multiple of 32.

    The groups follow llama.cpp's q4_0: a group's ideal step is d = m / -8, m its weight of largest magnitude (sign
    kept), so that weight lands on -8 and the group's whole range is used. The steps are then stored as integers,
    d ≈ s · D with D = max|d| / 255 for the row and s in [-255, 255] (at least 1 in size, so no group is lost), as
    llama.cpp's k-quants store sub-block scales: the integer s lets the native kernel scale each group inside its
    integer dot product (one multiply-add instruction) instead of converting every group's sum to float; the cost is
    a step up to 1/(2|s|) away from the ideal, under 0.4% for groups within half the row's largest.

    Packing (`pack_int4`): q + 8 in four bits; blocks of 64 weights in 32 bytes, byte j holding weight j in its low
    four bits and weight j + 32 in its high four (one mask gives a whole group of 32 in order, one shift the next:
    what the native kernel reads with 256-bit vectors); a row whose width is not a multiple of 64 ends with one group
    of 32 in 16 bytes, byte j holding weights j and j + 16.

    >>> packed, s, D = quantize_int4(torch.linspace(-1.0, 1.0, 32)[None])  # -1 comes first: d = 1/8
    >>> w = dequantize_int4(packed, s, D)[0, [0, 1, 31]]
    >>> packed.shape, s.tolist(), D.tolist(), w.tolist()  # doctest: +ELLIPSIS
    (torch.Size([1, 16]), [[255]], [0.000490196...], [-1.0, -0.875, 0.875])
    """
    N, K = weight.shape
    if K % INT4_GROUP:
        raise ValueError(f"int4 weights come in groups of {INT4_GROUP} along a row; a row of {K} is not a multiple "
                         f"of {INT4_GROUP} (use int8 for this model)")
    g = weight.detach().float().reshape(N, K // INT4_GROUP, INT4_GROUP)  # (N, G, 32)
    d = g.gather(-1, g.abs().argmax(-1, keepdim=True)).squeeze(-1) / -8.0  # (N, G) ideal signed steps
    row = d.abs().amax(-1) / INT4_SCALE_LEVELS  # (N,)
    ratio = d / torch.where(row == 0, torch.ones_like(row), row)[:, None]
    s = torch.where(d == 0, torch.zeros_like(d), torch.sign(d) * ratio.abs().round().clamp(1, INT4_SCALE_LEVELS))
    step = (s * row[:, None]).unsqueeze(-1)  # (N, G, 1)
    q = torch.round(g / torch.where(step == 0, torch.ones_like(step), step)).clamp_(-8, 7)
    q = torch.where(step == 0, torch.zeros_like(q), q)
    packed = pack_int4((q + 8).to(torch.uint8).reshape(N, K))
    return packed, s.to(torch.int16).contiguous(), row.contiguous()


def _blocks(width: int) -> list[tuple[int, int]]:
    """(start, size) of the packing blocks of a row of `width` values: 64s, then one 32 if it is left over."""
    full = width // 64 * 64
    return [(k, 64) for k in range(0, full, 64)] + ([(full, 32)] if width > full else [])


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(..., K) values in [0, 15] -> (..., K/2) bytes in `quantize_int4`'s layout."""
    parts = [q[..., k:k + n // 2] | (q[..., k + n // 2:k + n] << 4) for k, n in _blocks(q.shape[-1])]
    return torch.cat(parts, dim=-1).contiguous()


def dequantize_int4(packed: torch.Tensor, group_scale: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
    """The float32 weights of `quantize_int4`'s output: packed (..., K/2) uint8, group_scale (..., K/32) int16,
    row_scale (...) float32 -> (..., K)."""
    K = 2 * packed.shape[-1]
    parts = []
    for k, n in _blocks(K):
        b = packed[..., k // 2:(k + n) // 2]
        parts += [b & 0x0F, b >> 4]
    q = torch.cat(parts, dim=-1).to(torch.int8) - 8  # (..., K) in [-8, 7]
    step = group_scale.float() * row_scale.float().unsqueeze(-1)  # (..., G)
    groups = q.float().reshape(*q.shape[:-1], K // INT4_GROUP, INT4_GROUP) * step.unsqueeze(-1)
    return groups.reshape(*q.shape[:-1], K)


def choose_int8_kernel(features: CPUFeatures, fbgemm: bool) -> str:
    """The int8 kernel for a CPU with these features: FBGEMM's where it works and the CPU has AVX2 (its integer
    kernels need 256-bit vectors; below that it runs scalar code), else torch's int8pack."""
    return "fbgemm" if fbgemm and features.avx2 else "int8pack"


def activation_bits(features: CPUFeatures) -> int:
    """Bits of FBGEMM's activation quantization: 8 where AVX-512-VNNI sums byte products into 32 bits, else 7, so
    that AVX2's 16-bit pair sums (255 · 127 · 2 > 32767) cannot saturate. AVX-VNNI alone does not count: FBGEMM's
    kernels do not use it."""
    return 8 if features.avx512_vnni else 7


@contextlib.contextmanager
def _quantized_engine(name: str) -> Iterator[None]:
    """Pack with one quantized engine and restore the caller's: the engine is process-wide state."""
    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = name
    try:
        yield
    finally:
        torch.backends.quantized.engine = before


def pack_fbgemm(qweight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor]) -> object:
    """FBGEMM's packed form of the per-channel int8 weight (N, K) with its scales (N,) and optional float32 bias."""
    n = qweight.size(0)
    with warnings.catch_warnings(), _quantized_engine("fbgemm"):
        warnings.simplefilter("ignore", UserWarning)  # quantized tensors are deprecated; only FBGEMM's input here
        w = torch.quantize_per_channel(qweight.float() * scale[:, None], scale.double(),
                                       torch.zeros(n, dtype=torch.long), 0, torch.qint8)  # exactly qweight
        return torch.ops.quantized.linear_prepack(w, bias)


@functools.lru_cache(maxsize=None)
def _dynamic_linear() -> object:
    """FBGEMM's dynamic linear, the bare C++ op (see quantize._half_linear for why the Python wrapper is skipped)."""
    op = torch.ops.quantized.linear_dynamic.default
    return getattr(op, "_op", op)


@functools.lru_cache(maxsize=None)
def fbgemm_int8() -> bool:
    """Whether FBGEMM's dynamic int8 linear works in this torch (x86 builds) and computes what it should."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    try:
        q = torch.tensor([[1, -2], [3, 4]], dtype=torch.int8)
        packed = pack_fbgemm(q, torch.tensor([0.5, 0.25]), None)
        y = _dynamic_linear()(torch.tensor([[2.0, 1.0]]), packed, True)
        return bool(torch.allclose(y, torch.tensor([[0.0, 2.5]]), atol=0.05))
    except (AttributeError, RuntimeError):
        return False


class FbgemmInt8Linear(nn.Module):
    """A drop-in for nn.Linear with per-channel int8 weights in FBGEMM's packed layout; each activation row is
    quantized on the fly over its own range.

    FBGEMM quantizes a whole input tensor with one scale, which would make a row's result depend on the other rows of
    a batch. For several rows the layer first maps each row onto [0, 1], x = lo + r·x' (r = max - min per row), so
    every row gets the same scale and its full resolution, and then undoes the map exactly:
    x·Wᵀ + b = r·(x'·Wᵀ + b) + lo·Σₖ W[:, k] + (1 - r)·b. A single row needs no map.
    """

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 bits: int = 7) -> None:
        super().__init__()
        if bits not in (7, 8):
            raise ValueError(f"activation bits must be 7 or 8, got {bits!r}")
        self.out_features, self.in_features = qweight.shape
        self.reduce_range = bits == 7
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())  # (N,)
        weight = qweight.float() * scale.float()[:, None]  # (N, K), the dequantized weight
        sums = weight.sum(1, keepdim=True).t()  # (1, N)
        # (2, N): what a row's [lo, 1 - r] multiplies to undo the [0, 1] map (see the class docstring)
        self.register_buffer("correction", sums if bias is None else torch.cat([sums, self.bias[None]]))
        self.packed = pack_fbgemm(qweight, scale.float(), self.bias)  # opaque; adds the bias itself

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 7) -> "FbgemmInt8Linear":
        q, s = quantize_per_channel(linear.weight)
        return cls(q, s, linear.bias, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float().contiguous()  # (M, K)
        y = self._rows(x2) if x2.size(0) > 1 else self._packed(x2)  # (M, N)
        return y.view(*x.shape[:-1], self.out_features)

    def _packed(self, x: torch.Tensor) -> torch.Tensor:
        with torch._C.DisableTorchFunctionSubclass():  # see quantize._half_linear
            return _dynamic_linear()(x, self.packed, self.reduce_range)  # (M, N), bias included

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = torch.aminmax(x, dim=1, keepdim=True)  # (M, 1) each
        r = (hi - lo).clamp_(min=1e-30)  # (M, 1); a constant row maps to zeros
        y = self._packed((x - lo) / r).mul_(r)  # (M, N)
        undo = lo if self.bias is None else torch.cat([lo, 1.0 - r], dim=1)  # (M, 1) or (M, 2)
        return y.addmm_(undo, self.correction)

    @property
    def weight_nbytes(self) -> int:
        """Bytes of the packed weight (not a buffer, so `model.buffers()` does not see it)."""
        return self.out_features * self.in_features

    def dequantized(self) -> torch.Tensor:
        """The float32 weight this layer computes with, (N, K)."""
        return torch.ops.quantized.linear_unpack(self.packed)[0].dequantize()

    def extra_repr(self) -> str:
        bits = 7 if self.reduce_range else 8
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int8 in FBGEMM layout, {bits}-bit activations per row")
