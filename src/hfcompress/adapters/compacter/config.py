"""CompacterConfig: Compacter / Compacter++ (Karimi Mahabadi, Henderson, Ruder, NeurIPS 2021)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

#: the name peft knows the method by (PeftType.COMPACTER, adapter_config.json "peft_type")
NAME = "compacter"
PLACEMENTS = ("houlsby", "pfeiffer")
#: std of the shared S_i at initialisation (see CompacterConfig.init_std for why this value)
DEFAULT_SHARED_STD = 0.1
NON_LINEARITIES = ("gelu", "gelu_tanh", "relu", "silu", "swish", "tanh", "identity")


@dataclass
class CompacterConfig(PeftConfig):
    """Bottleneck adapters whose down/up projections are PHM layers ``H = sum_i kron(S_i, s_i t_i^T)``.

    Args:
        n: number of Kronecker terms and size of each shared ``S_i`` (n x n). Must divide the hidden
            size and the bottleneck size.
        reduction_factor: bottleneck ``d = hidden / reduction_factor``, rounded up to a multiple of ``n``.
        rank: rank of the per-layer "fast" weights ``s_i t_i^T`` (1 in the paper).
        placement: ``"houlsby"`` (Compacter: after the attention output and the MLP output of every
            block) or ``"pfeiffer"`` (Compacter++: after the MLP output only). Used to choose
            ``target_modules`` when they are not given.
        non_linearity: activation between down- and up-projection.
        target_modules: modules whose *output* gets an adapter (names or a regex); ``None`` picks them
            from ``placement`` for known architectures (Llama/Qwen/Mistral/Gemma/Phi-3, GPT-2, BERT/RoBERTa, T5).
            A target needs at least 2 outputs (a single output leaves nothing to factor: refused).
        init_weights: ``True``: rank-``r`` factors Glorot-uniform and zero biases (as the reference
            implementation), shared ``S_i`` ~ N(0, init_std), and the down-projection's ``s`` factor zero, so the
            adapter starts as the exact identity like PEFT's built-in methods (``act(0) = 0`` for every
            ``non_linearity``); the down-projection's factors get a gradient from the first step, the others from
            the second (as LoRA's A). ``False``: a non-identity random start (for tests).
        init_std: standard deviation of the shared ``S_i`` at initialisation. ``None`` (default): 0.1. The
            adapter is a polynomial of degree 6 in its factors (S_i enters both projections; 12 when two adapters
            are chained), so under SGD the scale of S decides between two failures, both measured on PEFT's
            checks (benchmarks/README.md): larger (0.3; or 1/sqrt(n), Xavier for n x n, this package's earlier
            default) overflows fp32 within PEFT's three SGD steps at lr 0.5 on inputs up to 89 in a fifth to
            two fifths of the draws; the reference implementation's 0.01 (with the exact-identity start) leaves
            factors unmoved after those steps (tests/test_compacter.py).
    """

    n: int = 4
    reduction_factor: float = 32
    rank: int = 1
    placement: str = "houlsby"
    non_linearity: str = "gelu"
    target_modules: Optional[Union[list[str], str]] = field(default=None)
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)
    modules_to_save: Optional[list[str]] = field(default=None)
    init_weights: bool = True
    init_std: Optional[float] = None

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType(NAME.upper())
        if not (isinstance(self.n, int) and self.n >= 1):
            raise ValueError(f"CompacterConfig.n must be a positive integer, got {self.n!r}")
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"CompacterConfig.rank must be a positive integer, got {self.rank!r}")
        if not (self.reduction_factor and self.reduction_factor > 0):
            raise ValueError(f"CompacterConfig.reduction_factor must be > 0, got {self.reduction_factor!r}")
        if self.placement not in PLACEMENTS:
            raise ValueError(f"CompacterConfig.placement must be one of {PLACEMENTS} "
                             f"('pfeiffer' is Compacter++), got {self.placement!r}")
        if self.non_linearity not in NON_LINEARITIES:
            raise ValueError(f"CompacterConfig.non_linearity must be one of {NON_LINEARITIES}, "
                             f"got {self.non_linearity!r}")
        if self.init_std is not None and not self.init_std > 0:
            raise ValueError(f"CompacterConfig.init_std must be > 0, got {self.init_std!r}")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)

    def shared_std(self) -> float:
        """The standard deviation ``S_i`` is drawn with (``init_std``, or 0.1)."""
        return self.init_std if self.init_std is not None else DEFAULT_SHARED_STD

    def bottleneck(self, hidden: int) -> int:
        """``d = hidden / reduction_factor`` rounded up to a multiple of ``n`` (at least ``n``)."""
        d = max(1, round(hidden / self.reduction_factor))
        return -(-d // self.n) * self.n

    def num_parameters(self, output_sizes: list[int]) -> int:
        """Trainable parameters of this config with one adapter on each module of the given output
        sizes ``k``: ``n^3 + sum_k [2 r (k + d_k) + k + d_k]`` (``d_k = bottleneck(k)``; the last
        ``k + d_k`` are the up/down biases; ``n^3`` is the shared ``S`` counted once)."""
        return self.n ** 3 + sum(2 * self.rank * (k + self.bottleneck(k)) + k + self.bottleneck(k) for k in output_sizes)
