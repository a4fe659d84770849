"""The plugin's :class:`Config`, and multi-process (DDP) training with RecBole's own ``nproc``,
``world_size``, ``ip``, ``port`` and ``offset`` settings: NCCL on GPUs as in RecBole, and gloo on
CPUs, where RecBole's set-up fails."""

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from recbole.config import Config

from recbole_st2si.errors import UserInputError

PROPERTIES_DIR = Path(__file__).resolve().parent.parent / "properties"


def _list_settings():
    """Plugin settings given as lists: those with a list default, and ``lora_target_modules`` (default ``~``)."""
    names = {"lora_target_modules"}
    for file in ("overall.yaml", "ST2SI.yaml"):
        defaults = yaml.safe_load((PROPERTIES_DIR / file).read_text())
        names |= {name for name, value in defaults.items() if isinstance(value, list)}
    return names


LIST_SETTINGS = _list_settings()


def _as_list(value):
    """``[a,b]``, ``a,b``, ``"['a', 'b']"`` or ``a`` as a list: RecBole's ``eval`` keeps them strings."""
    if isinstance(value, str):
        items = (item.strip(" '\"") for item in value.strip(" '\"[]").split(","))
        return [item for item in items if item]
    return list(value) if isinstance(value, tuple) else value


class PluginConfig(Config):
    """RecBole's :class:`Config`; list settings accept ``a,b`` and ``[a,b]``; a distributed run without
    CUDA gets gloo and the CPU.

    For a distributed run RecBole's ``_init_device`` asserts that ``gpu_id`` names ``nproc`` GPUs,
    starts an NCCL process group and puts rank ``r`` on ``cuda:r``: all three fail on a CPU-only
    machine (or with ``use_gpu: False``). Single-process runs and GPU runs are left to RecBole.
    """

    def _get_final_config_dict(self):
        settings = super()._get_final_config_dict()
        for name in LIST_SETTINGS & settings.keys():
            settings[name] = _as_list(settings[name])
        return settings

    def _init_device(self):
        settings = self.final_config_dict
        if "local_rank" not in settings or (settings["use_gpu"] and torch.cuda.device_count() > 0):
            super()._init_device()
            return
        dist.init_process_group(
            backend="gloo",
            rank=settings["local_rank"] + settings["offset"],
            world_size=settings["world_size"],
            init_method=f"tcp://{settings['ip']}:{settings['port']}",
        )
        settings.update(device=torch.device("cpu"), single_spec=False)
        if settings["local_rank"] != 0:  # as RecBole does: one process logs and shows progress
            settings.update(state="error", show_progress=False, verbose=False)


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
