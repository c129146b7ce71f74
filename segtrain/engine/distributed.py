"""torch.distributed for single- and multi-node training launched by torchrun (or srun), or by Hydra's
submitit launcher (SLURM).

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; segtrain joins the process group from them (NCCL on
CUDA, gloo on CPU). Under `hydra/launcher=submitit_slurm` (or submitit_local) the scheduler starts
every task itself: `adopt_launcher_environment` sets the same variables from submitit's job
environment, so the rest of segtrain sees one kind of launch.

`trainer.batch_size` is the global batch, split evenly over ranks and gradient-accumulation steps.
Only rank 0 writes logs, TensorBoard events and checkpoints (and only rank 0 lets Hydra create the
run directory: `rank_scratch_overrides`).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from segtrain.engine.runtime import resolve_device
from segtrain.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def process_rank() -> int:
    """This process's global rank under torchrun (0 when launched alone)."""
    return int(os.environ.get("RANK", "0"))


def rank_scratch_overrides() -> list[str]:
    """Hydra overrides for a rank > 0: a throw-away run directory and no `.hydra/` copy, so that only
    rank 0 writes; the others learn rank 0's run directory from it (broadcast_object). Empty on rank 0."""
    rank = process_rank()
    if rank == 0:
        return []
    scratch = tempfile.mkdtemp(prefix=f"segtrain-rank{rank}-")
    return [f"hydra.run.dir={scratch}", "hydra.output_subdir=null"]


SUBMITIT_EXECUTOR = "SUBMITIT_EXECUTOR"  # set by submitit in every task of its jobs (slurm, local)


def in_launcher_job() -> bool:
    """True in a task started by Hydra's submitit launcher (SLURM or local)."""
    return bool(os.environ.get(SUBMITIT_EXECUTOR))


def launcher_job_id() -> str | None:
    """The scheduler's id of this submitit job (the same after a requeue); None outside one."""
    if not in_launcher_job():
        return None
    return os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")


def adopt_launcher_environment() -> bool:
    """In a submitit task, export torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT) from submitit's job environment: the global rank and the local rank
    (SLURM_PROCID, SLURM_LOCALID), the task count (SLURM_NTASKS), the first node of the job as the master
    and a port drawn from the job id (the same after a requeue). Nothing when torchrun's variables are
    already set (torchrun inside the job) or outside a submitit job. True when it exported them.

    A task of rank > 0 shares rank 0's job directory (the launcher gives every task the same one), so
    its log file handlers are dropped here: only rank 0 writes train.log, as under torchrun."""
    if "RANK" in os.environ or not in_launcher_job():
        return False
    from submitit.helpers import TorchDistributedEnvironment

    env = TorchDistributedEnvironment()
    os.environ.update({"RANK": str(env.rank), "LOCAL_RANK": str(env.local_rank), "WORLD_SIZE": str(env.world_size),
                       "LOCAL_WORLD_SIZE": str(env.local_world_size), "MASTER_ADDR": env.master_addr,
                       "MASTER_PORT": str(env.master_port)})
    if env.rank > 0:
        root = logging.getLogger()
        for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
            root.removeHandler(handler)
            handler.close()
    return True


def init_distributed(requested_device: str) -> DistContext:
    """Join the process group described by torchrun's environment, or a submitit job's (or the one
    already joined)."""
    adopt_launcher_environment()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dist.is_available() and dist.is_initialized():
        world_size, rank = dist.get_world_size(), dist.get_rank()
    else:
        rank = process_rank()
    device = resolve_device(requested_device)
    if device.type == "cuda" and world_size > 1:
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPUs are visible; "
                              "launch at most one process per GPU (torchrun --nproc_per_node; under the submitit "
                              "launcher hydra.launcher.tasks_per_node at most hydra.launcher.gpus_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank, world_size, local_rank, device)


def micro_batch_size(global_batch: int, world_size: int, accum_steps: int) -> int:
    """Images per rank per forward pass; the global batch must split evenly."""
    parts = world_size * accum_steps
    if global_batch % parts:
        raise ConfigError(
            f"trainer.batch_size={global_batch} (the global batch) is not divisible by world size {world_size} x "
            f"trainer.grad_accum_steps={accum_steps}; choose a batch size that is a multiple of {parts}"
        )
    return global_batch // parts


def should_sync_bn(setting: str, world_size: int, device_type: str) -> bool:
    """trainer.sync_bn (canonical: segtrain.config_checks); auto: SyncBatchNorm exactly when training on
    several CUDA processes."""
    if setting == "false" or world_size == 1:
        return False
    if device_type != "cuda":
        if setting == "true":
            raise ConfigError("trainer.sync_bn=true needs CUDA devices (PyTorch's SyncBatchNorm is CUDA-only); "
                              "use trainer.sync_bn=auto or false on CPU")
        return False
    return True


def apply_sync_bn(model: nn.Module, setting: str, world_size: int, device_type: str) -> nn.Module:
    if should_sync_bn(setting, world_size, device_type):
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def broadcast_object(value: Any, ctx: DistContext) -> Any:
    """Rank 0's value on every rank (e.g. the run directory)."""
    if not ctx.enabled:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.enabled:
        dist.all_reduce(tensor)
    return tensor


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


# What gloo and NCCL say when another process of the group is gone (killed, crashed, its node lost).
PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "remote process exited",
             "NCCL communicator was aborted", "Socket Timeout", "Connection refused")


def peer_failure_message(exc: BaseException) -> str | None:
    """One line for a collective that failed because a peer process died; None for any other error."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    text = str(exc)
    if not (isinstance(exc, dist.DistError) or any(marker in text for marker in PEER_GONE)):
        return None
    reason = next((marker for marker in PEER_GONE if marker in text), type(exc).__name__)
    return (f"another training process of this job died ({reason}, seen by rank {dist.get_rank()} of "
            f"{dist.get_world_size()}); its own log says why. This process stops too; restart the job with "
            "resume=auto (and the same hydra.run.dir) to continue from the last checkpoint")
