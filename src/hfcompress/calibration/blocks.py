"""Block-by-block (true-sequential) runner over the decoder blocks of a Hugging Face model.

Each block's inputs (hidden states and the keyword arguments the model passes it: attention
mask, rotary position embeddings, ...) are captured once, by running the model up to the first
block. Then, block after block, the caller gets a :class:`BlockStep` (the block, its inputs and
ways to run it with hooks on its linear layers), changes the block as it likes, and the runner
computes the changed block's outputs, which become the next block's inputs. Peak memory is one
block's weights plus the activations of the calibration batches.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..modules import is_conv1d, is_linear, matches


_TWICE = object()  # a recorded child that ran more than once in one forward


def return_freed_memory() -> None:
    """Ask glibc to give freed heap pages back to the OS. Called after each pass over the calibration
    inputs: a pass frees about a batch's worth of temporaries per batch, and without this they stay in
    the resident set, scattered between the tensors still alive (at 128x512 on SmolLM2 ~60-100 MB of
    peak RSS); a no-op where there is no glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


_LIBC: list = []


def _malloc_trim():
    if not _LIBC:
        try:
            import ctypes

            _LIBC.append(ctypes.CDLL("libc.so.6").malloc_trim)
        except (OSError, AttributeError):
            _LIBC.append(None)
    return _LIBC[0]


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early once everything needed was seen."""


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder block list: the ``nn.ModuleList`` whose length is the config's number of
    layers and whose items share one class (``model.layers``, ``transformer.h`` ...)."""
    config = getattr(model, "config", None)
    n_layers = getattr(config, "num_hidden_layers", None)
    candidates = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(b) for b in m}) == 1:
            candidates.append((name, m))
    exact = [c for c in candidates if n_layers is not None and len(c[1]) == n_layers]
    pool = exact or candidates
    if not pool:
        raise ValueError(f"{type(model).__name__}: no list of decoder blocks found (an nn.ModuleList of "
                         "identical blocks); block-by-block calibration needs one")
    return max(pool, key=lambda c: len(c[1]))


class _Catcher(nn.Module):
    """Stands in for block 0: records the block's inputs, then stops the forward."""

    def __init__(self, block: nn.Module, store: list):
        super().__init__()
        self.block = block
        self.store = store

    def __getattr__(self, name):  # models read attributes of their layers (e.g. attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)

    def forward(self, hidden_states, *args, **kwargs):
        self.store.append((hidden_states, args, kwargs))
        raise _StopForward


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@torch.no_grad()
def capture_block_inputs(model: nn.Module, batches: list[torch.Tensor], device=None
                         ) -> tuple[list[torch.Tensor], list[tuple], list[dict]]:
    """Run ``model`` on each batch of token ids up to its first decoder block.

    Returns per batch the block's hidden-state input ``[b, s, d]``, extra positional args and
    keyword args (attention mask, position embeddings ...; caches are dropped). The modules
    before the first block must hold real weights; the blocks may be on ``meta``.
    """
    _, blocks = find_blocks(model)
    store: list = []
    first = blocks[0]
    blocks[0] = _Catcher(first, store)
    try:
        for ids in batches:
            ids = ids.to(device) if device is not None else ids
            try:
                model(input_ids=ids, use_cache=False)
            except _StopForward:
                pass
    finally:
        blocks[0] = first
    if len(store) != len(batches):
        raise RuntimeError(f"{type(model).__name__}: the first decoder block was not reached for every batch")
    drop = {"cache", "past_key_values", "past_key_value", "layer_past", "use_cache", "output_attentions"}
    hidden = [h for h, _, _ in store]
    args = [a for _, a, _ in store]
    kwargs = [{k: v for k, v in kw.items() if k not in drop} for _, _, kw in store]
    return hidden, args, kwargs


@contextmanager
def _bf16_exact_products(on: bool):
    """Within the block, CPU fp32 matmuls may round their inputs to bf16 (oneDNN's bf16 kernels,
    fp32 accumulation and output): exact for inputs that came from bf16. The setting is process-wide
    in torch, so it is restored on the way out; ``on=False`` changes nothing."""
    if not on:
        yield
        return
    matmul = torch.backends.mkldnn.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "bf16"
    try:
        yield
    finally:
        matmul.fp32_precision = before


class InputStats:
    """Running ``X^T X`` (``[K, K]``) and token count of one linear layer's inputs.

    A plain sum: the stats of two disjoint sets of tokens are ``a.merge_(b)`` (what a
    distributed run reduces). Each ``add_`` computes its batch's product in fp32 on its own and
    adds it to a float64 sum: a sum of fp32 products is exact in float64 (short of extreme
    cancellation), so it does not depend on the order of the additions, and ranks that each
    sum their own batches reduce to the very sum one process gets (same checkpoint, same codes).
    ``add_`` fills only the blocks on and above the diagonal (the sum is symmetric: about 0.6x
    the multiply-adds of a full ``X^T X``); ``xtx`` mirrors them into the lower blocks when read."""

    #: width of the column blocks of the half-filled sum
    BLOCK = 256

    def __init__(self, xtx: torch.Tensor, n_tokens: int = 0):
        self._sum = xtx.to(torch.float64)  # [K, K] fp64; blocks below the diagonal stale while _half
        self._half = False
        self.n_tokens = n_tokens

    @classmethod
    def zeros(cls, k: int, device=None) -> "InputStats":
        """Empty stats of a layer with ``k`` inputs."""
        return cls(torch.zeros(k, k, dtype=torch.float64, device=device))

    @property
    def xtx(self) -> torch.Tensor:
        """``X^T X`` summed over every token seen (``[K, K]``, float64, symmetric)."""
        if self._half:
            k, b = self._sum.shape[0], self.BLOCK
            for i in range(b, k, b):  # lower block rows <- transposed upper block columns
                self._sum[i:i + b, :i] = self._sum[:i, i:i + b].t()
            self._half = False
        return self._sum

    def add_(self, x: torch.Tensor) -> None:
        """Add the tokens of ``x [..., K]`` (one calibration batch).

        bf16 activations on the CPU are multiplied on oneDNN's bf16 path with fp32 outputs (AMX /
        AVX512-BF16 where the CPU has them; :func:`_bf16_exact_products`): their values are exact in
        bf16, so every product is exact and only the fp32 accumulation rounds, as in the plain fp32
        product, at 2-3x its speed. fp32 inputs keep the full-precision product."""
        exact_bf16 = x.dtype == torch.bfloat16 and x.device.type == "cpu"
        x = x.reshape(-1, x.shape[-1]).to(torch.float32)  # [tokens, K]
        k, b = x.shape[1], self.BLOCK
        with _bf16_exact_products(exact_bf16):
            if k <= b:
                self._sum.add_(torch.mm(x.t(), x))  # this batch's fp32 product, then the exact fp64 add
            else:
                xt = x.t()
                for i in range(0, k, b):  # block row i, columns i.. (the diagonal block and right of it)
                    self._sum[i:i + b, i:].add_(torch.mm(xt[i:i + b], x[:, i:]))  # [b, K - i]
                self._half = True
        self.n_tokens += x.shape[0]

    def upper(self) -> torch.Tensor:
        """The entries of the sum a reduction needs, flat (float64): its blocks on and above the
        diagonal while only those are filled (``add_``; ~0.6x the matrix for K = 1536), else all."""
        if not self._half:
            return self._sum.reshape(-1)  # a view: reduced in place
        k, b = self._sum.shape[0], self.BLOCK
        return torch.cat([self._sum[i:i + b, i:].reshape(-1) for i in range(0, k, b)])

    def load_upper_(self, flat: torch.Tensor) -> None:
        """Put back what :meth:`upper` gave (summed over ranks, say)."""
        if not self._half:
            if flat.data_ptr() != self._sum.data_ptr():
                self._sum.copy_(flat.view_as(self._sum))
            return
        k, b, at = self._sum.shape[0], self.BLOCK, 0
        for i in range(0, k, b):
            block = self._sum[i:i + b, i:]
            block.copy_(flat[at:at + block.numel()].view_as(block))
            at += block.numel()

    def merge_(self, other: "InputStats") -> "InputStats":
        """Add another run's sums (same layer, other tokens)."""
        self.xtx.add_(other.xtx.to(device=self._sum.device, dtype=torch.float64))
        self.n_tokens += other.n_tokens
        return self

    def release_(self) -> None:
        """Free the sum (e.g. once a distributed run has sent it to the rank that solves the layer)."""
        self._sum = torch.empty(0, dtype=self._sum.dtype, device=self._sum.device)
        self._half = False

    def hessian(self) -> torch.Tensor:
        """GPTQ's ``H = 2 X X^T / n`` (``[K, K]``, fp32): each float64 entry times ``2 / n``, rounded
        once to fp32 (no float64 temporary). While only the blocks on and above the diagonal are
        filled (``add_``), only those are scaled and the blocks below mirror them in fp32: the
        same values as scaling the mirrored sum (an entry-wise product), at half the float64 reads
        and no float64 mirroring (a rank of a distributed GPTQ does this for every Hessian)."""
        s, scale = self._sum, 2.0 / max(self.n_tokens, 1)
        H = torch.empty(s.shape, dtype=torch.float32, device=s.device)
        if not self._half:
            return torch.mul(s, scale, out=H)
        k, b = s.shape[0], self.BLOCK
        for i in range(0, k, b):  # block row i: the diagonal block and right of it
            torch.mul(s[i:i + b, i:], scale, out=H[i:i + b, i:])
        for i in range(b, k, b):  # lower block rows <- transposed upper block columns (as ``xtx``)
            H[i:i + b, :i] = H[:i, i:i + b].t()
        return H


@dataclass
class BlockStep:
    """One decoder block as the runner hands it to the caller.

    ``block`` is on the working device; ``inputs[i]`` / ``args[i]`` / ``kwargs[i]`` are what the
    model passed it for calibration batch ``i``; ``linear_names`` are the block-relative names of
    its linear layers (nn.Linear / Conv1D) not skipped, in execution order.
    """

    index: int
    name: str
    block: nn.Module
    inputs: list[torch.Tensor]
    args: list[tuple]
    kwargs: list[dict]
    linear_names: list[str]
    model_bytes: int = 0  # bytes of the whole model's weights (as stored): what TAIL_BUDGET is relative to
    world: int = 1  # processes sharing the calibration batches (distributed: this one holds ~1/world of them)
    _groups: list[list[str]] | None = field(default=None, repr=False)
    _final: set[str] = field(default_factory=set, repr=False)
    _replay: dict[str, list] = field(default_factory=dict, repr=False)  # child name -> its output per input
    _tails: dict[str, str] | None = field(default=None, repr=False)  # child name -> the linear layer it returns
    _tail_shape: dict[str, tuple] = field(default_factory=dict, repr=False)  # child name -> (tuple type, length)
    _tail_inputs: dict[str, list] = field(default_factory=dict, repr=False)  # that layer -> its input per input
    _tainted: list = field(default_factory=lambda: [False], repr=False)  # a changing layer ran in this forward

    #: recorded inputs of tail layers may take at most this fraction of the model's bytes (its weights
    #: as stored: ``model_bytes``), or, where that is less, as many bytes as the block inputs the engine
    #: holds anyway (:meth:`tail_budget`); 0 turns the shortcut off (less memory, attention and MLP
    #: recomputed)
    TAIL_BUDGET = 0.5

    def tail_budget(self) -> int:
        """Bytes the kept inputs of tail layers may take: ``max(TAIL_BUDGET x model_bytes / world, bytes
        of the block inputs)`` (0 when ``TAIL_BUDGET`` is 0).

        ``world``: a process of a distributed run holds ~1/world of the calibration activations, and
        gets as much of the model-relative budget: it keeps a tail layer's inputs exactly when one
        process holding every batch would, so no rank's peak memory is above the single process's
        (with the whole budget, SmolLM2's ranks at 128x512 kept ``down_proj``'s inputs, 100 MB each,
        which one process does not: +101 / +109 MB of peak RSS over it).

        The floor makes the shortcut depend on the calibration, not on how small the model is: the
        engine holds the block inputs through the whole block, so tail inputs kept up to their size
        at most double the activations it holds. It admits ``o_proj``'s inputs (as wide as the hidden
        state in Llama-like blocks) at every calibration size, and those cost no peak memory: the
        attention's outputs, which the engine records anyway (as many bytes), replace them batch by
        batch (:meth:`_replaying` frees each kept input once its output is recorded). ``down_proj``'s
        (2.7x wider in SmolLM2 / Llama) are kept only where the model-relative budget has room. A
        model whose weights outweigh its calibration activations (a 7B model at bf16 below ~0.8M
        tokens) gets the model-relative budget alone, as before."""
        if self.TAIL_BUDGET <= 0:
            return 0
        held = sum(h.numel() * h.element_size() for h in self.inputs)
        return int(max(self.TAIL_BUDGET * self.model_bytes / max(self.world, 1), held))

    def module(self, name: str) -> nn.Module:
        """The module now at block-relative ``name`` (a QuantLinear once the caller replaced it)."""
        return self.block.get_submodule(name)

    def mark_final(self, names: list[str]) -> None:
        """Promise that the named linear layers will not change again in this block.

        A child of the block (e.g. ``self_attn``) whose linear layers are all final, and whose
        input depends on final layers only, then computes the same output in every later pass:
        the first pass that runs it whole records its output, later passes (``collect_input_stats``,
        ``run``) replay it instead of recomputing it. A child that returns the output of its last
        linear layer as is (attention -> ``o_proj``, MLP -> ``down_proj``) is replayed even earlier:
        the pass that collected that layer's input recorded it, and later passes run only that
        layer on it (``tail_layers``)."""
        self._final.update(names)

    @torch.no_grad()
    def run(self, hooks: dict[str, Callable[[nn.Module, torch.Tensor, torch.Tensor], None]] | None = None,
            keep_outputs: bool = True) -> list[torch.Tensor] | None:
        """Run the block on every captured input, calling ``hooks[name](module, x, y)`` with each
        input ``x`` and output ``y`` of the named linear layers."""
        def make(fn):
            def hook(module, args, output):
                fn(module, args[0], output)
            return hook

        handles = [self.module(name).register_forward_hook(make(fn)) for name, fn in (hooks or {}).items()]
        outputs = [] if keep_outputs else None
        try:
            with self._replaying(watch=set(hooks or {})) as at:
                for i, (x, a, kw) in enumerate(zip(self.inputs, self.args, self.kwargs)):
                    at[0] = i
                    out = self.block(x, *a, **kw)
                    if outputs is not None:
                        outputs.append(out[0] if isinstance(out, (tuple, list)) else out)
        finally:
            for h in handles:
                h.remove()
        return_freed_memory()
        return outputs

    @torch.no_grad()
    def _advance_(self) -> None:
        """Replace each input by the block's output on it (one batch of outputs alive at a time)."""
        with self._replaying(record=False) as at:
            for i, (a, kw) in enumerate(zip(self.args, self.kwargs)):
                at[0] = i
                out = self.block(self.inputs[i], *a, **kw)
                self.inputs[i] = out[0] if isinstance(out, (tuple, list)) else out
                for outs in self._tail_inputs.values():  # batch i is done: free what only it needed
                    outs[i] = None
        self._replay.clear()
        self._tail_inputs.clear()
        return_freed_memory()

    @contextmanager
    def _replaying(self, watch: set[str] = frozenset(), record: bool = True):
        """During a pass over the inputs: replay the recorded children, record the children that
        may be replayed from now on (unless not ``record``). Children holding a ``watch``ed layer
        (hooked by the pass) run for real. Yields ``[i]``: the caller sets the input index."""
        at = [0]
        tainted = self._tainted  # a changing layer ran earlier in this forward
        tainted[0] = True  # (nothing final: every input depends on changing layers)
        if not self._final:
            yield at
            return
        linear = {n for n, m in self.block.named_modules() if n and is_linear(m)}
        changing = [n for n in self.linear_names if n not in self._final]  # may still change
        tails = self.tail_layers()
        recording: dict[str, list] = {}
        handles, patched = [], []

        def taint(module, args):
            tainted[0] = True

        fed: dict[str, list] = {}  # child name -> the kept tail inputs its forward runs on in this pass

        def record_hook(name):
            def hook(module, args, output):
                outs = recording[name]
                if outs[at[0]] is not None:  # called twice in one forward (shared module): never replayed
                    outs[at[0]] = _TWICE
                elif not tainted[0]:
                    outs[at[0]] = (output, _versions(output))
                    if name in fed:  # the recorded output replaces this batch's kept tail input: free it
                        fed[name][at[0]] = None  # (a later call in this forward runs the real forward)
            return hook

        def pre(module, args, kwargs):
            tainted[0] = False  # a new forward of the block starts
            return None

        for name, child in self.block.named_children():
            mine = [n for n in linear if n == name or n.startswith(name + ".")]
            if not mine or any(n in changing for n in mine):
                continue
            if any(n in watch for n in mine):
                continue
            if name in self._replay:
                patched.append((child, child.__dict__.get("forward")))  # e.g. accelerate's hooked forward
                child.forward = _replay_forward(child, self._replay[name], at)
                continue
            tail = tails.get(name)
            recorded = self._tail_inputs.get(tail)
            if recorded is not None and all(r is not None for r in recorded):
                patched.append((child, child.__dict__.get("forward")))
                child.forward = _tail_forward(child, self.module(tail), recorded, self._tail_shape[name], at)
                fed[name] = recorded
            if record:
                recording[name] = [None] * len(self.inputs)
                handles.append(child.register_forward_hook(record_hook(name)))
        handles += [self.module(n).register_forward_pre_hook(taint) for n in changing]
        handles.append(self.block.register_forward_pre_hook(pre, with_kwargs=True))
        try:
            yield at
        finally:
            for h in handles:
                h.remove()
            for child, own in patched:
                del child.forward
                if own is not None:
                    child.forward = own
            tainted[0] = True
        for name, outs in recording.items():
            if all(o is not None and o is not _TWICE for o in outs):
                self._replay[name] = outs
                self._tail_inputs.pop(tails.get(name), None)  # the whole output replaces the tail's input

    @torch.no_grad()
    def collect_input_stats(self, names: list[str] | None = None, stop_early: bool = True) -> dict[str, InputStats]:
        """``X^T X`` of the inputs of the named linear layers (default: all) over all inputs.

        Inputs are read by forward pre-hooks; layers that receive the very tensor the layer hooked
        just before them received (q/k/v, gate/up) share one :class:`InputStats` object, summed once.
        With ``stop_early`` each forward ends as soon as every named layer has its input, before
        the last of them runs (for a group of :meth:`sequential_groups`, before the first runs)."""
        names = list(names or self.linear_names)
        wanted = set(names)
        stats: dict[str, InputStats] = {}
        owners: set[str] = set()  # the layers whose input fills their stats; sharers read the same sums
        seen: set[str] = set()
        last: list = [None, None]  # (name, input tensor) of the hook that fired last in this forward

        # a group of layers that read one tensor (q/k/v, gate/up: sequential_groups' probe) needs the
        # first one's input only: the forward stops before the first of them runs
        shared = names[0] if len(names) > 1 and self._groups is not None and names in self._groups else None
        # the inputs of tail layers are kept for later replays (only once some layers are final)
        tails = set(self.tail_layers().values()) & wanted if self._final else set()
        kept: dict[str, list] = {}
        cur = [0]  # index of the input being run
        budget = self.tail_budget() if tails else 0
        tokens = sum(h.numel() // h.shape[-1] for h in self.inputs)  # rows of every tail layer's input

        def keep(name, x):
            """Keep the input of a tail layer, while it depends on final layers only and fits."""
            outs = kept.get(name)
            if outs is None:
                used = sum(r[0].numel() * r[0].element_size()
                           for o in list(self._tail_inputs.values()) + list(kept.values()) for r in o if r)
                if used + x.shape[-1] * x.element_size() * tokens > budget:  # this layer's inputs, every batch
                    tails.discard(name)
                    return
                outs = kept[name] = [None] * len(self.inputs)
            if self._tainted[0] or outs[cur[0]] is not None:  # depends on a changing layer, or ran twice
                tails.discard(name)
                del kept[name]
                return
            outs[cur[0]] = (x, x._version)

        def make(name):
            def pre_hook(module, args):
                x = args[0]
                if name in tails:
                    keep(name, x)
                if name not in stats:
                    if last[1] is x and last[0] in stats:  # same tensor as the previous layer's input
                        stats[name] = stats[last[0]]
                    else:
                        k = _in_features(module)
                        stats[name] = InputStats.zeros(k, device=x.device)
                        owners.add(name)
                if name in owners:
                    stats[name].add_(x)
                last[:] = [name, x]
                seen.add(name)
                if name == shared:  # the probe found the group reading this very tensor: one input is all
                    for n in names:
                        stats[n] = stats[name]
                    seen.update(names)
                if stop_early and seen >= wanted:
                    raise _StopForward
            return pre_hook

        handles = [self.module(n).register_forward_pre_hook(make(n)) for n in names]
        try:
            with self._replaying(watch=wanted) as at:
                for i, (x, a, kw) in enumerate(zip(self.inputs, self.args, self.kwargs)):
                    at[0] = cur[0] = i
                    seen.clear()
                    last[:] = [None, None]
                    try:
                        self.block(x, *a, **kw)
                    except _StopForward:
                        pass
        finally:
            for h in handles:
                h.remove()
        for name in tails & set(kept):  # every input kept (a layer never reached keeps nothing)
            if all(r is not None for r in kept[name]):
                self._tail_inputs[name] = kept[name]
        missing = wanted - set(stats)
        if missing:
            raise RuntimeError(f"{self.name}: the block's forward never reached {sorted(missing)}")
        return_freed_memory()
        return stats

    def tail_layers(self) -> dict[str, str]:
        """Children of the block that return the output of one of their linear layers as is
        (``self_attn`` -> ``self_attn.o_proj``, ``mlp`` -> ``mlp.down_proj``): child name -> that
        layer. Found by the block's probe forward (:meth:`_probe_`): the child's output (or the
        first item of its output tuple, the others being None) is the very tensor the layer
        returned, unchanged since (same in-place version)."""
        if self._tails is None:
            try:
                self._probe_()
            except Exception:  # a block that cannot run on one row: no shortcut (everything recomputed)
                self._tails = {}
        return self._tails

    def sequential_groups(self) -> list[list[str]]:
        """The linear layers in execution order, grouped by shared input (q/k/v, gate/up ...):
        quantizing group by group, each group sees the outputs of the already-changed ones."""
        if self._groups is None:
            self._probe_()
        return self._groups

    def _probe_(self) -> None:
        """One forward of the block on one row, watched for what :meth:`tail_layers` and
        :meth:`sequential_groups` have not found yet (one probe per block serves both); the
        forward's error, if any, is raised."""
        outs: dict[str, tuple] = {}
        got: dict[str, Any] = {}
        order: list[tuple[str, torch.Tensor]] = []
        linear = [n for n, m in self.block.named_modules() if n and is_linear(m)]

        def on_linear(name):
            def hook(module, args, output):
                outs[name] = (output, _versions(output))
            return hook

        def on_child(name):
            def hook(module, args, output):
                got[name] = output
            return hook

        def on_input(name):
            def hook(module, args):
                order.append((name, args[0]))  # keeps the tensor alive: identities stay unique
            return hook

        handles = []
        if self._tails is None:
            handles += [self.module(n).register_forward_hook(on_linear(n)) for n in linear]
            handles += [c.register_forward_hook(on_child(n)) for n, c in self.block.named_children()]
        if self._groups is None:
            handles += [self.module(n).register_forward_pre_hook(on_input(n)) for n in self.linear_names]
        try:
            with torch.no_grad():
                self.block(self.inputs[0][:1], *self.args[0], **_first_row(self.kwargs[0]))
        finally:
            for h in handles:
                h.remove()
        if self._tails is None:
            self._tails = {}
            for name, out in got.items():
                if isinstance(out, (tuple, list)) and out and all(o is None for o in out[1:]):
                    structure, y = type(out), out[0]
                elif isinstance(out, torch.Tensor):
                    structure, y = None, out
                else:
                    continue
                mine = [n for n in linear if n.startswith(name + ".")]
                for n in mine:
                    o, v = outs.get(n, (None, None))
                    if o is y and _versions(y) == v:
                        self._tails[name] = n
                        self._tail_shape[name] = (structure, len(out) if structure else 0)
        if self._groups is None:
            groups: list[list[str]] = []
            last_input = None
            for name, x in order:
                if any(name in g for g in groups):
                    continue
                if last_input is not None and x is last_input:
                    groups[-1].append(name)
                else:
                    groups.append([name])
                last_input = x
            missing = [n for n in self.linear_names if not any(n in g for g in groups)]
            self._groups = groups + [[n] for n in missing]


def _versions(obj) -> list[int]:
    """In-place version counters of the tensors in a module output (tensor, tuple, None ...)."""
    if isinstance(obj, torch.Tensor):
        return [obj._version]
    if isinstance(obj, (tuple, list)):
        return [v for o in obj for v in _versions(o)]
    return []


def _replay_forward(child: nn.Module, outputs: list, at: list):
    """A ``forward`` for ``child`` that returns its recorded output for input ``at[0]``; if that
    output was changed in place since (by code after the child), it runs the real forward."""
    real = child.forward  # the forward it had (its class's, or an instance attribute such as accelerate's)

    def forward(*args, **kwargs):
        out, versions = outputs[at[0]]
        if _versions(out) == versions:
            return out
        return real(*args, **kwargs)
    return forward


def _tail_forward(child: nn.Module, layer: nn.Module, inputs: list, shape: tuple, at: list):
    """A ``forward`` for ``child`` that runs only its tail ``layer`` on the layer's recorded input
    for input ``at[0]`` (the child returns that layer's output as is); if the recorded input was
    released (its output recorded in its stead) or changed in place since, it runs the real forward."""
    real = child.forward
    structure, length = shape

    def forward(*args, **kwargs):
        kept = inputs[at[0]]
        if kept is None or kept[0]._version != kept[1]:  # released, or changed in place since
            return real(*args, **kwargs)
        x = kept[0]
        y = layer(x)
        return y if structure is None else structure((y,) + (None,) * (length - 1))
    return forward


def _in_features(m: nn.Module) -> int:
    """Input width of an nn.Linear, GPT-2 Conv1D (weight ``[in, out]``) or QuantLinear."""
    return m.weight.shape[0] if is_conv1d(m) else m.in_features


def _first_row(kwargs: dict) -> dict:
    """Slice batch-shaped kwargs to their first row (for a one-row probe forward)."""
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] > 1:
            out[k] = v[:1]
        elif isinstance(v, tuple) and all(isinstance(t, torch.Tensor) for t in v):
            out[k] = tuple(t[:1] if t.dim() >= 1 and t.shape[0] > 1 else t for t in v)
        else:
            out[k] = v
    return out


def block_linear_names(block: nn.Module, block_name: str, skip: list[str]) -> list[str]:
    """Block-relative names of the linear layers in ``block`` whose full name is not skipped."""
    return [n for n, m in block.named_modules()
            if n and is_linear(m) and not matches(f"{block_name}.{n}", skip)]


def iterate_blocks(model: nn.Module, batches: list[torch.Tensor], skip: list[str] | None = None, device=None,
                   load_block: Callable[[int, str, nn.Module], None] | None = None,
                   release_block: Callable[[int, str, nn.Module], None] | None = None,
                   progress: bool = False, desc: str = "calibrate",
                   check: Callable[[BaseException | None, str], None] | None = None,
                   world: int = 1) -> Iterator[BlockStep]:
    """Yield a :class:`BlockStep` per decoder block, true-sequentially.

    After the caller's loop body has changed ``step.block``, the runner runs the changed block on
    the same inputs and feeds its outputs to the next block. ``device`` (default: where the model's
    first parameter is) is where each block runs; the block goes back to its own device after.
    ``load_block(i, name, block)`` / ``release_block(...)`` let a streaming caller materialise a
    block's weights before its turn and free them after (see hfcompress.streaming).
    ``check(error_or_None, where)`` (distributed runs: every rank calls it at the same points) is
    called after each of the runner's own steps (capture, load, advance, release) with the step's
    error, so a failure on one rank ends every rank (see hfcompress.distributed). ``world``: the
    number of processes sharing ``batches`` (:meth:`BlockStep.tail_budget`).
    """
    skip = skip or []
    prefix, blocks = find_blocks(model)
    if device is None:
        device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    device = torch.device(device)
    def guarded(fn, where):
        if check is None:
            return fn()
        err, out = None, None
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - handed to check(), which raises on every rank
            err = e
        check(err, where)
        return out

    hidden, args, kwargs = guarded(lambda: capture_block_inputs(model, batches, device=device), "capturing inputs")
    return_freed_memory()  # the capture's temporaries, scattered between the kept inputs
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # meta blocks count too
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(blocks), desc=desc, unit="block")
    for i in range(len(blocks)):
        name = f"{prefix}.{i}" if prefix else str(i)
        def load(i=i, name=name):
            if load_block is not None:
                load_block(i, name, blocks[i])
            block = blocks[i]
            home = next((p.device for p in block.parameters()), device)
            block.to(device)
            return home, BlockStep(i, name, block, hidden, args, kwargs, block_linear_names(block, name, skip),
                                   model_bytes=weight_bytes, world=world)

        home, step = guarded(load, f"{name}: loading")
        yield step

        def advance(i=i, name=name, step=step, home=home):
            block = blocks[i]  # the caller may have replaced modules inside it
            step._advance_()  # step.inputs now holds the block's outputs
            block.to(home)
            if release_block is not None:
                release_block(i, name, block)

        guarded(advance, f"{name}: advancing")
        hidden = step.inputs
        if bar is not None:
            bar.update(1)  # tqdm shows blocks done / total and the ETA
    if bar is not None:
        bar.close()
