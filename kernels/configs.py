"""Named launch configurations of the int_group kernels, per GPU family, and their pruning.

A configuration is a frozen dataclass (never a positional list). ``CONFIGS[family][kind]`` is
the candidate list the autotuner measures on first use of a shape; :func:`prune` drops
candidates that cannot fit a problem before anything is compiled. ``kind`` is the kernel path
chosen by M: ``gemv`` (M <= 8), ``splitk`` (M <= 64), ``gemm`` (larger M).
"""

from __future__ import annotations

from dataclasses import dataclass

GEMV_MAX_M = 8
SPLITK_MAX_M = 64
GEMV_MAX_ELEMS_PER_THREAD = 128


@dataclass(frozen=True)
class KernelConfig:
    kind: str  # "gemv" | "splitk" | "gemm"
    block_n: int
    block_k: int
    block_m: int = 0  # gemv: 0 = next power of two of M (set at launch)
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"KernelConfig.kind={self.kind!r}; expected one of {KINDS}")
        for name in ("block_n", "block_k", "num_warps"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"KernelConfig.{name}={v} must be a power of two")
        if self.split_k < 1:
            raise ValueError(f"KernelConfig.split_k={self.split_k} must be >= 1")
        if self.kind != "gemv" and min(self.block_m, self.block_n, self.block_k) < 16:
            raise ValueError(f"KernelConfig: tl.dot needs block_m, block_n, block_k >= 16, got {self}")
        if self.kind == "gemm" and self.split_k != 1:
            raise ValueError("KernelConfig: kind='gemm' is the un-split GEMM; use kind='splitk' to split K")

    @property
    def name(self) -> str:
        m = f"m{self.block_m}" if self.block_m else ""
        return (f"{self.kind}_{m}n{self.block_n}k{self.block_k}s{self.split_k}"
                f"w{self.num_warps}p{self.num_stages}")


KINDS = ("gemv", "splitk", "gemm")


def _gemv(block_n, block_k, split_k, num_warps=4, num_stages=2):
    return KernelConfig("gemv", block_n=block_n, block_k=block_k, split_k=split_k, num_warps=num_warps,
                        num_stages=num_stages)


def _splitk(block_m, block_n, block_k, split_k, num_warps=4, num_stages=3):
    return KernelConfig("splitk", block_m=block_m, block_n=block_n, block_k=block_k, split_k=split_k,
                        num_warps=num_warps, num_stages=num_stages)


def _gemm(block_m, block_n, block_k, num_warps=4, num_stages=3, group_m=8):
    return KernelConfig("gemm", block_m=block_m, block_n=block_n, block_k=block_k, num_warps=num_warps,
                        num_stages=num_stages, group_m=group_m)


# Hopper (sm_90: H100, H200; 132 SMs, 227 KB shared memory per block)
_SM90 = {
    "gemv": [_gemv(16, 256, 1), _gemv(16, 256, 4), _gemv(32, 128, 2), _gemv(8, 512, 1, num_warps=2),
             _gemv(32, 64, 2)],  # the last one fits M = 5..8
    "splitk": [_splitk(16, 64, 128, 4), _splitk(16, 128, 64, 4), _splitk(32, 64, 64, 2),
               _splitk(32, 64, 64, 2, num_stages=2)],
    "gemm": [_gemm(128, 128, 32, num_warps=8), _gemm(64, 128, 32), _gemm(128, 64, 32),
             _gemm(64, 64, 64, num_stages=2)],
}
# Ampere / Ada (sm_80, sm_86, sm_89): fewer SMs, 163 KB shared memory per block on A100 (99 KB on sm_86)
_SM80 = {
    "gemv": [_gemv(16, 256, 1), _gemv(16, 256, 4), _gemv(16, 64, 4)],  # the last one fits M = 5..8
    "splitk": [_splitk(16, 64, 64, 4, num_stages=2), _splitk(32, 64, 64, 2, num_stages=2)],
    "gemm": [_gemm(128, 128, 32, num_warps=8, num_stages=2), _gemm(64, 64, 64, num_stages=2)],
}
CONFIGS = {"sm90": _SM90, "sm80": _SM80, "default": _SM80}

# what the interpreter runs when no config is named: the smallest tiles that are still legal
INTERPRETER_CONFIGS = {
    "gemv": _gemv(32, 64, 1),
    "splitk": _splitk(16, 32, 32, 2),
    "gemm": _gemm(32, 32, 32),
}


def family(capability: tuple[int, int]) -> str:
    major = capability[0]
    if major >= 9:
        return "sm90"
    if major == 8:
        return "sm80"
    return "default"


def kind_for(m: int) -> str:
    return "gemv" if m <= GEMV_MAX_M else "splitk" if m <= SPLITK_MAX_M else "gemm"


def gemv_block_m(m: int) -> int:
    return _pow2_at_least(m, 1)


def _pow2_at_least(v: int, lo: int) -> int:
    return max(lo, 1 << max(0, (v - 1).bit_length()))


def prune(configs: list[KernelConfig], m: int, n: int, k: int) -> list[KernelConfig]:
    """Drop candidates whose tiles overshoot the problem or leave split-K slices empty."""
    kept = []
    for c in configs:
        if c.block_n > _pow2_at_least(n, 16) or c.block_k > _pow2_at_least(k, 32):
            continue
        if c.kind != "gemv" and c.block_m > _pow2_at_least(m, 16):
            continue
        if c.kind == "gemv" and gemv_block_m(m) * c.block_n * c.block_k > GEMV_MAX_ELEMS_PER_THREAD * 32 * c.num_warps:
            continue  # the [BM, BN, BK] product would spill registers
        if c.split_k > 1 and -(-k // c.block_k) < 2 * c.split_k:
            continue  # each slice should get at least two K tiles
        kept.append(c)
    if not kept:  # tiny problems: the smallest candidate, its tiles shrunk to the problem, unsplit
        c = min(configs, key=lambda c: (c.block_m * c.block_n * c.block_k, c.split_k))
        lo = 1 if c.kind == "gemv" else 16
        bn, bk = min(c.block_n, _pow2_at_least(n, lo)), min(c.block_k, _pow2_at_least(k, 32))
        while c.kind == "gemv" and bk > 32 and gemv_block_m(m) * bn * bk > GEMV_MAX_ELEMS_PER_THREAD * 32 * c.num_warps:
            bk //= 2
        kept = [KernelConfig(c.kind, block_n=bn, block_k=bk,
                             block_m=c.block_m and min(c.block_m, _pow2_at_least(m, 16)), split_k=1,
                             group_m=c.group_m, num_warps=c.num_warps, num_stages=c.num_stages)]
    return kept
