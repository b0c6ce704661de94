"""DeepSpeed ZeRO, imported only where it is chosen: ZeRO-3 partitioning of the frozen base
inside a client group (federation.group_parallel=zero3), while it is built where it can be,
and the adapter read whole from, and written back into, a Trainer's ZeRO-2/3 engine
(FederatedCallback).

DeepSpeed's accelerator is chosen by DeepSpeed (CUDA where there is one, else its CPU
accelerator over gloo); on CPU it JIT-compiles a shared-memory collective once per machine
(a C++ compiler, cached under ~/.cache/torch_extensions)."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from fedllm.distributed import ClientGroup

# a submodule id DeepSpeed never hands out: a parameter "in use" by it is never released
HELD = -1


def config(stage: int) -> dict:
    """The smallest DeepSpeed config for a stage; the batch size is fedllm's, not DeepSpeed's."""
    return {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage}}


@contextlib.contextmanager
def partitioning(group: ClientGroup):
    """Every module constructed inside is partitioned over the group's ranks as soon as its own
    __init__ returns (DeepSpeed's zero.Init), so a rank holds its partitions plus at most the
    module being built whole, never the whole base. Tensors are created where and as the
    model's code asks (no dtype or device override), so a seeded build draws what one rank's
    does; each weight is then broadcast from the group's first rank and partitioned."""
    import deepspeed

    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())  # adopts the running process group
    with deepspeed.zero.Init(data_parallel_group=group.handle, config_dict_or_path=config(3), tensor_overrides=[]):
        yield


def build_preset(make, group: ClientGroup, dtype: torch.dtype) -> torch.nn.Module:
    """`make()` (a preset's constructor, under the caller's seed) built partitioned, with the
    weights one rank's whole build has: transformers' weight init, which each model runs in
    its post_init on empty partitions, runs instead on each module's gathered weights, in
    the same order and on CPU (where one rank draws them)."""
    from transformers import PreTrainedModel

    whole_init = PreTrainedModel.initialize_weights
    PreTrainedModel.initialize_weights = initialize_gathered
    try:
        with partitioning(group):
            model = make()
    finally:
        PreTrainedModel.initialize_weights = whole_init
    if dtype != torch.float32:
        cast_partitions_(model, dtype)
    return model


@torch.no_grad()
def initialize_gathered(model) -> None:
    """transformers' PreTrainedModel.initialize_weights (its smart_apply: children first, a
    sub-model with its own _initialize_weights) with each module's weights and its direct
    children's (which its _init_weights may touch) gathered, changed on every rank alike, and
    kept from the group's first rank on leaving."""
    import deepspeed
    from transformers import PreTrainedModel

    try:
        from transformers.initialization import guard_torch_init_functions  # transformers 5
    except ImportError:
        guard_torch_init_functions = contextlib.nullcontext

    def visit(module, owner) -> None:
        for child in module.children():
            visit(child, child if isinstance(child, PreTrainedModel) else owner)
        params = [*module.parameters(recurse=False),
                  *(p for c in module.children() if not isinstance(c, PreTrainedModel) for p in c.parameters(recurse=False))]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=0), on_cpu(params):
            owner._initialize_weights(module)

    with guard_torch_init_functions():
        visit(model, model)


@contextlib.contextmanager
def on_cpu(params: list):
    """The weights moved to CPU inside, and back after: a whole build draws its init there."""
    homes = [p.data.device for p in params]
    for p in params:
        p.data = p.data.cpu()
    yield
    for p, home in zip(params, homes):
        p.data = p.data.to(home)


@torch.no_grad()
def cast_partitions_(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """model.to(dtype) for a partitioned model: its partitions (and its unpartitioned
    buffers) cast, which a whole build drawn in float32 and then cast holds."""
    for p in model.parameters():
        if p.is_floating_point():
            if hasattr(p, "ds_tensor"):
                p.ds_tensor.data = p.ds_tensor.data.to(dtype)
            p.data = p.data.to(dtype)
    for b in model.buffers():
        if b.is_floating_point():
            b.data = b.data.to(dtype)


# a safetensors header's dtype names (https://github.com/huggingface/safetensors, format)
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def checkpoint_index(folder: Path) -> dict[str, tuple[Path, int, dict]] | None:
    """Each tensor of a safetensors checkpoint: (file, where its data starts, its header entry);
    None where the folder holds no safetensors weights (e.g. only pytorch_model.bin)."""
    files = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    if not files:
        return None
    tensors = {}
    for file in files:
        with open(file, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        tensors |= {key: (file, 8 + size, entry) for key, entry in header.items()}
    return tensors


def read_tensor(file: Path, start: int, entry: dict) -> torch.Tensor:
    """One tensor of a safetensors file, read (not memory-mapped: mapped pages a process touches
    count as its resident memory, so a mapped whole file would hold the whole base)."""
    t = torch.empty(entry["shape"], dtype=SAFETENSORS_DTYPES[entry["dtype"]])
    begin, end = entry["data_offsets"]
    with open(file, "rb") as f:
        f.seek(start + begin)
        f.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    assert t.numel() * t.element_size() == end - begin
    return t


def checkpoint_names(model: torch.nn.Module) -> dict[int, list[str]]:
    """Every parameter (tied ones once, by id) with all its names."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def loadable(empty: torch.nn.Module, index: dict | None) -> bool:
    """True when each parameter of `empty` (the structure, tied) has a tensor of its shape under
    one of its names: the checkpoint needs none of the renaming transformers may do at load."""
    if index is None:
        return False
    params = dict(empty.named_parameters(remove_duplicate=False))
    for names in checkpoint_names(empty).values():
        key = next((n for n in names if n in index), None)
        if key is None or list(index[key][2]["shape"]) != list(params[names[0]].shape):
            return False
    return True


@torch.no_grad()
def load_checkpoint(make, index: dict, group: ClientGroup) -> torch.nn.Module:
    """A checkpoint's model built partitioned (`make()`: its structure, from its config, without
    weight init) and filled one tensor at a time: each weight gathered, the group's first rank
    reading it from the files and the others receiving it, then partitioned again. So a rank
    holds its partitions plus one tensor whole (its first rank also the one it reads)."""
    import deepspeed

    try:
        from transformers.initialization import no_init_weights  # transformers 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    with no_init_weights(), partitioning(group):
        model = make()
    model.tie_weights()  # no_init_weights skips post_init's tying
    params = dict(model.named_parameters(remove_duplicate=False))
    for names in checkpoint_names(model).values():
        key = next(n for n in names if n in index)
        p = params[names[0]]
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if group.leader:
                p.data.copy_(read_tensor(*index[key]))
    for name, b in model.named_buffers():
        if name in index:  # persistent buffers are not partitioned: every rank reads its own
            b.copy_(read_tensor(*index[name]))
    return model


def partition_base(model: torch.nn.Module, trainable: dict, group: ClientGroup, device: torch.device) -> None:
    """ZeRO-3 inside a client group: every weight of the model is split into G partitions over
    the group's ranks (a base built by `build_preset` or `load_checkpoint` already is; the rest,
    the adapter at least, is split here), and DeepSpeed's module hooks all-gather a module's
    weights for its forward and backward and release them after, so each rank holds about 1/G
    of the frozen base.

    The adapter is gathered once and held whole on every rank (never released), so fedllm's own
    optimizer, strategy hooks, client state and checkpoints see plain whole tensors exactly as
    with G = 1, and its gradients are averaged in the group as in ddp mode. DeepSpeed's own
    optimizer is not used: it would own the adapter's values and moments, which are the
    client's state. (`device`: DeepSpeed places partitions on its accelerator's device.)"""
    import deepspeed
    from deepspeed.runtime.config import DeepSpeedConfig
    from deepspeed.runtime.zero.parameter_offload import DeepSpeedZeRoOffload

    deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())  # adopts the running process group
    settings = config(3)
    deepspeed.zero.Init(module=model, data_parallel_group=group.handle, config_dict_or_path=settings)
    adapter = list(trainable.values())
    for p in adapter:
        # persistent: out of the release lists once DeepSpeed has traced a step; held: also on the
        # first, traced step, where DeepSpeed releases every parameter of a module after use
        p.ds_persist = True
        p.ds_active_sub_modules.add(HELD)
    DeepSpeedZeRoOffload(model, timers=None, ds_config=DeepSpeedConfig(settings),
                                 param_persistence_threshold=0, model_persistence_threshold=0,
                                 dp_process_group=group.handle)
    adapter[0].all_gather(param_list=adapter)  # whole again, identical on every rank of the group


def whole_base(model: torch.nn.Module):
    """A context in which every weight released by partition_base is whole on every rank of its
    group (collective: each rank of the group enters it), e.g. to write merged weights."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    released = [p for p in model.parameters() if getattr(p, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE]
    return deepspeed.zero.GatheredParameters(released, enabled=bool(released))


def held_whole(trainable: dict) -> bool:
    """True when every adapter tensor is whole on this rank (what partition_base promises)."""
    return all(tuple(p.shape) == tuple(p.ds_shape) for p in trainable.values())


def resident(p: torch.nn.Parameter) -> torch.Tensor:
    """What this rank holds of a parameter: its ZeRO-3 partition when the weight is released."""
    return p.ds_tensor if getattr(p, "ds_tensor", None) is not None and p.numel() == 0 else p


# ---- a Trainer's DeepSpeed engine (accelerate's DeepSpeed plugin) ---------------------------
def stage_of(engine) -> int:
    return int(engine.zero_optimization_stage())


def gather_trainable(engine) -> dict[str, torch.Tensor]:
    """The trainable tensors of a ZeRO-2/3 engine's model, whole, on every rank, keyed by their
    names in the model (collective under ZeRO-3: every rank calls it)."""
    import deepspeed

    params = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    # ZeRO-2 keeps every weight whole on every rank (it partitions gradients and moments only)
    with deepspeed.zero.GatheredParameters(list(params.values()), enabled=stage_of(engine) == 3):
        return {n: p.detach().cpu().clone() for n, p in params.items()}


@torch.no_grad()
def scatter_trainable_(engine, state: dict[str, torch.Tensor]) -> None:
    """Writes whole trainable tensors (the same on every rank) into a ZeRO-2/3 engine: into the
    model's weights (their partitions under ZeRO-3) and into the optimizer's fp32 master copy of
    them, which the next step would otherwise copy back over the weights (collective)."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param

    params = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    stage3 = stage_of(engine) == 3
    # modifier_rank: on leaving, rank 0's whole values are partitioned to every rank
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0, enabled=stage3):
        for name, p in params.items():
            p.data.copy_(state[name].to(p.device, p.dtype))
    for name, p in params.items():
        safe_set_full_fp32_param(p, state[name].to(p.device, torch.float32))
