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
from safetensors.torch import load_file, save_file

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


def save_state(state: State, path: Path) -> None:
    save_file({k: t.detach().contiguous().cpu() for k, t in state.items()}, str(path))


class ClientStore:
    """Client id -> state. Least recently used entries spill to `spill_dir` once the states
    held in memory pass `budget_bytes`; a client without state costs nothing. With a budget
    of 0 the directory is the store, so processes sharing it see each other's writes."""

    def __init__(self, spill_dir: Path, budget_bytes: int):
        self.spill_dir, self.budget = Path(spill_dir), budget_bytes
        self._memory: OrderedDict[int, State] = OrderedDict()
        self._memory_bytes = 0

    def _file(self, client_id: int) -> Path:
        return self.spill_dir / f"client_{client_id}.safetensors"

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
        if client_id in self._memory:
            self._memory_bytes -= nbytes(self._memory.pop(client_id))
        self._file(client_id).unlink(missing_ok=True)

    def _spill(self) -> None:
        while self._memory_bytes > self.budget and self._memory:
            client_id, state = self._memory.popitem(last=False)
            self._memory_bytes -= nbytes(state)
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            save_state(state, self._file(client_id))

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        for client_id in self._memory:
            save_state(self._memory[client_id], directory / f"client_{client_id}.safetensors")
        for client_id in self._on_disk():
            shutil.copyfile(self._file(client_id), directory / f"client_{client_id}.safetensors")

    def clear(self) -> None:
        for client_id in self.ids():
            self.discard(client_id)

    def restore(self, directory: Path) -> None:
        self.clear()
        for path in sorted(directory.glob("client_*.safetensors")):
            self.put(int(path.stem.split("_")[1]), load_file(str(path)))


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temp dirs of an interrupted write are ignored)."""
    root = Path(run_dir) / "checkpoints"
    done = [p for p in root.glob("round_*") if p.is_dir() and p.name.split("_")[1].isdigit()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def write_checkpoint(run_dir: Path, round_done: int, parts: dict[str, State], store: ClientStore, meta: dict, keep_last: int) -> Path:
    """Writes checkpoints/round_<n>/ atomically: into a temp dir, then one rename."""
    root = Path(run_dir) / "checkpoints"
    final, tmp = root / f"round_{round_done}", root / f".tmp_round_{round_done}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, state in parts.items():
        save_state(state, tmp / f"{name}.safetensors")
    store.save(tmp / "clients")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    (tmp / MANIFEST).write_text(json.dumps(manifest(tmp), indent=1))  # last: it vouches for the rest
    _fsync_dir(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in checkpoint_dirs(run_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


MANIFEST = "manifest.json"
DAMAGE = (OSError, ValueError, KeyError, SafetensorError)  # what reading a damaged checkpoint raises


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def manifest(directory: Path) -> dict:
    """Every file of a checkpoint with its size and sha256."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": file_digest(p)} for p in files}


def verify_checkpoint(path: Path) -> str | None:
    """What is wrong with a checkpoint, or None. One written before manifests existed is
    trusted as far as its files read back."""
    if not (path / MANIFEST).exists():
        return None
    try:
        expected = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        return f"its manifest is unreadable ({err})"
    found = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file() and p.name != MANIFEST}
    if missing := sorted(set(expected) - found):
        return f"{len(missing)} file(s) missing, e.g. {missing[0]}"
    for name, entry in expected.items():
        file = path / name
        if file.stat().st_size != entry["bytes"] or file_digest(file) != entry["sha256"]:
            return f"{name} does not match its manifest (size or sha256)"
    return None


def read_checkpoint(path: Path) -> tuple[dict[str, State], dict]:
    parts = {p.stem: load_file(str(p)) for p in path.glob("*.safetensors")}
    return parts, json.loads((path / "meta.json").read_text())


def _fsync_dir(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
