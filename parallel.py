"""
parallel.py: how a run of train_lm.py runs on several processes (torchrun): data parallelism over
the LoRA gradients. One frozen base serves every role, so there is no DDP wrapper: each process
takes its slice of the global batch's slots (Shard) and the gradients are averaged in one bucket
(all_reduce).

    torchrun --nproc_per_node 2 train_lm.py --model phi3 --batch_size 4
"""
import os
import sys
import typing
from contextlib import contextmanager

import torch
import torch.distributed as dist

from cli import UserError

ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")   # what torchrun sets


class Shard(typing.NamedTuple):
    """This process's slots of the global batch: the rank-th of `world` equal slices."""
    rank: int = 0
    world: int = 1

    def mine(self, n):
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)


@contextmanager
def distributed():
    """`torchrun --nproc_per_node N train_lm.py ...` sets WORLD_SIZE, RANK, LOCAL_RANK: join the
    group (gloo on CPU, NCCL on GPUs), silence stdout on ranks > 0, leave at the end. Without
    torchrun: Shard(0, 1)."""
    if "WORLD_SIZE" not in os.environ:
        yield Shard()
        return
    env = {k: os.environ.get(k, "") for k in ENV}
    if not all(env.values()) or not all(env[k].isdigit() for k in ENV[:3]):
        given = ", ".join(f"{k}={v!r}" for k, v in env.items())
        raise UserError(f"WORLD_SIZE is set but not as torchrun sets it ({given}); start with "
                        "torchrun, or unset WORLD_SIZE to run in one process")
    local = int(env["LOCAL_RANK"])
    if local < torch.cuda.device_count():
        torch.cuda.set_device(local)
    dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    stdout = sys.stdout
    try:
        if dist.get_rank() > 0:
            sys.stdout = open(os.devnull, "w")
        yield Shard(dist.get_rank(), dist.get_world_size())
    finally:
        sys.stdout = stdout
        dist.destroy_process_group()


def all_reduce(params, values, shard):
    """Average the LoRA gradients and the logged values over ranks in one bucket (one frozen base
    serves every role: no DDP wrapper). Ranks hold equally many rows, so this is the global
    batch's gradient."""
    values = torch.stack([torch.as_tensor(v, dtype=torch.float32, device=params[0].device)
                          for v in values])
    if shard.world == 1:
        return values
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    flat = torch.cat([g.flatten() for g in grads] + [values])
    dist.all_reduce(flat)
    flat /= shard.world
    for p, g in zip(params, flat[:-len(values)].split([p.numel() for p in params])):
        p.grad = g.view_as(p)
    return flat[-len(values):]
