"""Multi-process training (RecBole's DDP), on CPUs too: process group, model wrapping, rank-0
writes, barriers, summed counts, and launching the worker processes.

RecBole 1.2.1 hard-codes NCCL and CUDA device ids; on a machine without a GPU the processes
join a gloo group instead. A run is distributed when its config's ``single_spec`` is False.
"""
from __future__ import annotations

import pickle
import socket
import tempfile
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
    """Rank 0, or a single process: the one that writes files."""
    return not is_distributed(config) or config["local_rank"] == 0


def barrier(config) -> None:
    """Wait for every rank (e.g. until rank 0 has written a file the others read)."""
    if is_distributed(config):
        torch.distributed.barrier()


def init_cpu_process_group(cfg: dict) -> None:
    """Join the gloo group RecBole would have made an NCCL one; only rank 0 logs and shows progress."""
    cfg["gpu_id"] = str(cfg["gpu_id"])
    torch.distributed.init_process_group(
        backend="gloo",
        rank=cfg["local_rank"] + cfg["offset"],
        world_size=cfg["world_size"],
        init_method=f"tcp://{cfg['ip']}:{cfg['port']}",
    )
    cfg["device"] = torch.device("cpu")
    cfg["single_spec"] = False
    if cfg["local_rank"] != 0:
        cfg["state"] = "error"
        cfg["show_progress"] = False
        cfg["verbose"] = False


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
