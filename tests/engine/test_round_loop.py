"""The engine's round stays readable on one screen: sample → down → clients → up → collect
→ aggregate, each role a call (DESIGN §10)."""
import inspect

from fedllm.engine import Federation


def test_the_round_fits_on_one_screen_and_calls_each_role():
    source = inspect.getsource(Federation.run_round)
    assert len(source.splitlines()) <= 40, len(source.splitlines())
    assert "self.aggregate(" in source  # the round's end, shared with a deployed federation's round
    source += inspect.getsource(Federation.aggregate)
    source += inspect.getsource(Federation.client_round)  # one client's path, shared with the asynchronous loop
    source += inspect.getsource(Federation.my_clients)  # the sampled clients, split over the client groups
    for role in ("self.participation.sampled(", "self.downlink(", "self.collector(", "self.client.run(",
                 "self.send(", "self.admit(", "collect.finish("):
        assert role in source, role
