"""Every test starts from its own seeded random state, whatever ran before it, in any order or worker.

* ``seed_rngs`` (autouse, wired in by ``conftest.py``) seeds torch (CPU and CUDA), numpy and Python's
  ``random`` before each test from :func:`seed_for` of the test's id: a test draws the same numbers
  alone, in the suite, in a random order (pytest-randomly) or in any pytest-xdist worker.
* ``pytest_fixture_setup`` does the same for module/session fixtures, before they build (from the
  fixture's name and where it is defined), so a shared fixture does not depend on which test
  happened to request it first.
* pytest-randomly owns the *order* only: its own reseeding (which would make the data depend on
  ``--randomly-seed``) is switched off, so a failure reproduces from the test id alone, and an order
  from ``-p randomly --randomly-seed=N``.
* Hypothesis: the ``hfcompress`` profile derives its examples from the test (``derandomize``), keeps
  no example database and has no deadline (the CI machine is small and shared).

Tests may still seed explicitly (``torch.manual_seed(0)``) or, better, draw from a local
``torch.Generator().manual_seed(seed)``; tests/test_seeding.py checks all of the above.
"""

from __future__ import annotations

import os
import random
import zlib

import numpy as np
import pytest
import torch
from hypothesis import settings

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))

settings.register_profile("hfcompress", derandomize=True, database=None, deadline=None)
settings.load_profile("hfcompress")


def seed_for(key: str) -> int:
    """A 32-bit seed from a stable key (a test id relative to tests/, or a fixture's name)."""
    return zlib.crc32(key.encode())


def seed_all(seed: int) -> None:
    """Seed every global generator a test or a library it calls may draw from."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device


def key_of(node) -> str:
    """``test_file.py::test_name[param]`` relative to tests/: the same from any rootdir or cwd."""
    rel = os.path.relpath(str(node.path), TESTS_DIR).replace(os.sep, "/")
    return rel + "::" + node.nodeid.split("::", 1)[1]


@pytest.fixture(autouse=True)
def seed_rngs(request):
    seed_all(seed_for(key_of(request.node)))


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
    if fixturedef.scope != "function":
        seed_all(seed_for(f"{fixturedef.baseid}::{fixturedef.argname}"))
    return (yield)


def pytest_configure(config):
    if config.pluginmanager.hasplugin("randomly"):
        config.option.randomly_reset_seed = False  # the order is randomly's; the data seeds are ours
