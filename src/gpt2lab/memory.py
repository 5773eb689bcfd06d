"""Large weight tensors in memory that the kernel may back with 2 MiB pages (transparent huge pages, Linux).

Why: a batch-1 decode step streams every weight from memory once, about 500 MB for GPT-2 small in float32. In 4 KiB
pages that is some 120,000 pages a token, each needing its own address translation, and where the pages happen to
lie in physical memory changes the speed (two copies of one model can decode at clearly different rates). Weights in
2 MiB pages need 512 times fewer translations; docs/benchmarks.md has the measurements.

How: a private anonymous mapping per tensor, aligned to 2 MiB and marked `MADV_HUGEPAGE` (Linux's default
`transparent_hugepage=madvise` gives huge pages only to memory that asks), wrapped as a tensor by `torch.frombuffer`.
The tensor owns its mapping: it is unmapped when the last view of the tensor is freed. Untouched alignment slack is
never backed by memory. Where the platform has no such mapping (not Linux), tensors stay where they are.
"""

from __future__ import annotations

import math
import mmap
import weakref

import torch
from torch import nn

HUGE_PAGE = 2 << 20  # bytes; tensors smaller than this gain nothing and stay where they are
_PLACED: set[int] = set()  # start addresses of live tensors placed here, so a second pass does not copy them again


def huge_pages_supported() -> bool:
    """Whether this platform can ask for transparent huge pages (Linux's madvise)."""
    return hasattr(mmap, "MADV_HUGEPAGE") and hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS")


def huge_page_empty(shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CPU tensor in its own 2 MiB-aligned mapping that asks for huge pages."""
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    start = torch.frombuffer(region, dtype=torch.uint8, count=1).data_ptr()
    offset = (-start) % HUGE_PAGE
    tensor = torch.frombuffer(region, dtype=dtype, count=count, offset=offset).view(shape)
    _PLACED.add(tensor.data_ptr())
    weakref.finalize(region, _PLACED.discard, tensor.data_ptr())  # the mapping lives as long as the tensor's storage
    return tensor


def _whole_storage(t: torch.Tensor) -> bool:
    """Whether `t` is all of its storage, contiguous from its start (so moving it moves every byte of it)."""
    return (t.is_contiguous() and t.storage_offset() == 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size())


def use_huge_pages(module: nn.Module, copy: bool = True) -> int:
    """Move every CPU parameter and buffer of `module` of at least HUGE_PAGE bytes into huge-page memory, in place;
    returns the bytes moved. Parameters keep their identity (`p.data` is swapped, so ties and optimizer state hold);
    a buffer held by several modules (a tied head and embedding table) is moved once and swapped in all of them.
    A tensor that shares its storage with another tensor (a view), or is already in such memory, is left alone.
    `copy=False` skips copying the
    values, for tensors about to be overwritten (a model being loaded)."""
    if not huge_pages_supported():
        return 0
    holders: dict[int, list[tuple[nn.Module, str, bool]]] = {}  # id(tensor) -> where it is held
    tensors: dict[int, torch.Tensor] = {}
    for owner in module.modules():
        for table, is_param in ((owner._parameters, True), (owner._buffers, False)):
            for name, t in table.items():
                if t is not None:
                    holders.setdefault(id(t), []).append((owner, name, is_param))
                    tensors[id(t)] = t
    by_storage: dict[int, list[int]] = {}
    for key, t in tensors.items():
        by_storage.setdefault(t.untyped_storage().data_ptr(), []).append(key)
    moved = 0
    with torch.no_grad():
        for key, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if (t.device.type != "cpu" or nbytes < HUGE_PAGE or not _whole_storage(t) or t.data_ptr() in _PLACED
                    or len(by_storage[t.untyped_storage().data_ptr()]) > 1):
                continue
            new = huge_page_empty(t.shape, t.dtype)
            if copy:
                new.copy_(t)
            if isinstance(t, nn.Parameter):
                t.data = new  # every module holding this Parameter sees the new memory
            else:
                for owner, name, _ in holders[key]:
                    owner._buffers[name] = new
            moved += nbytes
    return moved
