"""ModelRunner.execute on hand-built SchedulerOutputs (chunked prefill, decode, preemption) vs
transformers' Qwen2ForCausalLM in float32: greedy tokens, logprobs with ranks, prompt logprobs."""

import random

import pytest
import torch
from transformers import Qwen2Config
from transformers import Qwen2ForCausalLM as HFQwen2

from engine.config_loader import create_engine_config
from engine.runner.model_runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput

BLOCK_SIZE = 4
VOCAB = 211


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=12, max_position_embeddings=128,
                         tie_word_embeddings=False, eos_token_id=VOCAB - 1,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    hf = HFQwen2(config).float().eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            param.normal_(0, 0.2)
            if "norm" in name:
                param.add_(1.0)
    path = tmp_path_factory.mktemp("qwen2")
    hf.save_pretrained(path)
    return str(path), hf


@pytest.fixture()
def runner(checkpoint):
    config = create_engine_config(model=checkpoint[0], dtype="float32", device="cpu", block_size=BLOCK_SIZE)
    model_runner = ModelRunner(config)
    model_runner.initialize_kv_cache(64)
    return model_runner


class FakeScheduler:
    """Just enough of a scheduler to drive the runner: tracks tokens, computed counts and blocks
    (handed out in shuffled order, so block tables are never contiguous)."""

    def __init__(self, runner):
        self.runner = runner
        self.free_blocks = list(range(64))
        random.Random(0).shuffle(self.free_blocks)
        self.reqs = {}

    def add(self, req_id, prompt, params):
        self.reqs[req_id] = {"prompt": list(prompt), "out": [], "computed": 0, "blocks": [], "params": params,
                             "seen": False}

    def step(self, plan, finished=()):
        new, cached = [], CachedRequestData()
        for req_id, n in plan.items():
            req = self.reqs[req_id]
            needed = -(-(req["computed"] + n) // BLOCK_SIZE) - len(req["blocks"])
            fresh = [self.free_blocks.pop() for _ in range(needed)]
            req["blocks"] += fresh
            if not req["seen"]:
                new.append(NewRequestData(req_id, req["prompt"], list(req["out"]), [], req["params"],
                                          list(req["blocks"]), req["computed"]))
                req["seen"] = True
            else:
                cached.req_ids.append(req_id)
                cached.new_block_ids.append(fresh)
                cached.num_computed_tokens.append(req["computed"])
        output = self.runner.execute(SchedulerOutput(new, cached, dict(plan), sum(plan.values()), {},
                                                     set(finished), []))
        for req_id, tokens in zip(output.req_ids, output.sampled_token_ids):
            self.reqs[req_id]["computed"] += plan[req_id]
            self.reqs[req_id]["out"] += tokens
        return output

    def preempt(self, req_id):
        req = self.reqs[req_id]
        self.free_blocks += req["blocks"]
        req.update(blocks=[], computed=0, seen=False)


def hf_greedy(hf, prompt, num_steps, k):
    """Oracle: argmax decoding with full forwards; per step (token, its logprob, rank, top-k)."""
    tokens, steps = list(prompt), []
    with torch.no_grad():
        for _ in range(num_steps):
            logprobs = torch.log_softmax(hf(torch.tensor(tokens)[None]).logits[0, -1], dim=-1)
            top = logprobs.topk(k)
            token = int(logprobs.argmax())
            steps.append((token, float(logprobs[token]), top.indices.tolist(), top.values))
            tokens.append(token)
    return steps


def test_chunked_prefill_and_decode_match_transformers(checkpoint, runner):
    hf = checkpoint[1]
    prompts = {"a": list(range(3, 12)), "b": [7, 100, 5, 19, 33], "c": list(range(150, 163))}
    params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=3)
    sched = FakeScheduler(runner)
    for req_id, prompt in prompts.items():
        sched.add(req_id, prompt, params)
    first = sched.step({"a": 4, "b": 5, "c": 6})
    assert first.sampled_token_ids == [[], [first.sampled_token_ids[1][0]], []]   # only b's prefill is done
    sched.step({"a": 5, "b": 1, "c": 7})
    for _ in range(5):
        sched.step({"a": 1, "b": 1, "c": 1})
    outputs = {r: sched.reqs[r]["out"] for r in prompts}
    for req_id, prompt in prompts.items():
        expected = hf_greedy(hf, prompt, len(outputs[req_id]), 3)
        assert outputs[req_id] == [s[0] for s in expected], req_id
    assert [len(o) for o in outputs.values()] == [6, 7, 6]


def test_logprobs_and_ranks_match_transformers(checkpoint, runner):
    hf = checkpoint[1]
    prompt = [11, 22, 33, 44, 55, 66]
    sched = FakeScheduler(runner)
    sched.add("r", prompt, SamplingParams(temperature=0.0, logprobs=4))
    got = [sched.step({"r": 6}).logprobs["r"][0]] + [sched.step({"r": 1}).logprobs["r"][0] for _ in range(2)]
    for entry, (token, logprob, top_ids, top_values) in zip(got, hf_greedy(hf, prompt, 3, 4)):
        assert entry.token_ids == [token] + top_ids
        torch.testing.assert_close(torch.tensor(entry.logprobs), torch.cat([torch.tensor([logprob]), top_values]),
                                   atol=1e-5, rtol=1e-5)
        assert entry.ranks == [1, 1, 2, 3, 4]


def test_prompt_logprobs_over_chunks_match_transformers(checkpoint, runner):
    hf = checkpoint[1]
    prompt = [5, 9, 13, 17, 21, 25, 29, 33, 37]
    sched = FakeScheduler(runner)
    sched.add("p", prompt, SamplingParams(temperature=0.0, prompt_logprobs=2))
    chunks = [sched.step({"p": 4}).prompt_logprobs["p"], sched.step({"p": 5}).prompt_logprobs["p"]]
    entries = chunks[0] + chunks[1]
    assert entries[0] is None and len(entries) == len(prompt)
    with torch.no_grad():
        expected = torch.log_softmax(hf(torch.tensor(prompt)[None]).logits[0], dim=-1)  # [P, V]
    for position in range(1, len(prompt)):
        row = expected[position - 1]
        token = prompt[position]
        entry = entries[position]
        assert entry.token_ids[0] == token and entry.token_ids[1:] == row.topk(2).indices.tolist()
        assert abs(entry.logprobs[0] - float(row[token])) < 1e-5
        assert entry.ranks[0] == int((row > row[token]).sum()) + 1


def test_preempted_request_recomputes_and_continues_identically(checkpoint, runner):
    hf = checkpoint[1]
    prompt = [40, 41, 42, 43, 44, 45, 46]
    sched = FakeScheduler(runner)
    sched.add("x", prompt, SamplingParams(temperature=0.0))
    sched.step({"x": 7})
    sched.step({"x": 1})
    sched.preempt("x")
    sched.step({}, finished={"x"})                                   # runner drops it
    assert "x" not in runner.input_batch.requests
    sched.step({"x": 5})                                             # recompute prompt + 2 outputs in chunks
    sched.step({"x": 4})
    sched.step({"x": 1})
    expected = [s[0] for s in hf_greedy(hf, prompt, 4, 1)]
    assert sched.reqs["x"]["out"] == expected


def test_seeded_sampling_does_not_depend_on_the_batch(checkpoint, runner):
    params = SamplingParams(temperature=1.3, top_p=0.95, seed=1234)
    alone = FakeScheduler(runner)
    alone.add("s", [1, 2, 3], params)
    alone.step({"s": 3})
    for _ in range(5):
        alone.step({"s": 1})
    runner.input_batch.requests.clear()
    crowd = FakeScheduler(runner)
    crowd.add("other", [9, 8, 7, 6, 5], SamplingParams(temperature=1.0, seed=7))
    crowd.add("s", [1, 2, 3], params)
    crowd.step({"other": 5})
    crowd.step({"other": 1, "s": 3})
    for _ in range(5):
        crowd.step({"s": 1, "other": 1})
    assert crowd.reqs["s"]["out"] == alone.reqs["s"]["out"]


def test_num_blocks_for_memory_on_cpu(checkpoint):
    base = dict(model=checkpoint[0], dtype="float32", device="cpu", block_size=BLOCK_SIZE)
    bytes_per_block = 2 * 2 * BLOCK_SIZE * 2 * 12 * 4          # k+v, layers, block, kv heads, head_dim, fp32
    runner = ModelRunner(create_engine_config(**base, kv_cache_memory_bytes=bytes_per_block * 37 + 5))
    assert runner.num_blocks_for_memory() == 37
    runner = ModelRunner(create_engine_config(**base, num_gpu_blocks_override=11))
    assert runner.num_blocks_for_memory() == 11
    runner.initialize_kv_cache(11)
    assert len(runner.kv_caches) == 2 and runner.kv_caches[0][0].shape == (11, BLOCK_SIZE, 2, 12)


def test_kv_block_copies_reach_every_layer_and_nothing_else(runner):
    """Beam search copy on write: each (src, dst) pair copies K and V of every layer; the other
    blocks, sources included, keep their contents."""
    for index, (k_cache, v_cache) in enumerate(runner.kv_caches):   # each [num_blocks, block_size, kv_heads, head_dim]
        k_cache.copy_(torch.randn(k_cache.shape, generator=torch.Generator().manual_seed(2 * index)))
        v_cache.copy_(torch.randn(v_cache.shape, generator=torch.Generator().manual_seed(2 * index + 1)))
    before = [(k.clone(), v.clone()) for k, v in runner.kv_caches]
    copies = [(3, 10), (7, 2), (3, 40)]
    runner._copy_kv_blocks(copies)
    expected = [(k.clone(), v.clone()) for k, v in before]
    for k, v in expected:
        for src, dst in copies:
            k[dst], v[dst] = k[src], v[src]
    assert len(runner.kv_caches) == 2
    for (k, v), (k_expected, v_expected) in zip(runner.kv_caches, expected):
        assert torch.equal(k, k_expected) and torch.equal(v, v_expected)
    assert not torch.equal(runner.kv_caches[0][0][10], before[0][0][10])   # the copy did something
