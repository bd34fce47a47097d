"""Distributed calibration on CPU: SmolLM2-135M GPTQ 4-bit g64 (act-order, asymmetric,
true-sequential, bf16 as stored), streamed from the checkpoint directory, 1 process vs N
processes (gloo), one thread per process, same calibration windows.

The GPTQ options are set here, not taken from GPTQConfig's defaults (:func:`gptq_options`):
integer zero points and act-order groups fitted as the columns go (the rows measured since the
first run), or ``--zero-point float --static-groups``; the results record them.

Each entry is a fresh set of processes started as torchrun starts them (RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT); every rank reports its own wall time of ``hfcompress.quantize`` (from
a common start after the process group is up and the tokens are ready), CPU time, peak RSS and
the bytes its collectives moved. Entries run back to back, 1 process first, then N, alternating
for ``--repeats``; the load average is recorded before and after each. The two checkpoints are
compared code for code (the fraction of 4-bit codes that differ: reduction order), and with
``--ppl`` their perplexity on the first evaluation windows of every evaluation domain.

    python benchmarks/distributed.py --blocks 30 --size 32x256 --procs 1 2 --ppl
    python benchmarks/distributed.py --device cuda --procs 1 2 4 8 --size 128x512   # NCCL, one GPU per rank
    python benchmarks/distributed.py --table

``--device cuda`` runs every rank on its own GPU with NCCL (``cuda:LOCAL_RANK``); on a machine with
fewer GPUs than the largest ``--procs`` it says so, records the skip in
results/distributed_gpu.json and exits 0.
Writes benchmarks/results/distributed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "distributed.json")
BITS, GROUP = 4, 64


def gptq_options(zero_point: str = "int", static_groups: bool = False) -> dict:
    """Every option of the measured GPTQConfig, explicit (defaults may change; the results keep these)."""
    return {"bits": BITS, "group_size": GROUP, "sym": False, "act_order": True, "static_groups": static_groups,
            "zero_point": zero_point, "mse_clip": True, "damp": 0.01, "true_sequential": True}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _source(blocks: int) -> str:
    sys.path.insert(0, HERE)
    from gptq_speed import _source as cut  # the bf16 checkpoint, optionally cut to its first blocks

    return cut(0 if blocks == 30 else blocks)


#: functions timed by ``--profile`` (module, attribute[, class]): exclusive wall and CPU seconds per phase
PHASES = [
    ("hfcompress.calibration.blocks", "capture_block_inputs", None, "capture inputs"),
    ("hfcompress.streaming", "_materialise_", None, "read block"),
    ("hfcompress.streaming", "save_file", None, "write block part"),
    ("hfcompress.streaming", "_write_shards", None, "write shards"),
    ("hfcompress.streaming", "write_card_", None, "write card"),
    ("hfcompress.calibration.blocks", "collect_input_stats", "BlockStep", "stats forward"),
    ("hfcompress.calibration.blocks", "add_", "InputStats", "X^T X"),
    ("hfcompress.calibration.blocks", "tail_layers", "BlockStep", "probes"),
    ("hfcompress.calibration.blocks", "sequential_groups", "BlockStep", "probes"),
    ("hfcompress.calibration.blocks", "_probe_", "BlockStep", "probes"),
    ("hfcompress.calibration.blocks", "_advance_", "BlockStep", "advance forward"),
    ("hfcompress.calibration.blocks", "hessian", "InputStats", "hessian"),
    ("hfcompress.algorithms.gptq", "inverse_hessian_cholesky", None, "gptq factor"),
    ("hfcompress.algorithms.gptq", "_column_loop_", None, "gptq column loop"),
    ("hfcompress.algorithms.gptq", "group_grid", None, "gptq grids"),
    ("hfcompress.algorithms.gptq", "gptq", None, "gptq other"),
    ("hfcompress.calibration.apply", "gptq", None, "gptq other"),
    ("hfcompress.calibration.apply", "gptq_layers", None, "pack layers"),
    ("hfcompress.calibration.apply", "_load_dequantized_", None, "dequantize into block"),
    ("hfcompress.calibration.blocks", "return_freed_memory", None, "malloc_trim"),
    ("hfcompress.formats.int_group.layer", "from_codes", "QuantLinear", "pack layers"),
    ("hfcompress.formats.int_group.layer", "dequantize", "QuantLinear", "dequantize rows"),
    ("hfcompress.formats.layer", "load_packed", "CompressedLinear", "load packed"),
    ("hfcompress.distributed.context", "reduce_", "DistContext", "comm: X^T X"),
    ("hfcompress.distributed.context", "gather_columns", "DistContext", "comm: factor"),
    ("hfcompress.distributed.context", "exchange", "DistContext", "comm: results"),
    ("hfcompress.distributed.context", "check", "DistContext", "comm: check"),  # by site: _check_site
    ("hfcompress.distributed.context", "all_sum", "DistContext", "comm: checks"),
    ("hfcompress.distributed.context", "same_everywhere", "DistContext", "comm: checks"),
]


def _install_phase_timers() -> dict:
    """Wrap the functions of :data:`PHASES`; returns ``{phase: [wall s, cpu s, calls, minor page faults]}`` (exclusive
    of the timed functions they call), filled as the job runs."""
    import functools
    import importlib

    totals: dict[str, list] = {}
    stack: list[list] = []  # [wall of timed children, cpu of timed children, phase, faults of timed children]

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    def wrap(fn, phase):
        @functools.wraps(fn)
        def timed(*a, **kw):
            w0, c0, f0 = time.perf_counter(), time.process_time(), faults()
            name = phase
            if fn.__name__ == "check":  # where the ranks wait: the check's site (and the sums it runs)
                name = _check_site(a, kw)
            elif stack and stack[-1][2].startswith("comm: check, "):
                name = stack[-1][2]
            stack.append([0.0, 0.0, name, 0])
            try:
                return fn(*a, **kw)
            finally:
                child_w, child_c, name, child_f = stack.pop()
                w, c, f = time.perf_counter() - w0, time.process_time() - c0, faults() - f0
                t = totals.setdefault(name, [0.0, 0.0, 0, 0])
                t[0] += w - child_w
                t[1] += c - child_c
                t[2] += 1
                t[3] += f - child_f
                if stack:
                    stack[-1][0] += w
                    stack[-1][1] += c
                    stack[-1][3] += f
        return timed

    for mod_name, attr, cls, phase in PHASES:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        owner = getattr(mod, cls) if cls else mod
        if hasattr(owner, attr):
            setattr(owner, attr, wrap(getattr(owner, attr), phase))
    totals[_STACK] = stack
    return totals


_STACK = "_stack"  # key of the timers' stack in the dict _install_phase_timers returns


def _check_site(args: tuple, kwargs: dict) -> str:
    """``DistContext.check(error, where)``'s phase: "comm: check, <step>" with the block's and the
    layers' names dropped (``model.layers.3: calibration forward`` -> ``calibration forward``; the
    factor's check, named by its layers, -> ``factor``): where the ranks wait for each other."""
    where = str(kwargs.get("where", args[2] if len(args) > 2 else ""))
    if ": " in where:
        site = where.rpartition(": ")[2]
    else:  # the factor's check names only its layers; the job's own checks are sentences
        site = "factor" if " " not in where else where
    return f"comm: check, {site}"


def _sample_rss(phases: dict, every_s: float = 0.01) -> dict:
    """Sample the resident set every ``every_s`` in a thread; returns ``{phase: largest RSS MB seen
    while it was the innermost timed phase}`` (filled as the job runs; "other" outside every phase)."""
    import threading

    peak: dict[str, float] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    stack = phases[_STACK]

    def run():
        with open("/proc/self/statm") as f:
            while True:
                f.seek(0)
                mb = int(f.read().split()[1]) * page / 2**20
                top = stack[-1][2] if stack else "other"
                if mb > peak.get(top, 0.0):
                    peak[top] = mb
                time.sleep(every_s)

    threading.Thread(target=run, daemon=True).start()
    return peak


def rank_main(args) -> None:
    """One rank (or the single process): quantize, report."""
    import torch

    torch.set_num_threads(1)
    phases = _install_phase_timers() if args.profile else None
    rss_by_phase = _sample_rss(phases) if args.profile else None
    from transformers import AutoTokenizer

    import hfcompress
    from hfcompress.calibration import get_calibration_batches

    world = int(os.environ.get("WORLD_SIZE", "1"))
    n_samples, seq_len = (int(v) for v in args.size.split("x"))
    src = _source(args.blocks)
    batches = get_calibration_batches(AutoTokenizer.from_pretrained(src), None, n_samples=n_samples, seq_len=seq_len,
                                      batch_size=8)
    dist = None
    if world > 1:
        import torch.distributed as tdist

        from hfcompress.distributed import current

        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        tdist.init_process_group("nccl" if args.device == "cuda" else "gloo")
        dist = current()
        dist.barrier()  # a common start: every rank has imported, read its tokens and joined
    rss0, cpu0, t0 = _rss_mb(), _cpu_s(), time.perf_counter()
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    cfg = hfcompress.GPTQConfig(**gptq_options(args.zero_point, args.static_groups), n_samples=n_samples,
                                seq_len=seq_len)
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if args.device == "cuda" else None
    hfcompress.quantize(src, cfg, out_dir=args.out, batches=batches, dtype=torch.bfloat16, device=device)
    if device is not None:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_SELF)
    report = {"rank": dist.rank if dist else 0, "device": device or "cpu", "wall_s": round(wall, 2), "cpu_s": round(_cpu_s() - cpu0, 2),
              "user_s": round(usage.ru_utime - usage0.ru_utime, 2), "sys_s": round(usage.ru_stime - usage0.ru_stime, 2),
              "minor_faults": usage.ru_minflt - usage0.ru_minflt,
              "peak_rss_mb": round(_rss_mb(), 1), "rss_before_mb": round(rss0, 1),
              "torch_threads": torch.get_num_threads(), "sent_bytes": dict(dist.sent) if dist else {}}
    if phases is not None:
        phases.pop(_STACK)
        report["phases"] = {k: {"wall_s": round(w, 3), "cpu_s": round(c, 3), "calls": n, "minor_faults": f}
                            for k, (w, c, n, f) in sorted(phases.items(), key=lambda kv: -kv[1][0])}
        report["peak_rss_mb_by_phase"] = {k: round(v, 1) for k, v in sorted(rss_by_phase.items(), key=lambda kv: -kv[1])}
    with open(args.report, "w") as f:
        json.dump(report, f)
    if dist is not None:
        import torch.distributed as tdist

        tdist.destroy_process_group()


FLIP_ROWS = (8, 12, 16, 24, 32)  # calibration windows of the tiny-model tie-flip measurement (2 per batch)


def _tiny_gptq(rows: int):
    """The tiny Llama of tests/tiny_models.py, GPTQ 4-bit g32 on ``rows`` seeded windows of 32 tokens."""
    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    import torch
    from tiny_models import VOCAB, llama_gqa

    import hfcompress

    g = torch.Generator().manual_seed(3)
    batches = list(torch.randint(0, VOCAB, (rows, 32), generator=g).split(2))
    model = llama_gqa()
    hfcompress.quantize_(model, hfcompress.GPTQConfig(bits=4, group_size=32), batches=batches)
    return model


def flips_rank_main(args) -> None:
    """One of two gloo ranks of the tie-flip measurement: rank 0 saves each model's state."""
    import torch.distributed as tdist
    from safetensors.torch import save_file

    tdist.init_process_group("gloo")
    for rows in FLIP_ROWS:
        sd = _tiny_gptq(rows).state_dict()
        if tdist.get_rank() == 0:
            save_file({k: v.contiguous() for k, v in sd.items()}, os.path.join(args.out, f"rows{rows}.safetensors"))
    tdist.destroy_process_group()


def tie_flips() -> dict:
    """Fraction of 4-bit codes that differ between 2 gloo processes and 1 process, tiny Llama,
    for several numbers of calibration batches per rank (one batch per rank: exactly equal)."""
    from safetensors.torch import load_file

    from hfcompress.formats.int_group.pack import unpack_codes

    work = tempfile.mkdtemp(prefix="hfc-flips-")
    port = _port()
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--flips-rank", "--out", work],
                              env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(r), "WORLD_SIZE": "2",
                                   "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
             for r in range(2)]
    if any(p.wait() != 0 for p in procs):
        raise RuntimeError("tie-flip ranks failed")
    rows_out = []
    import torch

    torch.set_num_threads(1)  # as the ranks (OMP_NUM_THREADS=1): MKL's Cholesky rounds otherwise with 2 threads
    for rows in FLIP_ROWS:
        single = _tiny_gptq(rows)
        ref, dist = single.state_dict(), load_file(os.path.join(work, f"rows{rows}.safetensors"))
        diff = total = 0
        layers = 0
        for name, layer in single.named_modules():
            if hasattr(layer, "stored_tensors"):
                a = unpack_codes(ref[f"{name}.weight"], 4, layer.in_features)
                b = unpack_codes(dist[f"{name}.weight"], 4, layer.in_features)
                diff += int((a != b).sum())
                total += a.numel()
                layers += int(bool((a != b).any()))
        rows_out.append({"windows": rows, "batches_per_rank": rows // 4, "codes_differing": diff, "codes": total,
                         "fraction": round(diff / total, 6), "layers_differing": layers})
    shutil.rmtree(work, ignore_errors=True)
    return {"model": "tests/tiny_models.llama_gqa (2 blocks), GPTQ 4-bit g32 act-order, windows of 32 tokens, "
                     "2 per batch", "rows": rows_out}


def _commit() -> str:
    """The checked-out commit (``+dirty`` when the source differs from it)."""
    git = ["git", "-C", HERE]
    head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(git + ["status", "--porcelain", "--", "../src"], capture_output=True, text=True).stdout
    return head + ("+dirty" if dirty.strip() else "")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_entry(procs: int, blocks: int, size: str, work: str, device: str = "cpu", profile: bool = False,
              options: tuple[str, bool] = ("int", False)) -> dict:
    out = os.path.join(work, f"out-{procs}")
    shutil.rmtree(out, ignore_errors=True)
    port = _port()
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    children = []
    for rank in range(procs):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        if procs > 1:
            env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(procs), LOCAL_WORLD_SIZE=str(procs),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        report = os.path.join(work, f"report-{procs}-{rank}.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--rank-entry", "--blocks", str(blocks), "--size", size,
               "--out", out, "--report", report, "--device", device, "--zero-point", options[0]] + \
            (["--static-groups"] if options[1] else []) + (["--profile"] if profile else [])
        children.append((subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True), report))
    ranks, errors = [], []
    for p, report in children:
        _, err = p.communicate()
        if p.returncode != 0:
            errors.append(err[-2000:])
        else:
            with open(report) as f:
                ranks.append(json.load(f))
    job_wall = time.perf_counter() - t0
    n_samples, seq_len = (int(v) for v in size.split("x"))
    entry = {"procs": procs, "device": device, "blocks": blocks, "size": size, "n_samples": n_samples, "seq_len": seq_len,
             "tokens": n_samples * seq_len, "job_wall_s": round(job_wall, 2),
             "loadavg_before": [round(v, 2) for v in load0], "loadavg_after": [round(v, 2) for v in os.getloadavg()],
             "ranks": sorted(ranks, key=lambda r: r["rank"])}
    if errors:
        entry["error"] = errors
        return entry
    entry["wall_s"] = max(r["wall_s"] for r in ranks)
    entry["max_peak_rss_mb"] = max(r["peak_rss_mb"] for r in ranks)
    return entry


def compare(work: str, procs: list[int], ppl: bool) -> dict:
    """Codes that differ between the checkpoints (4-bit, unpacked), and optionally perplexity."""
    import torch
    from safetensors.torch import load_file

    from hfcompress.formats.int_group.pack import unpack_codes

    ref = load_file(os.path.join(work, f"out-{procs[0]}", "model.safetensors"))
    out: dict = {}
    for n in procs[1:]:
        other = load_file(os.path.join(work, f"out-{n}", "model.safetensors"))
        diff = total = 0
        for k, v in ref.items():
            if k.endswith(".weight") and v.dtype == torch.int32 and f"{k}_scale" in ref:
                k_in = v.shape[-1] * 32 // BITS  # SmolLM2's widths are whole words of codes
                a, b = unpack_codes(v, BITS, k_in), unpack_codes(other[k], BITS, k_in)
                diff += int((a != b).sum())
                total += a.numel()
        out[f"codes_differing_{n}_vs_{procs[0]}"] = {"differing": diff, "total": total,
                                                     "fraction": round(diff / total, 6)}
    if ppl:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        import hfcompress  # noqa: F401  (registers the quantizer)
        from hfcompress.calibration import eval_texts
        from hfcompress.evaluate import perplexity

        tok = AutoTokenizer.from_pretrained(os.path.join(work, f"out-{procs[0]}"))
        scores = {}
        for n in procs:
            model = AutoModelForCausalLM.from_pretrained(os.path.join(work, f"out-{n}")).eval()
            scores[n] = {d: round(perplexity(model, tok, text, window=512, stride=256, max_tokens=2048).perplexity, 4)
                         for d, text in eval_texts().items()}
        out["perplexity_first_2048_tokens"] = scores
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=30, help="decoder blocks of SmolLM2 kept (30: the whole model)")
    ap.add_argument("--size", default="32x256", help="calibration windows x tokens per window")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--ppl", action="store_true", help="perplexity of every checkpoint on the evaluation domains")
    ap.add_argument("--results", default=None, metavar="JSON",
                    help="results file (default: results/distributed.json, results/distributed_gpu.json for cuda)")
    ap.add_argument("--keep", default=None, metavar="DIR",
                    help="write the checkpoints under DIR and keep them (then --compare-only DIR later)")
    ap.add_argument("--compare-only", default=None, metavar="DIR",
                    help="compare the checkpoints a --keep run left in DIR (codes, --ppl) into the results JSON")
    ap.add_argument("--table", action="store_true")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cpu: gloo, one thread per process; cuda: NCCL, one GPU per process")
    ap.add_argument("--tie-flips", action="store_true",
                    help="tiny model, 2 gloo processes vs 1: fraction of codes that differ (seconds; writes "
                         "results/distributed_tie_flips.json)")
    ap.add_argument("--profile", action="store_true",
                    help="time the phases of every rank (stats forwards, X^T X, GPTQ factor / column loop, packing, "
                         "collectives, reads, writes: wall and CPU s) into its report, with the largest RSS sampled "
                         "(every 10 ms) while each phase ran")
    ap.add_argument("--zero-point", default="int", choices=["int", "float"],
                    help="GPTQ zero points (default int: the rows measured since the first run)")
    ap.add_argument("--static-groups", action="store_true",
                    help="GPTQ static groups (default off: act-order groups fitted as the columns go)")
    ap.add_argument("--rank-entry", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--flips-rank", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--report", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_entry:
        rank_main(args)
        return
    if args.flips_rank:
        flips_rank_main(args)
        return
    if args.tie_flips:
        res = tie_flips()
        with open(RESULTS.replace(".json", "_tie_flips.json"), "w") as f:
            json.dump(res, f, indent=1)
        for r in res["rows"]:
            print(r)
        return
    if args.table:
        print(table(args.results or RESULTS))
        return
    results = args.results or (RESULTS if args.device == "cpu" else RESULTS.replace(".json", "_gpu.json"))
    if args.device == "cuda":
        import torch

        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if have < max(args.procs):
            reason = f"skipped: {have} GPU(s) here, --procs {max(args.procs)} needs one GPU per process"
            print(reason)
            with open(results, "w") as f:
                json.dump({"skipped": reason}, f, indent=1)
            return
    if args.compare_only:
        with open(results) as f:
            result = json.load(f)
        result["comparison"] = compare(args.compare_only, args.procs, args.ppl)
        result["comparison_command"] = " ".join(sys.argv)
        with open(results, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result["comparison"], indent=1))
        return
    _source(args.blocks)  # cut once, before any timing
    work = args.keep or tempfile.mkdtemp(prefix="hfc-dist-")
    os.makedirs(work, exist_ok=True)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    entries: list[dict] = []
    options = gptq_options(args.zero_point, args.static_groups)
    result = {"model": "SmolLM2-135M-Instruct (bf16 checkpoint)",
              "config": f"GPTQ {BITS}-bit g{GROUP} act-order asym true-sequential, {options['zero_point']} zero "
              f"points, {'static' if options['static_groups'] else 'act-order'} groups, streamed from the checkpoint",
              "gptq_options": options, "commit": _commit(),
              "machine": f"{os.cpu_count()} CPUs, shared with other jobs (see load averages)",
              "command": " ".join(sys.argv), "uptime_before": uptime, "entries": entries}
    os.makedirs(os.path.dirname(results), exist_ok=True)

    def save():  # after every entry: a run stopped by a time limit keeps what it measured
        result["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        with open(results, "w") as f:
            json.dump(result, f, indent=1)

    for _ in range(args.repeats):
        for n in args.procs:
            e = run_entry(n, args.blocks, args.size, work, args.device, args.profile,
                          (args.zero_point, args.static_groups))
            print(json.dumps({k: v for k, v in e.items() if k != "ranks"}), flush=True)
            entries.append(e)
            save()
    if not any("error" in e for e in entries):
        result["comparison"] = compare(work, sorted(set(args.procs)), args.ppl)
    save()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(table(results))


def table(path: str = RESULTS) -> str:
    with open(path) as f:
        data = json.load(f)
    lines = ["| processes | blocks | calibration | quantize wall s (slowest rank) | job wall s | CPU s per rank | "
             "peak RSS MB per rank | sent MiB per rank | load avg (1 min) |", "|---|---|---|---|---|---|---|---|---|"]
    for e in data["entries"]:
        if "error" in e:
            lines.append(f"| {e['procs']} | {e['blocks']} | {e['size']} | failed | | | | | |")
            continue
        cpu = " / ".join(f"{r['cpu_s']:.0f}" for r in e["ranks"])
        rss = " / ".join(f"{r['peak_rss_mb']:.0f}" for r in e["ranks"])
        sent = " / ".join(f"{sum(r['sent_bytes'].values()) / 2**20:.1f}" for r in e["ranks"]) if e["procs"] > 1 else "0"
        lines.append(f"| {e['procs']} | {e['blocks']} | {e['size']} | {e['wall_s']:.1f} | {e['job_wall_s']:.1f} | "
                     f"{cpu} | {rss} | {sent} | {e['loadavg_before'][0]:.2f} -> {e['loadavg_after'][0]:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
