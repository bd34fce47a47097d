"""One group of layers of a decoder block, solved by every rank together (called by
:func:`hfcompress.calibration.apply.quantize_blocks_`).

GPTQ (a group of layers reading one input: q/k/v, o, gate/up, down) is split by output rows, and
no part of it is done twice where it can be shared:

- ``X^T X`` is summed over the ranks (float64: exact, so every rank's ``H`` is the single process's; only
  the blocks on and above its diagonal travel);
- GPTQ's factor ``U = R^-1`` (``H = R R^T``, :func:`~hfcompress.algorithms.gptq.inverse_hessian_cholesky`)
  is solved in fixed column chunks, independent solves: for a wide ``H`` (:data:`FACTOR_SHARE_MIN_K`)
  each rank solves its share of the chunks and the shares are gathered (each chunk is the single
  process's own call: the same ``U`` bit for bit), then only the one Cholesky factorization of ``H``
  is done by every rank; a narrow one every rank solves whole (the gather would cost more);
- each rank runs GPTQ's column loop on its contiguous share of the stacked rows, then packs its
  rows (4-bit codes in int32 words, fp16 scales) and dequantizes them (the float weight the block
  computes with); the packed rows and the dequantized rows are exchanged: nobody packs or
  dequantizes a row twice, and the codes travel packed;
- every rank assembles the same QuantLinears (those of one process) and loads the same float weights.

Other methods (SpQR, a caller's own ``quantize_group``...): whole layers are given to ranks by
cost (:func:`~hfcompress.distributed.plan.assign`); an owner alone solves, the layers travel as
their stored tensors.
"""

from __future__ import annotations

import torch

from ..modules import is_conv1d, linear_weight
from .plan import assign, gptq_cost

#: GPTQ factors ``U = R^-1 [K, K]`` of at least this width have their column chunks shared out over
#: the ranks (:func:`split_inverse`); narrower ones are solved whole by every rank, as a single process
#: does (the same ``U`` either way). Sharing saves ``(1 - 1/P)`` of the chunks' ``K^3 / 3`` and costs a
#: gather of ``~2 K^2`` bytes and one more point where the ranks wait for each other: on SmolLM2
#: (K = 576 and 1536; gloo, one CPU thread per rank) the ranks finished 0.5-2.0 s sooner without it
#: (27.3 / 27.1 s vs 29.3 / 27.6 s, 64x256, benchmarks/README.md); at 2048 the chunks cost ~2.4x
#: those of 1536 for ~1.8x the bytes
FACTOR_SHARE_MIN_K = 2048


def solve_group(dist, step, config, stats: dict, units: list[list[str]], run_load: list[float]) -> dict:
    """``{block-relative name: compressed layer}`` of ``units`` (lists of layers reading one input),
    the same on every rank; the float layers of ``step`` hold the dequantized weights on return."""
    if len(units) == 1 and _rows_split(config, step, units[0]):
        return _solve_rows(dist, step, config, stats[units[0][0]], units[0], run_load)
    return _solve_owners(dist, step, config, stats, units, run_load)


def _rows_split(config, step, names: list[str]) -> bool:
    """Layers solved by GPTQConfig's own ``quantize_group`` (not one a caller put in its place) with
    one spec: their stacked rows may be split over ranks."""
    from ..calibration.apply import _same_spec
    from ..config import GPTQConfig

    return (getattr(config.quantize_group, "__func__", None) is GPTQConfig.quantize_group
            and len(_same_spec(config, step.name, names)) == 1)


def reduce_stats_(dist, stats, owners: list[int]) -> None:
    """Sum an :class:`~hfcompress.calibration.InputStats`' ``X^T X`` over the ranks into ``owners``,
    sending only the blocks on and above its diagonal (the others mirror them)."""
    flat = stats.upper()
    dist.reduce_(flat, owners, "xtx")
    if dist.rank in owners:
        stats.load_upper_(flat)


def inverse_shares(k: int, world: int) -> list[list[tuple[int, int]]]:
    """The column chunks of ``R^-1 [k, k]`` (:func:`~hfcompress.algorithms.gptq.inverse_chunks`) each
    rank solves, balanced by cost (chunk ``a:b`` costs ``b^2 (b - a)``) with greedy LPT as
    :func:`~hfcompress.distributed.plan.assign`: every rank gets large and small chunks alike, so
    the per-chunk overheads (a call and its copies each) are shared out too, not just the flops
    (shares of contiguous chunks left the rank with the many small ones ~10% slower). Each share
    is in chunk order."""
    from ..algorithms.gptq import inverse_chunks

    chunks = inverse_chunks(k)
    owner = assign({c: float(c[1]) * c[1] * (c[1] - c[0]) for c in chunks}, world)
    return [[c for c in chunks if owner[c] == r] for r in range(world)]


def split_inverse(dist, where: str):
    """``solve_inverse`` for :func:`~hfcompress.algorithms.gptq.inverse_hessian_cholesky`: this rank
    solves its chunks of ``R^-1``'s columns (:func:`inverse_shares`), and the chunks (their nonzero
    rows only: the upper triangle) are gathered on every rank. Each chunk is the very call a single
    process makes: the assembled ``U`` is bit for bit its ``U``."""
    from ..algorithms.gptq import inverse_columns, upper_inverse

    def solve(L: torch.Tensor) -> torch.Tensor:  # H's reversed Cholesky factor: R = J L J
        shares = inverse_shares(L.shape[0], dist.world)
        mine = [inverse_columns(L, a, b).reshape(1, -1) for a, b in shares[dist.rank]]  # [1, b (b - a)] each
        part = torch.cat(mine, dim=1) if mine else L.new_zeros(1, 0)
        dist.check(None, where)  # a rank that failed before this point ends every rank here, not in the gather
        flat = dist.gather_columns(part, [sum(b * (b - a) for a, b in s) for s in shares], "factor")[0]
        chunks, at = {}, 0
        for a, b in (c for s in shares for c in s):
            chunks[(a, b)] = flat[at:at + b * (b - a)].view(b, b - a)
            at += b * (b - a)
        return upper_inverse(L, chunks)
    return solve


def _solve_rows(dist, step, config, stats, names: list[str], run_load: list[float]) -> dict:
    from ..calibration.apply import gptq_rows, guarded
    from ..formats.int_group import QuantLinear
    from ..formats.int_group.pack import pack_zero

    modules = {n: step.module(n) for n in names}
    weights = {n: linear_weight(m) for n, m in modules.items()}  # [N_i, K]
    n_rows = sum(w.shape[0] for w in weights.values())
    k = next(iter(weights.values())).shape[1]
    spec = config.spec_for(f"{step.name}.{names[0]}")
    reduce_stats_(dist, stats, list(range(dist.world)))
    stats.n_tokens = dist.all_sum([stats.n_tokens])[0]
    bounds = [(int(p[0]), int(p[-1]) + 1) if p.numel() else (0, 0)
              for p in torch.arange(n_rows).tensor_split(dist.world)]
    a, b = bounds[dist.rank]
    where = f"{step.name}.{'/'.join(names)}"
    for r in range(dist.world):  # the load each rank takes
        run_load[r] += gptq_cost(n_rows / dist.world, k)

    def solve():
        H = stats.hessian()
        stats.release_()
        if b == a:
            return {}
        full = {f"{step.name}.{n}": m for n, m in modules.items()}
        share = k >= FACTOR_SHARE_MIN_K
        res = gptq_rows(full, H, config, where, slice(a, b), solve_inverse=split_inverse(dist, where) if share else None)
        mine, row = {}, 0
        for n, w in weights.items():  # this rank's rows of each layer: packed, and dequantized
            lo, hi = max(a, row), min(b, row + w.shape[0])
            if lo < hi:
                sl = slice(lo - a, hi - a)
                zero = None if "zero" not in res else res["zero"][sl]
                part = QuantLinear.from_codes(res["codes"][sl], res["scale"][sl], zero, res.get("g_idx"), spec,
                                              compute_dtype=w.dtype)
                stored = part.stored_tensors()
                tensors = {"weight": stored["weight"], "weight_scale": stored["weight_scale"],
                           "float": part.dequantize(w.dtype)}
                if zero is not None:
                    tensors["zero"] = zero  # unpacked ([rows, G]): the stored integer zeros pack along rows
                if "weight_g_idx" in stored and a == 0 and lo == 0:  # one g_idx for every layer (from H)
                    mine["g_idx"] = {"meta": None, "tensors": {"weight_g_idx": stored["weight_g_idx"]}}
                mine[f"{n}@{lo - row}"] = {"meta": None, "tensors": tensors}
            row += w.shape[0]
        return mine

    mine = guarded(dist, solve, f"{step.name}: solving")
    got = dist.exchange(mine, "rows")
    out = {}
    for n, w in weights.items():
        parts = sorted(((int(key.rpartition("@")[2]), item["tensors"]) for key, item in got.items()
                        if key.rpartition("@")[0] == n), key=lambda p: p[0])
        cat = {t: torch.cat([p[t] for _, p in parts]) for t in parts[0][1]}
        stored = {"weight": cat["weight"], "weight_scale": cat["weight_scale"]}
        if "zero" in cat:
            stored["weight_zero"] = pack_zero(cat["zero"], spec)
        if "g_idx" in got:
            stored["weight_g_idx"] = got["g_idx"]["tensors"]["weight_g_idx"].clone()  # one tensor per layer
        m = modules[n]
        layer = QuantLinear(k, w.shape[0], m.bias is not None, spec, w.dtype, device=w.device)
        layer.load_packed(**{t: v.to(w.device) for t, v in stored.items()})
        if m.bias is not None:
            layer.bias.data.copy_(m.bias.detach().to(w.dtype))
        dense = cat["float"].to(m.weight.device)
        m.weight.data.copy_(dense.t() if is_conv1d(m) else dense)
        out[n] = layer
    return out


def _solve_owners(dist, step, config, stats: dict, units: list[list[str]], run_load: list[float]) -> dict:
    """Whole layers to ranks by cost: ``X^T X`` summed into each layer's owner, owners solve (layers
    of one input on one rank stacked, as a single process does), results exchanged."""
    from ..calibration.apply import _load_dequantized_, _quantize_names, guarded
    from .layers import layer_item, rebuild_layer

    shapes = {n: tuple(linear_weight(step.module(n)).shape) for u in units for n in u}  # [N, K]
    cost = getattr(config, "solve_cost", gptq_cost)
    owner = assign({n: cost(*shapes[n]) for n in shapes}, dist.world, run_load)
    totals = dist.all_sum([stats[u[0]].n_tokens for u in units])
    for u, n_tokens in zip(units, totals):
        s = stats[u[0]]  # shared by every layer of the unit
        owners = sorted({owner[n] for n in u})
        reduce_stats_(dist, s, owners)
        s.n_tokens = n_tokens
        if dist.rank not in owners:
            s.release_()  # this rank's partial sum has been sent: free it now

    def solve():
        mine = {}
        for u in units:
            names = [n for n in u if owner[n] == dist.rank]
            if names:
                mine.update(_quantize_names(config, step, names, stats[u[0]].hessian()))
        return mine

    mine = guarded(dist, solve, f"{step.name}: solving")
    got = dist.exchange({n: layer_item(q) for n, q in mine.items()}, "layers")
    out = {n: mine[n] if n in mine else rebuild_layer(got[n], linear_weight(step.module(n)).device)
           for u in units for n in u}
    for n, q in out.items():
        _load_dequantized_(step.module(n), q)
    return out
