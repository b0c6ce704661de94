"""The ServerApp: fedllm's Federation — its `Server` (strategy, collectors, the codecs' server
side, the one round tail), metrics, ledger, checkpoints and resume — with its clients behind
Flower's Grid (deploy.fleet.PartiesFleet over flower.fleet.GridTransport), composed, not
derived: `Federation(recipe, run_dir, fleet=flower_fleet(...))`. A round whose aggregate is not
finite is refused as in every mode."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedllm.capabilities import check_pairings
from fedllm.deploy.flower.fleet import flower_fleet, normal_key
from fedllm.deploy.launch import PARTIES, SERVER_EVAL
from fedllm.engine import Federation
from fedllm.recipe import load_recipe
from fedllm.registry import RecipeError

log = logging.getLogger("fedllm")
OUTCOME = "flower/outcome.json"  # how the ServerApp ended, for `fedllm serve`


def deployed_federation(recipe, run_dir: Path, grid: Grid, eval_data: str | None = None) -> Federation:
    """The run's Federation with the parties behind `grid` as its fleet (asks them for their sizes)."""
    return Federation(recipe, run_dir, fleet=flower_fleet(recipe, run_dir, grid, bound_keys(run_dir), eval_data))


def bound_keys(run_dir: Path) -> dict[int, bytes]:
    """Which public key may act as which client id (`fedllm serve --party-key KEY.pub=CLIENT_ID`)."""
    path = Path(run_dir) / PARTIES
    if not path.exists():
        raise RecipeError(f"{path} is missing: start the server with `fedllm serve ... --party-key KEY.pub=CLIENT_ID`")
    return {int(cid): normal_key(pem.encode()) for cid, pem in json.loads(path.read_text()).items()}



def log_to(run_dir: Path) -> None:
    handler = logging.FileHandler(run_dir / "server.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("fedllm").addHandler(handler)
    logging.getLogger("fedllm").setLevel(logging.INFO)


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_dir = Path(str(context.run_config["run-dir"]))
    log_to(run_dir)
    try:
        recipe = load_recipe(run_dir / "recipe.yaml")
        check_pairings(recipe, deployed=True)
        eval_data = json.loads((run_dir / SERVER_EVAL).read_text())["path"] if (run_dir / SERVER_EVAL).exists() else None
        fed = deployed_federation(recipe, run_dir, grid, eval_data)
        if (run_dir / "run_meta.json").exists():
            fed.resume()
        else:
            fed.start()
        fed.run()
    except Exception as err:  # `fedllm serve` reports it: Flower's own exit status does not carry it
        log.error("%s", err)
        (run_dir / OUTCOME).write_text(json.dumps({"error": f"{err}"}))
        raise
    (run_dir / OUTCOME).write_text(json.dumps({"ok": True}))
    log.info("run finished: %s", run_dir)
