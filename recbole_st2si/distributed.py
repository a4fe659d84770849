"""Multi-process (DDP) training with RecBole's own ``nproc``, ``world_size``, ``ip``, ``port`` and
``offset`` settings: NCCL on GPUs as in RecBole, and gloo on CPUs, where RecBole's set-up fails
(:class:`~recbole_st2si.config.PluginConfig` starts the gloo process group)."""

import os

import torch.distributed as dist
import torch.multiprocessing as mp

from recbole_st2si.errors import UserInputError


def refuse_external_launcher():
    """Refuse a run started by ``torchrun`` (or another launcher) as one of several processes.

    The script starts its own processes (``--nproc``); under ``torchrun`` each process would
    otherwise train the whole model on its own and overwrite the others' checkpoint.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if "LOCAL_RANK" in os.environ and world_size > 1:
        raise UserInputError(
            f"started as one of {world_size} processes (torchrun?): run the script once, with "
            f"--nproc={os.environ.get('LOCAL_WORLD_SIZE', world_size)}; it starts the DDP processes itself "
            "(several machines: --world_size, --ip, --port, --offset, see docs/tuning.md)"
        )


def distributed_settings(nproc, world_size=-1, ip="localhost", port=5678, offset=0):
    """The config keys RecBole's distributed set-up reads; ``world_size`` defaults to ``nproc``."""
    return {
        "nproc": nproc,
        "world_size": world_size if world_size > 0 else nproc,
        "ip": ip,
        "port": port,
        "offset": offset,
    }


def spawn_ranks(rank_fn, nproc, *args):
    """Run ``rank_fn(local_rank, *args)`` in ``nproc`` fresh processes; return global rank 0's result.

    ``rank_fn`` starts the process group (through the config); the group is closed here after it
    returns. Processes on other nodes of a multi-node run (``offset > 0``) return ``None``.
    """
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_rank_main, args=(rank_fn, args, queue), nprocs=nproc, join=True)
    return None if queue.empty() else queue.get()


def _rank_main(local_rank, rank_fn, args, queue):
    result = rank_fn(local_rank, *args)
    is_first = dist.get_rank() == 0
    dist.destroy_process_group()
    if is_first:
        queue.put(result)
