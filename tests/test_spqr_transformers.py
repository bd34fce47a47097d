"""transformers' own SpQR format (quant_method "spqr"): export from and import into hfcompress's
spqr format, checked against transformers' SpQRConfig / integration code (names, lengths in
``shapes``, dtypes of spqr_quant's placeholders) and against a line-by-line port of spqr_quant's
host ``dequantize_compressed`` (spqr_cuda.cpp; fp16 arithmetic), which must rebuild our weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import hfcompress
from hfcompress.convert.gptq_to_int_group import ConversionError
from hfcompress.convert.spqr_transformers import export_transformers_spqr, import_transformers_spqr
from hfcompress.formats.spqr import SpQRLinear
from tiny_models import inputs, llama_gqa

# spqr_quant.QuantizedLinear.create_placehodler: the dtypes transformers' loader builds
PLACEHOLDER_DTYPES = {"dense_weights": torch.int64, "row_offsets": torch.int32, "col_vals": torch.int32,
                      "in_perm": torch.int32}


def spqr_quant_dequantize(m, n, dense, row_offsets, col_vals, in_perm):
    """spqr_cuda.cpp ``dequantize_compressed`` (bits 3, beta1 = beta2 = 16, CSR), then the input
    permutation undone: the weight [m, n] in input column order, fp16."""
    half = torch.float16
    words = [int(v) & 0xFFFFFFFFFFFFFFFF for v in dense.tolist()]
    deq = torch.zeros(m, n, dtype=torch.float32)
    ptr = 0
    for ii in range(0, m, 16):
        for jj in range(0, n, 16):
            w2 = 0
            for k in range(16):
                partial = words[ptr + k] >> (3 * 18)
                w2 |= partial << (8 * (k // 2))
            quad = [(w2 >> s) & 0xFFFF for s in (0, 16, 32, 48)]  # ss.x, ss.y, zz.x, zz.y

            def h(bits):
                return torch.tensor([bits], dtype=torch.int32).to(torch.int16).view(half)[0]
            wss2, wzs2, wsz2, wzz2 = h(quad[0]), h(quad[1]), h(quad[2]), h(quad[3])
            for i in range(16):
                word = words[ptr]
                ws, wz = torch.tensor(word & 7, dtype=half), torch.tensor((word >> 3) & 7, dtype=half)
                s = ((ws - wsz2) * wss2).to(half)   # half operators: each op rounded to fp16
                z = ((wz - wzz2) * wzs2).to(half)
                for j in range(16):
                    q = torch.tensor((word >> (3 * (2 + j))) & 7, dtype=half)
                    deq[ii + i, jj + j] = ((q - z) * s).float()
                ptr += 1
    cv = col_vals.to(torch.int64)
    cols = (cv & 0xFFFF).to(torch.int32).to(torch.int16).to(torch.int64)
    vals = ((cv >> 16) & 0xFFFF).to(torch.int32).to(torch.int16).view(half).float()
    for r in range(m):
        for j in range(int(row_offsets[r]), int(row_offsets[r + 1])):
            deq[r, cols[j]] += vals[j]
    deq = deq.to(half)
    if in_perm.numel():
        p = in_perm.to(torch.int64) & 0xFFFFFFFF
        perm = torch.stack([p & 0xFFFF, p >> 16], 1).reshape(-1)
        out = torch.empty_like(deq)
        out[:, perm] = deq
        deq = out
    return deq


def _tiny_spqr(tmp_path, act_order=True):
    model = llama_gqa(seed=3)
    batches = [inputs(batch=2, seq=16, seed=s) for s in range(3)]
    cfg = hfcompress.SpQRConfig(outlier_threshold=0.5, act_order=act_order)
    q = hfcompress.quantize_(model, cfg, batches=batches).to(torch.float16)
    q.save_pretrained(tmp_path / "ours")
    return q


@pytest.mark.parametrize("act_order", [True, False], ids=["act_order", "natural"])
def test_export_matches_transformers_layout_and_spqr_quant_dequantizes_our_weights(tmp_path, act_order):
    from transformers.utils.quantization_config import SpQRConfig as HFSpQRConfig

    model = _tiny_spqr(tmp_path, act_order)
    export_transformers_spqr(tmp_path / "ours", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    hf = HFSpQRConfig.from_dict(cfg["quantization_config"])  # transformers' own validation (bits 3, 16 x 16)
    assert cfg["quantization_config"]["quant_method"] == "spqr" and hf.bits == 3
    assert cfg["quantization_config"]["modules_to_not_convert"] == ["lm_head"]
    t = load_file(tmp_path / "hf" / "model.safetensors")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SpQRLinear)}
    assert sum(m.n_outliers for m in layers.values()) > 0
    for name, layer in layers.items():
        for tensor, dtype in PLACEHOLDER_DTYPES.items():  # what replace_with_spqr_linear reads from `shapes`
            key = f"{name}.{tensor}"
            assert t[key].dtype == dtype and t[key].dim() == 1, key
            assert hf.shapes[f"{key}.shape"] == t[key].shape[0], key
        assert not any(k.startswith(name + ".weight") for k in t), name
        got = spqr_quant_dequantize(layer.out_features, layer.in_features, t[f"{name}.dense_weights"],
                                    t[f"{name}.row_offsets"], t[f"{name}.col_vals"], t[f"{name}.in_perm"])
        ours = layer.dequantize(torch.float16)
        differ = got != ours  # spqr_quant rounds the dense value to fp16 before adding an outlier: double rounding
        outlier = torch.zeros_like(differ)
        st = layer.stored_tensors()
        rows = torch.repeat_interleave(torch.arange(layer.out_features),
                                       (st["weight_outlier_ptr"][1:] - st["weight_outlier_ptr"][:-1]).long())
        cols = st["weight_outlier_col"].long()
        if act_order:
            cols = st["weight_perm"].long()[cols]
        outlier[rows, cols] = True
        assert not (differ & ~outlier).any(), name  # every dense-only weight is the same fp16 number
        ulp = torch.finfo(torch.float16).eps * ours.float().abs().clamp_min(2 ** -14)
        assert bool(((got.float() - ours.float()).abs() <= ulp)[differ].all()), name
    assert t["lm_head.weight"].dtype == torch.float16


def test_import_round_trip_is_bit_exact_and_runs_on_cpu(tmp_path):
    from transformers import AutoModelForCausalLM

    _tiny_spqr(tmp_path)
    export_transformers_spqr(tmp_path / "ours", tmp_path / "hf")
    import_transformers_spqr(tmp_path / "hf", tmp_path / "back")
    mine, back = load_file(tmp_path / "ours" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert set(mine) == set(back)
    for k in mine:
        assert torch.equal(mine[k], back[k]), k
    ids = inputs()
    with torch.no_grad():
        for dtype in (torch.float32, torch.float16):
            before = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=dtype)
            reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "back", dtype=dtype)
            assert torch.equal(reloaded(ids).logits, before(ids).logits)
    from hfcompress.integrity import verify

    assert verify(str(tmp_path / "back")).ok


def test_refusals_name_the_layer(tmp_path):
    _tiny_spqr(tmp_path)
    export_transformers_spqr(tmp_path / "ours", tmp_path / "hf")
    t = load_file(tmp_path / "hf" / "model.safetensors")
    key = "model.layers.1.mlp.up_proj.dense_weights"
    t[key] = t[key] ^ (5 << 3)  # zero codes changed, and the statistics now say zero = 0.5 * (code - 0)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    zs_bits = torch.tensor([0.5], dtype=torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF
    w = t[key].view(-1, 16)  # rows 2b, 2b+1 of a tile carry byte b of the statistics; zero_scale is bytes 2-3
    w[:, 4:6] = (w[:, 4:6] & ~(0xFF << 54)) | (int(zs_bits) & 0xFF) << 54
    w[:, 6:8] = (w[:, 6:8] & ~(0xFF << 54)) | (int(zs_bits) >> 8) << 54
    save_file(t, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"model\.layers\.1\.mlp\.up_proj: its first-level zeros"):
        import_transformers_spqr(tmp_path / "hf", tmp_path / "back")
    assert not (tmp_path / "back").exists()
    cfg["quantization_config"]["bits"] = 4
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="bits=4"):
        import_transformers_spqr(tmp_path / "hf", tmp_path / "back")
    with pytest.raises(ConversionError, match="quant_method='spqr'|this export takes an hfcompress spqr"):
        export_transformers_spqr(tmp_path / "hf", tmp_path / "again")


def test_cli_export_and_convert_back(tmp_path):
    from hfcompress.cli.main import main

    _tiny_spqr(tmp_path)
    assert main(["export", str(tmp_path / "ours"), "--to", "transformers-spqr", "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["quantization_config"]["quant_method"] == "spqr"
    assert main(["convert", str(tmp_path / "hf"), "--from", "transformers-spqr", "--out", str(tmp_path / "back")]) == 0
    mine, back = load_file(tmp_path / "ours" / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert all(torch.equal(mine[k], back[k]) for k in mine) and set(mine) == set(back)
