"""What names one version of a model: its source, revision, adapter, dtype, and a fingerprint of its files."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from workbench.models.settings import LoadSettings

# The files whose change means another model: weights, config, tokenizer, an adapter's weights and config.
_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".model", ".txt", ".jinja")


def directory_fingerprint(path: str | os.PathLike[str]) -> str | None:
    """A short hash of the names, sizes and modification times of a model directory's files; None if not a directory.

    Cheap (no file is read), and it changes whenever a file is rewritten in place or replaced.
    """
    root = Path(os.path.expanduser(path))
    if not root.is_dir():
        return None
    digest = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _SUFFIXES):
        stat = file.stat()
        digest.update(f"{file.relative_to(root)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def model_identity(settings: LoadSettings) -> dict[str, str | None]:
    """What a cached answer of this model depends on: source, revision, served model, dtype, adapter, fingerprints."""
    return {
        "source": settings.source,
        "revision": settings.revision,
        "served_model": settings.served_model,
        # The same weights in bfloat16 answer otherwise than in float32 ("auto" is its own key: a miss at worst).
        "dtype": None if settings.remote else settings.dtype,
        "fingerprint": directory_fingerprint(settings.source) if not settings.remote else None,
        "adapter": settings.adapter,
        "adapter_fingerprint": directory_fingerprint(settings.adapter) if settings.adapter else None,
    }
