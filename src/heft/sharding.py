"""Which multi-process launches heft's training recipe runs, checked before anything loads.

Data parallelism (DDP: `torchrun` or `accelerate launch`, GPUs with NCCL or CPU processes with gloo)
is supported: every process holds the whole model and trains on its share of each epoch's batches
(`tests/test_data_parallel.py` checks that two CPU processes train what one process trains with the
same global batch, to float32 rounding).

FSDP is refused, in one line, for a reason that depends on where it would run:

- On CPU processes accelerate 1.15 never shards: `AcceleratorState` switches to
  `DistributedType.FSDP` only inside its branch for accelerator devices (CUDA, XPU, NPU, MLU, HPU...)
  and keeps `MULTI_CPU` otherwise, so `accelerate launch --use_fsdp` on a CPU host silently trains
  with DDP (torch 2.13's FSDP itself runs on gloo; accelerate does not select it there).
- Where accelerate does shard (GPUs), heft's stage boundaries need every parameter whole on each
  process and are not yet written for shards: evaluation calls the model's scoring methods, not the
  FSDP-wrapped forward that gathers parameters; merging a LoRA stage adds into the base weights;
  saving reads them; and the bf16 copies of the frozen weights would copy shards. Each would have to
  run inside FSDP's full-parameter gather (`summon_full_params(writeback=True)` for the merge).

Refusing is the honest choice until then: a run that asked for sharding must not quietly train
another way, or fail hours later at its first evaluation.
"""

from __future__ import annotations

from typing import Any

import accelerate
from accelerate.utils import DistributedType, parse_flag_from_env


class ShardingError(ValueError):
    """A launch heft's recipe does not run (FSDP)."""

    hint = "launch without --use_fsdp: data parallelism (DDP) runs on CPUs and GPUs; `heft plan` shows what fits"


def check_launch(accelerator: Any) -> None:
    """Refuse FSDP, requested through accelerate's launcher or config (see the module docstring)."""
    if accelerator.distributed_type == DistributedType.FSDP:
        raise ShardingError(
            "FSDP: heft's stage boundaries (evaluation, the LoRA merge into the base weights, saving) need "
            "every parameter whole on each process and do not run on FSDP's shards yet"
        )
    if parse_flag_from_env("ACCELERATE_USE_FSDP"):
        raise ShardingError(
            f"FSDP was requested (ACCELERATE_USE_FSDP=true) but accelerate {accelerate.__version__} shards on "
            f"accelerators only: here it would train with {accelerator.distributed_type.value} instead"
        )
