"""Local training loops (fedllm.training.LocalLoop): the built-in one and a Hugging Face
Trainer, chosen by the recipe's `client.trainer`, or the zeroth-order loop (`client.optim: zo`); an adapter may bring its own
(SFPrompt's split loop)."""
from fedllm.loops.builtin import BuiltinLoop

def loop_for(trainer: str, optim: str = "adamw"):
    """The loop named by `client.trainer`, or the zeroth-order one for `client.optim: zo`
    (the Trainer's module is imported only when used)."""
    if optim == "zo":
        from fedllm.loops.zo import ZOLoop

        return ZOLoop()
    if trainer == "hf":
        from fedllm.loops.trainer import TrainerLoop

        return TrainerLoop()
    return BuiltinLoop()


__all__ = ["BuiltinLoop", "loop_for"]
