"""YAML recipe -> typed config. One file is the single source of truth; `a.b=value` overrides
use dotted paths. Unknown keys are errors naming the valid keys and the nearest match."""
from __future__ import annotations

import logging
import typing
from pathlib import Path
from typing import Any, Literal, Optional, Union

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field

from fedllm.registry import ALL, RecipeError, explain_validation_error

log = logging.getLogger("fedllm")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


Plugin = dict[str, Any]  # {"name": ..., **that plugin's own options}, checked against the registry


DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's (fedllm.placement)


class ModelConfig(Section):
    name: str = "tiny-llama"  # hub id, local path, or a built-in preset (fedllm list)
    revision: Optional[str] = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    quantization: Literal["none", "4bit", "8bit"] = "none"
    # 4bit's BitsAndBytesConfig (transformers' names); the defaults are QLoRA's
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None  # None: dtype, bfloat16 for float32
    trust_remote_code: bool = False
    # one base over several devices (fedllm.placement): auto | balanced | balanced_low_0 |
    # sequential | {module: device}; max_memory caps each device ({0: 20GiB, cpu: 64GiB, disk: ...});
    # disk-offloaded weights go to offload_folder (default: a temporary folder)
    device_map: Optional[Union[str, dict[str, Union[int, str]]]] = None
    max_memory: Optional[dict[Union[int, str], Union[int, str]]] = None
    offload_folder: Optional[str] = None

    @pydantic.field_validator("device_map")
    @classmethod
    def _known_strategy(cls, value):
        if isinstance(value, str) and value not in DEVICE_MAP_STRATEGIES:
            raise ValueError(f"'{value}' is none of {', '.join(DEVICE_MAP_STRATEGIES)} and no {{module: device}} map")
        return value

    @pydantic.model_validator(mode="after")
    def _placement_needs_a_map(self):
        if self.device_map is None and (self.max_memory is not None or self.offload_folder is not None):
            raise ValueError("model.max_memory and model.offload_folder place the base over devices: "
                             "set model.device_map too (e.g. auto)")
        if isinstance(self.device_map, dict) and not self.device_map:
            raise ValueError("model.device_map is an empty map: name a device for each module, or use auto")
        return self


class DataConfig(Section):
    path: str = "bundled:quickstart"  # hub dataset name, local json/jsonl/csv/parquet file or dir
    subset: Optional[str] = None  # the hub dataset's configuration name
    split: str = "train"
    format: Literal["alpaca", "dolly", "chat", "text"] = "dolly"
    max_length: int = Field(256, gt=8)
    max_samples: Optional[int] = Field(None, gt=0)
    eval_path: Optional[str] = None  # a separate eval set; else eval_fraction of `path` is held out
    eval_split: Optional[str] = None
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    partitioner: Plugin = {"name": "iid"}


FEDERATION_MODES = ("sync", "async", "buffered")  # fedllm.asynchrony


class DeviceConfig(Section):
    """Simulated client devices (fedllm.devices): each client's speed, drawn once from the
    recipe seed, turns a local round's tokens into simulated seconds; its links turn its
    messages' bytes into seconds; its online periods decide when it can be sampled. A CSV
    (`profile: csv`) may give any of speed, online_fraction, downlink_bytes_per_s and
    uplink_bytes_per_s per client."""

    profile: Literal["equal", "uniform", "lognormal", "csv"] = "lognormal"
    sigma: float = Field(1.0, ge=0.0)  # lognormal: spread of log-speed
    low: float = Field(0.5, gt=0.0)  # uniform: speeds in [low, high]
    high: float = Field(2.0, gt=0.0)
    path: Optional[str] = None  # csv: one row per client, a column `speed` (relative)
    tokens_per_second: float = Field(1000.0, gt=0.0)  # of a speed-1 device
    slow_fraction: float = Field(0.0, ge=0.0, lt=1.0)  # the last ⌈f·N⌉ clients are slow (Wang & Gao's setting)
    slow_factor: float = Field(10.0, ge=1.0)  # ... this many times slower
    # availability: each client alternates online and offline periods (exponential lengths,
    # online on average mean_online_s); online_fraction is the long-run share of time online
    online_fraction: float = Field(1.0, gt=0.0, le=1.0)
    mean_online_s: float = Field(600.0, gt=0.0)
    # links: a client-round lasts download bytes / downlink + compute + upload bytes / uplink
    # (the channel's real message bytes); None: transfers take no simulated time
    downlink_bytes_per_s: Optional[float] = Field(None, gt=0.0)
    uplink_bytes_per_s: Optional[float] = Field(None, gt=0.0)


class FederationConfig(Section):
    rounds: int = Field(10, gt=0)
    num_clients: int = Field(10, gt=0)
    clients_per_round: Optional[int] = Field(None, gt=0)
    fraction: Optional[float] = Field(None, gt=0.0, le=1.0)
    sampler: Plugin = {"name": "uniform"}
    client_store_budget_mb: float = Field(1024.0, ge=0.0)  # per-client state spills to disk past this
    # ranks wait at most this long in a collective: a frozen or dead rank ends the job (torch's default is 30 min)
    collective_timeout_s: float = Field(300.0, gt=0.0)
    # a federation deployed on Flower (`fedllm serve`): a sampled party that has not answered
    # within round_timeout_s dropped out; a round with fewer than min_clients answers waits
    # round_timeout_s again for the missing ones, up to round_retries times, then the run stops
    # (resume it when the parties are back); the first round waits join_timeout_s for every party
    round_timeout_s: float = Field(600.0, gt=0.0)
    min_clients: int = Field(1, gt=0)
    round_retries: int = Field(2, ge=0)
    join_timeout_s: float = Field(600.0, gt=0.0)
    # asynchrony (fedllm.asynchrony): a logged round is clients_per_round arrivals in every mode
    mode: Literal[FEDERATION_MODES] = "sync"
    devices: Optional[DeviceConfig] = None  # simulated speeds; needed by async and buffered
    max_concurrency: Optional[int] = Field(None, gt=0)  # clients training at once (default clients_per_round)
    buffer_size: Optional[int] = Field(None, gt=0)  # buffered: arrivals per aggregation, FedBuff's K (default clients_per_round)
    staleness: Plugin = {"name": "constant"}  # s(τ): constant | polynomial | hinge (fedllm list)
    async_mixing: float = Field(1.0, gt=0.0, le=1.0)  # async: FedAsync's α in α_t = α·s(t − τ)
    # client groups: the launched ranks form world/group_size groups, each training one client at a
    # time data parallel (ddp: the adapter's gradients averaged in the group; fsdp: also the frozen
    # base sharded over the group's ranks; zero3: partitioned by DeepSpeed ZeRO-3); see README "Scaling"
    group_size: int = Field(1, gt=0)
    group_parallel: Literal["ddp", "fsdp", "zero3"] = "ddp"
    # fsdp: `leader` builds the real base on the group's leader only, the others on the meta
    # device, and fills their shards from it; `every_rank` builds the whole base on every rank
    fsdp_load: Literal["leader", "every_rank"] = "leader"

    def sampled_per_round(self) -> int:
        if self.clients_per_round is not None and self.fraction is not None:
            raise RecipeError("set only one of 'federation.clients_per_round' and 'federation.fraction'")
        if self.clients_per_round is not None:
            k = self.clients_per_round
        elif self.fraction is not None:
            k = max(1, round(self.fraction * self.num_clients))
        else:
            k = self.num_clients
        if k > self.num_clients:
            raise RecipeError(
                f"'federation.clients_per_round' is {k} but there are only {self.num_clients} clients"
            )
        return k


class ClientConfig(Section):
    # names follow transformers.TrainingArguments where the meaning is the same
    max_steps: Optional[int] = Field(10, gt=0)  # local optimizer steps per round
    num_train_epochs: Optional[float] = Field(None, gt=0)  # or local epochs per round
    per_device_train_batch_size: int = Field(4, gt=0)
    gradient_accumulation_steps: int = Field(1, gt=0)
    learning_rate: float = Field(1e-3, gt=0)
    min_learning_rate: float = Field(0.0, ge=0)  # end of the cosine schedule across rounds
    lr_scheduler_type: Literal["constant", "cosine"] = "constant"
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)  # fraction of rounds with linear warm-up
    optim: Literal["adamw", "sgd", "zo"] = "adamw"  # zo: zeroth-order (MeZO) steps, forward passes only
    zo_eps: float = Field(1e-3, gt=0)  # zo: the perturbation scale ε of the two-point estimate
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.0, ge=0, lt=1)  # sgd only
    max_grad_norm: Optional[float] = Field(1.0, gt=0)
    keep_optimizer_state: bool = False  # carry each client's optimizer moments across its rounds
    gradient_checkpointing: bool = False
    trainer: Literal["builtin", "hf"] = "builtin"  # hf: a transformers.Trainer runs each local round
    bf16: bool = False
    fp16: bool = False
    threads: Optional[int] = Field(None, gt=0)  # torch CPU threads per process; default chosen (fedllm.threads)
    fused_optimizer: bool = True  # AdamW/SGD as one fused kernel where torch has one for the device and dtype
    torch_compile: bool = False  # compile the model's forward/backward for the local steps (torch.compile)


class EvalConfig(Section):
    every: int = Field(1, ge=0)  # rounds between evaluations; 0 = only after the last round
    per_device_eval_batch_size: int = Field(8, gt=0)
    max_batches: Optional[int] = Field(None, gt=0)
    # hold out each client's own slice of its shard (instead of one pooled set) and log every
    # client's metrics and their spread; changes which rows train, so it is off by default
    per_client: bool = False


class OutputConfig(Section):
    dir: str = "runs"
    name: Optional[str] = None  # run directory name; default <recipe>-<timestamp>
    checkpoint_every: int = Field(1, ge=0)  # 0 = only the final round
    checkpoints: bool = True  # false: write no checkpoint at all (a killed run cannot resume)
    keep_last: int = Field(2, ge=0)  # checkpoints kept on disk; 0 = all
    report_to: list[Literal["tensorboard", "wandb"]] = []
    progress: bool = True

    @pydantic.field_validator("name")
    @classmethod
    def stays_inside_dir(cls, name: Optional[str]) -> Optional[str]:
        # the run directory is output.dir/name: a name may not climb out of it or replace it
        if name is not None and (not name or Path(name).is_absolute() or len(Path(name).parts) != 1 or name in (".", "..")):
            raise ValueError(f"output.name must be one plain directory name inside output.dir, got {name!r}")
        return name


class PrivacyConfig(Section):
    """The differential-privacy budget, read by the DP strategies (dp_fedavg, dp_sgd, dp_brem)
    in their set-up. Give noise_multiplier, or target_epsilon to choose it for the planned rounds."""

    target_epsilon: Optional[float] = Field(None, gt=0)  # the ε the planned rounds may spend
    noise_multiplier: Optional[float] = Field(None, gt=0)  # or the noise multiplier z (σ) itself
    delta: Optional[float] = Field(None, gt=0, lt=1)  # δ; default 1e-5
    max_epsilon: Optional[float] = Field(None, gt=0)  # stop the run before passing it (default: target_epsilon)
    accountant: Optional[Literal["rdp", "pld"]] = None  # default rdp
    noise_seed: Optional[int] = None  # reproducible noise for experiments: NOT private (default: secret noise)


class Recipe(Section):
    seed: int = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    adapter: Plugin = {"name": "lora"}
    strategy: Plugin = {"name": "fedavg"}
    codecs: list[Plugin] = []
    byzantine: Optional[Plugin] = None  # simulated attackers: {name: <attack>, ...} (experiments only)
    federation: FederationConfig = FederationConfig()
    client: ClientConfig = ClientConfig()
    eval: EvalConfig = EvalConfig()
    privacy: Optional[PrivacyConfig] = None
    output: OutputConfig = OutputConfig()

    def check_plugins(self) -> "Recipe":
        """Validates every plugin section against its registry; fills in their defaults."""
        self.adapter = checked("adapters", self.adapter, "adapter")
        moved_to_privacy(self.strategy)
        self.strategy = checked("strategies", self.strategy, "strategy")
        self.codecs = [checked("codecs", c, f"codecs[{i}]") for i, c in enumerate(self.codecs)]
        if self.byzantine is not None:
            self.byzantine = checked("attacks", self.byzantine, "byzantine")
        self.data.partitioner = checked("partitioners", self.data.partitioner, "data.partitioner")
        self.federation.sampler = checked("samplers", self.federation.sampler, "federation.sampler")
        self.federation.sampled_per_round()
        self.federation.staleness = checked("staleness", self.federation.staleness, "federation.staleness")
        part, devices = self.data.partitioner, self.federation.devices
        if part["name"] == "intertwined" and (devices is None or devices.slow_fraction != part["slow_fraction"]):
            raise RecipeError(f"data.partitioner intertwined puts its categories on the last {part['slow_fraction']} of the "
                              f"clients: set federation.devices.slow_fraction={part['slow_fraction']} to make them the slow ones")
        if self.federation.mode != "sync":
            self.check_asynchrony()
        if self.privacy is not None:
            self.check_privacy()
        if self.client.max_steps is None and self.client.num_train_epochs is None:
            raise RecipeError("set 'client.max_steps' (local steps per round) or 'client.num_train_epochs'")
        if self.client.bf16 and self.client.fp16:
            raise RecipeError("set at most one of 'client.bf16' and 'client.fp16'")
        return self

    def check_asynchrony(self) -> None:
        f, mode = self.federation, self.federation.mode
        k = f.sampled_per_round()
        if f.devices is None:
            raise RecipeError(f"federation.mode={mode} needs federation.devices (e.g. {{profile: lognormal, sigma: 1.0}}): "
                              "the simulated clock orders the arrivals")
        if (f.max_concurrency or k) > f.num_clients:
            raise RecipeError(f"federation.max_concurrency is {f.max_concurrency} but there are only {f.num_clients} clients")
        if self.federation.sampler["name"] != "uniform":
            raise RecipeError(f"federation.mode={mode} draws clients from the uniform sampler; set federation.sampler.name=uniform")

    def check_privacy(self) -> None:
        # a strategy that reads the section says so with a `check_privacy(options, privacy)`;
        # any other would ignore the budget silently
        strategies = ALL["strategies"]
        check = strategies.get(self.strategy["name"]).check_privacy
        if check is None:
            readers = [n for n in strategies.names() if strategies.get(n).check_privacy is not None]
            raise RecipeError(
                f"the privacy: section is read by the DP strategies ({', '.join(readers)}); strategy "
                f"'{self.strategy['name']}' would ignore it. Use a DP strategy (e.g. strategy.name=dp_fedavg, "
                f"inner: {{name: {self.strategy['name']}}}) or remove the privacy: section"
            )
        check(self.strategy, self.privacy.model_dump())


def moved_to_privacy(strategy: dict) -> None:
    """The DP budget options moved from the DP strategies to the privacy: section: a recipe that
    still sets one on its strategy learns where it went (rather than 'unknown key')."""
    if not isinstance(strategy, dict) or not isinstance(strategy.get("name"), str):
        return  # validation says what is wrong
    own = {o.name for o in ALL["strategies"].options(strategy["name"])}
    for key in strategy:
        if key in PrivacyConfig.model_fields and key not in own:
            raise RecipeError(f"set privacy.{key} instead of strategy.{key} (the DP budget lives in the privacy: section)")


def checked(kind: str, spec: dict, where: str) -> dict:
    """A plugin section validated, with its defaults, under the plugin's current name (not a deprecated alias)."""
    options = ALL[kind].validate(spec, where)
    return {"name": ALL[kind].canonical(spec["name"]), **options}


def _valid_keys(model: type[BaseModel], prefix: tuple = ()) -> dict[tuple, list[str]]:
    keys = {prefix: list(model.model_fields)}
    for name, field in model.model_fields.items():
        for annotation in (field.annotation, *typing.get_args(field.annotation)):  # Optional[Section] too
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                keys.update(_valid_keys(annotation, prefix + (name,)))
    return keys


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecipeError(f"override '{text}' is not of the form key.path=value (e.g. federation.rounds=20)")
    key, value = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(value) if value.strip() else None


# keys `fedllm resume RUN key=value` may change: none alters what the rounds already run computed
# (federation.rounds not below the last checkpoint, and only where no schedule or budget is spread over it)
RESUMABLE = (
    "federation.rounds", "federation.collective_timeout_s", "federation.client_store_budget_mb",
    "eval.every", "eval.per_device_eval_batch_size", "eval.max_batches",
    "output.checkpoint_every", "output.checkpoints", "output.keep_last", "output.report_to", "output.progress",
    "client.threads",  # speed only (the last bits of a CPU sum may differ between thread counts)
    "privacy.max_epsilon",  # only where the run stops: spending more is the user's decision
)


def check_resume_overrides(saved: Recipe, overrides: list[str], rounds_done: int = 0) -> None:
    """Refuses, with the reason, a resume override that would make the resumed run differ from
    one uninterrupted run of the same recipe (`rounds_done`: the newest checkpoint's round)."""
    values = saved.model_dump(mode="json")
    for text in overrides:
        path, value = parse_override(text)
        key, old = ".".join(path), section_of(values, tuple(path))
        if key in ("output.dir", "output.name"):
            raise RecipeError(f"resume cannot change {key}: the run stays in the directory given to `fedllm resume`")
        if key not in RESUMABLE:
            raise RecipeError(
                f"resume cannot change {key} (the rounds already run used {old!r}; a different value would make this "
                f"run match neither recipe): start a new run with `fedllm run ... {text}`. Resume can change: "
                f"{', '.join(RESUMABLE)}")
        if key == "federation.rounds":
            check_rounds(saved, value, rounds_done)


def check_rounds(saved: Recipe, rounds, rounds_done: int) -> None:
    if not isinstance(rounds, int) or rounds < max(rounds_done, 1):
        raise RecipeError(f"resume cannot set federation.rounds={rounds}: the run has checkpointed {rounds_done} rounds "
                          "(an earlier round's adapter: `fedllm export RUN OUT --round N`)")
    c = saved.client
    if c.lr_scheduler_type != "constant" or c.warmup_ratio > 0:
        raise RecipeError("resume cannot change federation.rounds of this run: its learning-rate schedule "
                          f"(client.lr_scheduler_type={c.lr_scheduler_type}, warmup_ratio={c.warmup_ratio}) is spread "
                          "over the planned rounds, so the rounds already run would not match; start a new run")
    if saved.privacy is not None and saved.privacy.target_epsilon is not None:
        raise RecipeError("resume cannot change federation.rounds of this run: its noise was calibrated for "
                          f"privacy.target_epsilon={saved.privacy.target_epsilon} over the planned rounds; start a new run")


# the recipe sections that hold one plugin (`name:` + its options), and their registries
PLUGIN_SECTIONS = {
    ("adapter",): "adapters", ("strategy",): "strategies", ("byzantine",): "attacks",
    ("data", "partitioner"): "partitioners", ("federation", "sampler"): "samplers",
}


def switched_plugins(raw: dict, overrides: list[str]) -> list[tuple[tuple, str, set]]:
    """(section, its old plugin name, keys the command line sets in it) for each plugin
    section whose `name` an override changes."""
    paths = [parse_override(text)[0] for text in overrides]
    found = {}
    for path in paths:
        section = tuple(path[:-1])
        if section in PLUGIN_SECTIONS and path[-1] == "name" and section not in found:
            node = section_of(raw, section)
            found[section] = node.get("name") if isinstance(node, dict) else None
    return [(section, old, {p[-1] for p in paths if tuple(p[:-1]) == section}) for section, old in found.items()]


def section_of(raw: dict, section: tuple):
    node = raw
    for part in section:
        node = node.get(part) if isinstance(node, dict) else None
    return node


def drop_foreign_options(raw: dict, switched: list[tuple[tuple, str, set]]) -> None:
    """After `adapter.name=ferret` on a LoRA recipe: the old plugin's options the new one does
    not take are dropped, with a note (those it takes, and those the command line sets, stay)."""
    for section, old, explicit in switched:
        node = section_of(raw, section)
        registry = ALL[PLUGIN_SECTIONS[section]]
        if not isinstance(node, dict) or not isinstance(node.get("name"), str) or node["name"] == old:
            continue
        if registry.canonical(node["name"]) not in registry.names():
            continue  # validation names the known plugins
        takes = {o.name for o in registry.options(node["name"])}
        dropped = [k for k in node if k != "name" and k not in takes and k not in explicit]
        for key in dropped:
            del node[key]
        if dropped:
            where = ".".join(section)
            log.info("note: %s.name=%s: dropped %s's options %s (%s does not take them)", where, node["name"], old,
                     ", ".join(dropped), node["name"])


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Applies `a.b=value` overrides to the raw recipe; a plugin switched by its `name` keeps
    only the options the new plugin takes."""
    defaults = Recipe().model_dump(mode="json")
    switched = switched_plugins(raw, overrides)
    for text in overrides:
        path, value = parse_override(text)
        node, default = raw, defaults
        for part in path[:-1]:
            default = default.get(part, {}) if isinstance(default, dict) else {}
            # a section the file leaves out starts from its defaults (e.g. adapter: {name: lora})
            node = node.setdefault(part, dict(default) if isinstance(default, dict) else {})
            if not isinstance(node, dict):
                raise RecipeError(f"override '{text}': '{part}' is not a section")
        node[path[-1]] = value
    drop_foreign_options(raw, switched)
    return raw


def recipe_sections(raw: dict) -> Recipe:
    """The recipe's sections validated, its plugin sections as written (no plugin imported)."""
    try:
        return Recipe(**(raw or {}))
    except pydantic.ValidationError as err:
        raise RecipeError(explain_validation_error(err, "", _valid_keys(Recipe))) from None


def recipe_from_dict(raw: dict) -> Recipe:
    return recipe_sections(raw).check_plugins()


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    path = Path(path)
    if not path.exists():
        raise RecipeError(f"recipe file '{path}' does not exist")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {yaml_problem(path, err)}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe '{path}' must be a YAML mapping of sections")
    return recipe_from_dict(apply_overrides(raw, list(overrides)))


def yaml_problem(path: Path, err: yaml.YAMLError) -> str:
    """'file:line:column is not valid YAML: what' (PyYAML names the file `<unicode string>`)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem, context = getattr(err, "problem", None), getattr(err, "context", None)
    what = f"{problem} ({context})" if problem and context else problem or str(err).splitlines()[0]
    return f"{where} is not valid YAML: {what}"


def refuse_remote_code(recipe: Recipe, where: Path, allowed: bool) -> None:
    """A recipe found in a run directory may have been written by someone else: it runs a
    model's own code only when the command line says so."""
    if recipe.model.trust_remote_code and not allowed:
        raise RecipeError(f"{where} sets model.trust_remote_code: true; pass --trust-remote-code if you trust "
                          "the code of that model")


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
