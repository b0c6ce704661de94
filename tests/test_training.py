"""Local-round arithmetic and state (fedllm.training): how many steps an epoch is, and a loaded
optimizer state is a copy of the client's record."""
from types import SimpleNamespace

from fedllm.training import default_steps, num_micro_batches


def client(batch: int, epochs: float = 1.0, accumulate: int = 1, max_steps=None):
    return SimpleNamespace(per_device_train_batch_size=batch, num_train_epochs=epochs,
                           gradient_accumulation_steps=accumulate, max_steps=max_steps)


def test_an_epoch_is_the_examples_over_the_batch_rounded_up():
    assert default_steps(client(4), 10) == 3
    assert default_steps(client(4, epochs=2.0), 10) == 6
    assert num_micro_batches(client(2, accumulate=2), 10) == 6 and default_steps(client(2, accumulate=2), 10) == 3


def test_a_client_group_counts_its_epoch_in_micro_batches_of_g_times_b():
    """G ranks each train b examples of one G·b micro-batch: an epoch of 12 examples at b=2 in a
    group of 2 is 3 steps, as for one rank at b=4, not 6 (which would train two epochs)."""
    assert default_steps(client(2), 12, group_size=2) == default_steps(client(4), 12) == 3
    assert default_steps(client(2, epochs=3.0), 13, group_size=4) == default_steps(client(8, epochs=3.0), 13) == 6


def test_max_steps_is_steps_whatever_the_group():
    assert default_steps(client(2, max_steps=5), 1000, group_size=4) == 5


def test_a_loaded_optimizer_state_is_a_copy_the_steps_never_write_back_into():
    import torch

    from fedllm.training import load_optimizer_state, optimizer_state_to_tensors

    w = torch.nn.Parameter(torch.ones(3))
    first = torch.optim.AdamW([w], lr=0.1)
    w.grad = torch.ones(3)
    first.step()
    stored = {k: t.clone() for k, t in optimizer_state_to_tensors(first).items()}  # a client's record
    again = torch.optim.AdamW([w], lr=0.1)
    load_optimizer_state(again, stored)
    kept = {k: t.clone() for k, t in stored.items()}
    again.step()  # on the CPU torch would step the record's own tensors in place
    assert all(torch.equal(stored[k], kept[k]) for k in kept)
    assert not torch.equal(optimizer_state_to_tensors(again)["0.exp_avg_sq"], kept["0.exp_avg_sq"])
