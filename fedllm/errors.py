"""The failures a user can cause and fix (a recipe, a path, a damaged file, a full disk), and
the one line each is reported in: every command (fedllm's CLI, a party's worker) says them
the same way, the traceback only with --debug."""
from __future__ import annotations

import errno

from safetensors import SafetensorError

from fedllm.registry import PluginError, RecipeError

USER_ERRORS = (RecipeError, PluginError, OSError, ValueError, SafetensorError)


def describe(err: Exception) -> str:
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        where = err.strerror if "checkpoint of round" in (err.strerror or "") else \
            f"no space left on the device while writing {err.filename or 'the run directory'}"
        return f"{where}: free some space and continue with `fedllm resume`"
    if isinstance(err, SafetensorError):
        return f"a tensor file does not read back ({err}): it is damaged"
    text = str(err).strip() or type(err).__name__
    return text if isinstance(err, (RecipeError, PluginError, OSError)) else f"{text} (--debug shows where)"
