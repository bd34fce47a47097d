"""Data-parallel calibration on torch.distributed (gloo, 2 processes on CPU, tiny models).

The ranks are started as torchrun starts them (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT in
the environment); the CLI test uses torchrun itself. Results are compared with the same job in
this (single) process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import char_tokenizer, llama_gqa

import distributed_worker as worker
from hfcompress.distributed import assign, gptq_cost, imbalance, shard_batches
from hfcompress.distributed.context import _decode, _encode, current
from hfcompress.distributed.layers import layer_item, rebuild_layer

HERE = os.path.dirname(os.path.abspath(__file__))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args: list[str], world: int = 2, env: dict | None = None, timeout: float = 120, wait_for: int | None = None):
    """Start ``world`` ranks of ``python args...``; returns ``[(returncode, stderr)]`` per rank.
    ``wait_for``: wait only for that rank, then kill the others (a hung rank)."""
    port = _port()
    procs = []
    for rank in range(world):
        e = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
             "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
             "OMP_NUM_THREADS": "1", **(env or {})}
        procs.append(subprocess.Popen([sys.executable, *args], env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    out = []
    try:
        for rank, p in enumerate(procs):
            if wait_for is not None and rank != wait_for:
                continue
            _, err = p.communicate(timeout=timeout)
            out.append((rank, p.returncode, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return out


# ---- plan, sharding, wire format (no process group) ----------------------------------------------

def test_assign_balances_by_cost_and_is_deterministic():
    costs = {"q": gptq_cost(576, 576), "k": gptq_cost(192, 576), "v": gptq_cost(192, 576), "gate": gptq_cost(1536, 576),
             "up": gptq_cost(1536, 576)}
    owner = assign(costs, 2)
    assert owner == assign(dict(reversed(list(costs.items()))), 2)  # same plan on every rank, whatever the order
    assert owner["gate"] != owner["up"]  # the two largest go to different ranks
    assert imbalance(costs, owner, 2) < 1.1
    # one rank: everything on rank 0; a single layer per group alternates ranks over the run
    assert set(assign(costs, 1).values()) == {0}
    run = [0.0, 0.0]
    owners = [assign({"down": 1.0}, 2, run)["down"] for _ in range(4)]
    assert owners == [0, 1, 0, 1] and run == [2.0, 2.0]
    with pytest.raises(ValueError, match="world size"):
        assign(costs, 0)


def test_shard_batches_splits_rows_contiguously():
    rows = torch.arange(10 * 3).reshape(10, 3)
    batches = list(rows.split(4))  # 4, 4, 2
    parts = [shard_batches(batches, r, 3) for r in range(3)]
    assert torch.equal(torch.cat([torch.cat(p) for p in parts]), rows)  # every window exactly once, in order
    assert [sum(len(b) for b in p) for p in parts] == [4, 3, 3]
    assert all(len(b) <= 4 for p in parts for b in p)
    with pytest.raises(ValueError, match="2 calibration samples for 3 ranks"):
        shard_batches([rows[:2]], 0, 3)


@pytest.mark.parametrize("method", ["gptq", "spqr"])
def test_layers_travel_bit_for_bit(method):
    """What an owner sends (the stored tensors + a JSON description) rebuilds the same layer."""
    import hfcompress

    model = llama_gqa(seed=4)
    cfg = (hfcompress.GPTQConfig(bits=3, group_size=32) if method == "gptq"
           else hfcompress.SpQRConfig(bits=3, group_size=16, outlier_threshold=0.5))
    hfcompress.quantize_(model, cfg, batches=worker.batches(4, 2))
    layer = model.model.layers[1].mlp.down_proj
    header, payload = _encode({"x": layer_item(layer)})
    back = rebuild_layer(_decode(json.loads(header), payload)["x"], "cpu")
    assert type(back) is type(layer) and back.spec == layer.spec
    sd, sd2 = layer.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert b"pickle" not in header and header.startswith(b"{")


def test_no_process_group_means_single_process():
    assert current() is None


# ---- two gloo ranks ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist-equal")
    results = launch([os.path.join(HERE, "distributed_worker.py"), "equal", str(out)])
    for rank, rc, err in results:
        assert rc == 0, f"rank {rank} failed:\n{err[-3000:]}"
    return out


def _load(out, rank, name):
    return load_file(str(out / f"rank{rank}-{name}.safetensors"))


def _assert_equal(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), what
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{what}: {bad[:5]} differ"


@pytest.mark.parametrize("name, single", [
    ("gptq-1batch", lambda: worker.tensors(worker.gptq_model(4, 2))),
    ("spqr", lambda: worker.tensors(worker.spqr_model())),
    ("eora", lambda: worker.tensors(worker.eora_adapter())),
])
def test_two_ranks_equal_single_process_bit_for_bit(two_ranks, name, single):
    """One calibration batch per rank: the reduced X^T X is the single process's sum of the same two
    batch products (one addition either way), so every stored tensor must be identical, on both ranks."""
    ref = single()
    _assert_equal(_load(two_ranks, 0, name), ref, f"{name}: rank 0 vs single process")
    _assert_equal(_load(two_ranks, 1, name), ref, f"{name}: rank 1 vs single process")


def test_two_ranks_gptq_two_batches_same_up_to_reduction_order(two_ranks):
    """Two batches per rank: the sums are added in another order, so a code may flip where a value sits
    on a rounding tie, and GPTQ's error feedback carries a flip along its row and into later layers
    (here about 9% of the codes: benchmarks/README.md). Both ranks hold the same model, and it is as
    good as the single process's."""
    from hfcompress.formats.int_group.pack import unpack_codes

    ids = worker.batches(4, 4)[0]
    with torch.no_grad():
        float_logits = llama_gqa()(ids).logits
    single = worker.gptq_model(8, 2)
    dist = _load(two_ranks, 0, "gptq-2batches")
    _assert_equal(_load(two_ranks, 1, "gptq-2batches"), dist, "rank 1 vs rank 0")
    sd = worker.tensors(single)
    flipped = total = 0
    for name, layer in single.named_modules():
        if hasattr(layer, "stored_tensors"):
            a = unpack_codes(sd[f"{name}.weight"], layer.spec.bits, layer.in_features)
            b = unpack_codes(dist[f"{name}.weight"], layer.spec.bits, layer.in_features)
            flipped += int((a != b).sum())
            total += a.numel()
            if name == "model.layers.0.self_attn.q_proj":  # first group: same inputs, X^T X differs by rounding
                assert (a != b).float().mean() < 0.01
    print(f"\ncodes differing from the single process (2 batches per rank): {flipped / total:.4%} of {total}")
    with torch.no_grad():
        single_err = (single(ids).logits - float_logits).pow(2).mean()
        single.load_state_dict(dist)
        dist_err = (single(ids).logits - float_logits).pow(2).mean()
    assert 0.8 < float(dist_err / single_err) < 1.25  # an equally good solution
    assert flipped / total < 0.5


def test_ranks_with_different_jobs_are_refused_on_every_rank(two_ranks):
    errors = [json.loads((two_ranks / f"rank{r}-mismatch.json").read_text())["error"] for r in (0, 1)]
    assert "rank 1 has another model, config or calibration data than rank 0" in errors[1]
    assert '"group_size": 16' in errors[1]
    assert errors[0].startswith("DistributedError") and "rank 1 of 2 failed" in errors[0]


def _fault_run(tmp_path, kind: str, timeout_s: str = "60"):
    src = tmp_path / "float"
    llama_gqa().save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    out = tmp_path / "out"
    out.mkdir()
    results = launch([os.path.join(HERE, "distributed_worker.py"), kind, str(out), str(src)],
                     env={"HFCOMPRESS_DIST_TIMEOUT": timeout_s}, wait_for=0 if kind == "hang" else None, timeout=90)
    return out, results


@pytest.mark.parametrize("kind", ["raise", "die"])
def test_a_failing_rank_ends_every_rank_and_writes_nothing(tmp_path, kind):
    out, results = _fault_run(tmp_path, kind)
    assert all(rc != 0 for _, rc, _ in results), results
    report = json.loads((out / "rank0.json").read_text())
    if kind == "raise":
        assert "rank 1 of 2 failed" in report["error"] and "injected fault at model.layers.1." in \
            report["error"]
        assert "injected fault" in json.loads((out / "rank1.json").read_text())["error"]
    else:
        assert results[1][1] == 17 and report["error"]  # rank 0 saw the lost peer
    assert report["seconds"] < 50  # ended by the failure, not by the 60 s timeout
    assert sorted(p.name for p in out.iterdir()) == sorted(f"rank{r}.json" for r in (0, 1) if
                                                           (out / f"rank{r}.json").exists())  # no model, no temp folder


def test_a_hung_rank_times_out_and_writes_nothing(tmp_path):
    out, results = _fault_run(tmp_path, "hang", timeout_s="8")
    (rank, rc, _), = results
    report = json.loads((out / "rank0.json").read_text())
    assert rank == 0 and rc != 0 and report["error"] and report["seconds"] < 40
    assert sorted(p.name for p in out.iterdir()) == ["rank0.json"]


def test_torchrun_cli_stream_equals_single_process(tmp_path):
    """``torchrun -m hfcompress.cli.main quantize --stream``: rank 0 writes one checkpoint, equal
    tensor for tensor to the single-process one (16 windows = one batch of 8 per rank)."""
    src = tmp_path / "float"
    llama_gqa().save_pretrained(src)
    char_tokenizer().save_pretrained(src)
    common = ["quantize", str(src), "--method", "gptq", "--group-size", "32", "--n-samples", "16", "--seq-len", "32",
              "--stream"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "hfcompress.cli.main", *common, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env)
    assert single.returncode == 0, single.stderr[-2000:]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "hfcompress.cli.main", *common, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("saved gptq 4-bit model") == 1 and "2 processes" in run.stdout  # rank 0 alone reports
    a, b = load_file(str(tmp_path / "one" / "model.safetensors")), load_file(str(tmp_path / "two" / "model.safetensors"))
    _assert_equal(b, a, "torchrun stream vs single process")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float", "one", "two"]  # no temp folders left
