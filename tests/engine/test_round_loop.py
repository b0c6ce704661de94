"""The engine's round stays readable on one screen: the server opens the round, the fleet's
clients train and their uploads are admitted, the server's one tail closes it (DESIGN §12)."""
import inspect

from fedllm.engine import Federation
from fedllm.fleet import LocalFleet
from fedllm.server import Round


def test_the_round_fits_on_one_screen_and_calls_each_role():
    source = inspect.getsource(Federation.run_round)
    assert len(source.splitlines()) <= 20, len(source.splitlines())
    for role in ("self.server.open(", "self.fleet.run_round(", "round.close(", "self.asynchrony.round("):
        assert role in source, role
    fleet = inspect.getsource(LocalFleet.run_round) + inspect.getsource(LocalFleet.client_round)
    fleet += inspect.getsource(LocalFleet.my_clients)  # the sampled clients, split over the client groups
    for role in ("self.participation.sampled(", "self.server.downlink(", "self.client.run(", "self.send(", "admit("):
        assert role in fleet, role
    server = inspect.getsource(Round.admit) + inspect.getsource(Round.close)
    for role in ("misfit(", ".add(client_id", "collect.finish(", "finite_or_previous("):
        assert role in server, role
