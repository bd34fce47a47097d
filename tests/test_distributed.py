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


def test_shard_batches_hands_out_whole_batches():
    rows = torch.arange(10 * 3).reshape(10, 3)
    batches = list(rows.split(2))  # 5 batches of 2
    parts = [shard_batches(batches, r, 2) for r in range(2)]
    assert [len(p) for p in parts] == [3, 2]
    assert all(b is batches[i] for i, b in enumerate(parts[0] + parts[1]))  # the very batches, in order
    # fewer batches than ranks: the rows of the batch are split, contiguously
    few = [shard_batches([rows], r, 3) for r in range(3)]
    assert torch.equal(torch.cat([torch.cat(p) for p in few]), rows) and [len(p[0]) for p in few] == [4, 3, 3]
    with pytest.raises(ValueError, match="2 calibration samples for 3 ranks"):
        shard_batches([rows[:2]], 0, 3)
    with pytest.raises(ValueError, match="unequal lengths"):
        shard_batches([rows[:2], rows[:3, :2]], 0, 3)


@pytest.mark.parametrize("method", ["gptq", "spqr"])
def test_layers_travel_bit_for_bit(method):
    """What an owner sends (the stored tensors + a JSON description) rebuilds the same layer."""
    import hfcompress

    model = llama_gqa(seed=4)
    cfg = (hfcompress.GPTQConfig(bits=3, group_size=32) if method == "gptq"
           else hfcompress.SpQRConfig(bits=3, group_size=16, outlier_threshold=0.5))
    hfcompress.quantize_(model, cfg, batches=worker.batches(4, 2))
    layer = model.model.layers[1].mlp.down_proj
    header, chunks = _encode({"x": layer_item(layer)})
    back = rebuild_layer(_decode(json.loads(header), torch.cat(chunks))["x"], "cpu")
    assert type(back) is type(layer) and back.spec == layer.spec
    sd, sd2 = layer.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert b"pickle" not in header and header.startswith(b"{")


@pytest.mark.parametrize("act_order, mse_clip, grid", [
    (True, False, "g_idx-int"), (False, False, "g_idx-int"), (True, True, "g_idx-int"), (True, True, "default")])
def test_gptq_rows_of_a_split_are_the_rows_of_the_whole(act_order, mse_clip, grid):
    """What lets a distributed run split a layer's rows over ranks: GPTQ of a row range of the
    stacked weights (gate/up here) equals those rows of GPTQ of the whole, bit for bit."""
    import hfcompress
    from hfcompress.calibration.apply import gptq_rows

    model = llama_gqa(seed=5)
    mlp = model.model.layers[0].mlp
    modules = {"mlp.gate_proj": mlp.gate_proj, "mlp.up_proj": mlp.up_proj}
    g = torch.Generator().manual_seed(7)
    x = torch.randn(300, mlp.gate_proj.in_features, generator=g) * torch.rand(mlp.gate_proj.in_features, generator=g)
    H = 2 * x.t() @ x / 300
    # "g_idx-int": act-order groups stored as g_idx, integer zeros; "default": static groups, float zeros
    options = dict(static_groups=False, zero_point="int") if grid == "g_idx-int" else {}
    cfg = hfcompress.GPTQConfig(bits=4, group_size=32, act_order=act_order, mse_clip=mse_clip, **options)
    stores_g_idx = act_order and grid == "g_idx-int"
    whole = gptq_rows(modules, H, cfg, "block 0")
    n = whole["codes"].shape[0]
    cuts = [0, 37, n // 2 + 5, n]  # ragged, one cut inside a layer, one across the gate/up boundary
    parts = [gptq_rows(modules, H, cfg, "block 0", slice(a, b)) for a, b in zip(cuts, cuts[1:])]
    assert whole.keys() == parts[0].keys() and ("g_idx" in whole) == stores_g_idx
    assert whole["zero"].dtype == (torch.uint8 if grid == "g_idx-int" else torch.float32)
    for key in ("codes", "scale", "zero"):
        assert torch.equal(torch.cat([p[key] for p in parts]), whole[key]), key
    if stores_g_idx:
        assert all(torch.equal(p["g_idx"], whole["g_idx"]) for p in parts)


@pytest.mark.parametrize("model_bytes", [100_000, 1_000])
def test_a_rank_keeps_tail_inputs_exactly_when_one_process_would(model_bytes):
    """A rank holds 1/world of the calibration activations and gets 1/world of the model-relative budget
    for kept tail inputs (the floor, its block inputs, is its own): it keeps a tail layer's inputs when
    one process holding every batch would, never more (SmolLM2 at 128x512 kept down_proj's inputs on the
    ranks, 100 MB each, and not in one process: the ranks' peak RSS was above the single process's)."""
    from hfcompress.calibration import BlockStep

    x = torch.zeros(8, 16, 32, dtype=torch.bfloat16)  # 8 windows of 16 tokens: 8192 bytes of block inputs

    def step(inputs, world):
        return BlockStep(0, "b", torch.nn.Identity(), inputs, [()] * len(inputs), [{}] * len(inputs), [],
                         model_bytes=model_bytes, world=world)

    one = step(list(x.split(2)), 1)
    ranks = [step(list(part.split(2)), 2) for part in x.split(4)]
    if model_bytes == 100_000:  # the model-relative budget: halved
        assert one.tail_budget() == 50_000 and [r.tail_budget() for r in ranks] == [25_000, 25_000]
    else:  # the floor: each process's own block inputs
        assert one.tail_budget() == 8192 and [r.tail_budget() for r in ranks] == [4096, 4096]


@pytest.mark.parametrize("k, world", [(64, 2), (96, 3), (576, 2), (7, 2), (1536, 2), (200, 5)])
def test_inverse_chunks_of_a_split_are_the_factor_of_the_whole(k, world):
    """What lets a distributed run split GPTQ's factorization: the column chunks of ``U = R^-1``
    solved in shares over ranks, side by side, are bit for bit the whole ``U``; every chunk is given
    out once, and the shares' costs are balanced."""
    from hfcompress.algorithms.gptq import inverse_chunks, inverse_columns, inverse_hessian_cholesky, upper_inverse
    from hfcompress.distributed.solve import inverse_shares

    g = torch.Generator().manual_seed(k)
    x = torch.randn(4 * k, k, generator=g) * torch.rand(k, generator=g)
    H = 2 * x.t() @ x / (4 * k)
    shares = inverse_shares(k, world)
    assert sorted(c for s in shares for c in s) == inverse_chunks(k)
    cost = [sum(float(b) * b * (b - a) for a, b in s) for s in shares]
    if k >= 576:
        assert max(cost) * world / sum(cost) < 1.15, cost

    def split(L):  # as the ranks do: each its chunks, then assembled
        return upper_inverse(L, {c: inverse_columns(L, *c).clone() for s in shares for c in s})

    whole = inverse_hessian_cholesky(H, 0.01)
    assert torch.equal(inverse_hessian_cholesky(H, 0.01, solve_inverse=split), whole)
    assert torch.equal(whole, whole.triu()) and bool((whole.diagonal() > 0).all())
    Hd = H.double() + 0.01 * H.diagonal().double().mean() * torch.eye(k, dtype=torch.float64)
    # the upper Cholesky factor of the damped inverse (unique: upper, positive diagonal)
    ref = torch.linalg.cholesky(torch.linalg.inv(Hd), upper=True)
    assert ((whole.double() - ref).norm() / ref.norm()).item() < 1e-5
    assert torch.allclose(whole.double().t() @ whole.double() @ Hd, torch.eye(k, dtype=torch.float64), atol=1e-3)


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
    ("gptq-2batches", lambda: worker.tensors(worker.gptq_model(8, 2))),
    ("gptq-5batches", lambda: worker.tensors(worker.gptq_model(10, 2))),
    ("spqr", lambda: worker.tensors(worker.spqr_model())),
    ("eora", lambda: worker.tensors(worker.eora_adapter())),
])
def test_two_ranks_equal_single_process_bit_for_bit(two_ranks, name, single):
    """Every rank sums X^T X over whole calibration batches, each batch's fp32 product added to a
    float64 sum; the reduced sum is then the single process's sum, whatever the grouping (1 batch per
    rank, 2 per rank, 3 on one rank and 2 on the other). So every stored tensor must be identical, on
    both ranks (with fp32 sums added in another order, 8 windows flipped 9.5% of the codes)."""
    ref = single()
    _assert_equal(_load(two_ranks, 0, name), ref, f"{name}: rank 0 vs single process")
    _assert_equal(_load(two_ranks, 1, name), ref, f"{name}: rank 1 vs single process")


def test_each_rank_solves_half_of_every_inverse_and_sends_packed_codes(two_ranks):
    """No GPTQ factor is solved twice: each rank sends its share of the column chunks of every factor
    ``U = R^-1`` (one per group: q/k/v, o, gate/up, down of each block), their upper triangle only (the
    all_gather pads a share to the largest), never the whole; the codes travel as 4-bit words (int32),
    the scales as fp16, beside the dequantized rows every rank computes with."""
    model = llama_gqa()
    blocks = model.model.layers
    n_weights = sum(m.weight.numel() for m in blocks.modules() if isinstance(m, torch.nn.Linear))
    ks = [b.self_attn.q_proj.in_features for b in blocks] + [b.self_attn.o_proj.in_features for b in blocks] + \
         [b.mlp.gate_proj.in_features for b in blocks] + [b.mlp.down_proj.in_features for b in blocks]
    from hfcompress.distributed.solve import inverse_shares

    # the largest share's nonzero entries (the upper triangle of its columns), fp32
    widest = {k: max(sum(b * (b - a) for a, b in s) for s in inverse_shares(k, 2)) for k in ks}
    assert all(widest[k] < k * (k + 1) / 2 for k in ks if k > 64), widest  # shared out, not solved by one rank
    for rank in (0, 1):
        sent = json.loads((two_ranks / f"rank{rank}-sent-gptq-1batch.json").read_text())
        assert sent["factor"] == sum(widest[k] * 4 for k in ks), sent
        # both ranks' rows (each rank counts what it sends and receives): per weight 4 bits of code and its
        # fp32 dequantized value, plus per group of 32 an fp16 scale and a uint8 zero, plus headers
        assert n_weights * 4.5 < sent["rows"] < n_weights * 4.5 * 1.1, (sent, n_weights)


def test_narrow_factors_are_solved_whole_on_every_rank(two_ranks):
    """Below FACTOR_SHARE_MIN_K (as shipped; the tiny model's widths are 64-256) no rank sends any of
    a factor: each solves it whole, as a single process does, and the checkpoint is the same bit for
    bit (``test_two_ranks_equal_single_process_bit_for_bit[gptq-5batches]``); the X^T X sums and the
    rows travel as when the chunks are shared (same job shape: the same bytes)."""
    from hfcompress.distributed.solve import FACTOR_SHARE_MIN_K

    model = llama_gqa()
    assert max(m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear)) < FACTOR_SHARE_MIN_K
    for rank in (0, 1):
        whole = json.loads((two_ranks / f"rank{rank}-sent-gptq-5batches.json").read_text())
        shared = json.loads((two_ranks / f"rank{rank}-sent-gptq-1batch.json").read_text())
        assert whole.get("factor", 0) == 0 and shared["factor"] > 0, (whole, shared)
        assert whole["xtx"] == shared["xtx"] and whole["rows"] == shared["rows"], (whole, shared)


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
