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


def asgi_get(app, path: str, kind: str = "http") -> int:
    """The status `app` answers a POST to `path` with (an in-process ASGI call)."""
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": kind, "path": path, "method": "POST", "headers": [], "query_string": b"", "root_path": "",
             "scheme": "https", "server": ("127.0.0.1", 1), "client": ("203.0.113.9", 5), "http_version": "1.1"}
    asyncio.run(app(scope, receive, send))
    return next((m["status"] for m in sent if m["type"] == "http.response.start"), sent[0]["type"] if sent else None)


def test_the_served_address_passes_on_exactly_the_fleet_routes():
    pytest.importorskip("flwr", reason="needs the Flower extra")
    from flwr.superlink.main import create_app

    from fedllm.deploy.superlink import FleetOnly

    reached = []

    class Recorder:  # Flower's routes, recording what reaches them
        routes = create_app().routes

        async def __call__(self, scope, receive, send):
            reached.append(scope["path"])
            await send({"type": "http.response.start", "status": 200, "headers": []})
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
