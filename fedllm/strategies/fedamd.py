"""FedAMD — Wu et al., "Anchor Sampling for Federated Learning with Partial Client
Participation" (ICML 2023), in the form of the authors' code (HarliWu/FedAMD:
main_fmnist.py, algo/fedamd.py).

Each sampled client is, with probability p, an *anchor*: it does not train, it computes the
large-batch gradient g_i of its whole local data at x^t and refreshes its row of the server's
gradient table. The others are *miners*: starting from d_0 = mean_N g_j (the table mean) they
run the SARAH-style recursion on each batch ξ_k

    d_k = d_{k−1} + ∇f_i(w_k; ξ_k) − ∇f_i(w_{k−1}; ξ_k),     w_{k+1} = w_k − η_l d_k

(the first step uses d_0 as is). The server moves with the miners only:
x ← x − η_g · mean_miners (w_0 − w_K) = x + η_g · mean_miners Δ_i. With p = 1 every client is
an anchor and the model never moves (the code's `pr ≥ 1` schedule with period 1).

Where the table lives: row g_i in client i's entry of the client store (server-held and
checkpointed, like SCAFFOLD's c_i); the server state keeps the mean (1/N) Σ_j g_j, advanced
by the anchors' uploaded row changes g_i⁺ − g_i. The code first fills the table with every
client's gradient at x^0; here rows start at 0 and fill as clients are drawn as anchors.

The anchor/miner draw depends only on (seed, round, client) — the hooks must know it before
training (`num_steps` = 0 for anchors) and every rank must draw the same.
"""
from __future__ import annotations

import numpy as np
import torch

from fedllm.registry import STRATEGIES
from fedllm.seeds import derive
from fedllm.strategies.base import ClientHooks, RoundInfo, State, Strategy, strip_prefix, with_prefix
from fedllm.strategies.scaffold import float_zeros, on_params, stepped

ROW, TABLE_MEAN, ROW_CHANGE, MINER = "g.", "table_mean.", "dg.", "miner"


def is_anchor(p: float, seed: int, round: int, client_id: int) -> bool:
    if client_id < 0 or p <= 0:  # client −1: the engine's shape template, a miner
        return False
    return p >= 1 or bool(np.random.default_rng(derive(seed, round, client_id, tag="fedamd-anchor")).random() < p)


class AnchorHooks(ClientHooks):
    """No local step; uploads the change of its table row to the gradient at x^t."""

    def num_steps(self, default: int) -> int:
        return 0

    def begin(self, params, ctx):
        self.old = on_params(strip_prefix(ctx.client_state, ROW), params)
        self.new = on_params(ctx.gradient(None), params)  # ∇ of the mean loss on all local data

    def finish(self, params, update):
        change = {k: self.new[k] - self.old[k] for k in self.new}
        return {**with_prefix(change, ROW_CHANGE), MINER: torch.zeros(1)}, with_prefix(self.new, ROW)


class MinerHooks(ClientHooks):
    """SARAH recursion: the step direction is d_k, built from two gradients per batch."""

    @torch.no_grad()
    def begin(self, params, ctx):
        self.stored = ctx.client_state  # unchanged: a miner's row stays as it was
        self.d = on_params(strip_prefix(ctx.broadcast, TABLE_MEAN), params)
        self.previous = None  # w_{k−1}; None on the first step (d_0 is used as is)

    @torch.no_grad()
    def before_step(self, params, regrad):
        now = self.grads(params)
        current = {k: p.detach().clone() for k, p in params.items()}
        if self.previous is not None:
            for k, p in params.items():
                p.copy_(self.previous[k])
            with torch.enable_grad():
                regrad()  # ∇f(w_{k−1}; ξ_k): the same batch at the previous iterate
            before = self.grads(params)
            for k, p in params.items():
                p.copy_(current[k])
                self.d[k] += now[k] - before[k]
        self.previous = current
        for k, p in params.items():
            p.grad = self.d[k].to(p.dtype).clone()

    def grads(self, params) -> State:
        return {k: (p.grad if p.grad is not None else torch.zeros_like(p)).to(self.d[k].dtype).clone() for k, p in params.items()}

    def finish(self, params, update):
        zeros = {k: torch.zeros_like(t) for k, t in self.d.items()}
        return {**with_prefix(zeros, ROW_CHANGE), MINER: torch.ones(1)}, self.stored or None


@STRATEGIES.register("fedamd")
class FedAMD(Strategy):
    """FedAMD: anchors (prob. p) send large-batch gradients, miners run SARAH from their mean."""
    local_optimizer = "sgd"  # the SARAH direction is the step itself (Wu et al. 2023, Alg. 1)

    uniform_weights = True  # the code averages miners and table rows unweighted
    counts_in_extras = True  # the mean of the 0/1 miner flags × |S| counts the round's miners
    client_needs = frozenset({"regrad", "full_gradient", "variable_steps"})  # SARAH's regrad; anchors: 0 steps, ∇ at x^t

    def __init__(self, anchor_prob: float = 0.2, server_lr: float = 1.0, seed: int = 0):
        # defaults: the code's --pr 0.2 and --lr-global 1.0
        if not 0 <= anchor_prob <= 1:
            raise ValueError(f"fedamd: anchor_prob must be in [0, 1], got {anchor_prob}")
        if server_lr <= 0:
            raise ValueError("fedamd: server_lr must be > 0")
        self.p, self.server_lr, self.seed = anchor_prob, server_lr, seed

    def init(self, global_state: State) -> State:
        return with_prefix(float_zeros(global_state), TABLE_MEAN)

    def broadcast(self, server_state: State) -> State:
        return dict(server_state)

    def client_hooks(self, round: int, client_id: int):
        return AnchorHooks() if is_anchor(self.p, self.seed, round, client_id) else MinerHooks()

    def extras_like(self, global_state: State) -> State:
        return {**with_prefix(float_zeros(global_state), ROW_CHANGE), MINER: torch.zeros(1)}

    def aggregate(self, global_state: State, mean_update: State, server_state: State, info: RoundInfo):
        delta, extras = mean_update.delta, mean_update.extras
        sampled = len(info.clients)
        # the mean of the 0/1 miner flags times |S| counts the miners; anchors sent Δ = 0
        miners = round(float(extras[MINER]) * sampled)
        rows = strip_prefix(extras, ROW_CHANGE)
        table_mean = stepped(strip_prefix(server_state, TABLE_MEAN), rows, sampled / info.num_clients)
        new_global = stepped(global_state, delta, self.server_lr * sampled / miners) if miners else global_state
        return new_global, with_prefix(table_mean, TABLE_MEAN)
