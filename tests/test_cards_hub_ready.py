"""Cards ready for the Hub: `hfcompress push` names the real repo id in the usage snippet, takes
--base-model / --license (and keeps what the saved card already knew, e.g. its evaluations), the
card has an install line, and a source checkpoint from the Hub cache gives its repo id."""

from __future__ import annotations

import pytest
import tiny_models as tm
from huggingface_hub import ModelCard

import hfcompress
from hfcompress import hub
from hfcompress.cli.main import main as cli


def _saved(tmp_path, seed=21, **card_data):
    model = hfcompress.quantize_(tm.llama_gqa(seed), hfcompress.RTNConfig(bits=4, group_size=32))
    model.save_pretrained(tmp_path / "q", card_data=card_data or None)
    return tmp_path / "q"


def test_cli_push_names_repo_and_sets_base_model_and_license(local_hub, tmp_path):
    out = _saved(tmp_path, evaluations=[{"metric": "perplexity", "dataset_name": "Hamlet", "value": 9.5,
                                         "base": 9.0}])
    before = ModelCard.load(out / "README.md")
    assert 'from_pretrained("path/to/this/checkpoint")' in before.text and before.data.base_model is None
    assert "pip install hfcompress" in before.text
    assert cli(["push", str(out), "hub-ready", "--base-model", "HuggingFaceTB/SmolLM2-135M-Instruct",
                "--license", "apache-2.0"]) == 0
    card = ModelCard(local_hub.download("model", "tester/hub-ready", "main", "README.md", True).decode())
    assert 'from_pretrained("tester/hub-ready")' in card.text and "path/to/this" not in card.text
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.base_model_relation == "quantized" and card.data.license == "apache-2.0"
    assert "| Hamlet | perplexity | 9.000 | 9.500 |" in card.text  # what the save knew is kept
    assert hub.CARD_MARKER in card.text
    # pushing again without flags keeps them (read from the card the source checkpoint carries)
    assert cli(["push", str(out), "hub-ready-2"]) == 0
    again = ModelCard(local_hub.download("model", "tester/hub-ready-2", "main", "README.md", True).decode())
    assert again.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and again.data.license == "apache-2.0"
    assert 'from_pretrained("tester/hub-ready-2")' in again.text


def test_update_card_refuses_a_card_we_did_not_write(tmp_path):
    (tmp_path / "README.md").write_text("# my notes\n")
    with pytest.raises(hub.CardError, match="not written by hfcompress"):
        hub.update_card_(str(tmp_path / "README.md"), repo_id="a/b")
    assert (tmp_path / "README.md").read_text() == "# my notes\n"


def test_base_model_from_hub_cache_snapshot(tmp_path):
    snap = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    (snap / "README.md").write_text("---\nlicense: apache-2.0\n---\n# card\n")
    info = hub.base_model_info(str(snap))
    assert info.repo_id == "HuggingFaceTB/SmolLM2-135M-Instruct" and info.license == "apache-2.0"
    assert hub.base_model_info(str(tmp_path)).repo_id is None  # a plain local directory: unknown
