"""GPU benchmark of the int_group Triton kernels (hfcompress.kernels), one command:

    python benchmarks/gpu_kernels.py --out benchmarks/results/gpu_kernels.json     # on a GPU
    python benchmarks/gpu_kernels.py --dry-run                                     # CPU, interpreter

1. correctness against the pure-torch reference: bits 2/3/4/8, sym/asym, act-order,
   fp16/bf16/fp32, every kernel path (GEMV M=1, split-K M=33, tiled GEMM M=300), odd N, K;
2. achieved memory bandwidth of the GEMV at M=1 (bf16, 4-bit, group 128, asymmetric) on
   4096x4096 .. 8192x28672, as a fraction of a measured device-to-device copy;
3. speedup over bf16 ``torch.nn.functional.linear`` at M = 1, 16, 64, 256;
4. bitsandbytes NF4 / torchao int4 at the same shapes when importable there.

Timing: CUDA-graph replay (``triton.testing.do_bench_cudagraph``) so Python launch overhead is
not measured, over enough distinct layers that weights come from HBM, not L2 (a model's
layers run one after another the same way). Targets: GEMV >= 85% of copy bandwidth; M=16
>= 3x faster than bf16. Results are written after every section (a timeout keeps them).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRY = "--dry-run" in sys.argv
if DRY:
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are defined


def _bootstrap() -> None:
    """Import hfcompress's format, reference op and kernels from this checkout without running
    ``hfcompress/__init__`` (which wires transformers/PEFT; a GPU box may carry other versions)."""
    for name, path in (("hfcompress", ROOT / "src" / "hfcompress"), ("hfcompress.kernels", ROOT / "kernels")):
        if name not in sys.modules:
            mod = types.ModuleType(name)
            mod.__path__ = [str(path)]
            sys.modules[name] = mod


_bootstrap()
import torch  # noqa: E402
import triton  # noqa: E402

from hfcompress.formats.int_group import IntGroupSpec, pack_codes  # noqa: E402
from hfcompress.kernels.configs import CONFIGS, family, kind_for, prune  # noqa: E402
from hfcompress.kernels.int_group_mm import int_group_mm_triton, tuned  # noqa: E402
from hfcompress.ops.int_group_mm import int_group_mm_ref  # noqa: E402

GEMV_TARGET_FRACTION = 0.85
M16_TARGET_SPEEDUP = 3.0


def sqnr_db(ref, test):
    ref, test = ref.double(), test.double()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - test).pow(2).sum().clamp_min(1e-300)))


def make_layer(n, k, bits, gs, sym, act, device, seed=0):
    """Random packed words: every bit pattern is a valid code stream (padding bits are ignored)."""
    g = torch.Generator(device=device).manual_seed(seed)
    n_groups = 1 if gs == -1 else -(-k // gs)
    words = lambda rows, length: torch.randint(-2**31, 2**31 - 1, (rows, -(-length // 32) * bits),  # noqa: E731
                                               generator=g, device=device, dtype=torch.int32)
    scale = (torch.rand(n, n_groups, generator=g, device=device) * 0.02 + 0.005).half()
    g_idx = None
    if act:
        g_idx = (torch.arange(k, device=device) // gs)[torch.randperm(k, generator=g, device=device)].int()
    return dict(qweight=words(n, k), scale=scale, qzero=None if sym else words(n_groups, n), g_idx=g_idx)


def op_args(layer, x, bias, bits, gs, sym, k):
    return (x, layer["qweight"], layer["scale"], layer["qzero"], layer["g_idx"], bias, bits, gs, sym, k)


def bench_ms(fn, reps: int) -> float:
    if DRY:  # wall clock of the interpreter: only shows the script runs
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=reps)


def correctness(device, shapes):
    n, k = shapes
    rows = []
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    # what every path must get right: (sym, act_order, dtype) per bits, group 64 (ragged last group)
    variants = [(False, False, "bf16", 64), (True, True, "fp16", 64), (False, True, "fp32", 64), (False, False, "fp16", -1)]
    ms = (1, 33) if DRY else (1, 33, 300)
    fam = "sm80" if DRY else family(torch.cuda.get_device_capability(device))
    for bits in (2, 3, 4, 8):
        for sym, act, dname, gs in variants:
            layer = make_layer(n, k, bits, gs, sym, act, device, seed=bits)
            for m in ms:
                dt = dtypes[dname]
                x = torch.randn(m, k, device=device).to(dt)
                bias = torch.randn(n, device=device).to(dt)
                args = op_args(layer, x, bias, bits, gs, sym, k)
                # the family's first candidate that launches (no autotune per variant)
                used, skipped, y = "interpreter", [], None
                for cfg in ([None] if DRY else prune(CONFIGS[fam][kind_for(m)], m, n, k)):
                    try:
                        y = int_group_mm_triton(*args, config=cfg)
                        used = cfg.name if cfg else used
                        break
                    except triton.runtime.errors.OutOfResources as e:
                        skipped.append(f"{cfg.name}: {e}"[:160])
                if y is None:
                    rows.append(dict(bits=bits, sym=sym, act_order=act, dtype=dname, m=m, ok=False, skipped=skipped))
                    continue
                ref = int_group_mm_ref(*args)
                s = sqnr_db(ref.float(), y.float())
                floor = {"fp32": 100.0, "fp16": 55.0, "bf16": 35.0}[dname]
                rows.append(dict(bits=bits, group_size=gs, sym=sym, act_order=act, dtype=dname, m=m, n=n, k=k,
                                 sqnr_db=round(s, 1), floor_db=floor, ok=s >= floor, config=used,
                                 skipped_out_of_resources=skipped))
    return rows


def copy_bandwidth(device):
    nbytes = (64 << 20) if DRY else (2 << 30)
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), reps=200)
    return 2 * nbytes / (ms * 1e-3)  # bytes read + written per second


def baselines_available():
    found = {}
    for name in ("bitsandbytes", "torchao"):
        try:
            mod = __import__(name)
            found[name] = getattr(mod, "__version__", "?")
        except Exception as e:  # noqa: BLE001 - report why
            found[name] = f"not importable: {type(e).__name__}"
    return found


def bnb_nf4(w_bf16):
    import bitsandbytes as bnb

    lin = bnb.nn.Linear4bit(w_bf16.shape[1], w_bf16.shape[0], bias=False, compute_dtype=torch.bfloat16,
                            quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(w_bf16.cpu(), requires_grad=False, quant_type="nf4")
    return lin.to(w_bf16.device)


def torchao_int4(w_bf16):
    from torchao.quantization import Int4WeightOnlyConfig, quantize_

    lin = torch.nn.Linear(w_bf16.shape[1], w_bf16.shape[0], bias=False, dtype=torch.bfloat16,
                          device=w_bf16.device)
    lin.weight.data.copy_(w_bf16)
    quantize_(lin, Int4WeightOnlyConfig(group_size=128))
    return lin


def speed(device, shapes, ms_list, copy_bw, have):
    bits, gs, sym = 4, 128, False
    rows = []
    l2 = 0 if DRY else torch.cuda.get_device_properties(device).L2_cache_size
    for n, k in shapes:
        packed_bytes = n * k * bits // 8 + n * (k // gs) * 2 + (k // gs) * n * bits // 8
        # enough distinct layers that one pass reads >= 4x L2 of packed weights from HBM
        copies = 1 if DRY else max(2, min(64, -(-4 * l2 // packed_bytes)))
        layers = [make_layer(n, k, bits, gs, sym, False, device, seed=i) for i in range(copies)]
        w_bf16 = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        extra = {}
        for name, lib, build in (("bnb_nf4", "bitsandbytes", bnb_nf4), ("torchao_int4", "torchao", torchao_int4)):
            if not DRY and not have[lib].startswith("not"):
                try:
                    extra[name] = [build(w) for w in w_bf16]
                except Exception as e:  # noqa: BLE001
                    extra[name] = f"failed: {type(e).__name__}: {e}"[:200]
        for m in ms_list:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            ours = lambda: [int_group_mm_triton(*op_args(lay, x, None, bits, gs, sym, k)) for lay in layers]  # noqa: E731
            ref_out = int_group_mm_ref(*op_args(layers[0], x, None, bits, gs, sym, k))
            s = sqnr_db(ref_out.float(), int_group_mm_triton(*op_args(layers[0], x, None, bits, gs, sym, k)).float())
            t_ours = bench_ms(ours, reps=200) / len(layers)
            base = lambda: [torch.nn.functional.linear(x, w) for w in w_bf16]  # noqa: E731
            t_bf16 = bench_ms(base, reps=200) / len(w_bf16)
            row = dict(n=n, k=k, m=m, ours_us=round(t_ours * 1e3, 2), bf16_us=round(t_bf16 * 1e3, 2),
                       speedup_vs_bf16=round(t_bf16 / t_ours, 2), sqnr_db=round(s, 1), layers_per_pass=len(layers))
            if m == 1:
                bw = (packed_bytes + k * 2 + n * 2) / (t_ours * 1e-3)
                row.update(gemv_bytes_per_s=bw, fraction_of_copy=round(bw / copy_bw, 3))
            for name, mods in extra.items():
                if isinstance(mods, str):
                    row[f"{name}_us"] = mods
                    continue
                t = bench_ms(lambda: [mod(x) for mod in mods], reps=200) / len(mods)
                row[f"{name}_us"] = round(t * 1e3, 2)
                row[f"speedup_vs_{name}"] = round(t / t_ours, 2)
            key = next((kk for kk in tuned() if kk[2] == n and kk[3] == k and kk[0] == ("gemv" if m <= 8 else "splitk" if m <= 64 else "gemm")), None)
            row["config"] = tuned()[key].name if key else "interpreter"
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def markdown(r) -> str:
    """The README table of a result file."""
    head = (f"{r.get('device', 'dry run')} (sm_{''.join(map(str, r.get('capability', [])))}), torch {r['torch']}, "
            f"triton {r['triton']}; 4-bit, group 128, asymmetric, bf16 activations; device-to-device copy "
            f"{r['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write)\n\n")
    rows = ["| N x K | M | ours (us) | bf16 linear (us) | speedup vs bf16 | GEMV bandwidth / copy | config |",
            "|---|---|---|---|---|---|---|"]
    for x in r["speed"]:
        frac = f"{x['fraction_of_copy']:.1%}" if "fraction_of_copy" in x else ""
        rows.append(f"| {x['n']} x {x['k']} | {x['m']} | {x['ours_us']} | {x['bf16_us']} | {x['speedup_vs_bf16']}x | "
                    f"{frac} | {x['config']} |")
    t = r["targets"]
    tail = (f"\n\nCorrectness: {sum(c['ok'] for c in r['correctness'])}/{len(r['correctness'])} cases within their "
            f"SQNR floor (lowest {min(c.get('sqnr_db', 0) for c in r['correctness'])} dB). Targets: GEMV >= "
            f"{t['gemv_fraction_of_copy']['target']:.0%} of copy bandwidth: "
            f"**{'MET' if t['gemv_fraction_of_copy']['met'] else 'MISSED'}** ({t['gemv_fraction_of_copy']['min']:.1%}"
            f"..{t['gemv_fraction_of_copy']['max']:.1%}); M=16 >= {t['m16_speedup_vs_bf16']['target']}x bf16: "
            f"**{'MET' if t['m16_speedup_vs_bf16']['met'] else 'MISSED'}** ({t['m16_speedup_vs_bf16']['min']}x.."
            f"{t['m16_speedup_vs_bf16']['max']}x).")
    return head + "\n".join(rows) + tail


def main():
    if "--table" in sys.argv:
        print(markdown(json.loads(Path(sys.argv[sys.argv.index("--table") + 1]).read_text())))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU under TRITON_INTERPRET=1, tiny shapes")
    ap.add_argument("--table", metavar="JSON", help="print the README table of a result file and exit")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / ("gpu_kernels_dryrun.json" if DRY else "gpu_kernels.json")))
    args = ap.parse_args()
    device = torch.device("cpu" if DRY else "cuda")
    result = dict(dry_run=DRY, torch=torch.__version__, triton=triton.__version__)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():
        out.write_text(json.dumps(result, indent=1))

    if not DRY:
        props = torch.cuda.get_device_properties(device)
        result.update(device=props.name, capability=list(torch.cuda.get_device_capability()),
                      config_family=family(torch.cuda.get_device_capability()), sms=props.multi_processor_count)
    t0 = time.time()
    result["baselines"] = have = baselines_available()
    result["correctness"] = correctness(device, (70, 200) if DRY else (1000, 1500))
    result["correctness_all_ok"] = all(r["ok"] for r in result["correctness"])
    result["correctness_s"] = round(time.time() - t0, 1)
    print("correctness ok:", result["correctness_all_ok"], flush=True)
    save()
    result["copy_bytes_per_s"] = copy_bw = copy_bandwidth(device)
    shapes = [(64, 256)] if DRY else [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192), (8192, 28672)]
    ms_list = (1, 16) if DRY else (1, 16, 64, 256)
    result["speed"] = []
    for shape in shapes:
        result["speed"] += speed(device, [shape], ms_list, copy_bw, have)
        save()
    gemv = [r["fraction_of_copy"] for r in result["speed"] if r["m"] == 1]
    m16 = [r["speedup_vs_bf16"] for r in result["speed"] if r["m"] == 16]
    result["targets"] = dict(
        gemv_fraction_of_copy=dict(target=GEMV_TARGET_FRACTION, min=min(gemv), max=max(gemv),
                                   met=min(gemv) >= GEMV_TARGET_FRACTION),
        m16_speedup_vs_bf16=dict(target=M16_TARGET_SPEEDUP, min=min(m16), max=max(m16),
                                 met=min(m16) >= M16_TARGET_SPEEDUP))
    result["total_s"] = round(time.time() - t0, 1)
    save()
    print(json.dumps(result["targets"]), flush=True)


if __name__ == "__main__":
    main()
