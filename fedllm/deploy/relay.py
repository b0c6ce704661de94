"""The frames between a party's ClientApp (a relay Flower starts per message) and its worker:
a JSON header and raw bytes over an authenticated Unix socket. Standard library only, so a
relay starts in a moment: it imports neither torch nor the model."""
from __future__ import annotations

import json
import os
import secrets
import struct
from multiprocessing.connection import Client as Connect
from pathlib import Path


def send_frame(conn, header: dict, payload: bytes = b"") -> None:
    text = json.dumps(header).encode()
    conn.send_bytes(struct.pack("<Q", len(text)) + text + payload)


def recv_frame(conn) -> tuple[dict, bytes]:
    data = conn.recv_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def worker_key(state_dir: Path) -> bytes:
    """The relay's key to the worker: made once, readable by the party's user only."""
    path = Path(state_dir) / "worker.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
    return path.read_bytes()


def ask_worker(socket: str, key_file: str, header: dict, payload: bytes = b"") -> tuple[dict, bytes]:
    """The relay's side: one request, one answer."""
    with Connect(socket, family="AF_UNIX", authkey=Path(key_file).read_bytes()) as conn:
        send_frame(conn, header, payload)
        return recv_frame(conn)


