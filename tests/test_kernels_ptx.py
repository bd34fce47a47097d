"""What the design of the GEMV promises, read from its sm_90 PTX (compiled ahead of time on CPU):
the production case (bf16 activations, 4-bit, group 128, asymmetric, M = 1) in every shipped
Hopper GEMV configuration. Per K tile (one trip of the kernel's loop), per thread:

- packed weights are fetched with 128-bit vector loads (``ld.global...v4.b32``), streamed
  evict-first, and every word of the tile is loaded exactly once (threads x words per thread ==
  the tile's words);
- one scale and one zero load per row the thread owns, nothing else gathered per element;
- activations: 64/128-bit loads of contiguous runs (code ``j`` of a thread's words meets
  consecutive columns), exactly one bf16 per code dequantized, evict-last;
- no shared-memory traffic or barrier inside the loop; one fma per code for the dequantization;
- the next tile's words are requested before this tile is computed (registers double-buffered).

The kernels this replaced issued ~98 global loads per thread per tile, almost all scalar 32-bit
reloads of the same word.
"""

from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("triton")

from hfcompress.kernels.aot import compile_config  # noqa: E402
from hfcompress.kernels.configs import CONFIGS, prune  # noqa: E402

BITS, GROUP, PER = 4, 128, 8
KI = 128  # the layout's K tile for 4-bit group 128
WK = KI // PER  # words per row per tile
GEMV = prune(CONFIGS["sm90"]["gemv"], m=1, n=4096, k=4096, ki=KI, per=PER)


def loop_body(ptx: str) -> list[str]:
    """The instructions of the kernel's (single) K loop: from its header label to the branch back."""
    lines = ptx.splitlines()
    head = next(i for i, ln in enumerate(lines) if "Inner Loop Header" in ln)
    while not lines[head].startswith("$L__"):  # the label may sit on the line above the comment
        head -= 1
    label = lines[head].split(":")[0].strip()
    end = next(i for i in range(head + 1, len(lines)) if re.search(rf"\bbra(\.uni)?\s+{re.escape(label)};", lines[i]))
    return [ln.strip() for ln in lines[head + 1:end] if ln.strip() and not ln.strip().startswith(("//", ".loc", "$"))]


def width(ld: str) -> int:
    """Bits moved by one load instruction (``.v4.b32`` = 128)."""
    m = re.search(r"(?:\.v(\d))?\.b(\d+)$", ld)
    return int(m.group(1) or 1) * int(m.group(2))


def global_loads(body: list[str]) -> list[str]:
    return [re.search(r"ld\.global\S*", ln).group(0) for ln in body if re.search(r"\bld\.global", ln)]


@pytest.mark.parametrize("config", GEMV, ids=[c.name for c in GEMV])
def test_kernels_ptx_gemv_bf16_4bit_g128_loads(config):
    compiled = compile_config(config, 90, dtype=torch.bfloat16, bits=BITS, group_size=GROUP, sym=False,
                              has_bias=False, block_m=1)
    body = loop_body(compiled.asm["ptx"])
    loads = global_loads(body)
    weights = [ld for ld in loads if "evict_first" in ld]
    acts = [ld for ld in loads if "evict_last" in ld]
    others = [ld for ld in loads if ld not in weights and ld not in acts]
    threads = 32 * config.num_warps
    # 128-bit vector loads only, each word of the [BLOCK_N, WK] tile exactly once
    assert weights and all(ld.endswith(".v4.b32") for ld in weights), weights
    assert len(weights) * 4 * threads == config.block_n * WK, (len(weights), config)
    # one scale and one zero (16-bit each) per row a thread owns (a thread's 128-bit loads may
    # share a row: then they share its scale and zero), nothing gathered per element
    rows_per_thread = len(others) // 2
    assert 1 <= rows_per_thread <= len(weights) and sorted(others) == ["ld.global.b16"] * (2 * rows_per_thread), others
    # activations: vector loads of contiguous runs, exactly one bf16 per code the thread dequantizes
    assert acts and all(re.search(r"\.(v2|v4)\.b32$", ld) for ld in acts), acts
    assert sum(width(ld) for ld in acts) == PER * 4 * len(weights) * 16
    assert len(acts) <= PER * len(weights)
    # no shared-memory round trip inside the loop (the tile stays in the loaded registers)
    assert not [ln for ln in body if re.search(r"\b(st|ld)\.shared|bar\.sync", ln)]
    # software pipelining: the next tile's words are requested before this tile's math starts
    first_fma = next(i for i, ln in enumerate(body) if ln.startswith("fma.rn.f32"))
    assert max(i for i, ln in enumerate(body) if "evict_first" in ln) < first_fma
    # the dequantization is one fma per code
    assert sum(ln.startswith("fma.rn.f32") for ln in body) >= 2 * config.block_n * KI // threads
