"""What data preparation kept of each split and why it dropped the rest: token-length
percentiles, and a loud warning when `data.max_length` cuts away more than a small share."""
from __future__ import annotations

import math
from array import array
from dataclasses import dataclass
from typing import Iterable, Sequence

from fedllm.data.tokenize import Lengths
from fedllm.registry import RecipeError

WARN_SHARE = 0.05  # dropped or truncated rows past this share of a split get a warning
KEEP_SHARE = 0.95  # the advice names the max_length that keeps this share of rows whole


def percentile(values: list[int], q: float) -> int:
    """The smallest value with at least q of `values` at or below it (0 for none)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else 0


def spread(values: list[int]) -> str:
    return f"p50 {percentile(values, 0.5)} / p95 {percentile(values, 0.95)} / max {max(values, default=0)}"


def share(part: int, whole: int) -> str:
    return f"{part} of {whole} ({100 * part / whole:.0f}%)" if whole else "0"


class LengthTable:
    """Many rows' `Lengths` in one array of C ints, 16 bytes a row (a tuple of Python ints
    takes ~100): a split's report lives as long as its data."""

    WIDTH = len(Lengths._fields)

    def __init__(self, lengths: Iterable[Lengths] = ()):
        self._flat = array("i")
        self.extend(lengths)

    @classmethod
    def from_bytes(cls, flat: bytes) -> LengthTable:
        """The table whose `flat` bytes these are."""
        table = cls()
        table._flat.frombytes(flat)
        return table

    @property
    def flat(self) -> array:
        """Every row's fields end to end, as C ints."""
        return self._flat

    def extend(self, lengths: Iterable[Lengths]) -> None:
        for x in lengths:
            self._flat.extend(x)

    def __len__(self) -> int:
        return len(self._flat) // self.WIDTH

    def __getitem__(self, i: int) -> Lengths:
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        start = (i % len(self)) * self.WIDTH
        prompt, response, kept, empty = self._flat[start : start + self.WIDTH]
        return Lengths(prompt, response, kept, bool(empty))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __eq__(self, other) -> bool:
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))


@dataclass
class SplitReport:
    split: str  # "train" or "eval"
    max_length: int
    lengths: Sequence[Lengths]  # a list, or a LengthTable

    @property
    def empty(self) -> int:
        return sum(x.empty for x in self.lengths)

    @property
    def too_long(self) -> int:
        """Rows whose prompt leaves no room for a single response token."""
        return sum(not x.empty and x.kept == 0 for x in self.lengths)

    @property
    def truncated(self) -> int:
        """Kept rows that train on only the start of their response."""
        return sum(not x.empty and 0 < x.kept < x.response for x in self.lengths)

    @property
    def kept(self) -> int:
        return len(self.lengths) - self.empty - self.too_long

    def whole_length(self) -> int:
        """The max_length that would keep KEEP_SHARE of the rows whole (prompt and response)."""
        return percentile([x.prompt + x.response for x in self.lengths if not x.empty], KEEP_SHARE)

    def summary(self) -> str:
        n, dropped = len(self.lengths), len(self.lengths) - self.kept
        reasons = [f"{k} {why}" for k, why in ((self.too_long, f"with a prompt of data.max_length={self.max_length} tokens "
                                                "or more"), (self.empty, "with an empty response")) if k]
        return (f"data: {self.split} split: {n} rows, {self.kept} kept, {dropped} dropped"
                f"{' (' + ', '.join(reasons) + ')' if reasons else ''}, {self.truncated} with a truncated response; "
                f"prompt tokens {spread([x.prompt for x in self.lengths])}, "
                f"response tokens {spread([x.response for x in self.lengths if not x.empty])}")

    def warning(self) -> str | None:
        n, problems = len(self.lengths), []
        if self.too_long + self.truncated > WARN_SHARE * n:
            cut = [f"{share(self.too_long, n)} {self.split} rows are DROPPED (their prompt fills data.max_length="
                   f"{self.max_length})"] if self.too_long else []
            cut += [f"{share(self.truncated, n)} {self.split} rows keep only the start of their response"] if self.truncated else []
            problems.append(f"{' and '.join(cut)}; data.max_length={self.whole_length()} would keep {KEEP_SHARE:.0%} of "
                            f"them whole (raise it from {self.max_length}, or shorten the prompts)")
        if self.empty > WARN_SHARE * n:
            problems.append(f"{share(self.empty, n)} {self.split} rows have an empty response and are dropped")
        return "data: " + "; ".join(problems) if problems else None

    def check(self) -> None:
        """A split whose every response is empty cannot train anything: an error, not a silent run."""
        if self.lengths and self.empty == len(self.lengths):
            raise RecipeError(f"every one of the {len(self.lengths)} {self.split} rows has an empty response: check "
                              "data.format and the response column of your data")
        if self.lengths and self.kept == 0:
            raise RecipeError(f"every one of the {len(self.lengths)} {self.split} rows was dropped: their prompts take "
                              f"{spread([x.prompt for x in self.lengths])} tokens, data.max_length is {self.max_length}; "
                              f"raise it (to {self.whole_length()} to keep 95% of the rows whole) or shorten the prompts")
