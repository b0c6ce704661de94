"""The frames between a party's ClientApp (a relay Flower starts per message) and its worker:
a JSON header and raw bytes over an authenticated Unix socket. Standard library only, so a
relay starts in a moment: it imports neither torch nor the model."""
from __future__ import annotations

import json
import logging
import os
import secrets
import stat
import struct
import threading
from multiprocessing.connection import Client as Connect
from pathlib import Path


log = logging.getLogger("fedllm")
SOCKET = "worker.sock"  # the worker's socket, in the party's state directory


def send_frame(conn, header: dict, payload: bytes = b"") -> None:
    text = json.dumps(header).encode()
    conn.send_bytes(struct.pack("<Q", len(text)) + text + payload)


def recv_frame(conn) -> tuple[dict, bytes]:
    data = conn.recv_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def worker_key(state_dir: Path) -> bytes:
    """The relay's key to the worker: made once, readable by the party's user only."""
    return private_secret(Path(state_dir) / "worker.key")


def private_secret(path: Path) -> bytes:
    """32 random bytes kept in `path`, made once, readable by this user only. A file that
    another user owns, that others may read or write, or that is a link is made anew."""
    path = Path(path)
    if os.path.lexists(path) and not private_file(path):
        log.warning("%s was not private to this user (a link, another owner, or mode %s): made a new one", path,
                    oct(path.lstat().st_mode & 0o777))
        path.unlink()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    return path.read_bytes()


def private_file(path: Path) -> bool:
    """A regular file (not a link) of this user's that nobody else may read or write."""
    info = os.lstat(path)
    return stat.S_ISREG(info.st_mode) and only_mine(info)


def only_mine(info: os.stat_result) -> bool:
    """Owned by this user, and no group or other permission bits."""
    return info.st_uid == os.getuid() and not info.st_mode & 0o077


class WorkerDown(RuntimeError):
    """The party's worker did not answer: not running, or stuck past the time the round allows."""


def ask_worker(socket: str, key_file: str, header: dict, payload: bytes = b"", timeout_s: float = 600.0
               ) -> tuple[dict, bytes]:
    """The relay's side: one request, one answer within timeout_s, or WorkerDown saying why not.
    A relay that waited forever would hold its SuperNode, which runs one message at a time."""
    answer: list = []

    def ask():
        try:
            with Connect(socket, family="AF_UNIX", authkey=Path(key_file).read_bytes()) as conn:
                send_frame(conn, header, payload)
                answer.append(recv_frame(conn))
        except (OSError, EOFError) as err:  # no socket, connection refused or reset: the worker is gone
            answer.append(err)

    asking = threading.Thread(target=ask, daemon=True)  # the handshake and the answer can both hang
    asking.start()
    asking.join(timeout_s)
    if not answer:
        raise WorkerDown(f"the party's worker did not answer within {timeout_s:g} s (stuck?): restart `fedllm join`")
    if isinstance(answer[0], Exception):
        raise WorkerDown(f"the party's worker is not running ({type(answer[0]).__name__}: {answer[0]}): "
                         "`fedllm join` restarts it")
    return answer[0]


