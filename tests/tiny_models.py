"""Tiny models built in-process from configs (no downloads). Shapes are deliberately odd
enough to exercise ragged groups; every builder is seeded."""

from __future__ import annotations

import torch
from transformers import (
    BertConfig,
    BertForMaskedLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 160


def llama_gqa(seed: int = 0, tie: bool = False):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg).eval()


def qwen2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).eval()


def gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def bert(seed: int = 0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=128)
    return BertForMaskedLM(cfg).eval()


BUILDERS = {"llama": llama_gqa, "qwen2": qwen2, "gpt2": gpt2, "bert": bert}


def inputs(batch: int = 2, seq: int = 17, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    ref, test = ref.double(), test.double()
    return (10 * torch.log10(ref.pow(2).sum() / (ref - test).pow(2).sum().clamp_min(1e-300))).item()


def char_tokenizer():
    """A real (fast) tokenizer built in-process: one token per character, VOCAB ids, id 0 = unknown.
    Enough for calibration text -> token batches and save/reload with a tiny model."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"] + [chr(c) for c in range(0xC0, 0x100)]
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars[:VOCAB - 1])}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")


def eora_sqnr_db(orig, quantized) -> tuple[float, float]:
    """SQNR (dB) against ``orig``'s logits of ``quantized`` before and after EoRA rank-8 compensation
    (seeded inputs and calibration tokens)."""
    import hfcompress

    ids = inputs(batch=4, seq=31, seed=99)
    with torch.no_grad():
        ref, base = orig(ids).logits, quantized(ids).logits
    pm = hfcompress.compensate(quantized, orig, hfcompress.EoRAConfig(rank=8, dataset=inputs(batch=16, seq=48, seed=11)))
    with torch.no_grad():
        comp = pm(ids).logits
    return sqnr_db(ref, base), sqnr_db(ref, comp)
