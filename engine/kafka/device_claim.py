"""``--device cuda:claim``: each engine on a multi-GPU host takes a GPU of its own, with no coordinator.

Compose replicas (``docker compose --profile gpu up --scale engine=2``) are identical containers: they
all see every GPU and get no replica index to pick one by. So each engine claims one: it takes an
exclusive, non-blocking ``flock`` on ``<lock_dir>/gpu-<id>.lock`` for each visible GPU in turn and keeps
the first it gets. The kernel drops the lock when the process ends, SIGKILL included, so a restarted
engine can claim the GPU again. Then ``CUDA_VISIBLE_DEVICES`` is narrowed to that GPU before CUDA starts,
so torch (as ``cuda``) and vLLM's worker processes both use it and nothing else.

``lock_dir`` must be shared by the engines of one host and by no other host (a compose volume, or
``/tmp`` for processes on one machine): GPUs are per host, and so are their locks.
"""

from __future__ import annotations

import fcntl
import os
import socket
from dataclasses import dataclass
from pathlib import Path

CLAIM = "cuda:claim"


@dataclass
class DeviceClaim:
    """A held GPU; the lock lasts as long as ``fd`` stays open (the engine process's lifetime)."""

    gpu_id: str
    path: Path
    fd: int

    def release(self) -> None:
        os.close(self.fd)


def claim_gpu(lock_dir: Path, gpu_ids: list[str]) -> DeviceClaim:
    """The first of ``gpu_ids`` no other process holds; ``RuntimeError`` when all are taken."""
    lock_dir.mkdir(parents=True, exist_ok=True)
    for gpu_id in gpu_ids:
        path = lock_dir / f"gpu-{gpu_id}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} host {socket.gethostname()}\n".encode())  # who holds it, for people
        return DeviceClaim(gpu_id, path, fd)
    raise RuntimeError(
        f"every visible GPU ({', '.join(gpu_ids)}) is claimed by another engine (locks in {lock_dir}); "
        "start no more engines than GPUs"
    )


def claim_visible_gpu(lock_dir: Path) -> DeviceClaim:
    """Claim one of the GPUs this process sees and make it the only one (``cuda`` from here on)."""
    import torch

    count = torch.cuda.device_count()  # NVML-based: does not start CUDA, so the variable below still counts
    if count == 0:
        raise RuntimeError(f"--device {CLAIM} needs an NVIDIA GPU, and none is visible")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    gpu_ids = [v.strip() for v in visible.split(",") if v.strip()] or [str(i) for i in range(count)]
    claim = claim_gpu(lock_dir, gpu_ids[:count])
    os.environ["CUDA_VISIBLE_DEVICES"] = claim.gpu_id
    return claim
