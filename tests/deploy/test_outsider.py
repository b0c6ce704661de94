"""The deployment's trust boundary, probed as an attacker would on loopback: a real `fedllm
serve` (SuperLink) with two real parties (`fedllm join`), and the stock `flwr` CLI.

- An outsider holding only ca.crt reaches the served address: `flwr ls`, `flwr supernode
  register`, `flwr run` and `flwr stop` are all refused there (the Control API is not served
  on it), and nothing it tried is registered or run.
- Someone who can reach the loopback-only Control API (a user of the server's machine)
  submits an app of their own: neither its ServerApp nor its ClientApp code runs anywhere
  (the server runs only fedllm's ServerApp, the parties only their own relay, and both only
  for runs serve signed; pinned_server.py, pinned_client.py).
- kill -9 of `fedllm serve` leaves no process of its run; an immediate `serve --resume`
  runs every round once, on its own SuperLink; a second `serve` of a run being served, or
  on a port in use, is refused.
Needs `fedllm[flower]` (CI's deployment step)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the Flower deployment tests need the extra: pip install 'fedllm[flower]'")

from fedllm.deploy.certs import make_certificates  # noqa: E402
from fedllm.deploy.launch import flower_command  # noqa: E402
from fedllm.deploy.localhost import LocalFederation  # noqa: E402
from fedllm.deploy.processes import alive, descendants, stop  # noqa: E402
from fedllm.metrics import read_jsonl  # noqa: E402

QUICKSTART = str(Path(__file__).parents[2] / "recipes" / "quickstart.yaml")
SHARED = ["federation.num_clients=2", "federation.clients_per_round=2", "client.max_steps=1", "eval.max_batches=1"]
TIMEOUT_S = 600

ROGUE_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "rogue"
version = "1.0.0"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "mallory"

[tool.flwr.app.components]
serverapp = "rogue_server:app"
clientapp = "rogue_client:app"

[tool.flwr.app.config]
out = ""
"""
ROGUE_SERVER = """\
import json
from pathlib import Path
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import ServerApp

app = ServerApp()

@app.main()
def main(grid, context):
    out = Path(str(context.run_config["out"]))
    nodes = list(grid.get_node_ids())
    asks = [Message(RecordDict({"job": ConfigRecord({"job": "{}"})}), dst_node_id=n, message_type="train") for n in nodes]
    replies = list(grid.send_and_receive(asks, timeout=120))
    said = [str(r.error.reason) if r.has_error() else "answered" for r in replies]
    (out / "server.json").write_text(json.dumps({"nodes": len(nodes), "replies": said}))
"""
ROGUE_CLIENT = """\
from pathlib import Path
from flwr.app import Message, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()

@app.train()
def train(msg, context):
    (Path(str(context.run_config["out"])) / "client_code_ran").write_text(repr(dict(context.node_config)))
    return Message(RecordDict(), reply_to=msg)
"""


def flwr(args: list[str], home: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")
    return subprocess.run([flower_command("flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout)


def connection(home: Path, address: str, ca: Path) -> Path:
    """A Flower CLI config, as an outsider (or a local user) would write it, naming `address` 'target'."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "target"\n\n[superlink.target]\naddress = "{address}"\n'
                                      f'root-certificates = "{ca}"\n')
    return home


def rogue_app(root: Path) -> Path:
    app = root / "rogue"
    app.mkdir(parents=True, exist_ok=True)
    (app / "pyproject.toml").write_text(ROGUE_PYPROJECT)
    (app / "rogue_server.py").write_text(ROGUE_SERVER)
    (app / "rogue_client.py").write_text(ROGUE_CLIENT)
    (app / "README.md").write_text("not fedllm's\n")
    return app


def internal_address(run_dir: Path) -> str:
    """The loopback address of the Control API, from the server operator's own Flower config."""
    text = (run_dir / "flower" / "home" / "config.toml").read_text()
    return text.split('address = "', 1)[1].split('"', 1)[0]


def our_processes(root: Path) -> list[int]:
    """Processes whose command line names anything under `root` (a SuperLink, SuperExec or
    ServerApp of a run there: they carry its certificates, database or run directory)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(root) in text and int(cmdline.parent.name) != os.getpid() and alive(int(cmdline.parent.name)):
            found.append(int(cmdline.parent.name))
    return found


@pytest.fixture(scope="module")
def waiting_federation(tmp_path_factory):
    """A served run with both parties connected that waits for a third party (client 2, never
    started) before round 0: the SuperLink and the parties stay up while they are probed."""
    root = tmp_path_factory.mktemp("boundary")
    fed = LocalFederation(QUICKSTART, SHARED, root)
    for i in range(2):
        fed.join(i)
    fed.serve(overrides=["federation.num_clients=3", "federation.clients_per_round=3", "federation.join_timeout_s=600",
                         f"output.dir={root / 'runs'}", "output.name=waiting", "output.progress=false"])
    run_dir = root / "runs" / "waiting"
    fed.until(lambda: (run_dir / "server.log").exists() and "client 1 is node" in fed.log_of("runs/waiting/server.log")
              and "client 0 is node" in fed.log_of("runs/waiting/server.log"), TIMEOUT_S, "both parties connecting")
    yield fed, run_dir
    fed.stop()


@pytest.mark.slow
@pytest.mark.timeout(2 * TIMEOUT_S)
def test_an_outsider_with_the_ca_certificate_gets_nothing_from_the_served_address(waiting_federation, tmp_path):
    fed, run_dir = waiting_federation
    home = connection(tmp_path / "outsider", f"127.0.0.1:{fed.port}", fed.certs / "ca.crt")
    mallory = make_certificates(tmp_path / "mallory", ["127.0.0.1"], 1)
    attempts = {
        "flwr ls": ["ls", "target"],
        "flwr supernode register": ["supernode", "register", str(mallory / "party_0.pub"), "target"],
        "flwr run": ["run", str(rogue_app(tmp_path)), "target", "--run-config", f"out='{tmp_path}'"],
        "flwr stop": ["stop", "1", "target"],
    }
    for what, args in attempts.items():
        done = flwr(args, home)
        assert done.returncode != 0, f"{what} was not refused: {done.stdout[-500:]}"
    access = fed.log_of("runs/waiting/superlink.log")
    assert '"POST /v1/control/' in access and " 404" in access  # they reached the served address and got nothing
    # the operator's own view (loopback): the one run is still running, and no key but the parties' two was registered
    operator = connection(tmp_path / "operator", internal_address(run_dir), fed.certs / "ca.crt")
    runs = flwr(["ls", "target", "--format", "json"], operator)
    assert runs.returncode == 0, runs.stdout + runs.stderr
    listed = json.loads(runs.stdout)["runs"]
    assert len(listed) == 1 and listed[0]["status"].startswith("running"), listed
    nodes = flwr(["supernode", "ls", "target", "--format", "json"], operator)
    assert nodes.returncode == 0 and len(json.loads(nodes.stdout)["nodes"]) == 2, nodes.stdout
    assert not (tmp_path / "client_code_ran").exists() and not (tmp_path / "server.json").exists()


@pytest.mark.slow
@pytest.mark.timeout(2 * TIMEOUT_S)
def test_an_app_the_server_did_not_sign_runs_no_code_on_the_server_or_any_party(waiting_federation, tmp_path):
    fed, run_dir = waiting_federation
    # as a user of the server's machine could: the Control API on loopback, the operator's CLI config
    local = connection(tmp_path / "local", internal_address(run_dir), fed.certs / "ca.crt")
    submitted = flwr(["run", str(rogue_app(tmp_path)), "target", "--run-config", f"out='{tmp_path}'"], local)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr

    def statuses() -> dict:
        listed = flwr(["ls", "target", "--format", "json"], local)
        return {r["run-id"]: r["status"] for r in json.loads(listed.stdout)["runs"]} if listed.returncode == 0 else {}

    fed.until(lambda: any(s.startswith("finished") for s in statuses().values()), TIMEOUT_S, "the submitted run ending")
    assert sorted(s.split(":")[0] for s in statuses().values()) == ["finished", "running"]  # serve's own run goes on
    rogue = next(run for run, status in statuses().items() if status.startswith("finished"))
    said = flwr(["log", str(rogue), "target", "--show"], local)
    assert "carries no fedllm signature" in said.stdout + said.stderr, said.stdout[-2000:]  # its ServerApp refused it
    assert not (tmp_path / "server.json").exists() and not (tmp_path / "client_code_ran").exists()  # no code of it ran
    for i in (0, 1):
        assert not any(fed.state_dir(i).joinpath("flower", "home", "apps").glob("mallory*"))  # nor reached a party


def killed_leaves_nothing(fed: LocalFederation, victim: str) -> None:
    """kill -9 of `serve` itself or of its SuperLink alone: afterwards no process of the run is left."""
    tree = {pid: Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            for pid in [fed.server.pid, *descendants(fed.server.pid)] if Path(f"/proc/{pid}/cmdline").exists()}
    assert any("flwr-serverapp" in c for c in tree.values()) and any("fedllm.deploy.superlink" in c for c in tree.values())
    target = fed.server.pid if victim == "serve" else next(p for p, c in tree.items() if "fedllm.deploy.superlink" in c)
    os.kill(target, signal.SIGKILL)
    fed.server.wait(TIMEOUT_S)
    deadline = time.time() + 30
    while any(alive(pid) for pid in tree) and time.time() < deadline:
        time.sleep(0.5)
    assert not [c for pid, c in tree.items() if alive(pid)], f"processes outlived the killed {victim}"


@pytest.mark.slow
@pytest.mark.timeout(2 * TIMEOUT_S)
def test_kill_9_of_serve_or_its_superlink_leaves_no_process_and_resume_runs_each_round_once(tmp_path):
    fed = LocalFederation(QUICKSTART, SHARED, tmp_path)
    run_dir = tmp_path / "runs" / "killed"
    done = lambda n: lambda: len(read_jsonl(run_dir / "metrics.jsonl")) >= n if (run_dir / "metrics.jsonl").exists() else False  # noqa: E731
    try:
        for i in range(2):
            fed.join(i)
        fed.serve(overrides=["federation.rounds=5", f"output.dir={tmp_path / 'runs'}", "output.name=killed",
                             "output.progress=false", "output.checkpoint_every=1"])
        fed.until(done(1), TIMEOUT_S, "round 1")
        killed_leaves_nothing(fed, "superlink")  # the SuperLink alone: its ServerApp must not go on polling
        assert fed.server.returncode == 2 and "the SuperLink was killed (signal 9)" in fed.log_of("serve.log")
        assert "the SuperLink was killed (signal 9)" in fed.log_of("runs/killed/server.log")
        fed.serve(resume=run_dir)  # at once: the ports are free again, the run's lock went with its holder
        fed.until(done(3), TIMEOUT_S, "round 3")
        killed_leaves_nothing(fed, "serve")
        assert our_processes(run_dir) == []
        fed.serve(resume=run_dir)
        assert fed.wait(TIMEOUT_S) == 0, fed.log_of("serve.log")[-3000:]
        assert [r["round"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    finally:
        fed.stop()


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S)
def test_a_run_being_served_or_a_taken_port_is_refused(waiting_federation, tmp_path):
    fed, run_dir = waiting_federation
    keys = ["--party-key", f"{fed.certs / 'party_0.pub'}=0"]
    again = subprocess.run([sys.executable, "-m", "fedllm", "serve", "--resume", str(run_dir), "--certs", str(fed.certs),
                            *keys, "--host", "127.0.0.1", "--port", str(fed.port + 1 if fed.port < 65535 else 1025)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "is being served already" in again.stderr, again.stderr
    other = subprocess.run([sys.executable, "-m", "fedllm", "serve", QUICKSTART, *SHARED, f"output.dir={tmp_path}",
                            "--certs", str(fed.certs), *keys, "--host", "127.0.0.1", "--port", str(fed.port)],
                           capture_output=True, text=True, timeout=120)
    assert other.returncode != 0 and "is in use" in other.stderr, other.stderr
    assert "Traceback" not in again.stderr + other.stderr


def local_api_port(state_dir: Path) -> int:
    """The port of a party's SuperNode local API, as any user of that machine can read it from `ps`."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(a.endswith("flower-supernode") for a in args) and any(str(state_dir) in a for a in args):
            return int(args[args.index("--port") + 1])
    raise AssertionError(f"no SuperNode of {state_dir} is running")


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S)
def test_a_local_user_of_a_partys_machine_is_handed_no_task(waiting_federation):
    """In subprocess isolation Flower's SuperNode hands its ClientApp tasks (and their run
    tokens) to whoever asks on 127.0.0.1; `join` runs it in process isolation with its own
    SuperExec holding a secret (0600), so asking without it is refused."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest
    from flwr.supercore.constant import TaskType
    from flwr.supercore.runtime import RuntimeHttpClient

    fed, _ = waiting_federation
    port = local_api_port(fed.state_dir(0))
    client = RuntimeHttpClient.from_server_address(f"127.0.0.1:{port}", insecure=True, root_certificates=None,
                                                   interceptors=[])
    with pytest.raises(Exception) as refused:
        client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    assert any(code in str(refused.value) for code in ("401", "403", "nauthenticated", "ermission")), refused.value
    secret = fed.state_dir(0) / "superexec.secret"
    assert secret.stat().st_mode & 0o777 == 0o600 and fed.state_dir(0).stat().st_mode & 0o777 == 0o700


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S)
def test_kill_9_of_join_leaves_no_process_of_that_party(tmp_path):
    fed = LocalFederation(QUICKSTART, SHARED, tmp_path, parties=1)
    fed.join(0)  # no server: its SuperNode keeps trying, and is started again each time it gives up
    try:
        def names() -> list[str]:
            return [Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace") for pid in descendants(fed.party[0].pid)
                    if Path(f"/proc/{pid}/cmdline").exists()]
        fed.until(lambda: "ready on" in fed.log_of("party_0/worker.log") and any("flower-superexec" in n for n in names()),
                  TIMEOUT_S, "the party's worker, SuperNode and SuperExec")
        tree = [fed.party[0].pid, *descendants(fed.party[0].pid)]
        os.kill(fed.party[0].pid, signal.SIGKILL)
        fed.party.pop(0).wait()
        deadline = time.time() + 30
        while any(alive(pid) for pid in tree) and time.time() < deadline:
            time.sleep(0.5)
        assert not [pid for pid in tree if alive(pid)], "processes outlived their killed `fedllm join`"
    finally:
        fed.stop()
