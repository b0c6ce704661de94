"""What `fedllm eval` scores: a checkpointed round of a run (N, last, best), the run's base
(the adapter as attached, before any training: the base model itself for LoRA-family
adapters), or an exported PEFT directory on the run's base model. Loading never writes."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from fedllm.metrics import read_jsonl
from fedllm.models import build_model, load_model, load_tokenizer
from fedllm.recipe import Recipe, load_recipe, refuse_remote_code
from fedllm.registry import RecipeError
from fedllm.state import State, checkpoint_dirs, read_checkpoint


class EvalError(RecipeError):
    """Something `fedllm eval` was asked that cannot be done as asked (one line, exit 2)."""


@dataclass
class Subject:
    """The model to score, and how to switch it between the target and the base."""

    recipe: Recipe
    run_dir: Path | None  # the run it belongs to (None: a PEFT directory outside any run)
    out_dir: Path  # eval/<label>/ goes here
    label: str  # round_<n>, base, or peft-<name>
    round: int | None
    tokenizer: object = None
    model: torch.nn.Module = None
    adapter: object = None  # the run's adapter (None for a PEFT directory)
    states: dict[str, State] = field(default_factory=dict)  # "target" / "base" -> adapter state

    def use(self, which: str) -> None:
        """Puts the target's (or the base's) weights into the model."""
        if self.adapter is not None:
            device = next(self.model.parameters()).device
            self.adapter.load(self.model, {k: t.to(device) for k, t in self.states[which].items()})
        elif which == "base" or self.label == "base":
            self.model.base_model.disable_adapter_layers()
        else:
            self.model.base_model.enable_adapter_layers()

    @property
    def state(self) -> State | None:
        return self.states.get("target")

    def logged(self) -> dict:
        """The run's own metrics.jsonl row for this round (empty if none)."""
        if self.run_dir is None or self.round is None:
            return {}
        rows = [r for r in read_jsonl(self.run_dir / "metrics.jsonl") if r.get("round") == self.round]
        return rows[-1] if rows else {}


def _run_recipe(run_dir: Path, trust_remote_code: bool) -> Recipe:
    path = run_dir / "recipe.yaml"
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raw = None
    if not isinstance(raw, dict) or set(Recipe.model_fields) - set(raw):
        raise EvalError(f"{path} is damaged (not a whole recipe fedllm wrote): nothing to evaluate from")
    recipe = load_recipe(path)
    refuse_remote_code(recipe, path, trust_remote_code)
    return recipe


def pick_round(run_dir: Path, which: str) -> tuple[int, Path]:
    """The checkpoint of round N, the last one, or the one with the lowest logged eval loss."""
    done = {int(p.name.split("_")[1]): p for p in checkpoint_dirs(run_dir)}
    if not done:
        raise EvalError(f"{run_dir} has no checkpoint yet: let the run finish a round (or `fedllm resume` it), "
                        "or score the untouched base model with --base")
    if which == "last":
        return max(done), done[max(done)]
    if which == "best":
        logged = {r["round"]: r["eval_loss"] for r in read_jsonl(run_dir / "metrics.jsonl")
                  if r.get("eval_loss") is not None and r["round"] in done}
        if not logged:
            raise EvalError(f"no checkpointed round of {run_dir} has a logged eval loss (checkpoints: {sorted(done)}); "
                            "pass --round N or --round last")
        best = min(logged, key=logged.get)
        return best, done[best]
    if not which.isdigit():
        raise EvalError(f"--round must be a round number, 'last' or 'best' (got '{which}')")
    if int(which) not in done:
        raise EvalError(f"no checkpoint of round {which} in {run_dir}; available: {sorted(done)} "
                        "(output.keep_last keeps the newest ones; 0 keeps all)")
    return int(which), done[int(which)]


def _is_peft_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()


def locate(path: str, round: str = "last", base: bool = False, recipe_path: str | None = None,
           trust_remote_code: bool = False) -> Subject:
    """Where the subject lives and what it is; nothing is loaded yet."""
    path = Path(path)
    if not path.exists():
        raise EvalError(f"{path} does not exist: pass a run directory (runs/<name>) or an exported PEFT directory")
    if _is_peft_dir(path):
        run_dir = path.parent if (path.parent / "recipe.yaml").is_file() else None
        if recipe_path is None and run_dir is None:
            raise EvalError(f"{path} is a PEFT adapter outside a run directory: pass --recipe RECIPE.yaml "
                            "(the recipe it was trained with) so its base model and data are known")
        recipe = load_recipe(recipe_path) if recipe_path else _run_recipe(run_dir, trust_remote_code)
        refuse_remote_code(recipe, Path(recipe_path or run_dir / "recipe.yaml"), trust_remote_code)
        label = "base" if base else f"peft-{path.name}"
        return Subject(recipe, run_dir, run_dir or path, label, None, states={"peft_dir": path})
    if not (path / "recipe.yaml").is_file():
        raise EvalError(f"{path} is not a fedllm run directory (no recipe.yaml) nor a PEFT adapter directory "
                        "(no adapter_config.json)")
    recipe = _run_recipe(path, trust_remote_code)
    if base:
        return Subject(recipe, path, path, "base", None)
    number, _ = pick_round(path, round)
    return Subject(recipe, path, path, f"round_{number}", number)


def load(subject: Subject, device: torch.device) -> Subject:
    """Builds the run's model on `device` and puts the target's weights in."""
    recipe = subject.recipe
    peft_dir = subject.states.pop("peft_dir", None)
    if peft_dir is not None:
        from peft import PeftModel

        subject.tokenizer = load_tokenizer(recipe.model)
        base = load_model(recipe.model, subject.tokenizer, recipe.seed, device)
        subject.model = PeftModel.from_pretrained(base, str(peft_dir)).to(device)
        subject.use("base" if subject.label == "base" else "target")
        return subject
    subject.tokenizer, subject.model, subject.adapter = build_model(recipe, device)
    subject.states["base"] = subject.adapter.state(subject.model)  # as attached: round 0's global state
    if subject.round is not None:
        parts, _ = read_checkpoint(subject.run_dir / "checkpoints" / f"round_{subject.round}")
        base = subject.states["base"]
        stored = parts["global"]
        if stored.keys() != base.keys():
            raise EvalError(f"checkpoint round_{subject.round} holds other tensors than the run's adapter: "
                            "was recipe.yaml edited after the run?")
        subject.states["target"] = {k: t.to(base[k].dtype) for k, t in stored.items()}
    else:
        subject.states["target"] = subject.states["base"]
    subject.use("target")
    return subject
