import pytest
from tokenizers import processors

from fedllm.data.formats import check_columns, to_spans
from fedllm.data.tokenize import IGNORE_INDEX, tokenize_examples
from fedllm.models import byte_tokenizer
from fedllm.registry import RecipeError

ALPACA_ROW = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
DOLLY_ROW = {
    "instruction": "Where does Ada live?",
    "context": "Ada lives in Tallis.",
    "response": "In Tallis.",
    "category": "closed_qa",
}
CHAT_ROW = {
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Capital of Valoria?"},
        {"role": "assistant", "content": "Brinmouth"},
    ]
}


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def trained_text(tok, example) -> str:
    return tok.decode([label for label in example["labels"] if label != IGNORE_INDEX])


def test_alpaca_uses_the_standard_template_with_and_without_input(tok):
    assert to_spans(ALPACA_ROW, "alpaca", tok) == [
        (
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n",
            False,
        ),
        ("5", True),
    ]
    no_input = to_spans({**ALPACA_ROW, "input": ""}, "alpaca", tok)
    assert no_input[0][0] == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nAdd the numbers.\n\n### Response:\n"
    )
    # an absent input column means the same as an empty input
    assert to_spans({"instruction": "Add the numbers.", "output": "5"}, "alpaca", tok) == no_input


def test_dolly_puts_the_context_in_its_own_section_only_when_there_is_one(tok):
    prompt, response = to_spans(DOLLY_ROW, "dolly", tok)
    assert prompt == (
        "### Instruction:\nWhere does Ada live?\n\n### Context:\nAda lives in Tallis.\n\n### Response:\n", False
    )
    assert response == ("In Tallis.", True)
    bare = to_spans({"instruction": "Name a fruit.", "response": "plum"}, "dolly", tok)
    assert bare[0][0] == "### Instruction:\nName a fruit.\n\n### Response:\n"


def test_text_format_trains_on_every_token(tok):
    (example,) = tokenize_examples([to_spans({"text": "plain words"}, "text", tok)], tok, max_length=64)
    assert example["labels"] == example["input_ids"]
    assert tok.decode(example["input_ids"]) == "plain words</s>"


def test_labels_mask_exactly_the_prompt_tokens_and_train_response_plus_eos(tok):
    spans = to_spans(DOLLY_ROW, "dolly", tok)
    (example,) = tokenize_examples([spans], tok, max_length=256)
    n_prompt = len(tok(spans[0][0])["input_ids"])
    assert example["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]
    assert example["input_ids"][-1] == tok.eos_token_id
    assert trained_text(tok, example) == "In Tallis.</s>"


def test_chat_trains_only_on_assistant_turns(tok):
    spans = to_spans(CHAT_ROW, "chat", tok)
    assert [text for text, trained in spans if trained] == ["Hello</s>", "Brinmouth</s>"]
    (example,) = tokenize_examples([spans], tok, max_length=256, add_special_tokens=False)
    assert tok.decode(example["input_ids"]) == tok.apply_chat_template(CHAT_ROW["messages"], tokenize=False)
    assert trained_text(tok, example) == "Hello</s>Brinmouth</s>"


def test_chat_needs_a_chat_template():
    plain = byte_tokenizer()
    plain.chat_template = None
    with pytest.raises(RecipeError, match="chat template"):
        to_spans(CHAT_ROW, "chat", plain)


def test_bos_is_added_when_the_tokenizer_adds_it_to_plain_text():
    bos_tok = byte_tokenizer()
    bos_tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos_tok.bos_token_id)]
    )
    (example,) = tokenize_examples([to_spans(DOLLY_ROW, "dolly", bos_tok)], bos_tok, max_length=256)
    assert example["input_ids"][0] == bos_tok.bos_token_id
    assert example["labels"][0] == IGNORE_INDEX
    plain_tok = byte_tokenizer()
    (plain,) = tokenize_examples([to_spans(DOLLY_ROW, "dolly", plain_tok)], plain_tok, max_length=256)
    assert example["input_ids"][1:] == plain["input_ids"]


def test_truncation_cuts_the_end_and_drops_examples_with_nothing_left_to_train(tok):
    spans = [("0123456789", False), ("abcdef", True)]
    cut, gone = tokenize_examples([spans, [("0123456789" * 3, False), ("abc", True)]], tok, max_length=13)
    assert tok.decode(cut["input_ids"]) == "0123456789abc"  # right-truncated, so no eos either
    assert trained_text(tok, cut) == "abc"
    assert gone is None


def test_missing_column_error_names_the_column_the_format_the_columns_and_the_fix():
    with pytest.raises(RecipeError) as err:
        check_columns(["instruction", "input", "output"], "dolly")
    message = str(err.value)
    expected = [
        "'response'", "data.format=dolly", "instruction, input, output", "look like data.format=alpaca", "rename"
    ]
    assert [part for part in expected if part not in message] == []
    check_columns(["instruction", "response", "category"], "dolly")  # context is optional
