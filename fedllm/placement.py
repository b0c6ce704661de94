"""One base model spread over the devices of a rank (accelerate's big-model placement).

`model.device_map` chooses where each block lives (GPUs, CPU, disk) and `model.max_memory`
caps each device. Blocks placed on "cpu" while a GPU computes, or on "disk", are offloaded:
their weights stay in CPU RAM or in an offload folder and accelerate's hooks bring them to
the execution device for each forward and drop them after. Backward needs no hook of its
own: autograd holds the loaded weights it saved until the backward pass, or, under
`client.gradient_checkpointing`, the recomputed forward calls the hooks again. The adapter's
tensors are never offloaded: they stay resident on their layer's execution device, where
the optimizer steps them."""
from __future__ import annotations

import atexit
import contextlib
import shutil
import tempfile
from pathlib import Path

import torch

from fedllm.registry import RecipeError

PLACES = ("cpu", "disk", "mps")


def is_placed(model: torch.nn.Module) -> bool:
    """Whether accelerate dispatched the model (then it must never be moved with `.to`)."""
    return getattr(model, "hf_device_map", None) is not None


def _device_key(key, where: str):
    """A device_map / max_memory device: a GPU index ("0", 0, "cuda:1") or cpu / disk / mps."""
    text = str(key).strip()
    if text in PLACES:
        return text
    index = text.removeprefix("cuda:")
    if not index.isdigit():
        raise RecipeError(f"{where}: '{key}' is no device; use a GPU index (0, 1, ...), cpu or disk")
    if int(index) >= torch.cuda.device_count():
        raise RecipeError(f"{where}: GPU {index} does not exist here ({torch.cuda.device_count()} visible); "
                          "use cpu and disk on a machine without them")
    return int(index)


def memory_budget(cfg) -> dict | None:
    """`model.max_memory` with accelerate's device keys and sizes in bytes."""
    if cfg.max_memory is None:
        return None
    from accelerate.utils import convert_file_size_to_int

    budget = {}
    for key, size in cfg.max_memory.items():
        try:
            budget[_device_key(key, "model.max_memory")] = convert_file_size_to_int(size)
        except ValueError:
            raise RecipeError(f"model.max_memory.{key}: '{size}' is no size; write e.g. 200MB or 20GiB") from None
    return budget


def rank_budget(budget: dict | None, device) -> dict | None:
    """Under several ranks, a rank places its base on its own GPU (plus CPU and disk), not
    on every GPU of the node, unless `model.max_memory` names GPUs itself."""
    import torch.distributed as dist

    several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if device is None or device.type != "cuda" or not several or any(isinstance(k, int) for k in budget or {}):
        return budget
    from accelerate.utils import get_max_memory

    free = get_max_memory()
    return {device.index: free[device.index], "cpu": free["cpu"], **(budget or {})}


def explicit_map(cfg) -> dict:
    return {module: _device_key(place, f"model.device_map.{module or '<whole model>'}")
            for module, place in cfg.device_map.items()}


def offload_folder(cfg) -> str:
    """Where disk-offloaded weights go: `model.offload_folder`, else a temporary folder
    removed when the process ends."""
    import torch.distributed as dist

    if cfg.offload_folder:
        folder = Path(cfg.offload_folder)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            folder = folder / f"rank{dist.get_rank()}"  # each rank writes its own index and weights
        folder.mkdir(parents=True, exist_ok=True)
        return str(folder)
    folder = tempfile.mkdtemp(prefix="fedllm-offload-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def check_placement(device_map: dict, cfg) -> None:
    """A budget so small that not one block fits on a compute device leaves nothing to
    run the model on: say so rather than let every forward read the whole model from disk."""
    if set(device_map.values()) <= {"disk"}:
        raise RecipeError(f"model.max_memory {cfg.max_memory} leaves no room for a single block of '{cfg.name}' "
                          "off the disk: raise the cpu (or GPU) budget to hold at least the largest layer")


def infer_map(model: torch.nn.Module, cfg, device=None) -> dict:
    """accelerate's device map for `model` under the recipe's strategy and budget."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(cfg.device_map, dict):
        device_map = explicit_map(cfg)
    else:
        budget, no_split = rank_budget(memory_budget(cfg), device), model._no_split_modules or []
        if cfg.device_map != "sequential" and torch.cuda.device_count() > 1:  # transformers' "auto" is "balanced"
            disk = {"disk": budget.pop("disk")} if budget and "disk" in budget else {}  # accelerate balances devices only
            budget = {**get_balanced_memory(model, budget, no_split_module_classes=no_split,
                                            low_zero=cfg.device_map == "balanced_low_0"), **disk}
        device_map = infer_auto_device_map(model, max_memory=budget, no_split_module_classes=no_split)
    check_placement(device_map, cfg)
    return dict(device_map)


def dispatch(model: torch.nn.Module, cfg, device=None) -> torch.nn.Module:
    """Places a model built in CPU memory (a preset) as `model.device_map` says."""
    from accelerate import dispatch_model
    from accelerate.utils import check_device_map

    device_map = infer_map(model, cfg, device)
    try:
        check_device_map(model, device_map)
    except ValueError as err:
        raise RecipeError(f"model.device_map: {str(err).splitlines()[0]} (map every module, or use auto)") from None
    folder = offload_folder(cfg) if "disk" in device_map.values() else None
    model = dispatch_model(model, device_map, offload_dir=folder)
    model.hf_device_map = device_map
    return without_tied_bookkeeping(model)


def without_tied_bookkeeping(model: torch.nn.Module) -> torch.nn.Module:
    """Drops accelerate's tied-weight pointer map from hooks whose module shares no weight:
    it reads `data_ptr()`, which tensors inside torch.func transforms (DP-SGD's per-example
    gradients) do not have, and untied weights do not need it."""
    for module in model.modules():
        hook = offloading(module)
        if hook is not None and not hook.tied_params_names:
            hook.tied_params_map = None
    return model


def from_pretrained_options(cfg, device=None) -> dict:
    """The placement keywords of `from_pretrained` (transformers calls accelerate itself)."""
    device_map = explicit_map(cfg) if isinstance(cfg.device_map, dict) else cfg.device_map
    budget = rank_budget(memory_budget(cfg), device)
    return {"device_map": device_map, "max_memory": budget, "offload_folder": offload_folder(cfg)}


def offloading(module: torch.nn.Module):
    """The module's accelerate hook when it offloads the module's own weights, else None."""
    from accelerate.hooks import AlignDevicesHook

    hook = getattr(module, "_hf_hook", None)
    return hook if isinstance(hook, AlignDevicesHook) and hook.offload else None


@contextlib.contextmanager
def resident_adapter(model: torch.nn.Module, owner: str):
    """While an adapter attaches: every offloaded weight (a meta tensor between forwards)
    reads as a zero-stride stand-in of its shape and dtype on its execution device, so that
    peft creates and initialises the adapter's tensors there, as on an unsplit model,
    instead of on "meta". The offloaded weights come back afterwards; an adapter that
    marked one of them trainable is refused (offloaded tensors are reloaded every forward,
    so an optimizer step on them would be lost)."""
    standins = []
    for module in model.modules():
        hook = offloading(module)
        for name, p in list(module._parameters.items()) if hook else ():
            if p is not None and p.device.type == "meta":
                stand = torch.zeros((), dtype=p.dtype, device=hook.execution_device).expand(p.shape)
                module._parameters[name] = torch.nn.Parameter(stand, requires_grad=False)
                standins.append((module, name, p))
    try:
        yield
    finally:
        trained = [name for module, name, _ in standins if module._parameters[name].requires_grad]
        for module, name, p in standins:
            module._parameters[name] = p
    if trained:
        raise RecipeError(f"adapter.name={owner} trains base weights that model.device_map offloads ({trained[0]}, ...); "
                          "offloaded weights cannot be trained: give model.max_memory more room or use a LoRA-type adapter")


def check_resident(params: dict[str, torch.nn.Parameter], owner: str) -> None:
    """Every trainable tensor is real and on a compute device, never on "meta"."""
    lost = [n for n, p in params.items() if p.device.type == "meta"]
    if lost:
        raise RecipeError(f"adapter.name={owner}: {len(lost)} trainable tensors ended on the meta device ({lost[0]}, ...) "
                          "through model.device_map offloading; this adapter cannot train through an offloaded base")
