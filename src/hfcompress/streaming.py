"""``hfcompress.quantize(model_or_dir, config)``: one verb for in-memory models and for model
directories too large for memory.

Given a directory, the model is built on ``meta``; the modules before the decoder blocks
(embeddings, rotary tables) are loaded from the safetensors shards, the calibration inputs
are captured and those modules go back on ``meta``; then each decoder block is read from the
shards just before its turn, quantized, written to its own output shard, and freed; the modules
outside the blocks are read again after the last block. Peak memory: one block's weights plus
the calibration activations. The checkpoint written holds exactly the
tensors ``save_pretrained`` writes after ``from_pretrained(dir, quantization_config=config)``.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import integrity
from .config import HfCompressConfig
from .modules import check_module_table, resolve_modules_to_not_convert

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                    "tokenizer.model", "chat_template.jinja", "generation_config.json")


def quantize(model_or_dir: Any, config: HfCompressConfig, tokenizer=None, out_dir: str | None = None,
             device=None, progress: bool = False, batches=None, dtype=None, max_shard_size: int | str = "50GB"):
    """Quantize a model in memory (returns it; saved to ``out_dir`` if given) or stream a model
    directory block by block into ``out_dir`` (returns ``out_dir``; required for directories).
    ``max_shard_size`` (transformers' default) bounds each output safetensors file either way."""
    from .api import quantize_

    if not isinstance(config, HfCompressConfig):
        raise TypeError(f"config must be an hfcompress config (e.g. hfcompress.GPTQConfig), got {type(config).__name__}")
    from .distributed import agree, current

    dist = current()  # an initialised process group: calibration is data parallel, rank 0 writes
    if isinstance(model_or_dir, nn.Module):
        quantize_(model_or_dir, config, progress=progress, tokenizer=tokenizer, batches=batches, device=device)
        if out_dir is not None:
            from .hub import atomic_save

            def write(tmp):  # model and tokenizer land together
                model_or_dir.save_pretrained(tmp, max_shard_size=max_shard_size)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
                getattr(config, "write_extra_files", lambda d: None)(tmp)  # e.g. EvoPress's search log

            agree(dist, lambda: atomic_save(out_dir, write), f"writing {out_dir}",
                   run_here=dist is None or dist.is_writer)  # rank 0 writes; the others wait for it
        return model_or_dir
    path = os.fspath(model_or_dir)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"hfcompress.quantize: {path!r} is not a model directory (nor an nn.Module)")
    if out_dir is None:
        raise ValueError("hfcompress.quantize(directory, ...) streams into out_dir=...; give an output directory")
    if getattr(config, "needs_whole_model", False):  # e.g. EvoPress: the search evaluates the whole model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto")
        quantize(model, config, tokenizer=tokenizer, out_dir=out_dir, device=device, progress=progress,
                 batches=batches, max_shard_size=max_shard_size)
        return out_dir
    if config.data_free:
        raise ValueError(f"hfcompress.quantize(directory, ...) streams calibration algorithms; {config.algorithm} is "
                         "data-free: use from_pretrained(dir, quantization_config=config) instead")
    from transformers.utils.hub import convert_file_size_to_int

    from .hub import atomic_save

    # written into a sibling folder, swapped in when complete: out_dir is whole old or whole new
    limit = convert_file_size_to_int(max_shard_size)
    if dist is None:
        atomic_save(out_dir, lambda tmp: _stream_dir(path, config, tokenizer, tmp, device, progress, batches, dtype,
                                                     limit))
    elif dist.is_writer:
        agree(dist, lambda: atomic_save(out_dir, lambda tmp: _stream_dir(
            path, config, tokenizer, tmp, device, progress, batches, dtype, limit, dist)), f"streaming into {out_dir}")
    else:  # the other ranks calibrate their share and never write
        agree(dist, lambda: _stream_dir(path, config, tokenizer, None, device, False, batches, dtype, limit, dist),
               f"streaming into {out_dir}")
    return out_dir


class _Shards:
    """Tensor name -> the safetensors file that holds it, for a model directory."""

    def __init__(self, path: str):
        index = os.path.join(path, "model.safetensors.index.json")
        single = os.path.join(path, "model.safetensors")
        if os.path.isfile(index):
            with open(index) as f:
                self.where = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
        elif os.path.isfile(single):
            with safe_open(single, "pt") as f:
                self.where = {k: single for k in f.keys()}
        else:
            raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors "
                                    "checkpoints can be streamed)")

    def load(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.where[n], []).append(n)
        out = {}
        for file, keys in by_file.items():
            with safe_open(file, "pt") as f:
                for k in keys:
                    out[k] = f.get_tensor(k)
        return out


def _checkpoint_key(model: nn.Module, shards: _Shards, name: str) -> str | None:
    """The checkpoint key of model tensor ``name`` (checkpoints may omit the base-model prefix)."""
    if name in shards.where:
        return name
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in shards.where:
        return name[len(prefix) + 1:]
    return None


def _materialise_(model: nn.Module, root: nn.Module, root_name: str, shards: _Shards, dtype) -> None:
    """Load every parameter / persistent buffer of ``root`` (a submodule named ``root_name``)."""
    for rel, t in list(root.state_dict(keep_vars=True).items()):
        full = f"{root_name}.{rel}" if root_name else rel
        key = _checkpoint_key(model, shards, full)
        if key is None:
            if t.is_meta:
                raise KeyError(f"{full} is not in the checkpoint and has no value; cannot stream this model")
            continue
        value = shards.load([key])[key]
        value = value.to(dtype) if value.is_floating_point() else value
        mod_name, _, attr = rel.rpartition(".")
        mod = root.get_submodule(mod_name) if mod_name else root
        if attr in mod._parameters:
            mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
        else:
            mod._buffers[attr] = value


def _stream_dir(path, config, tokenizer, out_dir, device, progress, batches, dtype, max_shard_bytes, dist=None):
    """Stream ``path`` block by block into ``out_dir``; ``out_dir=None`` (ranks other than 0 of a
    distributed run) calibrates this rank's share and writes nothing."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .calibration import find_blocks, get_calibration_batches
    from .calibration.apply import quantize_blocks_
    from .calibration.blocks import return_freed_memory
    from .calibration.data import token_ids

    hf_config = AutoConfig.from_pretrained(path)
    if dtype is None:
        dtype = getattr(hf_config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    shards = _Shards(path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    model.eval()
    config.modules_to_not_convert = resolve_modules_to_not_convert(model, config.modules_to_not_convert)
    check_module_table(model, config)
    prefix, blocks = find_blocks(model)

    # everything outside the blocks (embeddings, final norm, lm_head) is loaded now
    _materialise_outside_(model, prefix, shards, dtype)
    model.tie_weights()

    if batches is None:
        tokenizer = getattr(config, "calibration_tokenizer", lambda t: t)(tokenizer)
        if tokenizer is None and token_ids(config.dataset) is None:
            from .config import _model_tokenizer

            tokenizer = _model_tokenizer(model)  # the checkpoint's own; a clear error when it has none
        dataset = getattr(config, "dataset", None)
        batches = get_calibration_batches(tokenizer, dataset, n_samples=config.n_samples, seq_len=config.seq_len)

    save_id = integrity.new_save_id()  # the identity of this save: config.json and every shard (#20)
    tied = _tied_keys(model)
    write = out_dir is not None
    parts = os.path.join(out_dir, ".hfcompress-parts") if write else None  # one file per block, merged at the end
    if write:
        os.makedirs(parts, exist_ok=True)

    def part_name(i):
        return os.path.join(parts, f"{i:05d}.safetensors")

    def load_block(i, name, block):
        if i == 0:  # the block inputs are captured: the embeddings (and head) wait on disk until the end
            _release_outside_(model, prefix)
        _materialise_(model, block, name, shards, dtype)

    def release_block(i, name, block):
        if write:
            tensors = {f"{name}.{k}": v.detach().contiguous() for k, v in block.state_dict().items()}
            save_file(tensors, part_name(i), metadata=_part_metadata(tensors))
        block.to("meta")  # free the block
        if i == len(blocks) - 1:  # back for the layers outside the blocks and the last part
            _materialise_outside_(model, prefix, shards, dtype)
            model.tie_weights()
        return_freed_memory()

    quantize_blocks_(model, config, batches, device=device, progress=progress, load_block=load_block,
                     release_block=release_block, dist=dist)
    if not write:
        return None
    rest = {k: v.detach().contiguous() for k, v in model.state_dict().items()
            if not k.startswith(prefix + ".") and k not in tied}
    save_file(rest, part_name(len(blocks)), metadata=_part_metadata(rest))
    _write_shards(out_dir, [part_name(i) for i in range(len(blocks) + 1)], max_shard_bytes, save_id)
    shutil.rmtree(parts)
    hf_config.quantization_config = {**config.to_dict(), "save_id": save_id}
    hf_config.dtype = dtype
    hf_config.save_pretrained(out_dir)
    for fname in _TOKENIZER_FILES:
        if os.path.isfile(os.path.join(path, fname)):
            shutil.copy(os.path.join(path, fname), os.path.join(out_dir, fname))
    if tokenizer is not None and not os.path.isfile(os.path.join(out_dir, "tokenizer_config.json")):
        tokenizer.save_pretrained(out_dir)
    from .hub import write_card_  # the model card, from the written headers (no model in memory)

    write_card_(out_dir, out_dir, source=path)
    return out_dir


def _read_header(path: str) -> tuple[dict, int]:
    """``(header, data start)`` of a safetensors file."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)), 8 + n


def _part_metadata(tensors: dict) -> dict[str, str]:
    """A part file records the digests of its tensors (computed from memory, as a save does);
    :func:`_write_shards` carries them into the shards."""
    return {"format": "pt", integrity.DIGESTS_KEY: json.dumps(integrity.tensor_digests(tensors), sort_keys=True)}


def _write_shards(out_dir: str, parts: list[str], max_shard_bytes: int, save_id: str | None = None) -> None:
    """Concatenate the per-block safetensors ``parts`` (in order) into shards of at most
    ``max_shard_bytes`` of tensor data (a part larger than that gets a shard of its own), named as
    ``save_pretrained`` names them: ``model.safetensors`` alone, or ``model-0000i-of-0000n`` plus
    the index. Byte copies: no tensor is loaded. With ``save_id``, every shard's metadata records
    it and the digests of its tensors (from the parts), as an hfcompress ``save_pretrained`` does."""
    headers = [_read_header(p) for p in parts]
    sizes = [os.path.getsize(p) - start for p, (_, start) in zip(parts, headers)]
    groups: list[list[int]] = [[]]
    used = 0
    for i, size in enumerate(sizes):
        if groups[-1] and used + size > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += size
    names = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{g + 1:05d}-of-{len(groups):05d}.safetensors" for g in range(len(groups))])
    weight_map: dict[str, str] = {}
    for name, group in zip(names, groups):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        digests: dict[str, str] = {}
        offset = 0
        for i in group:
            digests.update(json.loads(headers[i][0].get("__metadata__", {}).get(integrity.DIGESTS_KEY, "{}")))
            for key, meta in headers[i][0].items():
                if key == "__metadata__":
                    continue
                begin, end = meta["data_offsets"]
                header[key] = {**meta, "data_offsets": [offset + begin, offset + end]}
                weight_map[key] = name
            offset += sizes[i]
        if save_id is not None:
            header["__metadata__"] = {"format": "pt", integrity.SAVE_ID_KEY: save_id,
                                      integrity.DIGESTS_KEY: json.dumps(digests, sort_keys=True)}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with open(os.path.join(out_dir, name), "wb") as out:
            out.write(len(blob).to_bytes(8, "little"))
            out.write(blob)
            for i in group:
                with open(parts[i], "rb") as f:
                    f.seek(headers[i][1])
                    shutil.copyfileobj(f, out, 16 * 2**20)
    for stale in os.listdir(out_dir):  # shards of an earlier save into this directory (as save_pretrained does)
        if stale.startswith("model") and stale.endswith(".safetensors") and stale not in names:
            os.remove(os.path.join(out_dir, stale))
    index = os.path.join(out_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        os.remove(index)
    if len(groups) > 1:
        with open(index, "w") as f:
            json.dump({"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))}, f,
                      indent=2)


def _materialise_outside_(model: nn.Module, prefix: str, shards: _Shards, dtype) -> None:
    """Load the tensors of every module that is not inside the block list ``prefix``."""
    for rel, t in list(model.state_dict(keep_vars=True).items()):
        if rel.startswith(prefix + "."):
            continue
        key = _checkpoint_key(model, shards, rel)
        mod_name, _, attr = rel.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        if key is None:
            if t.is_meta and rel not in _tied_keys(model):
                raise KeyError(f"{rel} is not in the checkpoint; cannot stream this model")
            continue
        value = shards.load([key])[key]
        value = value.to(dtype) if value.is_floating_point() else value
        if attr in mod._parameters:
            mod._parameters[attr] = nn.Parameter(value, requires_grad=False)
        else:
            mod._buffers[attr] = value


def _release_outside_(model: nn.Module, prefix: str) -> None:
    """Put the parameters of every module outside the block list ``prefix`` back on ``meta`` (tied
    copies included); :func:`_materialise_outside_` reads them again."""
    for name, mod in model.named_modules():
        if name == prefix or name.startswith(prefix + "."):
            continue
        for attr, p in list(mod._parameters.items()):
            if p is not None and not p.is_meta:
                mod._parameters[attr] = nn.Parameter(p.to("meta"), requires_grad=False)


def _tied_keys(model: nn.Module) -> set[str]:
    """Tensor names that are tied copies (not saved), e.g. ``lm_head.weight``."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return set(tied.keys())
