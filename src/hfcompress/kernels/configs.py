"""Named launch configurations of the int_group kernels, per GPU family, and their pruning.

A configuration is a frozen dataclass (never a positional list). ``kind`` is the path:

- ``gemv`` (M <= 4): CUDA-core GEMV, ``block_n`` rows per program, optional split-K;
- ``splitk`` (M <= 64) and ``gemm``: the tensor-core kernel, ``[block_m, block_n]`` output tiles
  (``splitk`` splits K over a grid axis);
- ``dense`` (M >= 128): dequantize the weight once into the activation dtype, then a dense matmul;
- ``tinygemm``: torch's int4 kernel (4-bit, bf16 only; see tinygemm.py).

The K tile is not a configuration: it is the layout's interleave block (``GpuLayout.ki``), so a
tile never crosses a sub-group. ``candidates(family, m)`` is what the autotuner races on the first
call for a shape; :func:`prune` drops those that cannot fit the problem.
"""

from __future__ import annotations

from dataclasses import dataclass

GEMV_MAX_M = 4
SPLITK_MAX_M = 64
DENSE_MIN_M = 128
KINDS = ("gemv", "splitk", "gemm", "dense", "tinygemm")


@dataclass(frozen=True)
class KernelConfig:
    kind: str
    block_n: int = 0
    block_m: int = 0  # gemv: 0 = set at launch from M (1, 2 or 4)
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"KernelConfig.kind={self.kind!r}; expected one of {KINDS}")
        if self.kind == "tinygemm":
            return
        for name in ("block_n", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"KernelConfig.{name}={v} must be a power of two")
        if self.split_k < 1:
            raise ValueError(f"KernelConfig.split_k={self.split_k} must be >= 1")
        if self.kind in ("splitk", "gemm") and min(self.block_m, self.block_n) < 16:
            raise ValueError(f"KernelConfig: tl.dot needs block_m, block_n >= 16, got {self}")
        if self.kind in ("gemm", "dense") and self.split_k != 1:
            raise ValueError(f"KernelConfig: kind={self.kind!r} does not split K; use kind='splitk'")

    @property
    def name(self) -> str:
        if self.kind == "tinygemm":
            return "tinygemm"
        m = f"m{self.block_m}" if self.block_m else ""
        return f"{self.kind}_{m}n{self.block_n}s{self.split_k}w{self.num_warps}p{self.num_stages}"


def _gemv(block_n, split_k=1, num_warps=4, num_stages=3):
    return KernelConfig("gemv", block_n=block_n, split_k=split_k, num_warps=num_warps, num_stages=num_stages)


def _splitk(block_m, block_n, split_k, num_warps=4, num_stages=3):
    return KernelConfig("splitk", block_m=block_m, block_n=block_n, split_k=split_k, num_warps=num_warps,
                        num_stages=num_stages)


def _gemm(block_m, block_n, num_warps=4, num_stages=3, group_m=8):
    return KernelConfig("gemm", block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages,
                        group_m=group_m)


DENSE = KernelConfig("dense", block_n=32, num_warps=4)
TINYGEMM = KernelConfig("tinygemm")

# Hopper (sm_90: H100, H200; 132 SMs, 227 KB shared memory per block)
_SM90 = {
    "gemv": [_gemv(32), _gemv(64), _gemv(128, num_warps=8), _gemv(32, 2), _gemv(32, 4), _gemv(64, 4),
             _gemv(16, 8, num_warps=2)],
    "splitk": [_splitk(16, 64, 1), _splitk(16, 128, 1), _splitk(16, 64, 2), _splitk(16, 64, 4), _splitk(64, 64, 1)],
    "gemm": [_gemm(64, 128), _gemm(128, 128, num_warps=8), _gemm(128, 64), _gemm(64, 64, num_stages=4)],
    "dense": [DENSE],
}
# Ampere / Ada (sm_80, sm_86, sm_89): fewer SMs, 163 KB shared memory per block on A100 (99 KB on sm_86)
_SM80 = {
    "gemv": [_gemv(32), _gemv(64), _gemv(128, num_warps=8), _gemv(32, 4)],
    "splitk": [_splitk(16, 64, 1), _splitk(16, 64, 4), _splitk(64, 64, 1)],
    "gemm": [_gemm(64, 128, num_stages=2), _gemm(128, 128, num_warps=8, num_stages=2)],
    "dense": [DENSE],
}
CONFIGS = {"sm90": _SM90, "sm80": _SM80, "default": _SM80}

# what the interpreter runs when no config is named: small tiles that are still legal
INTERPRETER_CONFIGS = {
    "gemv": _gemv(64, num_warps=1),
    "splitk": _splitk(16, 16, 2),
    "gemm": _gemm(32, 32),
}


def family(capability: tuple[int, int]) -> str:
    major = capability[0]
    if major >= 9:
        return "sm90"
    if major == 8:
        return "sm80"
    return "default"


def kind_for(m: int) -> str:
    """The path the interpreter (and a forced choice) takes for M rows."""
    return "gemv" if m <= GEMV_MAX_M else "splitk" if m <= SPLITK_MAX_M else "gemm"


def gemv_block_m(m: int) -> int:
    return 1 if m <= 1 else 2 if m <= 2 else 4


def _pow2_at_least(v: int, lo: int) -> int:
    return max(lo, 1 << max(0, (v - 1).bit_length()))


def candidates(fam: str, m: int) -> list[KernelConfig]:
    """Every Triton configuration worth racing at M rows (tinygemm is added by the launcher)."""
    table = CONFIGS[fam]
    if m <= GEMV_MAX_M:
        return list(table["gemv"]) + [c for c in table["splitk"] if c.block_m == 16]
    if m <= SPLITK_MAX_M:
        return list(table["splitk"]) + [c for c in table["gemm"] if c.block_m <= _pow2_at_least(m, 16)]
    out = list(table["gemm"])
    if m >= DENSE_MIN_M:
        out += table["dense"]
    return out


def prune(configs: list[KernelConfig], m: int, n: int, k: int, ki: int, per: int) -> list[KernelConfig]:
    """Drop candidates whose tiles overshoot the problem, leave split-K slices with fewer than two
    K blocks, or (gemv) give some threads no word to load (``ki / per`` words per row per tile)."""
    wk = ki // per
    kept = []
    for c in configs:
        if c.kind == "tinygemm":
            kept.append(c)
            continue
        if c.block_n > _pow2_at_least(n, 16):
            continue
        if c.kind in ("splitk", "gemm") and c.block_m > _pow2_at_least(m, 16):
            continue
        if c.kind == "gemv" and c.block_n * wk < 4 * 32 * c.num_warps:
            continue
        if c.split_k > 1 and -(-k // ki) < 2 * c.split_k:
            continue
        kept.append(c)
    if not kept:  # tiny problems: the first candidate, its tile shrunk to the problem, unsplit
        c = configs[0]
        kept = [KernelConfig(c.kind, block_n=min(c.block_n, _pow2_at_least(n, 16)),
                             block_m=c.block_m and min(c.block_m, _pow2_at_least(m, 16)), split_k=1,
                             group_m=c.group_m, num_warps=c.num_warps, num_stages=c.num_stages)]
    return kept
