"""Prompt formats: one row -> spans of text, each marked trained (loss) or not (context).

`alpaca` and `dolly` give [(prompt, False), (response, True)], `text` one trained span, and
`chat` alternates: only the assistant turns are trained.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from fedllm.registry import RecipeError

Span = tuple[str, bool]  # (text, trained)

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{extra}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
# Alpaca's section headers without its 150-byte preamble: with byte-level tokenizers and
# max_length 256 the preamble would take most of the sequence.
DOLLY_WITH_CONTEXT = "### Instruction:\n{instruction}\n\n### Context:\n{extra}\n\n### Response:\n"
DOLLY_NO_CONTEXT = "### Instruction:\n{instruction}\n\n### Response:\n"


def _text(value) -> str:
    return "" if value is None else str(value).strip()


def _instruction_spans(row: dict, extra_column: str, response_column: str, with_extra: str, without_extra: str) -> list[Span]:
    instruction, extra = _text(row["instruction"]), _text(row.get(extra_column))
    prompt = with_extra.format(instruction=instruction, extra=extra) if extra else without_extra.format(instruction=instruction)
    return [(prompt, False), (_text(row[response_column]), True)]


def _alpaca(row: dict, tokenizer) -> list[Span]:
    return _instruction_spans(row, "input", "output", ALPACA_WITH_INPUT, ALPACA_NO_INPUT)


def _dolly(row: dict, tokenizer) -> list[Span]:
    return _instruction_spans(row, "context", "response", DOLLY_WITH_CONTEXT, DOLLY_NO_CONTEXT)


def _plain_text(row: dict, tokenizer) -> list[Span]:
    return [(str(row["text"]), True)]


def _render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _chat(row: dict, tokenizer) -> list[Span]:
    if not getattr(tokenizer, "chat_template", None):
        raise RecipeError("data.format=chat needs a tokenizer with a chat template; this tokenizer has none")
    messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    # Render growing prefixes of the conversation: what an assistant message adds after the
    # generation prompt is exactly the text to train on (its content + end-of-turn tokens).
    spans: list[Span] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = _render(tokenizer, messages[:i], generation_prompt=True)
        full = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not (head.startswith(done) and full.startswith(head)):
            raise RecipeError(
                "data.format=chat: the tokenizer's chat template does not render a conversation as a "
                "prefix of its continuation, so the assistant turns cannot be located"
            )
        spans += [(head[len(done):], False), (full[len(head):], True)]
        done = full
    rest = _render(tokenizer, messages, generation_prompt=False)[len(done):]
    return [s for s in spans + [(rest, False)] if s[0]]


@dataclass(frozen=True)
class Format:
    columns: tuple[str, ...]  # required; optional ones (alpaca input, dolly context) may be absent
    spans: Callable[[dict, object], list[Span]]
    templated: bool  # a chat template writes its own <bos> and end-of-turn tokens


FORMATS = {
    "alpaca": Format(("instruction", "output"), _alpaca, templated=False),
    "dolly": Format(("instruction", "response"), _dolly, templated=False),
    "chat": Format(("messages",), _chat, templated=True),
    "text": Format(("text",), _plain_text, templated=False),
}


def _guess(columns: list[str]) -> str | None:
    for name, fmt in FORMATS.items():
        if set(fmt.columns) <= set(columns):
            return name
    return None


def check_columns(columns: list[str], fmt: str) -> None:
    """Raises a RecipeError naming the missing column, the columns present and the fix."""
    missing = [c for c in FORMATS[fmt].columns if c not in columns]
    if not missing:
        return
    guess = _guess(columns)
    hint = f"; these columns look like data.format={guess}" if guess else ""
    raise RecipeError(
        f"data.format={fmt} needs a '{missing[0]}' column, but the dataset has columns: "
        f"{', '.join(columns)}{hint}. Set data.format to the format of your data "
        f"({', '.join(FORMATS)}) or rename the column to '{missing[0]}'."
    )


def to_spans(row: dict, fmt: str, tokenizer) -> list[Span]:
    """The row as (text, trained) spans in the given format."""
    return FORMATS[fmt].spans(row, tokenizer)
