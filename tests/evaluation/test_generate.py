"""Generations: greedy ignores the seed, sampling repeats under the same seed and changes with another."""

from fedllm.evaluation.generate import complete, prompt_and_reference
from fedllm.models import byte_tokenizer, load_model
from fedllm.recipe import ModelConfig


def tiny():
    tokenizer = byte_tokenizer()
    return load_model(ModelConfig(name="tiny-llama"), tokenizer, seed=0), tokenizer


def test_sampled_generations_are_deterministic_under_a_seed():
    model, tokenizer = tiny()
    prompts = [tokenizer("### Instruction:\nHow old is Ada?\n\n### Response:\n")["input_ids"],
               tokenizer("Hi")["input_ids"], tokenizer("A longer prompt, left padded")["input_ids"]]
    sample = dict(max_new_tokens=12, batch_size=2, sample=True, temperature=1.0, progress=False)
    first = complete(model, tokenizer, prompts, seed=7, **sample)
    assert complete(model, tokenizer, prompts, seed=7, **sample) == first
    assert complete(model, tokenizer, prompts, seed=8, **sample) != first
    greedy = complete(model, tokenizer, prompts, max_new_tokens=12, batch_size=2, seed=1, progress=False)
    assert complete(model, tokenizer, prompts, max_new_tokens=12, batch_size=2, seed=2, progress=False) == greedy


def test_a_batched_greedy_completion_equals_the_unbatched_one():
    model, tokenizer = tiny()
    prompts = [tokenizer("short")["input_ids"], tokenizer("a much longer prompt here")["input_ids"]]
    together = complete(model, tokenizer, prompts, max_new_tokens=10, batch_size=2, progress=False)
    alone = [complete(model, tokenizer, [p], max_new_tokens=10, batch_size=1, progress=False)[0] for p in prompts]
    assert together == alone


def test_prompt_and_reference_split_at_the_scored_tokens():
    example = {"input_ids": [1, 2, 3, 4, 5, 6, 7], "labels": [-100, -100, -100, 4, 5, -100, 7]}
    assert prompt_and_reference(example) == ([1, 2, 3], [4, 5])
