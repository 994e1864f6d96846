"""Batched greedy generation (left padding, KV cache, the main job's batch sizes) against a naive reference: one
prompt at a time, no padding, no cache, the whole sequence re-run and the argmax taken at every step."""

from __future__ import annotations

import pytest
import torch


def _naive_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos: int) -> list[int]:
    ids = list(prompt_ids)
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            token = int(logits.argmax())
            out.append(token)
            if token == eos:
                break
            ids.append(token)
    return out


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_batched_left_padded_greedy_equals_one_by_one_token_for_token(batch_size):
    from peft_safety.scoring.generation import generate_with_stats, render_prompts
    from peft_safety.testing import tiny_llama, tiny_tokenizer

    model, tok = tiny_llama(seed=3, num_hidden_layers=2), tiny_tokenizer()
    # prompts of very different lengths, so batches are padded on the left by up to ~40 tokens
    prompts = ["a", "hello there", "how do I bake bread?", "tell me a long story about dragons and castles", "x y",
               "what is 2+2?", "Explain photosynthesis in one short paragraph, please.", "ok"]  # fmt: skip
    max_new = 12
    eos = tok.eos_token_id
    expected = [_naive_greedy(model, ids, max_new, eos) for ids in render_prompts(tok, prompts)]
    got, stats = generate_with_stats(
        model, tok, prompts, max_new_tokens=max_new, batch_size=batch_size, progress=False
    )
    want = [tok.decode(e, skip_special_tokens=True).strip() for e in expected]
    assert got == want
    # every generated token counted, up to and including the first EOS
    assert stats.new_tokens == sum(len(e) for e in expected)
    # the reference really differs between prompts (a model that ignores its input would pass trivially otherwise)
    assert len(set(want)) > 1
