"""Calibration engine: text -> batches; block-by-block runner on Llama-GQA, Qwen2 and GPT-2."""

import pytest
import torch
import tiny_models as tm

from hfcompress.calibration import (
    EVAL_DOMAINS,
    bundled_text,
    eval_texts,
    find_blocks,
    get_calibration_batches,
    iterate_blocks,
    load_texts,
)

ARCHS = ["llama", "qwen2", "gpt2"]


def test_calibration_batches_shapes_deterministic_and_from_text():
    tok = tm.char_tokenizer()
    b1 = get_calibration_batches(tok, n_samples=10, seq_len=33, batch_size=4)
    b2 = get_calibration_batches(tok, n_samples=10, seq_len=33, batch_size=4)
    assert [tuple(b.shape) for b in b1] == [(4, 33), (4, 33), (2, 33)]
    assert all(torch.equal(x, y) for x, y in zip(b1, b2))
    # the windows are real text of the bundled calibration file, spread over it
    first = tok.decode(b1[0][0]).replace(" ", "")
    assert first in bundled_text("calibration").replace(" ", "")
    assert not torch.equal(b1[0][0], b1[0][1])


def test_calibration_sources_list_file_and_dataset_like(tmp_path):
    tok = tm.char_tokenizer()
    text = "To be, or not to be, that is the question. " * 20
    p = tmp_path / "c.txt"
    p.write_text(text)
    from_list = get_calibration_batches(tok, [text], n_samples=3, seq_len=40)
    from_file = get_calibration_batches(tok, str(p), n_samples=3, seq_len=40)

    class Columns(dict):  # what a datasets.Dataset offers
        column_names = ["text"]

    from_ds = get_calibration_batches(tok, Columns(text=[text]), n_samples=3, seq_len=40)
    assert torch.equal(from_list[0], from_file[0]) and torch.equal(from_list[0], from_ds[0])
    assert load_texts("eval_technical")[0].startswith("This document was originally created")


def test_eval_domains_are_distinct_and_never_in_the_default_calibration():
    texts = eval_texts()
    assert list(texts) == list(EVAL_DOMAINS) and len(texts) >= 4
    calib = load_texts(None)
    calib_lines = {ln.strip() for t in calib for ln in t.splitlines() if len(ln.strip()) > 40}
    for domain, text in texts.items():
        assert len(text) > 20_000, domain  # room for the benchmarks' 2048 tokens
        lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) > 40]
        shared = sum(ln in calib_lines for ln in lines)
        assert shared <= len(lines) // 100, (domain, shared)  # no evaluation text is calibrated on
    assert texts["code"].startswith("from types import") and "\n    def " in texts["code"]
    assert texts["dialogue"].startswith("A: ") and "\nB: " in texts["dialogue"]


@pytest.mark.parametrize("bad, err", [
    ("/no/such/file.txt", FileNotFoundError), ([1, 2], TypeError), ([], ValueError)])
def test_calibration_bad_sources_name_the_problem(bad, err):
    with pytest.raises(err, match="calibration dataset"):
        get_calibration_batches(tm.char_tokenizer(), bad, n_samples=2, seq_len=8)


def test_calibration_too_little_text():
    with pytest.raises(ValueError, match="fewer than seq_len"):
        get_calibration_batches(tm.char_tokenizer(), ["short"], n_samples=2, seq_len=64)


@pytest.mark.parametrize("arch", ARCHS)
def test_calibration_runner_reproduces_hidden_states(arch):
    """Unchanged blocks: every block's captured inputs equal the model's own hidden states."""
    model = tm.BUILDERS[arch]()
    ids = tm.inputs(3, 19)
    with torch.no_grad():
        ref = model(input_ids=ids, output_hidden_states=True).hidden_states
    seen = []
    for step in iterate_blocks(model, [ids[:2], ids[2:]]):
        torch.testing.assert_close(torch.cat(step.inputs), ref[step.index], rtol=0, atol=1e-6)
        seen.append(step.name)
    prefix, blocks = find_blocks(model)
    assert seen == [f"{prefix}.{i}" for i in range(len(blocks))]


@pytest.mark.parametrize("arch", ARCHS)
def test_calibration_groups_and_input_stats(arch):
    model = tm.BUILDERS[arch]()
    ids = tm.inputs(2, 11)
    step = next(iterate_blocks(model, [ids]))
    groups = step.sequential_groups()
    assert sorted(n for g in groups for n in g) == sorted(step.linear_names)
    if arch != "gpt2":
        assert groups[0] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
        assert ["mlp.gate_proj", "mlp.up_proj"] in groups and groups[-1] == ["mlp.down_proj"]
    # X^T X of q_proj / c_attn input equals the layer-normed block input, computed by hand
    first = groups[0][0]
    stats = step.collect_input_stats([first])[first]
    norm = step.block.input_layernorm if arch != "gpt2" else step.block.ln_1
    x = norm(step.inputs[0]).reshape(-1, stats.xtx.shape[0]).float()
    assert stats.n_tokens == 22
    assert stats.xtx.dtype == torch.float64  # fp32 batch products summed exactly (order-independent)
    torch.testing.assert_close(stats.xtx.float(), x.t() @ x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.hessian(), 2 * x.t() @ x / 22, rtol=1e-5, atol=1e-5)
    # layers reading the same tensor share one InputStats; step.run(hooks) sees the same inputs
    shared = step.collect_input_stats(groups[0])
    assert all(shared[n] is shared[groups[0][0]] for n in groups[0])
    got = []
    outs = step.run({first: lambda m, x, y: got.append(x.reshape(-1, x.shape[-1]).float())})
    torch.testing.assert_close(torch.cat(got), x, rtol=1e-6, atol=1e-6)
    assert len(outs) == 1 and outs[0].shape == step.inputs[0].shape


def test_calibration_feeds_changed_block_forward():
    """True-sequential: block 1 sees the outputs of the *changed* block 0."""
    model = tm.llama_gqa()
    ids = tm.inputs(2, 9)
    with torch.no_grad():
        before = model(input_ids=ids, output_hidden_states=True).hidden_states
    block1_inputs = None
    for step in iterate_blocks(model, [ids]):
        if step.index == 0:
            step.module("mlp.down_proj").weight.data.mul_(0.5)
        else:
            block1_inputs = step.inputs[0]
    with torch.no_grad():
        after = model(input_ids=ids, output_hidden_states=True).hidden_states
    assert (block1_inputs - before[1]).abs().max() > 1e-4
    torch.testing.assert_close(block1_inputs, after[1], rtol=0, atol=1e-6)


def test_calibration_skip_and_missing_blocks():
    model = tm.llama_gqa()
    step = next(iterate_blocks(model, [tm.inputs(1, 5)], skip=["mlp.down_proj"]))
    assert "mlp.down_proj" not in step.linear_names and "mlp.up_proj" in step.linear_names
    with pytest.raises(ValueError, match="no list of decoder blocks"):
        find_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_calibration_input_stats_half_filled_sum_is_full_xtx_and_merges():
    """X^T X accumulated on and above the diagonal blocks (K wider than one block, ragged last
    block) equals the full product; merge_ of two halves of the tokens equals one pass over all."""
    from hfcompress.calibration import InputStats

    g = torch.Generator().manual_seed(0)
    k = 2 * InputStats.BLOCK + 37
    x = torch.randn(3, 50, k, generator=g)
    a = InputStats.zeros(k)
    for chunk in x:
        a.add_(chunk)
    flat = x.reshape(-1, k).double()
    ref = flat.t() @ flat
    torch.testing.assert_close(a.xtx, ref, rtol=1e-5, atol=1e-3)
    assert torch.equal(a.xtx, a.xtx.t()) and a.n_tokens == 150
    a.add_(x[0])  # reading in between and adding more keeps the sum right
    torch.testing.assert_close(a.xtx, ref + (x[0].double().t() @ x[0].double()), rtol=1e-5, atol=1e-3)
    b, c = InputStats.zeros(k), InputStats.zeros(k)
    b.add_(x[:2])
    c.add_(x[2:])
    torch.testing.assert_close(b.merge_(c).xtx, ref, rtol=1e-5, atol=1e-3)
    assert b.n_tokens == 150
    H = b.hessian()
    assert H.dtype == torch.float32
    torch.testing.assert_close(H, (2 * ref / 150).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [40, 256, 2 * 256 + 37, 1536])
def test_calibration_hessian_of_the_half_filled_sum_is_the_mirrored_sum_scaled_bit_for_bit(k):
    """hessian() scales only the blocks add_ fills and mirrors them in fp32: every entry is the one
    of the readable formula (the float64 sum mirrored, times 2 / n, rounded to fp32), and the
    stats are left as they were (still half-filled: a later add_ or a reduction sends the same)."""
    from hfcompress.calibration import InputStats

    g = torch.Generator().manual_seed(k)
    stats = InputStats.zeros(k)
    for _ in range(3):
        stats.add_(torch.randn(37, k, generator=g) * torch.rand(k, generator=g) * 3)  # uneven channel scales
    half = stats._half
    before = stats.upper().clone()
    H = stats.hessian()
    assert stats._half == half and torch.equal(stats.upper(), before)
    ref = torch.mul(stats.xtx, 2.0 / 111, out=torch.empty(k, k))  # mirrored float64 sum, scaled, fp32
    assert H.dtype == torch.float32 and torch.equal(H, ref)
    assert half == (k > InputStats.BLOCK) and (not half or torch.equal(H, H.t()))


def test_calibration_input_stats_bf16_inputs_exact_products_fp32_inputs_full_precision():
    """bf16 activations go through the bf16 product path (their values are exact in bf16): the sum
    is as close to the float64 product as the fp32 path's; fp32 activations are not rounded to bf16
    on the way (an error of ~1e-3 relative if they were); the process-wide matmul setting is the
    same after add_ as before, also when the product raises."""
    from hfcompress.calibration import InputStats

    g = torch.Generator().manual_seed(3)
    k = 2 * InputStats.BLOCK + 37
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    for dtype in (torch.bfloat16, torch.float32):
        x = (torch.randn(2, 300, k, generator=g) * (1 + torch.rand(k, generator=g) * 4)).to(dtype)
        s = InputStats.zeros(k)
        s.add_(x)
        flat = x.reshape(-1, k).double()
        ref = flat.t() @ flat
        err = ((s.xtx - ref).abs() / ref.abs().amax()).amax().item()
        assert err < 2e-6, (dtype, err)
        assert matmul.fp32_precision == before
    s = InputStats.zeros(4)
    with pytest.raises(RuntimeError):
        s.add_(torch.ones(3, 5, dtype=torch.bfloat16))  # K = 5 does not fit the [4, 4] sum
    assert matmul.fp32_precision == before


@pytest.mark.parametrize("k", [2 * 256 + 37, 100])
def test_calibration_input_stats_upper_blocks_sum_to_the_merged_stats(k):
    """What a distributed run reduces: the blocks on and above the diagonal (fewer than K^2 entries
    when K is wider than a block; the whole matrix, as a view, otherwise), summed over two runs and
    loaded back, give bit for bit the merged sums."""
    from hfcompress.calibration import InputStats

    g = torch.Generator().manual_seed(k)
    xa, xb = torch.randn(3, 40, k, generator=g), torch.randn(2, 40, k, generator=g)
    a, b, ref = InputStats.zeros(k), InputStats.zeros(k), InputStats.zeros(k)
    a.add_(xa)
    b.add_(xb)
    ref.add_(xa)
    ref.merge_(InputStats(b.xtx.clone(), b.n_tokens))
    b.add_(torch.zeros(0, k))  # filled again on and above the diagonal only (reading xtx mirrored it)
    flat = a.upper()
    if k > InputStats.BLOCK:
        assert flat.numel() < 0.75 * k * k
    else:
        assert flat.numel() == k * k and flat.data_ptr() == a.xtx.data_ptr()
    a.load_upper_(flat + b.upper())
    assert torch.equal(a.xtx, ref.xtx) and torch.equal(a.xtx, a.xtx.t())


def test_calibration_input_stats_sum_does_not_depend_on_grouping():
    """The sum over batches is the same bit for bit however the batches are grouped and merged
    (one process adding 6 batches in turn, or 2 / 3 ranks each summing a contiguous run and then
    merged as a reduce does): each batch's fp32 product is added exactly in float64. An fp32 running
    sum does depend on the grouping (that is what flipped GPTQ codes between 1 and 2 processes)."""
    from hfcompress.calibration import InputStats

    g = torch.Generator().manual_seed(1)
    k = InputStats.BLOCK + 61
    batches = [torch.randn(40, k, generator=g) * torch.rand(k, generator=g) * 5 for _ in range(6)]

    def summed(parts):
        stats = []
        for part in parts:
            s = InputStats.zeros(k)
            for x in part:
                s.add_(x)
            stats.append(s)
        total = stats[0]
        for s in stats[1:]:
            total.merge_(s)
        return total.xtx

    one = summed([batches])
    assert torch.equal(one, summed([batches[:3], batches[3:]]))
    assert torch.equal(one, summed([batches[:2], batches[2:4], batches[4:]]))
    assert torch.equal(one, summed([batches[:4], batches[4:]]))
    run = torch.zeros(k, k)
    for x in batches:
        run += x.t() @ x
    halves = (sum((x.t() @ x for x in batches[:3]), torch.zeros(k, k))
              + sum((x.t() @ x for x in batches[3:]), torch.zeros(k, k)))
    assert not torch.equal(run, halves)  # the fp32 way: the grouping shows


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_calibration_replay_of_final_children_is_exact(arch):
    """Once a child's linear layers are marked final (e.g. the whole attention), later passes
    replay its recorded output instead of recomputing it: the stats and block outputs are the
    same as without replay, bit for bit, the child runs fewer times, and hooked layers still run."""
    ids = tm.inputs(3, 13)

    def walk(mark: bool):
        model = tm.BUILDERS[arch]()
        attn_name = "self_attn" if arch != "gpt2" else "attn"
        calls = [0]
        stats_seen, outs = [], []
        for step in iterate_blocks(model, [ids[:2], ids[2:]]):
            if step.index == 0:  # count the attention's real runs by its first linear layer
                attn = step.block.get_submodule(attn_name + (".q_proj" if arch != "gpt2" else ".c_attn"))
                attn.register_forward_hook(lambda m, a, o: calls.__setitem__(0, calls[0] + 1))
            for group in step.sequential_groups():
                stats = step.collect_input_stats(group)
                stats_seen.append(stats[group[0]].xtx.clone())
                for name in group:  # "quantize": change the layer, then promise it is final
                    step.module(name).weight.data.mul_(0.9)
                if mark:
                    step.mark_final(group)
            if step.index == 0:
                hooked = [attn_name + (".o_proj" if arch != "gpt2" else ".c_proj")]
                got = []
                outs = step.run({hooked[0]: lambda m, x, y: got.append(y)})
                assert len(got) == 2  # a hooked layer is never skipped
                outs.append(step.run())
        with torch.no_grad():
            logits = model(ids).logits
        return stats_seen, outs, calls[0], logits

    s0, o0, calls0, l0 = walk(False)
    s1, o1, calls1, l1 = walk(True)
    assert all(torch.equal(a, b) for a, b in zip(s0, s1)) and len(s0) == len(s1)
    assert all(torch.equal(a, b) for a, b in zip(o0[:-1], o1[:-1]))
    assert all(torch.equal(a, b) for a, b in zip(o0[-1], o1[-1]))
    assert torch.equal(l0, l1)
    assert calls1 < calls0, (calls0, calls1)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_calibration_runs_each_layer_once_per_batch_and_matches_full_passes(arch, monkeypatch):
    """GPTQ over the blocks, true-sequential: with the engine's shortcuts (a group reading one
    tensor stops before its first layer runs; a child returning its last linear layer's output is
    replayed from that layer's kept input; final children replayed) every linear layer runs once
    per calibration batch (plus the one-row probe), and the quantized model is bit-identical to
    one calibrated with full forwards and no replay at all."""
    import hfcompress
    from hfcompress.calibration import BlockStep
    from hfcompress.calibration.apply import quantize_blocks_
    from hfcompress.modules import is_linear

    ids = tm.inputs(6, 19)
    batches = [ids[:2], ids[2:4], ids[4:]]
    cfg = hfcompress.GPTQConfig(bits=4, group_size=32)

    def quantized(counts=None):
        model = tm.BUILDERS[arch]().to(torch.bfloat16)
        if counts is not None:  # real runs of block 0's linear layers
            prefix, _ = find_blocks(model)
            for name, m in model.named_modules():
                if is_linear(m) and name.startswith(f"{prefix}.0."):
                    m.register_forward_hook(lambda mod, a, o, n=name: counts.__setitem__(n, counts.get(n, 0) + 1))
        quantize_blocks_(model, cfg, batches)
        with torch.no_grad():
            return model.state_dict(), model(ids).logits

    counts: dict[str, int] = {}
    fast, fast_logits = quantized(counts)
    with monkeypatch.context() as m:
        full = BlockStep.collect_input_stats
        m.setattr(BlockStep, "mark_final", lambda self, names: None)  # nothing final: nothing replayed
        m.setattr(BlockStep, "collect_input_stats", lambda self, names=None, stop_early=True: full(self, names, False))
        slow, slow_logits = quantized()
    assert fast.keys() == slow.keys() and all(torch.equal(fast[k], slow[k]) for k in fast)
    assert torch.equal(fast_logits, slow_logits)
    probes = 1  # the block's one-row probe forward (sequential_groups' and tail_layers' together)
    assert counts and all(c == len(batches) + probes for c in counts.values()), counts


@pytest.mark.parametrize("room", ["o_and_down", "o_only", "floor"])
def test_calibration_kept_tail_inputs_are_bounded_by_the_model_or_the_block_inputs(room, monkeypatch):
    """The inputs kept for replaying a child's last layer (o_proj's: the attention is not recomputed;
    down_proj's: the MLP is not) may take at most ``max(TAIL_BUDGET x the model's weight bytes, the
    block inputs' bytes)``. When o_proj's fit, q/k/v run once per batch; when down_proj's fit too,
    gate/up do; otherwise those are recomputed. The floor (the block inputs) keeps o_proj's inputs
    however small the model-relative budget is. The quantized model is the same in every case. The
    batches have unequal sizes (the budget check counts the rows of every batch)."""
    import hfcompress
    from hfcompress.calibration import BlockStep
    from hfcompress.calibration.apply import quantize_blocks_

    ids = tm.inputs(6, 19)
    batches = [ids[:3], ids[3:5], ids[5:]]
    probe = tm.llama_gqa().to(torch.bfloat16)
    model_bytes = sum(p.numel() * p.element_size() for p in probe.parameters())
    down_in = ids.numel() * probe.config.intermediate_size * 2  # bf16 inputs of down_proj, every batch
    o_in = ids.numel() * probe.config.hidden_size * 2  # = the block inputs' bytes (hidden_size wide)
    # room for o_proj's and down_proj's inputs (o_proj's are released batch by batch as the attention's
    # outputs are recorded, before down_proj's are kept), for o_proj's but not down_proj's, or nothing
    # but the floor (exactly o_proj's inputs)
    budget = {"o_and_down": 1.1 * down_in, "o_only": 0.9 * down_in, "floor": 1.0}[room]
    assert o_in < 0.9 * down_in
    monkeypatch.setattr(BlockStep, "TAIL_BUDGET", budget / model_bytes)

    step: list = []
    kept_bytes: list[tuple[int, int]] = []  # (bytes of the kept tail inputs, the step's budget) per stats pass
    collect = BlockStep.collect_input_stats

    live: list[int] = []  # kept o_proj inputs still held when the MLP runs, while they are kept

    def watched(self, names=None, stop_early=True):
        step[:] = [self]
        out = collect(self, names, stop_early)
        held = sum(r[0].numel() * r[0].element_size() for o in self._tail_inputs.values() for r in o if r)
        kept_bytes.append((held, self.tail_budget()))
        return out

    def quantized():
        model = tm.llama_gqa().to(torch.bfloat16)
        counts: dict[str, int] = {}
        for name in ("self_attn.q_proj", "mlp.up_proj", "mlp.down_proj"):  # forward calls per layer
            model.model.layers[0].get_submodule(name).register_forward_hook(
                lambda m, a, o, n=name: counts.__setitem__(n, counts.get(n, 0) + 1))
        model.model.layers[0].mlp.register_forward_pre_hook(
            lambda m, a: live.append(sum(r is not None for r in step[0]._tail_inputs["self_attn.o_proj"]))
            if step and "self_attn.o_proj" in step[0]._tail_inputs else None)
        quantize_blocks_(model, hfcompress.GPTQConfig(bits=4, group_size=32), batches)
        return model.state_dict(), counts

    with monkeypatch.context() as m:
        m.setattr(BlockStep, "collect_input_stats", watched)
        sd, counts = quantized()
    probes = 1  # the block's one-row probe forward
    assert counts["self_attn.q_proj"] == len(batches) + probes  # o_proj's inputs kept in every case
    if room == "o_and_down":
        assert counts["mlp.up_proj"] == len(batches) + probes
    else:
        assert counts["mlp.up_proj"] == 2 * len(batches) + probes  # stats pass, then the block's final run
    assert counts["mlp.down_proj"] == len(batches) + probes  # its stats pass stops before it runs
    # the pass that records the attention's outputs frees each batch's kept o_proj input once its output
    # is recorded: o_proj's kept inputs and the recorded outputs never add up to more than one copy
    assert live == [2, 1, 0]
    expected = max(int(budget), o_in)
    assert kept_bytes and all(b == expected for _, b in kept_bytes)
    assert max(h for h, _ in kept_bytes) == (down_in if room == "o_and_down" else o_in)
    assert all(h <= b for h, b in kept_bytes)

    monkeypatch.setattr(BlockStep, "TAIL_BUDGET", 0.0)  # off: nothing kept, everything recomputed
    ref, counts = quantized()
    assert counts["self_attn.q_proj"] == 2 * len(batches) + probes
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)
