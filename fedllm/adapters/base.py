"""The adapter contract: what is trainable in the ONE resident model, and how its update
travels. State is a flat `dict[str, Tensor]` keyed by parameter name, in a fixed order."""
from __future__ import annotations

import contextlib
import re
import warnings

import torch
from transformers.pytorch_utils import Conv1D

from fedllm.registry import RecipeError
from fedllm.state import State
from fedllm.wire import Message, WireContext


class Adapter:
    # True: an update travels as the trainable tensors' own values (whatever a codec then does),
    # so it may also travel as a zeroth-order client's (seed, scalar) pairs; False: the adapter
    # has a wire format of its own (Ferret's projections)
    plain_wire = True
    # False: the adapter reads or trains base weights outside their layers' forward (an
    # embedding read at attach, a full-parameter update), so it cannot run through a base
    # whose weights model.device_map offloads (fedllm.placement)
    trains_through_offload = True

    def attach(self, model: torch.nn.Module, seed: int) -> torch.nn.Module:
        """Injects the trainable parameters once; deterministic given `seed`."""
        raise NotImplementedError

    def trainable(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def prepare_local_round(self, model: torch.nn.Module) -> None:
        """Called before every local round (e.g. to re-assert frozen tensors)."""

    def assign_tiers(self, tiers, num_clients: int) -> None:
        """Called once with the simulated devices' `tiers(count) -> tier per client` (None
        without `federation.devices`), for adapters that differ per client (a rank per tier)."""

    def for_client(self, model: torch.nn.Module, params: dict[str, torch.nn.Parameter], x_t: State, client_id: int) -> State:
        """After x^t is loaded: the state this client starts from, loaded into `params` (a
        client of lower LoRA rank: its truncation, at the scale it trains with). Default x^t."""
        return x_t

    def state(self, model: torch.nn.Module) -> State:
        return {n: p.detach().clone() for n, p in self.trainable(model).items()}

    @torch.no_grad()
    def load(self, model: torch.nn.Module, state: State, params: dict[str, torch.nn.Parameter] | None = None) -> None:
        """Copies `state` into the trainable tensors (`params`: their cached dict, if known)."""
        params = self.trainable(model) if params is None else params
        if params.keys() != state.keys():
            missing, extra = params.keys() - state.keys(), state.keys() - params.keys()
            raise ValueError(f"adapter state does not fit the model: missing {sorted(missing)[:3]}, unexpected {sorted(extra)[:3]}")
        bad = next((name for name, p in params.items() if tuple(p.shape) != tuple(state[name].shape)), None)
        if bad is not None:  # copy_ would broadcast e.g. [1, 8] into [4, 8] without a word
            raise ValueError(f"adapter state does not fit the model: {bad} has shape {tuple(state[bad].shape)}, "
                             f"the model's is {tuple(params[bad].shape)}")
        for name, p in params.items():
            p.copy_(state[name])

    # The wire format of an update (upload) and of the global state (download).
    def encode(self, update: State, ctx: WireContext) -> Message:
        return Message(dict(update))

    def decode(self, message: Message, ctx: WireContext) -> State:
        return message.tensors

    def encode_global(self, state: State) -> Message:
        return Message(dict(state))

    def decode_global(self, message: Message) -> State:
        return message.tensors

    def client_download(self, state: State, client_id: int) -> State | None:
        """What `client_id` really receives of the global state where that is less than the
        shared message (a lower-rank client's factors), for the byte ledger; None: all of it."""
        return None

    def local_loop(self):
        """A local loop of the adapter's own (fedllm.training.LocalLoop) for methods whose
        local training is not a plain loop (SFPrompt's split steps); None: the recipe's."""
        return None

    def aggregation(self, strategy, seed: int):
        """The adapter's own side of aggregation and download for this strategy, or None (the
        default: every update is decoded and the strategy's collector is used). An object with
        `collector(round)` (add / finish / unchanged, as fedllm.collectors), `download_bytes(
        round, last_taken, global_state, client_id)`, and `state()` / `load_state(state)` for checkpoints
        (Ferret: the coordinate sum and the compact download)."""
        return None

    def metadata(self, model: torch.nn.Module) -> dict:
        """Facts about the adapter recorded in the run's metadata (e.g. checksums)."""
        return {}

    export_formats = ("peft", "merged")

    def export(self, model: torch.nn.Module, path: str, fmt: str = "peft") -> None:
        """`peft`: the current adapter, loadable with `PeftModel.from_pretrained(base, path)`.
        `merged`: the base weights with the update merged in (consumes the peft wrapper)."""
        if fmt == "peft":
            model.save_pretrained(path)
        elif fmt == "merged":
            model.merge_and_unload().save_pretrained(path)
        else:
            raise ValueError(f"unknown export format '{fmt}'; this adapter writes: {', '.join(self.export_formats)}")


@contextlib.contextmanager
def quiet_peft():
    """peft 0.21's PeftModel reads transformers' deprecated `is_gradient_checkpointing`: the
    same FutureWarning on every run, about code that is neither ours nor the user's."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def linear_layers(model: torch.nn.Module) -> list[str]:
    """Dotted names of the model's linear layers (torch Linear, and GPT-2's Conv1D)."""
    return [name for name, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))]


def check_targets(model: torch.nn.Module, target_modules: list[str] | str | None) -> None:
    """`adapter.target_modules` that match no linear layer (peft's rules: a list matches a name
    or its dotted suffix, a string is a full-match regex): an error listing the ones there are."""
    if target_modules is None or target_modules == "all-linear":
        return
    names = linear_layers(model)
    if isinstance(target_modules, str):
        hit = any(re.fullmatch(target_modules, n) for n in names)
    else:
        hit = any(n == t or n.endswith("." + t) for n in names for t in target_modules)
    if not hit:
        short = sorted({n.rpartition(".")[2] for n in names})
        raise RecipeError(f"adapter.target_modules={target_modules!r} matches no linear layer of the model; its linear "
                          f"layers are: {', '.join(short)} (or use target_modules: all-linear)")
