"""GEAR KV-cache compression (hfcompress.GEARCache): the algorithm's pieces, the transformers Cache
contract (update / seq length / beam reorder / crop / batch ops), and generation on tiny models."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, Qwen2Config

import hfcompress
from hfcompress.kv.gear import (GEARSpec, compress, decompress, pack, quantize_groups, roundtrip as gear_roundtrip,
                                unpack)
from tiny_models import inputs, llama_gqa, sqnr_db


def kv_like(seed=0, B=2, H=3, C=4, n=32, d=16):
    """Random chunks shaped like real keys: a few channels with a large offset and scale, heavy tails."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, H, C, n, d, generator=g)
    x[..., :2] = x[..., :2] * 4 + 6                       # outlier channels (keys have them)
    spikes = torch.rand(B, H, C, n, d, generator=g) < 0.01
    return x + spikes * torch.randn(B, H, C, n, d, generator=g) * 12


def roundtrip(x, per_channel=True, **kw):
    spec = GEARSpec(**{"bits": 4, "group_size": 16, "rank": 2, "outlier_ratio": 0.01, "chunk_size": x.shape[-2], **kw})
    return gear_roundtrip(x, spec, per_channel)


# ---- the algorithm ------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_roundtrip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2 ** bits, (3, 5, 64), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (3, 5, 64 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack(packed, bits), codes)


@pytest.mark.parametrize("per_channel", [True, False], ids=["keys", "values"])
def test_more_bits_less_error(per_channel):
    x = kv_like()
    errs = [sqnr_db(x, roundtrip(x, per_channel, bits=b)) for b in (2, 4, 8)]
    assert errs[0] < errs[1] < errs[2]
    assert errs[2] > 40


@pytest.mark.parametrize("per_channel", [True, False], ids=["keys", "values"])
def test_ablation_each_piece_helps(per_channel):
    """Quantization alone < + outliers, < + low-rank, and the full recipe beats both (2-bit, where it matters)."""
    x = kv_like(seed=3)
    quant = sqnr_db(x, roundtrip(x, per_channel, bits=2, rank=0, outlier_ratio=0.0))
    outl = sqnr_db(x, roundtrip(x, per_channel, bits=2, rank=0, outlier_ratio=0.02))
    lowr = sqnr_db(x, roundtrip(x, per_channel, bits=2, rank=4, outlier_ratio=0.0))
    gear = sqnr_db(x, roundtrip(x, per_channel, bits=2, rank=4, outlier_ratio=0.02))
    assert outl > quant + 0.5 and lowr > quant + 0.5
    assert gear > max(outl, lowr)


def test_outliers_are_kept_exactly():
    x = kv_like(seed=5)
    spec = GEARSpec(bits=2, group_size=16, rank=0, outlier_ratio=0.02, chunk_size=32)
    state = compress(x, spec, per_channel=True)
    y = decompress(state, spec, True, x.shape)
    idx = state["outlier_index"].long()               # positions in the chunk's [n, d] layout
    assert idx.shape[-1] == spec.n_outliers(32, 16) == 11
    assert torch.equal(y.flatten(-2).gather(-1, idx), x.flatten(-2).gather(-1, idx))
    # the injected spikes (farthest from the mean of their group: 16 tokens of one channel) are kept
    xg = x.view(2, 3, 4, 2, 16, 16)
    spikes = (xg - xg.mean(-2, keepdim=True)).abs().flatten(-3).topk(3, -1).indices
    assert all(bool(torch.isin(spikes[b, h, c], idx[b, h, c]).all())
               for b in range(2) for h in range(3) for c in range(4))


def test_keys_per_channel_values_per_token():
    """Statistics shapes follow the paper's axes: keys one (scale, low) per channel per group of tokens,
    values one per token per group of channels."""
    x = kv_like(C=2, n=32, d=16)
    spec = GEARSpec(bits=4, group_size=8, rank=0, outlier_ratio=0.0, chunk_size=32)
    k, v = compress(x, spec, True), compress(x, spec, False)
    assert k["scale"].shape == (2, 3, 2, 4, 16)   # [B, H, C, n/g, d]
    assert v["scale"].shape == (2, 3, 2, 32, 2)   # [B, H, C, n, d/g]
    # an offset channel costs keys nothing (per-channel range), values pay for it (per-token range)
    assert sqnr_db(x, roundtrip(x, True, rank=0, outlier_ratio=0.0)) > sqnr_db(x, roundtrip(x, False, rank=0, outlier_ratio=0.0))


def test_compression_is_deterministic_and_independent_of_batching():
    x = kv_like(seed=7)
    spec = GEARSpec(bits=2, group_size=16, rank=3, outlier_ratio=0.01, chunk_size=32)
    a = compress(x, spec, True, seed=11)
    b = compress(x, spec, True, seed=11)
    assert all(torch.equal(a[k], b[k]) for k in a)
    one = compress(x[:, :, 1:2], spec, True, seed=11)       # chunk 1 alone
    torch.testing.assert_close(decompress(one, spec, True, x[:, :, 1:2].shape),
                               decompress(a, spec, True, x.shape)[:, :, 1:2], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("per_channel", [True, False], ids=["keys", "values"])
def test_compact_storage(per_channel):
    """compact=True: int8 log-coded scales (keys keep a float zero point, values an int8 one), int8
    low-rank factors; at 4 bits within 1 dB of the float statistics' error, smaller."""
    x = kv_like(seed=9, n=64, d=64, C=2).to(torch.bfloat16)
    kw = dict(bits=4, group_size=64, rank=2, outlier_ratio=0.01, chunk_size=64)
    plain, compact = GEARSpec(**kw), GEARSpec(**kw, compact=True)
    state = compress(x, compact, per_channel)
    assert state["scale"].dtype == state["lowrank_a"].dtype == state["lowrank_b"].dtype == torch.int8
    assert ("low" in state) == per_channel and ("zero" in state) == (not per_channel)
    size = {name: sum(t.nbytes for t in compress(x, spec, per_channel).values())
            for name, spec in (("plain", plain), ("compact", compact))}
    assert size["compact"] < size["plain"]
    err = {name: sqnr_db(x.float(), gear_roundtrip(x, spec, per_channel).float())
           for name, spec in (("plain", plain), ("compact", compact))}
    assert err["compact"] > err["plain"] - 1.0, err


def test_compact_scale_is_rounded_up_and_int_zero_fits_far_groups():
    """The 8-bit log scale never narrows the grid (no clipping beyond rounding), and a group far from 0
    (low > 127 steps) gets a wider scale rather than a clipped zero point."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 1, 1, 8, 64, generator=g)
    x[0] += 1000.0                                        # one token's values all near 1000
    codes, code, zero = quantize_groups(x, 4, False, 64, log_scale=True, int_zero=True)
    scale = torch.exp2(code.float() / 8).unsqueeze(-1)
    y = ((codes.view(2, 1, 1, 8, 1, 64).float() + zero.float().unsqueeze(-1)) * scale).view_as(x)
    step = scale.view(2, 1, 1, 8, 1).expand(2, 1, 1, 8, 64).reshape_as(x)
    assert ((y - x).abs() <= step * 0.5 + 1e-4).all()     # within half a step: nothing clipped
    plain = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / 15
    assert (step[1, ..., :1] >= plain[1]).all() and (step[1, ..., :1] <= plain[1] * 2 ** (1 / 8) + 1e-6).all()


@pytest.mark.parametrize("kw, match", [
    ({"bits": 3}, "bits=3"), ({"buffer_size": 24, "group_size": 16}, "multiple of group_size"),
    ({"rank": -1}, "rank=-1"), ({"outlier_ratio": 0.7}, "outlier_ratio"), ({"power_iters": 0}, "power_iters"),
])
def test_bad_arguments_are_named(kw, match):
    with pytest.raises(ValueError, match=match):
        hfcompress.GEARCache(**kw)


def test_value_group_must_divide_head_dim():
    m = llama_gqa()                                   # head_dim 16
    cache = hfcompress.GEARCache(group_size=12, buffer_size=12)
    with pytest.raises(ValueError, match="head_dim=16"):
        m(inputs(1, 20), cache=cache, use_cache=True)


def test_sliding_window_layers_refused():
    cfg = Qwen2Config(num_hidden_layers=2, use_sliding_window=True, sliding_window=8, max_window_layers=1,
                      layer_types=["full_attention", "sliding_attention"])
    with pytest.raises(ValueError, match="sliding_attention"):
        hfcompress.GEARCache(config=cfg)


# ---- the Cache contract on a tiny Llama ---------------------------------------------------------

def feed(model, ids, cache, step):
    with torch.no_grad():
        return torch.cat([model(ids[:, s:s + step], cache=cache, use_cache=True).logits
                          for s in range(0, ids.shape[1], step)], dim=1)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_high_bits_matches_full_cache(attn):
    model = llama_gqa()
    model.set_attn_implementation(attn)
    ids = inputs(batch=2, seq=70)
    with torch.no_grad():
        ref = model(ids).logits
    cache = hfcompress.GEARCache(bits=8, group_size=16, rank=2, outlier_ratio=0.01, buffer_size=16)
    got = feed(model, ids, cache, step=9)
    assert cache.get_seq_length() == 70 and cache.layers[0].n_chunks == 4 and cache.layers[0].keys.shape[-2] == 6
    assert sqnr_db(ref, got) > 35
    low = feed(model, ids, hfcompress.GEARCache(bits=2, group_size=16, rank=0, outlier_ratio=0.0, buffer_size=16), 9)
    assert sqnr_db(ref, low) < sqnr_db(ref, got) - 10   # the cache really is used (and lossy at 2 bits)


def test_generate_matches_full_cache_at_high_bits():
    model = llama_gqa(seed=2)
    ids = inputs(batch=2, seq=30, seed=4)
    kw = dict(max_new_tokens=24, do_sample=False, output_scores=True, return_dict_in_generate=True,
              attention_mask=torch.ones_like(ids), pad_token_id=0)
    ref = model.generate(ids, **kw)
    got = model.generate(ids, cache=hfcompress.GEARCache(bits=8, group_size=8, rank=2, buffer_size=8), **kw)
    assert torch.equal(ref.sequences, got.sequences)
    assert sqnr_db(torch.stack(ref.scores), torch.stack(got.scores)) > 30
    assert got.cache.get_seq_length() == 30 + 24 - 1


def test_beam_search():
    model = llama_gqa(seed=1)
    ids = inputs(batch=2, seq=21, seed=9)
    kw = dict(max_new_tokens=12, num_beams=3, do_sample=False, attention_mask=torch.ones_like(ids), pad_token_id=0)
    ref = model.generate(ids, **kw)
    got = model.generate(ids, cache=hfcompress.GEARCache(bits=8, group_size=8, rank=2, buffer_size=8), **kw)
    assert torch.equal(ref, got)


def test_reorder_and_batch_ops_move_every_tensor():
    model = llama_gqa()
    ids = inputs(batch=3, seq=40)
    cache = hfcompress.GEARCache(bits=4, group_size=8, rank=2, buffer_size=16)
    feed(model, ids, cache, 40)
    before = [layer.decompressed() for layer in cache.layers]
    bufs = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
    idx = torch.tensor([2, 0, 0])
    cache.reorder_cache(idx)
    for layer, (k, v), (bk, bv) in zip(cache.layers, before, bufs):
        k2, v2 = layer.decompressed()
        assert torch.equal(k2, k[idx]) and torch.equal(v2, v[idx])
        assert torch.equal(layer.keys, bk[idx]) and torch.equal(layer.values, bv[idx])
    cache.batch_select_indices(torch.tensor([1]))
    cache.batch_repeat_interleave(2)
    k3, _ = cache.layers[0].decompressed()
    assert k3.shape[0] == 2 and torch.equal(k3[1], before[0][0][0])


def test_crop():
    model = llama_gqa()
    ids = inputs(batch=2, seq=50)
    cache = hfcompress.GEARCache(bits=4, group_size=8, rank=2, buffer_size=16)
    feed(model, ids, cache, 50)                      # 3 chunks of 16 + 2 buffered
    layer = cache.layers[1]
    k_all = torch.cat([layer.decompressed()[0], layer.keys], dim=-2)
    cache.crop(-1)                                   # inside the float buffer: exact
    assert cache.get_seq_length() == 49 and torch.equal(layer.keys, k_all[..., 48:49, :])
    cache.crop(-20)                                  # into the compressed chunks
    assert cache.get_seq_length() == 29 and layer.n_chunks == 1
    assert torch.equal(torch.cat([layer.decompressed()[0], layer.keys], dim=-2), k_all[..., :29, :])
    with pytest.raises(ValueError, match="negative"):
        cache.crop(3)
    # the cropped cache continues like a cache built from the kept tokens' values
    with torch.no_grad():
        out = model(ids[:, 29:33], cache=cache, use_cache=True).logits
    assert cache.get_seq_length() == 33 and torch.isfinite(out).all()


def _all_tensors(obj, seen):
    if isinstance(obj, torch.Tensor):
        if id(obj) not in seen:
            seen[id(obj)] = obj
    elif isinstance(obj, dict):
        for v in obj.values():
            _all_tensors(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _all_tensors(v, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for v in vars(obj).values():
            _all_tensors(v, seen)
    return seen


@pytest.mark.parametrize("cfg", [dict(rank=2, outlier_ratio=0.02), dict(rank=0, outlier_ratio=0.0),
                                 dict(rank=2, outlier_ratio=0.02, compact=True), dict(rank=0, outlier_ratio=0.0, compact=True)],
                         ids=["gear", "quant", "gear-compact", "quant-compact"])
def test_nbytes_counts_every_tensor(cfg):
    model = llama_gqa()
    ids = inputs(batch=2, seq=45)
    cache = hfcompress.GEARCache(bits=4, group_size=8, buffer_size=16, **cfg)
    feed(model, ids, cache, 45)
    tensors = _all_tensors(cache, {})
    assert cache.nbytes() == sum(t.untyped_storage().nbytes() for t in tensors.values())
    parts = cache.nbytes_by_part()
    assert sum(parts.values()) == cache.nbytes() and (parts["lowrank"] > 0) == (cfg["rank"] > 0)
    B, H, d, L, C, n = 2, 2, 16, 2, 2, 16
    elem = 4  # fp32 model
    assert parts["codes"] == L * 2 * B * H * C * n * d // 2 and parts["float_buffer"] == L * 2 * B * H * (45 - C * n) * d * elem
    groups = B * H * C * n * d // 8          # per tensor: keys n/8 x d, values n x d/8
    if cfg.get("compact"):                   # keys: int8 scale + float low; values: int8 scale + int8 zero
        assert parts["statistics"] == L * groups * ((1 + elem) + (1 + 1))
    else:                                    # (scale, low) in the model's dtype, keys and values
        assert parts["statistics"] == L * groups * 2 * 2 * elem
    full = DynamicCache(config=model.config)
    feed(model, ids, full, 45)
    full_bytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in full.layers)
    assert cache.nbytes() < (0.8 if cfg["rank"] else 0.6) * full_bytes   # tiny heads and groups: overheads are large


def test_works_on_an_hfcompress_quantized_model():
    model = llama_gqa(seed=3)
    hfcompress.quantize_(model, hfcompress.RTNConfig(bits=4, group_size=32))
    ids = inputs(batch=2, seq=40, seed=2)
    with torch.no_grad():
        ref = model(ids).logits
    got = feed(model, ids, hfcompress.GEARCache(bits=8, group_size=8, rank=2, buffer_size=8), 10)
    assert sqnr_db(ref, got) > 30


def test_bf16_model():
    model = llama_gqa(seed=4).to(torch.bfloat16)
    ids = inputs(batch=2, seq=40, seed=3)
    with torch.no_grad():
        ref = model(ids).logits.float()
    cache = hfcompress.GEARCache(bits=4, group_size=8, rank=2, buffer_size=16)
    got = feed(model, ids, cache, 10).float()
    assert cache.layers[0].keys.dtype == torch.bfloat16 and cache.layers[0].compressed["k"]["scale"].dtype == torch.bfloat16
    assert sqnr_db(ref, got) > 15


def test_forward_with_autograd_on():
    """A forward outside no_grad (e.g. scoring with gradients) works: the compressed past is
    detached, the current tokens keep their graph."""
    model = llama_gqa(seed=5)
    ids = inputs(batch=1, seq=40, seed=5)
    cache = hfcompress.GEARCache(bits=4, group_size=8, rank=2, buffer_size=16)
    model(ids[:, :30], cache=cache, use_cache=True)
    out = model(ids[:, 30:], cache=cache, use_cache=True).logits
    out.float().pow(2).mean().backward()
    assert model.model.layers[0].self_attn.v_proj.weight.grad.abs().sum() > 0
    assert not any(t.requires_grad for layer in cache.layers for s in layer.compressed.values() for t in s.values())


def test_ablation_switches_on_a_model():
    """Each switch does what it says through a real forward: 2-bit logits get closer to the full
    cache's with outliers, closer still with the low-rank residual, closest with both; memory
    moves the other way."""
    model = llama_gqa(seed=1)
    ids = inputs(batch=2, seq=96, seed=1)
    with torch.no_grad():
        ref = model(ids).logits
    sq, nb = {}, {}
    for name, kw in {"quant": dict(rank=0, outlier_ratio=0.0), "outliers": dict(rank=0, outlier_ratio=0.02),
                     "lowrank": dict(rank=4, outlier_ratio=0.0), "gear": dict(rank=4, outlier_ratio=0.02)}.items():
        cache = hfcompress.GEARCache(bits=2, group_size=16, buffer_size=16, **kw)
        sq[name], nb[name] = sqnr_db(ref, feed(model, ids, cache, 8)), cache.nbytes()
    assert sq["quant"] + 0.5 < sq["outliers"] < sq["gear"] and sq["quant"] + 2 < sq["lowrank"] < sq["gear"]
    assert nb["quant"] < nb["outliers"] < nb["gear"] and nb["quant"] < nb["lowrank"] < nb["gear"]
