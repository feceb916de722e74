"""Multi-process training (RecBole's DDP), on CPUs too: process group, model wrapping, rank-0
writes, barriers, summed counts, and launching the worker processes.

RecBole 1.2.1 hard-codes NCCL and CUDA device ids; on a machine without a GPU the processes
join a gloo group instead. Workers come from our launcher (``--nproc``, one machine) or from
``torchrun`` (any number of machines). A run is distributed when its config's ``single_spec`` is False.
"""
from __future__ import annotations

import os
import pickle
import socket
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

# Keys the launcher sets for each worker, which have no YAML default.
DDP_KEYS = ("local_rank", "world_size", "nproc", "offset", "ip", "port")


def is_distributed(config) -> bool:
    return not config["single_spec"]


def is_main(config) -> bool:
    """Global rank 0, or a single process: the one that writes files (on a cluster every node
    has a local rank 0)."""
    return not is_distributed(config) or torch.distributed.get_rank() == 0


def torchrun_overrides() -> dict[str, Any]:
    """The DDP keys of a worker started by ``torchrun`` (from its RANK, LOCAL_RANK, WORLD_SIZE,
    LOCAL_WORLD_SIZE, MASTER_ADDR and MASTER_PORT), or {} when torchrun did not start us."""
    env = os.environ
    if not all(k in env for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return {}
    rank, local_rank = int(env["RANK"]), int(env["LOCAL_RANK"])
    return {"local_rank": local_rank, "world_size": int(env["WORLD_SIZE"]), "offset": rank - local_rank,
            "nproc": int(env.get("LOCAL_WORLD_SIZE", 1)), "ip": env["MASTER_ADDR"], "port": int(env["MASTER_PORT"])}


def join_torchrun_group() -> None:
    """Join the group torchrun set up (env:// rendezvous) before anything runs, so that Stage I can
    run on rank 0 while the others wait for it (hence the long timeout)."""
    if not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend, init_method="env://", timeout=timedelta(hours=4))


def in_group() -> bool:
    """Whether this process is one rank of a group (started by torchrun or our launcher)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def global_rank() -> int:
    return torch.distributed.get_rank() if in_group() else 0


def wait_for_all() -> None:
    """Wait for every rank of the group, if this process is in one (e.g. until rank 0 has written
    a file the others read)."""
    if in_group():
        torch.distributed.barrier()


def join_group(cfg: dict) -> None:
    """Join the process group RecBole would have made an NCCL one with CUDA device ids (gloo and
    the CPU on a machine without a GPU), or attach to the one torchrun made; only rank 0 logs and
    shows progress."""
    on_gpu = torch.cuda.is_available()
    if not in_group():
        torch.distributed.init_process_group(
            backend="nccl" if on_gpu else "gloo",
            rank=cfg["local_rank"] + cfg["offset"],
            world_size=cfg["world_size"],
            init_method=f"tcp://{cfg['ip']}:{cfg['port']}",
        )
    cfg["gpu_id"] = str(cfg["gpu_id"])
    cfg["device"] = torch.device("cuda", cfg["local_rank"]) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(cfg["device"])
    cfg["single_spec"] = False
    if torch.distributed.get_rank() != 0:
        cfg["state"] = "error"
        cfg["show_progress"] = False
        cfg["verbose"] = False


def leave_group() -> None:
    """Wait for every rank, then leave the group: a process that exits while gloo's threads still
    hold the group aborts ("terminate called without an active exception", SIGABRT) after a
    successful run. Only on success: a failed rank must not wait for the others at a barrier."""
    if in_group():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def wrap(model: torch.nn.Module, config) -> tuple[torch.nn.Module, DistributedDataParallel]:
    """The model with synchronised batch norms and its DDP wrapper (device ids on CUDA only)."""
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    on_gpu = config["device"].type == "cuda"
    return model, DistributedDataParallel(model, device_ids=[config["local_rank"]] if on_gpu else None)


def from_main(value: Any, config) -> Any:
    """Rank 0's ``value`` on every rank (a checkpoint's file name, which carries the time)."""
    if not is_distributed(config):
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def summed(counts: dict[str, float], config, device) -> dict[str, float]:
    """``counts`` summed over the ranks (each evaluates its own share of the users)."""
    names = sorted(counts)
    if not is_distributed(config) or not names:
        return counts
    total = torch.tensor([counts[n] for n in names], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return dict(zip(names, total.tolist()))


def _worker(rank: int, fn: Callable, args: tuple, overrides: dict, result_file: str) -> None:
    result = fn(*args, {**overrides, "local_rank": rank})
    if rank == 0:  # a file, not a pipe: a large result (a long curve) must not block the exit
        Path(result_file).write_bytes(pickle.dumps(result))
    leave_group()


def launch(fn: Callable, args: tuple, overrides: dict, nproc: int) -> Any:
    """Run ``fn(*args, overrides)`` in ``nproc`` processes joined into one group on a free local
    port (each gets its ``local_rank`` among the overrides); returns rank 0's result."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ddp = {"world_size": nproc, "nproc": nproc, "offset": 0, "ip": "127.0.0.1", "port": port}
    with tempfile.TemporaryDirectory(prefix="prorec-ddp-") as tmp:
        result_file = str(Path(tmp) / "rank0.pkl")
        mp.spawn(_worker, args=(fn, args, {**overrides, **ddp}, result_file), nprocs=nproc)
        return pickle.loads(Path(result_file).read_bytes())
