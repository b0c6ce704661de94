"""The `flwr-clientapp` a party's SuperNode starts for each message (found first on the
SuperNode's PATH, which `fedllm join` sets): Flower's own ClientApp process, except that

- the run must be signed by the server's key (signing.py) before anything is done with it:
  a run that someone else submitted to the SuperLink gets an error reply, and the worker
  is never asked;
- the app it runs is this party's installed fedllm relay (client_app.py), never code from
  the submitted FAB, which is neither unpacked nor imported, nor are its dependencies
  installed.

Flower's `run_clientapp` does the rest (Runtime API, heartbeats, replies); the four names
replaced below are its module's own, pinned with the flwr minor version (pyproject). The
SuperNode's other task commands (an AgentApp's, a model's, ...) refuse to run on a party
(launch.shimmed_env)."""
from __future__ import annotations

import importlib
from pathlib import Path

from fedllm.deploy.signing import SIGNER_NODE_CONFIG as SIGNER

REFUSED: list[str] = []  # why this process's run is refused (one message, one run per process)


def checked_pull(original):
    """Flower's pull of the task's message, context, run and FAB, then the run's signature
    checked; a refusal is raised when the app is loaded, so that Flower replies with it."""
    def pull_task_input(client):
        from fedllm.deploy.signing import AppNotSigned, verify_app

        message, context, run, fab = original(client)
        signer = context.node_config.get(SIGNER)
        try:
            if not signer or not Path(str(signer)).exists():
                raise AppNotSigned("this SuperNode has no server signing key: start the party with `fedllm join`")
            verify_app(Path(str(signer)), fab.content, dict(context.run_config))
        except AppNotSigned as err:
            REFUSED.append(f"{err}")
        except Exception as err:  # an unreadable key, a config that is not a dict: refused all the same
            REFUSED.append(f"the run's signature could not be checked ({type(err).__name__}: {err})")
        return message, context, run, fab

    return pull_task_input


def load_relay(**_):
    def load(*_):
        from fedllm.deploy.flower.client_app import app
        from fedllm.deploy.signing import AppNotSigned

        if REFUSED:
            raise AppNotSigned(REFUSED[0])
        return app

    return load


def patched():
    """Flower's ClientApp process module, with the run's signature checked and the relay as its app."""
    flower = importlib.import_module("flwr.supernode.runtime.run_clientapp")  # the module, whatever the package exports
    flower.pull_task_input = checked_pull(flower.pull_task_input)
    flower.install_from_fab = lambda *args, **kwargs: None  # the submitted app's files are never unpacked
    flower.install_app_dependencies = lambda *args, **kwargs: None  # nor its dependencies installed
    flower.get_load_client_app_fn = load_relay
    return flower


def main() -> None:
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

    patched()
    flwr_clientapp()


if __name__ == "__main__":
    main()
