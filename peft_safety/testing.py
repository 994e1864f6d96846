"""Tiny models and a tokenizer built in code, for tests, examples and benchmarks.

Nothing here touches the network. The models are small enough that a forward and backward pass takes milliseconds on
a CPU, but they keep the structure that matters to peft-safety: grouped-query attention (4 query heads sharing
2 key/value heads), gated MLPs (gate/up rows and down columns), and for the MoE model per-expert weights and a router.

Example:

```python
>>> from peft_safety.testing import tiny_llama, tiny_tokenizer
>>> model, tok = tiny_llama(seed=0), tiny_tokenizer()
>>> model.config.num_key_value_heads
2
```
"""

from __future__ import annotations

import string

import torch

__all__ = ["TINY_CHAT_TEMPLATE", "benchmark_llama", "tiny_llama", "tiny_mixtral", "tiny_qwen2_moe", "tiny_tokenizer"]

#: A minimal chat template (ChatML-like), with ``{% generation %}`` markers so TRL's ``assistant_only_loss`` works.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_SPECIAL = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer(chat_template: str | None = TINY_CHAT_TEMPLATE):
    """A character-level ``PreTrainedTokenizerFast`` (vocabulary of 128) with a chat template.

    Args:
        chat_template: the Jinja chat template to attach, or `None` for a tokenizer without one (to test the error
            paths of code that needs a template).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = list(string.ascii_letters + string.digits + string.punctuation + " \n\t")
    vocab = {tok: i for i, tok in enumerate(_SPECIAL + chars)}
    # fill the vocabulary up to 128 entries so ids never exceed the tiny models' embedding table
    i = len(vocab)
    while len(vocab) < 128:
        vocab[f"<extra_{i}>"] = i
        i += 1
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = chat_template
    return tok


def tiny_llama(seed: int = 0, num_hidden_layers: int = 2, dtype: torch.dtype = torch.float32, **overrides):
    """A ``LlamaForCausalLM`` with GQA (4 heads, 2 KV heads, head dim 8), hidden 32, MLP 64, vocabulary 128.

    Args:
        seed: seed of the weight initialisation (the same seed gives bit-identical weights).
        num_hidden_layers: number of decoder layers.
        dtype: parameter dtype.
        **overrides: any other ``LlamaConfig`` field.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=5,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(dtype)
    model.eval()
    return model


def tiny_qwen2_moe(seed: int = 0, num_hidden_layers: int = 2, **overrides):
    """A ``Qwen2MoeForCausalLM`` with 4 experts (top-2), a shared expert and GQA, vocabulary 128."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=32,
        num_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=5,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**cfg))
    model.eval()
    return model


def tiny_mixtral(seed: int = 0, num_hidden_layers: int = 2, **overrides):
    """A ``MixtralForCausalLM`` with 4 experts (top-2) and GQA, vocabulary 128."""
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=32,
        num_local_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=5,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = MixtralForCausalLM(MixtralConfig(**cfg))
    model.eval()
    return model


def benchmark_llama(small: bool = False, seed: int = 0, **overrides):
    """A Llama built from config for benchmarks: ~62M parameters (4 layers, hidden 1024, MLP 2816, 16 heads / 4 KV
    heads, vocabulary 8192), or with ``small=True`` a 2-layer smoke-test model. Gradients are left enabled.

    Args:
        small: the tiny smoke-test size (hidden 64) instead of the benchmark size.
        seed: seed of the weight initialisation.
        **overrides: any other ``LlamaConfig`` field.
    """
    if small:
        size = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16)  # fmt: skip
    else:
        size = dict(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                    num_attention_heads=16, num_key_value_heads=4, head_dim=64)  # fmt: skip
    size.update(overrides)
    model = tiny_llama(seed=seed, **size)
    model.train()
    return model
