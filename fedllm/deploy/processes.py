"""The processes of a deployed side (SuperLink, SuperNode, worker): started so that they die
with the `fedllm serve` / `fedllm join` that started them (kill -9 included), stopped by
their process ids, and the ports they listen on checked to be theirs. Linux: /proc and prctl."""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1
# looked up before any fork: a forked child of a threaded parent must not enter the dynamic loader
_PRCTL = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)  # Linux; elsewhere a killed supervisor may leave its children


def die_with_parent(sig: int = signal.SIGTERM, parent: int | None = None) -> None:
    """This process gets `sig` when its parent exits (SIGKILL included). If the parent is
    already gone (it died between fork and here), the signal is raised at once."""
    if _PRCTL is not None:
        _PRCTL(PR_SET_PDEATHSIG, int(sig))
    if parent is not None and os.getppid() != parent:
        os.kill(os.getpid(), sig)


def start(command: list[str], env: dict, log_file: Path) -> subprocess.Popen:
    """A process in its own session (stopping it stops what it started too) that gets
    SIGTERM when the thread that started it exits, so a killed supervisor leaves no orphan."""
    parent = os.getpid()
    with open(log_file, "ab") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                preexec_fn=lambda: die_with_parent(signal.SIGTERM, parent))


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Flower detaches some of its helpers into their own sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_all(pids: list[int], seconds: float = 10.0) -> None:
    """SIGTERM, then SIGKILL to whichever of `pids` is still alive after `seconds`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.time() + seconds
        while time.time() < deadline and any(alive(pid) for pid in pids):
            time.sleep(0.1)
        if not any(alive(pid) for pid in pids):
            return


def stop(process: subprocess.Popen, seconds: float = 10.0) -> None:
    """Stops a process we started and everything it started, by their ids (and its process
    group, which holds the helpers its exit left behind)."""
    pids = [process.pid, *descendants(process.pid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for kill, target in [(os.killpg, process.pid)] + [(os.kill, pid) for pid in pids]:
            try:
                kill(target, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.time() + seconds
        while time.time() < deadline and (process.poll() is None or any(alive(pid) for pid in pids[1:])):
            time.sleep(0.2)
        if process.poll() is not None and not any(alive(pid) for pid in pids[1:]):
            return


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_taken(host: str, port: int) -> bool:
    """Whether something already listens on host:port (bound as uvicorn binds: SO_REUSEADDR)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def listening_inodes(port: int) -> set[str]:
    """The socket inodes listening on `port` (any address), from /proc/net/tcp{,6}."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                found.add(fields[9])
    return found


def listens_on(pid: int, port: int) -> bool:
    """Whether process `pid` holds the socket listening on `port` (it is ours, not a stale one)."""
    inodes = {f"socket:[{inode}]" for inode in listening_inodes(port)}
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd) in inodes:
                return True
        except OSError:  # closed since the listing (the listing's own descriptor, for one)
            continue
    return False


def start_with_parent(command: list[str], env: dict, out=None) -> subprocess.Popen:
    """Popen of a child that does not outlive us (it gets SIGTERM if we are killed); output to `out`."""
    parent = os.getpid()
    return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                            preexec_fn=lambda: die_with_parent(signal.SIGTERM, parent))


def running(ancestor: int, name: str) -> bool:
    """Whether a live process below `ancestor` has `name` in its command line."""
    for pid in descendants(ancestor):
        try:
            if name in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace") and alive(pid):
                return True
        except OSError:
            continue
    return False
