"""EvoPress: the search (level-switch mutation on budget, multi-step selection), the level
database, KL fitness, EvoPressConfig through quantize_ / from_pretrained / the CLI, budgets
met, save/reload bit-exact."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import char_tokenizer, inputs, llama_gqa
from transformers import AutoModelForCausalLM

import hfcompress
from hfcompress import ConfigError, EvoPressConfig
from hfcompress.algorithms.evopress import (
    allocation_cost,
    evopress_search,
    initial_allocation,
    level_switch_mutation,
    proxy_allocation,
)
from hfcompress.evopress import parse_size
from hfcompress.formats import is_compressed

COST = [[2.0, 3.0, 4.0, 8.0], [2.0, 3.0, 4.0, 8.0], [20.0, 30.0, 40.0, 80.0], [2.0, 3.0, 4.0, 8.0]]


def test_level_switch_mutation_stays_on_budget_and_moves_one_layer_up():
    g = torch.Generator().manual_seed(0)
    budget = 3.0 * 2 + 3.0 + 30.0 + 3.0 + 1.0
    parent = initial_allocation(COST, budget, g)
    assert allocation_cost(parent, COST) <= budget
    ups = 0
    for _ in range(200):
        child = level_switch_mutation(parent, COST, budget, g)
        assert child is not None and allocation_cost(child, COST) <= budget
        diff = [c - p for c, p in zip(child, parent)]
        assert diff.count(1) >= 1 and diff.count(-1) >= 1 and all(d in (-1, 0, 1) for d in diff)
        # the budget left over is smaller than any step still possible
        left = budget - allocation_cost(child, COST)
        steps = [COST[i][j + 1] - COST[i][j] for i, j in enumerate(child) if j + 1 < 4 and diff[i] == 0]
        assert not steps or left < min(steps)
        ups += 1
    assert ups == 200


def test_initial_allocation_refuses_an_impossible_budget():
    with pytest.raises(ValueError, match="below the smallest allocation"):
        initial_allocation(COST, 10.0, torch.Generator().manual_seed(0))


def test_search_finds_the_optimum_of_a_separable_problem():
    """Fitness = sum of per-layer errors with known values: the search must reach the exact
    optimum of the knapsack (checked by brute force), using multi-step selection with noise
    that shrinks with more tokens."""
    import itertools

    err = [[8.0, 4.0, 2.0, 0.5], [3.0, 2.0, 1.5, 1.4], [50.0, 10.0, 4.0, 1.0], [5.0, 1.0, 0.8, 0.1]]
    budget = 56.0

    def fitness(a, n_tokens, seed):
        noise = torch.randn(1, generator=torch.Generator().manual_seed(seed)).item() * 0.05 / n_tokens
        return sum(err[i][j] for i, j in enumerate(a)) + noise

    g = torch.Generator().manual_seed(1)
    res = evopress_search(COST, budget, fitness, generations=60, offspring=6, selection=[(1, 3), (16, 1)], generator=g)
    best = min((a for a in itertools.product(range(4), repeat=4) if allocation_cost(a, COST) <= budget),
               key=lambda a: sum(err[i][j] for i, j in enumerate(a)))
    assert res.allocation == list(best)
    assert res.cost <= budget and len(res.log) == 60
    fits = [r["fitness"] for r in res.log]
    assert fits[-1] < fits[0]


def test_fixed_windows_never_accept_a_worse_parent_and_score_each_allocation_once():
    """resample=False: each step scores on the same windows every generation, so the parent's
    fitness never rises, and no allocation is scored twice in a step (even under noise that would
    make fresh windows drift)."""
    err = [[8.0, 4.0, 2.0, 0.5], [3.0, 2.0, 1.5, 1.4], [50.0, 10.0, 4.0, 1.0], [5.0, 1.0, 0.8, 0.1]]
    calls: list[tuple] = []

    def fitness(a, n_tokens, seed):
        calls.append((tuple(a), n_tokens, seed))
        noise = torch.randn(1, generator=torch.Generator().manual_seed(seed + 7 * sum(a))).item() * 0.3
        return sum(err[i][j] for i, j in enumerate(a)) + noise

    g = torch.Generator().manual_seed(1)
    res = evopress_search(COST, 56.0, fitness, generations=30, offspring=6, selection=[(1, 3), (16, 1)], generator=g,
                          initial=[3, 3, 1, 3], resample=False)
    fits = [r["fitness"] for r in res.log]
    assert all(b <= a for a, b in zip(fits, fits[1:])) and fits[-1] < 12.0 - 3.0  # the start scores 12 +- noise
    assert len({seed for _, n, seed in calls if n == 1}) == 1 and len({seed for _, n, seed in calls if n == 16}) == 1
    assert len(calls) == len(set(calls)) == sum(r["candidates"] for r in res.log)
    assert allocation_cost(res.allocation, COST) <= 56.0
    assert EvoPressConfig(target_bits_per_weight=3.0, resample=False).to_dict()["resample"] is False


def test_proxy_allocation_is_the_knapsack_optimum_of_additive_scores():
    """For additive scores the Lagrangian allocation (plus the greedy fill) must fit the budget and
    be optimal or within one level step of it; checked by brute force on random problems."""
    import itertools

    g = torch.Generator().manual_seed(5)
    for trial in range(20):
        err = (torch.rand(4, 4, generator=g) * 10).sort(dim=1, descending=True).values.tolist()
        budget = float(torch.randint(9 + 20, 120, (1,), generator=g))
        a = proxy_allocation(err, COST, budget)
        assert allocation_cost(a, COST) <= budget
        feasible = [b for b in itertools.product(range(4), repeat=4) if allocation_cost(b, COST) <= budget]
        best = min(sum(err[i][j] for i, j in enumerate(b)) for b in feasible)
        got = sum(err[i][j] for i, j in enumerate(a))
        worst = max(sum(err[i][j] for i, j in enumerate(b)) for b in feasible)
        assert got <= best + 0.25 * (worst - best), (trial, a, got, best)
    # a budget that holds every layer at its best level takes it; one below the smallest is refused
    assert proxy_allocation(err, COST, 1e9) == [3, 3, 3, 3]
    with pytest.raises(ValueError, match="below the smallest allocation"):
        proxy_allocation(err, COST, 10.0)


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="target_size='70 parsecs'"):
        EvoPressConfig(target_size="70 parsecs")
    with pytest.raises(ConfigError, match="levels"):
        EvoPressConfig(target_bits_per_weight=3.0, levels=[4, 2])
    with pytest.raises(ConfigError, match=r"levels\[1\]=5"):
        EvoPressConfig(target_bits_per_weight=3.0, levels=[2, 5])
    with pytest.raises(ConfigError, match="not both"):
        EvoPressConfig(target_bits_per_weight=3.0, target_size="1MB")
    with pytest.raises(ConfigError, match="selection"):
        EvoPressConfig(target_bits_per_weight=3.0, selection=[[64, 2]])
    assert EvoPressConfig(target_bits_per_weight=3.0, init="kl").init == "kl"
    with pytest.raises(ConfigError, match="init='best'"):
        EvoPressConfig(target_bits_per_weight=3.0, init="best")
    with pytest.raises(ConfigError, match="needs a budget"):
        hfcompress.quantize_(llama_gqa(), EvoPressConfig())
    # its levels keep integer zeros whatever GPTQConfig / RTNConfig default to
    assert EvoPressConfig(target_bits_per_weight=3.0).zero_point == "int"
    assert all(s is None or s.zero_point == "int" for s in EvoPressConfig(target_bits_per_weight=3.0).level_specs())
    assert all(s is None or s.zero_point == "int"
               for s in EvoPressConfig(target_bits_per_weight=3.0, base="rtn").level_specs())
    # float zeros and the searched grid on request; named levels carry their own group size and zero points
    specs = EvoPressConfig(target_bits_per_weight=3.0, zero_point="float", mse_clip=True,
                           levels=[2, "w3g128", "w3g64-int", "w3g64", "w4g32", "float"]).level_specs()
    assert [(s.bits, s.group_size, s.zero_point) for s in specs[:-1]] == [
        (2, 128, "float"), (3, 128, "float"), (3, 64, "int"), (3, 64, "float"), (4, 32, "float")]
    assert specs[-1] is None
    assert EvoPressConfig(target_bits_per_weight=3.0, levels=["w3g64-float"], mse_clip=True).level_grid == {
        "mse_clip": True}
    with pytest.raises(ConfigError, match=r"increasing size: 'w3g128' stores 3\.2500 bits per weight"):
        EvoPressConfig(target_bits_per_weight=3.0, zero_point="float", levels=["w3g64", "w3g128"])
    with pytest.raises(ConfigError, match=r"levels\[0\]='3bit'.*'w<bits>g<group_size>'"):
        EvoPressConfig(target_bits_per_weight=3.0, levels=["3bit", 4])
    assert parse_size("70MB") == 70_000_000 and parse_size("1.5MiB") == 1_572_864 and parse_size(123) == 123


def _batches():
    g = torch.Generator().manual_seed(3)
    return [torch.randint(0, 160, (4, 32), generator=g) for _ in range(2)]


def _small(**kw):
    return dict(group_size=32, generations=8, offspring=4, selection=[[32, 2], [128, 1]], search_samples=8, **kw)


def test_evopress_quantize_reaches_the_budget_beats_uniform_and_reloads(tmp_path, exact_cpu_reference):
    model = llama_gqa()
    float_model = llama_gqa()
    config = EvoPressConfig(target_bits_per_weight=3.0, levels=[2, 3, 4, 8, "float"], **_small())
    hfcompress.quantize_(model, config, batches=_batches())
    layers = {n: m for n, m in model.named_modules() if is_compressed(m)}
    n_weights = sum(m.in_features * m.out_features for m in layers.values())
    stored = sum(b.numel() * b.element_size() * 8 for m in layers.values() for b in m.stored_tensors().values())
    kept = [n for n in config.modules_to_not_convert if n != "lm_head"]
    float_bits = sum(model.get_submodule(n).weight.numel() * 32 for n in kept)
    n_weights += sum(model.get_submodule(n).weight.numel() for n in kept)
    achieved = (stored + float_bits) / n_weights
    assert achieved <= 3.0 and achieved >= 0.99 * 3.0  # within 1% of the budget, never above
    assert achieved == pytest.approx(config.search_log["achieved_bits_per_weight"])
    assert len({m.spec.bits for m in layers.values()}) >= 2  # mixed
    assert set(config.module_formats) == set(layers)
    log = config.search_log["log"]
    assert len(log) == 8 and log[-1]["fitness"] <= log[0]["fitness"] + 1e-12
    # saved and reloaded bit for bit, with the table
    ids = inputs()
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path / "m")
    re = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(re(ids).logits, before)
    saved = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert saved["algorithm"] == "evopress" and len(saved["module_formats"]) == len(layers)
    assert saved["extra"]["evopress"]["achieved_bits"] <= saved["extra"]["evopress"]["budget_bits"]


def test_named_float_zero_levels_reload_natively_and_the_database_records_the_grid(tmp_path, exact_cpu_reference):
    """Levels of several group sizes and zero points in one checkpoint (GPTQ's searched grid):
    each module's table entry names its grid, the checkpoint reloads bit for bit, and a cached
    database fitted with another grid is refused by name."""
    levels = ["w2g32-float", "w3g32-int", "w3g32-float", "w4g16-float", "float"]
    db = tmp_path / "levels.safetensors"
    model = llama_gqa()
    config = EvoPressConfig(target_bits_per_weight=3.6, levels=levels, mse_clip=True, database=str(db), **_small())
    hfcompress.quantize_(model, config, batches=_batches())
    layers = {n: m for n, m in model.named_modules() if is_compressed(m)}
    grids = {(m.spec.bits, m.spec.group_size, m.spec.zero_point) for m in layers.values()}
    assert len(grids) >= 2 and grids <= {(2, 32, "float"), (3, 32, "int"), (3, 32, "float"), (4, 16, "float")}
    assert config.search_log["achieved_bits"] <= config.search_log["budget_bits"]
    ids = inputs()
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert saved.get("zero_point", "int") == "int"  # the config's own; each entry names its grid
    assert {(e["bits"], e["group_size"], e.get("zero_point", "int")) for e in saved["module_formats"].values()} == grids
    re = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert {n: m.spec for n, m in re.named_modules() if is_compressed(m)} == {n: m.spec for n, m in layers.items()}
    with torch.no_grad():
        assert torch.equal(re(ids).logits, before)
    minmax = EvoPressConfig(target_bits_per_weight=3.6, levels=levels, database=str(db), **_small())
    with pytest.raises(ConfigError, match=r"grid options \{'mse_clip': True\}, not \{\}"):
        hfcompress.quantize_(llama_gqa(), minmax, batches=_batches())


def test_evopress_kl_not_worse_than_its_uniform_start(exact_cpu_reference):
    """The search starts from the uniform allocation and keeps the parent, so the final KL on the
    same windows is at most the start's."""
    from hfcompress.evopress.database import build_database, level_config
    from hfcompress.evopress.fitness import KLFitness

    model = llama_gqa()
    batches = _batches()
    config = EvoPressConfig(target_bits_per_weight=3.3, levels=[2, 3, 4], **_small())
    specs = config.level_specs()
    cfgs = [level_config(lv, "gptq", 32, 0.01) for lv in config.levels]
    db = build_database(model, config.levels, specs, cfgs, "gptq", batches, ["lm_head"])
    fit = KLFitness(model, db, torch.cat(batches)[:8])
    uniform3 = [1] * len(db.names)
    before = [p.clone() for p in model.parameters()]
    kl3, kl2 = fit(uniform3, 256, 0), fit([0] * len(db.names), 256, 0)
    assert 0 < kl3 < kl2  # fewer bits, larger divergence
    assert fit([2] * len(db.names), 256, 0) < kl3
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # scoring leaves the model float
    cost = db.cost_bits(32)
    budget = allocation_cost(uniform3, cost) + 1
    res = evopress_search(cost, budget, fit, 6, 4, [(64, 2), (256, 1)], torch.Generator().manual_seed(0),
                          initial=uniform3)
    assert fit(res.allocation, 256, 0) <= kl3


def test_fisher_warm_start_fits_the_budget_and_beats_the_uniform_start(exact_cpu_reference):
    """The Fisher proxy scores the float level 0 and fewer bits worse; the warm start it gives fits
    the budget and, on the search's own windows, has a lower KL than the uniform start."""
    from hfcompress.evopress.database import build_database, level_config
    from hfcompress.evopress.fitness import KLFitness, fisher_scores

    torch.manual_seed(0)
    model = llama_gqa()
    batches = _batches()
    config = EvoPressConfig(target_bits_per_weight=3.0, levels=[2, 3, 4, 8, "float"], **_small())
    cfgs = [None if s is None else level_config(lv, "gptq", 32, 0.01)
            for lv, s in zip(config.levels, config.level_specs())]
    db = build_database(model, config.levels, config.level_specs(), cfgs, "gptq", batches, ["lm_head"])
    fit = KLFitness(model, db, torch.cat(batches)[:8])
    before = [(p.clone(), p.requires_grad) for p in model.parameters()]
    scores = fisher_scores(fit)
    assert all((p.requires_grad == r) and torch.equal(p, b) for (b, r), p in zip(before, model.parameters()))
    assert all(row[-1] == 0.0 and row[0] > row[1] > row[2] > row[3] > 0 for row in scores)
    cost = db.cost_bits(32)
    n = sum(k * o for k, o in db.shapes.values())
    budget = 3.0 * n
    warm = proxy_allocation(scores, cost, budget)
    cold = initial_allocation(cost, budget, torch.Generator().manual_seed(0))
    assert allocation_cost(warm, cost) <= budget and allocation_cost(warm, cost) >= 0.99 * budget
    assert fit(warm, 256, 0) < fit(cold, 256, 0)
    # measured single-layer scores: 0 at the uniform level nearest the budget, a larger KL one level
    # down and a smaller one up on the whole (not layer by layer: error monotonicity fails), never
    # two levels away
    from hfcompress.evopress.fitness import single_layer_scores

    budget = 0.7 * allocation_cost([1] * len(cost), cost) + 0.3 * allocation_cost([2] * len(cost), cost)
    base = 1  # the uniform level nearest this budget
    kl_scores = single_layer_scores(fit, cost, budget, 64, 0)
    inf = float("inf")
    assert all(r[base] == 0.0 and all(r[j] == inf for j in range(5) if abs(j - base) > 1) for r in kl_scores)
    assert sum(r[base - 1] for r in kl_scores) > 0 > sum(r[base + 1] for r in kl_scores)
    kl_warm = proxy_allocation(kl_scores, cost, budget)
    assert 0.97 * budget <= allocation_cost(kl_warm, cost) <= budget  # coarse steps on a tiny model
    assert set(kl_warm) <= {base - 1, base, base + 1}
    cold = initial_allocation(cost, budget, torch.Generator().manual_seed(0))
    assert fit(kl_warm, 256, 0) < fit(cold, 256, 0)
    # through the config: the search starts there and records it
    model2 = llama_gqa()
    model2.load_state_dict(model.state_dict())
    cfg = EvoPressConfig(target_bits_per_weight=3.0, levels=[2, 3, 4, 8, "float"], init="fisher", **_small())
    hfcompress.quantize_(model2, cfg, batches=batches)
    assert cfg.search_log["init"] == "fisher" and cfg.search_log["achieved_bits"] <= cfg.search_log["budget_bits"]


def test_target_size_counts_every_tensor_and_the_database_cache(tmp_path):
    src = tmp_path / "float"
    llama_gqa().save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    fp_bytes = (src / "model.safetensors").stat().st_size
    target = int(fp_bytes * 0.5)
    db = tmp_path / "levels.safetensors"
    cfg = EvoPressConfig(target_size=target, database=str(db), dataset=torch.cat(_batches()).tolist(),
                         n_samples=8, seq_len=32, **_small())
    q = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg)
    assert db.is_file()
    q.save_pretrained(tmp_path / "q")
    size = (tmp_path / "q" / "model.safetensors").stat().st_size
    assert 0.99 * target <= size <= 1.01 * target, (size, target)
    # the cached database is reused (and refused for other levels)
    cfg2 = EvoPressConfig(target_size=target, database=str(db), dataset=torch.cat(_batches()).tolist(),
                          n_samples=8, seq_len=32, **_small())
    q2 = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg2)
    assert cfg2.module_formats == cfg.module_formats
    ids = inputs()
    with torch.no_grad():
        assert torch.equal(q2(ids).logits, q(ids).logits)
    bad = EvoPressConfig(target_size=target, database=str(db), levels=[2, 4], dataset=torch.cat(_batches()).tolist(),
                         n_samples=8, seq_len=32, **_small())
    with pytest.raises(ConfigError, match="holds levels"):
        AutoModelForCausalLM.from_pretrained(src, quantization_config=bad)


def test_cli_target_size_writes_the_search_log(tmp_path):
    from hfcompress.cli.main import main

    src = tmp_path / "float"
    llama_gqa().save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    text = tmp_path / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    target = int((src / "model.safetensors").stat().st_size * 0.4)
    rc = main(["quantize", str(src), "--target-size", str(target), "--out", str(tmp_path / "q"), "--group-size", "32",
               "--dataset", str(text), "--n-samples", "4", "--seq-len", "32", "--generations", "3",
               "--offspring", "3"])
    assert rc == 0
    log = json.loads((tmp_path / "q" / "evopress_search.json").read_text())
    assert len(log["log"]) == 3 and log["achieved_bits"] <= log["budget_bits"]
    size = (tmp_path / "q" / "model.safetensors").stat().st_size
    assert size <= 1.01 * target


def test_quantize_a_directory_writes_checkpoint_and_log_and_time_limit_stops(tmp_path):
    src = tmp_path / "float"
    llama_gqa().save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    cfg = EvoPressConfig(target_bits_per_weight=3.5, dataset=torch.cat(_batches()).tolist(), n_samples=8, seq_len=32,
                         time_limit=0.0, **_small())
    out = hfcompress.quantize(str(src), cfg, out_dir=str(tmp_path / "q"))
    assert out == str(tmp_path / "q")
    log = json.loads((tmp_path / "q" / "evopress_search.json").read_text())
    assert log["log"] == [] and log["generations"] == 0  # no generation starts after the time limit
    assert log["achieved_bits"] <= log["budget_bits"]
    re = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert sum(is_compressed(m) for m in re.modules()) == len(cfg.module_formats) > 0


def test_lora_on_top_of_an_evopress_model():
    from peft import LoraConfig, get_peft_model

    model = llama_gqa()
    hfcompress.quantize_(model, EvoPressConfig(target_bits_per_weight=3.5, levels=[2, 3, 4], **_small()),
                         batches=_batches())
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    ids = inputs()
    peft(ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in peft.named_parameters() if "lora_" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_eora_compensates_an_evopress_model():
    orig = llama_gqa()
    q = hfcompress.quantize_(llama_gqa(), EvoPressConfig(target_bits_per_weight=2.6, levels=[2, 3, 4], **_small()),
                             batches=_batches())
    from tiny_models import eora_sqnr_db

    base, comp = eora_sqnr_db(orig, q)
    assert comp > base + 0.3
