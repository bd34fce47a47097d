"""Streamed quantization honours ``max_shard_size`` (transformers' default: one file for a small
model) instead of writing one shard per decoder block."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file
from tiny_models import char_tokenizer, inputs, llama_gqa
from transformers import AutoModelForCausalLM

import hfcompress

CFG = dict(bits=4, group_size=32, n_samples=4, seq_len=32)


def test_stream_shards_follow_max_shard_size(tmp_path):
    src = tmp_path / "float"
    llama_gqa().save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    one = hfcompress.quantize(str(src), hfcompress.GPTQConfig(**CFG), out_dir=str(tmp_path / "one"))
    files = sorted(p.name for p in (tmp_path / "one").glob("*.safetensors"))
    assert files == ["model.safetensors"] and not (tmp_path / "one" / "model.safetensors.index.json").exists()
    whole = load_file(str(tmp_path / "one" / "model.safetensors"))
    total = sum(t.numel() * t.element_size() for t in whole.values())

    limit = total // 3  # forces several shards, each holding whole blocks
    out = tmp_path / "many"
    hfcompress.quantize(str(src), hfcompress.GPTQConfig(**CFG), out_dir=str(out), max_shard_size=limit)
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) >= 2 and not (out / "model.safetensors").exists()
    assert not (out / ".hfcompress-parts").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] >= total and set(index["weight_map"]) == set(whole)
    for shard in shards:
        tensors = load_file(str(shard))
        assert all(index["weight_map"][k] == shard.name for k in tensors)
        assert all(torch.equal(v, whole[k]) for k, v in tensors.items())  # byte-exact merge
    # both reload to the same model; a second stream into the same folder leaves no stale shard
    ids = inputs()
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(one)(ids).logits
        b = AutoModelForCausalLM.from_pretrained(out)(ids).logits
    assert torch.equal(a, b)
    hfcompress.quantize(str(src), hfcompress.GPTQConfig(**CFG), out_dir=str(out))
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not (out / "model.safetensors.index.json").exists()
