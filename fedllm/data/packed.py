"""Tokenized examples packed into one buffer: the token ids of every example end to end in
one array of the smallest integer type the vocabulary fits (uint16 up to 65,536 tokens,
else int32), one bit per token for "trained" (its label is the token itself, else -100),
and the offsets where each example starts. A Python list holds a token in 36 bytes (a
pointer and an int object) and leaves its freed heap behind; here it takes 2 or 4 bytes
and 1/8 for its label.

`PackedExamples` is a read-only sequence of `{input_ids, labels}` dicts of Python ints,
built on access, so every consumer of a list of examples (collate, micro_batches, attacks,
generation) sees exactly what it saw before.
"""
from __future__ import annotations

from array import array

import numpy as np

IGNORE_INDEX = -100  # the label torch's cross-entropy skips (fedllm.data.tokenize)


def id_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)


class PackedExamples:
    """Examples `offsets[i]:offsets[i+1]` of the token buffer `ids` (with trained-bits `bits`)."""

    def __init__(self, ids: np.ndarray, bits: np.ndarray, offsets: np.ndarray):
        self.ids, self.bits, self.offsets = ids, bits, offsets

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def _example(self, i: int) -> dict:
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = self.ids[start:end].astype(np.int64)
        # the trained bits of tokens start..end, from the bytes that hold them
        trained = np.unpackbits(self.bits[start >> 3 : (end + 7) >> 3])[start & 7 : (start & 7) + end - start]
        return {"input_ids": ids.tolist(), "labels": np.where(trained.astype(bool), ids, IGNORE_INDEX).tolist()}

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            if step != 1:
                return [self._example(i) for i in range(start, stop, step)]
            # a view: the same buffers, a window of the offsets
            return PackedExamples(self.ids, self.bits, self.offsets[start : max(start, stop) + 1])
        i = int(index)
        if not -len(self) <= i < len(self):
            raise IndexError(f"example {index} of {len(self)}")
        return self._example(i % len(self))

    def __iter__(self):
        return (self._example(i) for i in range(len(self)))

    def __eq__(self, other) -> bool:
        try:
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        except TypeError:
            return NotImplemented

    def __repr__(self) -> str:
        return f"PackedExamples({len(self)} examples, {self.num_tokens} tokens as {self.ids.dtype}, {self.nbytes} bytes)"

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1] - self.offsets[0])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def nbytes(self) -> int:
        """Bytes held for these examples: ids, trained bits and offsets."""
        return self.num_tokens * self.ids.itemsize + (self.num_tokens + 7) // 8 + self.offsets.nbytes

    def take(self, indices) -> PackedExamples:
        """Examples `indices`, in that order, copied into buffers of their own."""
        indices = np.asarray(indices, dtype=np.int64)
        starts, ends = self.offsets[indices], self.offsets[indices + 1]
        lengths = ends - starts
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        # token positions of the picked examples, end to end
        where = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        trained = (self.bits[where >> 3] >> (7 - (where & 7))) & 1  # np.packbits puts the first token in the top bit
        return PackedExamples(self.ids[where], np.packbits(trained), offsets)


class Packer:
    """Appends examples to growing buffers, chunk by chunk. The buffers are array.array
    (one object each, their storage one malloc block that grows in place), so the many small
    objects of each chunk's tokenization are freed between chunks and pin no memory."""

    def __init__(self, vocab_size: int):
        self.dtype = id_dtype(vocab_size)
        self.ids, self.trained = array(self.dtype.char), array("b")
        self.lengths = array("q")

    def __len__(self) -> int:
        return len(self.lengths)

    def add(self, example: dict) -> None:
        self.ids.extend(example["input_ids"])  # OverflowError if an id does not fit the dtype
        self.trained.extend([label != IGNORE_INDEX for label in example["labels"]])
        self.lengths.append(len(example["input_ids"]))

    def finish(self) -> PackedExamples:
        ids = np.frombuffer(self.ids, dtype=self.dtype).copy()  # exact size (array.array over-allocates)
        bits = np.packbits(np.frombuffer(self.trained, dtype=np.int8).astype(bool))
        offsets = np.concatenate([[0], np.cumsum(np.frombuffer(self.lengths, dtype=np.int64))]).astype(np.int64)
        self.ids, self.trained, self.lengths = array(self.dtype.char), array("b"), array("q")
        return PackedExamples(ids, bits, offsets)
