"""One secure sum over Flower's SecAgg+ workflow and mod (Flower 1.42).

Weights: Flower's workflow returns the weighted MEAN of what the surviving parties sent, and
a party's weight would travel in plaintext. fedllm therefore folds each party's weight w into
its vector before masking, [(w/W)·u_1, ..., (w/W)·u_k, (w/W)·c] with W the largest weight a
party may have and c the clipping range, and declares weight 1 to Flower (max_weight 1): the
mean times the number of survivors is then Σ (w/W)·u, and the last slot carries the survivors'
total weight, which the server can check against the validated sizes.

Quantisation (Flower's quantization.py): each entry x is clipped to [−c, c] and mapped to
⌊(x + c)·T/(2c)⌉ with stochastic rounding, T = quantization_range; the sum of n parties is
dequantised as (s·2c/T) − n·c. The per-party rounding error is below one step 2c/T, so every
entry of the unmasked sum is within n·2c/T of the exact sum (`sum_bound`)."""
from __future__ import annotations

import copy
import functools
import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np

log = logging.getLogger("fedllm")
Vector = list[np.ndarray]
Party = Callable[[int], Vector]  # node id -> the party's (already weighted) vector for this round


@dataclass(frozen=True)
class SecAggOptions:
    """Flower's SecAggPlusWorkflow options (its defaults, except the two it leaves to the user).
    `num_shares`/`reconstruction_threshold`: an int is a count, a float a fraction of the parties."""

    num_shares: int | float = 1.0
    reconstruction_threshold: int | float = 0.5
    clipping_range: float = 8.0
    quantization_range: int = 2**22
    modulus_range: int = 2**32
    timeout: float | None = None


def sum_bound(parties: int, options: SecAggOptions) -> float:
    """The most an entry of the unmasked sum of `parties` uploads differs from the exact sum
    (entries within the clipping range): one quantisation step 2c/T per party."""
    return parties * 2 * options.clipping_range / options.quantization_range


def fold_weight(vector: Vector, weight: float, max_weight: float, clipping_range: float) -> Vector:
    """The party's vector with its weight folded in, and the weight slot (module docstring)."""
    if not 0 < weight <= max_weight:
        raise ValueError(f"a party's weight {weight} must be in (0, {max_weight}]")
    share = weight / max_weight
    return [np.asarray(v, dtype=np.float64) * share for v in vector] + [np.array([share * clipping_range])]


def unfold_weight(summed: Vector, max_weight: float, clipping_range: float) -> tuple[Vector, float]:
    """(Σ (w/W)·u per tensor, Σ w) from an unmasked sum of folded vectors."""
    return summed[:-1], float(summed[-1][0]) / clipping_range * max_weight


def _set_task_identity() -> None:
    """Flower stamps messages with the task's identity; an in-process run has none of its own."""
    from flwr.supercore.task_identity import TaskIdentity

    for field, value in (("task_id", 1), ("run_id", 1), ("node_id", 1)):
        try:
            getattr(TaskIdentity, field)
        except RuntimeError:
            setattr(TaskIdentity, field, value)


def party_app(vector_of: Party):
    """A ClientApp behind Flower's secaggplus_mod whose `train` returns the party's vector as
    the FitRes the mod masks (weight 1: folded in already)."""
    from flwr.app import Message
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    app = ClientApp(mods=[secaggplus_mod])

    @app.train()
    def train(message, context):
        fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(vector_of(message.metadata.dst_node_id)), 1, {})
        return Message(fitres_to_recorddict(fitres, False), reply_to=message)

    return app


class InProcessGrid:
    """The parties of a simulated secure round, in this process: each message is deep-copied
    (the mod edits what it receives) and handed to its party's app. `drop`: (node id, stage)
    -> True to simulate a party that stops answering at that stage."""

    def __init__(self, app, node_ids: list[int], drop: Callable[[int, str], bool] = lambda node, stage: False):
        from flwr.app import Context, RecordDict

        self.app, self.drop, self.sent = app, drop, 0
        self.contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in node_ids}

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

        replies = []
        for message in messages:
            message = copy.deepcopy(message)
            node = message.metadata.dst_node_id
            stage = message.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE)
            self.sent += 1
            message.metadata.__dict__["_message_id"] = f"{node}-{stage}-{self.sent}"
            if self.drop(node, stage):
                continue
            try:
                replies.append(self.app(message, self.contexts[node]))
            except Exception as err:  # a party whose mod fails sends no reply, as a failed ClientApp in deployment
                log.warning("secure aggregation: node %d failed at stage %s (%s: %s)", node, stage, type(err).__name__, err)
        return replies


def run_workflow(grid, node_ids: list[int], options: SecAggOptions, round: int) -> tuple[list[int], Vector] | None:
    """One SecAgg+ round of Flower's workflow over `grid` to `node_ids`: (the surviving node ids,
    the unmasked SUM of their vectors), or None where the workflow halted (too few parties left
    at a stage, or a drop before masking: Flower then ends the round; the caller retries)."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
    from flwr.common import FitIns, Parameters, parameters_to_ndarrays
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow

    _set_task_identity()
    got = {}
    strategy = _shim_class()(node_ids, got, FitIns(Parameters([], ""), {}))
    context = LegacyContext(Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            strategy=strategy)
    context.state.config_records["config"] = ConfigRecord({"current_round": round + 1})
    context.state.array_records["parameters"] = ArrayRecord()
    workflow = SecAggPlusWorkflow(options.num_shares, options.reconstruction_threshold, max_weight=1.0,
                                  clipping_range=options.clipping_range, quantization_range=options.quantization_range,
                                  modulus_range=options.modulus_range, timeout=options.timeout)
    workflow(grid, context)
    if "results" not in got:
        return None
    alive = sorted(proxy.node_id for proxy, _ in got["results"])
    mean = parameters_to_ndarrays(got["results"][0][1].parameters)
    return alive, [m * len(alive) for m in mean]


def secure_sum(vectors: dict[int, Vector], options: SecAggOptions, round: int = 0,
               drop: Callable[[int, str], bool] = lambda node, stage: False) -> tuple[list[int], Vector] | None:
    """The SecAgg+ sum of the parties' vectors (node id -> vector, weights folded in), run
    in-process with Flower's real workflow and mod (see run_workflow)."""
    nodes = sorted(vectors)
    return run_workflow(InProcessGrid(party_app(vectors.__getitem__), nodes, drop), nodes, options, round)


@functools.cache
def _shim_class():
    """The proxy and strategy classes, built once on first use (flwr is imported only when needed)."""
    from flwr.server.client_proxy import ClientProxy
    from flwr.server.strategy import Strategy

    class NodeProxy(ClientProxy):
        """The workflow reads only a proxy's node id."""

        def __init__(self, node_id: int):
            super().__init__(str(node_id))
            self.node_id = node_id

        def get_properties(self, *args):
            raise NotImplementedError

        get_parameters = fit = evaluate = reconnect = get_properties

    class Shim(Strategy):
        """The two calls SecAggPlusWorkflow makes of a Flower strategy: whom to send the round
        (`configure_fit`) and what to do with the unmasked result (`aggregate_fit`: keep it)."""

        def __init__(self, node_ids: list[int], got: dict, fit_ins):
            self.node_ids, self.got, self.fit_ins = node_ids, got, fit_ins

        def initialize_parameters(self, client_manager):
            return None

        def configure_fit(self, server_round, parameters, client_manager):
            return [(NodeProxy(n), self.fit_ins) for n in self.node_ids]

        def aggregate_fit(self, server_round, results, failures):
            self.got["results"] = results
            return results[0][1].parameters if results else None, {}

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            return None

    return Shim

