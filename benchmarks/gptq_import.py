"""GPTQ import and compressed-tensors export on the real SmolLM2-135M-Instruct.

Three steps, two interpreters (GPTQModel is not a dependency of hfcompress):

    python benchmarks/gptq_import.py prepare                       # hfcompress venv: token ids
    GPTQMODEL_CPU_WORKERS=2 /work/venv-baselines/bin/python benchmarks/gptq_import.py gptqmodel
    python benchmarks/gptq_import.py ours [bfloat16]               # hfcompress venv: perplexity of ours
    python benchmarks/gptq_import.py compressed-tensors            # hfcompress venv: export logits

``prepare`` writes the calibration windows (the bundled Shakespeare, 32 x 512 tokens) and the
evaluation token ids (held-out Hamlet, SQLite docs: the texts every benchmark here scores).
``gptqmodel`` quantizes SmolLM2 with GPTQModel 7.6.0 on 8 of the windows (4-bit, group 128, its
defaults otherwise, bf16: fp16 matmuls on this CPU made it 10x slower), saves the checkpoint
GPTQModel writes, loads it back with ``GPTQModel.load(dir, device="cpu")`` (its own CPU path and
kernel choice; when that kernel refuses the checkpoint, the error is recorded and its torch kernel
``BACKEND.GPTQ_TORCH`` is used) and scores it with hfcompress's sliding-window perplexity
(``src/hfcompress/evaluate.py``, loaded by path: it needs only torch).
``ours [float32|bfloat16]`` converts that checkpoint with ``FromGPTQConfig`` (fp32 model: the exact
dequantized weights; bf16: GPTQModel's dtype on its side), checks every layer's weight against
GPTQModel's formula and scores the same ids (the g128 import has ragged groups on SmolLM2's
576-wide layers, which compressed-tensors cannot store: the export's refusal is recorded).
``compressed-tensors`` exports an hfcompress RTN 4-bit g64 SmolLM2 to compressed-tensors, reads it
back with transformers' own loader and compares logits with ours on 512 tokens of every domain.
Each step records the load average (shared machine) and takes a few minutes.
Decode speed of the converted checkpoint: ``benchmarks/cpu_decode.py --gptq DIR``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / ".cache"
IDS = CACHE / "gptq_import_ids.safetensors"
GPTQ_DIR = CACHE / "smollm2-gptqmodel-w4g128"
OUT = ROOT / "benchmarks" / "results" / "gptq_import.json"
DOMAINS = ("hamlet", "sqlite")
EVAL = dict(window=512, stride=256, max_tokens=8192)


def _smollm2_dir() -> str:
    from hfcompress.smollm2 import smollm2_checkpoint

    return smollm2_checkpoint()  # bf16, converted once from the bundled GGUF


def prepare() -> None:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from hfcompress.calibration import get_calibration_batches
    from hfcompress.calibration.data import tokenize_text
    from hfcompress.data import __file__ as data_init

    src = _smollm2_dir()
    tok = AutoTokenizer.from_pretrained(src)
    data = Path(data_init).parent
    ids = {"calibration": torch.cat(get_calibration_batches(tok, None, n_samples=32, seq_len=512))}
    for name, f in (("hamlet", "shakespeare_eval.txt"), ("sqlite", "sqlite_eval.txt")):
        ids[name] = tokenize_text(tok, [(data / f).read_text()]).reshape(-1)
    CACHE.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ids.items()}, IDS, metadata={"source": src})
    print({k: tuple(v.shape) for k, v in ids.items()})


def _perplexity_fn():
    import importlib.util

    spec = importlib.util.spec_from_file_location("hfc_evaluate", ROOT / "src" / "hfcompress" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.perplexity


def _merge(part: dict) -> None:
    result = json.loads(OUT.read_text()) if OUT.exists() else {}
    result.update(part)
    OUT.write_text(json.dumps(result, indent=1))


def gptqmodel() -> None:
    import gptqmodel as gm_pkg
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from safetensors.torch import load_file

    ids = load_file(IDS)
    src = _find_src()
    # 8 of the windows: the comparison is two runtimes on one checkpoint, not calibration quality
    # (32 took GPTQModel ~1 h on the shared 2-core machine)
    calib = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in ids["calibration"][:8]]
    quantize_s = None
    if not (GPTQ_DIR / "model.safetensors").exists():  # a run that stopped after saving is not redone
        t0 = time.perf_counter()
        model = GPTQModel.load(src, QuantizeConfig(bits=4, group_size=128), device="cpu", dtype=torch.bfloat16)
        model.quantize(calib, batch_size=8)
        model.save(str(GPTQ_DIR))
        quantize_s = round(time.perf_counter() - t0, 1)
        del model
    perplexity = _perplexity_fn()
    from gptqmodel.utils.backend import BACKEND

    default_error = None
    with torch.inference_mode():
        try:  # its own CPU path: the kernel and dtype it picks
            loaded = GPTQModel.load(str(GPTQ_DIR), device="cpu")
            loaded.model(ids["hamlet"][:16][None])
        except Exception as e:  # noqa: BLE001 - recorded: its default CPU kernel cannot run this checkpoint
            default_error = f"{type(e).__name__}: {e}"[:300]
            loaded = GPTQModel.load(str(GPTQ_DIR), device="cpu", backend=BACKEND.GPTQ_TORCH)
        kernels = sorted({type(m).__name__ for m in loaded.model.modules() if isinstance(m, BaseQuantLinear)})
        ppl = {d: round(perplexity(loaded.model, ids=ids[d], **EVAL).perplexity, 4) for d in DOMAINS}
    _merge({"gptqmodel": {"version": gm_pkg.__version__, "quantize_s": quantize_s, "kernels": kernels,
                          "default_backend_error": default_error,
                          "dtype": str(next(loaded.model.parameters()).dtype), "perplexity": ppl,
                          "checkpoint": str(GPTQ_DIR.relative_to(ROOT)),
                          "quantization_config": json.loads((GPTQ_DIR / "config.json").read_text())
                          ["quantization_config"]}})
    print(ppl, kernels)


def _find_src() -> str:
    for base in (os.environ.get("HFCOMPRESS_CACHE"), os.path.join(os.path.expanduser("~"), ".cache", "hfcompress")):
        if base and os.path.isfile(os.path.join(base, "SmolLM2-135M-Instruct", "model.safetensors")):
            return os.path.join(base, "SmolLM2-135M-Instruct")
    raise FileNotFoundError("run `python benchmarks/gptq_import.py prepare` first (it writes the SmolLM2 checkpoint)")


def _load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def ours(dtype: str = "float32") -> None:
    """The converted checkpoint scored on the same ids (``float32``: the exact dequantized weights;
    ``bfloat16``: GPTQModel's own dtype on its side), every layer checked against GPTQModel's formula."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import hfcompress
    from hfcompress.evaluate import perplexity
    from hfcompress.formats.int_group import unpack_codes

    ids = load_file(IDS)
    load_start = _load_avg()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(GPTQ_DIR, quantization_config=hfcompress.FromGPTQConfig(),
                                                 dtype=getattr(torch, dtype)).eval()
    convert_s = time.perf_counter() - t0
    q = model.config.quantization_config
    assert (q.bits, q.source["checkpoint_format"]) == (4, "gptq"), q.source  # the v1 offset below is 4-bit's
    # every layer against GPTQModel's formula on the stored tensors (fp32: exact products)
    sd = load_file(GPTQ_DIR / "model.safetensors")
    exact, layers = 0, 0
    for name, mod in model.named_modules():
        if isinstance(mod, hfcompress.QuantLinear):
            n, k = mod.out_features, mod.in_features
            codes = unpack_codes(sd[f"{name}.qweight"].t().contiguous(), q.bits, k).float()
            words = (sd[f"{name}.qzeros"].long() + 0x11111111) & 0xFFFFFFFF  # v1 -> v2, as GPTQModel loads it
            words = torch.where(words >= 2**31, words - 2**32, words).int()
            z = unpack_codes(words, q.bits, n).float()
            g = sd[f"{name}.g_idx"].long()
            w = (codes - z.t()[:, g]) * sd[f"{name}.scales"].float().t()[:, g]
            exact += int(torch.equal(mod.dequantize(torch.float32), w))
            layers += 1
    from hfcompress.hub.scratch import scratch_dir

    with scratch_dir("benchmark") as tmp:
        try:
            hfcompress.export_compressed_tensors(model, os.path.join(tmp, "ct"))
            exported = "exported"
        except ValueError as e:
            exported = f"refused: {e}"
    # g128 on 576-wide layers has ragged groups, which the CPU fast path declines: every call would
    # dequantize the layer again (the reference). Each layer's weight is dequantized once instead,
    # the same numbers the reference computes with on every call (dtype as loaded).
    hfcompress.dequantize_(model)
    t0 = time.perf_counter()
    with torch.inference_mode():
        ppl = {d: round(perplexity(model, ids=ids[d], **EVAL).perplexity, 4) for d in DOMAINS}
    theirs = json.loads(OUT.read_text()).get("gptqmodel", {}).get("perplexity", {}) if OUT.exists() else {}
    key = "ours_converted" if dtype == "float32" else f"ours_converted_{dtype}"
    part = {key: {"dtype": dtype, "convert_s": round(convert_s, 1), "perplexity_s": round(time.perf_counter() - t0, 1),
                  "layers": layers, "layers_bit_exact": exact,
                  "spec": {k: getattr(q, k) for k in ("bits", "group_size", "sym", "act_order")},
                  "scored_with": "each layer's weight dequantized once from the converted int_group tensors",
                  "perplexity": ppl,
                  "relative_to_gptqmodel": {d: round(ppl[d] / theirs[d] - 1, 5) for d in DOMAINS if d in theirs},
                  "compressed_tensors_export": exported,
                  "load_average_start": load_start, "load_average_end": _load_avg()}}
    _merge(part)
    print(json.dumps(part, indent=1))


def compressed_tensors() -> None:
    """hfcompress RTN 4-bit g64 SmolLM2 (576 and 1536 are multiples of 64) exported to
    compressed-tensors and read back by transformers' own loader: logits of both on 512 tokens of
    every domain (fp32, our exact reference path on both sides of the comparison)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import hfcompress
    from hfcompress.hub.scratch import scratch_dir
    from hfcompress.ops import set_cpu_fast_path
    from hfcompress.smollm2 import load_smollm2

    ids = load_file(IDS)
    load_start = _load_avg()
    float_model, _ = load_smollm2(str(CACHE / "smollm2-135m-instruct-f32"))
    rtn = hfcompress.quantize_(float_model, hfcompress.RTNConfig(bits=4, group_size=64, mse_clip=False,
                                                                        zero_point="int"))  # exportable
    rows = {}
    previous = set_cpu_fast_path("off")  # ours computed exactly (dequantize, fp32 matmul), as the reader does
    try:
        with scratch_dir("benchmark") as tmp:
            t0 = time.perf_counter()
            hfcompress.export_compressed_tensors(rtn, os.path.join(tmp, "ct-rtn"))
            export_s = time.perf_counter() - t0
            theirs = AutoModelForCausalLM.from_pretrained(os.path.join(tmp, "ct-rtn"), dtype=torch.float32).eval()
            reader = sorted({type(m).__name__ for m in theirs.modules() if "Linear" in type(m).__name__})
            with torch.inference_mode():
                for d in DOMAINS:
                    x = ids[d][:512][None]
                    a, b = rtn(x).logits.double(), theirs(x).logits.double()
                    set_cpu_fast_path("auto")
                    fast = rtn(x).logits.double()  # for reference: our default CPU path (bf16 inside)
                    set_cpu_fast_path("off")
                    rows[d] = {"tokens": int(x.numel()),
                               "max_abs_logit_diff_over_max_abs_logit": float((a - b).abs().max() / a.abs().max()),
                               "same_argmax_fraction": float((a.argmax(-1) == b.argmax(-1)).double().mean()),
                               "ours_default_cpu_path_vs_exact": float((a - fast).abs().max() / a.abs().max())}
    finally:
        set_cpu_fast_path(previous)
    worst = max(r["max_abs_logit_diff_over_max_abs_logit"] for r in rows.values())
    import compressed_tensors

    _merge({"compressed_tensors_rtn_w4g64": {
        "export_s": round(export_s, 1), "compressed_tensors": compressed_tensors.__version__,
        "reader_linear_classes": reader, "domains": rows,
        "target": {"what": "exported logits within 1e-3 relative of ours (transformers' own loader)",
                   "measured": worst, "met": worst <= 1e-3},
        "load_average_start": load_start, "load_average_end": _load_avg()}})
    print(json.dumps(rows, indent=1), worst)


if __name__ == "__main__":
    {"prepare": prepare, "gptqmodel": gptqmodel, "ours": ours, "compressed-tensors": compressed_tensors}[sys.argv[1]](
        *sys.argv[2:])
