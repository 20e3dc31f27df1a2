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


def model_identity(settings: LoadSettings, device: str, dtype: str | None) -> dict[str, str | None]:
    """What a cached answer of this model depends on: source, revision, served model, where it runs, dtype, adapter,
    fingerprints. ``device`` and ``dtype`` are what the model loaded onto and in (for ``"auto"``: what it chose)."""
    return {
        "source": settings.source,
        "revision": settings.revision,
        "served_model": settings.served_model,
        # The same weights answer otherwise in bfloat16 than in float32, and may on a GPU than on the CPU (other
        # kernels): "auto" chose bfloat16 on a GPU and float32 on the CPU, so the setting alone was not enough.
        "device": None if settings.remote else device.split(":")[0],
        "dtype": None if settings.remote else dtype,
        "fingerprint": directory_fingerprint(settings.source) if not settings.remote else None,
        "adapter": settings.adapter,
        "adapter_fingerprint": directory_fingerprint(settings.adapter) if settings.adapter else None,
    }
