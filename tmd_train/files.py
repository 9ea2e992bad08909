"""File modes of what the project writes. safetensors (and so diffusers' ``save_pretrained``) writes
through a private temporary file and leaves its files 0600; every folder or file the project hands to a
user gets the mode a plain ``open()`` gives instead (``0o666 & ~umask``: 0644 under the usual umask)."""
from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process's umask (read from ``/proc`` where possible, so it is never changed, even briefly)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normalize_permissions(path: str | Path) -> None:
    """Give the file ``path``, or every file under the folder ``path``, the mode ``0o666 & ~umask``."""
    mode = 0o666 & ~current_umask()
    path = Path(path)
    files = [path] if path.is_file() else path.rglob("*")
    for p in files:
        if p.is_file() and not p.is_symlink():
            os.chmod(p, mode)
