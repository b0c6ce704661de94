"""Per-client state store (RAM, spilling to safetensors files past a budget) and atomic
checkpoints: everything a resumed run needs, in safetensors + JSON only."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from fedllm.rundir import open_no_follow

State = dict[str, torch.Tensor]


# A client's stored record on disk: optimizer moments unprefixed, the strategy's state under
# "strategy/", codec i's state under "codec/<i>/" (the prefixes exist only in these files).
STRATEGY_PREFIX, CODEC_PREFIX = "strategy/", "codec/"


@dataclass
class ClientRecord:
    """What the server keeps of a client between its rounds."""

    optimizer: State = field(default_factory=dict)  # local optimizer moments (client.keep_optimizer_state)
    strategy: State = field(default_factory=dict)  # the strategy's per-client state (control variates, momenta)
    codecs: dict[int, State] = field(default_factory=dict)  # codec index -> its state (error feedback)

    def to_flat(self) -> State:
        flat = {**self.optimizer, **{STRATEGY_PREFIX + k: t for k, t in self.strategy.items()}}
        for index, state in self.codecs.items():
            flat.update({f"{CODEC_PREFIX}{index}/{k}": t for k, t in state.items()})
        return flat

    @classmethod
    def from_flat(cls, flat: State | None) -> "ClientRecord":
        record = cls()
        for key, tensor in (flat or {}).items():
            if key.startswith(CODEC_PREFIX):
                index, name = key[len(CODEC_PREFIX):].split("/", 1)
                record.codecs.setdefault(int(index), {})[name] = tensor
            elif key.startswith(STRATEGY_PREFIX):
                record.strategy[key[len(STRATEGY_PREFIX):]] = tensor
            else:
                record.optimizer[key] = tensor
        return record


def is_finite(state: State) -> bool:
    """No NaN or Inf anywhere (a client's upload that has any is dropped from its round)."""
    return all(bool(torch.isfinite(t).all()) for t in state.values())


def nbytes(state: State) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def save_state(state: State, path: Path, durable: bool = False) -> dict:
    """Writes `state` to a temp file beside `path`, then renames it over (a file is never
    rewritten in place, so a hard link to it is a snapshot); never through a planted link.
    Returns the file's manifest entry."""
    data = safetensors_bytes({k: t.detach().contiguous().cpu() for k, t in state.items()})
    tmp = path.with_name(f".{path.name}.tmp")
    with open_no_follow(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def link_or_copy(source: Path, target: Path) -> int:
    """A hard link (no bytes written) where the filesystem has them, else a copy; the bytes written."""
    try:
        os.link(source, target, follow_symlinks=False)
        return 0
    except OSError:
        shutil.copyfile(source, target, follow_symlinks=False)
        return target.stat().st_size


def signature(path: Path) -> tuple:
    """Changes whenever the file is replaced (files are never rewritten in place)."""
    st = os.stat(path, follow_symlinks=False)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


@dataclass
class Written:
    """What writing a checkpoint cost: bytes actually written, and files only linked."""

    path: Path
    bytes_written: int = 0
    files_linked: int = 0


class ClientStore:
    """Client id -> state. Least recently used entries spill to `spill_dir` once the states
    held in memory pass `budget_bytes`; a client without state costs nothing. With a budget
    of 0 the directory is the store, so processes sharing it see each other's writes.

    Checkpoints are incremental: a client whose state did not change since the last
    checkpoint, and every spilled file, enter a checkpoint as a hard link, so a checkpoint
    writes only the states that changed (not every client that ever had one)."""

    def __init__(self, spill_dir: Path, budget_bytes: int):
        self.spill_dir, self.budget = Path(spill_dir), budget_bytes
        self._memory: OrderedDict[int, State] = OrderedDict()
        self._memory_bytes = 0
        # client id -> (signature of its newest file, that file's manifest entry): no re-hashing,
        # and one entry per client however many times its state is rewritten
        self._entries: dict[int, tuple[tuple, dict]] = {}
        self._in_checkpoint: set[int] = set()  # memory clients unchanged since the last checkpoint
        self._last_checkpoint: Path | None = None

    def _name(self, client_id: int) -> str:
        return f"client_{client_id}.safetensors"

    def _file(self, client_id: int) -> Path:
        return self.spill_dir / self._name(client_id)

    def _on_disk(self) -> set[int]:
        return {int(p.stem.split("_")[1]) for p in self.spill_dir.glob("client_*.safetensors")}

    def __contains__(self, client_id: int) -> bool:
        return client_id in self._memory or self._file(client_id).exists()

    def __len__(self) -> int:
        return len(self.ids())

    def ids(self) -> list[int]:
        return sorted(set(self._memory) | self._on_disk())

    def get(self, client_id: int) -> State | None:
        if client_id in self._memory:
            self._memory.move_to_end(client_id)
            return self._memory[client_id]
        if self._file(client_id).exists():
            return load_file(str(self._file(client_id)))
        return None

    def put(self, client_id: int, state: State) -> None:
        self.discard(client_id)
        state = {k: t.detach().cpu() for k, t in state.items()}
        self._memory[client_id] = state
        self._memory_bytes += nbytes(state)
        self._spill()

    def discard(self, client_id: int) -> None:
        self._in_checkpoint.discard(client_id)
        if client_id in self._memory:
            self._memory_bytes -= nbytes(self._memory.pop(client_id))
        self._file(client_id).unlink(missing_ok=True)

    def _spill(self) -> None:
        while self._memory_bytes > self.budget and self._memory:
            client_id, state = self._memory.popitem(last=False)
            self._in_checkpoint.discard(client_id)
            self._memory_bytes -= nbytes(state)
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            self._remember(client_id, self._file(client_id), save_state(state, self._file(client_id)))

    def _remember(self, client_id: int, path: Path, entry: dict) -> dict:
        self._entries[client_id] = signature(path), entry
        return entry

    def _entry(self, client_id: int, path: Path) -> dict:
        """A file's manifest entry: known from its write, or hashed once (another rank wrote it)."""
        stamp, known = self._entries.get(client_id, (None, None))
        if stamp != signature(path):
            known = self._remember(client_id, path, {"bytes": path.stat().st_size, "sha256": file_digest(path)})
        return known

    def save(self, directory: Path, incremental: bool = True) -> tuple[dict[str, dict], Written]:
        """Every client's state into `directory`: the manifest entries of its files and what
        it cost. `incremental=False` writes every state anew (the reference, for bench/)."""
        directory.mkdir(parents=True, exist_ok=True)
        entries, cost = {}, Written(directory)
        for client_id in self.ids():
            target = directory / self._name(client_id)
            before = self._last_checkpoint / "clients" / target.name if self._last_checkpoint else None
            unchanged = incremental and client_id in self._in_checkpoint and before is not None and before.exists()
            if client_id in self._memory and not unchanged:
                entry = self._remember(client_id, target, save_state(self._memory[client_id], target, durable=True))
                cost.bytes_written += entry["bytes"]
            else:
                source = before if client_id in self._memory else self._file(client_id)
                if incremental:
                    cost.bytes_written += link_or_copy(source, target)
                else:
                    shutil.copyfile(source, target)
                    cost.bytes_written += target.stat().st_size
                cost.files_linked += int(incremental)
                entry = self._entry(client_id, target)
            entries[target.name] = entry
        return entries, cost

    def checkpointed(self, path: Path) -> None:
        """`path` (a complete checkpoint) now holds every client as it is in memory."""
        self._last_checkpoint, self._in_checkpoint = path, set(self._memory)

    def clear(self) -> None:
        for client_id in self.ids():
            self.discard(client_id)

    def restore(self, directory: Path, entries: dict[str, dict] | None = None) -> None:
        """The clients of a checkpoint, linked (not copied) into the spill directory;
        `entries` are the checkpoint's manifest entries for them (already verified)."""
        self.clear()
        files = sorted(directory.glob("client_*.safetensors"))
        if files:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
        for path in files:
            target = self.spill_dir / path.name
            link_or_copy(path, target)
            entry = (entries or {}).get(path.name)
            if entry is not None:
                self._remember(int(path.stem.split("_")[1]), target, entry)


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp dirs of an interrupted write are ignored)."""
    root = Path(run_dir) / "checkpoints"
    done = [p for p in root.glob("round_*") if p.is_dir() and p.name.split("_")[1].isdigit()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def write_checkpoint(run_dir: Path, round_done: int, parts: dict[str, State], store: ClientStore, meta: dict,
                     keep_last: int, incremental: bool = True) -> Written:
    """Writes checkpoints/round_<n>/ atomically: into a temp dir, then one rename. Clients
    unchanged since the last checkpoint are hard links (`ClientStore.save`)."""
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"round_{round_done}", root / f".tmp_round_{round_done}"
    for leftover in [tmp, *root.glob(".trash_*")]:  # what a kill during an earlier write left
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir(parents=True)
    entries = {f"{name}.safetensors": save_state(state, tmp / f"{name}.safetensors", durable=True)
               for name, state in parts.items()}
    clients, cost = store.save(tmp / "clients", incremental)
    entries.update({f"clients/{name}": entry for name, entry in clients.items()})
    entries["meta.json"] = write_text(tmp / "meta.json", json.dumps(meta, indent=1))
    write_text(tmp / MANIFEST, json.dumps(dict(sorted(entries.items())), indent=1))  # last: it vouches for the rest
    _fsync_dirs(tmp, tmp / "clients")
    cost.bytes_written += sum(e["bytes"] for name, e in entries.items() if not name.startswith("clients/"))
    cost.bytes_written += (tmp / MANIFEST).stat().st_size
    if final.exists():  # the same round again (a resume that fell back past it)
        retire(final)
    os.replace(tmp, final)
    _fsync_dirs(root)
    store.checkpointed(final)
    cost.path = final
    for old in checkpoint_dirs(run_dir)[:-keep_last] if keep_last > 0 else []:
        retire(old)
    return cost


def retire(checkpoint: Path) -> None:
    """Deletes a checkpoint: first one rename out of sight, so a kill mid-delete never leaves
    a half-deleted checkpoint that looks complete."""
    trash = checkpoint.with_name(f".trash_{checkpoint.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(checkpoint, trash)
    shutil.rmtree(trash, ignore_errors=True)


def write_text(path: Path, text: str) -> dict:
    data = text.encode()
    with open_no_follow(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


MANIFEST = "manifest.json"
DAMAGE = (OSError, ValueError, KeyError, SafetensorError)  # what reading a damaged checkpoint raises


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(checkpoint: Path, under: str = "") -> dict[str, dict]:
    """The manifest entries of a checkpoint's files below `under` (names relative to it);
    empty for a checkpoint written before manifests existed."""
    if not (checkpoint / MANIFEST).exists():
        return {}
    entries = json.loads((checkpoint / MANIFEST).read_text())
    return {name.removeprefix(under): entry for name, entry in entries.items() if name.startswith(under)}


def verify_checkpoint(path: Path) -> str | None:
    """What is wrong with a checkpoint, or None. One written before manifests existed is
    trusted as far as its files read back."""
    if links := [p for p in path.rglob("*") if p.is_symlink()]:
        return f"it holds a symbolic link ({links[0].relative_to(path)}), which fedllm never writes"
    if not (path / MANIFEST).exists():
        return None
    try:
        expected = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        return f"its manifest is unreadable ({err})"
    found = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != MANIFEST}
    if missing := sorted(set(expected) - found):
        return f"{len(missing)} file(s) missing, e.g. {missing[0]}"
    if extra := sorted(found - set(expected)):
        return f"{len(extra)} file(s) not in its manifest, e.g. {extra[0]}"
    for name, entry in expected.items():
        file = path / name
        if file.stat().st_size != entry["bytes"] or file_digest(file) != entry["sha256"]:
            return f"{name} does not match its manifest (size or sha256)"
    return None


def read_checkpoint(path: Path) -> tuple[dict[str, State], dict]:
    parts = {p.stem: load_file(str(p)) for p in path.glob("*.safetensors")}
    return parts, json.loads((path / "meta.json").read_text())


def _fsync_dirs(*directories: Path) -> None:
    """Makes the directories' entries (new names, renames) durable; file contents are synced as written."""
    for directory in directories:
        if directory.is_dir():
            fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
