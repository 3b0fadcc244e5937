"""Pick the training/scoring precision by what the machine runs fast.

bf16 autocast is only a speed-up where the hardware has bf16 kernels: a CUDA GPU that supports
bf16, or a CPU on which oneDNN runs bf16 natively (AVX512-BF16 / AMX). Elsewhere (e.g. an AVX2-only
CPU) bf16 GEMMs fall back to a reference kernel that is 5-10x *slower* than fp32, so fp32 it is.
Log-probabilities are computed in fp32 either way (:func:`svd_lightning.steering.log_probs`).
"""

from __future__ import annotations

import torch

BF16 = "bf16-mixed"
FP32 = "32-true"


def cpu_has_fast_bf16() -> bool:
    """True when oneDNN reports native bf16 support on this CPU (checked, not assumed)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # an older or a stripped-down torch build
        return False


def uses_cuda(accelerator: str | None) -> bool:
    accelerator = (accelerator or "auto").lower()
    if accelerator in ("gpu", "cuda"):
        return True
    return accelerator == "auto" and torch.cuda.is_available()


def fast_precision(accelerator: str | None = "auto") -> tuple[str, str]:
    """``(precision, reason)`` for a Lightning ``Trainer`` on ``accelerator`` (cpu, gpu/cuda or auto)."""
    if uses_cuda(accelerator):
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return BF16, f"{torch.cuda.get_device_name()} supports bf16"
        return FP32, "this GPU has no bf16 support"
    if cpu_has_fast_bf16():
        return BF16, "this CPU runs bf16 natively (oneDNN bf16 supported)"
    return FP32, ("this CPU has no native bf16 (oneDNN bf16 unsupported): bf16 autocast would fall back "
                  "to a reference GEMM many times slower than fp32")


def resolve_precision(precision: str | int | None, accelerator: str | None = "auto") -> tuple[str, str]:
    """An explicit ``precision`` wins; ``None`` or ``"auto"`` picks :func:`fast_precision`."""
    if precision is None or str(precision) == "auto":
        return fast_precision(accelerator)
    if "bf16" in str(precision) and not uses_cuda(accelerator) and not cpu_has_fast_bf16():
        return str(precision), ("set explicitly -- WARNING: this CPU has no native bf16 (oneDNN bf16 unsupported), "
                                "so bf16 runs many times slower than fp32 here (5-9x measured on an AVX2 EPYC); "
                                "leave trainer.precision unset to get 32-true")
    return str(precision), "set explicitly"


def describe_cpu() -> str:
    """The CPU model and the flags that decide bf16 speed, for benchmark records."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        import platform

        model = platform.processor() or model
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    have = [f for f in wanted if f in flags]
    return f"{model} ({', '.join(have) or 'no AVX2/AVX512 flags'}; oneDNN bf16: {cpu_has_fast_bf16()})"
