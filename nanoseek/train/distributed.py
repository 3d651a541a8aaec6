"""torch.distributed for training: torchrun rendezvous, device choice, DDP / FSDP2 wrapping, small collectives.

`torchrun` (single node or `--nnodes M --rdzv-endpoint HOST:PORT`) sets RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous variables; `init_distributed` reads them through the env:// init method, so one code path serves
one process, one node and many nodes. NCCL on CUDA, gloo on CPU. Without those variables it is a plain
single process and no process group is created.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from nanoseek.errors import BadInputError, UnsupportedError


@dataclass
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(pref: str, local_rank: int) -> torch.device:
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cuda":
        if not torch.cuda.is_available():
            raise UnsupportedError("[train] device = \"cuda\" but torch sees no CUDA device")
        return torch.device("cuda", local_rank)
    if pref == "cpu":
        return torch.device("cpu")
    raise BadInputError(f"[train] device {pref!r}: expected auto, cpu or cuda")


def init_distributed(device_pref: str = "auto") -> DistEnv:
    """Join the torchrun process group when launched by torchrun; otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local)
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return DistEnv(rank=rank, local_rank=local, world_size=world, device=device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: nn.Module, blocks: list[nn.Module], strategy: str, env: DistEnv) -> nn.Module:
    """DDP, or FSDP2: `fully_shard` each block (its parameters gathered only while it runs), then the root for
    what is left (embeddings, head, final norm). A single process gets the model back unchanged."""
    if strategy not in ("ddp", "fsdp"):
        raise BadInputError(f"[train] parallel {strategy!r}: expected ddp or fsdp")
    if not env.distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        # Router biases are buffers that every rank updates identically from all-reduced loads, so there is
        # nothing to broadcast each forward.
        return DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                   broadcast_buffers=False)
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj) -> list:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def broadcast_object(obj, src: int = 0):
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
