"""Weight loading: sharded checkpoints, the missing/unexpected check, checkpoint resolution
(local directory, offline HF cache layout, ModelScope without the package) and dummy weights."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file
from transformers import Qwen2Config
from transformers import Qwen2ForCausalLM as HFQwen2

from engine.models.qwen2 import Qwen2ForCausalLM
from engine.weights import (init_dummy_weights, iterate_weights, load_checked, resolve_model_path,
                            safetensors_files)


def tiny_config(**overrides):
    fields = dict(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    return Qwen2Config(**{**fields, **overrides})


def test_sharded_checkpoint_loads_every_tensor(tmp_path):
    hf = HFQwen2(tiny_config()).float()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists() and len(safetensors_files(str(tmp_path))) > 2
    model = Qwen2ForCausalLM(tiny_config())
    load_checked(model, iterate_weights(str(tmp_path)))
    ours = dict(model.named_parameters())
    attn, mlp = hf.model.layers[1].self_attn, hf.model.layers[1].mlp
    expected_qkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    torch.testing.assert_close(ours["model.layers.1.self_attn.qkv_proj.weight"], expected_qkv, rtol=0, atol=0)
    torch.testing.assert_close(ours["model.layers.1.self_attn.qkv_proj.bias"],
                               torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]), rtol=0, atol=0)
    torch.testing.assert_close(ours["model.layers.1.mlp.gate_up_proj.weight"],
                               torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), rtol=0, atol=0)
    torch.testing.assert_close(ours["lm_head.weight"], hf.lm_head.weight, rtol=0, atol=0)


def _hf_weights(tied=False):
    return dict(HFQwen2(tiny_config(tie_word_embeddings=tied)).state_dict())


def test_missing_weights_and_missing_shards_are_named():
    weights = _hf_weights()
    del weights["model.norm.weight"], weights["model.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(ValueError, match="missing 2 weights") as err:
        load_checked(Qwen2ForCausalLM(tiny_config()), weights.items())
    assert "model.norm.weight" in str(err.value)
    assert "model.layers.0.self_attn.qkv_proj.weight#k" in str(err.value)


def test_unexpected_weights_are_named():
    weights = _hf_weights()
    weights["model.layers.0.self_attn.rotary_emb.extra"] = torch.zeros(3)
    with pytest.raises(ValueError, match="does not expect.*rotary_emb.extra"):
        load_checked(Qwen2ForCausalLM(tiny_config()), weights.items())


def test_tied_checkpoint_with_or_without_lm_head_loads():
    weights = _hf_weights(tied=True)
    weights.pop("lm_head.weight", None)
    model = Qwen2ForCausalLM(tiny_config(tie_word_embeddings=True))
    load_checked(model, weights.items())
    weights["lm_head.weight"] = torch.zeros_like(weights["model.embed_tokens.weight"])   # ignored when tied
    load_checked(model, weights.items())
    torch.testing.assert_close(model.lm_head.weight, weights["model.embed_tokens.weight"])


def test_shard_shape_mismatch_is_an_error():
    weights = _hf_weights()
    weights["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(5, 32)
    with pytest.raises(ValueError, match="shape mismatch"):
        load_checked(Qwen2ForCausalLM(tiny_config()), weights.items())


def test_directory_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model_path(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ValueError, match=f"no \\*.safetensors in {tmp_path}"):
        safetensors_files(str(tmp_path))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(ValueError, match="gone.safetensors"):
        safetensors_files(str(tmp_path))


def test_offline_hf_cache_layout(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    snapshot = hub / "models--org--tiny" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (hub / "models--org--tiny" / "refs").mkdir()
    (hub / "models--org--tiny" / "refs" / "main").write_text("0123abcd")
    (snapshot / "config.json").write_text("{}")
    save_file({"w": torch.zeros(2)}, str(snapshot / "model.safetensors"))
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = resolve_model_path("org/tiny")
    assert os.path.samefile(path, snapshot)
    assert [name for name, _ in iterate_weights(path)] == ["w"]
    with pytest.raises(ValueError, match="cannot find 'org/other' in the local HF cache"):
        resolve_model_path("org/other")


def test_modelscope_without_the_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "modelscope", None)
    monkeypatch.setenv("VLSERVE_USE_MODELSCOPE", "True")
    with pytest.raises(ValueError, match="pip install modelscope"):
        resolve_model_path("org/tiny")


def test_dummy_weights_fill_every_parameter_deterministically():
    model = Qwen2ForCausalLM(tiny_config())
    init_dummy_weights(model, seed=3)
    for name, param in model.named_parameters():
        assert torch.isfinite(param).all(), name
        center = 1.0 if "norm" in name else 0.0
        assert (param - center).abs().max() <= 1e-3, name
    other = Qwen2ForCausalLM(tiny_config())
    init_dummy_weights(other, seed=3)
    torch.testing.assert_close(dict(model.named_parameters())["model.layers.1.mlp.down_proj.weight"],
                               dict(other.named_parameters())["model.layers.1.mlp.down_proj.weight"])
