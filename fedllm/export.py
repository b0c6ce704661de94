"""Writing a run's global adapter: PEFT format where the update is one, else merged weights."""
from __future__ import annotations

from pathlib import Path

from fedllm.adapters.base import Adapter
from fedllm.models import build_model
from fedllm.recipe import load_recipe, refuse_remote_code
from fedllm.registry import ADAPTERS, RecipeError
from fedllm.state import State, checkpoint_dirs, read_checkpoint, verify_checkpoint


def write_export(adapter: Adapter, model, tokenizer, global_state: State, out: Path, fmt: str = "peft") -> None:
    adapter.load(model, {k: t.to(next(model.parameters()).device) for k, t in global_state.items()})
    adapter.export(model, str(out), fmt)
    tokenizer.save_pretrained(str(out))


def export_run(run_dir: str, out: str, round: str = "last", fmt: str | None = None, trust_remote_code: bool = False) -> Path:
    """Writes the global adapter of a checkpointed round (`peft`) or the merged model (`merged`)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no such directory: {run_dir} (give the run directory `fedllm run` printed)")
    done = {int(p.name.split("_")[1]): p for p in checkpoint_dirs(run_dir)}
    if not done:
        raise FileNotFoundError(f"{run_dir} has no checkpoint to export")
    recipe = load_recipe(run_dir / "recipe.yaml")
    refuse_remote_code(recipe, run_dir / "recipe.yaml", trust_remote_code)
    formats = ADAPTERS.build(recipe.adapter, "adapter").export_formats
    if fmt is not None and fmt not in formats:
        raise RecipeError(f"adapter '{recipe.adapter['name']}' cannot be exported as {fmt}: it exports "
                          f"{' or '.join(formats)} (use --to {formats[0]})")
    wanted = max(done) if round == "last" else int(round)
    if wanted not in done:
        raise FileNotFoundError(f"no checkpoint of round {wanted} in {run_dir}; available: {sorted(done)}")
    if problem := verify_checkpoint(done[wanted]):
        raise OSError(f"{done[wanted]} is damaged: {problem}; export another round with --round "
                         f"(available: {sorted(done)})")
    tokenizer, model, adapter = build_model(recipe)
    parts, _ = read_checkpoint(done[wanted])
    write_export(adapter, model, tokenizer, parts["global"], Path(out), fmt or adapter.export_formats[0])
    return Path(out)
