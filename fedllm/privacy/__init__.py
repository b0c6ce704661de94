"""Differential privacy: the accountant (dp-accounting ledgers that checkpoint as tensors)
and the private strategies — client-level DP-FedAvg, local DP-SGD, DP-BREM. The RQM codec
(`fedllm.codecs.rqm`) uses the same accountant."""
from fedllm.privacy import dp_brem, dp_fedavg, dp_sgd  # noqa: F401  registers the privacy strategies
