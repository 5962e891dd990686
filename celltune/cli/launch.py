"""``--devices N``: start the same command under PyTorch's own launcher (torchrun).

celltune does not manage processes itself: ``--devices N`` re-runs the command line as
``python -m torch.distributed.run --standalone --nproc-per-node N -m celltune ...`` (what
a user would type), minus ``--devices``. Each process then joins the DDP group through
the torchrun environment, exactly as under a hand-written ``torchrun`` command or SLURM.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from celltune.errors import InputError

logger = logging.getLogger(__name__)


def strip_option(argv: list[str], name: str) -> list[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE`` (every occurrence)."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == name:
            skip = True
            continue
        if arg.startswith(name + "="):
            continue
        out.append(arg)
    return out


def torchrun_command(devices: int, argv: list[str]) -> list[str]:
    """The torchrun command line that runs ``celltune ARGV`` on ``devices`` processes."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={devices}",
        "-m",
        "celltune",
        *strip_option(argv, "--devices"),
    ]


def relaunch_under_torchrun(devices: int | None, device: str | None = None) -> int | None:
    """Run this command on ``devices`` processes; returns their exit code, or None when
    this process should simply go on (``devices`` unset or 1, or already under torchrun).

    On CUDA every process takes one GPU (``LOCAL_RANK``); on CPU the cores are shared out
    through ``OMP_NUM_THREADS`` unless it is set already.
    """
    import torch

    from celltune.train import distributed as dist_utils

    if devices is None or devices == 1 or dist_utils.launched_by_torchrun():
        return None
    if devices < 1:
        raise InputError(f"--devices must be >= 1 (got {devices})")
    env = dict(os.environ)
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        n_gpu = torch.cuda.device_count()
        if devices > n_gpu:
            raise InputError(
                f"--devices {devices} but only {n_gpu} CUDA GPU(s) are visible; use "
                f"--devices {n_gpu} or fewer (or --device cpu for CPU processes)"
            )
    else:
        cores = os.cpu_count() or 1
        if devices > cores:
            logger.warning("--devices %d on %d CPU cores: processes will compete", devices, cores)
        env.setdefault("OMP_NUM_THREADS", str(max(1, cores // devices)))
    cmd = torchrun_command(devices, sys.argv[1:])
    logger.info("starting %d processes: %s", devices, " ".join(cmd[1:]))
    return subprocess.call(cmd, env=env)


__all__ = ["relaunch_under_torchrun", "strip_option", "torchrun_command"]
