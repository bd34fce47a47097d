"""GPU benchmark of the int_group kernels (hfcompress.kernels), one command (about 5 minutes on an
H100/H200, most of it compiling and autotuning on first use):

    python benchmarks/gpu_kernels.py                 # on a GPU -> results/gpu_kernels.json
    python benchmarks/gpu_kernels.py --dry-run       # CPU, TRITON_INTERPRET=1, tiny shapes
    python benchmarks/gpu_kernels.py --table FILE    # the README table of a result file

1. correctness against the pure-torch reference on the GPU: bits 2/3/4/8 x sym/asym x group
   (128, 40 = sub-groups of 8, per-channel) x act-order x every path (gemv, splitk, gemm, dense,
   tinygemm where it runs), fp16/bf16/fp32;
2. the device-to-device copy bandwidth, measured in the same run;
3. bf16 activations, 4-bit, group 128, asymmetric, on Llama-class shapes 4096x4096 .. 28672x8192:
   ours (autotuned) vs bf16 ``torch.nn.functional.linear`` vs torch's tinygemm int4 kernel, at
   M = 1, 16, 64, 256, 1024; GEMV bandwidth as a fraction of the copy;
4. 3-bit vs 4-bit GEMV, act-order vs not (M = 1, 16);
5. the issue's targets, each MET / MISSED with its numbers.

Timing: CUDA-graph replay (``triton.testing.do_bench_cudagraph``) over enough distinct layers
that one pass reads >= 4x the L2 in weights (they come from HBM, as in a model). Results are
written after every section (a timeout keeps what finished).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import gpu_common as common

common.bootstrap()
import torch  # noqa: E402

from hfcompress.formats.int_group import IntGroupSpec  # noqa: E402
from hfcompress.kernels import tinygemm  # noqa: E402
from hfcompress.kernels.configs import CONFIGS, KernelConfig, family, prune  # noqa: E402
from hfcompress.kernels.gpu_layout import gpu_layout  # noqa: E402
from hfcompress.kernels.int_group_mm import int_group_mm_triton, tuned  # noqa: E402
from hfcompress.nn.quant_linear import pack  # noqa: E402
from hfcompress.ops.int_group_mm import int_group_mm_ref  # noqa: E402

DRY = common.DRY
SHAPES = [(64, 256)] if DRY else [(4096, 4096), (14336, 4096), (4096, 14336), (8192, 8192), (28672, 8192),
                                  (8192, 28672)]
MS = (1, 16) if DRY else (1, 16, 64, 256, 1024)
FLOORS = {"fp32": 100.0, "fp16": 55.0, "bf16": 35.0}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def sqnr_db(ref, test):
    ref, test = ref.double(), test.double()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - test).pow(2).sum().clamp_min(1e-300)))


def make_layer(n, k, bits, gs, sym, act, device, seed=0):
    """A layer's stored v1 tensors from random codes, scales, zeros (and a random act-order)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    n_groups = 1 if gs == -1 else -(-k // gs)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    scale = torch.rand(n, n_groups, generator=g) * 0.02 + 0.005
    zero = None if sym else torch.randint(0, 1 << bits, (n, n_groups), generator=g, dtype=torch.uint8)
    g_idx = (torch.arange(k) // gs)[torch.randperm(k, generator=g)] if act else None
    t = pack(codes.to(device), scale.to(device), None if zero is None else zero.to(device),
             None if g_idx is None else g_idx.to(device), IntGroupSpec(bits=bits, group_size=gs, sym=sym, act_order=act))
    return dict(qweight=t["weight"], scale=t["weight_scale"], qzero=t.get("weight_zero"), g_idx=t.get("weight_g_idx"),
                bits=bits, group_size=gs, sym=sym, in_features=k)


def run(layer, x, bias=None, config=None):
    L = layer
    return int_group_mm_triton(x, L["qweight"], L["scale"], L["qzero"], L["g_idx"], bias, L["bits"], L["group_size"],
                               L["sym"], L["in_features"], config=config)


def ref(layer, x, bias=None):
    L = layer
    return int_group_mm_ref(x, L["qweight"], L["scale"], L["qzero"], L["g_idx"], bias, L["bits"], L["group_size"],
                            L["sym"], L["in_features"])


def correctness(device):
    """Every path forced (its first candidate that fits), per format variant; SQNR vs the reference."""
    n, k = (70, 200) if DRY else (1000, 1500)
    fam = "sm80" if DRY else family(torch.cuda.get_device_capability(device))
    variants = [(128, False, True, "bf16"), (40, True, True, "fp16"), (-1, False, False, "fp32")]
    paths = [(1, "gemv"), (33, "splitk"), (300, "gemm"), (300, "dense")]
    if DRY:
        variants, paths = variants[:2], [(1, "gemv"), (33, "splitk")]
    rows = []
    for bits in ((3, 4) if DRY else (2, 3, 4, 8)):
        for gs, sym, act, dname in variants:
            layer = make_layer(n, k, bits, gs, sym, act, device, seed=bits)
            lay = gpu_layout(layer["qweight"], layer["scale"], layer["qzero"], layer["g_idx"], bits, gs, sym, k)
            dt = DTYPES[dname]
            todo = list(paths)
            if not DRY and tinygemm.eligible(lay, dt):
                todo += [(1, "tinygemm"), (300, "tinygemm")]
            for m, kind in todo:
                gen = torch.Generator(device="cpu").manual_seed(m)
                x = torch.randn(m, k, generator=gen).to(device=device, dtype=dt)
                bias = torch.randn(n, generator=gen).to(device=device, dtype=dt)
                if DRY:
                    cfg = None
                elif kind == "tinygemm":
                    cfg = KernelConfig("tinygemm")
                else:
                    cfg = prune(CONFIGS[fam][kind], m, n, k, lay.ki, 32 // lay.lo_bits)[0]
                row = dict(bits=bits, group_size=gs, sym=sym, act_order=act, dtype=dname, m=m, n=n, k=k, path=kind,
                           config=cfg.name if cfg else "interpreter default")
                try:
                    s = sqnr_db(ref(layer, x, bias).float(), run(layer, x, bias, cfg).float())
                    floor = 40.0 if kind == "tinygemm" else FLOORS[dname]  # tinygemm: bf16 scales
                    row.update(sqnr_db=round(s, 1), floor_db=floor, ok=s >= floor)
                except Exception as e:  # noqa: BLE001 - recorded per case
                    row.update(ok=False, error=f"{type(e).__name__}: {e}"[:300])
                rows.append(row)
    return rows


def copy_bandwidth(device):
    nbytes = (16 << 20) if DRY else (2 << 30)
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = common.bench_ms(lambda: dst.copy_(src), reps=200)
    return 2 * nbytes / (ms * 1e-3)  # bytes read + written per second


def packed_bytes(n, k, bits, gs, sym):
    g = 1 if gs == -1 else -(-k // gs)
    return n * k * bits // 8 + g * n * 2 * (1 if sym else 2)  # codes + fp16 scales (+ fp16 zeros)


def copies_for(nbytes, device):
    if DRY:
        return 1
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(2, min(64, -(-4 * l2 // nbytes)))


def speed_rows(device, shapes, ms_list, bits=4, gs=128, act=False, baselines=True, copy_bw=None):
    rows = []
    for n, k in shapes:
        nb = packed_bytes(n, k, bits, gs, False)
        layers = [make_layer(n, k, bits, gs, False, act, device, seed=i) for i in range(copies_for(nb, device))]
        dense = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
                 for _ in range(copies_for(2 * n * k, device))] if baselines else []
        tg = None
        if baselines and not DRY:
            lays = [gpu_layout(L["qweight"], L["scale"], L["qzero"], L["g_idx"], bits, gs, False, k) for L in layers]
            if tinygemm.eligible(lays[0], torch.bfloat16):
                tg = [tinygemm.prepare(lay) for lay in lays]
        for m in ms_list:
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            t0 = time.time()
            run(layers[0], x)  # autotune this key (outside the timed graph)
            tune_s = time.time() - t0
            s = sqnr_db(ref(layers[0], x).float(), run(layers[0], x).float())
            t_ours = common.bench_ms(lambda: [run(L, x) for L in layers]) / len(layers)
            row = dict(n=n, k=k, m=m, bits=bits, group_size=gs, act_order=act, ours_us=round(t_ours * 1e3, 2),
                       sqnr_db=round(s, 1), layers_per_pass=len(layers), tune_s=round(tune_s, 1))
            if m == 1 and copy_bw:
                bw = (nb + k * 2 + n * 2) / (t_ours * 1e-3)
                row.update(gemv_bytes_per_s=bw, fraction_of_copy=round(bw / copy_bw, 3))
            if dense:
                t_bf16 = common.bench_ms(lambda: [torch.nn.functional.linear(x, w) for w in dense]) / len(dense)
                row.update(bf16_us=round(t_bf16 * 1e3, 2), speedup_vs_bf16=round(t_bf16 / t_ours, 2))
            if tg is not None:
                t_tg = common.bench_ms(lambda: [tinygemm.mm(x, p) for p in tg]) / len(tg)  # no act-order here
                row.update(tinygemm_us=round(t_tg * 1e3, 2), speedup_vs_tinygemm=round(t_tg / t_ours, 2))
            key = next((kk for kk in tuned() if kk[1] == n and kk[2] == k and kk[3] == bits and kk[0] == (
                m if m <= 4 else 1 << (m - 1).bit_length())), None)
            row["config"] = tuned()[key].name if key else "interpreter default"
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def targets(r) -> dict:
    sp = [x for x in r["speed"] if x["bits"] == 4 and not x["act_order"]]
    t = {}

    def add(name, want, got, met):
        t[name] = dict(target=want, measured=got, met=bool(met))

    big = [x for x in sp if x["m"] == 1 and x["n"] * x["k"] >= 14336 * 4096]
    if big and "fraction_of_copy" in big[0]:
        f = [x["fraction_of_copy"] for x in big]
        add("gemv_fraction_of_copy_64M+", ">= 0.75", [min(f), max(f)], min(f) >= 0.75)
    if sp and "speedup_vs_bf16" in sp[0]:
        def ratios(cond):
            return [x["speedup_vs_bf16"] for x in sp if cond(x)]
        r1 = ratios(lambda x: x["m"] == 1 and x["n"] * x["k"] >= 8192 * 8192)
        r1s = ratios(lambda x: x["m"] == 1 and x["n"] * x["k"] == 4096 * 4096)
        for name, want, vals, lo in (("m1_vs_bf16_8192x8192+", ">= 2.5x", r1, 2.5), ("m1_vs_bf16_4096x4096", ">= 2x", r1s, 2.0),
                                     ("m16_vs_bf16", ">= 2x", ratios(lambda x: x["m"] == 16), 2.0),
                                     ("m64_vs_bf16", ">= 1.2x", ratios(lambda x: x["m"] == 64), 1.2),
                                     ("m256+_vs_bf16", ">= 0.9x", ratios(lambda x: x["m"] >= 256), 0.9)):
            if vals:
                add(name, want, [min(vals), max(vals)], min(vals) >= lo)
    tg = [x["speedup_vs_tinygemm"] for x in sp if x["m"] in (1, 16) and "speedup_vs_tinygemm" in x]
    if tg:
        add("m1_m16_vs_tinygemm", ">= 1x", [min(tg), max(tg)], min(tg) >= 1.0)
    b3 = {(x["n"], x["k"], x["m"]): x["ours_us"] for x in r.get("bits3", [])}
    pairs = [(b3[key], x["ours_us"]) for x in sp if (key := (x["n"], x["k"], x["m"])) in b3 and x["m"] == 1]
    if pairs:
        worst = max(a / b for a, b in pairs)
        add("3bit_gemv_time_over_4bit", "<= 1.0", round(worst, 3), worst <= 1.0)
    ao = {(x["n"], x["k"], x["m"]): x["ours_us"] for x in r.get("act_order", [])}
    pairs = [(ao[key], x["ours_us"]) for x in sp if (key := (x["n"], x["k"], x["m"])) in ao]
    if pairs:
        worst = max(a / b for a, b in pairs)
        add("act_order_time_over_plain", "<= 1.1", round(worst, 3), worst <= 1.1)
    return t


def markdown(r) -> str:
    """The README table of a result file."""
    head = (f"{r.get('device', 'dry run')} (sm_{''.join(map(str, r.get('capability', [])))}), torch {r['torch']}, "
            f"triton {r['triton']}, commit {r.get('commit')}; bf16 activations, group 128, asymmetric; "
            f"device-to-device copy {r['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + write)\n\n")
    rows = ["| N x K | bits | act-order | M | ours (us) | bf16 linear (us) | vs bf16 | tinygemm (us) | vs tinygemm "
            "| GEMV bandwidth / copy | config |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for x in r["speed"] + r.get("bits3", []) + r.get("act_order", []):
        frac = f"{x['fraction_of_copy']:.1%}" if "fraction_of_copy" in x else ""
        rows.append(f"| {x['n']} x {x['k']} | {x['bits']} | {'yes' if x['act_order'] else 'no'} | {x['m']} | "
                    f"{x['ours_us']} | {x.get('bf16_us', '')} | {str(x.get('speedup_vs_bf16', '')) + 'x' if 'speedup_vs_bf16' in x else ''} | "
                    f"{x.get('tinygemm_us', '')} | {str(x.get('speedup_vs_tinygemm', '')) + 'x' if 'speedup_vs_tinygemm' in x else ''} | "
                    f"{frac} | {x['config']} |")
    ok = [c for c in r["correctness"] if c.get("ok")]
    tail = [f"\n\nCorrectness: {len(ok)}/{len(r['correctness'])} cases within their SQNR floor."]
    for name, t in r.get("targets", {}).items():
        tail.append(f"- {name} {t['target']}: **{'MET' if t['met'] else 'MISSED'}** ({t['measured']})")
    return head + "\n".join(rows) + "\n".join(tail)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU under TRITON_INTERPRET=1, tiny shapes")
    ap.add_argument("--table", metavar="JSON", help="print the README table of a result file and exit")
    ap.add_argument("--out", default=None, help="result file (default results/gpu_kernels[_dryrun].json)")
    args = ap.parse_args(argv)
    if args.table:
        print(markdown(json.loads(open(args.table).read())))
        return None
    out = args.out or str(common.RESULTS / ("gpu_kernels_dryrun.json" if DRY else "gpu_kernels.json"))
    device = torch.device("cpu" if DRY else "cuda")
    result = dict(common.device_info(), commit=common.git_commit())
    save = common.writer(common.Path(out), result)
    t0 = time.time()
    result["correctness"] = correctness(device)
    result["correctness_all_ok"] = all(c.get("ok") for c in result["correctness"])
    result["correctness_s"] = round(time.time() - t0, 1)
    print("correctness ok:", result["correctness_all_ok"], flush=True)
    save()
    result["copy_bytes_per_s"] = copy_bw = copy_bandwidth(device)
    result["speed"] = []
    for shape in SHAPES:
        result["speed"] += speed_rows(device, [shape], MS, copy_bw=copy_bw)
        save()
    few = SHAPES[:1] if DRY else [(4096, 4096), (8192, 8192), (28672, 8192)]
    result["bits3"] = speed_rows(device, few, (1, 16), bits=3, baselines=False, copy_bw=copy_bw)
    save()
    result["act_order"] = speed_rows(device, few, (1, 16), act=True, baselines=False, copy_bw=copy_bw)
    result["targets"] = {} if DRY else targets(result)  # interpreter times say nothing about a GPU
    result["total_s"] = round(time.time() - t0, 1)
    save()
    print(json.dumps(result["targets"], indent=1), flush=True)
    return result


if __name__ == "__main__":
    sys.exit(0 if main() is not None or "--table" in sys.argv else 1)
