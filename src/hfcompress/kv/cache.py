"""GEARCache: a transformers ``Cache`` whose layers keep keys and values GEAR-compressed.

Per layer: the newest tokens sit in a float buffer (``keys`` / ``values`` [B, H, m, d],
m < buffer_size); whenever it holds ``buffer_size`` tokens they are compressed as one chunk
(kv/gear.py) and appended to the compressed store, whose tensors are concatenated along a chunk
axis so that decompressing the whole cache is a few batched ops. ``update`` returns the
decompressed chunks followed by the exact buffer and the new tokens, so a forward attends to its
own tokens exactly and to the past through GEAR; tokens compressed during a forward are used
compressed from the next forward on.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .gear import GEARSpec, compress, decompress


def _cat(a: dict | None, b: dict) -> dict:
    return b if a is None else {k: torch.cat([a[k], b[k]], dim=2) for k in a}


def _map(state: dict | None, fn) -> dict | None:
    return None if state is None else {k: fn(v) for k, v in state.items()}


class GEARLayer(CacheLayerMixin):
    """One decoder layer's GEAR cache. Compressed store: ``self.compressed = {"k": {...}, "v": {...}}``
    (tensors with a chunk axis at dim 2), float buffer: ``self.keys`` / ``self.values``."""

    is_sliding = False
    is_croppable = True
    is_compileable = False

    def __init__(self, spec: GEARSpec, seed: int = 0, layer_idx: int = 0):
        super().__init__()
        self.spec = spec
        self.seed = seed
        self.layer_idx = layer_idx
        self.compressed: dict[str, dict] | None = None
        self.n_chunks = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.keys = key_states.new_empty(*key_states.shape[:-2], 0, key_states.shape[-1])
        self.values = value_states.new_empty(*value_states.shape[:-2], 0, value_states.shape[-1])
        self.is_initialized = True

    # -- the cache proper ------------------------------------------------------------------------
    def _decompress_into(self, k_out: torch.Tensor, v_out: torch.Tensor) -> None:
        """Write the decompressed chunks into k_out / v_out [B, H, n_chunks * chunk_size, d] (views
        of the tensors handed to attention: one copy, with the cast, per tensor)."""
        B, H, P, d = k_out.shape
        if P == 0:
            return
        shape = (B, H, self.n_chunks, self.spec.chunk_size, d)
        decompress(self.compressed["k"], self.spec, True, shape, out=k_out.view(shape))
        decompress(self.compressed["v"], self.spec, False, shape, out=v_out.view(shape))

    def decompressed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All compressed tokens as [B, H, n_chunks * chunk_size, d] keys and values (cache dtype)."""
        B, H, _, d = self.keys.shape
        P = self.n_chunks * self.spec.chunk_size
        k = self.keys.new_empty(B, H, P, d)
        v = self.values.new_empty(B, H, P, d)
        self._decompress_into(k, v)
        return k, v

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        B, H, m, d = self.keys.shape
        n = self.spec.chunk_size
        P, t = self.n_chunks * n, key_states.shape[-2]
        # [decompressed chunks | float buffer | new tokens], the tensors attention reads
        out_k = self.keys.new_empty(B, H, P + m + t, d)
        out_v = self.values.new_empty(B, H, P + m + t, d)
        self._decompress_into(out_k[..., :P, :], out_v[..., :P, :])
        out_k[..., P:P + m, :], out_k[..., P + m:, :] = self.keys, key_states
        out_v[..., P:P + m, :], out_v[..., P + m:, :] = self.values, value_states
        buf_k, buf_v = out_k[..., P:, :], out_v[..., P:, :]

        c_new = (m + t) // n
        if c_new:
            chunk_k = buf_k[..., : c_new * n, :].reshape(B, H, c_new, n, d)
            chunk_v = buf_v[..., : c_new * n, :].reshape(B, H, c_new, n, d)
            seed = self.seed * 1_000_003 + self.layer_idx
            new = {"k": compress(chunk_k, self.spec, True, seed), "v": compress(chunk_v, self.spec, False, seed + 1)}
            self.compressed = new if self.compressed is None else {
                kv: _cat(self.compressed[kv], new[kv]) for kv in ("k", "v")}
            self.n_chunks += c_new
            buf_k, buf_v = buf_k[..., c_new * n:, :], buf_v[..., c_new * n:, :]
        # clone: a view would keep the whole returned tensor alive (and uncounted)
        self.keys, self.values = buf_k.clone(), buf_v.clone()
        return out_k, out_v

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.n_chunks * self.spec.chunk_size + self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        """Bytes of every tensor this layer keeps: compressed store and float buffer."""
        return sum(self.nbytes_by_part().values())

    def nbytes_by_part(self) -> dict[str, int]:
        """``nbytes()`` split into codes, statistics (scales and zero points), low-rank factors, outliers
        (values and positions) and the float buffer."""
        parts = dict.fromkeys(("codes", "statistics", "lowrank", "outliers", "float_buffer"), 0)
        if not self.is_initialized:
            return parts
        parts["float_buffer"] = self.keys.nbytes + self.values.nbytes
        for state in (self.compressed or {}).values():
            for name, t in state.items():
                part = {"codes": "codes", "scale": "statistics", "low": "statistics", "zero": "statistics"}.get(name, name.split("_")[0])
                parts[{"outlier": "outliers"}.get(part, part)] += t.nbytes
        return parts

    # -- everything generate() does to a cache --------------------------------------------------
    def _apply(self, fn) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        if self.compressed is not None:
            self.compressed = {kv: _map(s, fn) for kv, s in self.compressed.items()}

    def reset(self) -> None:
        self.keys = self.values = None
        self.compressed = None
        self.n_chunks = 0
        self.is_initialized = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._apply(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._apply(lambda t: t[indices.to(t.device) if isinstance(indices, torch.Tensor) else indices])

    def offload(self):
        self._apply(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        if self.is_initialized and self.keys.device != self.device:
            self._apply(lambda t: t.to(self.device, non_blocking=True))

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (transformers' convention: a negative count).
        Within the float buffer this is exact. Reaching into the compressed store drops whole
        chunks; the kept tokens of a partly removed chunk come back into the float buffer as their
        decompressed values (the values attention was already seeing)."""
        if tokens_to_remove > 0:
            raise ValueError(f"GEARCache.crop({tokens_to_remove}): pass a negative number of tokens to remove")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        target = max(0, self.get_seq_length() + tokens_to_remove)
        n = self.spec.chunk_size
        if target >= self.n_chunks * n:
            keep = target - self.n_chunks * n
            self.keys, self.values = self.keys[..., :keep, :].clone(), self.values[..., :keep, :].clone()
            return
        keep_chunks, partial = divmod(target, n)
        k, v = self.decompressed()
        self.keys = k[..., keep_chunks * n: keep_chunks * n + partial, :].clone()
        self.values = v[..., keep_chunks * n: keep_chunks * n + partial, :].clone()
        self.n_chunks = keep_chunks
        self.compressed = None if keep_chunks == 0 else {
            kv: _map(s, lambda t: t[:, :, :keep_chunks].clone()) for kv, s in self.compressed.items()}


class GEARCache(Cache):
    """GEAR-compressed KV cache (Kang et al., 2024) for ``model.generate(..., cache=GEARCache(...))``
    or a model's forward.

    - ``bits`` (2, 4, 8): uniform quantization, keys per channel in groups of ``group_size``
      tokens, values per token in groups of ``group_size`` channels (at most head_dim).
    - ``rank``: rank per head of each chunk's low-rank residual (power iteration, ``power_iters``
      steps); 0 switches it off.
    - ``outlier_ratio``: fraction of each chunk's entries kept exactly (sparse); 0 switches it off.
    - ``buffer_size``: newest tokens kept in float; every ``buffer_size`` tokens are compressed as
      one chunk (a multiple of ``group_size``, or smaller than it).
    - ``compact``: 8-bit side information: scales as 8-bit log codes (steps of 2**(1/8), rounded up),
      values' zero points int8 multiples of the scale, low-rank factors int8 (B with a scale per row). On
      64-wide heads with ``buffer_size=64`` the statistics cost 0.31 bit per number instead of 0.5, a
      rank-1 residual 0.25 instead of 0.5.
    - ``seed``: the power iteration's start (results are deterministic).
    - ``config``: optional model config; lays out one layer per decoder layer up front and refuses
      sliding-window / linear-attention layer types (GEAR keeps every token of full attention).
    """

    def __init__(self, bits: int = 4, group_size: int = 64, rank: int = 4, outlier_ratio: float = 0.01,
                 buffer_size: int = 64, power_iters: int = 2, seed: int = 0, compact: bool = False, config=None):
        self.spec = GEARSpec(bits=bits, group_size=group_size, rank=rank, outlier_ratio=outlier_ratio,
                             power_iters=power_iters, chunk_size=buffer_size, compact=compact)
        self.seed = seed
        layers = []
        if config is not None:
            text = config.get_text_config(decoder=True)
            types = getattr(text, "layer_types", None) or ["full_attention"] * text.num_hidden_layers
            other = sorted(set(types) - {"full_attention"})
            if other:
                raise ValueError(f"GEARCache supports full-attention layers only; this model's config has "
                                 f"layer_types {other}")
            layers = [GEARLayer(self.spec, seed, i) for i in range(len(types))]
        super().__init__(layers=layers)

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        while len(self.layers) <= layer_idx:
            self.layers.append(GEARLayer(self.spec, self.seed, len(self.layers)))
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def nbytes(self) -> int:
        """Bytes of every tensor the cache keeps (compressed chunks, their statistics, low-rank
        factors, outlier values and positions, and the float buffers)."""
        return sum(layer.nbytes() for layer in self.layers)

    def nbytes_by_part(self) -> dict[str, int]:
        """``nbytes()`` by part, summed over layers (see GEARLayer.nbytes_by_part)."""
        total: dict[str, int] = {}
        for layer in self.layers:
            for part, b in layer.nbytes_by_part().items():
                total[part] = total.get(part, 0) + b
        return total

    def __repr__(self):
        s = self.spec
        return (f"GEARCache(bits={s.bits}, group_size={s.group_size}, rank={s.rank}, "
                f"outlier_ratio={s.outlier_ratio}, buffer_size={s.chunk_size}, compact={s.compact}, "
                f"layers={len(self.layers)})")
