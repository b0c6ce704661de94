"""lm-evaluation-harness (optional extra)."""
