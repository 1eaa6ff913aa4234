"""The beam-search oracle: transformers' generate(num_beams=k, num_return_sequences=k,
do_sample=False) on the float32 eager model of tests/reference.py, one request at a time.

Caller: tests/engine/test_beam_search.py and tests/app/test_beam_search_server.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reference import load, prepare_inputs


@dataclass(frozen=True)
class RefBeam:
    token_ids: list[int]     # generated tokens, the stopping token included
    score: float             # transformers' sequences_scores: sum_logprobs / generated_len ** length_penalty


@torch.inference_mode()
def hf_beam_search(model_dir, request, width: int, max_new_tokens: int, length_penalty: float = 1.0,
                   early_stopping: bool | str = False, ignore_eos: bool = False,
                   stop_token_ids: tuple[int, ...] = (), min_new_tokens: int = 0) -> list[RefBeam]:
    """The k returned beams, best first. Stops on the checkpoint's EOS ids unless ignore_eos, and on
    stop_token_ids (vLLM's meaning: they join the EOS list)."""
    loaded = load(str(model_dir))
    inputs = prepare_inputs(model_dir, request)
    eos_token_ids = ([] if ignore_eos else list(loaded.eos_token_ids)) + list(stop_token_ids)
    loaded.model.generation_config.eos_token_id = eos_token_ids or None
    out = loaded.model.generate(
        **inputs, num_beams=width, num_return_sequences=width, do_sample=False, max_new_tokens=max_new_tokens,
        length_penalty=length_penalty, early_stopping=early_stopping, min_new_tokens=min_new_tokens or None,
        eos_token_id=eos_token_ids or None, pad_token_id=loaded.tokenizer.pad_token_id,
        output_scores=True, return_dict_in_generate=True,
        repetition_penalty=None, temperature=None, top_k=None, top_p=None)
    num_prompt = inputs["input_ids"].shape[1]
    beams = []
    for row in range(width):
        generated_len = int((out.beam_indices[row] >= 0).sum())
        beams.append(RefBeam(out.sequences[row, num_prompt:num_prompt + generated_len].tolist(),
                             float(out.sequences_scores[row])))
    return beams
