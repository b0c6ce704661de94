"""The wire format: safetensors messages, and their size computed without serializing."""
import random

import pytest
import torch

from fedllm.wire import Message, deserialize, serialize, serialized_size

DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
          torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("trial", range(40))
def test_serialized_size_is_the_real_byte_count(trial):
    rng = random.Random(trial)
    tensors = {
        f"layer.{rng.randint(0, 999)}.w{i}": torch.zeros([rng.randint(0, 40) for _ in range(rng.randint(0, 3))], dtype=rng.choice(DTYPES))
        for i in range(rng.randint(1, 12))
    }
    message = Message(tensors, {"round": str(trial), "note": "é"} if trial % 2 else {})
    assert serialized_size(message) == len(serialize(message))


def test_a_message_round_trips_with_its_metadata():
    message = Message({"a": torch.arange(6, dtype=torch.int64).reshape(2, 3), "b": torch.randn(4)}, {"round": "7"})
    back = deserialize(serialize(message))
    assert back.meta == {"round": "7"} and all(torch.equal(back.tensors[k], message.tensors[k]) for k in message.tensors)
