"""A tiny random-weight Qwen3-MoE for the vLLM tests (no download): 2 MoE layers, hidden 256,
16 experts, top-4, float32, a WordLevel tokenizer over the words ``w0`` .. ``w239``.

Routing is made predictable: prompts written in the words of one *phase* send almost every
token to that phase's hot experts (the word embeddings carry a direction that those experts'
router rows favour), so a test can move the hot spot from one rank to the other by switching
prompts. The output head is scaled up so that greedy decoding has clear winners (no near-ties
that floating-point summation order could flip between two parallel layouts).

Run with vLLM's Python: ``python tinymoe.py OUT_DIR``.
"""

from __future__ import annotations

import sys
from pathlib import Path

#: Hot experts per phase. Initial vLLM layout with 4 redundant slots on 2 ranks: rank 0 holds
#: experts 0-9, rank 1 holds 10-15 and 0-3; so phase "a" is hot on rank 0, "b" on rank 1.
HOT = {"a": (5, 6, 7), "b": (12, 13, 14)}
WORDS = 240
NUM_EXPERTS, TOP_K, LAYERS, HIDDEN = 16, 4, 2, 256


def phase_words(phase: str) -> list[str]:
    """The words whose tokens route to ``phase``'s hot experts."""
    start = {"a": 0, "b": 100}[phase]
    return [f"w{i}" for i in range(start, start + 100)]


def prompts(phase: str, n: int = 6, length: int = 24) -> list[str]:
    """``n`` deterministic prompts of ``length`` words of ``phase``."""
    words = phase_words(phase)
    return [" ".join(words[(7 * i + 13 * j) % len(words)] for j in range(length)) for i in range(n)]


def build(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i + 3 for i in range(WORDS)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    cfg = Qwen3MoeConfig(
        vocab_size=256,
        hidden_size=HIDDEN,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=512,
        norm_topk_prob=True,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg).to(torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        for phase, hot in HOT.items():
            u = torch.randn(HIDDEN, generator=g)
            u /= u.norm()
            for w in phase_words(phase):
                emb[vocab[w]] += 1.0 * u
            for layer in model.model.layers:
                for e in hot:
                    layer.mlp.gate.weight[e] += 0.3 * u
        model.lm_head.weight.mul_(10.0)
    model.save_pretrained(out, safe_serialization=True)
    fast.save_pretrained(out)


if __name__ == "__main__":
    build(Path(sys.argv[1]))
