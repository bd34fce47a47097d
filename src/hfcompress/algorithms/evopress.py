"""EvoPress (Sieberling et al., 2024): evolutionary search for per-layer compression levels
under a global size budget.

Given ``L`` layers, each with a database of levels ``0..n_l-1`` ordered by size (level ``j`` of
layer ``l`` costs ``cost[l][j]`` bits; a higher level is larger and more accurate), find the
allocation ``a [L]`` with ``sum_l cost[l][a_l] <= budget`` that minimises the fitness (KL
divergence of the compressed model's next-token distribution to the float model's). Per-layer
errors do not add up to the model's error (error monotonicity fails), so whole allocations are
scored, never layers alone.

The search (Algorithm 1 of the paper), a (1 + lambda) evolutionary algorithm:

1. start from a uniform allocation (here: the uniform level nearest the budget, with random
   layers moved one level down until it fits, then one level up while it fits), or, for a short
   search, from the allocation that is optimal for an *additive* per-layer error proxy
   (:func:`proxy_allocation`; the search then corrects what the proxy's additivity gets wrong);
2. each generation draws ``offspring`` children of the parent by *level-switch mutation*: one
   layer goes one level up and other layers go one level down until the allocation fits the
   budget again, so every candidate stays on budget;
3. *multi-step selection*: the candidates (parent included) are scored on a few calibration
   tokens, the best ``survivors[0]`` are scored again on more tokens, and so on; the best of the
   last step becomes the parent. Each generation draws fresh calibration windows (the
   paper's), or, with ``resample=False``, every generation scores on the same windows per step
   (a fixed objective: a candidate is never re-scored, the parent always reaches the last step,
   and it changes only when a child scores lower there; for small token budgets, where fresh windows' noise exceeds the differences
   between neighbouring allocations and the search drifts).

Pure torch and Python: the fitness is a callable ``fitness(allocation, n_tokens, generator) ->
float`` (``hfcompress.evopress.fitness`` builds it); no I/O.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch


@dataclass
class SearchResult:
    allocation: list[int]            # [L] chosen level per layer
    fitness: float                   # of the allocation, on the last selection step's tokens
    cost: float                      # bits of the allocation
    log: list[dict] = field(default_factory=list)  # one record per generation


def allocation_cost(allocation: Sequence[int], cost: Sequence[Sequence[float]]) -> float:
    return float(sum(cost[layer][j] for layer, j in enumerate(allocation)))


def initial_allocation(cost: Sequence[Sequence[float]], budget: float, generator: torch.Generator) -> list[int]:
    """The uniform allocation nearest the budget, brought onto it: if it is too large, random
    layers go one level down until it fits; then random layers go one level up while it fits."""
    n_levels = min(len(c) for c in cost)
    smallest = allocation_cost([0] * len(cost), cost)
    if smallest > budget:
        raise ValueError(f"the budget ({budget:.0f} bits) is below the smallest allocation ({smallest:.0f} bits: "
                         "every layer at its lowest level); raise the budget or add a smaller level")
    a = list(min(([j] * len(cost) for j in range(n_levels)), key=lambda u: abs(allocation_cost(u, cost) - budget)))
    total = allocation_cost(a, cost)
    for layer in torch.randperm(len(cost), generator=generator).tolist():
        if total <= budget:
            break
        if a[layer] > 0:
            total -= cost[layer][a[layer]] - cost[layer][a[layer] - 1]
            a[layer] -= 1
    _fill_(a, cost, budget, generator, frozen=set())
    return a


def proxy_allocation(scores: Sequence[Sequence[float]], cost: Sequence[Sequence[float]], budget: float,
                     iters: int = 100) -> list[int]:
    """The allocation minimising ``sum_l scores[l][a_l]`` (an additive per-layer error estimate,
    ``[L][levels]``) within ``budget``: Lagrangian relaxation, each layer takes
    ``argmin_j scores[l][j] + lam * cost[l][j]``, ``lam`` bisected to the smallest price that fits;
    the budget left over is then spent greedily (the largest score drop per bit, one level up at
    a time, while it fits)."""
    s = torch.tensor(scores, dtype=torch.float64)                               # [L, J]
    c = torch.tensor(cost, dtype=torch.float64)                                 # [L, J]
    if float(c[:, 0].sum()) > budget:
        raise ValueError(f"the budget ({budget:.0f} bits) is below the smallest allocation "
                         f"({float(c[:, 0].sum()):.0f} bits: every layer at its lowest level)")

    def pick(lam: float) -> torch.Tensor:                                       # [L] level per layer
        return (s + lam * c).argmin(dim=1)

    def total(a: torch.Tensor) -> float:
        return float(c.gather(1, a[:, None]).sum())

    lo, hi = 0.0, 1.0
    if total(pick(lo)) <= budget:                                               # every layer at its best fits
        hi = lo
    for _ in range(2000):                                                       # a price that fits (at a
        if total(pick(hi)) <= budget:                                           # high price: the cheapest
            break                                                               # levels of finite score)
        lo, hi = hi, hi * 4
    else:
        raise ValueError("no allocation of finite score fits the budget")
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if total(pick(mid)) <= budget else (mid, hi)
    a = pick(hi).tolist()
    spent = total(torch.tensor(a))
    while True:                                                                 # spend what is left
        best, gain = None, 0.0
        for layer, j in enumerate(a):
            if j + 1 < len(cost[layer]):
                step = cost[layer][j + 1] - cost[layer][j]
                drop = scores[layer][j] - scores[layer][j + 1]
                if spent + step <= budget and step > 0 and drop / step > gain:
                    best, gain = layer, drop / step
        if best is None:
            return a
        spent += cost[best][a[best] + 1] - cost[best][a[best]]
        a[best] += 1


def _fill_(a: list[int], cost, budget: float, generator: torch.Generator, frozen: set[int]) -> None:
    """Raise random layers (not in ``frozen``) one level each while the allocation fits the budget."""
    total = allocation_cost(a, cost)
    for layer in torch.randperm(len(cost), generator=generator).tolist():
        j = a[layer]
        if layer in frozen or j + 1 >= len(cost[layer]):
            continue
        step = cost[layer][j + 1] - cost[layer][j]
        if total + step <= budget:
            total += step
            a[layer] = j + 1


def level_switch_mutation(parent: Sequence[int], cost: Sequence[Sequence[float]], budget: float,
                          generator: torch.Generator, tries: int = 100) -> list[int] | None:
    """One layer one level up, then other layers (random order) one level down until the
    allocation fits ``budget``, then the budget left over (levels differ in size) refilled by
    random other layers one level up; ``None`` when no such child was found in ``tries`` draws."""
    n = len(parent)
    for _ in range(tries):
        child = list(parent)
        up = int(torch.randint(n, (1,), generator=generator))
        if child[up] + 1 >= len(cost[up]):
            continue
        child[up] += 1
        total = allocation_cost(child, cost)
        moved = {up}
        for down in torch.randperm(n, generator=generator).tolist():
            if total <= budget:
                break
            if down == up or child[down] == 0:
                continue
            total -= cost[down][child[down]] - cost[down][child[down] - 1]
            child[down] -= 1
            moved.add(down)
        if total > budget:
            continue
        _fill_(child, cost, budget, generator, frozen=moved)
        if child != list(parent):
            return child
    return None


def evopress_search(cost: Sequence[Sequence[float]], budget: float, fitness: Callable[..., float],
                    generations: int, offspring: int, selection: Sequence[tuple[int, int]],
                    generator: torch.Generator, initial: Sequence[int] | None = None,
                    on_generation: Callable[[dict], None] | None = None,
                    time_limit: float | None = None, resample: bool = True) -> SearchResult:
    """Search the allocation of least ``fitness`` within ``budget`` bits.

    ``selection``: ``((n_tokens_1, survivors_1), ..., (n_tokens_S, 1))``: step ``s`` scores the
    remaining candidates on ``n_tokens_s`` fresh calibration tokens and keeps the best
    ``survivors_s`` (the last step keeps one: the next parent). ``fitness(allocation, n_tokens,
    seed)`` must score every candidate of one step on the same tokens (given by ``seed``).
    ``time_limit`` (seconds): no generation starts after it has passed. ``resample=False``: the
    same windows for a step in every generation (seeds drawn once), each score computed once."""
    if not selection or selection[-1][1] != 1:
        raise ValueError("selection must end with a step that keeps 1 candidate")
    parent = list(initial) if initial is not None else initial_allocation(cost, budget, generator)
    if allocation_cost(parent, cost) > budget:
        raise ValueError("the initial allocation exceeds the budget")
    parent_fitness = math.inf
    log: list[dict] = []
    fixed_seeds = [] if resample else [int(torch.randint(2**31 - 1, (1,), generator=generator)) for _ in selection]
    scored: dict[tuple[int, tuple[int, ...]], float] = {}  # (step, allocation) -> score (resample=False)
    start = time.perf_counter()
    for gen in range(generations):
        t0 = time.perf_counter()
        if time_limit is not None and t0 - start > time_limit:
            break
        candidates = [parent]
        for _ in range(offspring):
            child = level_switch_mutation(parent, cost, budget, generator)
            if child is not None and child not in candidates:
                candidates.append(child)
        evaluated = 0
        scores: list[float] = []
        for step, (n_tokens, keep) in enumerate(selection):
            if resample:
                seed = int(torch.randint(2**31 - 1, (1,), generator=generator))  # fresh windows per step
                scores = [fitness(c, n_tokens, seed) for c in candidates]
                evaluated += len(candidates)
            else:
                for c in candidates:
                    if (step, tuple(c)) not in scored:
                        scored[step, tuple(c)] = fitness(c, n_tokens, fixed_seeds[step])
                        evaluated += 1
                scores = [scored[step, tuple(c)] for c in candidates]
            order = sorted(range(len(candidates)), key=lambda i: scores[i])[:keep]
            if not resample and step + 1 < len(selection) and candidates.index(parent) not in order:
                order.append(candidates.index(parent))  # scored once, free: never replaced by a worse child
            candidates, scores = [candidates[i] for i in order], [scores[i] for i in order]
        changed = candidates[0] != parent
        parent, parent_fitness = candidates[0], scores[0]
        record = {"generation": gen, "fitness": parent_fitness, "changed": changed, "candidates": evaluated,
                  "cost_bits": allocation_cost(parent, cost), "seconds": round(time.perf_counter() - t0, 3)}
        log.append(record)
        if on_generation is not None:
            on_generation(record)
    return SearchResult(parent, parent_fitness, allocation_cost(parent, cost), log)
