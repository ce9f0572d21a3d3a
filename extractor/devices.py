"""Devices and numeric precision: the one list of their names and the one rule for ``auto``.

The name lists are plain tuples and torch is imported inside the functions, so the command
line can offer them as choices (``--device``, ``--precision``) without loading torch.
"""
from __future__ import annotations

import contextlib
import os
import re

from .errors import SettingsError

DEVICES = ("auto", "cpu", "cuda", "mps")
_CUDA_INDEX = re.compile(r"cuda:\d+")  # one GPU of several, as torch names it
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DTYPES = ("float32", "float16")
RUNTIMES = ("auto", "torch", "openvino", "onnxruntime")  # what runs the network: extractor.runtimes


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and ``taskset``
    narrow), not every core of the machine."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _mps_available() -> bool:
    import torch
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(device: str = "auto", accelerators=("cuda", "mps")):
    """``auto`` is the first available of ``accelerators`` (CUDA, then MPS), else the CPU; a
    named device must be there.

    Returns a ``torch.device``. Code whose operations a backend lacks narrows ``accelerators``
    (the torch solver's eigendecompositions do not run on MPS).
    """
    import torch
    if device not in DEVICES and not _CUDA_INDEX.fullmatch(str(device)):
        raise SettingsError(f"device must be one of {', '.join(DEVICES)} or cuda:N, got {device!r}.")
    if device == "auto":
        if "cuda" in accelerators and torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if "mps" in accelerators and _mps_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SettingsError(f"--device {device} was requested but CUDA is not available on this machine.")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise SettingsError(f"--device {device} was requested but this machine has "
                                f"{torch.cuda.device_count()} CUDA device(s).")
    if device == "mps" and not _mps_available():
        raise SettingsError("--device mps was requested but MPS is not available on this machine.")
    return torch.device(device)


def resolve_precision(precision: str, device) -> str:
    """``auto`` is bf16 autocast on CUDA GPUs that support it (fp16 on older ones), else fp32;
    bf16 and fp16 need CUDA."""
    import torch
    if precision not in PRECISIONS:
        raise SettingsError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}.")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision != "fp32" and device.type != "cuda":
        raise SettingsError(f"--precision {precision} needs a CUDA device; on {device.type} use fp32.")
    return precision


def autocast(precision: str):
    """The autocast context of a resolved precision (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    import torch
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise SettingsError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    return dtype
