"""hfcompress spqr checkpoints <-> transformers' own SpQR format (``quant_method: "spqr"``, the
layout of ``spqr_quant.QuantizedLinear``, read by transformers' ``SpQRHfQuantizer``), both ways.

Per quantized linear layer ``W [N, K]`` transformers stores (names as in
``transformers.integrations.spqr.replace_with_spqr_linear``, dtypes as in
``QuantizedLinear.create_placehodler``; the config lists each 1-D length under
``quantization_config.shapes["<module>.<tensor>.shape"]``):

==================  =====  ====================  ===================================================
tensor              dtype  length                content
==================  =====  ====================  ===================================================
``dense_weights``   int64  ``N/16 * K/16 * 16``  one word per row of each 16 x 16 tile, tiles row-
                                                 block major: bits 0-2 scale code, 3-5 zero code,
                                                 6-53 the 16 3-bit weight codes, 54-61 one byte of
                                                 the tile's second-order statistics (rows 2b and
                                                 2b+1 carry byte b of the fp16 quadruple
                                                 ``scale_scale, zero_scale, scale_zero, zero_zero``)
``row_offsets``     int32  ``N + 1``             CSR row pointer of the outliers
``col_vals``        int32  ``nnz``               fp16 value bits << 16 | int16 column (stored order)
``in_perm``         int32  ``K / 2`` or 0        the permutation as uint16 pairs (even index low)
==================  =====  ====================  ===================================================

spqr_quant dequantizes in fp16 arithmetic: ``s = ss * (c - sz)``, ``z = zs * (zc - zz)``,
``w = s * (q - z)`` plus the outlier. hfcompress' spqr format stores integer zeros (exported
as codes with ``zs = 1, zz = 0``) and its second-level zeros sit on the fp16 grid of
``c - sz`` (:func:`hfcompress.algorithms.spqr.quantize_stats`), so both sides compute the same
scales and, in an fp16 model, the same weights. What has no exact twin is refused, naming the
layer: other bit widths / group sizes (transformers takes 3-bit, 16 x 16 only), ``N`` not a
multiple of 16 (spqr_quant drops the statistics bytes of a partial tile), a bias, and on
import non-integer zeros (the SpQR reference code quantizes float zeros) or PTCSR outliers.
transformers runs these checkpoints on CUDA only (spqr_quant kernels) and in fp16; imported
into hfcompress they run anywhere.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from ..formats.spqr.reference import pack_codes, unpack_codes  # the bit streams spqr shares
from ..formats.spqr.spec import SpQRSpec
from .gptq_to_int_group import ConversionError
from .int_group_to_compressed_tensors import _CARRIED, _linear_shapes

QUANT_METHOD = "spqr"
TILE = 16
BITS = 3
TENSORS = ("dense_weights", "row_offsets", "col_vals", "in_perm")
_STATS_SHIFT = BITS * (TILE + 2)  # 54: where the statistics byte starts in a tile-row word


def _fp16_bits(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).contiguous().view(torch.int16).to(torch.int64) & 0xFFFF


def _from_fp16_bits(b: torch.Tensor) -> torch.Tensor:
    return (b & 0xFFFF).to(torch.int32).to(torch.int16).view(torch.float16)


def _check_fp16_exact(sz: torch.Tensor, codes: torch.Tensor, which: torch.Tensor, where: str) -> None:
    d = codes.to(torch.float32) - sz.to(torch.float32)[which]
    if not torch.equal(d.to(torch.float16).to(torch.float32), d):
        raise ConversionError(f"{where}: its second-level scale zeros are not on the fp16 grid of (code - zero), so "
                              "spqr_quant's fp16 arithmetic would rebuild different scales (a checkpoint written "
                              "before hfcompress aligned them): quantize it again to convert it exactly")


def to_transformers_layer(tensors: dict[str, torch.Tensor], spec: SpQRSpec, in_features: int, out_features: int,
                          where: str) -> dict[str, torch.Tensor]:
    """One layer's hfcompress spqr tensors -> spqr_quant's ``dense_weights, row_offsets,
    col_vals, in_perm``."""
    n, k = out_features, in_features
    if (spec.bits, spec.group_size, spec.stat_bits, spec.stat_group_size) != (BITS, TILE, BITS, TILE):
        raise ConversionError(f"{where}: bits={spec.bits}, group_size={spec.group_size}, stat_bits={spec.stat_bits}, "
                              f"stat_group_size={spec.stat_group_size}; transformers' SpQR takes 3 / 16 / 3 / 16 only")
    if n % TILE or k % TILE:
        raise ConversionError(f"{where}: [{n}, {k}] is not a whole number of 16 x 16 tiles (spqr_quant loses the "
                              "statistics of a partial tile)")
    if k > 32767:
        raise ConversionError(f"{where}: in_features={k} does not fit spqr_quant's int16 outlier columns")
    if "bias" in tensors:
        raise ConversionError(f"{where}: has a bias; spqr_quant's QuantizedLinear has none")
    tm, g = n // TILE, k // TILE
    q = unpack_codes(tensors["weight"], BITS, k).to(torch.int64)                       # [N, K]
    z = unpack_codes(tensors["weight_zero"], BITS, n).to(torch.int64)                  # [G, N]
    c = unpack_codes(tensors["weight_scale_code"], BITS, n).to(torch.int64)            # [G, N]
    ss, sz = tensors["weight_scale_scale"], tensors["weight_scale_zero"]                # [G, TM] fp16
    _check_fp16_exact(sz, c, (slice(None), torch.arange(n) // TILE), where)
    shifts = torch.arange(2, TILE + 2, dtype=torch.int64) * BITS                       # [16] code l at 3 * (l + 2)
    codes = (q.view(tm, TILE, g, TILE) << shifts).sum(-1).permute(0, 2, 1)             # [TM, G, 16 rows]
    first = (c | z << BITS).view(g, tm, TILE).permute(1, 0, 2)                         # [TM, G, 16]
    # second order per tile: fp16 (scale_scale, zero_scale, scale_zero, zero_zero) = (ss, 1, sz, 0)
    one = torch.ones_like(ss)
    quad = _fp16_bits(ss) | _fp16_bits(one) << 16 | _fp16_bits(sz) << 32 | _fp16_bits(one * 0) << 48   # [G, TM]
    byte = torch.arange(TILE, dtype=torch.int64) // 2 * 8                              # [16] byte of row k
    stats = (quad.t()[:, :, None] >> byte) & 0xFF                                      # [TM, G, 16]
    dense = first | codes | stats << _STATS_SHIFT
    col = tensors["weight_outlier_col"].to(torch.int64)
    val = tensors["weight_outlier_val"].to(torch.float16).contiguous()
    col_vals = (val.view(torch.int16).to(torch.int64) << 16 | col & 0xFFFF).to(torch.int32)
    perm = tensors.get("weight_perm")
    if perm is None:
        in_perm = torch.zeros(0, dtype=torch.int32)
    else:
        p = perm.to(torch.int64) & 0xFFFF
        in_perm = (p[1::2] << 16 | p[0::2]).to(torch.int32)
    return {"dense_weights": dense.reshape(-1).contiguous(), "row_offsets": tensors["weight_outlier_ptr"].to(torch.int32),
            "col_vals": col_vals, "in_perm": in_perm}


def from_transformers_layer(tensors: dict[str, torch.Tensor], in_features: int, out_features: int, where: str,
                            act_order: bool) -> dict[str, torch.Tensor]:
    """spqr_quant's tensors of one layer -> hfcompress spqr tensors (3-bit, 16 / 16 / 3 / 16)."""
    n, k = out_features, in_features
    if n % TILE or k % TILE:
        raise ConversionError(f"{where}: [{n}, {k}] is not a whole number of 16 x 16 tiles")
    tm, g = n // TILE, k // TILE
    dense = tensors["dense_weights"]
    if dense.dtype != torch.int64 or dense.numel() != tm * g * TILE:
        raise ConversionError(f"{where}.dense_weights: {dense.dtype} [{dense.numel()}], expected int64 "
                              f"[{tm * g * TILE}] for a [{n}, {k}] layer")
    ptr = tensors["row_offsets"]
    if ptr.numel() != n + 1:
        raise ConversionError(f"{where}.row_offsets has {ptr.numel()} entries, not N+1={n + 1}: PTCSR outlier "
                              "storage is not supported (write the checkpoint with sparse_strategy csr)")
    w = dense.view(tm, g, TILE)                                                        # [TM, G, 16 rows]
    c = (w & 7).permute(1, 0, 2).reshape(g, n)                                         # [G, N]
    zc = ((w >> BITS) & 7).permute(1, 0, 2).reshape(g, n)
    shifts = torch.arange(2, TILE + 2, dtype=torch.int64) * BITS
    q = ((w[..., None] >> shifts) & 7).permute(0, 2, 1, 3).reshape(n, k)              # [N, K]
    stats = (w >> _STATS_SHIFT) & 0xFF                                                 # [TM, G, 16]
    if not torch.equal(stats[..., 0::2], stats[..., 1::2]):
        raise ConversionError(f"{where}.dense_weights: the two rows carrying each statistics byte disagree")
    quad = (stats[..., 0::2] << (torch.arange(TILE // 2, dtype=torch.int64) * 8)).sum(-1).t()  # [G, TM]
    ss, zs, sz, zz = (_from_fp16_bits(quad >> s) for s in (0, 16, 32, 48))
    which = torch.arange(n) // TILE
    zero = (zs[:, which].float() * (zc.to(torch.float16) - zz[:, which]).float()).to(torch.float16).float()  # fp16 math
    if not (torch.equal(zero, zero.round()) and bool(((zero >= 0) & (zero <= 7)).all())):
        raise ConversionError(f"{where}: its first-level zeros are not integers in [0, 7] (float zeros quantized at "
                              "the second level, as the SpQR reference code writes them); hfcompress' spqr format "
                              "stores integer zeros, so it cannot hold this layer exactly")
    _check_fp16_exact(sz, c, (slice(None), which), where)
    col_vals = tensors["col_vals"].to(torch.int64)
    out = {
        "weight": pack_codes(q.to(torch.uint8), BITS),
        "weight_zero": pack_codes(zero.to(torch.uint8), BITS),
        "weight_scale_code": pack_codes(c.to(torch.uint8), BITS),
        "weight_scale_scale": ss.contiguous(),
        "weight_scale_zero": sz.contiguous(),
    }
    in_perm = tensors.get("in_perm")
    if act_order:
        col_dtype = SpQRSpec.col_dtype(k)
        if in_perm is None or in_perm.numel() == 0:
            out["weight_perm"] = torch.arange(k, dtype=col_dtype)
        elif in_perm.numel() == k // 2:
            p = in_perm.to(torch.int64) & 0xFFFFFFFF
            out["weight_perm"] = torch.stack([p & 0xFFFF, p >> 16], 1).reshape(k).to(col_dtype)
        else:
            raise ConversionError(f"{where}.in_perm has {in_perm.numel()} entries, expected 0 or K/2={k // 2}")
    out["weight_outlier_ptr"] = ptr.to(torch.int32)
    out["weight_outlier_col"] = (col_vals & 0xFFFF).to(SpQRSpec.col_dtype(k))
    out["weight_outlier_val"] = _from_fp16_bits(col_vals >> 16).contiguous()
    return out


def _shards(src: str) -> tuple[dict | None, list[str]]:
    index_path = os.path.join(src, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            index = json.load(f)
        return index, sorted(set(index["weight_map"].values()))
    return None, ["model.safetensors"]


def _convert_dir(src: str, out_dir, convert_shard, make_config, metadata=None) -> str:
    """Shard by shard through ``convert_shard(tensors) -> tensors``, config from ``make_config()``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ..hub.atomic import atomic_save

    index, shards = _shards(src)

    def write(tmp: str) -> None:
        weight_map, outs = {}, {}
        for shard in shards:
            with safe_open(os.path.join(src, shard), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            outs[shard] = convert_shard(tensors)
        new_config = make_config()
        for shard, out in outs.items():
            save_file(out, os.path.join(tmp, shard), metadata=metadata(out, new_config) if metadata else
                      {"format": "pt"})
            weight_map.update({k: shard for k in out})
        if index is not None:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": index.get("metadata", {}), "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(new_config, f, indent=2)
        for name in _CARRIED:
            if os.path.isfile(os.path.join(src, name)):
                shutil.copy2(os.path.join(src, name), os.path.join(tmp, name))

    return atomic_save(out_dir, write)


def export_transformers_spqr(checkpoint, out_dir: str | os.PathLike) -> str:
    """Write ``out_dir``: the hfcompress spqr checkpoint ``checkpoint`` (a directory, or a model in
    memory, saved first) in transformers' ``quant_method: "spqr"`` form (float tensors in fp16,
    which transformers' SpQR requires). Raises :class:`ConversionError` naming the layer when
    something has no exact twin; ``out_dir`` is written atomically."""
    import tempfile

    if not isinstance(checkpoint, (str, os.PathLike)):
        with tempfile.TemporaryDirectory(prefix="hfcompress-export-") as tmp:
            checkpoint.save_pretrained(tmp)
            return export_transformers_spqr(tmp, out_dir)
    src = os.fspath(checkpoint)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    q = config.get("quantization_config") or {}
    if q.get("quant_method") != "hfcompress" or q.get("format") != "spqr":
        raise ConversionError(f"{src}/config.json: quantization_config is {q.get('quant_method')!r} / "
                              f"{q.get('format')!r}; this export takes an hfcompress spqr checkpoint")
    if q.get("module_formats"):
        raise ConversionError(f"{src}/config.json: quantization_config.module_formats gives some layers their own "
                              "format; transformers' SpQR format has one setting for the whole model")
    spec = SpQRSpec(bits=q["bits"], group_size=q["group_size"], stat_bits=q["stat_bits"],
                    stat_group_size=q["stat_group_size"], act_order=q["act_order"])
    linears = _linear_shapes(config)
    shapes: dict[str, int] = {}

    def convert_shard(tensors):
        out = {}
        for p in sorted(k.removesuffix(".weight_scale_code") for k in tensors if k.endswith(".weight_scale_code")):
            if p not in linears:
                raise ConversionError(f"{p}.weight_scale_code: no linear layer {p} in the model config.json describes")
            k, n = linears[p]
            names = SpQRSpec.all_tensor_names() + ("bias",)
            layer = {t: tensors.pop(f"{p}.{t}") for t in names if f"{p}.{t}" in tensors}
            for t, v in to_transformers_layer(layer, spec, k, n, where=p).items():
                out[f"{p}.{t}"] = v
                shapes[f"{p}.{t}.shape"] = v.shape[0]
        out.update({k: v.to(torch.float16) if v.is_floating_point() else v for k, v in tensors.items()})
        return out

    def make_config():
        quantized = {k.rsplit(".", 2)[0] for k in shapes}
        dtype = {k: "float16" for k in ("dtype", "torch_dtype") if k in config} or {"dtype": "float16"}
        return {**config, **dtype, "quantization_config": {
            "quant_method": QUANT_METHOD, "bits": BITS, "beta1": TILE, "beta2": TILE, "shapes": shapes,
            "modules_to_not_convert": sorted(set(linears) - quantized)}}

    return _convert_dir(src, out_dir, convert_shard, make_config)


def import_transformers_spqr(src: str | os.PathLike, out_dir: str | os.PathLike,
                             dtype: torch.dtype | None = None) -> str:
    """Write ``out_dir``: the transformers ``quant_method: "spqr"`` checkpoint ``src`` as an
    hfcompress spqr checkpoint (the same codes, statistics and outliers), which loads with plain
    ``from_pretrained`` on any device. Float tensors keep their dtype unless ``dtype`` is given."""
    from ..formats.spqr import SpQRConfig
    from ..integrity import identity_metadata, new_save_id

    src = os.fspath(src)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    q = config.get("quantization_config") or {}
    if q.get("quant_method") != QUANT_METHOD:
        raise ConversionError(f"{src}/config.json: quantization_config.quant_method={q.get('quant_method')!r}; "
                              "this import takes a transformers SpQR checkpoint (quant_method 'spqr')")
    if (q.get("bits"), q.get("beta1"), q.get("beta2")) != (BITS, TILE, TILE):
        raise ConversionError(f"{src}/config.json: bits={q.get('bits')}, beta1={q.get('beta1')}, beta2={q.get('beta2')}"
                              "; transformers' SpQR format is 3-bit with 16 x 16 tiles")
    linears = _linear_shapes(config)
    index, shards = _shards(src)
    from safetensors import safe_open

    act_order = False
    for shard in shards:  # act-order if any layer stores a permutation
        with safe_open(os.path.join(src, shard), framework="pt") as f:
            act_order |= any(k.endswith(".in_perm") and f.get_slice(k).get_shape()[0] > 0 for k in f.keys())
    save_id = new_save_id()
    kept: set[str] = set()

    def convert_shard(tensors):
        out = {}
        for p in sorted(k.removesuffix(".dense_weights") for k in tensors if k.endswith(".dense_weights")):
            if p not in linears:
                raise ConversionError(f"{p}.dense_weights: no linear layer {p} in the model config.json describes")
            k, n = linears[p]
            layer = {t: tensors.pop(f"{p}.{t}") for t in TENSORS if f"{p}.{t}" in tensors}
            out.update({f"{p}.{t}": v for t, v in from_transformers_layer(layer, k, n, p, act_order).items()})
            kept.add(p)
        out.update({k: v.to(dtype) if dtype is not None and v.is_floating_point() else v for k, v in tensors.items()})
        return out

    def make_config():
        cfg = SpQRConfig(bits=BITS, group_size=TILE, stat_bits=BITS, stat_group_size=TILE, act_order=act_order,
                         outlier_threshold=None, modules_to_not_convert=sorted(set(linears) - kept)).to_dict()
        cfg["save_id"] = save_id
        out = {**config, "quantization_config": cfg}
        if dtype is not None:
            out["dtype"] = str(dtype).removeprefix("torch.")
        return out

    return _convert_dir(src, out_dir, convert_shard, make_config,
                        metadata=lambda tensors, _: {"format": "pt", **identity_metadata(tensors, save_id)})
