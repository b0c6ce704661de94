"""Where a round's clients run (after Flower's Strategy/Grid split: the `Server` decides, a
fleet carries out). `LocalFleet`: the simulation's clients on this process's resident model,
spread over ranks and client groups. A deployment's parties: fedllm.deploy.fleet.PartiesFleet
over a transport (Flower's Grid). A fleet hands each upload to the round's `admit` as it
arrives and returns the round's `ClientRow`s; the `Server` closes the round."""
from __future__ import annotations

from typing import Callable, Protocol

from fedllm.balance import split_by_cost
from fedllm.channel import Downlink
from fedllm.client import Client, Upload
from fedllm.data import PreparedData
from fedllm.data.shared import prepare_data_once
from fedllm.distributed import ClientGroup
from fedllm.metrics import rejection_code
from fedllm.samplers import Participation
from fedllm.server import ClientRow, Round, Server, gather_rows
from fedllm.state import ClientRecord, ClientStore
from fedllm.wire import MalformedMessage

Admit = Callable[[int, object, float], "str | None"]  # (client id, decoded message, weight) -> why refused, or None


class Fleet(Protocol):
    """What a Federation asks of wherever its clients run."""

    trains_here: bool  # the clients train on this process's model (else remote parties do)

    def load_data(self, recipe, tokenizer, run_dir, device) -> PreparedData: ...

    def bind(self, server: Server, participation: Participation, store: ClientStore, client: Client | None, run_info,
             model) -> None:
        """The federation's parts a fleet works with, once they are built."""

    def run_round(self, t: int, round: Round, lr: float, progress=None) -> list[ClientRow]: ...

    def settle(self, t: int, rows: list[ClientRow]) -> None: ...

    def evaluate(self, rounds_done: int, here: Callable[[], dict]) -> dict: ...

    def run_meta(self) -> dict: ...


class LocalFleet:
    """The simulation's clients, trained one at a time on the ONE resident model; with several
    ranks each client group (G ranks, G = 1: a rank) takes its share of the sampled clients."""

    trains_here = True

    def __init__(self, group: ClientGroup, device):
        self.group, self.device = group, device
        # a sync round's clients' records before it (held until `settle`); None outside one, e.g. in
        # an asynchronous run, whose uploads wait in flight (residual: there a record advances at dispatch)
        self.replaced: dict[int, dict | None] | None = None

    def load_data(self, recipe, tokenizer, run_dir, device) -> PreparedData:
        # one rank per machine prepares the data, the machine's other ranks map its copy (fedllm.data.shared)
        return prepare_data_once(recipe.data, tokenizer, recipe.federation.num_clients, recipe.seed, recipe.eval.per_client,
                                 run_dir / "data", device)

    def bind(self, server: Server, participation: Participation, store: ClientStore, client: Client | None, run_info,
             model) -> None:
        self.server, self.participation, self.store, self.client = server, participation, store, client

    def run_round(self, t: int, round: Round, lr: float, progress=None) -> list[ClientRow]:
        """Round t on this group's share of the sampled clients; `progress` (a tqdm bar) counts local steps."""
        self.replaced = {}  # client id -> its record before this round, until the round is settled
        mine = self.my_clients(t)
        down = self.server.downlink(t, self.device, self.participation.last_round)
        rows = []
        for cid in mine:
            row = self.client_round(t, cid, down, round.admit, lr, progress)
            rows += [row] if row is not None else []
            if progress is not None and rows:
                progress.set_postfix(clients=f"{len(rows)}/{len(mine)}", loss=f"{rows[-1].train_loss:.3f}")
        return gather_rows(rows, self.device)

    def my_clients(self, t: int) -> list[int]:
        """This group's share of round t's clients: a split that evens out the groups' padded
        tokens (fedllm.balance), the same on every rank (with G = 1 a group is a rank)."""
        sampled = self.participation.sampled(t)
        if self.group.count == 1:
            return sampled
        costs = [self.client.planned_tokens(cid, t) for cid in sampled]
        return split_by_cost(sampled, costs, self.group.count)[self.group.index]

    def client_round(self, t: int, cid: int, down: Downlink, admit: Admit, lr: float, progress=None) -> ClientRow | None:
        """One client's round, from x^t to `admit`: its row; None on a client group's other
        ranks, which train with the leader but send and store nothing."""
        before = self.store.get(cid)
        upload = self.client.run(cid, t, down.x_t, down.broadcast, ClientRecord.from_flat(before), lr,
                                 on_step=progress.update if progress is not None else None)
        if not self.group.leader:
            return None
        message, size = self.send(t, cid, upload)
        rejection = admit(cid, message, upload.weight)
        del message  # summed: it must not stay alive through the next client's training
        self.keep_record(cid, upload.record, rejection is None, before)
        r = upload.result
        return ClientRow(cid, r.num_samples, r.train_loss, size + r.split_bytes_up, down.bytes_for(cid) + r.split_bytes_down,
                         rejection is None, r.steps, r.split_bytes_up, r.split_bytes_down,
                         rejection_code(rejection))

    def send(self, t: int, client_id: int, upload: Upload):
        """The upload through the channel: what the server decoded (or why it could not), and the bytes."""
        try:
            return self.server.channel.up(upload.update, upload.extras, self.server.wire_context(t, client_id),
                                          upload.record.codecs, adapter_space=self.server.own_aggregation is not None)
        except MalformedMessage as err:
            return err, err.bytes

    def keep_record(self, client_id: int, record: ClientRecord, accepted: bool, before: dict | None = None) -> None:
        flat = record.to_flat()
        if accepted and flat:  # a rejected client's state does not advance either
            if self.replaced is not None:
                self.replaced[client_id] = before
            self.store.put(client_id, flat)

    def settle(self, t: int, rows: list[ClientRow]) -> None:
        """A client whose upload was admitted but whose round's aggregate was refused keeps the
        record it had before the round: its state advances only with an applied round."""
        refused = {r.client for r in rows if not r.accepted}
        for client_id, before in self.replaced.items():
            if client_id in refused and before:
                self.store.put(client_id, before)
            elif client_id in refused:
                self.store.discard(client_id)
        self.replaced = None

    def evaluate(self, rounds_done: int, here: Callable[[], dict]) -> dict:
        return here()

    def run_meta(self) -> dict:
        return {}

