"""Inference layers for fast CPU decoding: packed float32, and weight-only bf16, int8 and int4 with float32 activations.

Decoding one token at batch 1 multiplies a single activation vector by every weight matrix: two flops per weight
read, so the speed is set by how many bytes of weights cross the memory bus per token, and by how close the kernel
streams them to the memory's speed. Three levers, one per mode:

- fp32 (`ChunkedLinear`, `OneDNNLinear`): the same weights. For a few rows, the block layers run as one batched
  matmul over row blocks (one contiguous slab per thread, at a small cost per call) and the head through oneDNN,
  because MKL's GEMM uses the cores poorly for a few rows; for many rows, MKL's GEMM, the faster kernel there.
  Without oneDNN, or with one thread, `TransposedLinear` stores wide weights (K, N), the layout MKL streams best for
  one row. docs/benchmarks.md has the measurements behind these choices.
- bf16 (`BF16Linear`, `HalfPackedLinear`): half the bytes. With native bf16 arithmetic (AVX-512-BF16, AMX) the weight
  is a bf16 tensor; without it, the bf16-rounded weight is held exactly in FBGEMM's packed fp16 layout, whose kernel
  widens it in one instruction per 8 weights instead of emulating bf16.
- int8 (`quantize_int.FbgemmInt8Linear`, `Int8Linear`): a quarter of the bytes. Symmetric, per output channel: row n
  of a weight W (N, K) gets its own scale s_n = max_k |W[n, k]| / 127 and W ≈ s ⊙ Q with Q = round(W / s) in
  [-127, 127]. A per-channel scale follows the spread of each row, so a row of small weights keeps its resolution
  next to a row of large ones. On x86 CPUs with AVX2, FBGEMM's integer kernel also quantizes each activation row, as
  llama.cpp's q8_0 does; elsewhere `torch._weight_int8pack_mm` computes x · Qᵀ · s with bf16 activations
  (`quantize_int` makes the choice).

- int4 (`Int4Linear`): under a seventh of the bytes, groups of 32 weights with integer scales
  (`quantize_int.quantize_int4`). Only the native decode step multiplies by them directly; the layer's own forward
  widens them to float32.

Outside the matmuls nothing changes: the residual stream, LayerNorm, attention, softmax and the KV cache stay
float32, which keeps the quality cost small (docs/benchmarks.md, quality). Large matmuls (a 512-token prefill) are
compute-bound; the int8pack layer, and the bf16 tensor layer on CPUs without native bf16, widen their weight to
float32 for them and use the float32 GEMM; FBGEMM's integer GEMM is faster than that, so its layer uses it for every
number of rows.

The tied LM head (V, C) is the largest single matrix of GPT-2 small (38.6M of 124M weights); it is converted too. The
token embedding reads rows of the head's own table where the layout allows (fp32, bf16 tensors, int8) and of a
separate bf16 or int8 copy where the head's weight is packed opaquely (FBGEMM's layouts).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2lab import native
from gpt2lab.cpu import CPUFeatures, cpu_features
from gpt2lab.memory import use_huge_pages
from gpt2lab.quantize_int import (INT4_SCALE_LEVELS, FbgemmInt8Linear, activation_bits, choose_int8_kernel,
                                  dequantize_int4, fbgemm_int8, quantize_int4, quantize_per_channel)

if TYPE_CHECKING:  # pragma: no cover
    from gpt2lab.model import GPT

# Activations are cast to bfloat16 for the int8 kernel: its float32-activation path is not vectorized on CPU, while
# the bf16 one runs near memory speed.
KERNEL_DTYPE = torch.bfloat16
# torch's int8 weight-only kernel is a private op: where a torch build lacks it, Int8Linear multiplies by its widened
# weight instead (the same weights, float32 activations)
INT8PACK = hasattr(torch, "_weight_int8pack_mm")
# Rows (batch × tokens) above which a matmul is compute-bound and, without native bf16, runs as a float32 GEMM.
SMALL_M = 32


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512-BF16 or AMX; see gpt2lab.cpu)."""
    return cpu_features().native_bf16


class _WeightOnlyLinear(nn.Module):
    """Shared plumbing: x (..., K) float32 -> (..., N) float32, the weight stored in low precision."""

    in_features: int
    out_features: int
    bias: Optional[torch.Tensor]

    def __init__(self, out_features: int, in_features: int, bias: Optional[torch.Tensor]) -> None:
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())  # (N,)
        self.large_in_fp32 = not native_bf16()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if x2.size(0) > SMALL_M and self.large_in_fp32:
            y = F.linear(x2.float(), self.dequantized(), self.bias)  # compute-bound: float32 GEMM
        else:
            y = self.small_matmul(x2)
            if self.bias is not None:
                y += self.bias
        return y.view(*shape[:-1], self.out_features)

    def small_matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantized(self) -> torch.Tensor:
        """The float32 weight this layer computes with, (N, K)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(_WeightOnlyLinear):
    """A drop-in for nn.Linear whose weight is int8 with one scale per output channel (one byte per weight)."""

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
        super().__init__(qweight.size(0), qweight.size(1), bias)
        self.register_buffer("weight", qweight)  # (N, K) int8
        self.register_buffer("scale", scale.float())  # (N,) float32: the native kernel's and the dequantized weight's
        self.register_buffer("kernel_scale", scale.to(KERNEL_DTYPE), persistent=False)  # (N,) int8pack's, in bf16

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        q, s = quantize_per_channel(linear.weight)
        return cls(q, s, linear.bias)

    def small_matmul(self, x: torch.Tensor) -> torch.Tensor:
        if not INT8PACK:
            return F.linear(x.float(), self.dequantized())  # (M, N)
        return torch._weight_int8pack_mm(x.to(KERNEL_DTYPE), self.weight, self.kernel_scale).float()  # (M, N)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float() * self.scale.float()[:, None]


class Int4Linear(_WeightOnlyLinear):
    """A drop-in for nn.Linear whose weight is int4 in groups of 32 along a row (`quantize_int.quantize_int4`: half
    a byte per weight, a 16-bit integer scale per group and a float scale per row). The native decode step
    multiplies by it directly (and encodes prompts up to native_step.PREFILL_ROWS tokens with it); this forward
    (longer prompts, evaluation, decoding without the native kernel) widens it to float32."""

    def __init__(self, packed: torch.Tensor, group_scale: torch.Tensor, scale: torch.Tensor,
                 bias: Optional[torch.Tensor] = None) -> None:
        super().__init__(packed.size(0), 2 * packed.size(1), bias)
        if group_scale.numel() and int(group_scale.abs().max()) > INT4_SCALE_LEVELS:  # the kernel's sums assume it
            raise ValueError(f"int4 group scales must lie in [-{INT4_SCALE_LEVELS}, {INT4_SCALE_LEVELS}] "
                             f"(quantize_int4's range), got one of "
                             f"{int(group_scale.abs().max())}")
        self.register_buffer("weight", packed.contiguous())  # (N, K/2) uint8: two weights per byte
        self.register_buffer("group_scale", group_scale.to(torch.int16).contiguous())  # (N, K/32)
        self.register_buffer("scale", scale.float().contiguous())  # (N,) float32: the row's

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int4Linear":
        return cls(*quantize_int4(linear.weight), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.dequantized(), self.bias)  # (..., N)

    def dequantized(self) -> torch.Tensor:
        return widen_int4(self.weight, self.group_scale, self.scale)


def widen_int4(packed: torch.Tensor, group_scale: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`quantize_int.dequantize_int4` of (N, K/2) packed rows: through the native kernel where it is built (the same
    values, bit for bit, faster: a prefill's whole matrix, or the embedding's rows), else in PyTorch."""
    lib = native.library() if packed.device.type == "cpu" else None
    if lib is None:
        return dequantize_int4(packed, group_scale, scale)
    packed, group_scale = packed.contiguous(), group_scale.to(torch.int16).contiguous()
    scale = scale.float().contiguous()
    N, K = packed.size(0), 2 * packed.size(1)
    out = torch.empty(N, K)  # (N, K) float32
    lib.gpt2lab_dequantize_int4(packed.data_ptr(), group_scale.data_ptr(), scale.data_ptr(), N, K, out.data_ptr())
    return out


class BF16Linear(_WeightOnlyLinear):
    """A drop-in for nn.Linear whose weight is stored in bfloat16 (two bytes per weight)."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
        super().__init__(weight.size(0), weight.size(1), bias)
        self.register_buffer("weight", weight.detach().to(torch.bfloat16).contiguous())  # (N, K)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "BF16Linear":
        return cls(linear.weight, linear.bias)

    def small_matmul(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(torch.bfloat16), self.weight).float()  # (M, N)

    def dequantized(self) -> torch.Tensor:
        return self.weight.float()


class TransposedLinear(nn.Module):
    """nn.Linear's function with the weight stored transposed, (K, N), as `x @ Wᵀ` reads it row by row.

    At batch 1 a linear layer is a matrix-vector product bounded by memory speed; for wide layers (N > K: c_attn,
    c_fc and the LM head) MKL's GEMM streams the (K, N) layout faster than nn.Linear's (N, K).
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight_t", weight.detach().t().contiguous())  # (K, N)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())  # (N,)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "TransposedLinear":
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        y = x2 @ self.weight_t if self.bias is None else torch.addmm(self.bias, x2, self.weight_t)  # (M, N)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, (K, N)"


@functools.lru_cache(maxsize=None)
def onednn_linear() -> bool:
    """Whether this torch exposes oneDNN's linear on plain float32 tensors (the op torch.compile's CPU backend uses)."""
    try:
        y = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 8), torch.ones(8, 8), None, "none", [], "")
        return bool(torch.all(y == 8.0))
    except (AttributeError, RuntimeError):  # built without oneDNN, or an op renamed
        return False


@functools.lru_cache(maxsize=None)
def fbgemm_half() -> bool:
    """Whether FBGEMM's half-precision-weight GEMM is available (x86 builds of torch)."""
    try:
        packed = torch.ops.quantized.linear_prepack_fp16(torch.ones(8, 8), None)
        y = torch.ops.quantized.linear_dynamic_fp16(torch.ones(1, 8), packed)
        return bool(torch.all(y == 8.0))
    except (AttributeError, RuntimeError):
        return False


class OneDNNLinear(nn.Module):
    """nn.Linear's function and weight, float32, with a kernel chosen by the number of rows: oneDNN's matmul for a
    decode step's few rows, MKL's GEMM (`F.linear`) for a prefill's many.

    A decode step is a chain of matrix-vector products bounded by how fast the weights stream from memory. MKL's
    GEMM uses the cores poorly for a few rows, where oneDNN streams the weight faster; for hundreds of rows MKL's is
    the faster kernel. The weight stays a plain (N, K) tensor that both read, so the tied head still shares the
    embedding's table.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.detach().float().contiguous())  # (N, K); shares storage when it can
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())  # (N,)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "OneDNNLinear":
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if x2.size(0) > SMALL_M:
            y = F.linear(x2, self.weight, self.bias)  # compute-bound: MKL's GEMM
        else:
            y = torch.ops.mkldnn._linear_pointwise(x2.contiguous(), self.weight, self.bias, "none", [], "")
        return y.view(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        return self.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, oneDNN"


class ChunkedLinear(OneDNNLinear):
    """`OneDNNLinear` whose few-row products run as one batched matmul over `chunks` blocks of output rows.

    The weight (N, K) is viewed, without a copy, as (chunks, N / chunks, K), and x (M, K) is broadcast to every
    block: `baddbmm` hands the blocks' matrix-vector products to MKL's batched GEMM, which spreads them over the
    threads. Each block is one contiguous slab of the weight, streamed by one thread, which is what a memory-bound
    product wants, and the call is far cheaper than oneDNN's, whose fixed cost per call adds up over the 48 block
    products of a GPT-2 small step. Many rows still go to MKL's GEMM, as in `OneDNNLinear`.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, chunks: int = 2) -> None:
        super().__init__(weight, bias)
        if chunks < 1 or self.out_features % chunks:
            raise ValueError(f"chunks must divide out_features={self.out_features}, got {chunks}")
        self.chunks = chunks

    @classmethod
    def from_linear(cls, linear: nn.Linear, chunks: int = 2) -> "ChunkedLinear":
        return cls(linear.weight, linear.bias, chunks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        M, N, K, c = x2.size(0), self.out_features, self.in_features, self.chunks
        if M > SMALL_M:
            return super().forward(x)  # compute-bound: MKL's GEMM
        w = self.weight.view(c, N // c, K).transpose(1, 2)  # (c, K, N/c): a view
        xs = x2.unsqueeze(0).expand(c, M, K)  # (c, M, K): a view
        if self.bias is None:
            y = torch.bmm(xs, w)  # (c, M, N/c)
        else:
            y = torch.baddbmm(self.bias.view(c, 1, N // c), xs, w)  # (c, M, N/c)
        y = y.view(M, N) if M == 1 else y.transpose(0, 1).reshape(M, N)  # blocks side by side: (M, N)
        return y.view(*x.shape[:-1], N)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"chunks={self.chunks}"


@functools.lru_cache(maxsize=None)
def _half_linear() -> Callable[..., torch.Tensor]:
    """FBGEMM's fp16-weight linear, the bare C++ op under its Python wrapper.

    A decode step calls it 49 times, and the Python call can cost more than a small product itself. Before
    dispatching, torch asks every non-tensor argument for `__torch_function__`, and on the packed weight, a
    TorchScript object, that lookup is slow to fail; `OpOverload.__call__` adds Python checks for traced fake objects.
    `forward` calls the bare op with subclass dispatch off (its arguments are plain tensors and the packed weight),
    which skips both.
    """
    op = torch.ops.quantized.linear_dynamic_fp16.default
    return getattr(op, "_op", op)


class HalfPackedLinear(nn.Module):
    """A bf16 weight-only linear layer for CPUs without bf16 arithmetic: the bf16-rounded weight is held in FBGEMM's
    packed half-precision (fp16) layout, whose kernel widens it with one F16C instruction per 8 weights.

    Two bytes per weight either way, and the numbers are the bf16 ones: every bf16 value of magnitude 2⁻¹⁴ or more
    (and at most 65504) is exactly an fp16 value, since fp16 has the longer mantissa; smaller ones land on fp16's
    subnormal grid, within 2⁻²⁵ ≈ 3e-8 (tests compare the layer with BF16Linear). Activations stay float32.
    """

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w = weight.detach().to(torch.bfloat16).float()  # (N, K), bf16 values
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())  # (N,)
        self.packed = torch.ops.quantized.linear_prepack_fp16(w, self.bias)  # opaque; adds the float32 bias itself

    @staticmethod
    def fits(weight: torch.Tensor) -> bool:
        """fp16 holds the bf16 weight only below its maximum, 65504 (GPT-2's weights are far below)."""
        return bool(weight.detach().abs().max() <= 65504.0)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "HalfPackedLinear":
        return cls(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float().contiguous()  # (M, K)
        with torch._C.DisableTorchFunctionSubclass():  # see `_half_linear`
            y = _half_linear()(x2, self.packed)  # (M, N), bias included
        return y.view(*x.shape[:-1], self.out_features)

    @property
    def weight_nbytes(self) -> int:
        """Bytes of the packed weight (not a buffer, so `model.buffers()` does not see it)."""
        return self.out_features * self.in_features * 2

    def dequantized(self) -> torch.Tensor:
        return torch.ops.quantized.linear_unpack_fp16(self.packed)[0].float()  # (N, K)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                "bf16 values in FBGEMM fp16 layout")


class ColumnEmbedding(nn.Module):
    """Token embedding reading the columns of a transposed (C, V) head table: (B, T) -> (B, T, C)."""

    def __init__(self, weight_t: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight_t", weight_t)  # (C, V), the same tensor as the head's

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_t.t()  # (V, C) view

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.weight_t.t()[idx]  # (B, T, C)


class Int4Embedding(nn.Module):
    """Token embedding reading rows of the head's int4 table, widened with their scales: (B, T) -> (B, T, C)."""

    def __init__(self, head: "Int4Linear") -> None:
        super().__init__()
        self.register_buffer("weight", head.weight)  # (V, C/2) uint8, the same tensors as the head's
        self.register_buffer("group_scale", head.group_scale)  # (V, C/32) int16
        self.register_buffer("scale", head.scale)  # (V,)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = idx.reshape(-1)  # (B*T,)
        widened = widen_int4(self.weight[rows], self.group_scale[rows], self.scale[rows])  # (B*T, C)
        return widened.view(*idx.shape, 2 * self.weight.size(1))  # (B, T, C)


class LowPrecisionEmbedding(nn.Module):
    """Token embedding reading rows of the head's low-precision table (times their int8 scale, if any):
    (B, T) -> (B, T, C) float32."""

    def __init__(self, weight: torch.Tensor, scale: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.register_buffer("weight", weight)  # (V, C), the same tensor as the head's
        self.register_buffer("scale", None if scale is None else scale.float())  # (V,)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = self.weight[idx].float()  # (B, T, C)
        return rows if self.scale is None else rows * self.scale[idx].unsqueeze(-1)


# the layer of each precision that the native decode step (gpt2lab.native_step) reads in place
NATIVE_LAYERS: dict[str, type[nn.Module]] = {"fp32": nn.Linear, "bf16": BF16Linear, "int8": Int8Linear,
                                             "int4": Int4Linear}
WEIGHT_DTYPES = ("fp32", "bf16", "int8", "int4")


@dataclass(frozen=True)
class KernelPlan:
    """Which layer computes the block matrices and which the tied head, for one precision on one CPU."""

    block: type[nn.Module]
    head: type[nn.Module]


def choose_kernels(dtype: str, features: CPUFeatures, threads: int, onednn: bool, fbgemm: bool,
                   native: bool = False) -> KernelPlan:
    """The fastest layers for batch-1 decoding in `dtype`, from the CPU's features, the thread count and what this
    torch build offers (oneDNN's float32 linear; FBGEMM's fp16-layout GEMM for bf16, its int8 GEMM for int8). A pure
    function: tests check the choice for every machine type on any machine.

    - With the native decode kernel built (`native`, gpt2lab.native), the layers it reads in place, whatever the
      CPU: plain `nn.Linear` for fp32 (nothing to convert), `BF16Linear` for bf16, `Int8Linear` for int8,
      `Int4Linear` for int4. Its steps outrun every layer below at batch 1 and 8, and it encodes prompts up to
      native_step.PREFILL_ROWS tokens; longer ones go through these layers' own forward.

    - fp32: row-block batched matmuls (`ChunkedLinear`) for the blocks and oneDNN for the head with several threads;
      with one thread or without oneDNN, MKL's GEMM on (K, N) copies of the wide weights (`TransposedLinear`).
    - bf16: bf16 tensors where the CPU has bf16 dot products (AVX-512-BF16, AMX); elsewhere FBGEMM's fp16 layout,
      which widens two-byte weights in one F16C instruction, where FBGEMM and F16C are there.
    - int8: int8 weights with per-channel scales: FBGEMM's integer GEMM where it works and the CPU has AVX2
      (`quantize_int.FbgemmInt8Linear`, the choice of `quantize_int.choose_int8_kernel`), else `Int8Linear`.
    """
    if native and dtype in NATIVE_LAYERS:
        return KernelPlan(NATIVE_LAYERS[dtype], NATIVE_LAYERS[dtype])
    if dtype == "fp32":
        if onednn and threads > 1:
            return KernelPlan(ChunkedLinear, OneDNNLinear)
        return KernelPlan(TransposedLinear, TransposedLinear)
    if dtype == "bf16":
        if not features.native_bf16 and features.f16c and fbgemm:
            return KernelPlan(HalfPackedLinear, HalfPackedLinear)
        return KernelPlan(BF16Linear, BF16Linear)
    if dtype == "int8":
        if choose_int8_kernel(features, fbgemm) == "fbgemm":
            return KernelPlan(FbgemmInt8Linear, FbgemmInt8Linear)
        return KernelPlan(Int8Linear, Int8Linear)
    if dtype == "int4":
        return KernelPlan(Int4Linear, Int4Linear)  # one layer everywhere; only the native step reads it fast
    raise ValueError(f"unknown weight dtype {dtype!r}; choose one of: {', '.join(WEIGHT_DTYPES)}")


def plan_for_this_cpu(dtype: str) -> KernelPlan:
    """`choose_kernels` for this CPU, the current thread count and what this torch build offers (the native kernel
    included)."""
    fbgemm = fbgemm_int8() if dtype == "int8" else fbgemm_half()
    return choose_kernels(dtype, cpu_features(), torch.get_num_threads(), onednn_linear(), fbgemm,
                          native.library() is not None)


def convert_weights(model: "GPT", dtype: str) -> "GPT":
    """Replace the linear layers of `model` and its tied head/embedding by inference versions, in place: weight-only
    "bf16", "int8" or "int4", or the "fp32" decode layout, as `choose_kernels` picks for this CPU. The model stays a GPT:
    same forward, same KV cache, float32 activations."""
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"unknown weight dtype {dtype!r}; choose one of: {', '.join(WEIGHT_DTYPES)}")
    if model.wte.weight.device.type == "cpu":
        plan = plan_for_this_cpu(dtype)
    else:  # other devices: the portable layers
        plan = KernelPlan(TransposedLinear, TransposedLinear) if dtype == "fp32" else \
            choose_kernels(dtype, CPUFeatures(), 1, False, False)
    if dtype == "fp32":
        if plan.block is nn.Linear:  # the native kernel reads the float32 weights as they are
            use_huge_pages(model)  # in 2 MiB pages (memory.py)
            return model
        if plan.block is TransposedLinear:
            return _transpose_wide(model)
        _replace_linears(model, lambda linear: decode_linear(linear, torch.get_num_threads()))
        model.lm_head = OneDNNLinear(model.wte.weight)  # the same (V, C) storage as the embedding
    elif dtype == "bf16":
        weights = [model.wte.weight] + [m.weight for m in model.h.modules() if isinstance(m, nn.Linear)]
        if plan.block is HalfPackedLinear and all(HalfPackedLinear.fits(w) for w in weights):
            _replace_linears(model, HalfPackedLinear.from_linear)
            model.lm_head = HalfPackedLinear(model.wte.weight)
            model.wte = LowPrecisionEmbedding(model.wte.weight.detach().to(torch.bfloat16))  # (V, C) for lookups
        else:
            _replace_linears(model, BF16Linear.from_linear)
            model.lm_head = BF16Linear(model.wte.weight)
            model.wte = LowPrecisionEmbedding(model.lm_head.weight)  # the head's own bf16 table
    elif dtype == "int4":
        _replace_linears(model, Int4Linear.from_linear)
        model.lm_head = Int4Linear(*quantize_int4(model.wte.weight))
        model.wte = Int4Embedding(model.lm_head)  # the head's own int4 table
    else:
        convert_int8(model, "fbgemm" if plan.block is FbgemmInt8Linear else "int8pack")  # Int8Linear: native too
    if plan.block in NATIVE_LAYERS.values():  # layers with plain weight tensors (not FBGEMM's packed ones)
        use_huge_pages(model)  # which a decode step streams: in 2 MiB pages (memory.py)
    return model


def convert_int8(model: "GPT", kernel: str, bits: Optional[int] = None) -> "GPT":
    """convert_weights(model, "int8") with a named kernel (one of quantize_int.INT8_KERNELS) and, for "fbgemm", bits
    of activation (7 or 8; default the CPU's choice): per-channel int8 weights in every block and the tied head, whose
    table the embedding reads."""
    q, s = quantize_per_channel(model.wte.weight)  # (V, C), (V,)
    if kernel == "fbgemm":
        bits = activation_bits(cpu_features()) if bits is None else bits
        _replace_linears(model, lambda linear: FbgemmInt8Linear.from_linear(linear, bits))
        model.lm_head = FbgemmInt8Linear(q, s, bits=bits)
        model.wte = LowPrecisionEmbedding(q, s)  # the same int8 rows, a copy beside the packed head
    elif kernel == "int8pack":
        _replace_linears(model, Int8Linear.from_linear)
        model.lm_head = Int8Linear(q, s)
        model.wte = LowPrecisionEmbedding(q, model.lm_head.scale)
    else:
        raise ValueError(f"unknown int8 kernel {kernel!r}; choose one of: fbgemm, int8pack")
    return model


def decode_linear(linear: nn.Linear, threads: int) -> OneDNNLinear:
    """The float32 decode layer of a block: two row blocks per thread (the most that divides N), else oneDNN.
    It reads the linear layer's own weight tensor (no copy)."""
    chunks = next((c for c in range(2 * threads, 1, -1) if linear.out_features % c == 0), 1) if threads > 1 else 1
    return ChunkedLinear.from_linear(linear, chunks) if chunks > 1 else OneDNNLinear.from_linear(linear)


def fast_float32_forward(linear: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """The batch-1 decode kernel for a plain float32 `nn.Linear` on the CPU, over the layer's own weight (a view:
    later changes to the weight are seen, and no memory is added); any other layer's own forward.

    This is what makes a freshly loaded model decode fast without `prepare_for_inference`: the same float32
    weights, the faster kernel of `decode_linear`."""
    if (type(linear) is nn.Linear and linear.weight.dtype == torch.float32 and linear.weight.device.type == "cpu"
            and linear.weight.is_contiguous() and onednn_linear()):
        return decode_linear(linear, torch.get_num_threads()).forward
    return linear.forward


def _replace_linears(model: "GPT", make: Callable[[nn.Linear], nn.Module]) -> None:
    for block in model.h:
        block.attn.c_attn = make(block.attn.c_attn)
        block.attn.c_proj = make(block.attn.c_proj)
        block.mlp.c_fc = make(block.mlp.c_fc)
        block.mlp.c_proj = make(block.mlp.c_proj)


def _transpose_wide(model: "GPT") -> "GPT":
    """float32 decode layout: wide linear layers (c_attn, c_fc) and the tied head stored (K, N)."""
    for block in model.h:
        block.attn.c_attn = TransposedLinear.from_linear(block.attn.c_attn)
        block.mlp.c_fc = TransposedLinear.from_linear(block.mlp.c_fc)
    model.lm_head = TransposedLinear(model.wte.weight)
    model.wte = ColumnEmbedding(model.lm_head.weight_t)
    return model


def is_converted(model: nn.Module) -> bool:
    """Whether `model` holds inference-only layers (and so should not be trained or saved)."""
    kinds = (_WeightOnlyLinear, LowPrecisionEmbedding, Int4Embedding, TransposedLinear, ColumnEmbedding, OneDNNLinear,
             HalfPackedLinear, FbgemmInt8Linear)  # ChunkedLinear is a OneDNNLinear
    return any(isinstance(m, kinds) for m in model.modules())
