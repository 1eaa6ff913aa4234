"""create_engine_config: vLLM keyword names in, EngineConfig out; every bad value is an error that
names the flag (or the supported choices)."""

import json

import pytest
import torch
from transformers import Qwen2Config

from engine.config import EngineConfig
from engine.config_loader import create_engine_config


@pytest.fixture()
def model_dir(tmp_path):
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                         eos_token_id=7, architectures=["Qwen2ForCausalLM"], dtype="bfloat16")
    config.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    return tmp_path


def test_defaults_come_from_the_checkpoint(model_dir):
    config = create_engine_config(model=str(model_dir), device="cpu")
    model = config.model_config
    assert model.architecture == "Qwen2ForCausalLM" and model.path == str(model_dir)
    assert model.max_model_len == 96 and config.scheduler_config.max_model_len == 96
    assert model.eos_token_ids == (7, 9)
    assert model.dtype == torch.bfloat16          # "auto" keeps the checkpoint's dtype
    assert model.tokenizer == str(model_dir) and model.load_format == "auto"
    assert config.cache_config.block_size == 16 and config.device_config.device == "cpu"


def test_explicit_arguments_are_applied(model_dir):
    config = create_engine_config(model=str(model_dir), device="cpu", dtype="float32", max_model_len=32,
                                 block_size=8, max_num_seqs=3, max_num_batched_tokens=40, seed=5,
                                 limit_mm_per_prompt={"image": 2, "video": 0}, load_format="dummy",
                                 kv_cache_memory_bytes=1 << 20, enable_prefix_caching=False)
    assert config.model_config.dtype == torch.float32 and config.model_config.max_model_len == 32
    assert config.cache_config.block_size == 8 and config.cache_config.kv_cache_memory_bytes == 1 << 20
    assert config.scheduler_config.max_num_seqs == 3 and config.scheduler_config.max_num_batched_tokens == 40
    assert config.multimodal_config.limit_per_prompt == {"image": 2, "video": 0}
    assert config.model_config.seed == 5 and config.model_config.load_format == "dummy"
    assert not config.cache_config.enable_prefix_caching


def test_limit_mm_per_prompt_object_form(model_dir):
    config = create_engine_config(model=str(model_dir), device="cpu",
                                 limit_mm_per_prompt='{"image": {"count": 3, "width": 512, "height": 256}}')
    assert config.multimodal_config.limit_per_prompt == {"image": 3}
    assert config.multimodal_config.limit_sizes == {"image": {"width": 512, "height": 256}}


@pytest.mark.parametrize("kwargs,error,match", [
    ({"max_model_len": 97}, ValueError, "max-model-len.*max_position_embeddings \\(96\\)"),
    ({"dtype": "float8"}, ValueError, "--dtype"),
    ({"tensor_parallel_size": 3}, ValueError, "tensor-parallel-size: 3 does not divide the model's num_attention_heads"),
    ({"pipeline_parallel_size": 2}, ValueError, "pipeline-parallel-size: 2 stages need at least as many layers"),
    ({"tensor_parallel_size": 2, "distributed_executor_backend": "uni"}, ValueError, "--distributed-executor-backend"),
    ({"mm_encoder_tp_mode": "weights"}, ValueError, "--mm-encoder-tp-mode: weights .* is not supported"),
    ({"load_format": "pt"}, ValueError, "--load-format"),
    ({"block_size": 3}, ValueError, "--block-size"),
    ({"not_a_flag": 1, "max_model_lenn": 4}, TypeError, "max_model_lenn, not_a_flag"),
])
def test_bad_arguments_are_named(model_dir, kwargs, error, match):
    with pytest.raises(error, match=match):
        create_engine_config(model=str(model_dir), device="cpu", **kwargs)


def test_unsupported_architecture_lists_the_supported_ones(model_dir):
    raw = json.loads((model_dir / "config.json").read_text())
    raw["architectures"] = ["Qwen2ForSequenceClassification"]
    (model_dir / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="'Qwen2ForSequenceClassification' is not supported.*Qwen2ForCausalLM"):
        create_engine_config(model=str(model_dir), device="cpu")


def test_qwen3_vl_moe_is_refused_with_the_reason(tmp_path):
    from transformers import Qwen3VLMoeConfig

    Qwen3VLMoeConfig(architectures=["Qwen3VLMoeForConditionalGeneration"]).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Qwen3-VL MoE .* fused MoE kernels.*dense Qwen3-VL"):
        create_engine_config(model=str(tmp_path), device="cpu")


def test_missing_model_directory(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        create_engine_config(model=str(tmp_path / "absent"), device="cpu")
