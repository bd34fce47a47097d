"""Our PEFT methods as rows of PEFT's own common battery (peft's tests/test_custom_models.py).

Imported by the harness module that ``benchmarks/peft_battery.py`` places next to the pinned
release's unmodified test files: PEFT's row lists (``TEST_CASES``, ``ALL_PEFT_CONFIG_CLASSES``,
``MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES``) are replaced in place by these rows before pytest
collects, so every check PEFT runs for each built-in method runs for ours instead. The rows
follow PEFT's own style for built-in methods (a vanilla MLP, one and two targets, non-identity
init so checks cannot pass trivially). A new method of ours adds its rows here.
"""

from __future__ import annotations

import hfcompress  # noqa: F401  (registers the methods with PEFT)
from hfcompress.adapters.compacter import CompacterConfig
from hfcompress.adapters.l4q import L4QConfig
from hfcompress.adapters.mos import MoSConfig

# method id -> (config class, the kwargs its rows need on PEFT's MLP: lin0 10 -> 20, lin1 20 -> 2).
# The method id is what the summary counts (Compacter++ = Compacter with placement="pfeiffer").
# Compacter: reduction_factor 2 gives lin0's adapter a 10-unit bottleneck (the default 32 leaves 2 units on a
# 20-wide layer, and on PEFT's unnormalised inputs (up to 89) both GELU units are dead for every sample in
# 9-18% of draws: the adapter then gets no gradient and PEFT's "every parameter moved" check fails on such a
# draw; measured over 100-300 draws, see benchmarks/README.md). lin1 (2 outputs) gets d = 2 whatever the factor.
METHODS = {
    "compacter": (CompacterConfig, {"n": 2, "placement": "houlsby", "reduction_factor": 2}),
    "compacter++": (CompacterConfig, {"n": 2, "placement": "pfeiffer", "reduction_factor": 2}),
    "mos": (MoSConfig, {}),
    "l4q": (L4QConfig, {"r": 4, "group_size": -1}),
}

# PEFT's row pattern for built-in methods: default init on one or both linears (PEFT's checks that
# need a non-identity adapter set init_weights=False themselves)
TEST_CASES = []
for method, (cls, kw) in METHODS.items():
    TEST_CASES += [
        (f"Vanilla MLP 1 {method}", "MLP", cls, {"target_modules": "lin0", **kw}),
        (f"Vanilla MLP 2 {method}", "MLP", cls, {"target_modules": ["lin0"], **kw}),
        (f"Vanilla MLP 3 {method}", "MLP", cls, {"target_modules": ["lin1"], **kw}),
        (f"Vanilla MLP 4 {method}", "MLP", cls, {"target_modules": ["lin0", "lin1"], **kw}),
    ]
# GPT-2-style Conv1D targets (PEFT's EmbConv1D model: Conv1D(nf=1, nx=5)); L4Q targets nn.Linear only.
# Compacter refuses this 1-output layer with a clear error (nothing to factor: n = d = 1, S_i, s_i, t_i scalars);
# the row stays so the battery shows the refusal. Compacter on GPT-2's Conv1D: tests/test_peft_conformance.py (gpt2).
TEST_CASES += [
    ("Embedding + transformers Conv1D compacter", "EmbConv1D", CompacterConfig, {"target_modules": ["conv1d"], "n": 1}),
    ("Embedding + transformers Conv1D mos", "EmbConv1D", MoSConfig,
     {"target_modules": ["conv1d"], "shards_per_vector": 1}),
]

# PEFT's tests parametrized over config classes build them with defaults: config_cls(target_modules=[...])
ALL_PEFT_CONFIG_CLASSES = [CompacterConfig, L4QConfig, MoSConfig]

MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES = []
for method, (cls, kw) in METHODS.items():
    MULTIPLE_ACTIVE_ADAPTERS_TEST_CASES += [
        (f"{method} Same", method, cls, *({"target_modules": ["lin0"], "init_weights": False, **kw},) * 2),
        (f"{method} Different", method, cls, {"target_modules": ["lin0"], "init_weights": False, **kw},
         {"target_modules": ["lin1"], "init_weights": False, **kw}),
    ]

CONFIG_CLASSES = tuple(ALL_PEFT_CONFIG_CLASSES)


def method_of(params: dict) -> str | None:
    """The method id a collected test belongs to (from its parameters), or None if none of ours."""
    for key in ("test_name",):
        name = params.get(key)
        if isinstance(name, str):
            for method in sorted(METHODS, key=len, reverse=True):
                if name.endswith(" " + method) or name.startswith(method + " "):
                    return method
    cls = params.get("config_cls")
    if cls in CONFIG_CLASSES:
        return {CompacterConfig: "compacter", L4QConfig: "l4q", MoSConfig: "mos"}[cls]
    return None
