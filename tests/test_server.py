"""The server half of the round (fedllm.server), which every driver composes: admission of an
untrusted upload, the one round tail, and the one spelling of a client's row."""
import logging

import torch

from fedllm.adapters.base import Adapter
from fedllm.channel import Channel
from fedllm.collectors import AGGREGATE_NOT_FINITE
from fedllm.distributed import Reducer
from fedllm.metrics import rejection_code
from fedllm.registry import STRATEGIES
from fedllm.server import ClientRow, Server, gather_rows
from fedllm.strategies.base import Update
from fedllm.wire import Erased, MalformedMessage

CPU = torch.device("cpu")


def server(strategy: dict, w=(0.0, 0.0)) -> Server:
    built = STRATEGIES.build(strategy, "strategy")
    start = {"w": torch.tensor(w)}
    return Server(built, Channel(Adapter(), []), start, built.init(start), Reducer(CPU), num_clients=4, local_steps=1, seed=0)


def upload(*values) -> Update:
    return Update({"w": torch.tensor(values)}, {})


def test_admission_refuses_lost_malformed_misshapen_and_non_finite_uploads_with_their_reason(caplog):
    s = server({"name": "fedavg"})
    round = s.open(0, lr=0.1)
    with caplog.at_level(logging.WARNING, logger="fedllm"):
        reasons = [round.admit(0, Erased(), 1.0), round.admit(1, MalformedMessage("it does not decode"), 1.0),
                   round.admit(2, upload(1.0, 2.0, 3.0), 1.0), round.admit(3, upload(float("nan"), 0.0), 1.0),
                   round.admit(4, Update({"w": torch.tensor([1, 2])}, {}), 1.0), round.admit(5, upload(2.0, 4.0), 3.0)]
    assert reasons == ["erased", "malformed", "malformed", "non_finite", "malformed", None]
    assert "round 1: client 2 sent a malformed update (delta tensor w has shape (3,), expected (2,))" in caplog.text
    assert "client 4 sent a malformed update (delta tensor w has dtype torch.int64" in caplog.text
    rows = [ClientRow(c, accepted=r is None, rejected=rejection_code(r)) for c, r in enumerate(reasons)]
    assert round.close(rows)
    assert torch.equal(s.global_state["w"], torch.tensor([2.0, 4.0]))  # only client 5's upload, whatever its weight


def test_a_round_with_nothing_accepted_leaves_the_state_unless_the_strategy_releases_anyway(caplog):
    s = server({"name": "fedavg"}, w=(1.0, 1.0))
    with caplog.at_level(logging.WARNING, logger="fedllm"):
        assert not s.open(2, lr=0.1).close([ClientRow(0, rejected=rejection_code("non_finite"))])
    assert torch.equal(s.global_state["w"], torch.tensor([1.0, 1.0]))
    assert "round 3: no client update was accepted; the global model is unchanged" in caplog.text


def test_a_non_finite_aggregate_is_refused_and_its_accepted_rows_recorded_rejected(caplog):
    s = server({"name": "fedavg", "server_lr": 1e39}, w=(1.0, 1.0))
    round = s.open(0, lr=0.1)
    assert round.admit(0, upload(1.0, 0.0), 1.0) is None
    rows = [ClientRow(0, accepted=True), ClientRow(1, rejected=rejection_code("malformed"))]
    with caplog.at_level(logging.WARNING, logger="fedllm"):
        assert not round.close(rows, where="round 1 (server version 1)")
    assert torch.equal(s.global_state["w"], torch.tensor([1.0, 1.0]))
    assert [(r.accepted, r.rejected) for r in rows] == [(False, rejection_code(AGGREGATE_NOT_FINITE)),
                                                       (False, rejection_code("malformed"))]  # a malformed one stays so
    assert "round 1 (server version 1): the aggregate of clients [0] is not finite" in caplog.text


def test_a_row_travels_as_numbers_and_back_and_gathers_in_client_order():
    row = ClientRow(3, 12, 1.25, 400, 900, True, 5, 7, 8, 0)
    assert ClientRow.from_numbers(row.numbers()) == row and isinstance(ClientRow.from_numbers(row.numbers()).client, int)
    assert "missing" not in row.as_dict() and ClientRow(1, missing="not connected").as_dict()["missing"] == "not connected"
    assert [r.client for r in gather_rows([row, ClientRow(0), ClientRow(2)], CPU)] == [0, 2, 3]
