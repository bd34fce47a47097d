"""Notebooks committed with their outputs come from the real SmolLM2 (no cell pushed anywhere in
that run), and the size-vs-perplexity notebook still runs: CI executes it on a tiny random
model (seconds), which checks the code path, not the numbers (quickstart and adapters run in
tests/test_hub.py against the local Hub)."""

from __future__ import annotations

import os

import nbformat
import pytest

ROOT = os.path.join(os.path.dirname(__file__), os.pardir, "notebooks")
#: notebooks committed with the outputs of a run on the real SmolLM2 (``python notebooks/execute.py
#: notebooks/NAME.ipynb``)
NOTEBOOKS = ("quickstart", "adapters", "quality")


def _outputs(nb) -> list[dict]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def _text(nb) -> str:
    return "".join(o.get("text", "") or "".join(o.get("data", {}).get("text/plain", "")) for o in _outputs(nb))


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_committed_with_real_model_outputs(name):
    nb = nbformat.read(os.path.join(ROOT, f"{name}.ipynb"), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    # every cell but the last clean-up ran and printed or displayed something, and none failed
    assert all(c.get("outputs") for c in code if "shutil.rmtree" not in c.source), name
    assert not any(o.get("output_type") == "error" for o in _outputs(nb))
    text = _text(nb)
    assert "SmolLM2-135M-Instruct" in text  # the real model, not the tiny CI one
    if name != "quality":
        assert "push to a Hub: False" in text
        assert "pushed:" not in text  # nothing went to anybody's account when the outputs were made
    if name == "adapters":
        assert "EoRA closes" in text and "adapter round trip bit-identical: True" in text
    if name == "quality":
        assert any("image/png" in o.get("data", {}) for o in _outputs(nb)), "the size vs perplexity plot"
        assert any("text/markdown" in o.get("data", {}) for o in _outputs(nb)), "the table"
        for method in ("rtn", "gptq"):
            assert f"{method} 3-bit g64" in text and f"{method} 4-bit g128" in text


def test_quality_notebook_runs_on_a_tiny_model(tmp_path, monkeypatch):
    from nbclient import NotebookClient

    nb = nbformat.read(os.path.join(ROOT, "quality.ipynb"), as_version=4)
    monkeypatch.setenv("HFCOMPRESS_NOTEBOOK_MODEL", "tiny")
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outs = _outputs(nb)
    assert any("image/png" in o.get("data", {}) for o in outs)
    table = next(o["data"]["text/markdown"] for o in outs if "text/markdown" in o.get("data", {}))
    assert table.count("\n| rtn |") == 4 and table.count("\n| gptq |") == 4 and "| float (" in table


def test_adapters_notebook_runs_without_a_hub(tmp_path, monkeypatch):
    """The default path (nothing pushed: base and adapter go through local folders) runs too; its
    card has no Hub base to link (it failed on that once, on the real model)."""
    from nbclient import NotebookClient

    nb = nbformat.read(os.path.join(ROOT, "adapters.ipynb"), as_version=4)
    monkeypatch.setenv("HFCOMPRESS_NOTEBOOK_MODEL", "tiny")
    monkeypatch.delenv("HFCOMPRESS_NOTEBOOK_PUSH", raising=False)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = _text(nb)
    assert "push to a Hub: False" in text and "adapter round trip bit-identical: True" in text
