"""hfcompress int_group checkpoint -> compressed-tensors ``pack-quantized`` (what llm-compressor
writes and vLLM / transformers read), exactly.

Per quantized linear layer ``W [N, K]`` (compressed-tensors names, its "pack-quantized" layout):

=====================  =======  ==================================  ======================================
tensor                 dtype    shape                               from int_group
=====================  =======  ==================================  ======================================
``weight_packed``      int32    ``[N, ceil(K * bits / 32)]``        ``weight`` (same bit stream), trimmed
``weight_scale``       fp16     ``[N, G]``                          ``weight_scale``
``weight_zero_point``  int32    ``[ceil(N * bits / 32), G]``        ``weight_zero`` transposed (asymmetric)
``weight_shape``       int64    ``[2]``                             ``(N, K)``
=====================  =======  ==================================  ======================================

Both formats pack 32 codes into ``bits`` int32 words as one little-endian bit stream; the codes
compressed-tensors stores are ``q_signed + 2**(bits-1)``, which are int_group's unsigned codes,
and its zero points are stored the same way (symmetric: none, the midpoint). Dequantization is
``(q - z) * s`` on both sides, so the weights are the same numbers. Scales are stored fp16.

Act-order (``g_idx``) is exported as ``actorder: "group"`` with ``weight_g_idx``: the reader
sorts the columns by group and reshapes them into whole groups, which is exact when every group
holds exactly ``group_size`` columns (GPTQ's act-order does).

What has no exact twin is refused: 3-bit (compressed-tensors packed 10 codes per word up to
0.17 and a dense stream from 0.20: one file cannot be right for both; vLLM serves 4 and 8 bits),
and, by layer, ragged groups (``in_features`` not a multiple of
``group_size``: the group strategy reshapes into whole groups) and a ``g_idx`` whose groups are
not all ``group_size`` wide.

Reader versions: compressed-tensors 0.17.1 reads all of this through transformers. Later
releases removed ``actorder: "group"`` (0.19) and build unpacked zero-point parameters when
transformers loads an asymmetric pack-quantized checkpoint (0.18), so with them only symmetric
exports without act-order load through transformers (vLLM has its own reader).
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from ..formats.int_group import IntGroupSpec
from .gptq_to_int_group import ConversionError

QUANT_METHOD = "compressed-tensors"
FORMAT = "pack-quantized"
#: files of a checkpoint directory that are carried to the export unchanged
_CARRIED = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")


def scheme(spec: IntGroupSpec) -> dict:
    """The ``weights`` quantization args of the exported scheme (compressed-tensors' QuantizationArgs)."""
    per_channel = spec.group_size == -1
    return {"num_bits": spec.bits, "type": "int", "symmetric": spec.sym,
            "strategy": "channel" if per_channel else "group",
            "group_size": None if per_channel else spec.group_size,
            "dynamic": False, "actorder": "group" if spec.act_order else None}


def quantization_config(spec: IntGroupSpec, ignore: list[str]) -> dict:
    return {
        "quant_method": QUANT_METHOD,
        "format": FORMAT,
        "quantization_status": "compressed",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": scheme(spec), "input_activations": None,
                                      "output_activations": None, "format": FORMAT}},
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
    }


def convert_layer(tensors: dict[str, torch.Tensor], spec: IntGroupSpec, in_features: int, out_features: int,
                  where: str) -> dict[str, torch.Tensor]:
    """One int_group layer's stored tensors -> its compressed-tensors tensors (names relative to the layer)."""
    k, n, bits = in_features, out_features, spec.bits
    if spec.group_size != -1 and k % spec.group_size:
        raise ConversionError(f"{where}: in_features={k} is not a multiple of group_size={spec.group_size} (a ragged "
                              "last group); compressed-tensors' group strategy needs whole groups. Quantize with a "
                              f"group size that divides {k}")
    g_idx = tensors.get("weight_g_idx")
    if g_idx is not None:
        sizes = torch.bincount(g_idx.long(), minlength=spec.n_groups(k))
        if not bool((sizes == spec.effective_group_size(k)).all()):
            raise ConversionError(f"{where}.weight_g_idx: groups of {sizes.min().item()} to {sizes.max().item()} "
                                  f"columns; compressed-tensors reads act-order groups of exactly group_size="
                                  f"{spec.group_size} columns")
    out = {"weight_packed": tensors["weight"][:, : -(-k * bits // 32)].contiguous(),
           "weight_scale": tensors["weight_scale"].to(torch.float16),
           "weight_shape": torch.tensor([n, k], dtype=torch.int64)}
    if not spec.sym:
        out["weight_zero_point"] = tensors["weight_zero"][:, : -(-n * bits // 32)].t().contiguous()
    if g_idx is not None:
        out["weight_g_idx"] = g_idx.to(torch.int32)
    return out


def _linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """``name -> (in_features, out_features)`` of every nn.Linear of the model config.json describes
    (built on the meta device: no weights)."""
    import transformers
    from transformers import AutoConfig

    from ..modules import is_linear, linear_shape

    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "quantization_config"})
    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise ConversionError(f"config.json architectures={config.get('architectures')!r}: not a transformers class")
    with torch.device("meta"):
        model = cls._from_config(cfg)
    return {name: linear_shape(m) for name, m in model.named_modules() if is_linear(m)}


def export_compressed_tensors(checkpoint, out_dir: str | os.PathLike) -> str:
    """Write ``out_dir``: the hfcompress checkpoint ``checkpoint`` (a directory, or a model in
    memory, saved first) in compressed-tensors ``pack-quantized`` form. Raises
    :class:`ConversionError` naming the layer when something has no exact twin; ``out_dir`` is
    written atomically (a user's README.md there is kept as ORIGINAL_README.md) and may not be
    the source directory itself (that would replace the user's hfcompress checkpoint)."""
    if not isinstance(checkpoint, (str, os.PathLike)):
        from ..hub.scratch import scratch_dir

        shown = getattr(checkpoint, "name_or_path", "") or "a model in memory"
        with scratch_dir("export") as tmp:  # locked: a killed export's copy is removed by the next one
            saved = os.path.join(tmp, "checkpoint")  # the save's own temporary siblings stay inside too
            checkpoint.save_pretrained(saved)
            return _export(saved, out_dir, shown)
    return _export(os.fspath(checkpoint), out_dir, os.fspath(checkpoint))


def _export(src: str, out_dir: str | os.PathLike, shown: str) -> str:
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ..hub.atomic import atomic_save

    if os.path.realpath(src) == os.path.realpath(os.fspath(out_dir)):
        raise ConversionError(f"export: the output directory {os.fspath(out_dir)} is the source checkpoint itself; "
                              "the export would replace it. Choose another --out directory")
    cfg_where = os.path.join(src, "config.json") if shown == src else f"the config of {shown}"
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    q = config.get("quantization_config") or {}
    if q.get("quant_method") != "hfcompress" or q.get("format") != "int_group":
        raise ConversionError(f"{cfg_where}: quantization_config is {q.get('quant_method')!r} / "
                              f"{q.get('format')!r}; export takes an hfcompress int_group checkpoint")
    floats = [where for where, e in [("quantization_config", q)]
              + [(f"quantization_config.module_formats[{n!r}]", e) for n, e in (q.get("module_formats") or {}).items()]
              if e.get("zero_point", "int") != "int"]
    if floats:
        raise ConversionError(f"{cfg_where}: {floats[0]}.zero_point='float': its layers store fp16 zero points "
                              "(weight_zero [groups, out_features]), which compressed-tensors' pack-quantized "
                              "format cannot hold (integer zero points only); export a checkpoint quantized with "
                              "zero_point='int' (GPTQConfig / RTNConfig(zero_point='int'), or hfcompress quantize "
                              "--zero-point int; asymmetric GPTQ and RTN default to 'float')")
    # GPTQ's static groups: act-order columns, natural groups, no g_idx stored (a plain group scheme)
    spec = IntGroupSpec(bits=q["bits"], group_size=q["group_size"], sym=q["sym"],
                        act_order=q["act_order"] and not q.get("static_groups", False))
    if 32 % spec.bits:
        raise ConversionError(f"{cfg_where}: quantization_config.bits={spec.bits}: compressed-tensors' "
                              f"{spec.bits}-bit packing differs between its releases (0.17: 10 codes per int32 "
                              "word, 0.20: a dense bit stream), so no file reads right in both; export 2-, 4- or "
                              "8-bit models (vLLM serves 4 and 8)")
    index_path = os.path.join(src, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            index = json.load(f)
        shards = sorted(set(index["weight_map"].values()))
    else:
        index, shards = None, ["model.safetensors"]
    linears = _linear_shapes(config)
    quantized: set[str] = set()

    def write(tmp: str) -> None:
        weight_map = {}
        for shard in shards:
            with safe_open(os.path.join(src, shard), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            out = {}
            prefixes = sorted(k.removesuffix(".weight_scale") for k in tensors if k.endswith(".weight_scale"))
            for p in prefixes:
                if p not in linears:
                    raise ConversionError(f"{p}.weight_scale: no linear layer {p} in the model config.json describes")
                k, n = linears[p]
                layer = {t: tensors.pop(f"{p}.{t}") for t in ("weight", "weight_scale", "weight_zero", "weight_g_idx")
                         if f"{p}.{t}" in tensors}
                out.update({f"{p}.{t}": v for t, v in convert_layer(layer, spec, k, n, where=p).items()})
                quantized.add(p)
            out.update(tensors)
            save_file(out, os.path.join(tmp, shard), metadata={"format": "pt"})
            weight_map.update({k: shard for k in out})
        if index is not None:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                json.dump({"metadata": index.get("metadata", {}), "weight_map": weight_map}, f, indent=2)
        ignore = sorted(set(linears) - quantized)
        exported = {**config, "quantization_config": quantization_config(spec, ignore)}
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(exported, f, indent=2)
        for name in _CARRIED:
            if os.path.isfile(os.path.join(src, name)):
                shutil.copy2(os.path.join(src, name), os.path.join(tmp, name))

    def finish(tmp: str) -> None:
        _write_card(tmp, src, q, spec, shown)

    return atomic_save(out_dir, write, finish)


def _write_card(directory: str, src: str, q: dict, spec: IntGroupSpec, shown: str) -> None:
    """A short card: where the export came from and how to serve it. A README.md there that
    hfcompress did not write was already moved to ORIGINAL_README.md by the atomic save."""
    from huggingface_hub import ModelCard, ModelCardData

    from ..hub.card_data import CARD_MARKER, ORIGINAL_CARD

    base = None
    source_card = os.path.join(src, "README.md")
    if os.path.isfile(source_card):
        try:
            base = ModelCard.load(source_card, ignore_metadata_errors=True).data.get("base_model")
        except Exception:  # an unreadable card only loses the link
            base = None
    meta = ModelCardData(library_name="transformers", tags=["compressed-tensors", "hfcompress", q.get("algorithm"),
                                                            f"{spec.bits}-bit", "quantized"],
                         **({"base_model": base, "base_model_relation": "quantized"} if isinstance(base, str) else {}))
    kept = (f"\n\nThe card that was here before is kept unchanged in [{ORIGINAL_CARD}]({ORIGINAL_CARD})."
            if os.path.isfile(os.path.join(directory, ORIGINAL_CARD)) else "")
    body = (f"---\n{meta.to_yaml()}\n---\n{CARD_MARKER}\n\n# compressed-tensors export\n\n"
            f"The hfcompress checkpoint `{shown}` (algorithm `{q.get('algorithm')}`, {spec.bits}-bit, group size "
            f"{spec.group_size}, {'symmetric' if spec.sym else 'asymmetric'}) in compressed-tensors "
            f"`{FORMAT}` form, written by `hfcompress export --to compressed-tensors`: the same integer codes, "
            f"scales and zero points, so the dequantized weights are unchanged.{kept}\n\n"
            "```bash\nvllm serve path/to/this/checkpoint\n```\n\n"
            "```python\nfrom transformers import AutoModelForCausalLM  # needs `pip install compressed-tensors`\n"
            "model = AutoModelForCausalLM.from_pretrained(\"path/to/this/checkpoint\")\n```\n")
    ModelCard(body).save(os.path.join(directory, "README.md"))
