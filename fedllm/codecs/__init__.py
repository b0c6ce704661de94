"""Codecs transform a message on the wire (compression, privacy). Each registers in
`fedllm.registry.CODECS` and has `encode(message, ctx) -> message` and
`decode(message, ctx) -> message`; the recipe's `codecs:` list chains them in order.
A codec transforms only float tensors: integer and bool tensors (seeds, indices, counts)
pass through bit-exact and stay out of its compressed payload and its per-client state.
Every codec has a row in the contract matrix, tests/codecs/test_contract.py. `seeded` is
not a codec: bases regenerated from seeds, and the (seed, scalar) form of an update."""
from fedllm.codecs import cast, fedzip, noisy_link, qsgd, rqm, topk  # noqa: F401  registers the built-in codecs
