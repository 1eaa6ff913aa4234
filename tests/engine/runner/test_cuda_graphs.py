"""engine.runner.cuda_graphs on CPU: buckets, and the replay path (static buffers, padding rows
with slot -1 over the null block) with the capture emulated by an eager re-run of the same
static-buffer forward. Oracle: transformers' Qwen2ForCausalLM greedy decoding in float32."""

import pytest
import torch
from transformers import Qwen2Config
from transformers import Qwen2ForCausalLM as HFQwen2

from engine.config_loader import create_engine_config
from engine.runner.cuda_graphs import DecodeGraphs, decode_buckets
from engine.runner.mixed_graphs import MixedGraphs, mixed_buckets
from engine.runner.model_runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput

BLOCK_SIZE, VOCAB, NUM_BLOCKS = 4, 97, 48


def test_decode_buckets():
    assert decode_buckets(1) == [1]
    assert decode_buckets(5) == [1, 2, 4, 5]
    assert decode_buckets(24) == [1, 2, 4, 8, 16, 24]
    assert decode_buckets(30) == [1, 2, 4, 8, 16, 24, 30]


class _EagerGraph:
    """Stands in for torch.cuda.CUDAGraph: replay re-runs the captured forward into its output."""

    def __init__(self, forward, output):
        self.forward, self.output, self.replays = forward, output, 0

    def replay(self):
        self.output.copy_(self.forward())
        self.replays += 1


class _EmulatedGraphs(DecodeGraphs):
    def capture(self):
        for size in self.buckets:
            output = self._forward(size)
            self.graphs[size] = _EagerGraph(lambda size=size: self._forward(size), output)
            self.outputs[size] = output


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(1)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=64,
                         tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    hf = HFQwen2(config).float().eval()
    with torch.no_grad():
        for param in hf.parameters():
            param.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("qwen2_graphs")
    hf.save_pretrained(path)
    return str(path), hf


def _step(runner, reqs, plan, first):
    new, cached = [], CachedRequestData()
    for req_id, n in plan.items():
        req = reqs[req_id]
        if first:
            new.append(NewRequestData(req_id, req["prompt"], [], [], req["params"], req["blocks"], 0))
        else:
            cached.req_ids.append(req_id)
            cached.new_block_ids.append([])
            cached.num_computed_tokens.append(req["computed"])
    out = runner.execute(SchedulerOutput(new, cached, dict(plan), sum(plan.values()), {}, set(), []))
    for req_id, tokens in zip(out.req_ids, out.sampled_token_ids):
        reqs[req_id]["computed"] += plan[req_id]
        reqs[req_id]["out"] += tokens


def test_replayed_decode_with_padding_matches_transformers(checkpoint):
    path, hf = checkpoint
    config = create_engine_config(model=path, dtype="float32", device="cpu", block_size=BLOCK_SIZE, max_num_seqs=8)
    runner = ModelRunner(config)
    runner.initialize_kv_cache(NUM_BLOCKS)
    graphs = _EmulatedGraphs(runner.model, runner.kv_caches, 8, config.model_config.max_model_len, BLOCK_SIZE,
                             False, runner.device)
    graphs.capture()
    runner.decode_graphs = graphs
    prompts = {"a": [5, 6, 7, 8, 9], "b": [40, 41], "c": [11, 3, 90, 17, 2, 60, 33]}
    params = SamplingParams(temperature=0.0, max_tokens=10)
    blocks = iter(range(NUM_BLOCKS - 1, 0, -1))   # block 0 is the null block padding rows read
    reqs = {r: {"prompt": p, "params": params, "computed": 0, "out": [],
                "blocks": [next(blocks) for _ in range(5)]} for r, p in prompts.items()}
    _step(runner, reqs, {r: len(p) for r, p in prompts.items()}, first=True)   # prefill: eager
    assert sum(g.replays for g in graphs.graphs.values()) == 0
    for _ in range(6):                                                        # 3 rows in bucket 4
        _step(runner, reqs, {r: 1 for r in prompts}, first=False)
    assert graphs.graphs[4].replays == 6
    for req_id, prompt in prompts.items():
        tokens = torch.tensor(prompt)[None]
        with torch.no_grad():
            expected = hf.generate(tokens, max_new_tokens=7, do_sample=False)[0, len(prompt):].tolist()
        assert reqs[req_id]["out"] == expected, req_id


def test_mixed_buckets():
    assert mixed_buckets(0) == []
    assert mixed_buckets(16) == [16]
    assert mixed_buckets(100) == [16, 32, 64, 100]
    assert mixed_buckets(1024)[-3:] == [768, 896, 1024] and mixed_buckets(2048)[-1] == 2048


class _EmulatedMixedGraphs(MixedGraphs):
    def capture(self, pool=None):
        for size in self.buckets:
            self._pad_for_capture(size)
            output = self._forward(size)
            self.graphs[size] = _EagerGraph(lambda size=size: self._forward(size), output)
            self.outputs[size] = output


@pytest.mark.parametrize("embed_width", [None, 32], ids=["input_ids", "inputs_embeds"])
def test_replayed_mixed_steps_with_padding_match_transformers(checkpoint, embed_width, monkeypatch):
    """Chunked prefills joined with decodes replay the mixed graphs (padded to 16 tokens with the
    dummy request and 8 empty ones); the tokens equal transformers' greedy decoding. With
    inputs_embeds the runner feeds the graph embeddings, as it does for models with a tower."""
    path, hf = checkpoint
    config = create_engine_config(model=path, dtype="float32", device="cpu", block_size=BLOCK_SIZE, max_num_seqs=8)
    runner = ModelRunner(config)
    runner.initialize_kv_cache(NUM_BLOCKS)
    graphs = _EmulatedMixedGraphs(runner.model, runner.kv_caches, 8, config.model_config.max_model_len,
                                  BLOCK_SIZE, False, embed_width, 16, torch.float32, runner.device)
    graphs.capture()
    runner.mixed_graphs = graphs
    if embed_width is not None:   # what the encoder runner hands over for a model with a tower
        monkeypatch.setattr(runner, "_inputs_embeds",
                            lambda so, batch: (runner.model.model.embed_tokens(batch.input_ids), {}))
    prompts = {"a": [5, 6, 7, 8, 9], "b": [40, 41], "c": [11, 3, 90, 17, 2, 60, 33]}
    params = SamplingParams(temperature=0.0, max_tokens=10)
    blocks = iter(range(NUM_BLOCKS - 1, 0, -1))
    reqs = {r: {"prompt": p, "params": params, "computed": 0, "out": [],
                "blocks": [next(blocks) for _ in range(5)]} for r, p in prompts.items()}
    _step(runner, reqs, {"a": 5, "b": 2}, first=True)                         # 7 tokens
    new_c = {"c": reqs["c"]}
    _step(runner, new_c, {"c": 4}, first=True)                                # chunk 1 of c alone
    _step(runner, reqs, {"a": 1, "b": 1, "c": 3}, first=False)                # decodes + last chunk
    assert graphs.graphs[16].replays == 3
    for _ in range(5):
        _step(runner, reqs, {r: 1 for r in prompts}, first=False)             # pure decode: eager
    assert graphs.graphs[16].replays == 3
    for req_id, prompt in prompts.items():
        tokens = torch.tensor(prompt)[None]
        with torch.no_grad():
            expected = hf.generate(tokens, max_new_tokens=len(reqs[req_id]["out"]), do_sample=False)
        assert reqs[req_id]["out"] == expected[0, len(prompt):].tolist(), req_id
