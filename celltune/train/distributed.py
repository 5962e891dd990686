"""Multi-process (DDP) plumbing: torchrun detection, process groups, gathers.

celltune never launches processes itself in production: ``torchrun`` (or SLURM + torchrun)
does, and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT``.
Every helper here degrades to the single-process answer when no process group exists, so
the training loop calls them unconditionally. :func:`run_in_processes` spawns N CPU ranks
on gloo for tests and benchmarks.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import queue as queue_module
import socket
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def launched_by_torchrun() -> bool:
    """True when the torchrun environment variables describe more than one process."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def env_world_size() -> int:
    """World size announced by the launcher (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's index on its node (picks the GPU under torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_initialized() -> bool:
    """Whether a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the group (1 without DDP)."""
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """Global rank of this process (0 without DDP)."""
    return dist.get_rank() if is_initialized() else 0


def is_main_process() -> bool:
    """Rank 0 logs, shows progress bars and writes files; the others stay silent."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op without DDP)."""
    if is_initialized():
        dist.barrier()


def init_distributed(backend: str | None = None) -> bool:
    """Join the process group described by the torchrun environment.

    ``backend=None`` picks NCCL when CUDA is available, else gloo. Returns True when a
    multi-process group is active afterwards. Safe to call twice and a no-op when the
    process was not launched with ``WORLD_SIZE > 1``.
    """
    if is_initialized():
        return world_size() > 1
    if not launched_by_torchrun():
        return False
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed support")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    logger.info(
        "joined process group: rank %d/%d (local rank %d, backend %s)",
        rank(),
        world_size(),
        local_rank(),
        backend,
    )
    return world_size() > 1


def destroy_distributed() -> None:
    """Leave the process group (no-op without one)."""
    if is_initialized():
        dist.destroy_process_group()


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from all ranks along dim 0, keeping the local gradient.

    ``dist.all_gather`` returns tensors without autograd history; putting the local tensor
    back in its slot lets a contrastive loss (CCE) see every rank's embeddings as
    negatives while gradients still flow into this rank's own rows (DDP then averages
    the parameter gradients). Every rank must pass the same shape.
    """
    if not is_initialized() or world_size() == 1:
        return tensor
    parts = [torch.zeros_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    parts[rank()] = tensor
    return torch.cat(parts, dim=0)


def all_reduce_mean(
    values: Mapping[str, float], device: torch.device | None = None
) -> dict[str, float]:
    """Average scalar metrics over ranks.

    A mean of per-rank means equals the global mean when ranks hold equal shares, which
    distributed samplers ensure (they pad to equal length). A key that only some ranks
    report (e.g. a loss term that appears on some mini-batches only) is averaged over the
    ranks that have it, so the result has the same keys on every rank.
    """
    out = {k: float(v) for k, v in values.items()}
    if not is_initialized() or world_size() == 1:
        return out
    keys = sorted({k for keys in all_gather_object(sorted(out)) for k in keys})
    if not keys:
        return {}
    if device is None:
        device = torch.device("cuda", local_rank()) if dist.get_backend() == "nccl" else None
    buf = torch.tensor(
        [[out.get(k, 0.0) for k in keys], [float(k in out) for k in keys]],
        dtype=torch.float64,
        device=device,
    )
    dist.all_reduce(buf, op=dist.ReduceOp.SUM)
    means = (buf[0] / buf[1]).tolist()
    return dict(zip(keys, means, strict=True))


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without DDP."""
    if not is_initialized() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


# -- spawning CPU ranks for tests and benchmarks --------------------------------------------


def free_port() -> int:
    """An unused TCP port on localhost for the rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(
    rank_: int,
    nprocs: int,
    port: int,
    backend: str,
    threads: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: Any,
) -> None:
    os.environ.update(
        RANK=str(rank_),
        WORLD_SIZE=str(nprocs),
        LOCAL_RANK=str(rank_),
        LOCAL_WORLD_SIZE=str(nprocs),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(threads)
    try:
        init_distributed(backend)
        value = fn(*args)
        # Plain pickle copies tensors by value (no shared-memory handles that die with us).
        results.put((rank_, pickle.dumps(value), None))
    except BaseException:
        results.put((rank_, None, traceback.format_exc()))
    finally:
        destroy_distributed()


def run_in_processes(
    fn: Callable[..., Any],
    nprocs: int = 2,
    *,
    args: tuple[Any, ...] = (),
    backend: str = "gloo",
    threads_per_process: int = 1,
    timeout: float = 300.0,
) -> list[Any]:
    """Run ``fn(*args)`` in ``nprocs`` freshly spawned ranks; return each rank's result.

    For tests and benchmarks on one machine: sets the torchrun environment variables, so
    code under test sees exactly what ``torchrun --nproc-per-node N`` would give it. ``fn``
    must be importable (module level). A failure on any rank is re-raised here with the
    child's traceback, and the other ranks are terminated instead of hanging in a
    collective.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(r, nprocs, port, backend, threads_per_process, fn, args, results),
            daemon=False,
        )
        for r in range(nprocs)
    ]
    for proc in procs:
        proc.start()
    values: dict[int, Any] = {}
    error: str | None = None
    try:
        while len(values) < nprocs and error is None:
            try:
                r, payload, err = results.get(timeout=timeout)
            except queue_module.Empty:
                error = f"timed out after {timeout:.0f}s waiting for the ranks"
                break
            if err is not None:
                error = f"rank {r} failed:\n{err}"
            else:
                values[r] = pickle.loads(payload)
    finally:
        for proc in procs:
            if error is not None and proc.is_alive():
                proc.terminate()
            proc.join(timeout=30)
    if error is not None:
        raise RuntimeError(error)
    return [values[r] for r in range(nprocs)]
