"""Mixed precision: when bf16 autocast is worth using.

On CUDA, bf16 autocast is used on GPUs that compute bf16 natively (compute capability 8.0, Ampere,
and later); older ones (V100, T4) emulate it, slower than fp32. On a CPU it pays only with native
bf16 instructions (x86 AVX512_BF16 or AMX, Arm's BF16 extension); elsewhere bf16 is emulated and
slower than fp32, so the model runs in plain fp32.
"""
from __future__ import annotations

import contextlib
import functools

import torch

NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}   # x86 and aarch64 names in /proc/cpuinfo


def _cpu_flags() -> set[str] | None:
    """The CPU feature flags from /proc/cpuinfo, or None where there is no such file (macOS, Windows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return set(value.split())
    except OSError:
        return None
    return None


@functools.lru_cache(maxsize=None)
def cpu_supports_bf16() -> bool:
    """True where this CPU computes bf16 natively (not by emulation)."""
    flags = _cpu_flags()
    if flags is not None:
        return bool(flags & NATIVE_BF16_FLAGS)
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@functools.lru_cache(maxsize=None)
def cuda_supports_bf16(index: int) -> bool:
    """True where CUDA device `index` computes bf16 natively (compute capability 8.0 or later)."""
    try:
        major, _ = torch.cuda.get_device_capability(index)
    except (RuntimeError, AssertionError, ValueError):     # no such device, or no CUDA
        return False
    return major >= 8


def autocast_context(device: str | torch.device, enabled: bool | None = None):
    """bf16 autocast on bf16-capable GPUs and CPUs, else a null context.

    `enabled` overrides the detection: True forces bf16 autocast (on a CPU without bf16 it is
    emulated, and slow), False turns it off.
    """
    device = torch.device(device)
    kind = device.type
    if enabled is None:
        enabled = ((kind == "cuda" and cuda_supports_bf16(device.index or 0))
                   or (kind == "cpu" and cpu_supports_bf16()))
    if not enabled or kind not in ("cuda", "cpu"):
        return contextlib.nullcontext()
    return torch.autocast(kind, dtype=torch.bfloat16)
