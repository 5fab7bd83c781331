"""Which device and dtype to run on: CUDA in fp16 by default, MPS in fp16, CPU in fp32."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InvalidParameter

DTYPES = {"fp16": torch.float16, "float16": torch.float16, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


@dataclass(frozen=True)
class Placement:
    device: torch.device
    dtype: torch.dtype


def to_device(tensor: torch.Tensor, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``tensor`` on ``device`` (in ``dtype``). From host memory to a CUDA GPU the copy does not block:
    PyTorch's default copy then waits until the GPU has finished everything queued before it, leaving
    the GPU idle while the host catches up. A non-blocking copy from ordinary (pageable) memory is
    staged by the driver before the call returns, so the host tensor may be changed or freed at once.
    ``device`` None keeps the tensor where it is."""
    if device is None:
        return tensor.to(dtype=dtype)
    device = torch.device(device)
    blocking = not (tensor.device.type == "cpu" and device.type == "cuda")
    return tensor.to(device=device, dtype=dtype, non_blocking=not blocking)


def pick_device(name: str | None = None) -> torch.device:
    """The requested device, or the best one present: cuda, then mps, then cpu."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise InvalidParameter("device", name, "auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidParameter("device", name, "a device that exists here (CUDA is not available)")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise InvalidParameter("device", name, "a device that exists here (MPS is not available)")
    return device


def pick_placement(device: str | None = None, dtype: str | None = None, *, family: str | None = None) -> Placement:
    """fp16 on accelerators (half the memory, tensor cores), fp32 on CPU where fp16 is slow.

    FLUX gets bf16 on accelerators that have it: its T5 encoder and transformer overflow fp16.
    """
    dev = pick_device(device)
    if dtype in (None, "", "auto"):
        chosen = torch.float32 if dev.type == "cpu" else torch.float16
        if family == "flux" and dev.type != "cpu" and _has_bf16(dev):
            chosen = torch.bfloat16
    else:
        if dtype not in DTYPES:
            raise InvalidParameter("dtype", dtype, "auto, fp16, bf16 or fp32")
        chosen = DTYPES[dtype]
    return Placement(dev, chosen)


def _has_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return device.type == "mps"
