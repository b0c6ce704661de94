"""The `flwr-serverapp` of a served run (first on the SuperLink's PATH, which `fedllm serve`
sets): Flower's own ServerApp process, except that

- it dies with the SuperExec that starts it (PR_SET_PDEATHSIG, SIGKILL): Flower's ServerApp
  only polls for its parent and then handles SIGINT, which one whose SuperLink is gone does
  not finish (seen: still running its rounds after the SuperLink was killed);
- the run must be signed by serve's key (FEDLLM_APP_SIGNER, signing.py), and what runs is
  this installation's fedllm ServerApp, never code from the submitted FAB (whose files are
  unpacked, as Flower reads the app's config from them, but not imported);
- one ServerApp at a time per run directory (flower/serverapp.lock): a signed run submitted
  again while the first is going ends at once instead of writing the same run.

Flower's `run_serverapp` does the rest; the two names replaced are its module's own,
pinned with the flwr minor version (pyproject)."""
from __future__ import annotations

import fcntl
import importlib
import os
import signal
import sys
from pathlib import Path

from fedllm.deploy.signing import SIGNER_ENV as SIGNER

_FABS: list[bytes] = []
_LOCKS: list = []  # held for the process's life


def parent_pid(argv: list[str]) -> int | None:
    return int(argv[argv.index("--parent-pid") + 1]) if "--parent-pid" in argv[:-1] else None


def keep_fab(original):
    def install_from_fab(content, *args, **kwargs):
        _FABS.append(bytes(content))
        return original(content, *args, **kwargs)

    return install_from_fab


def checked_run(original):
    def run(grid, context, server_app_dir, server_app_attr=None, loaded_server_app=None):
        from fedllm.deploy.signing import verify_app

        signer = os.environ.get(SIGNER)
        if not signer or not _FABS:
            raise RuntimeError(f"this SuperLink's ServerApp has no signing key ({SIGNER}): serve with `fedllm serve`")
        verify_app(Path(signer), _FABS[-1], dict(context.run_config))
        hold_run(Path(str(context.run_config["run-dir"])))
        from fedllm.deploy.flower.server_app import app

        return original(grid=grid, context=context, server_app_dir=server_app_dir, loaded_server_app=app)

    return run


def hold_run(run_dir: Path) -> None:
    lock = open(run_dir / "flower" / "serverapp.lock", "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RuntimeError(f"another ServerApp is running {run_dir}: a run is served once at a time") from None
    _LOCKS.append(lock)


def patched():
    """Flower's ServerApp process module, with its FAB kept for the check and its app run checked."""
    flower = importlib.import_module("flwr.superlink.runtime.run_serverapp")  # the package re-exports a function by that name
    flower.install_from_fab = keep_fab(flower.install_from_fab)
    flower.run_ = checked_run(flower.run_)
    return flower


def main() -> None:
    from fedllm.deploy.processes import die_with_parent

    die_with_parent(signal.SIGKILL, parent_pid(sys.argv))
    from flwr.superlink.cli.flwr_serverapp import flwr_serverapp

    patched()
    flwr_serverapp()


if __name__ == "__main__":
    main()
