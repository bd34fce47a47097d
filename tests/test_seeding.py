"""No test reads a global random generator that was not seeded for it (see tests/seeding.py).

The autouse ``seed_rngs`` fixture seeds torch/numpy/random before every test, so what it cannot
cover is code that runs at import time (module or class level, default arguments): the scan below
finds global-generator draws there. The fixture itself is checked by behaviour (the state each
test starts from) and by a run of a small suite in two orders, with and without it."""

from __future__ import annotations

import ast
import json
import os
import random
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import settings
from seeding import TESTS_DIR, key_of, seed_for

_TORCH_DRAWS = {"rand", "randn", "randint", "randperm", "rand_like", "randn_like", "randint_like", "normal",
                "bernoulli", "multinomial", "poisson"}
_INPLACE_DRAWS = {"uniform_", "normal_", "random_", "bernoulli_", "exponential_", "geometric_", "cauchy_",
                  "log_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_",
                  "trunc_normal_", "orthogonal_"}
_SEEDING = {"seed", "default_rng", "RandomState", "Generator", "SeedSequence", "Random", "getstate", "setstate",
            "get_state", "set_state"}


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _is_global_draw(call: ast.Call) -> bool:
    """A call that draws from a process-wide generator (no ``generator=``/``rng`` of its own)."""
    if any(kw.arg == "generator" for kw in call.keywords):
        return False
    name = _dotted(call.func)
    head, _, last = name.rpartition(".")
    if head == "torch" and last in _TORCH_DRAWS:
        return True
    if last in _INPLACE_DRAWS:
        return True
    if head in ("np.random", "numpy.random", "random") and last not in _SEEDING:
        return True
    # building a torch module or a model initializes its weights from torch's generator
    return (head in ("nn", "torch.nn") and last[:1].isupper()) or last in ("from_config", "get_peft_model")


def import_time_draws(source: str, filename: str = "<test>") -> list[str]:
    """Global-generator draws that run when the file is imported: module and class bodies,
    decorators and default arguments (function bodies run under the per-test seed)."""
    found = []

    def visit(node, at_import_time: bool):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            for sub in node.args.defaults + node.args.kw_defaults:
                if sub is not None:
                    visit(sub, at_import_time)
            for sub in getattr(node, "decorator_list", []):
                visit(sub, at_import_time)
            return  # the body runs later, inside a test
        if at_import_time and isinstance(node, ast.Call) and _is_global_draw(node):
            found.append(f"{filename}:{node.lineno}: {ast.unparse(node)}")
        for child in ast.iter_child_nodes(node):
            visit(child, at_import_time)

    visit(ast.parse(source, filename), True)
    return found


def fixture_problems(source: str) -> list[str]:
    """What is wrong with a seeding module: ``seed_rngs`` must be an autouse fixture that reaches
    ``seed_all``, which must seed Python's random, numpy and torch."""
    tree = ast.parse(source)
    funcs = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    problems = []
    fixture = funcs.get("seed_rngs")
    autouse = fixture is not None and any(
        isinstance(d, ast.Call) and _dotted(d.func).endswith("fixture")
        and any(kw.arg == "autouse" and getattr(kw.value, "value", False) is True for kw in d.keywords)
        for d in fixture.decorator_list)
    if not autouse:
        problems.append("seed_rngs is not an autouse fixture")
    elif "seed_all" not in {_dotted(c.func) for c in ast.walk(fixture) if isinstance(c, ast.Call)}:
        problems.append("seed_rngs does not call seed_all")
    seed_all = funcs.get("seed_all", ast.Module(body=[], type_ignores=[]))
    seeded = {_dotted(c.func) for c in ast.walk(seed_all) if isinstance(c, ast.Call)}
    for needed in ("random.seed", "np.random.seed", "torch.manual_seed"):
        if needed not in seeded:
            problems.append(f"seed_all does not call {needed}")
    return problems


def _test_sources():
    for name in sorted(os.listdir(TESTS_DIR)):
        if name.endswith(".py"):
            with open(os.path.join(TESTS_DIR, name)) as f:
                yield name, f.read()


def test_no_global_draw_at_import_time_in_tests():
    found = [hit for name, src in _test_sources() for hit in import_time_draws(src, name)]
    assert not found, "draws outside the per-test seed (move them into the test or a fixture):\n" + "\n".join(found)


def test_seed_fixture_is_autouse_and_covers_torch_numpy_random():
    with open(os.path.join(TESTS_DIR, "seeding.py")) as f:
        assert fixture_problems(f.read()) == []
    with open(os.path.join(TESTS_DIR, "conftest.py")) as f:
        conftest = ast.parse(f.read())
    imported = {a.name for n in conftest.body if isinstance(n, ast.ImportFrom) and n.module == "seeding"
                for a in n.names}
    assert {"seed_rngs", "pytest_fixture_setup", "pytest_configure"} <= imported


def test_the_checks_catch_bad_snippets():
    bad = textwrap.dedent("""
        import random, numpy as np, torch
        from torch import nn
        X = torch.randn(3)
        LAYER = nn.Linear(4, 4)
        OK = torch.randn(3, generator=torch.Generator().manual_seed(0))
        class Case:
            W = np.random.rand(2)
        def helper(x=random.random()):
            return torch.rand(2)  # inside a function: under the per-test seed, fine
        """)
    hits = import_time_draws(bad)
    assert [h.split(": ", 1)[1] for h in hits] == ["torch.randn(3)", "nn.Linear(4, 4)", "np.random.rand(2)",
                                                   "random.random()"]
    good_fixture = "@pytest.fixture(autouse=True)\ndef seed_rngs(request):\n    seed_all(1)\n" \
                   "def seed_all(s):\n    random.seed(s)\n    np.random.seed(s)\n    torch.manual_seed(s)\n"
    assert fixture_problems(good_fixture) == []
    assert fixture_problems(good_fixture.replace("autouse=True", "autouse=False")) == [
        "seed_rngs is not an autouse fixture"]
    assert fixture_problems(good_fixture.replace("    np.random.seed(s)\n", "")) == [
        "seed_all does not call np.random.seed"]


@pytest.mark.parametrize("case", ["a", "b"])
def test_each_test_starts_from_its_own_seed(request, case):
    seed = seed_for(key_of(request.node))
    assert key_of(request.node) == f"test_seeding.py::test_each_test_starts_from_its_own_seed[{case}]"
    assert torch.initial_seed() == seed
    assert torch.rand(3).tolist() == torch.rand(3, generator=torch.Generator().manual_seed(seed)).tolist()
    assert random.random() == random.Random(seed).random()
    assert np.random.rand() == np.random.RandomState(seed).rand()
    other = "b" if case == "a" else "a"
    assert seed != seed_for(key_of(request.node).replace(f"[{case}]", f"[{other}]"))


def test_hypothesis_examples_are_derived_from_the_test():
    assert settings.default.derandomize and settings.default.database is None


_DRAWS = '''
import json, os, random
import numpy as np, torch

def _record(name):
    with open(os.environ["DRAWS_OUT"], "a") as f:
        f.write(json.dumps([name, torch.rand(2).tolist(), random.random(), float(np.random.rand())]) + "\\n")

def test_one():
    _record("one")

def test_two():
    _record("two")
'''


def _draws(tmp_path, seeded: bool, order: list[str], extra: list[str]) -> dict:
    suite = tmp_path / ("seeded" if seeded else "bare")
    suite.mkdir(exist_ok=True)
    (suite / "test_draws.py").write_text(_DRAWS)
    conftest = f"import sys\nsys.path.insert(0, {TESTS_DIR!r})\n"
    conftest += "from seeding import pytest_configure, pytest_fixture_setup, seed_rngs\n" if seeded else ""
    (suite / "conftest.py").write_text(conftest)
    out = suite / f"draws{len(list(suite.glob('draws*')))}.jsonl"
    ids = [str(suite / f"test_draws.py::test_{name}") for name in order]
    os.environ["DRAWS_OUT"] = str(out)  # in-process run (a subprocess would import torch again: slow)
    try:
        code = pytest.main(["-q", "-p", "no:cacheprovider", "--import-mode=importlib", "--rootdir", str(suite),
                            *extra, *ids])
    finally:
        del os.environ["DRAWS_OUT"]
    assert code == 0
    return {rec[0]: rec[1:] for rec in map(json.loads, out.read_text().splitlines())}


def test_values_do_not_depend_on_order_or_randomly_seed(tmp_path):
    """The same two tests, run in both orders under pytest-randomly with two different seeds, draw
    the same numbers with the seeding fixture, and different ones without it."""
    keep_order = ["-p", "randomly", "--randomly-dont-reorganize"]
    first = _draws(tmp_path, True, ["one", "two"], [*keep_order, "--randomly-seed=1"])
    second = _draws(tmp_path, True, ["two", "one"], [*keep_order, "--randomly-seed=2"])
    assert first == second and first["one"] != first["two"]
    bare_first = _draws(tmp_path, False, ["one", "two"], ["-p", "no:randomly"])
    bare_second = _draws(tmp_path, False, ["two", "one"], ["-p", "no:randomly"])
    assert bare_first != bare_second  # the check would catch a test that depends on what ran before
