"""Which precision the arithmetic runs in: bfloat16 where the hardware multiplies it natively.

On a CPU with AVX512-BF16 or AMX, or a GPU with bf16 support, bfloat16 matrix products run at
several times the float32 speed with float32's range; elsewhere they are emulated and slower than
float32, so ``auto`` settings fall back to float32 there. Item scores stay float32 in every case.
"""

from pathlib import Path

import torch

NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": None}  # mixed_precision


def cpu_has_native_bf16():
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX), read from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return any(flag in flags for flag in NATIVE_BF16_CPU_FLAGS)


def has_native_bf16(device):
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()


def autocast_dtype(mixed_precision, device):
    """The autocast precision of training and evaluation: ``mixed_precision`` on a GPU; on a CPU
    bf16 only where it is native (fp16 autocast on a CPU is slower than float32)."""
    dtype = AUTOCAST_DTYPES[mixed_precision]
    if device.type == "cuda" or (dtype == torch.bfloat16 and cpu_has_native_bf16()):
        return dtype
    return None
