"""Spans -> token ids with completion-only labels, and the batch collator.

Each span is tokenized on its own and the pieces are concatenated, so the label mask falls
exactly on span boundaries (tokenizing the joined text could merge a token across the
prompt/response boundary). Sequences longer than `max_length` are cut on the right, as
`tokenizer(..., truncation=True)` and TRL do: the instruction at the start is what says what
to do, so it is kept. An example with no trained token left, or whose response is empty, is
dropped; `Lengths` records why, for the data report.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from fedllm.data.formats import Span

IGNORE_INDEX = -100  # the label torch's cross-entropy skips


def _adds_bos(tokenizer) -> bool:
    # Mirror the tokenizer's own habit: Llama-style tokenizers prepend <s> to plain text,
    # GPT-2-style and our byte tokenizer do not.
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id


class Lengths(NamedTuple):
    """One example's token counts before truncation, and how many trained tokens it kept."""

    prompt: int  # tokens not trained (instruction, context, template; <bos>)
    response: int  # trained tokens (the answer, <eos>)
    kept: int  # trained tokens left after truncation to max_length
    empty: bool  # the response text is empty: nothing to learn, dropped


def tokenize_examples(
    examples: list[list[Span]], tokenizer, max_length: int, add_special_tokens: bool = True
) -> list[dict | None]:
    """One dict `{input_ids, labels}` per example (labels -100 where not trained), or None
    where it has nothing to train on (an empty response, or truncation cut it away).
    `add_special_tokens` prepends <bos> (if the tokenizer does so for plain text) and appends
    a trained <eos>; chat templates write their own."""
    return tokenize_with_lengths(examples, tokenizer, max_length, add_special_tokens)[0]


def tokenize_with_lengths(
    examples: list[list[Span]], tokenizer, max_length: int, add_special_tokens: bool = True
) -> tuple[list[dict | None], list[Lengths]]:
    """`tokenize_examples`, and each example's `Lengths`."""
    add_bos = add_special_tokens and _adds_bos(tokenizer)
    add_eos = add_special_tokens and tokenizer.eos_token_id is not None
    texts = [text for spans in examples for text, _ in spans]
    # one batched call for every span of every example: the fast tokenizer runs it in parallel
    pieces = iter(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
    out, lengths = [], []
    for spans in examples:
        input_ids, labels = ([tokenizer.bos_token_id], [IGNORE_INDEX]) if add_bos else ([], [])
        for _, trained in spans:
            ids = next(pieces)
            input_ids += ids
            labels += ids if trained else [IGNORE_INDEX] * len(ids)
        if add_eos:
            input_ids.append(tokenizer.eos_token_id)
            labels.append(tokenizer.eos_token_id)
        response = sum(label != IGNORE_INDEX for label in labels)
        prompt = len(labels) - response
        input_ids, labels = input_ids[:max_length], labels[:max_length]
        kept = sum(label != IGNORE_INDEX for label in labels)
        empty = not any(text.strip() for text, trained in spans if trained)
        lengths.append(Lengths(prompt, response, kept, empty))
        out.append({"input_ids": input_ids, "labels": labels} if kept and not empty else None)
    return out, lengths


def collate(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pads a batch: `input_ids`, `attention_mask` and `labels` (-100 on padding) as
    torch.long tensors of shape (batch, longest)."""
    width = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        input_ids[row, :n] = torch.tensor(example["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
