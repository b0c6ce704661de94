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
    """A process in its own session (stopping it stops what it started too), logging to
    `log_file`, that does not outlive the thread that started it (start_with_parent)."""
    with open(log_file, "ab") as out:
        return start_with_parent(command, env, out, new_session=True)


def start_with_parent(command: list[str], env: dict, out=None, new_session: bool = False) -> subprocess.Popen:
    """Popen of a child that gets SIGTERM when the thread that started it exits (kill -9 of
    this process included), so a killed supervisor leaves no orphan; output to `out`."""
    parent = os.getpid()
    return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                            start_new_session=new_session, preexec_fn=lambda: die_with_parent(signal.SIGTERM, parent))


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
    """Running, or still exiting: a process whose main thread is a zombie is not gone while its
    other threads (torch's, say) are still running their exit."""
    try:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            return True
        return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return False


def kill_all(pids: list[int], seconds: float = 10.0, group: int | None = None) -> None:
    """SIGTERM, then SIGKILL to whichever of `pids` (and of process group `group`) is still
    alive after `seconds`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        targets = ([(os.killpg, group)] if group is not None else []) + [(os.kill, pid) for pid in pids]
        for kill, target in targets:
            try:
                kill(target, sig)
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
    kill_all([process.pid, *descendants(process.pid)], seconds, group=process.pid)
    process.poll()  # reaps it: alive() already counts a zombie as gone


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


def running(ancestor: int, name: str) -> bool:
    """Whether a live process below `ancestor` has `name` in its command line."""
    for pid in descendants(ancestor):
        try:
            if name in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace") and alive(pid):
                return True
        except OSError:
            continue
    return False
