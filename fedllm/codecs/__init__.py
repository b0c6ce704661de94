"""Codecs transform a message on the wire (compression, privacy). Each registers in
`fedllm.registry.CODECS` and has `encode(message, ctx) -> message` and
`decode(message, ctx) -> message`; the recipe's `codecs:` list chains them in order."""
from fedllm.codecs import cast, fedzip, qsgd, rqm, topk  # noqa: F401  registers the built-in codecs
