import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tiny_models and other test helpers

# pytest-xdist runs one worker per core: one intra-op thread each (subprocesses inherit it).
# Oversubscribed OpenMP pools spin and make tiny-tensor ops 100x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# A local Hub (tests/hub_server.py) for every test process (each xdist worker starts its own).
# Its environment must be set before huggingface_hub is first imported (it reads it once);
# subprocesses inherit it through os.environ. Nothing reaches the network: HF_ENDPOINT is local.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402
from hub_server import HubServer  # noqa: E402
# Per-test seeds for torch/numpy/random, Hypothesis profile, pytest-randomly order only (tests/seeding.py).
from seeding import pytest_configure, pytest_fixture_setup, seed_rngs  # noqa: E402,F401

if "huggingface_hub.constants" in sys.modules:
    raise RuntimeError("huggingface_hub was imported before tests/conftest.py; the local Hub environment "
                       "(HF_ENDPOINT ...) would be ignored. Find the plugin importing it and disable it.")
LOCAL_HUB = HubServer().start()
_HF_HOME = tempfile.mkdtemp(prefix="hfcompress-test-hf-home-")
os.environ.update(LOCAL_HUB.environment(_HF_HOME))
atexit.register(shutil.rmtree, _HF_HOME, True)


@pytest.fixture(scope="session")
def local_hub():
    """The in-process local Hub server (see tests/hub_server.py); env already points at it."""
    return LOCAL_HUB


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def exact_cpu_reference(monkeypatch):
    """Opt-in for tests that compare a quantized model bit for bit (or at fp32 tolerance) with a
    float model built from its dequantized weights: quantized layers on CPU run the exact fp32
    reference (dequantize, then matmul) instead of the default bf16 fast path, in this process and
    in subprocesses it starts (HFCOMPRESS_CPU_FAST_PATH=off)."""
    from hfcompress.ops import set_cpu_fast_path

    monkeypatch.setenv("HFCOMPRESS_CPU_FAST_PATH", "off")
    previous = set_cpu_fast_path("off")
    yield
    set_cpu_fast_path(previous)
