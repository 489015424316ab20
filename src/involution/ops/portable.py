"""Memory-light involution in plain PyTorch: any device, analytic backward.

Instead of expanding the input K^n times (see ``reference.py``), the forward pass loops over the
K^n kernel taps and accumulates ``strided view of the padded input * kernel tap`` into the
output. The backward passes do the same in reverse: the input gradient scatters
``grad_out * kernel tap`` into strided views of a padded buffer, and the kernel gradient reduces
``grad_out * strided view`` over the channels of each group. Extra memory is one padded copy of
the input (or its gradient) plus one output-sized temporary.

On the CPU the work is split into chunks of (batch, group) rows small enough to stay in the
last-level cache, so that the K^n passes over each chunk run at cache speed rather than memory
speed, yet large enough that per-op overhead stays small. Elsewhere (GPU, compiled graphs) the
whole tensor is one chunk, which keeps the launch count at K^n.

The tap loop works on contiguous (NCHW) rows: tensors in another layout are copied once on the
way in, and the op (``_library.py``) returns results in the input's memory format.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from .reference import pad_input, tap_index, taps

# Bytes of the tensors one chunk touches on the CPU. A sweep over 1, 4, 16 and 64 MiB at RedNet
# shapes on a 2-core machine was fastest at 16 MiB (2-4x faster than 1 MiB or 64 MiB).
_CPU_CHUNK_BYTES = 16 << 20


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _chunks(rows: int, row_bytes: int, device: torch.device) -> Iterator[slice]:
    if device.type != "cpu" or torch.compiler.is_compiling() or torch.compiler.is_exporting():
        yield slice(0, rows)
        return
    step = max(1, _CPU_CHUNK_BYTES // max(row_bytes, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def _row_bytes(*tensors: torch.Tensor) -> int:
    """Bytes of one (batch, group) row of each tensor together."""
    return sum(math.prod(t.shape[1:]) * t.element_size() for t in tensors)


def _group_view(t: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, C, *spatial) -> (B * G, C // G, *spatial)."""
    return t.reshape(t.shape[0] * groups, t.shape[1] // groups, *t.shape[2:])


def _forward_rows(
    x: torch.Tensor,
    w: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    acc: torch.dtype,
) -> torch.Tensor:
    out_size = w.shape[3:]
    # Out-of-place start, in-place accumulation: also traceable with autograd for export.
    out = torch.zeros((x.shape[0], x.shape[1], *out_size), dtype=acc, device=x.device)
    for t, offsets in enumerate(taps(kernel_size)):
        out.addcmul_(x[tap_index(offsets, stride, dilation, out_size)], w[:, :, t])
    return out


def forward(
    input: torch.Tensor,
    kernel: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> torch.Tensor:
    input, kernel = input.contiguous(), kernel.contiguous()
    batch, channels = input.shape[:2]
    groups = kernel.shape[1]
    out_size = kernel.shape[3:]
    x = _group_view(pad_input(input, padding), groups)  # (N, Cg, *padded)
    w = kernel.reshape(batch * groups, 1, kernel.shape[2], *out_size)  # (N, 1, T, *out)
    acc = _accumulator_dtype(input.dtype)
    # An output row is never larger than a padded input row: count it as one.
    chunks = list(_chunks(x.shape[0], _row_bytes(x, x, w), input.device))
    if len(chunks) == 1:
        out = _forward_rows(x, w, kernel_size, stride, dilation, acc)
    else:
        out = x.new_empty((x.shape[0], x.shape[1], *out_size), dtype=acc)
        for rows in chunks:
            out[rows] = _forward_rows(x[rows], w[rows], kernel_size, stride, dilation, acc)
    return out.reshape(batch, channels, *out_size).to(input.dtype)


def grad_input(
    grad_out: torch.Tensor,
    kernel: torch.Tensor,
    input_size: Sequence[int],
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> torch.Tensor:
    grad_out, kernel = grad_out.contiguous(), kernel.contiguous()
    batch, channels = grad_out.shape[:2]
    groups = kernel.shape[1]
    out_size = kernel.shape[3:]
    padded_size = [n + 2 * p for n, p in zip(input_size, padding, strict=True)]
    g = _group_view(grad_out, groups)  # (N, Cg, *out)
    w = kernel.reshape(batch * groups, 1, kernel.shape[2], *out_size)
    grad = torch.zeros(
        (g.shape[0], g.shape[1], *padded_size),
        dtype=_accumulator_dtype(grad_out.dtype),
        device=grad_out.device,
    )
    for rows in _chunks(g.shape[0], _row_bytes(grad, g, w), grad_out.device):
        gc, wc, xc = g[rows], w[rows], grad[rows]
        for t, offsets in enumerate(taps(kernel_size)):
            xc[tap_index(offsets, stride, dilation, out_size)].addcmul_(gc, wc[:, :, t])
    inner = [slice(p, p + n) for p, n in zip(padding, input_size, strict=True)]
    grad = grad.reshape(batch, channels, *padded_size)[(slice(None), slice(None), *inner)]
    return grad.to(grad_out.dtype)


def grad_kernel(
    grad_out: torch.Tensor,
    input: torch.Tensor,
    kernel_size: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
) -> torch.Tensor:
    grad_out, input = grad_out.contiguous(), input.contiguous()
    batch = input.shape[0]
    out_size = grad_out.shape[2:]
    offsets_list = taps(kernel_size)
    x = _group_view(pad_input(input, padding), groups)
    g = _group_view(grad_out, groups)
    acc = _accumulator_dtype(input.dtype)
    grad = torch.empty((x.shape[0], len(offsets_list), *out_size), dtype=acc, device=input.device)
    for rows in _chunks(x.shape[0], _row_bytes(x, g, grad), input.device):
        xc, gc, kc = x[rows], g[rows], grad[rows]
        for t, offsets in enumerate(offsets_list):
            view = xc[tap_index(offsets, stride, dilation, out_size)]
            kc[:, t] = torch.sum(view.to(acc) * gc, dim=1)
    return grad.reshape(batch, groups, len(offsets_list), *out_size).to(input.dtype)
