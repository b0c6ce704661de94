"""Completions for held-out prompts beside their references: greedy, or sampled with a seed
(every batch draws from its own stream, so the output depends only on the seed and the batch
size). Batched with left padding."""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from fedllm.data import IGNORE_INDEX
from fedllm.seeds import derive


def prompt_and_reference(example: dict) -> tuple[list[int], list[int]]:
    """The tokens before the first scored one (the prompt) and the first run of scored tokens
    (the reference response; for a chat, the first assistant turn)."""
    labels = example["labels"]
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    end = next((i for i in range(first, len(labels)) if labels[i] == IGNORE_INDEX), len(labels))
    return example["input_ids"][:first], example["input_ids"][first:end]


def _left_padded(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids, mask


@torch.no_grad()
def complete(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 64, batch_size: int = 8,
             sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
             progress: bool = True, desc: str = "generating") -> list[str]:
    """The decoded continuation of every prompt (stopping at the tokenizer's end-of-sequence)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    batches = range(0, len(prompts), batch_size)
    for number, start in enumerate(tqdm(batches, desc=desc, disable=not progress, leave=False)):
        ids, mask = _left_padded(prompts[start : start + batch_size], tokenizer.pad_token_id)
        options = {"do_sample": True, "temperature": temperature, "top_p": top_p} if sample else {"do_sample": False}
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(derive(seed, number, tag="generate"))
            generated = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **options,
            )
        for row in generated[:, ids.shape[1]:].tolist():
            out.append(tokenizer.decode(row, skip_special_tokens=True))
    return out
