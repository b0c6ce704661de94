"""A run directory's own files are never written through a symbolic link planted there:
fedllm refuses a run directory that holds one, and opens its files without following links."""
from __future__ import annotations

import os
from pathlib import Path

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)  # absent on Windows, which has no such links by default


class PlantedLink(OSError):
    """A run directory holds a symbolic link, which fedllm never creates."""


def planted_links(run_dir: Path) -> list[Path]:
    """Every symbolic link below `run_dir` (the directory itself may be one: that is the user's layout)."""
    found = []
    for folder, dirs, files in os.walk(run_dir, followlinks=False):
        found += [Path(folder) / name for name in dirs + files if os.path.islink(os.path.join(folder, name))]
    return sorted(found)


def refuse_planted_links(run_dir: Path) -> None:
    if links := planted_links(Path(run_dir)):
        raise PlantedLink(
            f"{links[0]} is a symbolic link (to {os.readlink(links[0])}), and fedllm never makes one in a run "
            f"directory: it will not write through it. Remove it{' and the other ' + str(len(links) - 1) if len(links) > 1 else ''}"
            f" (or the run directory) and try again")


def open_no_follow(path: Path, mode: str):
    """open() for "w", "a" (text) or "wb", failing if `path` itself is a symbolic link."""
    flags = {"w": os.O_TRUNC, "wb": os.O_TRUNC, "a": os.O_APPEND}[mode] | os.O_WRONLY | os.O_CREAT | NOFOLLOW
    return os.fdopen(os.open(path, flags, 0o644), mode)
