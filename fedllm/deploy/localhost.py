"""A whole deployed federation on one machine — certificates, each simulated client's rows
as a party's own file, `fedllm serve` and one `fedllm join` per party, each in its own
process, stopped by process id — for tests, the benchmark and trying it out."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fedllm.deploy.certs import make_certificates
from fedllm.deploy.launch import eval_file, split_for_parties
from fedllm.deploy.processes import descendants, die_with_parent, free_port, stop


class LocalFederation:
    def __init__(self, recipe: str, overrides: list[str], root: Path, parties: int = 2):
        self.recipe, self.overrides, self.root, self.parties = recipe, list(overrides), Path(root), parties
        self.port = free_port()
        self.certs = make_certificates(self.root / "certs", ["127.0.0.1", "localhost"], parties)
        self.data = split_for_parties(recipe, self.overrides, self.root / "data")
        self.server: subprocess.Popen | None = None
        self.party: dict[int, subprocess.Popen] = {}
        self.env = dict(os.environ)  # the threads each process chooses itself, as a user's would

    def fedllm(self, args: list[str], log: Path) -> subprocess.Popen:
        parent = os.getpid()  # a killed test run (or bench) leaves no federation behind
        with open(log, "ab") as out:
            return subprocess.Popen([sys.executable, "-m", "fedllm", *args], stdout=out, stderr=subprocess.STDOUT,
                                    env=self.env, start_new_session=True,
                                    preexec_fn=lambda: die_with_parent(signal.SIGTERM, parent))

    def serve(self, resume: Path | None = None, overrides: list[str] = ()) -> None:
        """A run of the server side (the recipe with the parties' overrides, then `overrides`: a
        server may run several in turn with the same parties), or the continuation of one."""
        keys = [a for i in range(self.parties) for a in ("--party-key", f"{self.certs / f'party_{i}.pub'}={i}")]
        what = ["--resume", str(resume)] if resume else [self.recipe, *self.overrides, *overrides]
        self.server = self.fedllm(["serve", *what, "--certs", str(self.certs), *keys, "--host", "127.0.0.1",
                                   "--port", str(self.port)], self.root / "serve.log")

    def join(self, i: int) -> None:
        self.party[i] = self.fedllm([
            "join", self.recipe, *self.overrides, "--data", str(self.data[i]), "--client-id", str(i),
            "--superlink", f"127.0.0.1:{self.port}", "--ca", str(self.certs / "ca.crt"),
            "--key", str(self.certs / f"party_{i}"), "--state-dir", str(self.state_dir(i)),
            *(["--eval-data", str(eval_file(self.data[i]))] if eval_file(self.data[i]).exists() else []),
        ], self.root / f"join_{i}.log")

    def state_dir(self, i: int) -> Path:
        return self.root / f"party_{i}"

    def start(self) -> "LocalFederation":
        self.serve()
        for i in range(self.parties):
            self.join(i)
        return self

    def crash(self, i: int) -> None:
        """Party i dies at once (SIGKILL to its worker, SuperNode and their helpers)."""
        process = self.party.pop(i)
        for pid in [process.pid, *descendants(process.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        process.wait()

    def wait(self, seconds: float) -> int:
        """The server's exit code once the run is over (it stops its SuperLink itself)."""
        try:
            code = self.server.wait(seconds)
            stop(self.server)  # what the SuperLink left behind, so the next run's SuperLink gets the port
            return code
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"the deployed run did not finish within {seconds:g} s: see {self.root}/*.log") from None

    def stop(self) -> None:
        for process in [*self.party.values(), *([self.server] if self.server else [])]:
            stop(process)
        self.party.clear()

    def log_of(self, name: str) -> str:
        path = self.root / name
        return path.read_text(errors="replace") if path.exists() else ""

    def until(self, check, seconds: float, what: str) -> None:
        deadline = time.time() + seconds
        while not check():
            if time.time() > deadline:
                raise TimeoutError(f"{what} did not happen within {seconds:g} s: see {self.root}/*.log")
            time.sleep(1)
