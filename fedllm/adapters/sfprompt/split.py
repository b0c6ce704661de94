"""A causal LM cut in three, U-shaped: client head (embeddings, soft prompt, first blocks),
server body (middle blocks), client tail (last blocks, final norm, LM head).

The pieces re-run the model's own modules in the model's own order, so head∘body∘tail is
the unsplit forward pass. The soft prompt goes in front of the tokens, as peft's prompt
tuning puts it: the attention mask gets `p` ones in front and positions run 0..p+L-1 over
prompt and tokens alike, in every piece. Each piece rebuilds the causal mask (and, for
Llama, the rotary tables) from the extended 2-D mask it holds, so the server needs only
the activations and that mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.masking_utils import create_causal_mask

from fedllm.data import IGNORE_INDEX


@dataclass
class Context:
    positions: torch.Tensor
    mask: torch.Tensor | None  # what the blocks take: 4-D, or None when plain causal attention suffices
    rope: tuple | None  # Llama's (cos, sin)


class SplitLM:
    """Views of one resident causal LM as head / body / tail; owns no weights."""

    def __init__(self, lm: torch.nn.Module, head_layers: int, tail_layers: int):
        if hasattr(lm, "transformer") and hasattr(lm.transformer, "h"):  # GPT-2 family
            core = lm.transformer
            self.gpt2, self.blocks, self.embed, self.final_norm = True, core.h, core.wte, core.ln_f
        elif hasattr(lm, "model") and hasattr(lm.model, "layers"):  # Llama family (Mistral, Qwen2, SmolLM...)
            core = lm.model
            self.gpt2, self.blocks, self.embed, self.final_norm = False, core.layers, core.embed_tokens, core.norm
        else:
            raise ValueError(f"cannot split {type(lm).__name__}: only Llama- and GPT-2-style causal LMs are supported")
        n = len(self.blocks)
        if head_layers < 0 or tail_layers < 0 or head_layers + tail_layers > n:
            raise ValueError(f"head_layers={head_layers} + tail_layers={tail_layers} must fit the model's {n} blocks")
        self.lm, self.core, self.config = lm, core, lm.config
        self.head_blocks = range(head_layers)
        self.body_blocks = range(head_layers, n - tail_layers)
        self.tail_blocks = range(n - tail_layers, n)
        self.lm_head = lm.get_output_embeddings()

    # ---- the three pieces -------------------------------------------------------------
    def head(self, input_ids, attention_mask, prompt: torch.Tensor | None):
        """Client: token embeddings with the prompt in front, then the head blocks. Returns
        the activations and the extended 2-D mask (both cross the cut)."""
        hidden = self.embed(input_ids)
        if prompt is not None:
            batch = input_ids.shape[0]
            hidden = torch.cat([prompt.to(hidden.dtype).unsqueeze(0).expand(batch, -1, -1), hidden], dim=1)
            ones = attention_mask.new_ones(batch, prompt.shape[0])
            attention_mask = torch.cat([ones, attention_mask], dim=1)
        if self.gpt2:  # learned absolute positions: the prompt takes 0..p-1, as in peft
            hidden = self.core.drop(hidden + self.core.wpe(self.positions(hidden)))
        return self.run(hidden, attention_mask, self.head_blocks), attention_mask

    def body(self, hidden, attention_mask):
        """Server: the frozen middle blocks."""
        return self.run(hidden, attention_mask, self.body_blocks)

    def tail(self, hidden, attention_mask):
        """Client: the last blocks, the final norm and the LM head (logits over prompt + tokens)."""
        hidden = self.run(hidden, attention_mask, self.tail_blocks)
        return self.lm_head(self.final_norm(hidden))

    # ---- shared machinery ---------------------------------------------------------------
    @staticmethod
    def positions(hidden):
        return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)

    def context(self, hidden, attention_mask) -> Context:
        positions = self.positions(hidden)
        mask = create_causal_mask(
            config=self.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None, position_ids=positions
        )
        rope = None if self.gpt2 else self.core.rotary_emb(hidden, position_ids=positions)
        return Context(positions, mask, rope)

    def run(self, hidden, attention_mask, blocks: range):
        if len(blocks) == 0:
            return hidden
        ctx = self.context(hidden, attention_mask)
        for i in blocks:
            if self.gpt2:
                hidden = self.blocks[i](hidden, None, ctx.mask, position_ids=ctx.positions)
            else:
                hidden = self.blocks[i](hidden, attention_mask=ctx.mask, position_embeddings=ctx.rope, position_ids=ctx.positions)
        return hidden

    def shortcut(self, input_ids, attention_mask, prompt):
        """Head → tail without the body: SFPrompt's local-loss path (no communication)."""
        hidden, mask = self.head(input_ids, attention_mask, prompt)
        return self.tail(hidden, mask)

    def forward(self, input_ids, attention_mask, prompt):
        """Head → body → tail in one process: evaluation and the reference for the split."""
        hidden, mask = self.head(input_ids, attention_mask, prompt)
        return self.tail(self.body(hidden, mask), mask)


def token_logits(logits: torch.Tensor, num_virtual_tokens: int) -> torch.Tensor:
    """Drops the prompt positions: the logits line up with the input tokens again."""
    return logits[:, num_virtual_tokens:]


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled tokens (the model's own loss)."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )


@torch.no_grad()
def el2n_scores(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """EL2N per example: ‖softmax(f(x)) − onehot(y)‖₂ per target token, averaged over the
    example's target tokens (Paul et al. 2021, as SFPrompt prunes)."""
    probs = logits[:, :-1].float().softmax(-1)
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    picked = probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    # ‖p − e_y‖² = ‖p‖² − 2 p_y + 1, without materialising the one-hot
    norms = (probs.pow(2).sum(-1) - 2 * picked + 1).clamp(min=0).sqrt()
    return (norms * mask).sum(-1) / mask.sum(-1).clamp(min=1)
