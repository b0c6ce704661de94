"""One registry per plugin kind; a plugin's constructor signature is its option schema.

    @STRATEGIES.register("fedprox")
    class FedProx:
        def __init__(self, mu: float = 0.01): ...

`STRATEGIES.build({"name": "fedprox", "mu": 0.1})` validates the options against the
signature (unknown keys and wrong types are errors that name the key and the fix) and
calls the constructor with them: a plugin never sees the whole recipe.

Plugins are found through the entry-point group `fedllm.plugins`, loaded once on the first
lookup; fedllm's own packages are listed in its pyproject.toml, and another package adds
plugins the same way: `[project.entry-points."fedllm.plugins"] mine = "my_package.plugins"`.
"""
from __future__ import annotations

import difflib
import inspect
import logging
import typing
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable

import pydantic

log = logging.getLogger(__name__)


class RecipeError(ValueError):
    """A recipe (or a plugin option) that cannot be used as written."""


def nearest(word: str, choices) -> str:
    choices = list(choices)
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    match = match or [c for c in choices if word.startswith(c) or c.startswith(word)][:1]  # rank -> r
    return f"; did you mean '{match[0]}'?" if match else ""


@dataclass(frozen=True)
class Option:
    name: str
    annotation: Any
    default: Any
    required: bool

    def describe(self) -> str:
        if typing.get_origin(self.annotation) is typing.Literal:
            kind = "|".join(map(str, typing.get_args(self.annotation)))
        elif typing.get_origin(self.annotation) is typing.Union:  # Optional[float] -> float | None
            kind = " | ".join(getattr(a, "__name__", str(a)).replace("NoneType", "None") for a in typing.get_args(self.annotation))
        else:
            kind = getattr(self.annotation, "__name__", None) or str(self.annotation).replace("typing.", "")
        return f"{self.name}: {kind}" + ("  (required)" if self.required else f" = {self.default!r}")


def _options_of(factory: Callable) -> list[Option]:
    target = factory.__init__ if inspect.isclass(factory) else factory
    hints = inspect.get_annotations(target, eval_str=True)
    options = []
    for param in inspect.signature(target).parameters.values():
        if param.name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        required = param.default is inspect.Parameter.empty
        options.append(Option(param.name, hints.get(param.name, Any), None if required else param.default, required))
    return options


class PluginError(ImportError):
    """A plugin package named by an entry point that cannot be imported."""


class PluginGroup:
    """The packages of one entry-point group, imported once (importing them registers their plugins)."""

    def __init__(self, group: str):
        self.group, self.loaded, self.error = group, False, None

    def load(self) -> None:
        if self.error:
            raise PluginError(self.error)
        if self.loaded:
            return
        self.loaded = True  # before importing: a plugin that looks another up while importing must not recurse
        found = entry_points(group=self.group)
        for ep in found:
            try:
                ep.load()
            except Exception as err:  # whatever the cause, one line that names the entry point
                cause = " ".join(f"{type(err).__name__}: {err}".split())
                self.error = f"plugin entry point '{ep.name} = {ep.value}' (group '{self.group}') failed to import: {cause}"
                raise PluginError(self.error) from err
        if not found:  # e.g. an editable install made before the group existed
            self.error = (f"no plugins in the entry-point group '{self.group}': reinstall fedllm "
                          "(pip install -e .) so that its entry points are registered")
            raise PluginError(self.error)


PLUGINS = PluginGroup("fedllm.plugins")


class Registry:
    def __init__(self, kind: str, plural: str | None = None):
        self.kind, self.plural = kind, plural or f"{kind}s"
        self._factories: dict[str, Callable] = {}
        self._schemas: dict[str, type[pydantic.BaseModel]] = {}
        self._aliases: dict[str, str] = {}  # deprecated name -> registered name

    def register(self, name: str, deprecated_aliases: tuple[str, ...] = ()):
        """Registers the decorated plugin as `name`; an old name in `deprecated_aliases` still
        builds it, with a warning that names the new one (`fedllm list` shows only `name`)."""

        def decorate(factory):
            for taken in (name, *deprecated_aliases):
                if taken in self._factories or taken in self._aliases:
                    raise ValueError(f"{self.kind} '{taken}' is registered twice")
            self._factories[name] = factory
            self._aliases.update(dict.fromkeys(deprecated_aliases, name))
            return factory

        return decorate

    def names(self) -> list[str]:
        PLUGINS.load()
        return sorted(self._factories)

    def canonical(self, name: str) -> str:
        """The registered name of `name` (itself, or the new name of a deprecated alias)."""
        PLUGINS.load()
        return self._aliases.get(name, name)

    def get(self, name: str) -> Callable:
        name = self.canonical(name)
        if name not in self._factories:
            raise RecipeError(
                f"unknown {self.kind} '{name}'{nearest(name, self._factories)} "
                f"Known {self.plural}: {', '.join(self.names()) or '(none)'}."
            )
        return self._factories[name]

    def options(self, name: str) -> list[Option]:
        return _options_of(self.get(name))

    def _schema(self, name: str) -> type[pydantic.BaseModel]:
        name = self.canonical(name)
        if name not in self._schemas:
            fields = {
                o.name: (o.annotation, ... if o.required else o.default) for o in self.options(name)
            }
            self._schemas[name] = pydantic.create_model(
                f"{self.kind}_{name}_options", __config__=pydantic.ConfigDict(extra="forbid", arbitrary_types_allowed=True), **fields
            )
        return self._schemas[name]

    def validate(self, spec: dict[str, Any], where: str) -> dict[str, Any]:
        """Checks `{"name": ..., **options}` and returns the options, typed and with defaults."""
        if not isinstance(spec, dict) or "name" not in spec:
            raise RecipeError(f"'{where}' needs a 'name:' (one of: {', '.join(self.names())})")
        name = spec["name"]
        self.get(name)
        if self.canonical(name) != name:
            log.warning(f"{where}: {self.kind} '{name}' is deprecated; use its new name '{self.canonical(name)}'")
        options = {k: v for k, v in spec.items() if k != "name"}
        try:
            validated = self._schema(name)(**options)
        except pydantic.ValidationError as err:
            valid = [o.name for o in self.options(name)]
            raise RecipeError(explain_validation_error(err, where, {(): valid})) from None
        return {k: getattr(validated, k) for k in type(validated).model_fields}

    def build(self, spec: dict[str, Any], where: str | None = None, **context):
        """Validates the spec and constructs the plugin; `context` are extra constructor args
        the engine supplies (never recipe keys)."""
        options = self.validate(spec, where or self.kind)
        return self.get(spec["name"])(**options, **context)

    def describe(self, note: Callable[[Callable], str] | None = None) -> str:
        """Each plugin with its docstring's first paragraph on one line (+ `note(factory)`) and its options."""
        lines = []
        for name in self.names():
            doc = " ".join((inspect.getdoc(self._factories[name]) or "").split("\n\n")[0].split())
            extra = f" [{note(self._factories[name])}]" if note else ""
            lines.append(f"  {name}: {doc}{extra}".rstrip())
            for option in self.options(name):
                lines.append(f"      {option.describe()}")
        return "\n".join(lines)


def explain_validation_error(err: pydantic.ValidationError, where: str, valid_keys: dict[tuple, list[str]]) -> str:
    """Turns pydantic's report into lines that name the recipe key and the fix."""
    lines = []
    for e in err.errors():
        loc = tuple(str(p) for p in e["loc"])
        key = ".".join((where,) + loc) if where else ".".join(loc)
        if e["type"] == "extra_forbidden":
            valid = valid_keys.get(loc[:-1], [])
            lines.append(f"unknown key '{key}'{nearest(loc[-1], valid)} Valid keys here: {', '.join(valid)}.")
        elif e["type"] == "missing":
            lines.append(f"missing required key '{key}'.")
        else:
            lines.append(f"'{key}': {e['msg']} (got {e.get('input')!r}).")
    return "invalid recipe:\n  " + "\n  ".join(lines)


ADAPTERS = Registry("adapter")
STRATEGIES = Registry("strategy", "strategies")
CODECS = Registry("codec")
PARTITIONERS = Registry("partitioner")
SAMPLERS = Registry("sampler")
ATTACKS = Registry("attack")
STALENESS = Registry("staleness function")

ALL = {
    "adapters": ADAPTERS, "strategies": STRATEGIES, "codecs": CODECS, "partitioners": PARTITIONERS,
    "samplers": SAMPLERS, "attacks": ATTACKS, "staleness": STALENESS,
}
