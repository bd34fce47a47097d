"""MoSConfig: Mixture of Shards (Wang et al., "MoS: Unleashing Parameter Efficiency of Low-Rank
Adaptation with Mixture of Shards", ICLR 2025)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig
from peft.utils import PeftType

#: the name peft knows the method by (PeftType.MOS, adapter_config.json "peft_type")
NAME = "mos"


@dataclass
class MoSConfig(PeftConfig):
    """LoRA whose A rows / B columns are assembled from global shard pools shared by all layers.

    Args:
        r: rank of the materialised LoRA (``delta W = B A * lora_alpha / r``).
        lora_alpha, lora_dropout: as in LoRA.
        shards_per_vector: *vector sharding*: each rank vector (a row of A, a column of B) is the
            concatenation of this many shards, each chosen independently. Must divide the vector length.
        private_rank: *shard privatisation*: this many of the ``r`` rank vectors of every layer are
            private (trained for that layer only); the other ``r - private_rank`` come from the pools.
        pool_ratio: size of each shard pool relative to the number of shard slots that draw from it
            (1.0 = as many shards as an unshared LoRA would need; 1/8 = 8x sharing). A pool is shared by
            all layers whose vectors have the same length.
        subset_selection: each layer draws its own random subset of the pool (``False``: every layer
            uses the same first shards, i.e. plain sharing, an ablation).
        pair_dissociation: A and B draw independent indices (``False``: B uses A's index pattern).
        seed: the per-layer index sets are drawn once from this seed (and the layer's name) and saved
            with the adapter.
        init_weights: ``True``: B pools and private B are zero (the adapter starts as identity, like
            LoRA). ``False``: random B (for tests).
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    shards_per_vector: int = 2
    private_rank: int = 1
    pool_ratio: float = 0.25
    subset_selection: bool = True
    pair_dissociation: bool = True
    seed: int = 0
    target_modules: Optional[Union[list[str], str]] = field(default=None)
    exclude_modules: Optional[Union[list[str], str]] = field(default=None)
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)
    modules_to_save: Optional[list[str]] = field(default=None)
    init_weights: bool = True

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PeftType(NAME.upper())
        for name in ("r", "shards_per_vector"):
            v = getattr(self, name)
            if not (isinstance(v, int) and v >= 1):
                raise ValueError(f"MoSConfig.{name} must be a positive integer, got {v!r}")
        if not (isinstance(self.private_rank, int) and 0 <= self.private_rank < self.r):
            raise ValueError(f"MoSConfig.private_rank must be an integer in [0, r={self.r}) (at least one rank "
                             f"vector comes from the shared pools), got {self.private_rank!r}")
        if not (0 < self.pool_ratio):
            raise ValueError(f"MoSConfig.pool_ratio must be > 0, got {self.pool_ratio!r}")
        if not (0 <= self.lora_dropout < 1):
            raise ValueError(f"MoSConfig.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)

    @property
    def public_rank(self) -> int:
        return self.r - self.private_rank

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r
