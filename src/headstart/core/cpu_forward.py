"""Inference forwards of a frozen backbone on the CPU, in chunks the C allocator keeps instead of page-faulting.

On Linux (glibc), a CPU tensor larger than malloc's mmap threshold (at most 32 MiB) is a fresh `mmap`: every page of
it faults in on first touch and is unmapped again when freed. A batch of 64 images through EfficientNet-Lite0 at 224
has activations of about 300 MB, so each of its layers pays that, and the forward runs at a third of the speed the
cores allow (measured on 2 cores: 23 images/s, with more system than user time). Run in chunks whose largest
activation stays well under the threshold, with the threshold and the trim threshold fixed (`tune_cpu_allocator`),
the same forward reuses the same memory and runs at about 80 images/s. The results are the same: each image's
output does not depend on what else is in its batch in eval mode.

Every headstart command tunes the allocator at its start (that also speeds up forwards that are not chunked:
batch-1 latency, training steps); from Python, the first chunked forward does. Only inference forwards are chunked
(no gradient, every leaf module in eval mode, not while being traced or compiled): training-mode batch norm depends
on the whole batch. On CUDA the caching allocator already reuses memory.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import weakref

import torch
from torch import nn

log = logging.getLogger(__name__)

# Each chunk's largest activation at most this; glibc's mmap threshold cannot be raised above 32 MiB on 64-bit.
CHUNK_BYTES = 16 * 1024**2
_MMAP_THRESHOLD = 32 * 1024**2
_TRIM_THRESHOLD = 256 * 1024**2
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, <malloc.h>
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")

_tuned: bool | None = None
_per_image_bytes: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, ...], int]] = (
    weakref.WeakKeyDictionary()
)


def tune_cpu_allocator() -> bool:
    """Fix glibc malloc's mmap threshold at 32 MiB and its trim threshold at 256 MiB for this process (once), so that
    tensors under 32 MiB come from and return to the heap instead of being mapped and unmapped each time. glibc
    raises its threshold by itself after the first large free, but only up to what it last freed, and trims the heap
    whenever more than twice that is free, so a forward's memory keeps being handed back and faulted in again
    (Lite0, batch 1, one thread: 34.8 ms per image untuned, 21.5 ms tuned). The heap may keep up to 256 MiB free.

    Thresholds the user set (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`, a malloc entry in `GLIBC_TUNABLES`)
    are left as they are. True where the C library is glibc (tuned here or by the user), else False (nothing done).
    """
    global _tuned
    if _tuned is None:
        _tuned = False
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            own = any(k in os.environ for k in _USER_SETTINGS) or "malloc" in os.environ.get(
                "GLIBC_TUNABLES", ""
            )
            try:
                libc = ctypes.CDLL("libc.so.6")
                _tuned = own or bool(
                    libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
                    and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
                )
            except (OSError, AttributeError):
                _tuned = False
        log.debug("glibc malloc thresholds fixed for CPU forwards: %s", _tuned)
    return _tuned


def largest_activation_bytes(module: nn.Module, one: torch.Tensor) -> int:
    """The largest tensor any submodule of `module` outputs for the single input `one` ([1, ...]), in bytes."""
    largest = one.numel() * one.element_size()

    def record(_: nn.Module, __: object, output: object) -> None:
        nonlocal largest
        outputs = output if isinstance(output, tuple | list) else (output,)
        for out in outputs:
            if isinstance(out, torch.Tensor):
                largest = max(largest, out.numel() * out.element_size())

    hooks = [m.register_forward_hook(record) for m in module.modules()]
    try:
        module(one)
    finally:
        for hook in hooks:
            hook.remove()
    return largest


def chunk_size(module: nn.Module, inputs: torch.Tensor) -> int:
    """How many rows of `inputs` one chunk of `inference_forward` passes: the most whose largest activation stays
    within CHUNK_BYTES (at least 1). Measured once per module and input shape, on one row."""
    shapes = _per_image_bytes.setdefault(module, {})
    key = tuple(inputs.shape[1:])
    if key not in shapes:
        shapes[key] = largest_activation_bytes(module, inputs[:1])
    return max(1, CHUNK_BYTES // max(1, shapes[key]))


def inference_forward(module: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """`module(inputs)`; on the CPU with glibc, in inference (no gradient, every leaf module in eval mode, not
    traced), in chunks of `chunk_size` rows with the allocator tuned. Same outputs as one call, for modules whose
    rows do not interact in eval mode. (A frozen `Backbone` in training mode keeps its body in eval mode: it is
    chunked.)"""
    if (
        inputs.device.type != "cpu"
        or len(inputs) <= 1
        or torch.is_grad_enabled()
        or any(m.training for m in module.modules() if next(m.children(), None) is None)
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
    ):
        return module(inputs)
    if not tune_cpu_allocator():  # measured with glibc only; elsewhere the allocator is another story
        return module(inputs)
    chunk = chunk_size(module, inputs)
    if chunk >= len(inputs):
        return module(inputs)
    return torch.cat([module(part) for part in inputs.split(chunk)])
