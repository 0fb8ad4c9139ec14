"""A checkpoint directory's digest, in its own torch-free module: the Kafka edge stamps every
``checkpoint`` event with it, and the edge imports before torch does (``engine.kafka.service``)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def directory_sha256(path: str | Path) -> str:
    """One digest over every file's name and bytes, so a reader can verify a whole checkpoint."""
    digest = hashlib.sha256()
    root = Path(path)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(root)).encode())
        digest.update(b"\0")
        digest.update(file.read_bytes())
    return digest.hexdigest()
