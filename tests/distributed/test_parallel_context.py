"""The rank arithmetic, against hand-computed layouts: pipeline layer ranges, KV heads per TP rank
(sharded, or replicated past num_kv_heads, always the head the rank's query heads use under GQA),
and the balanced split of a step's images over TP ranks."""

import pytest

from engine.distributed.mm_encoder import assign_items
from engine.distributed.parallel_context import ParallelContext, kv_heads_of_rank, layer_range


def test_layer_ranges_cover_every_layer_once_with_the_extra_layers_first():
    assert [layer_range(7, r, 3) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]
    assert [layer_range(4, r, 2) for r in range(2)] == [(0, 2), (2, 4)]
    with pytest.raises(ValueError, match="--pipeline-parallel-size: 3 stages"):
        layer_range(2, 0, 3)


@pytest.mark.parametrize("num_heads,num_kv_heads,tp", [(8, 8, 4), (8, 2, 2), (8, 2, 4), (8, 2, 8), (4, 1, 2), (28, 4, 4)])
def test_kv_heads_of_rank_are_the_heads_its_query_heads_use(num_heads, num_kv_heads, tp):
    group = num_heads // num_kv_heads
    for rank in range(tp):
        first, count = kv_heads_of_rank(num_kv_heads, ParallelContext(tp_rank=rank, tp_size=tp))
        query_heads = range(rank * num_heads // tp, (rank + 1) * num_heads // tp)
        assert sorted({h // group for h in query_heads}) == list(range(first, first + count))


def test_kv_heads_that_cannot_be_split_are_a_config_error():
    with pytest.raises(ValueError, match="--tensor-parallel-size: 3 is larger than the model's 2 KV heads"):
        kv_heads_of_rank(2, ParallelContext(tp_rank=0, tp_size=3))
    with pytest.raises(ValueError, match="--tensor-parallel-size: 4 does not divide num_key_value_heads"):
        kv_heads_of_rank(6, ParallelContext(tp_rank=0, tp_size=4))


def test_images_are_dealt_to_the_least_loaded_rank():
    assert assign_items([100, 30, 60, 40], 2) == [[0, 1], [2, 3]]   # 100+30 vs 60+40
    assert assign_items([16, 16, 16], 2) == [[0, 2], [1]]
    assert assign_items([16], 4) == [[0], [], [], []]


def test_models_that_cannot_be_sharded_are_rejected_by_name():
    from engine.config_loader import _check_model_supports_parallel

    _check_model_supports_parallel("Qwen2_5_VLForConditionalGeneration")
    with pytest.raises(ValueError, match="InternVLChatModel does not support tensor or pipeline parallelism"):
        _check_model_supports_parallel("InternVLChatModel")
