"""The data layer: rows -> prompt format -> completion-only tokens -> one shard per client."""
from fedllm.data.formats import FORMATS, check_columns, to_spans
from fedllm.data.loading import load_rows, take_sample
from fedllm.data.partition import ByColumn, Dirichlet, IID, QuantitySkew
from fedllm.data import intertwined  # noqa: F401  registers Wang & Gao's setting (fedllm.data.intertwined)
from fedllm.data.packed import PackedExamples
from fedllm.data.prepare import PreparedData, prepare_data
from fedllm.data.rows import Rows
from fedllm.data.tokenize import IGNORE_INDEX, collate, tokenize_examples

__all__ = [
    "FORMATS", "IGNORE_INDEX", "IID", "ByColumn", "Dirichlet", "PackedExamples", "PreparedData", "QuantitySkew", "Rows",
    "check_columns",
    "collate", "load_rows", "prepare_data", "take_sample", "to_spans", "tokenize_examples",
]
