"""Base model + tokenizer: a hub id or local path (the real `from_pretrained` path), or a
built-in preset built from a config with a locally made tokenizer (no download)."""
from __future__ import annotations

import difflib
import os
from functools import partial
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from fedllm import placement
from fedllm.registry import ADAPTERS, RecipeError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# A minimal chat template so the `chat` data format also works with presets.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% if m['role'] != 'user' and m['role'] != 'system' %}"
    "{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer (256 byte symbols + <s> </s> <pad>): covers any text, needs no
    training and no download, identical on every machine."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=4096
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# Wider than the usual 0.02 so that a random-init preset can reach confident logits
# through adapters alone (the frozen LM head caps |logit| near init_range·hidden).
INIT_RANGE = 0.1


def _tiny_llama(vocab_size: int, pad_id: int, bos_id: int, eos_id: int):
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
            pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id, tie_word_embeddings=False,
            initializer_range=INIT_RANGE,
        )
    )


def _tiny_gpt2(vocab_size: int, pad_id: int, bos_id: int, eos_id: int):
    return GPT2LMHeadModel(
        GPT2Config(
            vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=1024,
            pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id, initializer_range=INIT_RANGE,
        )
    )


PRESETS = {"tiny-llama": _tiny_llama, "tiny-gpt2": _tiny_gpt2}


def _in_hub_cache(name: str, revision: str | None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str)
    except ValueError:  # not a valid repo id at all
        return False


def check_model_name(name: str, revision: str | None = None) -> None:
    """A name that is no preset and no local path, and that cannot be fetched now (the hub is
    off, or it is a preset's name misspelt): one line at once, not a minute of hub retries."""
    if name in PRESETS or Path(name).exists():
        return
    close = difflib.get_close_matches(name, PRESETS, n=1, cutoff=0.75)
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    if close or (offline and not _in_hub_cache(name, revision)):
        why = "it looks like a misspelt preset" if close else "HF_HUB_OFFLINE is set and it is not in the Hugging Face cache"
        raise RecipeError(f"model.name '{name}' is neither a preset ({', '.join(PRESETS)}) nor a local path, and {why}; "
                          f"did you mean '{(close or ['tiny-llama'])[0]}'?")


def load_tokenizer(cfg) -> PreTrainedTokenizerFast:
    if cfg.name in PRESETS:
        return byte_tokenizer()
    check_model_name(cfg.name, cfg.revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as err:  # transformers' "not a local folder and not a valid model identifier", network errors
        raise RecipeError(f"model.name '{cfg.name}' is neither a preset ({', '.join(PRESETS)}), a local path, nor "
                          f"reachable on the hub ({str(err).splitlines()[0]}); did you mean 'tiny-llama'?") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_quantization(cfg) -> None:
    """Fails fast, before any download, where the quantization asked for cannot run."""
    if cfg.quantization == "none":
        return
    if cfg.name in PRESETS:
        raise RecipeError(f"model.quantization={cfg.quantization} is for real checkpoints, not the '{cfg.name}' preset")
    if not torch.cuda.is_available():
        raise RecipeError(
            f"model.quantization={cfg.quantization} needs a CUDA GPU (bitsandbytes); none is visible. "
            "Set model.quantization=none to train in full precision on this machine."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise RecipeError("model.quantization needs bitsandbytes: pip install 'fedllm[gpu]'") from None


def _quantization_config(cfg):
    check_quantization(cfg)
    if cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = cfg.bnb_4bit_compute_dtype or (cfg.dtype if cfg.dtype != "float32" else "bfloat16")
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=cfg.bnb_4bit_quant_type,
        bnb_4bit_use_double_quant=cfg.bnb_4bit_use_double_quant, bnb_4bit_compute_dtype=DTYPES[compute],
    )


def empty_model(cfg, tokenizer):
    """The base's structure with every parameter and buffer on the meta device (no storage, no
    values; tied weights stay tied, unlike under accelerate's init_empty_weights): a client
    group's non-leader, whose tensors its leader fills (distributed.shard_base)."""
    with torch.device("meta"):
        if cfg.name in PRESETS:
            model = PRESETS[cfg.name](len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
        else:
            config = AutoConfig.from_pretrained(cfg.name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
            model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code)
    return model.to(DTYPES[cfg.dtype])


def load_model(cfg, tokenizer, seed: int, device=None, empty: bool = False, zero_group=None):
    """The ONE resident base model. Presets are initialised from `seed`, so every process
    (and `fedllm export`) rebuilds bit-identical base weights. `empty`: see empty_model.
    `zero_group`: a client group over which DeepSpeed ZeRO-3 partitions the base while it is
    built (fedllm.zero; no rank holds it whole), with the weights of the whole build."""
    check_quantization(cfg)
    if empty:
        model = empty_model(cfg, tokenizer)
    elif cfg.name in PRESETS:
        make = partial(PRESETS[cfg.name], len(tokenizer), tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if zero_group is not None:
                from fedllm import zero  # DeepSpeed, imported only when chosen

                return frozen(zero.build_preset(make, zero_group, DTYPES[cfg.dtype]))
            model = make()
        model = model.to(DTYPES[cfg.dtype])
        if cfg.device_map is not None:
            model = placement.dispatch(model, cfg, device)
    else:
        quant = _quantization_config(cfg)
        if cfg.device_map is not None:
            place = placement.from_pretrained_options(cfg, device)
        else:
            place = {"device_map": {"": device} if quant is not None else None}
        if zero_group is not None and (model := zero_checkpoint(cfg, tokenizer, zero_group)) is not None:
            return frozen(model)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                cfg.name, revision=cfg.revision, dtype=DTYPES[cfg.dtype], quantization_config=quant,
                trust_remote_code=cfg.trust_remote_code, **place,
            )
        except ValueError as err:  # transformers/accelerate refusing a device map or budget
            if cfg.device_map is None:
                raise
            raise RecipeError(f"model.device_map={cfg.device_map}: {str(err).splitlines()[0]}") from None
        if cfg.device_map is not None:
            placement.check_placement(model.hf_device_map, cfg)
            placement.without_tied_bookkeeping(model)
        if quant is not None:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    frozen(model)
    if device is not None and cfg.quantization == "none" and not placement.is_placed(model) and not empty:
        model.to(device)
    return model


def zero_checkpoint(cfg, tokenizer, group):
    """A checkpoint's base partitioned over `group` while it is loaded (fedllm.zero); None where
    fedllm cannot read it so (no safetensors weights, or names transformers renames at load):
    then it is loaded whole on each rank and partitioned after (fedllm.zero.partition_base)."""
    from fedllm import zero  # DeepSpeed, imported only when chosen

    folder = Path(cfg.name)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(cfg.name, revision=cfg.revision, allow_patterns=["*.json", "*.safetensors"]))
    index = zero.checkpoint_index(folder)
    if not zero.loadable(empty_model(cfg, tokenizer), index):
        return None
    config = AutoConfig.from_pretrained(cfg.name, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    make = partial(AutoModelForCausalLM.from_config, config, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code)
    return zero.load_checkpoint(make, index, group)


def frozen(model: torch.nn.Module) -> torch.nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_model(recipe, device=None, empty: bool = False, zero_group=None):
    """Tokenizer, base model and attached adapter: a pure function of the recipe. `empty`:
    the base and the adapter on the meta device, to be filled by a client group's leader.
    `zero_group`: the base partitioned over that group while it is built (load_model); both
    as fedllm.base_layout decides."""
    check_quantization(recipe.model)
    adapter = ADAPTERS.build(recipe.adapter, "adapter")
    owner = recipe.adapter["name"]
    if recipe.model.device_map is not None and not adapter.trains_through_offload:
        raise RecipeError(f"adapter.name={owner} cannot train through a base placed by model.device_map (it reads or "
                          "trains base weights outside their layers' forward): drop model.device_map or use lora")
    tokenizer = load_tokenizer(recipe.model)
    base = load_model(recipe.model, tokenizer, recipe.seed, device, empty, zero_group)
    if recipe.client.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    if placement.is_placed(base):
        with placement.resident_adapter(base, owner):
            model = adapter.attach(base, recipe.seed)
        placement.check_resident(adapter.trainable(model), owner)
        return tokenizer, model, adapter
    model = adapter.attach(base, recipe.seed)
    if device is not None and not empty:  # a partitioned base: its empty weights and its buffers
        model.to(device)
    return tokenizer, model, adapter
