"""Imports every built-in plugin so that it is registered (and listed by `fedllm list`)."""
import fedllm.adapters  # noqa: F401
import fedllm.attacks  # noqa: F401
import fedllm.codecs  # noqa: F401
import fedllm.data.partition  # noqa: F401
import fedllm.privacy  # noqa: F401
import fedllm.samplers  # noqa: F401
import fedllm.strategies  # noqa: F401
