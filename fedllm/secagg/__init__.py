"""Secure aggregation (SecAgg+, Bell et al. 2020) as Flower implements it: each party's
weighted upload is quantised to integers, masked with pairwise and self masks, and the server
unmasks only the sum of the round's surviving parties. fedllm writes none of the protocol: it
drives Flower's `SecAggPlusWorkflow` and wraps its parties in Flower's `secaggplus_mod`
(`protocol.py`); the same code runs in-process for a simulation (`InProcessGrid`), so a
simulated and a deployed secure round do the same arithmetic. Needs the `flower` extra.
Plan and Flower references: ../shared/SECAGG_PLAN.md."""
