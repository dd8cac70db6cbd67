"""Which multi-process launches heft's training recipe runs, and how it shards the base under FSDP.

Data parallelism (DDP: `torchrun` or `accelerate launch`, GPUs with NCCL or CPU processes with gloo)
holds the whole model on every process, each training on its share of each epoch's batches.

FSDP (`accelerate launch --use_fsdp`, FULL_SHARD) is heft's own, built on torch's per-parameter
FSDP2 (`torch.distributed.fsdp.fully_shard`) over accelerate's process group, not on accelerate's
FSDP plugin: accelerate 1.15 selects FSDP only on accelerator devices (on CPU processes its plugin
fails to build), and its FSDP2 path wants one model and optimizer prepared together, while heft's
stages change the model's modules between trainings (LoRA injected, merged, removed; ReFT hooks
added). heft reads the launch's FSDP settings itself (`check_launch`) and builds its `Accelerator`
for plain data parallelism (`fsdp_hidden_from_accelerate`). What heft shards is what costs the memory in PEFT:

- Every decoder layer's base weights are sharded once, right after loading (`shard_base`): each
  process keeps 1/N of each weight; a layer's forward (and its backward) all-gathers it, then frees it.
  The embeddings, final norm and LM head stay whole on every process (frozen: nothing to synchronise).
- The trainable parameters (LoRA A/B, ReFT) are added after sharding, so FSDP never manages them:
  they are replicated, and their gradients are averaged across processes at each optimizer step
  (`average_gradients`), as DDP does. The optimizer state, the adapters' state dicts and the saved
  run folder are therefore those of one process, unchanged.
- Merging a LoRA stage adds the adapters' update, which every process holds whole, to the rows of each
  base weight it owns (`add_to_shards`): the merge is local, no base weight is gathered, and each
  element is the same sum one process computes.
- Every forward runs on all processes in step (each layer's all-gather is a collective): the training
  loader gives every process as many batches, and evaluation under FSDP scores every batch on every
  process instead of splitting them (`evaluate.sharded`).

`tests/test_data_parallel.py` checks that two CPU processes, with DDP (torchrun) and with FSDP (started by
`accelerate launch --use_fsdp` itself), train what one process trains with the same global batch. On a host
without GPUs the launch is `accelerate launch --num_processes 2 --use_fsdp --fsdp_sharding_strategy FULL_SHARD
-m heft train ...` (accelerate refuses `--cpu` together with `--use_fsdp`; with no CUDA device heft runs
the processes on the CPU, over gloo). A quantized base is not sharded (bitsandbytes' packed
weights are not DTensors): FSDP with `quantize` is refused before anything loads.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from accelerate.utils import parse_flag_from_env
from torch import nn

FULL_SHARD = ("FULL_SHARD", "1")
"""accelerate's spellings of FULL_SHARD in FSDP_SHARDING_STRATEGY (`accelerate launch --fsdp_sharding_strategy`)."""


class ShardingError(ValueError):
    """A launch heft's recipe does not run."""

    hint = "launch with --use_fsdp --fsdp_sharding_strategy FULL_SHARD, or without --use_fsdp (DDP)"


def check_launch(quantized: bool) -> bool:
    """Whether the launch asks for FSDP (`accelerate launch --use_fsdp`, or an accelerate config with FSDP:
    both reach each process as ACCELERATE_USE_FSDP and FSDP_* variables); refuses, before anything loads,
    the FSDP settings heft does not run."""
    if not parse_flag_from_env("ACCELERATE_USE_FSDP"):
        return False
    strategy = _strategy()
    if strategy.upper() not in FULL_SHARD:
        raise ShardingError(f"FSDP sharding strategy {strategy}: heft shards with FULL_SHARD only")
    if parse_flag_from_env("FSDP_OFFLOAD_PARAMS"):
        raise ShardingError("FSDP offload_params: heft keeps every shard on the process's device")
    if quantized:
        raise ShardingError(
            "FSDP with 'quantize': a quantized base is not sharded (its packed weights are not DTensors)"
        )
    return True


def _strategy() -> str:
    """The sharding asked for, read as accelerate reads it: FSDP_SHARDING_STRATEGY under FSDP 1 (accelerate's
    default), FSDP_RESHARD_AFTER_FORWARD under `--fsdp_version 2` (false is SHARD_GRAD_OP's behaviour)."""
    if os.environ.get("FSDP_VERSION", "1") != "2":
        return os.environ.get("FSDP_SHARDING_STRATEGY", "FULL_SHARD")
    return "FULL_SHARD" if parse_flag_from_env("FSDP_RESHARD_AFTER_FORWARD", default=True) else "SHARD_GRAD_OP"


@contextmanager
def fsdp_hidden_from_accelerate() -> Iterator[None]:
    """Build the `Accelerator` inside this: it then sets up plain data parallelism, since heft shards by
    itself. Seeing ACCELERATE_USE_FSDP, accelerate would build its FSDP plugin, which heft never uses and
    which fails on CPU processes under `accelerate launch --use_fsdp` ("no available devices": the
    launcher's default `--fsdp_sync_module_states true` asks it for an accelerator device)."""
    saved = os.environ.pop("ACCELERATE_USE_FSDP", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["ACCELERATE_USE_FSDP"] = saved


def shard_base(layers: nn.ModuleList) -> None:
    """FULL_SHARD each decoder layer over all processes. Parameters of LoRA adapters already in a layer
    (a resumed run) stay whole, like those of stages added later."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(layers.parameters()).device.type
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    for layer in layers:
        adapters = {p for name, p in layer.named_parameters() if "lora_" in name}
        fully_shard(layer, mesh=mesh, reshard_after_forward=True, ignored_params=adapters)


def is_sharded(model: nn.Module) -> bool:
    """Whether `shard_base` sharded some of `model`'s layers."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def average_gradients(params: list[nn.Parameter]) -> None:
    """The mean over processes of each parameter's gradient (what DDP's all-reduce computes), in one
    flat all-reduce (gloo has no AVG: a sum, then a division)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for grad, part in zip(grads, flat.split([g.numel() for g in grads])):
        grad.copy_(part.view_as(grad))


@torch.no_grad()
def add_to_shards(model: nn.Module, deltas: dict[str, torch.Tensor]) -> None:
    """Add each full `delta` (by module name) to the rows of that module's sharded weight this process
    holds: the in-place add a one-process merge does, element by element."""
    from torch.distributed.tensor import distribute_tensor

    for name, delta in deltas.items():
        weight = model.get_submodule(name).weight
        delta = delta.detach().to(weight.device)
        mine = distribute_tensor(delta, weight.device_mesh, weight.placements, src_data_rank=None)  # no communication
        weight.to_local().add_(mine.to_local())
