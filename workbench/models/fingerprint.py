"""What names one version of a model: its source, revision, adapter, dtype, and a fingerprint of its files."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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


# What a server's GET /models says of a model that names the weights behind it (vLLM and SGLang: root, the path or
# hub id it loaded, and parent; llama.cpp: meta, the model file's sizes), not what changes from one answer to the
# next (vLLM's created and permission ids).
LISTED_KEYS = ("id", "root", "parent", "owned_by", "max_model_len", "meta")


def model_identity(
    settings: LoadSettings, device: str, dtype: str | None, listed: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """What a cached answer of this model depends on: source, revision, served model, where it runs, dtype, adapter,
    fingerprints. ``device`` and ``dtype`` are what the model loaded onto and in (for ``"auto"``: what it chose).
    ``listed``: a model behind a server, as its GET /models lists it (a restart with other weights under the same
    name lists another root)."""
    weights = None if settings.remote else _files(settings.source, settings.revision)
    adapter = _files(settings.adapter, None) if settings.adapter else None
    served = {"listed": {k: listed[k] for k in LISTED_KEYS if k in listed} if listed else None} \
        if settings.remote else {}  # keys of models here stay as they were
    return {
        "source": settings.source,
        "revision": settings.revision,
        "served_model": settings.served_model,
        # The same weights answer otherwise in bfloat16 than in float32, and may on a GPU than on the CPU (other
        # kernels): "auto" chose bfloat16 on a GPU and float32 on the CPU, so the setting alone was not enough.
        "device": None if settings.remote else device.split(":")[0],
        "dtype": None if settings.remote else dtype,
        "fingerprint": weights[0] if weights else None,
        "commit": weights[1] if weights else None,
        "adapter": settings.adapter,
        "adapter_fingerprint": adapter[0] if adapter else None,
        "adapter_commit": adapter[1] if adapter else None,
        **served,
    }


def _files(source: str, revision: str | None) -> tuple[str | None, str | None]:
    """The fingerprint of the files ``source`` loaded from, and for a hub id the commit they are of.

    A hub id (no revision, or a branch that moves) names whatever its revision was at the load: the files are the
    snapshot of the hub cache it resolved to, a directory named by its commit. None where there are none to read.
    """
    if Path(os.path.expanduser(source)).is_dir():
        return directory_fingerprint(source), None
    try:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(source, "config.json", revision=revision)
        if not isinstance(found, str):  # an adapter has adapter_config.json instead
            found = try_to_load_from_cache(source, "adapter_config.json", revision=revision)
    except ValueError:  # not a hub id (HFValidationError): a path that does not exist
        return None, None
    if not isinstance(found, str):
        return None, None
    snapshot = Path(found).parent
    return directory_fingerprint(snapshot), snapshot.name
