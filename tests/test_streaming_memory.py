"""What streamed quantization keeps in memory while it calibrates (issue #24): the modules outside
the decoder blocks (embeddings, head) wait on ``meta`` while the blocks are calibrated, and freed
heap pages go back to the OS after every pass over the calibration inputs; the checkpoint is the
in-memory one all the same."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from tiny_models import char_tokenizer, inputs, llama_gqa
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress.calibration import apply, blocks

CFG = dict(bits=4, group_size=32, n_samples=4, seq_len=32)


def _tensors(folder):
    out = {}
    for f in folder.glob("*.safetensors"):
        out.update(load_file(f))
    return out


def test_stream_frees_outside_modules_while_calibrating_and_writes_the_in_memory_checkpoint(tmp_path, monkeypatch):
    src = tmp_path / "float"
    llama_gqa(seed=5).save_pretrained(src)  # untied head: embeddings and lm_head are two tensors
    char_tokenizer().save_pretrained(src)
    batches = [inputs(batch=2, seq=24, seed=s) for s in range(2)]
    seen = []  # per block: were the embeddings / head on meta while it was calibrated?
    real = apply.iterate_blocks

    def spy(model, *args, **kwargs):
        for step in real(model, *args, **kwargs):
            seen.append((model.model.embed_tokens.weight.is_meta, model.lm_head.weight.is_meta))
            yield step

    monkeypatch.setattr(apply, "iterate_blocks", spy)

    def cfg():  # lm_head quantized too (data-free fallback): it must be back before that
        return hfcompress.GPTQConfig(**CFG, modules_to_not_convert=[])

    hfcompress.quantize(str(src), cfg(), out_dir=str(tmp_path / "s"), batches=batches)
    assert seen == [(True, True), (True, True)]
    model = AutoModelForCausalLM.from_pretrained(src)
    hfcompress.quantize(model, cfg(), batches=batches, out_dir=str(tmp_path / "m"))
    streamed, in_memory = _tensors(tmp_path / "s"), _tensors(tmp_path / "m")
    assert "lm_head.weight_scale" in streamed and "model.embed_tokens.weight" in streamed
    assert sorted(streamed) == sorted(in_memory)
    for key, value in in_memory.items():
        assert torch.equal(streamed[key], value), key


def test_freed_memory_is_returned_after_every_pass(monkeypatch):
    calls = []
    monkeypatch.setattr(blocks, "return_freed_memory", lambda: calls.append(1))
    model = llama_gqa(seed=1)
    steps = 0
    for step in blocks.iterate_blocks(model, [inputs(batch=2, seq=16, seed=s) for s in range(2)]):
        n = len(calls)
        step.collect_input_stats(["self_attn.q_proj"])
        assert len(calls) == n + 1  # after the stats pass
        step.run()
        assert len(calls) == n + 2  # after a plain pass
        steps += 1
    assert steps == 2 and len(calls) == 1 + 3 * 2  # the capture, and per block: 2 passes + the advance
