"""K copies' tensors of one dtype and device in one ``[K, N]`` buffer.

Row ``c`` holds copy ``c``'s tensors back to back; stack ``i`` is the view
``buffer[:, start_i:end_i]`` shaped ``[K, *shape_i]``. Batched rollouts keep
the stacked parameters, their gradients and the optimizer's moments in such
buffers, so that an operation on every copy's every tensor (a gradient norm
per copy, clipping, an AdamW update with per-copy factors) is one operation
on the buffer, with per-copy factors broadcast along its rows, instead of one
per tensor: on a GPU, a few kernel launches instead of hundreds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: Elements (over all copies) per block of an elementwise chain on the CPU: a few
#: operands of this size (1 MiB each in float32) fit a core's cache.
CPU_BLOCK = 1 << 18


class StackBuffer:
    """Copies of tensors of one dtype and device, stacked (see the module
    docstring): ``data`` holds ``tensors[c][i]`` (copy ``c``'s tensor ``i``) at
    ``view(data, i)[c]``; ``grad`` is a zeroed buffer of the same layout."""

    def __init__(self, tensors: Sequence[Sequence[torch.Tensor]]) -> None:
        self.copies = len(tensors)
        self.spans: list[tuple[int, int, torch.Size]] = []
        start = 0
        for tensor in tensors[0]:
            self.spans.append((start, start + tensor.numel(), tensor.shape))
            start += tensor.numel()
        self.dtype, self.device = tensors[0][0].dtype, tensors[0][0].device
        self.data = self.zeros()
        self.fill(self.data, tensors)
        self.grad = self.zeros()

    def zeros(self) -> torch.Tensor:
        """A zeroed ``[K, N]`` buffer of this one's dtype and device."""
        width = self.spans[-1][1]
        return torch.zeros(self.copies, width, dtype=self.dtype, device=self.device)

    def view(self, buffer: torch.Tensor, i: int) -> torch.Tensor:
        """Stack ``i`` of ``buffer``: a ``[K, *shape]`` view."""
        start, end, shape = self.spans[i]
        return buffer[:, start:end].view(self.copies, *shape)

    def blocks(self, first: int, last: int) -> list[slice]:
        """The buffer columns of stacks ``first`` to ``last - 1``: in one slice on a
        GPU (one launch per operation), in blocks of about ``CPU_BLOCK`` elements
        on the CPU, where a chain of operations over one block stays in cache (a
        pass over the whole buffer per operation streams it from memory each
        time: the stacked AdamW update of 8 copies of 3M parameters took 93-140
        ms so, 23-26 ms in blocks, 39-41 ms per tensor as before)."""
        start, end = self.spans[first][0], self.spans[last - 1][1]
        step = end - start if self.device.type == "cuda" else max(1, CPU_BLOCK // self.copies)
        return [slice(s, min(s + step, end)) for s in range(start, end, step)]

    def fill(self, buffer: torch.Tensor, tensors: Sequence[Sequence[torch.Tensor]]) -> None:
        """Copy ``tensors[c][i]`` into ``view(buffer, i)[c]``."""
        for c, row in enumerate(tensors):
            for i, tensor in enumerate(row):
                self.view(buffer, i)[c].copy_(tensor)
