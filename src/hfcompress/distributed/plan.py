"""Which rank solves which layer: balanced bin-packing by cost (pure Python, no collectives).

Every rank computes the same plan from the same inputs (layer names and shapes), so the plan
itself is never sent. Greedy LPT ("longest processing time first"): layers sorted by cost,
largest first, each given to the rank with the least load so far in this group (ties: the rank
with the least load over the whole run, then the lowest rank). A group is a sync point (the next
group's inputs need its quantized weights), so each group is balanced on its own; the run-long
tie-break spreads single-layer groups (o_proj, down_proj) over the ranks.
"""

from __future__ import annotations


def gptq_cost(n: int, k: int) -> float:
    """Solve cost of one GPTQ-like layer ``[N, K]``: the column loop's lazy updates (``N K^2``)
    plus factoring its Hessian (``K^3``, paid once per Hessian a rank factors)."""
    return float(n) * k * k + float(k) ** 3


def eora_cost(n: int, k: int) -> float:
    """Solve cost of one EoRA layer ``[N, K]``: eigendecomposition of ``XᵀX`` (``~10 K^3``, fp64)
    plus the SVD of the projected ``ΔW`` (``~N K min(N, K)``)."""
    return 10.0 * float(k) ** 3 + float(n) * k * min(n, k)


def assign(costs: dict[str, float], world: int, run_load: list[float] | None = None) -> dict[str, int]:
    """``{layer: cost}`` -> ``{layer: rank}``, balanced over ``world`` ranks (greedy LPT).

    ``run_load`` (length ``world``) is the load of every rank over the run so far: it breaks ties
    and is updated in place with this group's load."""
    if world < 1:
        raise ValueError(f"assign: world size must be >= 1, got {world}")
    if run_load is not None and len(run_load) != world:
        raise ValueError(f"assign: run_load has {len(run_load)} entries for a world of {world}")
    carry = run_load if run_load is not None else [0.0] * world
    load = [0.0] * world
    owner: dict[str, int] = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        r = min(range(world), key=lambda i: (load[i], carry[i], i))
        owner[name] = r
        load[r] += costs[name]
    for i in range(world):
        carry[i] += load[i]
    return owner


def imbalance(costs: dict[str, float], owner: dict[str, int], world: int) -> float:
    """Largest rank load over the ideal ``sum / world`` (1.0 is perfect)."""
    load = [0.0] * world
    for n, c in costs.items():
        load[owner[n]] += c
    total = sum(load)
    return max(load) * world / total if total else 1.0
