"""The user-facing benchmarks, each run with ``python -m benchmarks.<name>``: cost, scale, precision, lm-eval
parity, open generation; results in ``benchmarks/results/``."""
