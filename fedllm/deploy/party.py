"""One party of a deployed federation: the resident base model, fedllm's `Client` on the
party's own data, and its per-client state on its own disk. Flower's SuperNode starts a
fresh ClientApp process for every message; that process is a thin relay (client_app.py),
and this long-lived worker, started once by `fedllm join`, does the work — so the base
model is loaded (and quantised) once per party, not once per round.

The relay and the worker talk over a Unix socket on the party's machine, authenticated with
a key only the party's user can read; frames are JSON headers + raw safetensors bytes."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from multiprocessing.connection import Listener
from pathlib import Path

import torch
from safetensors.torch import load_file

from fedllm.capabilities import check_pairings, local_loop
from fedllm.channel import Channel
from fedllm.client import Client
from fedllm.data.prepare import prepare_local_data
from fedllm.deploy.relay import recv_frame, send_frame, worker_key
from fedllm.evaluation.per_client import example_sums
from fedllm.models import build_model
from fedllm.recipe import Recipe
from fedllm.registry import CODECS, STRATEGIES, RecipeError
from fedllm.state import ClientRecord, State, save_state
from fedllm.strategies.base import RunInfo
from fedllm.threads import set_threads
from fedllm.wire import MalformedMessage, WireContext

log = logging.getLogger("fedllm")

# what a party takes from the recipe: both sides must agree on these sections exactly
SHARED = ("seed", "model", "adapter", "strategy", "codecs", "client")
SHARED_DATA = ("format", "max_length")


def recipe_digests(recipe: Recipe) -> dict[str, str]:
    """A short sha256 per recipe section a party trains with, so a mismatch names the section."""
    dump = recipe.model_dump(mode="json")
    parts = {k: dump[k] for k in SHARED} | {f"data.{k}": dump["data"][k] for k in SHARED_DATA}
    return {k: hashlib.sha256(json.dumps(v, sort_keys=True).encode()).hexdigest()[:16] for k, v in parts.items()}


def mismatch(ours: dict, theirs: dict) -> str | None:
    differ = sorted(k for k in ours if ours[k] != theirs.get(k))
    if not differ:
        return None
    return (f"this party's recipe differs from the server's in {', '.join(differ)}: join with the recipe the "
            "server runs (only data.path and output may differ)")


# ---- the worker --------------------------------------------------------------------------
class Party:
    """Client `client_id` of `recipe` on the examples of `data_path`; state under `state_dir`."""

    def __init__(self, recipe: Recipe, data_path: str, client_id: int, state_dir: Path, device=None,
                 eval_path: str | None = None):
        check_pairings(recipe, deployed=True)
        self.recipe, self.client_id, self.state_dir = recipe, client_id, Path(state_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer, self.model, self.adapter = build_model(recipe, self.device)
        set_threads(recipe.client.threads, self.model)  # as `fedllm run` chooses them: the same numbers
        self.count_load()
        self.params = self.adapter.trainable(self.model)
        self.template = self.adapter.state(self.model)  # what a downloaded x^t must look like
        self.examples = prepare_local_data(recipe.data, self.tokenizer, data_path)
        # the party's own held-out rows (`fedllm join --eval-data`): the server's federated eval
        self.eval_examples = prepare_local_data(recipe.data, self.tokenizer, eval_path) if eval_path else []
        self.strategy = STRATEGIES.build(recipe.strategy, "strategy")
        self.channel = Channel(self.adapter, [CODECS.build(c, f"codecs[{i}]") for i, c in enumerate(recipe.codecs)])
        self.client = Client(self.model, self.params, self.adapter, self.strategy, local_loop(recipe, self.adapter),
                             recipe.client, {client_id: self.examples}, self.tokenizer.pad_token_id, self.device, recipe.seed)
        self.digests = recipe_digests(recipe)
        self.run_info = None
        self.records = self.state_dir / "records"

    def count_load(self) -> None:
        """base_model_loads in party.json: how often this party built its base model (goal: once per run)."""
        path = self.state_dir / "party.json"
        meta = json.loads(path.read_text()) if path.exists() else {}
        meta["base_model_loads"] = meta.get("base_model_loads", 0) + 1
        self.state_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(meta))

    def identify(self) -> dict:
        return {"client_id": self.client_id, "num_samples": len(self.examples), "digests": self.digests}

    def check_job(self, job: dict, what: str = "round") -> None:
        """A message meant for this party, from a server running this party's recipe."""
        if problem := mismatch(self.digests, job["digests"]):
            raise RecipeError(problem)
        if job["client_id"] != self.client_id:
            raise RecipeError(f"the server sent client {job['client_id']}'s {what} to client {self.client_id}")

    def sizes(self, job: dict) -> dict:
        """What the server asks before round 0: how many training (and held-out) examples this party
        has. It sets the run's client sizes (DP sampling rates, local steps), as a party's weight does."""
        self.check_job(job, "size query")
        return {"num_samples": len(self.examples), "eval_examples": len(self.eval_examples)}

    def evaluate(self, job: dict, wire: bytes) -> dict:
        """The downloaded global adapter on this party's held-out examples (the first max_batches
        batches): summed response-token loss, tokens and correct predictions, for the server to pool."""
        self.check_job(job, "eval")
        x_t, _ = self.open_down(wire, self.max_down_bytes())
        size, cap = int(job["batch_size"]), job.get("max_batches")
        examples = self.eval_examples[: cap * size] if cap else self.eval_examples
        if not len(examples):
            return {"loss_sum": 0.0, "tokens": 0, "correct": 0, "examples": 0}
        self.adapter.load(self.model, x_t)
        loss_sum, tokens, correct = example_sums(self.model, examples, size, self.tokenizer.pad_token_id,
                                                 self.device).sum(0).tolist()
        return {"loss_sum": loss_sum, "tokens": int(tokens), "correct": int(correct), "examples": len(examples)}

    def max_down_bytes(self) -> int:
        return 4 * sum(t.numel() for t in self.template.values()) * 3 + 2**20  # x^t plus broadcast, fp32

    # The record a round starts from is the one the server says it accepted last (state_round):
    # a rejected upload's state does not advance, and a resumed server rolls the party back too.
    def record(self, state_round: int) -> ClientRecord:
        path = self.records / f"round_{state_round}.safetensors"
        return ClientRecord.from_flat(load_file(str(path)) if state_round >= 0 and path.exists() else None)

    def keep(self, round: int, record: ClientRecord, state_round: int) -> None:
        self.records.mkdir(parents=True, exist_ok=True)
        flat = record.to_flat()
        if flat:
            tmp = self.records / f".round_{round}.tmp"
            save_state(flat, tmp)
            os.replace(tmp, self.records / f"round_{round}.safetensors")
        for path in self.records.glob("round_*.safetensors"):  # no one will ask for these again
            if int(path.stem.split("_")[1]) < state_round:
                path.unlink()

    def open_down(self, wire: bytes, max_bytes: int) -> tuple[State, State]:
        """x^t and the broadcast, checked against this party's own model before anything loads."""
        if len(wire) > max_bytes:
            raise MalformedMessage(f"the download has {len(wire)} bytes, more than the {max_bytes} this model's state needs")
        try:
            x_t, broadcast = self.channel.open_down(wire)
        except Exception as err:  # safetensors / JSON errors on bytes that are not a message
            raise MalformedMessage(f"the download does not parse ({type(err).__name__}: {err})") from None
        for key, want in self.template.items():
            got = x_t.get(key)
            if got is None or got.shape != want.shape or got.dtype != want.dtype:
                raise MalformedMessage(f"the download's {key} is {None if got is None else (tuple(got.shape), got.dtype)}, "
                                       f"this model's is {(tuple(want.shape), want.dtype)}")
        if extra := sorted(x_t.keys() - self.template.keys()):
            raise MalformedMessage(f"the download has tensors this model lacks: {extra[:3]}")
        if not all(bool(torch.isfinite(t).all()) for t in (*x_t.values(), *broadcast.values())):
            raise MalformedMessage("the download holds NaN or Inf")
        return {k: t.to(self.device) for k, t in x_t.items()}, {k: t.to(self.device) for k, t in broadcast.items()}

    def train(self, job: dict, wire: bytes) -> tuple[dict, bytes]:
        """One local round: job = {round, lr, state_round, run_info, digests}; the upload's bytes back."""
        self.check_job(job)
        if self.run_info != job["run_info"]:  # the server's run shape (client sizes, rounds), once per run
            self.strategy.setup(RunInfo(**job["run_info"]))
            self.run_info = job["run_info"]
        x_t, broadcast = self.open_down(wire, self.max_down_bytes())
        t = job["round"]
        upload = self.client.run(self.client_id, t, x_t, broadcast, self.record(job["state_round"]), job["lr"])
        ctx = WireContext(t, self.client_id, self.recipe.seed)
        out = self.channel.encode(upload.update, upload.extras, ctx, upload.record.codecs)
        self.keep(t, upload.record, job["state_round"])
        r = upload.result
        stats = {"weight": upload.weight, "num_samples": r.num_samples, "train_loss": r.train_loss, "steps": r.steps,
                 "split_bytes_up": r.split_bytes_up, "split_bytes_down": r.split_bytes_down}
        return stats, out

    def serve(self, socket: str) -> None:
        """Answers the relay's requests until killed: one at a time, on the one resident model."""
        Path(socket).unlink(missing_ok=True)
        with Listener(socket, family="AF_UNIX", authkey=worker_key(self.state_dir)) as listener:
            os.chmod(socket, 0o600)
            log.info("party %d ready on %s (%d examples, %d held out)", self.client_id, socket, len(self.examples),
                     len(self.eval_examples))
            while True:
                try:
                    conn = listener.accept()
                except Exception as err:  # a wrong key or a broken connection: the next one may be fine
                    log.warning("refused a connection to the worker: %s", err)
                    continue
                with conn:
                    self.answer(conn)

    def answer(self, conn) -> None:
        header, payload = recv_frame(conn)
        try:
            if header["kind"] == "identify":
                send_frame(conn, {"ok": True, **self.identify()})
            elif header["kind"] == "sizes":
                send_frame(conn, {"ok": True, **self.sizes(header)})
            elif header["kind"] == "evaluate":
                send_frame(conn, {"ok": True, **self.evaluate(header, payload)})
            else:
                began = time.perf_counter()
                stats, out = self.train(header, payload)
                send_frame(conn, {"ok": True, **stats}, out)
                log.info("round %d: trained %d steps in %.1f s", header["round"] + 1, stats["steps"],  # from 1, as metrics
                         time.perf_counter() - began)
        except (MalformedMessage, RecipeError, KeyError, ValueError) as err:
            log.warning("refused the server's %s message: %s", header.get("kind"), err)
            send_frame(conn, {"ok": False, "error": f"{type(err).__name__}: {err}"})



def main(argv: list[str] | None = None) -> int:
    """`python -m fedllm.deploy.party STATE_DIR DATA CLIENT_ID [EVAL_DATA]`: the worker `fedllm join`
    starts (and starts again if it dies), on the recipe join wrote to STATE_DIR/recipe.yaml."""
    import sys

    from fedllm.errors import USER_ERRORS, describe
    from fedllm.deploy.relay import SOCKET
    from fedllm.recipe import load_recipe

    state_dir, data, client_id, *eval_data = argv if argv is not None else sys.argv[1:]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        party = Party(load_recipe(Path(state_dir) / "recipe.yaml"), data, int(client_id), Path(state_dir),
                      eval_path=eval_data[0] if eval_data else None)
        party.serve(str(Path(state_dir) / SOCKET))
    except USER_ERRORS as err:
        print(f"fedllm: error: {describe(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
