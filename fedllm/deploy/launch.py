"""`fedllm serve` and `fedllm join`: the Flower processes of one side of a deployed
federation, started with TLS and node authentication, stopped by their process ids.

serve: a SuperLink (TLS; only registered party keys may connect), the parties' public keys
registered, and `flwr run` of the Flower App (server_app.py / client_app.py) on the run
directory, which holds the recipe, metrics, ledger and checkpoints as in simulation.
join: the party's worker (one base-model load), then a SuperNode that connects out to the
SuperLink with the party's key and relays each message to that worker."""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from fedllm.deploy import processes
from fedllm.deploy.processes import free_port, listens_on, port_taken, start, stop
from fedllm.deploy.signing import SIGNER_ENV, SIGNER_NODE_CONFIG
from fedllm.metrics import write_atomically
from fedllm.recipe import Recipe, apply_overrides, dump_recipe, load_recipe
from fedllm.registry import RecipeError
from fedllm.rundir import refuse_planted_links

log = logging.getLogger("fedllm")
CONNECTION = "fedllm"  # the SuperLink connection's name in the server's Flower config
PARTIES = "flower/parties.json"  # client id -> the public key bound to it, written by serve, read by the ServerApp
SERVER_EVAL = "flower/server_eval.json"  # the held-out file the server owns (serve --eval-data), if any

APP_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedllm-federation"
version = "1.0.0"
description = "fedllm's federation on Flower's deployment runtime"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedllm"

[tool.flwr.app.components]
serverapp = "fedllm.deploy.flower.server_app:app"
clientapp = "fedllm.deploy.flower.client_app:app"

[tool.flwr.app.config]
run-dir = "{run_dir}"
fedllm-signature = ""
"""


def flower_command(name: str) -> str:
    """A Flower executable of this Python's environment (where fedllm is installed)."""
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        raise RecipeError(f"'{name}' is not installed: pip install 'fedllm[flower]'")
    return found


# Flower's settings for its processes, unless the environment sets them: no telemetry and no
# update check (a party's machine talks to its SuperLink only), and its SuperExecs look for a
# ClientApp/ServerApp to start every 0.2 s instead of every 1 s (a round starts one per party).
FLOWER_DEFAULTS = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                   "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}


def flower_env(home: Path) -> dict:
    """The environment of Flower's processes: their own FLWR_HOME, this Python's executables first
    (the SuperLink starts `flower-superexec` by name)."""
    env = dict(FLOWER_DEFAULTS) | dict(os.environ, FLWR_HOME=str(home))
    for name in [n for n in env if n.startswith("FLWR_INTERNAL_GRPC_")]:  # would open Flower's old gRPC APIs on 0.0.0.0
        del env[name]
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def wait_for_port(host: str, port: int, seconds: float, process: subprocess.Popen, what: str) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            raise RecipeError(f"{what} exited with code {process.returncode}: see its log")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise RecipeError(f"{what} did not listen on {host}:{port} within {seconds:g} s")


# ---- the server's side ------------------------------------------------------------------
def prepare_run(recipe_path: str, overrides: list[str]) -> Path:
    # imported here: they bring torch, which serve and join (supervisors) need nowhere else
    from fedllm.capabilities import check_pairings
    from fedllm.engine import new_run_dir

    recipe = load_recipe(recipe_path, overrides)
    check_pairings(recipe, deployed=True)
    run_dir = new_run_dir(recipe, Path(recipe_path).stem, None)
    refuse_planted_links(run_dir)
    if (run_dir / "recipe.yaml").exists():
        raise RecipeError(f"{run_dir} already holds a run: continue it with `fedllm serve --resume {run_dir}`, or give "
                          "this run another output.name")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(run_dir / "recipe.yaml", dump_recipe(recipe))
    return run_dir


def write_app(run_dir: Path, address: str, ca: Path) -> tuple[Path, Path]:
    """The Flower App `flwr run` submits (it names fedllm's ServerApp and ClientApp) and the
    Flower config that points the CLI at our SuperLink; (app dir, FLWR_HOME)."""
    app, home = run_dir / "flower" / "app", run_dir / "flower" / "home"
    app.mkdir(parents=True, exist_ok=True)
    home.mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(APP_PYPROJECT.format(run_dir=run_dir.resolve()))
    (app / "README.md").write_text("Generated by `fedllm serve`: fedllm's federation as a Flower App.\n")
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\n'
        f'root-certificates = "{ca.resolve()}"\n')
    return app, home


def parse_party_keys(specs: list[str]) -> dict[int, Path]:
    """`KEY.pub=CLIENT_ID` flags -> {client id: public key file}: which key may act as which client."""
    bound: dict[int, Path] = {}
    for spec in specs:
        key, sep, cid = spec.rpartition("=")
        if not sep or not cid.strip().isdigit():
            raise RecipeError(f"--party-key {spec}: give the key and the client id it may act as, KEY.pub=CLIENT_ID "
                              "(e.g. --party-key certs/party_0.pub=0)")
        if int(cid) in bound:
            raise RecipeError(f"--party-key: client {int(cid)} is bound to two keys ({bound[int(cid)]} and {key}): "
                              "one key per client id")
        if Path(key) in bound.values():
            raise RecipeError(f"--party-key: {key} is bound to two client ids: one client id per key")
        bound[int(cid)] = Path(key)
    return bound


def public_key_pem(path: Path) -> str:
    """A party's OpenSSH public key as the SuperLink stores it (PEM SubjectPublicKeyInfo)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    try:
        key = serialization.load_ssh_public_key(Path(path).read_bytes())
    except (OSError, ValueError, UnsupportedAlgorithm) as err:
        raise RecipeError(f"--party-key {path}: not a readable OpenSSH public key ({err}): give the party's .pub file "
                          "(fedllm certs makes them)") from None
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def bind_parties(run_dir: Path, party_keys: dict[int, Path], num_clients: int) -> None:
    """run_dir/flower/parties.json: client id -> the public key allowed to act as it, for the ServerApp."""
    if wrong := sorted(cid for cid in party_keys if cid >= num_clients):
        raise RecipeError(f"--party-key binds client {wrong[0]}, but this federation has clients 0..{num_clients - 1}")
    (run_dir / PARTIES).parent.mkdir(parents=True, exist_ok=True)
    write_atomically(run_dir / PARTIES, json.dumps({str(c): public_key_pem(k) for c, k in sorted(party_keys.items())}))


def serve(recipe_path: str | None, overrides: list[str], certs: Path, party_keys: dict[int, Path], host: str = "0.0.0.0",
          port: int = 9092, resume: str | None = None, eval_data: str | None = None) -> Path:
    """Runs the federation's server side to the end; returns the run directory."""
    certs = Path(certs)
    if not party_keys:
        raise RecipeError("no --party-key: register each party's public key with its client id, KEY.pub=CLIENT_ID")
    for name in ("ca.crt", "server.pem", "server.key", "signing.key", "signing.pub"):
        if not (certs / name).exists():
            raise RecipeError(f"{certs / name} is missing: make the certificates with `fedllm certs {certs}` (and give "
                              "ca.crt and signing.pub to every party)")
    if resume:
        run_dir = Path(resume)
        if not (run_dir / "recipe.yaml").exists():
            raise RecipeError(f"{run_dir} is not a fedllm run directory (no recipe.yaml)")
    else:
        run_dir = prepare_run(recipe_path, overrides)
    with serving(run_dir):
        return serve_run(run_dir, certs, party_keys, host, port, eval_data)


@contextlib.contextmanager
def serving(run_dir: Path):
    """Holds run_dir/flower/serve.lock while this process serves the run: a second `fedllm serve`
    of the same run is refused (the lock goes with its holder, kill -9 included)."""
    (run_dir / "flower").mkdir(parents=True, exist_ok=True)
    with open(run_dir / "flower" / "serve.lock", "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise RecipeError(f"{run_dir} is being served already (by process {lock.read().strip() or '?'}): stop that "
                              "`fedllm serve` first") from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        yield


def serve_run(run_dir: Path, certs: Path, party_keys: dict[int, Path], host: str, port: int, eval_data: str | None) -> Path:
    if port_taken(host, port):
        raise RecipeError(f"{host}:{port} is in use (another SuperLink, or one left over from an earlier run?): stop it, "
                          "or serve on another --port")
    internal = free_port()  # the Control and Runtime APIs: loopback only, a port of this run's own
    app, home = write_app(run_dir, f"127.0.0.1:{internal}", certs / "ca.crt")
    bind_parties(run_dir, party_keys, load_recipe(run_dir / "recipe.yaml").federation.num_clients)
    if eval_data is not None:  # kept for a resumed run
        if not Path(eval_data).exists():
            raise RecipeError(f"--eval-data {eval_data} does not exist: give a held-out file in the recipe's format")
        write_atomically(run_dir / SERVER_EVAL, json.dumps({"path": str(Path(eval_data).resolve())}))
    env = shimmed_env(home, {"flwr-serverapp": "fedllm.deploy.flower.pinned_server"})
    env[SIGNER_ENV] = str((certs / "signing.pub").resolve())  # what its ServerApp checks the run with
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop the SuperLink on the way out
    superlink = start([
        sys.executable, "-m", "fedllm.deploy.superlink", host, str(port), str(os.getpid()),
        "--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.pem"),
        "--ssl-keyfile", str(certs / "server.key"), "--enable-supernode-auth", "--host", "127.0.0.1", "--port", str(internal),
        "--database", str(home / "superlink.db"),  # registered parties survive a restart of the server
        "--disable-runtime-dependency-installation",  # the ServerApp runs in this environment, beside fedllm
    ], env, run_dir / "superlink.log")
    try:
        local = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        wait_for_port("127.0.0.1", internal, 120, superlink, "the SuperLink")
        wait_for_port(local, port, 30, superlink, "the SuperLink")
        for where, number in ((host, port), ("127.0.0.1", internal)):
            if not listens_on(superlink.pid, number):
                raise RecipeError(f"another process answers on {where}:{number}, not the SuperLink just started: stop "
                                  "it, or serve on another --port")
        register(party_keys, env)
        print(f"SuperLink on {host}:{port} (TLS, Fleet API only, {len(party_keys)} registered parties); run directory "
              f"{run_dir}", flush=True)
        outcome = run_dir / "flower" / "outcome.json"  # written by the ServerApp when it ends
        outcome.unlink(missing_ok=True)
        with RoundLines(run_dir):
            done = submit(app, env, certs / "signing.key", run_dir, superlink)
        result = json.loads(outcome.read_text()) if outcome.exists() else {}
        if done != 0 or not result.get("ok"):
            why = result.get("error") or ended_why(run_dir, done, superlink)
            if not result.get("error"):  # the ServerApp could not say it: server.log says it for the record
                note_in_server_log(run_dir, why)
            raise RecipeError(why)
    finally:
        stop(superlink)
    return run_dir


SERVERAPP_START_S = 120.0  # how long a submitted run may go without a ServerApp process before serve gives up


def submit(app: Path, env: dict, signing_key: Path, run_dir: Path, superlink: subprocess.Popen) -> int:
    """`flwr run` of the app, signed (the server's and the parties' pinned processes run only runs
    signing.key signed), until the run ends; its exit code. A run whose ServerApp is not running
    for SERVERAPP_START_S (it failed at its start: Flower then never ends the run) is ended here."""
    from flwr.cli.build import build_fab_from_disk

    from fedllm.deploy.signing import SIGNATURE, sign_app

    signature = sign_app(signing_key, build_fab_from_disk(app), {"run-dir": str(run_dir.resolve())})
    with open(run_dir / "serverapp.log", "ab") as out:  # Flower's stream of the ServerApp's logs, beside server.log
        process = processes.start_with_parent([flower_command("flwr"), "run", str(app), CONNECTION, "--stream",
                                               "--run-config", f"{SIGNATURE}='{signature}'"], env, out)
    seen = time.time()
    while process.poll() is None:
        time.sleep(1.0)
        if processes.running(superlink.pid, "flwr-serverapp"):
            seen = time.time()
        elif time.time() - seen > SERVERAPP_START_S:
            stop(process)
            raise RecipeError(f"the run's ServerApp has not been running for {SERVERAPP_START_S:g} s (it failed as it "
                              f"started?): see {run_dir}/superlink.log")
    return process.returncode


class RoundLines:
    """While the run goes on: one console line per round the ServerApp logs to metrics.jsonl."""

    def __init__(self, run_dir: Path, every_s: float = 1.0):
        self.path, self.every_s, self.done = Path(run_dir) / "metrics.jsonl", every_s, threading.Event()
        self.seen = self.count()
        self.rounds = load_recipe(Path(run_dir) / "recipe.yaml").federation.rounds

    def count(self) -> int:
        return len(self.path.read_text().splitlines()) if self.path.exists() else 0

    def __enter__(self):
        threading.Thread(target=self.follow, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.show()

    def follow(self) -> None:
        while not self.done.wait(self.every_s):
            self.show()

    def show(self) -> None:
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        for line in lines[self.seen:]:
            try:
                print(round_line(json.loads(line), self.rounds), flush=True)
            except ValueError:  # a line being written: read again next time
                break
            self.seen += 1


def round_line(row: dict, rounds: int) -> str:
    parts = [f"round {row['round']}/{rounds}"]
    parts += [f"{k} {row[k]:.4f}" for k in ("train_loss", "eval_loss", "token_accuracy") if row.get(k) is not None]
    answered = row.get("clients", 0) - row.get("dropped", 0)
    parts.append(f"{answered}/{row.get('clients', 0)} parties" + (f" (missing {row['missing_clients']})"
                                                                    if row.get("missing_clients") else ""))
    return ", ".join(parts) + f", {row.get('seconds', 0):.1f} s"


def ended_why(run_dir: Path, code: int, superlink: subprocess.Popen) -> str:
    """Why a run ended without the ServerApp's result: the SuperLink went, the run was stopped, or the ServerApp died."""
    resume = f"continue it with `fedllm serve --resume {run_dir}`"
    if superlink.poll() is not None:
        how = (f"was killed (signal {-superlink.returncode})" if superlink.returncode < 0 else
               f"exited with code {superlink.returncode}")
        return f"the SuperLink {how} while the run was going (see {run_dir}/superlink.log): {resume}"
    access = (run_dir / "superlink.log").read_text(errors="replace") if (run_dir / "superlink.log").exists() else ""
    if '"POST /v1/control/stop-run' in access:
        return f"the run was stopped with `flwr stop` on this machine (the Control API is on loopback): {resume}"
    return (f"the ServerApp ended without a result (`flwr run` exit code {code}; see {run_dir}/serverapp.log and "
            f"server.log): {resume}")


def note_in_server_log(run_dir: Path, why: str) -> None:
    with open(run_dir / "server.log", "a") as f:
        f.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} ERROR fedllm: {why}\n")


def register(party_keys: dict[int, Path], env: dict) -> None:
    """Registers the parties' public keys with the SuperLink (only registered SuperNodes may
    connect), all at once: each `flwr` call is a Python start-up."""
    calls = {key: subprocess.Popen([flower_command("flwr"), "supernode", "register", str(key), CONNECTION, "--name",
                                    f"fedllm-client-{cid}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True) for cid, key in sorted(party_keys.items())}
    for key, call in calls.items():
        said = call.communicate()[0]
        if call.returncode != 0 and "already" not in said.lower():
            raise RecipeError(f"registering {key} failed: {said.strip()[-300:]}")


# ---- a party's side ----------------------------------------------------------------------
def join(recipe_path: str, overrides: list[str], data: str, client_id: int, superlink: str, ca: Path, key: Path,
         state_dir: Path, port: int | None = None, eval_data: str | None = None, signer: Path | None = None) -> None:
    """Starts this party's worker (its one base-model load), then a SuperNode that connects to
    the SuperLink; keeps both running (each is started again if it dies, or if the SuperNode
    stays cut off from the SuperLink) until stopped. The SuperNode answers only runs whose app
    the server's signing key (`signer`, default: signing.pub beside `ca`) signed."""
    from fedllm.deploy.relay import SOCKET, private_secret, worker_key

    signer = Path(signer) if signer is not None else Path(ca).with_name("signing.pub")
    for path in (ca, key, signer):
        if not Path(path).exists():
            raise RecipeError(f"{path} does not exist: the server's operator gives each party ca.crt, signing.pub and "
                              "its key pair")
    refuse_shared_key(Path(key))
    check_signer(signer)
    for flag, path in (("--data", data), ("--eval-data", eval_data)):
        if path is not None and not Path(path).exists():
            raise RecipeError(f"{flag} {path} does not exist: give your rows in the recipe's format")
    recipe = party_recipe(recipe_path, overrides)  # the worker checks its plugins and pairings (and says what is wrong)
    os.umask(0o077)  # what the party writes (its state, its logs, and its worker's) is its user's alone
    state_dir = private_dir(Path(state_dir).resolve())
    sock = state_dir / SOCKET
    if len(str(sock)) > 100:  # AF_UNIX paths are limited to ~108 bytes
        raise RecipeError(f"--state-dir {state_dir} is too long a path for the worker's socket: use a shorter one")
    write_atomically(state_dir / "recipe.yaml", dump_recipe(recipe))  # what the worker trains with
    worker_key(state_dir)
    home = state_dir / "flower"
    home.mkdir(parents=True, exist_ok=True)
    private_secret(state_dir / "superexec.secret")
    local_port = port or free_port()  # the SuperNode's local API for its ClientApps
    command = [
        flower_command("flower-supernode"), "--root-certificates", str(Path(ca).resolve()), "--superlink", superlink,
        "--auth-supernode-private-key", str(Path(key).resolve()),
        "--node-config", f"worker-socket='{sock}' worker-key='{state_dir / 'worker.key'}' "
                         f"{SIGNER_NODE_CONFIG}='{signer.resolve()}'",
        "--host", "127.0.0.1", "--port", str(local_port),
        # its tasks go only to the SuperExec that holds the secret (started beside it), not to any local user who asks
        "--isolation", "process", "--superexec-auth-secret-file", str(state_dir / "superexec.secret"),
    ]
    superexec = [flower_command("flower-superexec"), "--runtime-api-address", f"127.0.0.1:{local_port}", "--insecure",
                 "--superexec-auth-secret-file", str(state_dir / "superexec.secret")]
    worker = Worker(state_dir, str(Path(data).resolve()), client_id, str(Path(eval_data).resolve()) if eval_data else None)
    supernode = SuperNode(command, shimmed_env(home, {"flwr-clientapp": "fedllm.deploy.flower.pinned_client"}),
                          state_dir / "supernode.log", superexec=superexec, hints={
        "CERTIFICATE_VERIFY_FAILED": f"the server's TLS certificate does not verify with --ca {ca}: ask the server's "
                                     "operator for the CA certificate (ca.crt) that signed it",
        "Failed to activate SuperNode": f"the server does not know this party's key {key} (yet: a server that is "
                                        f"starting registers its parties' keys first): if this goes on, its operator "
                                        f"registers {Path(key).name}.pub for client {client_id} (fedllm serve "
                                        f"--party-key {Path(key).name}.pub={client_id})",
    })
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stop both on the way out
    try:
        worker.start()
        print(f"party {client_id} ready ({worker.log_file}); connecting to {superlink}", flush=True)
        supernode.start()
        worker.stopped.wait()  # until SIGTERM / Ctrl-C, or the worker cannot start again
        raise RecipeError(worker.failure)
    finally:
        supernode.stop()
        worker.stop()


def private_dir(path: Path) -> Path:
    """The party's state folder, made or kept private to this user (0700): it holds the worker's key and the
    party's per-round state. One that another user owns is refused."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.stat().st_uid != os.getuid():
        raise RecipeError(f"--state-dir {path} belongs to another user: use a folder of your own")
    os.chmod(path, 0o700)
    return path


def check_signer(path: Path) -> None:
    """The server's app-signing key must be an Ed25519 OpenSSH public key (fedllm certs' signing.pub)."""
    from fedllm.deploy.signing import AppNotSigned, load_signer

    try:
        load_signer(path)
    except AppNotSigned as err:
        raise RecipeError(f"--signer {err}: give the server's signing.pub (fedllm certs makes it)") from None


def refuse_shared_key(key: Path) -> None:
    """A private key others can read is no longer private (as ssh refuses it)."""
    from fedllm.deploy.relay import only_mine

    info = key.stat()
    if not only_mine(info):
        raise RecipeError(f"--key {key} can be read by others (mode {oct(info.st_mode & 0o777)}, owner uid {info.st_uid}):"
                          f" make it yours alone, `chmod 600 {key}`")


def shimmed_env(home: Path, allowed: dict[str, str]) -> dict:
    """Flower's environment under FLWR_HOME `home`, where every task process a SuperExec starts
    by name is fedllm's: `allowed` maps a command to the module that runs it (on the server,
    the pinned ServerApp; on a party, the pinned ClientApp), and every other task type Flower
    knows (an AgentApp, a model, a connector, a simulation) refuses to run, so a submitted app
    of another kind cannot bring its own code either."""
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND

    shims = home / "bin"
    shims.mkdir(parents=True, exist_ok=True)
    for command in sorted(set(TASK_TYPE_TO_COMMAND.values()) | set(allowed)):
        body = (f"from {allowed[command]} import main\nmain()\n" if command in allowed else
                f"import sys\nsys.exit('fedllm: a {command} task is not run here: fedllm runs its own signed "
                f"{' and '.join(sorted(allowed))} only')\n")
        (shims / command).write_text(f"#!{sys.executable}\n{body}")
        os.chmod(shims / command, 0o700)
    env = flower_env(home)
    env["PATH"] = f"{shims}{os.pathsep}{env['PATH']}"
    return env


def party_recipe(path: str, overrides: list[str]) -> Recipe:
    """The recipe's sections as written, without importing its plugins (and torch with them):
    `join` only hands it to the worker, which checks it whole. An override that switches a
    plugin by name needs the plugin's options, so it loads them after all."""
    import yaml

    from fedllm.recipe import recipe_sections, switched_plugins

    try:
        raw = yaml.safe_load(Path(path).read_text()) if Path(path).exists() else None
    except yaml.YAMLError:
        raw = None
    if not isinstance(raw, dict) or switched_plugins(raw, list(overrides)):
        return load_recipe(path, overrides)  # and its one-line error on a missing or broken file
    return recipe_sections(apply_overrides(raw, list(overrides)))


class Worker:
    """The party's worker process (fedllm.deploy.party): started, checked ready through its
    socket, and started again if it dies (the OOM killer, a crash) — the relay meanwhile fails
    its messages, so the server records the party missing instead of waiting on a dead one."""

    READY_TIMEOUT_S = 600.0  # building the model (download, quantisation) and the data
    CHECK_EVERY_S = 1.0

    def __init__(self, state_dir: Path, data: str, client_id: int, eval_data: str | None = None):
        self.state_dir, self.data, self.client_id, self.eval_data = Path(state_dir), data, client_id, eval_data
        self.log_file = self.state_dir / "worker.log"
        self.process, self.stopped, self.failure = None, threading.Event(), ""

    def start(self) -> None:
        """Starts the worker and returns once it answers; RecipeError (its own error) if it cannot."""
        self.launch()
        threading.Thread(target=self.watch, daemon=True).start()

    def launch(self) -> None:
        from fedllm.deploy.relay import SOCKET, WorkerDown, ask_worker

        self.process = start([sys.executable, "-m", "fedllm.deploy.party", str(self.state_dir), self.data,
                              str(self.client_id), *([self.eval_data] if self.eval_data else [])], dict(os.environ),
                             self.log_file)
        deadline = time.time() + self.READY_TIMEOUT_S
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RecipeError(f"the party's worker exited: {last_error(self.log_file).removeprefix('fedllm: error: ')}")
            try:
                ask_worker(str(self.state_dir / SOCKET), str(self.state_dir / "worker.key"), {"kind": "identify"},
                           timeout_s=5.0)
                return
            except WorkerDown:
                time.sleep(0.2)
        raise RecipeError(f"the party's worker did not start within {self.READY_TIMEOUT_S:g} s: see {self.log_file}")

    def watch(self) -> None:
        while not self.stopped.wait(self.CHECK_EVERY_S):
            if self.process.poll() is None or self.stopped.is_set():
                continue
            log.warning("the party's worker exited (code %s: %s); starting it again", self.process.returncode,
                        last_error(self.log_file))
            stop(self.process)
            try:
                self.launch()
            except RecipeError as err:
                self.failure = f"{err}"
                self.stopped.set()
            if self.stopped.is_set():  # stopped while it was starting again
                stop(self.process)

    def stop(self) -> None:
        self.stopped.set()
        if self.process is not None:
            stop(self.process)


def last_error(log_file: Path) -> str:
    """A process's last complaint in its log (the SuperNode: an unreachable SuperLink, an
    unregistered key; the worker: its one-line error), for the party's console."""
    lines = log_file.read_text(errors="replace").splitlines() if log_file.exists() else []
    found = [line for line in lines if any(word in line for word in ("ERROR", "error:", "Failed", "could not"))]
    return re.sub(r"\x1b\[[0-9;]*m", "", found[-1]).strip()[:200] if found else f"see {log_file}"


class SuperNode:
    """The party's SuperNode, started again whenever it exits (it gives up when the SuperLink
    is unreachable for a while), or when it stays alive but cut off: it said it is leaving
    (the SuperLink no longer knows its node: 401 on its heartbeat, e.g. after the server
    restarted) and has not exited STUCK_AFTER_S later. The party rejoins by itself."""

    RESTART_AFTER_S = 1.0
    STUCK_AFTER_S = 20.0
    LEAVING = ("terminated gracefully", "401 Unauthorized", "does not recognize this SuperNode")
    # a party that starts before its server has registered the keys is refused once or twice: not worth a word
    SAY_AFTER = {"Failed to activate SuperNode": 3}

    def __init__(self, command: list[str], env: dict, log_file: Path, hints: dict[str, str] | None = None,
                 superexec: list[str] | None = None):
        self.command, self.env, self.log_file = command, env, Path(log_file)
        self.superexec_command = superexec  # its SuperExec, where the SuperNode runs in process isolation
        self.process, self.superexec, self.stopped = None, None, threading.Event()
        self.read_to, self.leaving_since, self.seen = 0, None, ""
        self.hints, self.said, self.times = dict(hints or {}), set(), {}  # log marker -> what to tell the user, once

    def start(self) -> None:
        self.launch()
        threading.Thread(target=self.watch, daemon=True).start()

    def launch(self) -> None:
        self.read_to = self.log_file.stat().st_size if self.log_file.exists() else 0
        self.leaving_since, self.seen = None, ""  # this process's log only
        self.process = start(self.command, self.env, self.log_file)
        if self.superexec_command:  # it ends with its SuperNode (Flower's parent poll); both start again together
            self.superexec = start([*self.superexec_command, "--parent-pid", str(self.process.pid)], self.env,
                                   self.log_file)

    def watch(self) -> None:
        while not self.stopped.wait(self.RESTART_AFTER_S):
            if self.process.poll() is not None:
                why = f"exited (code {self.process.returncode}: {self.explain()})"
            elif self.superexec is not None and self.superexec.poll() is not None:
                why = f"lost its SuperExec (code {self.superexec.returncode})"
            elif self.stuck():
                why = f"said it was leaving {self.STUCK_AFTER_S:g} s ago and is still running"
            else:
                continue
            self.stop_processes()
            if self.stopped.is_set():
                return
            log.warning("the SuperNode %s; starting it again", why)
            self.launch()

    def stuck(self) -> bool:
        if self.leaving_since is None and any(marker in self.new_log() for marker in self.LEAVING):
            self.leaving_since = time.time()
        return self.leaving_since is not None and time.time() - self.leaving_since > self.STUCK_AFTER_S

    def new_log(self) -> str:
        """What the SuperNode logged since the last look."""
        if not self.log_file.exists():
            return ""
        with open(self.log_file, "rb") as f:
            f.seek(self.read_to)
            new = f.read()
        self.read_to += len(new)
        text = new.decode(errors="replace")
        self.seen = self.seen[-20000:] + text
        return text

    def explain(self) -> str:
        """Why it exited, in the party's terms where its log says (a CA that does not verify the
        server, a key the server did not register): said once as a warning, then shortened."""
        self.new_log()
        for marker, hint in self.hints.items():
            if marker in self.seen:
                self.times[marker] = self.times.get(marker, 0) + 1
                if marker not in self.said and self.times[marker] >= self.SAY_AFTER.get(marker, 1):
                    self.said.add(marker)
                    log.warning("%s", hint)
                return hint.split(":")[0]
        self.times.clear()
        return last_error(self.log_file)

    def stop_processes(self) -> None:
        for process in (self.process, self.superexec):
            if process is not None:
                stop(process)  # its helpers too

    def stop(self) -> None:
        self.stopped.set()
        self.stop_processes()


def split_for_parties(recipe_path: str, overrides: list[str], out: Path) -> list[Path]:
    """out/client_<i>.jsonl: the rows simulated client i trains on, to hand to party i of a
    test federation (a real party brings its own file), and out/client_<i>.eval.jsonl, its
    share of the held-out rows (`fedllm join --eval-data`)."""
    from fedllm.data.prepare import client_rows

    recipe = load_recipe(recipe_path, overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    train, held_out = client_rows(recipe.data, recipe.federation.num_clients, recipe.seed, recipe.eval.per_client)
    for i, (rows, eval_rows) in enumerate(zip(train, held_out)):
        rows.to_json(out / f"client_{i}.jsonl", lines=True, force_ascii=False)
        if len(eval_rows):
            eval_rows.to_json(eval_file(out / f"client_{i}.jsonl"), lines=True, force_ascii=False)
        paths.append(out / f"client_{i}.jsonl")
    return paths


def eval_file(train_file: Path) -> Path:
    """Where `split_for_parties` puts a party's held-out rows: client_<i>.eval.jsonl beside client_<i>.jsonl."""
    return Path(train_file).with_name(f"{Path(train_file).stem}.eval.jsonl")
