"""Ferret (arXiv 2409.06277): both halves in one folder — the client's projection onto
shared-seed random bases (`adapter`, `projections`) and the server's aggregation in
coordinate space with its compact download (`aggregate`)."""
from fedllm.adapters.ferret.adapter import Ferret

__all__ = ["Ferret"]
