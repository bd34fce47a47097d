"""Cubic sparsity schedule (gradual pruning, Zhu & Gupta 2017), as used by LoRAPrune.

    s(t) = 0                                        t <  t_w            (warm-up)
    s(t) = s_f · (1 − (1 − (t − t_w) / n)³)         t_w <= t < t_w + n  (n = T − t_w − t_c)
    s(t) = s_f                                      t >= t_w + n        (cool-down)

Pruning is fast early (many redundant groups) and slow near the target.
"""

from __future__ import annotations


def cubic_sparsity(step: int, total_steps: int, target: float, warmup_steps: int = 0, cooldown_steps: int = 0) -> float:
    """Sparsity to reach after ``step`` optimizer steps out of ``total_steps``."""
    n = total_steps - warmup_steps - cooldown_steps
    if n <= 0:
        raise ValueError(f"warmup_steps={warmup_steps} + cooldown_steps={cooldown_steps} leave no pruning steps out of "
                         f"total_steps={total_steps}; shorten them or train longer")
    if step < warmup_steps:
        return 0.0
    if step >= warmup_steps + n:
        return float(target)
    frac = (step - warmup_steps) / n
    return float(target) * (1.0 - (1.0 - frac) ** 3)


SCHEDULES = {"cubic": cubic_sparsity}
