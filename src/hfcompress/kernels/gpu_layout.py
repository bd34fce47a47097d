"""The GPU runtime layout of an int_group layer, derived once from the stored v1 tensors (pure
torch: built and tested on any device; the kernels read only this layout).

Storage is not kernel layout (hfcompress.formats.int_group is the on-disk contract, unchanged).
On the first CUDA call a layer's tensors are converted into :class:`GpuLayout` and kept in a
cache keyed by the packed ``weight`` tensor (dropped with it, rebuilt if any source tensor is
modified in place); ``state_dict`` never sees it, so ``save_pretrained`` writes the v1 tensors.

What changes, and why:

- **act-order**: K is permuted once so groups are contiguous (``perm = argsort(g_idx)``, the
  exllama approach); at run time the launcher gathers ``x[:, perm]``. No kernel reads g_idx.
- **groups** become *sub-groups* of ``sg`` input channels, ``sg`` the largest power of two
  (<= 256) that divides every group boundary in the (permuted) K order: a group of 128 stays
  128, a group of 96 becomes three sub-groups of 32 sharing one scale. A K tile of a power-of-two
  width therefore holds one sub-group (``BLOCK_K <= sg``: one scale per row per tile) or whole
  sub-groups (``BLOCK_K > sg``). Per-channel layers have one sub-group spanning all of K.
- **scales and zeros** are ``[G', N]`` (G' sub-groups, row = sub-group), so a tile reads one
  contiguous run of N scales. Scales stay fp16 (the stored values: exact; bf16 would round
  them), zero points become fp16 integers (or stay the stored fp16 zeros of
  ``zero_point="float"``); the kernel folds ``c = -z * s`` once per row and tile (fp32, exact: a
  product of two fp16 values) and dequantizes each code with one fma ``w = q * s + c``, which
  equals the reference ``(q - z) * s`` bit for bit (``q * s`` and ``c`` are exact, so both round
  the same exact value once; for float zeros this needs ``q - z`` exact too, true for every zero
  hfcompress's grids store: ``algorithms.grid.round_zero`` flushes the tiny ones).
- **codes** are 32-bit words along K per output row, rows padded to ``k_pad`` (a multiple of
  256 codes, zero codes, zero scales) so every row starts 16-byte aligned and a thread reads four
  words (32 4-bit codes) with one 128-bit load. 2/4/8-bit words hold ``per = 32/bits`` codes,
  *interleaved*: K is cut into blocks of ``ki`` columns (the kernels' K tile: the sub-group
  clamped to ``[4*per, 128]``), a block is ``wk = ki/per`` words per row, and code ``j`` of word
  ``w`` is column ``j*wk + w`` of the block. So code ``j`` of a thread's four words (one shift)
  meets four *contiguous* activations, and nothing is shuffled between threads to line codes up
  with activations. 3-bit codes straddle words in v1; here
  they are split into two bit planes without straddling: ``codes`` holds the low two bits
  (16 codes per word, like 2-bit) and ``codes_hi`` the high bits as 16-bit half-words, half-word
  ``w`` holding the high bits of the 16 codes of word ``w`` (so a tile loads each word and each
  half-word once, eight half-words per 128-bit load), and ``q = lo | hi << 2`` with shifts only
  (3 bits per weight, no waste).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from .bitstream import unpack_stream as _unpack_stream
from .cache_key import tensor_versions as _versions

K_ALIGN = 256  # codes per row are padded to a multiple of this
MAX_SUBGROUP = 256
_CACHE: dict[int, tuple] = {}  # id(qweight) -> (weakref(qweight), versions, GpuLayout)


@dataclass(frozen=True)
class GpuLayout:
    bits: int
    n: int  # out_features
    k: int  # in_features
    k_pad: int  # codes per row in ``codes`` (multiple of K_ALIGN)
    sg: int  # sub-group size (power of two); >= k_pad means one sub-group per row
    ki: int  # interleave block = kernel K tile: code j of word w of a block is its column j*ki/per + w
    codes: torch.Tensor  # int32 [N, k_pad * b / 32], b = bits (2 for the 3-bit low plane)
    codes_hi: torch.Tensor | None  # 3-bit only: int16 [N, k_pad / 16], the high bit of each code
    scale: torch.Tensor  # fp16 [G', N], zero past K
    zero: torch.Tensor | None  # fp16 [G', N] zero points (None: symmetric, z = 2**(bits-1))
    perm: torch.Tensor | None  # int64 [K]: kernel column j reads input channel perm[j] (act-order)
    #: other backends' forms of this layer built on demand (e.g. tinygemm's), dropped with it
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def sym(self) -> bool:
        return self.zero is None

    @property
    def lo_bits(self) -> int:
        """Bits per code in ``codes`` (the 3-bit low plane holds 2)."""
        return 2 if self.bits == 3 else self.bits

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.codes, self.codes_hi, self.scale, self.zero, self.perm) if t is not None]


def _interleave(codes: torch.Tensor, per: int, ki: int) -> torch.Tensor:
    """Columns ``[R, L]`` (L a multiple of ki) -> code order: position ``w*per + j`` of each block
    holds column ``j*wk + w``."""
    r, length = codes.shape
    wk = ki // per
    return codes.view(r, length // ki, per, wk).transpose(-1, -2).reshape(r, length)


def _deinterleave(codes: torch.Tensor, per: int, ki: int) -> torch.Tensor:
    r, length = codes.shape
    wk = ki // per
    return codes.view(r, length // ki, wk, per).transpose(-1, -2).reshape(r, length)


def block_width(bits: int, sg: int) -> int:
    """The interleave block (kernel K tile) for a layer: its sub-group, clamped so a thread's
    four words stay in one block and the tile is at most 128 columns."""
    per = 32 // (2 if bits == 3 else bits)
    return min(max(sg, 4 * per), 128)


def _pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int64 codes ``[R, L]`` (L a multiple of 32/bits, values < 2**bits) -> int32 words
    ``[R, L*bits/32]``, code ``j`` of a word at bits ``[j*bits, (j+1)*bits)``."""
    per = 32 // bits
    r, length = codes.shape
    shifts = torch.arange(per, dtype=torch.int64, device=codes.device) * bits
    w = (codes.view(r, length // per, per) << shifts).sum(-1)  # disjoint bits: sum == or
    return torch.where(w >= 2**31, w - 2**32, w).to(torch.int32)


def _pack_halfwords(bits1: torch.Tensor) -> torch.Tensor:
    """int64 single bits ``[R, L]`` (L a multiple of 16) -> int16 ``[R, L/16]``, bit ``j`` of
    half-word ``w`` = element ``16*w + j``."""
    r, length = bits1.shape
    shifts = torch.arange(16, dtype=torch.int64, device=bits1.device)
    h = (bits1.view(r, length // 16, 16) << shifts).sum(-1)
    return torch.where(h >= 2**15, h - 2**16, h).to(torch.int16)


def _unpack_words(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 words (or int16 half-words of 1-bit codes) -> int64 codes, lowest code first."""
    width = 16 if words.dtype == torch.int16 else 32
    per = width // bits
    shifts = torch.arange(per, dtype=torch.int64, device=words.device) * bits
    w = words.to(torch.int64) & ((1 << width) - 1)
    return ((w[..., None] >> shifts) & ((1 << bits) - 1)).flatten(-2)


def _subgroup(group_of: torch.Tensor, k: int) -> int:
    """Largest power of two (<= MAX_SUBGROUP) dividing every position where ``group_of`` changes;
    one sub-group over everything when it never changes."""
    change = torch.nonzero(group_of[1:] != group_of[:-1]).flatten() + 1
    if change.numel() == 0:
        return max(K_ALIGN, 1 << max(0, (k - 1).bit_length()))  # >= k_pad: one sub-group
    sg = MAX_SUBGROUP
    while sg > 1 and bool((change % sg).any()):
        sg //= 2
    return sg


def build_layout(qweight: torch.Tensor, scale: torch.Tensor, qzero: torch.Tensor | None,
                 g_idx: torch.Tensor | None, bits: int, group_size: int, sym: bool,
                 in_features: int) -> GpuLayout:
    """Convert the stored v1 tensors of one layer into :class:`GpuLayout` (on their device)."""
    k, n, dev = in_features, qweight.shape[0], qweight.device
    g_count = scale.shape[1]
    codes = _unpack_stream(qweight, bits, k)  # [N, K]
    perm = None
    if g_idx is not None:
        perm = torch.argsort(g_idx.to(torch.int64), stable=True)
        group_of = g_idx.to(torch.int64)[perm]  # [K] non-decreasing
        if bool(torch.equal(perm, torch.arange(k, device=dev))):
            perm = None  # already in order: nothing to gather
        else:
            codes = codes[:, perm]
    elif group_size == -1 or g_count == 1:
        group_of = torch.zeros(k, dtype=torch.int64, device=dev)
    else:
        group_of = torch.arange(k, device=dev) // group_size
    sg = _subgroup(group_of, k)
    k_pad = -(-k // K_ALIGN) * K_ALIGN
    codes = torch.nn.functional.pad(codes, (0, k_pad - k))  # [N, k_pad], zero codes past K
    lo_bits = 2 if bits == 3 else bits
    ki = block_width(bits, sg)
    codes = _interleave(codes, 32 // lo_bits, ki)
    if bits == 3:
        lo, hi = _pack_words(codes & 3, 2), _pack_halfwords(codes >> 2)
    else:
        lo, hi = _pack_words(codes, bits), None
    # sub-group j covers kernel columns [j*sg, (j+1)*sg): one group each (sg divides every boundary)
    n_sub = -(-k_pad // sg)
    first = torch.arange(n_sub, device=dev) * sg
    real = first < k
    grp = torch.where(real, group_of[first.clamp(max=k - 1)], 0)  # [G']
    s = scale.t()[grp].to(torch.float16)  # [G', N]
    s = torch.where(real[:, None], s, torch.zeros((), dtype=s.dtype, device=dev))
    z = None
    if not sym:  # integers < 256 (exact in fp16), or the stored fp16 zeros of zero_point="float"
        zi = qzero if qzero.is_floating_point() else _unpack_stream(qzero, bits, n)  # [G, N]
        z = torch.where(real[:, None], zi[grp], 0).to(torch.float16)
    return GpuLayout(bits=bits, n=n, k=k, k_pad=k_pad, sg=sg, ki=ki, codes=lo.contiguous(),
                     codes_hi=None if hi is None else hi.contiguous(), scale=s.contiguous(),
                     zero=None if z is None else z.contiguous(), perm=perm)


def layout_codes(lay: GpuLayout) -> torch.Tensor:
    """int64 codes ``[N, k_pad]`` in kernel column order (act-order: permuted)."""
    q = _unpack_words(lay.codes, lay.lo_bits)
    if lay.codes_hi is not None:
        q = q | (_unpack_words(lay.codes_hi, 1) << 2)
    return _deinterleave(q, 32 // lay.lo_bits, lay.ki)


def dequantize_layout(lay: GpuLayout) -> torch.Tensor:
    """fp32 ``[N, K]`` in the original channel order, computed the way the kernels do
    (``q * s + c`` with ``c = -z * s``): equals the reference dequantize bit for bit."""
    q = layout_codes(lay)  # [N, k_pad]
    sub = torch.arange(lay.k_pad, device=q.device) // lay.sg  # [k_pad] sub-group of each column
    s = lay.scale.to(torch.float32)[sub].t()  # [N, k_pad]
    z = lay.zero.to(torch.float32)[sub].t() if lay.zero is not None else float(1 << (lay.bits - 1))
    w = q.to(torch.float32) * s + (-z * s)
    w = w[:, :lay.k]
    if lay.perm is not None:
        out = torch.empty_like(w)
        out[:, lay.perm] = w
        w = out
    return w


def gpu_layout(qweight, scale, qzero, g_idx, bits, group_size, sym, in_features) -> GpuLayout:
    """The cached layout of a layer (built on the first call, rebuilt when a source changed)."""
    key = id(qweight)
    versions = _versions(qweight, scale, qzero, g_idx)
    hit = _CACHE.get(key)
    if hit is not None and hit[0]() is qweight and hit[1] == versions:
        return hit[2]
    lay = build_layout(qweight, scale, qzero, g_idx, bits, group_size, sym, in_features)
    _CACHE[key] = (weakref.ref(qweight, lambda _, key=key: _CACHE.pop(key, None)), versions, lay)
    return lay


def cached_layouts() -> int:
    """How many layers currently have a GPU layout (tests, memory accounting)."""
    return len(_CACHE)
