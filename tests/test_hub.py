"""Hub round trips against the local Hub server (tests/hub_server.py, started by conftest):
push -> from_pretrained(repo_id) in a fresh process, sharded checkpoints, LoRA adapters,
snapshot_download + inspect, private/revision, the endpoints a push uses, model cards,
atomic saves, and the validation of tampered checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, ModelCardData, snapshot_download
from huggingface_hub.errors import RepositoryNotFoundError
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hfcompress
import tiny_models as tm
from hfcompress import hub
from hfcompress.hub import cards as cards_module
from hfcompress.cli.main import main as cli

RTN = dict(bits=4, group_size=32)


def _quantized(seed: int = 0):
    model = tm.llama_gqa(seed)
    return hfcompress.quantize_(model, hfcompress.RTNConfig(**RTN))


def _card(path: str) -> ModelCard:
    card = ModelCard.load(path)
    assert isinstance(card.data, ModelCardData)
    return card


@pytest.fixture(scope="module")
def pushed(local_hub, tmp_path_factory):
    """Several pushes whose reloads a single fresh process checks (one interpreter start)."""
    x = tm.inputs()
    refs, cases = {}, []
    model = _quantized(0)
    refs["plain"] = model(x).logits
    model.push_to_hub("hub-plain")
    cases.append(("plain", "tester/hub-plain", {}))

    sharded = _quantized(1)
    refs["sharded"] = sharded(x).logits
    sharded.push_to_hub("hub-sharded", max_shard_size="60KB")
    cases.append(("sharded", "tester/hub-sharded", {}))

    private = _quantized(2)
    refs["private"] = private(x).logits
    private.push_to_hub("hub-private", private=True, revision="v1")
    cases.append(("private", "tester/hub-private", {"revision": "v1"}))

    from peft import LoraConfig, PeftModel, get_peft_model

    base = AutoModelForCausalLM.from_pretrained("tester/hub-plain")
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                           init_lora_weights=False))
    refs["adapter"] = lora(x).logits
    lora.push_to_hub("hub-lora")
    cases.append(("adapter", "tester/hub-lora", {"base": "tester/hub-plain"}))
    assert isinstance(lora, PeftModel)

    ref_path = tmp_path_factory.mktemp("refs") / "refs.safetensors"
    save_file({k: v.detach().contiguous() for k, v in refs.items()}, str(ref_path))
    return {"x": x, "refs": refs, "cases": cases, "ref_path": str(ref_path)}


FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    import torch
    from safetensors.torch import load_file
    import hfcompress  # registers the quantization method before from_pretrained
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    cases, ref_path, x = json.loads(sys.argv[1]), sys.argv[2], torch.tensor(json.loads(sys.argv[3]))
    refs = load_file(ref_path)
    out = {}
    for name, repo_id, kw in cases:
        if "base" in kw:
            base = AutoModelForCausalLM.from_pretrained(kw["base"])
            model = PeftModel.from_pretrained(base, repo_id)
        else:
            model = AutoModelForCausalLM.from_pretrained(repo_id, **kw)
        with torch.no_grad():
            out[name] = bool(torch.equal(model(x).logits, refs[name]))
    print("RESULT " + json.dumps(out))
""")


def test_hub_push_pull_fresh_process_bit_identical(pushed):
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS, json.dumps(pushed["cases"]), pushed["ref_path"],
                           json.dumps(pushed["x"].tolist())], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    assert json.loads(line[7:]) == {"plain": True, "sharded": True, "private": True, "adapter": True}


def test_hub_sharded_push_has_several_shards(pushed, local_hub):
    files = HfApi().list_repo_files("tester/hub-sharded")
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) >= 3 and "model.safetensors.index.json" in files
    index = json.loads(local_hub.download("model", "tester/hub-sharded", "main", "model.safetensors.index.json", True))
    assert set(index["weight_map"].values()) == set(shards)


def test_hub_private_and_revision_pass_through(pushed, local_hub):
    repo = local_hub.repos[("model", "tester/hub-private")]
    assert repo.private
    with pytest.raises(RepositoryNotFoundError):
        HfApi(token=False).model_info("tester/hub-private")
    api = HfApi()
    assert "model.safetensors" in api.list_repo_files("tester/hub-private", revision="v1")
    assert "model.safetensors" not in api.list_repo_files("tester/hub-private")  # main untouched


def test_hub_lora_adapter_card(pushed):
    path = hf_path("tester/hub-lora", "README.md")
    card = _card(path)
    assert card.data.base_model == "tester/hub-plain"
    assert card.data.base_model_relation == "adapter"
    assert card.data.library_name == "peft"
    assert {"hfcompress", "lora", "rtn"} <= set(card.data.tags)
    assert 'PeftModel.from_pretrained(base, "tester/hub-lora")' in card.text
    files = HfApi().list_repo_files("tester/hub-lora")
    assert "adapter_model.safetensors" in files and not any(f.endswith(".bin") for f in files)


def hf_path(repo_id: str, filename: str, **kw) -> str:
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id, filename, **kw)


def test_hub_push_endpoints(local_hub):
    """Protocol drift fails here: the exact endpoints (in order) one push of a new repo uses."""
    model = _quantized(3)
    local_hub.clear_calls()
    model.push_to_hub("hub-endpoints")
    calls = list(local_hub.calls)
    assert not [c for c in calls if "UNKNOWN" in c], calls
    uploads = calls.count("PUT lfs-upload")
    assert uploads == 1  # one safetensors file through git-lfs
    assert [c for c in calls if c != "PUT lfs-upload"] == [
        "POST repos/create",  # create_repo(exist_ok=True)
        "GET tree",  # the existing card (none yet)
        "GET tree",  # upload_folder(delete_patterns=...) lists remote files
        "POST validate-yaml",  # README.md metadata
        "POST validate-yaml",
        "POST preupload",  # lfs or regular per file
        "POST lfs-batch",
        "POST commit",
    ], calls


def test_hub_snapshot_download_and_inspect(pushed, capsys):
    folder = snapshot_download("tester/hub-sharded")
    assert cli(["inspect", folder, "--no-layers"]) == 0
    out = capsys.readouterr().out
    spec = hfcompress.RTNConfig(**RTN).spec
    model = tm.llama_gqa()
    layers = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    bits = sum(spec.bits_per_weight(m.out_features, m.in_features) * m.weight.numel() for m in layers)
    expected = bits / sum(m.weight.numel() for m in layers)
    assert f"bits per weight (scales, zeros, g_idx included): {expected:.3f}" in out
    assert "algorithm: rtn" in out


def test_hub_card_metadata_license_and_eval(local_hub, tmp_path):
    # a float base model on the Hub with its own card (license mit)
    base = tm.llama_gqa(4)
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    ModelCard("---\nlicense: mit\nlanguage: en\n---\n# a base model\n").save(base_dir / "README.md")
    HfApi().create_repo("hub-base", exist_ok=True)
    HfApi().upload_folder(repo_id="tester/hub-base", folder_path=str(base_dir))

    model = AutoModelForCausalLM.from_pretrained("tester/hub-base",
                                                 quantization_config=hfcompress.RTNConfig(**RTN))
    hub.set_card_data(model, evaluations=[{"metric": "perplexity", "dataset_name": "Hamlet", "value": 61.8,
                                           "base": 55.4, "dataset_split": "test"},
                                          {"metric": "perplexity", "dataset_name": "WikiText-2",
                                           "dataset_type": "wikitext", "dataset_config": "wikitext-2-raw-v1",
                                           "value": 30.5, "base": 28.25}])
    out = tmp_path / "q"
    model.save_pretrained(out, card_data={"tags": ["mine"], "datasets": ["shakespeare"]})
    card = _card(str(out / "README.md"))
    d = card.data
    assert d.base_model == "tester/hub-base" and d.base_model_relation == "quantized"
    assert d.license == "mit" and d.language == "en"  # carried from the base card
    assert d.library_name == "transformers" and d.pipeline_tag == "text-generation"
    assert {"hfcompress", "rtn", "4-bit", "mine"} <= set(d.tags) and d.datasets == ["shakespeare"]
    # model-index: this model's own result on a Hub dataset only; the base's figures and the text
    # without a Hub dataset id are in the body's table
    values = {(r.dataset_type, r.metric_name, r.metric_value) for r in d.eval_results}
    assert values == {("wikitext", "perplexity (rtn 4-bit)", 30.5)}
    assert "| Hamlet (test) | perplexity | 55.400 | 61.800 |" in card.text
    assert "| WikiText-2 | perplexity | 28.250 | 30.500 |" in card.text
    stats = hub.size_stats(model)
    assert f"| bits per weight (scales, zeros, g_idx included) | {stats.bits_per_weight:.3f} |" in card.text
    # 4-bit codes + an fp16 scale and an fp16 zero (RTN's default float zeros) per 32 weights
    assert stats.bits_per_weight == pytest.approx(4 + 32 / 32) and stats.checkpoint_bytes < stats.original_bytes
    assert card.text.index("import hfcompress") < card.text.index("from_pretrained(")
    # the base card itself is referenced, never modified
    assert ModelCard.load("tester/hub-base").data.license == "mit"
    assert "hfcompress" not in (ModelCard.load("tester/hub-base").data.tags or [])
    with pytest.raises(hub.CardError, match=r"evaluations'\]\[0\] lacks 'value'"):
        model.save_pretrained(tmp_path / "bad", card_data={"evaluations": [{"metric": "ppl", "dataset_name": "x"}]})
    assert not (tmp_path / "bad").exists()


def test_hub_existing_card_kept(local_hub, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "README.md").write_text("# my own notes\n")
    (out / "tokenizer.json").write_text("{}")
    model = _quantized(5)
    model.save_pretrained(out)
    assert (out / "ORIGINAL_README.md").read_text() == "# my own notes\n"
    assert (out / "tokenizer.json").read_text() == "{}"
    assert hub.is_generated_card(str(out / "README.md"))
    assert "ORIGINAL_README.md" in (out / "README.md").read_text()
    # a hand-written card already in the repo is kept on push too
    api = HfApi()
    api.create_repo("hub-kept", exist_ok=True)
    api.upload_file(path_or_fileobj=b"# hand written\n", path_in_repo="README.md", repo_id="tester/hub-kept")
    model.push_to_hub("hub-kept")
    assert local_hub.download("model", "tester/hub-kept", "main", "ORIGINAL_README.md", True) == b"# hand written\n"
    assert hub.CARD_MARKER.encode() in local_hub.download("model", "tester/hub-kept", "main", "README.md", True)


def _tree(path) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(r, f), path): open(os.path.join(r, f), "rb").read()
            for r, _, fs in os.walk(path) for f in fs}


def test_hub_atomic_save_failure_leaves_old_checkpoint(tmp_path, monkeypatch):
    import transformers.modeling_utils as mu

    out = tmp_path / "ckpt"
    _quantized(6).save_pretrained(out, max_shard_size="60KB")
    before = _tree(out)
    assert sum(f.endswith(".safetensors") for f in before) >= 3
    real = mu.safe_save_file
    written = []

    def failing(tensors, filename, metadata=None):
        if len(written) == 1:
            raise OSError("disk full (injected)")
        written.append(filename)
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(mu, "safe_save_file", failing)
    new = _quantized(7)
    with pytest.raises(OSError, match="injected"):
        new.save_pretrained(out, max_shard_size="60KB")
    assert written  # the failure happened mid-write, after a shard was written
    assert _tree(out) == before  # the old checkpoint, byte for byte
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temporary directory left
    written.clear()
    with pytest.raises(OSError, match="injected"):
        new.save_pretrained(tmp_path / "fresh", max_shard_size="60KB")
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]  # none, never a partial checkpoint
    monkeypatch.setattr(mu, "safe_save_file", real)
    new.save_pretrained(out)  # a good save replaces the sharded one completely
    files = sorted(os.listdir(out))
    assert "model.safetensors" in files and not any("-of-" in f for f in files)


@pytest.mark.parametrize("tamper, match", [
    ("shape", r"model\.layers\.1\.mlp\.down_proj\.weight_zero has shape"),
    ("dtype", r"model\.layers\.1\.mlp\.down_proj\.weight has dtype"),
    ("scale_dtype", r"model\.layers\.1\.mlp\.down_proj\.weight_scale has dtype"),
    ("missing", r"model\.layers\.1\.mlp\.down_proj\.weight_scale is missing"),
    ("nonfinite", r"model\.layers\.1\.mlp\.down_proj\.weight_scale contains non-finite"),
])
def test_hub_tampered_checkpoint_names_tensor(tmp_path, tamper, match):
    out = tmp_path / "ckpt"
    _quantized(8).save_pretrained(out)
    sd = load_file(out / "model.safetensors")
    key = "model.layers.1.mlp.down_proj"
    if tamper == "shape":
        sd[f"{key}.weight_zero"] = sd[f"{key}.weight_zero"][:, :-1].contiguous()
    elif tamper == "dtype":
        sd[f"{key}.weight"] = sd[f"{key}.weight"].to(torch.int64)
    elif tamper == "scale_dtype":
        sd[f"{key}.weight_scale"] = sd[f"{key}.weight_scale"].float()
    elif tamper == "missing":
        del sd[f"{key}.weight_scale"]
    else:
        sd[f"{key}.weight_scale"][0, 0] = float("inf")
    save_file(sd, out / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(hfcompress.FormatError, match=match):
        AutoModelForCausalLM.from_pretrained(out)


def test_hub_cli_push_and_quantize_push_to_hub(local_hub, tmp_path, capsys):
    float_dir = tmp_path / "float"
    tm.llama_gqa(9).save_pretrained(float_dir)
    out = tmp_path / "q"
    assert cli(["quantize", str(float_dir), "--bits", "4", "--group-size", "32", "--out", str(out),
                "--push-to-hub", "hub-cli-quantize"]) == 0
    readme = local_hub.download("model", "tester/hub-cli-quantize", "main", "README.md", True).decode()
    assert 'from_pretrained("tester/hub-cli-quantize")' in readme
    os.remove(out / "README.md")  # a checkpoint without a card: push renders it from the headers
    assert cli(["push", str(out), "hub-cli-push", "--private", "--revision", "dev"]) == 0
    assert hub.is_generated_card(str(out / "README.md"))
    repo = local_hub.repos[("model", "tester/hub-cli-push")]
    assert repo.private and "dev" in repo.branches
    assert "model.safetensors" in repo.resolve("dev").files and "model.safetensors" not in repo.resolve("main").files
    assert "pushed" in capsys.readouterr().out


def test_hub_refuses_pickle(tmp_path):
    model = _quantized(10)
    with pytest.raises(ValueError, match="safetensors only"):
        model.save_pretrained(tmp_path / "x", safe_serialization=False)
    out = tmp_path / "ok"
    model.save_pretrained(out)
    (out / "pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: hfcompress pushes safetensors only"):
        hub.push_folder(str(out), "hub-pickle")


def test_hub_templates_are_package_data():
    """The card templates ship in the wheel: mapped as package hfcompress.model_cards."""
    import tomllib

    root = os.path.join(os.path.dirname(__file__), os.pardir)
    with open(os.path.join(root, "pyproject.toml"), "rb") as f:
        setuptools_cfg = tomllib.load(f)["tool"]["setuptools"]
    assert setuptools_cfg["package-dir"]["hfcompress.model_cards"] == "model_cards"
    assert "hfcompress.model_cards" in setuptools_cfg["packages"]
    assert "*.md" in setuptools_cfg["package-data"]["hfcompress.model_cards"]
    for name in ("quantized.md", "adapter.md"):
        assert "$metadata" in cards_module._template(name)


@pytest.mark.parametrize("name", ["quickstart", "adapters"])
def test_hub_notebooks_run(name, local_hub, tmp_path, monkeypatch):
    """The notebooks run end to end (their cells assert the round trips) on a tiny model, pushing
    to the local Hub (the opt-in a user sets to push to theirs). Their committed outputs come from
    the real SmolLM2 (tests/test_notebooks.py checks they are there)."""
    import nbformat
    from nbclient import NotebookClient

    path = os.path.join(os.path.dirname(__file__), os.pardir, "notebooks", f"{name}.ipynb")
    nb = nbformat.read(path, as_version=4)
    monkeypatch.setenv("HFCOMPRESS_NOTEBOOK_MODEL", "tiny")
    monkeypatch.setenv("HFCOMPRESS_NOTEBOOK_PUSH", "1")
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "bit-identical" in outputs and "True" in outputs and "push to a Hub: True" in outputs
    assert local_hub.repos  # something was pushed to the local Hub


def test_hub_card_from_checkpoint_headers(tmp_path):
    """Checkpoints written without a model in memory (streamed GPTQ, `hfcompress push DIR`) get the
    same statistics from their safetensors headers as from the model."""
    model = _quantized(11)
    model.save_pretrained(tmp_path / "ck")
    _, from_headers = hub.checkpoint_stats(str(tmp_path / "ck"))
    assert from_headers == hub.size_stats(model)
    card = hub.render_card(str(tmp_path / "ck"), {"base_model": "tester/some-base"}, source=None)
    assert card.data.base_model == "tester/some-base" and "hfcompress" in card.data.tags
    float_dir = tmp_path / "float"
    tm.llama_gqa(11).save_pretrained(float_dir)
    with pytest.raises(hub.CardError, match="no hfcompress quantization_config"):
        hub.render_card(str(float_dir))


def test_hub_pickle_checkpoint_refused_before_unpickling(tmp_path, monkeypatch):
    out = tmp_path / "ckpt"
    _quantized(12).save_pretrained(out)
    sd = load_file(out / "model.safetensors")
    os.remove(out / "model.safetensors")
    torch.save(sd, out / "pytorch_model.bin")  # what a tampered or foreign upload could hold

    def never(*args, **kwargs):
        raise AssertionError("torch.load was called on a pickle")

    monkeypatch.setattr(torch, "load", never)
    with pytest.raises(hfcompress.FormatError, match=r"pytorch_model\.bin: hfcompress checkpoints are read from "
                                                      r"safetensors only"):
        AutoModelForCausalLM.from_pretrained(out)


def test_hub_example_card_validates():
    """The committed example card (a real GPTQ SmolLM2-135M checkpoint, benchmarks/hub_example_card.py)
    parses as a ModelCard whose metadata the Hub understands."""
    path = os.path.join(os.path.dirname(__file__), os.pardir, "model_cards", "examples",
                        "smollm2-135m-instruct-gptq-w4g64.md")
    card = _card(path)
    d = card.data
    assert d.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and d.base_model_relation == "quantized"
    assert d.library_name == "transformers" and d.license == "apache-2.0"
    assert {"hfcompress", "gptq", "4-bit"} <= set(d.tags)
    assert d.eval_results is None  # its texts are no Hub datasets: no made-up dataset ids in model-index
    assert "| Hamlet" in card.text and "| SQLite documentation" in card.text
    assert "| Python source code" in card.text and "| short two-speaker chat" in card.text  # all four domains
    assert "one fp16 scale and one fp16 zero point per group of\n64 input channels" in card.text  # GPTQ's defaults
    assert "pip install hfcompress" in card.text and "original (bfloat16 linear layers)" in card.text
    assert card.text.index("import hfcompress") < card.text.index(".from_pretrained(")
    assert hub.CARD_MARKER in card.text


@pytest.mark.parametrize("sym, zero_point, says", [(False, "float", "one fp16 scale and one fp16 zero point"),
                                                   (False, "int", "one fp16 scale and one integer zero point"),
                                                   (True, None, "one fp16 scale per group")])
def test_hub_card_says_what_each_group_stores(tmp_path, sym, zero_point, says):
    """The card's storage sentence follows the checkpoint's grid (float zero points are RTN's and GPTQ's
    default: a card that said "integer zero point" would describe another format)."""
    kw = {} if zero_point is None else {"zero_point": zero_point}
    model = hfcompress.quantize_(tm.llama_gqa(13), hfcompress.RTNConfig(bits=4, group_size=32, sym=sym, **kw))
    model.save_pretrained(tmp_path / "ck")
    text = hub.render_card(str(tmp_path / "ck"), {"base_model": "tester/some-base"}, source=None).text
    assert says in text
    assert sum(s in text for s in ("fp16 zero point", "integer zero point")) == (0 if sym else 1)
