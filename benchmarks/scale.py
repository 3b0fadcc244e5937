"""How SVDecode scales: peak memory and time per unit of work on random-weight Llamas of ~135M, ~360M
and ~1B parameters, one process vs N sharded ranks (FSDP2), and a memory model fitted to them that
predicts 8B and 70B in bf16 on 1 and 8 GPUs of 80 GB.

Units of work, each timed ``--steps`` times after a warm-up call (median [min, max]), then run once
more for its peak memory above the state before it (``cost.PeakMemory``: per rank, the resettable
RSS high-water mark after free heap memory went back to the OS on CPU, CUDA's allocator peak on a GPU):

- ``warm_start``: one LoRA training step (forward, backward, AdamW) at 1 and 4 questions a batch
  (the two sizes give the activation memory per token as a slope);
- ``calibration``: :func:`svd_lightning.calibration.calibrate` of one batch of 4 questions;
- ``scoring``: :func:`svd_lightning.scoring.score_choices` (steered) of one batch of 2 questions;
- ``generation``: :func:`svd_lightning.generation.steered_generate`, 4 prompts, ``--new-tokens``
  greedy tokens, per token; ``plain`` is ``model.generate`` with the adapter on.

Steered units run on both paths: ``one_forward`` (warm and base rows in one batch) and ``two_pass``.
Every rank works on its own questions (TruthfulQA, zero-shot prompts), as under data parallelism.
The models are built locally from a config with random weights (nothing downloaded; the SmolLM2
tokenizer, vocabulary 49152), fp32 on CPU. One result file per cell (size, ranks, device) under
``--results``: an interrupted run resumes where it stopped. ``--model-only`` rebuilds the table and
the predictions from the cell files.

    python -m benchmarks.scale --steps 2 --new-tokens 4 # the committed cells (26 min on 2 CPU cores, 1B sharded: 16)
    python -m benchmarks.scale --sizes 135m --steps 2   # one size: a smoke test
    python -m benchmarks.scale --device cuda --ranks 1 2 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks.cost import PeakMemory, release_free_heap  # one memory probe for every benchmark

ROOT = Path(__file__).resolve().parent
PATHS = ("one_forward", "two_pass")
TRAIN_BATCHES = (1, 4)
GB = 1e9


@dataclass(frozen=True)
class Shape:
    """The numbers of a Llama the memory model needs."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int = 49152
    tied: bool = True

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_params(self) -> int:
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_heads * self.head_dim
        return attn + 3 * self.hidden * self.ffn + 2 * self.hidden  # + the two RMSNorms

    def root_params(self) -> int:
        """Embeddings, final norm and (untied) output head: the FSDP root unit."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def params(self) -> int:
        return self.layers * self.layer_params() + self.root_params()

    def lora_params(self, r: int = 8) -> int:
        """LoRA of rank ``r`` on q, k, v and o (svd_lightning's default adapter): r·(in + out) each."""
        kv = self.kv_heads * self.head_dim
        return self.layers * r * (2 * (self.hidden + self.hidden) + 2 * (self.hidden + kv))

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Keys and values of one token in every layer."""
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes


# Measured (random weights; SmolLM2-135M and -360M's shapes, a Llama-3.2-1B-like shape on SmolLM2's vocabulary).
SIZES = {
    "135m": Shape(layers=30, hidden=576, ffn=1536, heads=9, kv_heads=3),
    "360m": Shape(layers=32, hidden=960, ffn=2560, heads=15, kv_heads=5),
    "1b": Shape(layers=16, hidden=2048, ffn=8192, heads=32, kv_heads=8),
}
# The logits' share of training memory: one layer of the 135M shape, same vocabulary (one process only).
PROBES = {"1layer": Shape(layers=1, hidden=576, ffn=1536, heads=9, kv_heads=3)}
# Predicted (Llama-3-8B and Llama-3-70B shapes).
TARGETS = {
    "8b": Shape(layers=32, hidden=4096, ffn=14336, heads=32, kv_heads=8, vocab=128256, tied=False),
    "70b": Shape(layers=80, hidden=8192, ffn=28672, heads=64, kv_heads=8, vocab=128256, tied=False),
}
# The paper's models (configs/paper/), by hub id: their published configs' shapes.
PAPER_MODELS = {
    "Qwen/Qwen2.5-1.5B": Shape(layers=28, hidden=1536, ffn=8960, heads=12, kv_heads=2, vocab=151936, tied=True),
    "Qwen/Qwen2.5-7B": Shape(layers=28, hidden=3584, ffn=18944, heads=28, kv_heads=4, vocab=152064, tied=False),
    "meta-llama/Llama-3.1-8B": TARGETS["8b"],
}


def build_model(shape: Shape, seed: int = 0):
    """A random-weight LlamaForCausalLM of ``shape`` with a LoRA adapter whose B is small and random
    (B = 0 would make warm == base), fp32, the same on every rank."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from svd_lightning.models import apply_adapter

    config = LlamaConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.ffn,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, tie_word_embeddings=shape.tied,
                         max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    base = LlamaForCausalLM(config)
    with torch.no_grad():  # every weight written: a weight left as untouched memory is not resident on CPU
        for p in base.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    model = apply_adapter(base, "lora")
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return model


def _rss_mb() -> float:
    return PeakMemory.status_mb("VmRSS") if sys.platform == "linux" else float("nan")


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure(fn, device, steps: int) -> dict:
    """Warm-up call, ``steps`` timed calls (seconds), then one call for the extra peak memory (MB),
    after free heap memory went back to the OS (its page faults stay out of the timings)."""
    fn()
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    with PeakMemory(device, release=True) as mem:
        fn()
    return {"seconds": _summary(seconds), "peak_extra_mb": mem.extra_mb}


def _batches(rank: int, device):
    """This rank's questions: training batches of 1 and 4, a calibration batch of 4, a scoring batch
    of 2 and 4 generation prompts, all zero-shot TruthfulQA."""
    from svd_lightning.batch import collate_choices, collate_lm
    from svd_lightning.data import PAPER_SPLIT, TruthfulQADataModule
    from svd_lightning.models import load_tokenizer

    tok = load_tokenizer("smollm2-135m")
    dm = TruthfulQADataModule(instruction=False, few_shot=False, max_length=256, split=PAPER_SPLIT)
    dm.tokenizer = tok
    dm.setup()
    start = 16 * rank  # every rank its own questions
    train, calib, test = dm.train_set[start:], dm.calib_set[start:], dm.test_set[start:]
    to_dev = lambda b: {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}  # noqa: E731
    tok.padding_side = "left"
    prompts = tok([ex.prompt for ex in test[2:6]], return_tensors="pt", padding=True).to(device)
    return {
        "train": {bs: to_dev(collate_lm(train[:bs], dm.tokenized)) for bs in TRAIN_BATCHES},
        "calib": to_dev(collate_lm(calib[:4], dm.tokenized)),
        "score": to_dev(collate_choices(test[:2], dm.tokenized)),
        "prompts": prompts,
        "pad_id": tok.pad_token_id,
    }


def rank_main(rank: int, world: int, args: argparse.Namespace, out: str) -> None:
    """One rank of a cell: build (and shard) the model, measure every unit, rank 0 writes the cell."""
    from svd_lightning.calibration import calibrate
    from svd_lightning.config import SteeringConfig
    from svd_lightning.generation import steered_generate
    from svd_lightning.scoring import score_choices
    from svd_lightning.precision import describe_cpu
    from svd_lightning.sharding import local_bytes, lockstep, shard_model

    cuda = args.device == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    torch.set_num_threads(max(1, args.threads // world))  # the same cores in total, whatever the ranks
    if world > 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        torch.distributed.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        shape = {**SIZES, **PROBES}[args.size]
        rss_before = _rss_mb()
        model = build_model(shape).to(device)
        if world > 1:
            from torch.distributed.device_mesh import init_device_mesh

            shard_model(model, init_device_mesh(device.type, (world,)))
        release_free_heap()  # the unsharded copy each rank built is gone: RSS is what stays
        own_bytes, all_bytes = local_bytes(model)
        resident_mb = _rss_mb() - rss_before if not cuda else torch.cuda.memory_allocated(device) / 2**20
        data = _batches(rank, device)
        tokens = lambda b: int(b["attention_mask"].sum())  # noqa: E731
        units = {}

        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def train_step(batch):
            model.train()
            loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for bs, batch in data["train"].items():
            units[f"warm_start_b{bs}/train"] = {**measure(lambda: train_step(batch), device, args.steps), "tokens": tokens(batch)}
        model.eval()
        for path in PATHS:
            config = SteeringConfig(mu=-1.0)
            units[f"calibration/{path}"] = {
                **measure(lambda: calibrate(model, [data["calib"]], SteeringConfig(), forward_mode=path, progress=False),
                          device, args.steps), "tokens": tokens(data["calib"])}

            def score():
                with torch.no_grad(), lockstep(model):
                    score_choices(model, data["score"], config, forward_mode=path)

            units[f"scoring/{path}"] = {**measure(score, device, args.steps), "tokens": tokens(data["score"])}
        prompts, n_new = data["prompts"], args.new_tokens
        kw = dict(max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False, pad_token_id=data["pad_id"])

        def generate(path):
            with torch.no_grad():
                if path == "plain":
                    with lockstep(model):
                        model.generate(**prompts, **kw, synced_gpus=False)
                else:
                    steered_generate(model, prompts["input_ids"], prompts["attention_mask"],
                                     SteeringConfig(mu=-1.0), forward_mode=path, **kw)

        for path in ("plain", *PATHS):
            m = measure(lambda: generate(path), device, args.steps)
            m["seconds"] = {k: v / n_new for k, v in m["seconds"].items()}  # per generated token
            units[f"generation/{path}"] = {**m, "tokens": n_new * prompts["input_ids"].shape[0],
                                           "prompt_tokens": tokens(prompts)}
        row = {"rank": rank, "param_bytes": own_bytes, "all_param_bytes": all_bytes, "resident_mb": resident_mb,
               "peak_rss_mb": PeakMemory.status_mb("VmHWM") if not cuda and sys.platform == "linux" else None,
               "units": units}
        rows = [row]
        if world > 1:
            rows = [None] * world
            torch.distributed.all_gather_object(rows, row)
        if rank == 0:
            cell = {"size": args.size, "ranks": world, "device": args.device, "shape": asdict(shape),
                    "params": sum(p.numel() for p in model.parameters()), "threads_per_rank": torch.get_num_threads(),
                    "steps": args.steps, "new_tokens": n_new, "hardware": torch.cuda.get_device_name(device) if cuda
                    else describe_cpu(), "torch": torch.__version__, "platform": platform.platform(), "per_rank": rows}
            tmp = Path(out).with_suffix(".tmp")
            tmp.write_text(json.dumps(cell, indent=1))
            tmp.replace(out)  # a cell file is complete or absent
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def run_cell(args, size: str, ranks: int, path: Path) -> None:
    import socket

    import torch.multiprocessing as mp

    cell_args = argparse.Namespace(**{**vars(args), "size": size})
    if ranks == 1:
        rank_main(0, 1, cell_args, str(path))
        return
    with socket.socket() as sock:  # a free port for this cell's process group
        sock.bind(("127.0.0.1", 0))
        os.environ["MASTER_PORT"] = str(sock.getsockname()[1])
    mp.start_processes(rank_main, args=(ranks, cell_args, str(path)), nprocs=ranks, start_method="spawn")


# -- the memory model ---------------------------------------------------------------------------------


def _slope_per_token(units: dict) -> float:
    """Extra training memory (bytes) per token: the step between the two training batch sizes."""
    small, large = (units[f"warm_start_b{bs}/train"] for bs in TRAIN_BATCHES)
    return (large["peak_extra_mb"] - small["peak_extra_mb"]) * 2**20 / (large["tokens"] - small["tokens"])


def _gather_bytes(shape: dict, dtype_bytes: int) -> int:
    """The root unit and two decoder layers, whole: what FSDP2 holds gathered during a forward."""
    s = Shape(**shape)
    return (s.root_params() + 2 * s.layer_params()) * dtype_bytes


def fit_memory_model(cells: list[dict]) -> dict:
    """Least squares on the one-process cells (fp32 elements per training token):

        activations per token = layers · (a · hidden + b · ffn) + c · vocab

    (every layer's saved activations, and the logits with their log-softmax and gradient; the
    one-layer probe cell pins ``c``). Sharded cells give the gather factor: the extra training
    memory a 2-rank cell has over its one-process cell, in units of :func:`_gather_bytes`; the
    prediction uses the largest model's (small models' are dominated by fixed buffers).
    Forward-only (calibration, scoring) peak per token = ``f · vocab``.

    Returns the coefficients and each cell's fitted vs measured value.
    """
    single = [c for c in cells if c["ranks"] == 1]
    if len(single) < 3:
        raise ValueError(f"the memory model needs one-process cells of at least 3 sizes, got {len(single)}")
    xs, ys = [], []
    for c in single:
        s = c["shape"]
        xs.append([s["layers"] * s["hidden"], s["layers"] * s["ffn"], s["vocab"]])
        ys.append(_slope_per_token(c["per_rank"][0]["units"]) / 4)  # fp32 elements
    x, y = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    a, b, c_vocab = torch.linalg.lstsq(x, y[:, None]).solution.reshape(-1).tolist()
    infer = []
    for c in single:
        u = c["per_rank"][0]["units"]
        for path in PATHS:
            for unit in ("calibration", "scoring"):
                m = u[f"{unit}/{path}"]
                infer.append(m["peak_extra_mb"] * 2**20 / 4 / (m["tokens"] * c["shape"]["vocab"]))
    one = {c["size"]: c for c in single}
    gather = []
    for c in cells:
        if c["ranks"] > 1 and c["size"] in one:
            name = f"warm_start_b{TRAIN_BATCHES[-1]}/train"
            extra = max(r["units"][name]["peak_extra_mb"] for r in c["per_rank"])
            gather.append((c["params"], (extra - one[c["size"]]["per_rank"][0]["units"][name]["peak_extra_mb"]) * 2**20
                           / _gather_bytes(c["shape"], 4)))
    gather.sort()
    fitted = [{"size": c["size"], "measured_elements_per_token": yv,
               "fitted_elements_per_token": a * xv[0] + b * xv[1] + c_vocab * xv[2]}
              for c, xv, yv in zip(single, xs, ys)]
    return {"a_per_layer_hidden": a, "b_per_layer_ffn": b, "c_per_vocab": c_vocab,
            "f_forward_per_vocab": statistics.median(infer),
            # the largest sharded model's factor: small models' gathers are dominated by fixed buffers
            "gather_factor": gather[-1][1] if gather else 1.0, "gather_factors": [g for _, g in gather], "fit": fitted}


def predict(shape: Shape, gpus: int, sharded: bool, coef: dict, gpu_gb: float = 80.0, dtype_bytes: int = 2,
            headroom: float = 0.9) -> dict:
    """Per-GPU memory (GB) of a LoRA warm start and of steered generation for ``shape`` in bf16: weights
    (1/N of them when sharded, plus the gathered root unit and two decoder layers in flight, times the
    measured gather factor), LoRA and
    its AdamW state in fp32 (param, grad, two moments: 16 bytes), and the tokens a GPU can hold within
    ``headroom`` of its memory -- training tokens at the fitted activations (layers' in bf16, the
    logits' in fp32), or KV-cache tokens
    of steered generation (two distributions: both paths hold twice the rows' keys and values).
    A model, not a measurement."""
    n = gpus if sharded else 1
    weights = shape.params() * dtype_bytes / n
    if sharded and gpus > 1:  # gathered units in flight, at the worst factor the sharded cells measured
        weights += coef.get("gather_factor", 1.0) * _gather_bytes(asdict(shape), dtype_bytes)
    # not modelled: activation checkpointing (fewer saved activations), fragmentation, CUDA/NCCL buffers
    adapter = shape.lora_params() * 16 / n
    fixed = weights + adapter
    budget = gpu_gb * GB * headroom
    # saved layer activations in the weights' dtype (autocast); the logits' loss terms in fp32, as transformers upcasts them
    act = ((coef["a_per_layer_hidden"] * shape.hidden + coef.get("b_per_layer_ffn", 0.0) * shape.ffn) * shape.layers
           * dtype_bytes + coef["c_per_vocab"] * shape.vocab * 4)
    kv_steered = 2 * shape.kv_bytes_per_token(dtype_bytes)
    free = budget - fixed
    return {"weights_gb": weights / GB, "adapter_state_gb": adapter / GB, "fixed_gb": fixed / GB,
            "train_bytes_per_token": act, "kv_bytes_per_token_steered": kv_steered,
            "fits": free > 0, "train_tokens_per_gpu": int(free // act) if free > 0 else 0,
            "kv_tokens_per_gpu": int(free // kv_steered) if free > 0 else 0}


def predictions(coef: dict) -> list[dict]:
    rows = []
    for name, shape in TARGETS.items():
        for gpus, sharded in ((1, False), (8, False), (8, True)):
            rows.append({"model": name, "params_b": shape.params() / 1e9, "gpus": gpus,
                         "strategy": "fsdp2" if sharded else ("ddp" if gpus > 1 else "single"),
                         **predict(shape, gpus, sharded, coef)})
    return rows


# -- report ---------------------------------------------------------------------------------------------


def load_cells(results: Path, device: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(results.glob(f"*_{device}.json"))]


def table(cells: list[dict], coef: dict | None, preds: list[dict] | None) -> str:
    fmt = lambda d: f"{d['median']:.3g} [{d['min']:.3g}, {d['max']:.3g}]"  # noqa: E731
    lines = []
    for c in sorted(cells, key=lambda c: (c["params"], c["ranks"])):
        worst = max(c["per_rank"], key=lambda r: r["param_bytes"])
        lines.append(f"\n{c['size']} ({c['params'] / 1e6:.0f}M params), {c['ranks']} rank(s) x {c['threads_per_rank']} threads, "
                     f"{c['hardware']}: params {worst['param_bytes'] / 2**20:.0f} MB/rank, resident +{worst['resident_mb']:.0f} MB")
        lines.append(f"  {'unit/path':<28}{'tokens':>7}{'s/unit median [min, max]':>30}{'ms/token':>10}{'peak +MB/rank':>15}")
        for unit in c["per_rank"][0]["units"]:
            per = [r["units"][unit] for r in c["per_rank"]]
            m = max(per, key=lambda x: x["seconds"]["median"])
            per_token = m["seconds"]["median"] * 1e3 / (1 if unit.startswith("generation") else m["tokens"])
            lines.append(f"  {unit:<28}{m['tokens']:>7}{fmt(m['seconds']):>30}{per_token:>10.2f}"
                         f"{max(x['peak_extra_mb'] for x in per):>15.0f}")
    if coef:
        lines.append(f"\nmemory model (fit on the one-process cells, fp32 elements): training activations per token = "
                     f"layers x ({coef['a_per_layer_hidden']:.2f} x hidden + {coef['b_per_layer_ffn']:.2f} x ffn) + "
                     f"{coef['c_per_vocab']:.2f} x vocab; forward-only per token = {coef['f_forward_per_vocab']:.2f} x vocab; "
                     f"sharded: {coef['gather_factor']:.2f} x (root unit + 2 layers) gathered (the largest model's; smallest to largest: "
                     + ", ".join(f"{g:.2f}" for g in coef["gather_factors"]) + ")")
        for f in coef["fit"]:
            lines.append(f"  {f['size']:>5}: measured {f['measured_elements_per_token'] / 1e3:.1f}k, "
                         f"fitted {f['fitted_elements_per_token'] / 1e3:.1f}k elements/token")
    if preds:
        lines.append("\nPREDICTED by the model (bf16 weights and layer activations, LoRA r=8 on q/k/v/o + AdamW fp32, 80 GB GPUs, "
                     "90% usable) -- not measured:")
        lines.append(f"  {'model':<6}{'GPUs':>5}{'strategy':>9}{'weights GB/GPU':>16}{'fits':>6}"
                     f"{'train tokens/GPU':>18}{'steered KV tokens/GPU':>23}")
        for p in preds:
            lines.append(f"  {p['model']:<6}{p['gpus']:>5}{p['strategy']:>9}{p['weights_gb']:>16.1f}{'yes' if p['fits'] else 'no':>6}"
                         f"{p['train_tokens_per_gpu']:>18,}{p['kv_tokens_per_gpu']:>23,}")
    return "\n".join(lines)


def markdown(cells: list[dict], preds: list[dict] | None) -> str:
    """The README's tables: measured per rank (worst rank), then the model's predictions."""
    def unit(c, name):
        per = [r["units"][name] for r in c["per_rank"]]
        return max(x["seconds"]["median"] for x in per), max(x["peak_extra_mb"] for x in per)

    lines = ["| model | ranks | params MB/rank | train step (4 questions): s, +MB | training peak MB/rank (params + extra) "
             "| calibration s (1F / 2P) | scoring s (1F / 2P) | generation ms/token (plain / 1F / 2P), +MB 1F |",
             "|---|---|---|---|---|---|---|---|"]
    for c in sorted(cells, key=lambda c: (c["params"], c["ranks"])):
        if c["size"] not in SIZES:
            continue  # the probe cell feeds the model only
        params = max(r["param_bytes"] for r in c["per_rank"]) / 2**20
        train = unit(c, "warm_start_b4/train")
        cal = [unit(c, f"calibration/{p}")[0] for p in PATHS]
        score = [unit(c, f"scoring/{p}")[0] for p in PATHS]
        gen = [unit(c, f"generation/{p}")[0] * 1e3 for p in ("plain", *PATHS)]
        lines.append(f"| {c['size']} ({c['params'] / 1e6:.0f}M) | {c['ranks']} | {params:.0f} "
                     f"| {train[0]:.2f}, +{train[1]:.0f} | {params + train[1]:.0f} | {cal[0]:.2f} / {cal[1]:.2f} "
                     f"| {score[0]:.2f} / {score[1]:.2f} | {gen[0]:.0f} / {gen[1]:.0f} / {gen[2]:.0f}, "
                     f"+{unit(c, 'generation/one_forward')[1]:.0f} |")
    if preds:
        lines += ["", "| PREDICTED (a model, not a measurement) | GPUs | strategy | weights GB/GPU | fits 80 GB "
                  "| training tokens/GPU | steered KV-cache tokens/GPU |", "|---|---|---|---|---|---|---|"]
        for r in preds:
            lines.append(f"| {r['model']} ({r['params_b']:.1f}B, bf16) | {r['gpus']} | {r['strategy']} | {r['weights_gb']:.1f} "
                         f"| {'yes' if r['fits'] else 'no'} | {r['train_tokens_per_gpu']:,} | {r['kv_tokens_per_gpu']:,} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--ranks", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--probes", action=argparse.BooleanOptionalAction, default=True,
                    help="also the one-layer cell that separates the logits' memory (one process)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads over all ranks of a cell")
    ap.add_argument("--steps", type=int, default=3, help="timed calls of each unit after a warm-up call")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "scale", help="one JSON per cell")
    ap.add_argument("--out", type=Path, default=None, help="the summary JSON (default: results/scale_<device>.json)")
    ap.add_argument("--model-only", action="store_true", help="no measuring: the table and model from the cell files")
    ap.add_argument("--markdown", action="store_true", help="also print the README's tables")
    ap.add_argument("--size", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    if not args.model_only:
        cells = [(size, ranks) for size in args.sizes for ranks in args.ranks]
        cells += [(probe, 1) for probe in PROBES if args.probes]
        for size, ranks in cells:
            path = args.results / f"{size}_r{ranks}_{args.device}.json"
            if path.exists():
                print(f"{path.name}: done", flush=True)
                continue
            start = time.perf_counter()
            print(f"{size} on {ranks} rank(s) ...", flush=True)
            run_cell(args, size, ranks, path)
            print(f"  -> {path.name} in {time.perf_counter() - start:.0f} s", flush=True)
    cells = load_cells(args.results, args.device)
    try:
        coef = fit_memory_model(cells)
    except ValueError as err:
        print(f"no memory model: {err}")
        coef = None
    preds = predictions(coef) if coef else None
    out = args.out or ROOT / "results" / f"scale_{args.device}.json"
    summary = {"cells": cells, "memory_model": coef, "predictions": preds,
               "note": "predictions are the memory model's, for bf16 on 80 GB GPUs; nothing above 1B was run"}
    out.write_text(json.dumps(summary, indent=1))
    print(table(cells, coef, preds))
    if args.markdown:
        print("\n" + markdown(cells, preds))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
