"""Data prepared once per machine. Under several ranks, each machine's first rank (LOCAL_RANK
0) loads, tokenizes and packs the data (fedllm.data.prepare) and writes the packed buffers to
the run directory (`data/prepared.safetensors`, and `prepared.json` with a digest of what the
data depends on and a checksum of the file); the machine's other ranks wait for it and map
that file read-only, zero-copy, as the leader itself then does. A machine holds one copy of
the tokens, in its page cache, instead of one per rank, and only one rank pays the
tokenization. A cache from an earlier launch (a resume) is used if its digest matches and its
checksum holds, else rebuilt.

Ranks wait on a file, not in a collective: preparing a large dataset may outlast
federation.collective_timeout_s. The file is named by a number rank 0 draws for this launch,
so a cache or signal an earlier launch left is never mistaken for this one's."""
from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import secrets
import struct
import time
from pathlib import Path

import numpy as np

from fedllm.data.packed import PackedExamples
from fedllm.data.prepare import PreparedData, log_reports, prepare_data
from fedllm.data.report import LengthTable, SplitReport
from fedllm.distributed import broadcast_int, is_distributed
from fedllm.recipe import DataConfig

log = logging.getLogger("fedllm")

FORMAT = 1  # of the files below: a cache written in another format is rebuilt
TENSORS, META = "prepared.safetensors", "prepared.json"
DTYPES = {"U8": np.uint8, "U16": np.uint16, "I32": np.int32, "I64": np.int64}  # the ones written here
POLL_S, WAIT_NOTE_S = 0.05, 60.0


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides the token ids: a fast tokenizer's whole definition (vocabulary, merges,
    normalizer, pre-tokenizer), else its vocabulary; its special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = [type(tokenizer).__name__, len(tokenizer), tokenizer.special_tokens_map,
             *(getattr(tokenizer, name, None) for name in ("chat_template", "padding_side", "truncation_side"))]
    return hashlib.sha256((vocab + json.dumps(extra, sort_keys=True, default=str)).encode()).hexdigest()


def _file_stamps(path: str | None) -> list:
    """(name, size, mtime) of a local data file or of each file in a data folder: an edited file makes a new digest."""
    if path is None or path.startswith("bundled:") or not Path(path).expanduser().exists():
        return []  # bundled data changes with fedllm's FORMAT; a hub dataset is named by path, subset and split
    root = Path(path).expanduser()
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def digest(cfg: DataConfig, tokenizer, num_clients: int, seed: int, per_client_eval: bool) -> str:
    recipe = {"format": FORMAT, "data": cfg.model_dump(mode="json"), "clients": num_clients, "seed": seed,
              "per_client_eval": per_client_eval, "files": _file_stamps(cfg.path) + _file_stamps(cfg.eval_path),
              "tokenizer": tokenizer_fingerprint(tokenizer)}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


# ---- writing ------------------------------------------------------------------------------
def _flatten(windows: list[PackedExamples], name: str) -> dict[str, np.ndarray]:
    """Consecutive windows of one packed buffer (as prepare_data makes them) as that buffer
    and the example index where each window starts."""
    first = windows[0]
    for before, after in zip(windows, windows[1:]):
        if after.ids is not first.ids or after.bits is not first.bits or after.offsets[0] != before.offsets[-1]:
            raise ValueError(f"the {name} windows are not consecutive windows of one buffer")
    offsets = np.concatenate([first.offsets, *(w.offsets[1:] for w in windows[1:])])
    return {f"{name}.ids": first.ids, f"{name}.bits": first.bits, f"{name}.offsets": offsets.astype(np.int64),
            f"{name}.bounds": np.cumsum([0, *(len(w) for w in windows)]).astype(np.int64)}


def _lengths(report: SplitReport) -> np.ndarray:
    table = report.lengths if isinstance(report.lengths, LengthTable) else LengthTable(report.lengths)
    return np.frombuffer(table.flat, dtype=np.intc).astype(np.int32).reshape(-1, LengthTable.WIDTH)


def write_prepared(folder: Path, data: PreparedData, key: str) -> None:
    """The packed buffers to `folder`, each file written whole and then renamed into place."""
    from safetensors.numpy import save_file

    tensors = {**_flatten(data.clients, "train"), **_flatten([data.eval], "eval")}
    if data.client_eval is not None:  # windows of the eval buffer
        windows = _flatten(data.client_eval, "eval")
        if windows["eval.ids"] is not tensors["eval.ids"] or not np.array_equal(windows["eval.offsets"], tensors["eval.offsets"]):
            raise ValueError("the per-client eval windows do not cover the eval buffer")
        tensors["eval.bounds"] = windows["eval.bounds"]
        rows = data.client_eval_rows
        tensors["client_eval_rows"] = np.fromiter((i for r in rows for i in r), dtype=np.int64)
        tensors["client_eval_rows.bounds"] = np.cumsum([0, *(len(r) for r in rows)]).astype(np.int64)
    for report in data.reports:
        tensors[f"lengths.{report.split}"] = _lengths(report)
    folder.mkdir(parents=True, exist_ok=True)
    part = folder / f"{TENSORS}.{os.getpid()}.part"
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(part))
    meta = {"format": FORMAT, "digest": key, "sha256": _sha256(part), "num_dropped": data.num_dropped,
            "reports": [[r.split, r.max_length] for r in data.reports], "client_eval": data.client_eval is not None}
    os.replace(part, folder / TENSORS)
    _write_atomically(folder / META, json.dumps(meta))


def _write_atomically(path: Path, text: str) -> None:
    part = path.with_name(f"{path.name}.{os.getpid()}.part")
    part.write_text(text)
    os.replace(part, path)


# ---- reading ------------------------------------------------------------------------------
def _map(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file as read-only numpy arrays over one memory map of it."""
    with path.open("rb") as f:
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    (size,) = struct.unpack("<Q", buffer[:8])
    header = json.loads(buffer[8 : 8 + size])
    header.pop("__metadata__", None)
    out = {}
    for name, entry in header.items():
        begin, end = entry["data_offsets"]
        dtype = np.dtype(DTYPES[entry["dtype"]])
        if 8 + size + end > len(buffer) or end - begin != dtype.itemsize * int(np.prod(entry["shape"])):
            raise ValueError(f"{path.name} is cut short or its header is damaged ({name})")
        count = (end - begin) // dtype.itemsize
        flat = np.frombuffer(buffer, dtype, count, 8 + size + begin) if count else np.empty(0, dtype)
        flat.flags.writeable = False
        out[name] = flat.reshape(entry["shape"])
    return out


def _windows(t: dict[str, np.ndarray], name: str) -> list[PackedExamples]:
    ids, bits, offsets, bounds = (t[f"{name}.{part}"] for part in ("ids", "bits", "offsets", "bounds"))
    return [PackedExamples(ids, bits, offsets[a : b + 1]) for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist())]


def read_prepared(folder: Path, key: str, verify: bool) -> tuple[PreparedData | None, str]:
    """(the prepared data mapped from `folder`, "") if it was written for `key`, else (None, why
    not). `verify`: also check the tensors file against its checksum."""
    try:
        meta = json.loads((folder / META).read_text())
        if meta.get("format") != FORMAT or meta.get("digest") != key:
            return None, "it was prepared for another data recipe, tokenizer, seed or fedllm version"
        if verify and _sha256(folder / TENSORS) != meta["sha256"]:
            return None, f"{TENSORS} does not match its checksum"
        t = _map(folder / TENSORS)
        clients = _windows(t, "train")
        (evaluated,) = _windows({**t, "eval.bounds": t["eval.bounds"][[0, -1]]}, "eval")
        rows = None
        if meta["client_eval"]:
            values, bounds = t["client_eval_rows"].tolist(), t["client_eval_rows.bounds"].tolist()
            rows = [values[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        reports = tuple(SplitReport(split, max_length, LengthTable.from_bytes(t[f"lengths.{split}"].astype(np.intc).tobytes()))
                        for split, max_length in meta["reports"])
        data = PreparedData(clients=clients, eval=evaluated, client_sizes=[len(c) for c in clients],
                            num_dropped=meta["num_dropped"], client_eval=_windows(t, "eval") if meta["client_eval"] else None,
                            client_eval_rows=rows, reports=reports)
    except FileNotFoundError:
        return None, "there is none"
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error) as err:  # json's errors are ValueErrors
        return None, f"it does not read back ({type(err).__name__}: {err})"
    return data, ""


# ---- the ranks of one machine ---------------------------------------------------------------
def _signal(folder: Path, launch: int) -> Path:
    return folder / f"ready-{launch}"


def _lead(cfg, tokenizer, num_clients, seed, per_client_eval, folder: Path, launch: int, key: str) -> PreparedData:
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("ready-*"):  # an earlier launch's
        if old != _signal(folder, launch):
            old.unlink(missing_ok=True)
    data, why = read_prepared(folder, key, verify=True)
    if data is not None:
        log.info("data: using the data prepared in %s", folder)
        if int(os.environ.get("RANK", "0")) == 0:
            log_reports(data.reports)
        _write_atomically(_signal(folder, launch), "ok")
        return data
    if why != "there is none":
        log.warning("data: preparing the data again: the copy in %s cannot be used (%s)", folder, why)
    try:
        data = prepare_data(cfg, tokenizer, num_clients, seed, per_client_eval)
    except BaseException:
        _write_atomically(_signal(folder, launch), "failed")  # the others prepare it too, and fail the same way
        raise
    try:
        write_prepared(folder, data, key)
    except (OSError, ValueError) as err:
        log.warning("data: could not share the prepared data through %s (%s): each rank prepares its own", folder, err)
        _write_atomically(_signal(folder, launch), "own")
        return data
    del data  # the mapped copy is what every rank of the machine holds
    mapped, why = read_prepared(folder, key, verify=False)
    _write_atomically(_signal(folder, launch), "ok" if mapped is not None else "own")
    return mapped if mapped is not None else prepare_data(cfg, tokenizer, num_clients, seed, per_client_eval)


def _follow(cfg, tokenizer, num_clients, seed, per_client_eval, folder: Path, launch: int, key: str) -> PreparedData:
    signal, start, noted = _signal(folder, launch), time.monotonic(), 0.0
    while not signal.exists():
        time.sleep(POLL_S)
        if time.monotonic() - start > noted + WAIT_NOTE_S:
            noted += WAIT_NOTE_S
            log.info("data: waiting for local rank 0 to prepare the data (%.0f s so far)", noted)
    if signal.read_text() == "ok":
        data, why = read_prepared(folder, key, verify=False)
        if data is not None:
            return data
        log.warning("data: the data local rank 0 prepared in %s cannot be used (%s): preparing it here", folder, why)
    return prepare_data(cfg, tokenizer, num_clients, seed, per_client_eval)


def prepare_data_once(cfg: DataConfig, tokenizer, num_clients: int, seed: int, per_client_eval: bool, folder: Path,
                      device) -> PreparedData:
    """prepare_data's result on every rank; under several ranks prepared by one rank a machine
    (LOCAL_RANK 0) and shared through `folder` (collective: every rank calls it)."""
    if not is_distributed() or "LOCAL_RANK" not in os.environ:
        return prepare_data(cfg, tokenizer, num_clients, seed, per_client_eval)
    launch = broadcast_int(secrets.randbits(62), device)
    key = digest(cfg, tokenizer, num_clients, seed, per_client_eval)
    lead = _lead if int(os.environ["LOCAL_RANK"]) == 0 else _follow
    return lead(cfg, tokenizer, num_clients, seed, per_client_eval, Path(folder), launch, key)
