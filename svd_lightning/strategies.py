"""``--trainer.strategy fsdp2``: Lightning's FSDP2 strategy with every rank a data-parallel shard.

Lightning's ``ModelParallelStrategy`` defaults to tensor parallelism within a node
(``tensor_parallel_size="auto"``: every local rank, all of them given the same batches);
SteeringLM shards with FSDP2 only (:mod:`svd_lightning.sharding`), so here the data-parallel size
is the world size and the tensor-parallel size is 1: each rank holds 1/N of the weights and
trains and scores its own batches, as under DDP.
"""

from __future__ import annotations

from datetime import timedelta

from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy(data_parallel_size=world size, tensor_parallel_size=1)``.

    Args:
        save_distributed_checkpoint: each rank writes its shard of the checkpoint (a directory,
            resumable with ``ckpt_path``); ``False`` gathers one full checkpoint file on rank 0.
        process_group_backend: default ``nccl`` on GPUs, ``gloo`` on CPUs.
        timeout: of the process group's collectives.
    """

    strategy_name = "fsdp2"

    def __init__(self, save_distributed_checkpoint: bool = True, process_group_backend: str | None = None,
                 timeout: timedelta | None = default_pg_timeout):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # every rank its own batches
        super().setup_environment()


if FSDP2Strategy.strategy_name not in StrategyRegistry:
    StrategyRegistry.register(FSDP2Strategy.strategy_name, FSDP2Strategy,
                              description="FSDP2 (ModelParallelStrategy), data parallel on every rank")
