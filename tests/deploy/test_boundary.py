"""The pieces of the deployment's trust boundary, each alone and without a network: the served
address's route filter, the app signature, the party's private files, and processes that die
with their parent. Needs `fedllm[flower]` where Flower's own code is exercised."""
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("cryptography", reason="the deployment's certificates need the Flower extra: pip install 'fedllm[flower]'")

from fedllm.deploy.certs import make_certificates  # noqa: E402
from fedllm.deploy.processes import alive, listens_on, port_taken, start  # noqa: E402
from fedllm.deploy.relay import private_file, worker_key  # noqa: E402
from fedllm.deploy.signing import SIGNATURE, AppNotSigned, sign_app, verify_app  # noqa: E402
from fedllm.registry import RecipeError  # noqa: E402


def asgi_get(app, path: str, kind: str = "http", length: int | None = None, chunks: int = 1) -> int:
    """The status `app` answers a POST to `path` with (an in-process ASGI call), whose body is
    `chunks` chunks of 1 MiB (its content-length header says `length`, if given)."""
    sent, left = [], [chunks]

    async def receive():
        left[0] -= 1
        return {"type": "http.request", "body": b"x" * 2**20 if chunks > 1 else b"", "more_body": left[0] > 0}

    async def send(message):
        sent.append(message)

    headers = [(b"content-length", str(length).encode())] if length is not None else []
    scope = {"type": kind, "path": path, "method": "POST", "headers": headers, "query_string": b"", "root_path": "",
             "scheme": "https", "server": ("127.0.0.1", 1), "client": ("203.0.113.9", 5), "http_version": "1.1"}
    asyncio.run(app(scope, receive, send))
    return next((m["status"] for m in sent if m["type"] == "http.response.start"), sent[0]["type"] if sent else None)


def test_the_served_address_passes_on_exactly_the_fleet_routes():
    pytest.importorskip("flwr", reason="needs the Flower extra")
    from flwr.superlink.main import create_app

    from fedllm.deploy.superlink import FleetOnly

    reached = []

    class Recorder:  # Flower's routes, recording what reaches them and how much body they read
        routes = create_app().routes

        async def __call__(self, scope, receive, send):
            body, message = 0, {"type": "http.request", "more_body": True}
            while message.get("more_body") and message["type"] != "http.disconnect":
                message = await receive()
                body += len(message.get("body", b""))
            reached.append(scope["path"])
            status = 499 if message["type"] == "http.disconnect" else 200
            await send({"type": "http.response.start", "status": status, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    public = FleetOnly(Recorder())
    assert "/v1/fleet/pull-messages" in public.paths and len(public.paths) >= 10
    assert all(p.startswith("/v1/fleet/") for p in public.paths)
    for path in ("/v1/fleet/pull-messages", "/v1/fleet/send-node-heartbeat"):
        assert asgi_get(public, path) == 200
    refused = ["/v1/control/list-runs", "/v1/control/start-run", "/v1/control/stop-run", "/v1/control/register-node",
               "/v1/runtime/acquire-task", "/docs", "/openapi.json", "/health", "/v1/fleet/../control/list-runs",
               "/v1/fleet/pull-messages/", "/V1/FLEET/pull-messages", "/v1/fleet//pull-messages"]
    assert {path: asgi_get(public, path) for path in refused} == {path: 404 for path in refused}
    assert asgi_get(public, "/v1/fleet/pull-messages", kind="websocket") == "websocket.close"
    assert reached == ["/v1/fleet/pull-messages", "/v1/fleet/send-node-heartbeat"]
    # a body larger than any SuperNode sends is refused before Flower reads it: declared, or streamed (chunked)
    from fedllm.deploy.superlink import MAX_REQUEST_BYTES

    assert asgi_get(public, "/v1/fleet/push-object", length=MAX_REQUEST_BYTES + 1) == 413
    assert asgi_get(public, "/v1/fleet/push-object", length=2**20, chunks=1) == 200
    assert asgi_get(public, "/v1/fleet/push-object", chunks=MAX_REQUEST_BYTES // 2**20 + 2) == 499  # cut off
    assert reached[-1] == "/v1/fleet/push-object" and len(reached) == 4


def test_a_run_verifies_only_with_the_servers_key_its_fab_and_its_config(tmp_path):
    ours, theirs = make_certificates(tmp_path / "ours", ["127.0.0.1"], 1), make_certificates(tmp_path / "theirs", ["x"], 1)
    fab, config = b"PK\x03\x04 a fab", {"run-dir": "/srv/runs/a"}
    signature = sign_app(ours / "signing.key", fab, config)
    verify_app(ours / "signing.pub", fab, {**config, SIGNATURE: signature})  # the run serve submitted
    cases = {
        "no signature": ({**config}, fab, ours),
        "another key's signature": ({**config, SIGNATURE: sign_app(theirs / "signing.key", fab, config)}, fab, ours),
        "another fab": ({**config, SIGNATURE: signature}, fab + b"!", ours),
        "another run config": ({"run-dir": "/tmp/elsewhere", SIGNATURE: signature}, fab, ours),
        "an extra config key": ({**config, "evil": 1, SIGNATURE: signature}, fab, ours),
        "not base64": ({**config, SIGNATURE: "%%%"}, fab, ours),
        "trusting another key": ({**config, SIGNATURE: signature}, fab, theirs),
    }
    for what, (run_config, content, trusted) in cases.items():
        with pytest.raises(AppNotSigned):
            verify_app(trusted / "signing.pub", content, run_config)
            pytest.fail(f"{what} verified")


def test_certs_are_private_and_the_signing_key_is_made_with_them(tmp_path):
    out = make_certificates(tmp_path / "certs", ["127.0.0.1"], 2)
    assert out.stat().st_mode & 0o777 == 0o700
    for name in ("server.key", "signing.key", "party_0", "party_1"):
        assert (out / name).stat().st_mode & 0o777 == 0o600, name
    for name in ("ca.crt", "signing.pub", "party_0.pub"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name


@pytest.mark.parametrize("how", ["0644", "a link", "0660"])
def test_a_worker_key_others_could_read_or_plant_is_made_anew(tmp_path, how, caplog):
    path = tmp_path / "worker.key"
    planted = b"x" * 32
    if how == "a link":
        (tmp_path / "elsewhere").write_bytes(planted)
        path.symlink_to(tmp_path / "elsewhere")
    else:
        path.write_bytes(planted)
        os.chmod(path, int(how, 8))
    key = worker_key(tmp_path)
    assert key != planted and len(key) == 32
    assert private_file(path) and path.stat().st_mode & 0o777 == 0o600
    assert "made a new one" in caplog.text
    assert worker_key(tmp_path) == key  # a private key is kept


def test_join_makes_its_state_private_and_refuses_a_key_others_can_read(tmp_path):
    from fedllm.deploy.launch import private_dir, refuse_shared_key

    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    assert private_dir(state).stat().st_mode & 0o777 == 0o700
    certs = make_certificates(tmp_path / "certs", ["127.0.0.1"], 1)
    refuse_shared_key(certs / "party_0")  # 0600: fine
    os.chmod(certs / "party_0", 0o644)
    with pytest.raises(RecipeError, match="chmod 600"):
        refuse_shared_key(certs / "party_0")


def test_a_process_started_for_a_supervisor_dies_with_it_even_on_sigkill(tmp_path):
    # the supervisor starts a long sleeper the way serve and join start Flower's processes, then is killed -9
    code = ("import sys, time; from pathlib import Path; from fedllm.deploy.processes import start; "
            "p = start([sys.executable, '-c', 'import time; time.sleep(300)'], {}, Path(sys.argv[1])); "
            "print(p.pid, flush=True); time.sleep(300)")
    supervisor = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "log")], stdout=subprocess.PIPE, text=True)
    child = int(supervisor.stdout.readline())
    assert alive(child)
    supervisor.send_signal(signal.SIGKILL)
    supervisor.wait()
    deadline = time.time() + 10
    while alive(child) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive(child)


def test_a_port_is_known_taken_and_known_to_be_whose(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert port_taken("127.0.0.1", port)
        assert listens_on(os.getpid(), port)
        other = start([sys.executable, "-c", "import time; time.sleep(30)"], dict(os.environ), tmp_path / "log")
        try:
            assert not listens_on(other.pid, port)  # an answer on the port is not proof that a given process serves it
        finally:
            other.kill()
    assert not port_taken("127.0.0.1", port)


def test_every_flower_task_but_fedllms_own_refuses_to_run_on_a_party_and_on_the_server(tmp_path):
    pytest.importorskip("flwr", reason="needs the Flower extra")
    import shutil

    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND

    from fedllm.deploy.launch import shimmed_env

    for side, ours in (("party", "flwr-clientapp"), ("server", "flwr-serverapp")):
        home = tmp_path / side
        env = shimmed_env(home, {ours: f"fedllm.deploy.flower.pinned_{side.replace('party', 'client')}"})
        for command in TASK_TYPE_TO_COMMAND.values():  # an AgentApp's, a model's, a connector's, a simulation's, ...
            found = Path(shutil.which(command, path=env["PATH"]))
            assert found.parent == home / "bin" and found.stat().st_mode & 0o777 == 0o700, command
            if command == ours:
                assert f"fedllm.deploy.flower.pinned_" in found.read_text()
                continue
            done = subprocess.run([str(found), "--runtime-api-address", "127.0.0.1:9", "--token", "t"], env=env,
                                  capture_output=True, text=True, timeout=60)
            assert done.returncode != 0 and "is not run here" in done.stderr, (side, command, done.stderr)


class Context:  # the fields of Flower's Context the pinned processes read
    def __init__(self, run_config: dict, node_config: dict | None = None):
        self.run_config, self.node_config = run_config, node_config or {}


class Fab:
    def __init__(self, content: bytes):
        self.content = content


def test_a_partys_clientapp_runs_its_own_relay_for_a_signed_run_and_refuses_any_other(tmp_path):
    pytest.importorskip("flwr", reason="needs the Flower extra")
    from fedllm.deploy.flower import pinned_client
    from fedllm.deploy.flower.client_app import app as relay

    certs = make_certificates(tmp_path / "certs", ["127.0.0.1"], 1)
    fab, config = b"a fab", {"run-dir": "/srv/run"}
    signed = {**config, SIGNATURE: sign_app(certs / "signing.key", fab, config)}
    node = {pinned_client.SIGNER: str(certs / "signing.pub")}
    cases = {"signed": (signed, node), "unsigned": (config, node), "no signer": (signed, {}),
             "a signer that is no key": (signed, {pinned_client.SIGNER: str(certs / "ca.crt")})}
    for what, (run_config, node_config) in cases.items():
        pinned_client.REFUSED.clear()
        pull = pinned_client.checked_pull(lambda client: ("message", Context(run_config, node_config), "run", Fab(fab)))
        assert pull(None)[0] == "message"  # the message is pulled either way: Flower can then reply with the refusal
        load = pinned_client.load_relay()
        if what == "signed":
            assert load("fab-id", "1.0", "hash") is relay  # fedllm's relay, whatever the FAB names
        else:
            with pytest.raises(AppNotSigned):
                load("fab-id", "1.0", "hash")


def test_the_servers_serverapp_runs_fedllms_app_for_a_signed_run_once_per_run_dir(tmp_path, monkeypatch):
    pytest.importorskip("flwr", reason="needs the Flower extra")
    from fedllm.deploy.flower import pinned_server
    from fedllm.deploy.flower.server_app import app

    certs = make_certificates(tmp_path / "certs", ["127.0.0.1"], 1)
    run_dir = tmp_path / "run"
    (run_dir / "flower").mkdir(parents=True)
    fab, config = b"the fab serve built", {"run-dir": str(run_dir)}
    signed = {**config, SIGNATURE: sign_app(certs / "signing.key", fab, config)}
    monkeypatch.setenv(pinned_server.SIGNER, str(certs / "signing.pub"))
    ran = []
    run = pinned_server.checked_run(lambda **kw: ran.append(kw["loaded_server_app"]))
    pinned_server.keep_fab(lambda *a, **k: None)(fab, skip_prompt=True)
    with pytest.raises(AppNotSigned):
        run(grid=None, context=Context(config), server_app_dir="/apps/x", server_app_attr="evil:app")
    pinned_server.keep_fab(lambda *a, **k: None)(fab + b"!", skip_prompt=True)  # another FAB under the signature
    with pytest.raises(AppNotSigned):
        run(grid=None, context=Context(signed), server_app_dir="/apps/x", server_app_attr="evil:app")
    assert ran == []
    pinned_server.keep_fab(lambda *a, **k: None)(fab, skip_prompt=True)
    run(grid=None, context=Context(signed), server_app_dir="/apps/x", server_app_attr="evil:app")
    assert ran == [app]  # fedllm's own ServerApp, not the one the FAB names
    with pytest.raises(RuntimeError, match="another ServerApp is running"):  # the same signed run, submitted again
        run(grid=None, context=Context(signed), server_app_dir="/apps/x", server_app_attr="evil:app")
    pinned_server._LOCKS.clear()


def test_the_pinned_processes_replace_the_names_flowers_own_process_calls():
    pytest.importorskip("flwr", reason="needs the Flower extra")
    import inspect

    from fedllm.deploy.flower import pinned_client, pinned_server

    server = pinned_server.patched()
    assert "keep_fab" in server.install_from_fab.__qualname__ and "checked_run" in server.run_.__qualname__
    source = inspect.getsource(server.run_serverapp)  # Flower's function calls them through its module's globals
    assert "install_from_fab(fab.content" in source and "context = run_(" in source
    client = pinned_client.patched()
    assert "checked_pull" in client.pull_task_input.__qualname__ and client.get_load_client_app_fn is pinned_client.load_relay
    source = inspect.getsource(client.run_clientapp)
    assert all(name in source for name in ("pull_task_input(client)", "install_from_fab(", "get_load_client_app_fn(",
                                           "install_app_dependencies("))


def test_a_process_below_another_is_found_by_name_while_it_lives(tmp_path):
    from fedllm.deploy.processes import running

    child = start([sys.executable, "-c", "import time; time.sleep(60)", "flwr-serverapp-look-alike"], dict(os.environ),
                  tmp_path / "log")
    try:
        assert running(os.getpid(), "flwr-serverapp-look-alike") and not running(os.getpid(), "no-such-name")
    finally:
        child.kill()
        child.wait()
    assert not running(os.getpid(), "flwr-serverapp-look-alike")
