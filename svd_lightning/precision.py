"""Pick the training/scoring precision by what the machine runs fast.

bf16 autocast is only a speed-up where the hardware has bf16 kernels: a CUDA GPU that supports
bf16, or a CPU on which oneDNN runs bf16 natively (AVX512-BF16 / AMX). Elsewhere (e.g. an AVX2-only
CPU) bf16 GEMMs fall back to a reference kernel that is 5-10x *slower* than fp32, so fp32 it is.
Log-probabilities are computed in fp32 either way (:func:`svd_lightning.steering.log_probs`).
"""

from __future__ import annotations

import math

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


# -- steering in a low precision -----------------------------------------------------------------------------
# Steered scores add μ̄·δz, δz a difference of two nearly equal distributions, so a low-precision forward
# pass's rounding is amplified by |μ̄|. Measured by benchmarks/precision.py on SmolLM2-135M + LoRA against
# fp64 weights (benchmarks/results/precision.json; tests/test_precision.py keeps these equal to it):
# kind -> |μ| -> (median, max) error of a row's steered score, nats.
MEASURED_STEERING_ERROR: dict[str, dict[float, tuple[float, float]]] = {
    "bf16 weights": {1: (0.113, 0.49), 3: (0.138, 0.603), 10: (0.26, 2.04), 30: (0.894, 6.06), 100: (3.3, 20.9)},
    "fp16 weights": {1: (0.0122, 0.0698), 3: (0.0162, 0.101), 10: (0.0414, 0.273), 30: (0.128, 0.747), 100: (0.439, 2.37)},
    "bf16 autocast over fp32 weights": {1: (0.095, 0.45), 3: (0.124, 0.591), 10: (0.231, 1.95), 30: (0.726, 6.32), 100: (2.45, 20.6)},
}
STEERING_ERROR_BOUND = 0.01  # nats: a steered score may err by this much before we say so (fp32 stays below it)
_LOW = {torch.bfloat16: "bf16 weights", torch.float16: "fp16 weights"}


class SteeringPrecisionWarning(UserWarning):
    """Steered scores computed in a precision whose measured error exceeds :data:`STEERING_ERROR_BOUND`."""


def steering_error(kind: str, mu: float) -> tuple[float, float]:
    """The measured (median, max) error at |μ| for ``kind`` (a key of :data:`MEASURED_STEERING_ERROR`):
    interpolated in log |μ| between measured points, held at the smallest below it, and grown in proportion
    to |μ| past the largest (the error is |μ| times the rounding of δz there)."""
    table = MEASURED_STEERING_ERROR[kind]
    points = sorted(table)
    m = abs(float(mu))
    if m <= points[0]:
        return table[points[0]]
    if m >= points[-1]:
        scale = m / points[-1]
        return table[points[-1]][0] * scale, table[points[-1]][1] * scale
    hi = next(p for p in points if p >= m)
    lo = points[points.index(hi) - 1]
    t = (math.log(m) - math.log(lo)) / (math.log(hi) - math.log(lo))
    return tuple((1 - t) * a + t * b for a, b in zip(table[lo], table[hi]))


def steering_precision(model: torch.nn.Module, autocast: torch.dtype | None = None) -> str | None:
    """Which measured low-precision kind ``model`` steers in (None: fp32 or better)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    if dtype in _LOW:
        return _LOW[dtype]
    if autocast in (torch.bfloat16, torch.float16) and dtype == torch.float32:
        return f"{'bf16' if autocast == torch.bfloat16 else 'fp16'} autocast over fp32 weights"
    return None


def check_steering_precision(model: torch.nn.Module, mu: float | None, where: str,
                             autocast: torch.dtype | None = None) -> str | None:
    """Warn (:class:`SteeringPrecisionWarning`) when ``model`` steers at ``mu`` in a precision whose measured
    error exceeds :data:`STEERING_ERROR_BOUND`, with that error and the setting that fixes it; returns the
    message (None: within the bound). Never silent, never a change to the user's model."""
    import warnings

    kind = steering_precision(model, autocast)
    if kind is None or not mu:
        return None
    fix = ("Load the model in float32 for exact scores: SteeredModel.from_run_dir(..., dtype='float32'); lm-eval: "
           "leave mixed_precision_dtype unset")
    if kind not in MEASURED_STEERING_ERROR:
        message = (f"{where}: steering in {kind}, a precision whose error is not measured (benchmarks/precision.py); "
                   f"the bound is {STEERING_ERROR_BOUND:g} nats. {fix}")
    else:
        median, worst = steering_error(kind, mu)
        if worst <= STEERING_ERROR_BOUND:
            return None
        message = (f"{where}: steering in {kind} at |μ̄| = {abs(mu):.3g}: steered scores err by about {median:.2g} nats "
                   f"(up to {worst:.2g}) against fp32/fp64, measured on SmolLM2-135M (benchmarks/results/precision.md); "
                   f"the bound is {STEERING_ERROR_BOUND:g} nats. {fix}")
    warnings.warn(message, SteeringPrecisionWarning, stacklevel=3)
    return message
