"""Model loading: presets are pure functions of the seed; local paths go through from_pretrained."""
import pytest
import torch
from safetensors.torch import load_file

from fedllm.engine import run_recipe
from fedllm.models import byte_tokenizer, load_model, load_tokenizer
from fedllm.recipe import ModelConfig


def test_a_preset_is_the_same_for_the_same_seed_and_differs_across_seeds():
    tok = byte_tokenizer()
    a, b, c = (load_model(ModelConfig(), tok, seed=s) for s in (0, 0, 1))
    for (n, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), n
    assert not all(torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))


def test_the_byte_tokenizer_round_trips_any_text():
    tok = byte_tokenizer()
    text = "naïve café — 数据 🙂\n\tend"
    assert tok.decode(tok(text).input_ids) == text
    assert len(tok) == 259 and tok.pad_token_id != tok.eos_token_id


def test_a_local_checkpoint_directory_trains_through_from_pretrained(recipe_file, tmp_path):
    local = tmp_path / "my-model"
    tok = byte_tokenizer()
    load_model(ModelConfig(name="tiny-gpt2"), tok, seed=3).save_pretrained(local)
    tok.save_pretrained(local)
    loaded = load_model(ModelConfig(name=str(local)), load_tokenizer(ModelConfig(name=str(local))), seed=0)
    assert loaded.config.model_type == "gpt2"
    run_dir = run_recipe(str(recipe_file(model={"name": str(local)}, adapter={"name": "lora", "r": 4, "target_modules": None},
                                         federation={"rounds": 1})))
    assert (run_dir / "final" / "adapter_model.safetensors").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_a_quantized_base_trains_lora_on_gpu(recipe_file, tmp_path, bits):
    pytest.importorskip("bitsandbytes")
    local = tmp_path / "my-model"
    tok = byte_tokenizer()
    load_model(ModelConfig(), tok, seed=0).save_pretrained(local)
    tok.save_pretrained(local)
    run_dir = run_recipe(str(recipe_file(model={"name": str(local), "quantization": bits, "dtype": "bfloat16"},
                                         federation={"rounds": 1})))
    final = load_file(run_dir / "final" / "adapter_model.safetensors")
    assert final and all(torch.isfinite(t).all() for t in final.values())
