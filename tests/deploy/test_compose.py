"""deploy/compose.yaml stays runnable as the CLI changes: no Docker engine runs here or in CI,
so the file is checked the way Docker would use it, minus the containers. Its `setup`
service's commands are executed for real; every other service's command must parse with
fedllm's own CLI, and each path, key, certificate name and port it names must be one the
setup writes or the server listens on."""
import shlex
from pathlib import Path

import pytest
import yaml

from fedllm.cli import _parser, main
from fedllm.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "compose.yaml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def services() -> dict:
    return yaml.safe_load(COMPOSE.read_text())["services"]  # safe_load resolves the `<<:` merge keys


def commands(service: dict) -> list[list[str]]:
    """The fedllm invocations of a service's `sh -c "A && B"`, with its environment expanded
    ($$ is Compose's escape of $)."""
    shell, flag, script = shlex.split(service["command"])
    assert (shell, flag) == ("sh", "-c")
    env = service.get("environment", {})
    invocations = []
    for part in script.replace("$$", "$").split("&&"):
        argv = []
        for word in shlex.split(part):
            argv += shlex.split(env[word[1:]]) if word.startswith("$") else [word]
        invocations.append(argv)
    return invocations


def options(argv: list[str]):
    return _parser().parse_args(argv[1:])  # argparse exits (SystemExit) on an unknown or missing flag


def container_path(path: str, volumes: dict[str, Path]) -> Path:
    """A path inside a container, on the host folder standing in for its volume."""
    for mount, host in volumes.items():
        if path == mount or path.startswith(mount + "/"):
            return host / path[len(mount):].lstrip("/")
    raise AssertionError(f"{path} is on no volume the services share ({sorted(volumes)})")


def test_every_service_runs_a_fedllm_command_the_cli_accepts():
    found = services()
    assert set(found) == {"setup", "server", "party0", "party1"}
    verbs = {name: [options(argv).command for argv in commands(s)] for name, s in found.items()}
    assert verbs == {"setup": ["certs", "split"], "server": ["serve"], "party0": ["join"], "party1": ["join"]}
    for service in found.values():
        for argv in commands(service):
            assert argv[0] == "fedllm"
            args = options(argv)
            if getattr(args, "recipe", None):
                recipe = load_recipe(ROOT / args.recipe, args.overrides)  # a wrong override key fails here
                assert recipe.federation.num_clients == 2


def test_server_and_parties_hold_the_same_recipe():
    """A party refuses a round whose recipe digest is not its own: the overrides must agree."""
    found = services()
    held = {name: (options(commands(found[name])[0]).recipe, options(commands(found[name])[0]).overrides)
            for name in ("server", "party0", "party1")}
    assert len(set((r, tuple(o)) for r, o in held.values())) == 1, held
    split = options(commands(found["setup"])[1])
    server = load_recipe(ROOT / held["server"][0], held["server"][1])
    by_split = load_recipe(ROOT / split.recipe, split.overrides)
    assert (by_split.federation.num_clients, by_split.seed, by_split.data) == \
           (server.federation.num_clients, server.seed, server.data)


def test_setup_writes_every_file_the_server_and_parties_name(tmp_path):
    pytest.importorskip("cryptography", reason="`fedllm certs` needs the flower extra (cryptography)")
    found = services()
    volumes = {"/secrets": tmp_path / "secrets", "/shared": tmp_path / "shared"}
    for argv in commands(found["setup"]):  # the setup service, run for real
        args = options(argv)
        if args.command == "certs":
            argv = argv[:2] + [str(container_path(args.out, volumes))] + argv[3:]
        else:
            argv = argv[:3] + [str(container_path(args.out, volumes))] + argv[4:]
        assert main(argv[1:]) == 0, argv

    server = options(commands(found["server"])[0])
    certs = container_path(server.certs, volumes)
    assert all((certs / name).is_file() for name in ("ca.crt", "server.pem", "server.key"))
    bound = {}
    for spec in server.party_key:
        key, cid = spec.rsplit("=", 1)
        assert container_path(key, volumes).is_file(), key
        bound[int(cid)] = key

    from cryptography import x509

    names = x509.load_pem_x509_certificate((certs / "server.pem").read_bytes()).extensions.get_extension_for_class(
        x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    for name in ("party0", "party1"):
        party = options(commands(found[name])[0])
        host, port = party.superlink.rsplit(":", 1)
        assert host in names and host == "server" and int(port) == server.port  # TLS checks the name it dials
        assert container_path(party.ca, volumes).read_bytes() == (certs / "ca.crt").read_bytes()
        assert container_path(party.key, volumes).is_file()
        assert bound[party.client_id] == party.key + ".pub"  # its key is the one bound to its client id
        rows = container_path(party.data, volumes)
        assert rows.is_file() and rows.name == f"client_{party.client_id}.jsonl" and rows.stat().st_size > 0
        held_out = container_path(party.eval_data, volumes)  # its share of the held-out rows: the federated eval
        assert held_out.is_file() and held_out.name == f"client_{party.client_id}.eval.jsonl" and held_out.stat().st_size > 0


def test_the_image_holds_what_the_commands_use():
    docker = DOCKERFILE.read_text()
    assert "torch==2.13.0" in docker and "--index-url https://download.pytorch.org/whl/cpu" in docker  # never a CUDA build
    assert '".[flower]"' in docker
    copied = {line.split()[1] for line in docker.splitlines() if line.startswith("COPY")}
    for service in services().values():
        for argv in commands(service):
            recipe = getattr(options(argv), "recipe", None)
            if recipe:
                assert recipe.split("/")[0] in copied, recipe
