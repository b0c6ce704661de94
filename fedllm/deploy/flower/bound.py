"""The `flwr-serverapp` of a served run (first on the SuperLink's PATH, which `fedllm serve`
sets): Flower's own ServerApp process, bound to the SuperExec that starts it. Flower's
ServerApp only polls for its parent and then handles SIGINT, which a ServerApp whose
SuperLink is gone does not finish (seen: still running its rounds after the SuperLink was
killed); this one gets SIGKILL from the kernel when its parent exits (PR_SET_PDEATHSIG)."""
from __future__ import annotations

import os
import signal


def main() -> None:
    from fedllm.deploy.processes import die_with_parent

    die_with_parent(signal.SIGKILL)
    if os.getppid() == 1:  # its SuperExec went before the line above
        raise SystemExit("the SuperExec that started this ServerApp is gone")
    from flwr.superlink.cli.flwr_serverapp import flwr_serverapp

    flwr_serverapp()


if __name__ == "__main__":
    main()
