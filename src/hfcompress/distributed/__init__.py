"""Data-parallel calibration on ``torch.distributed`` (GPTQ, SpQR, EoRA: every calibrated method).

Launch the CLI with ``torchrun --nproc-per-node N -m hfcompress.cli.main quantize ...`` (or
``accelerate launch -m hfcompress.cli.main ...``), or call ``hfcompress.quantize`` /
``hfcompress.compensate`` in a program whose process group is initialised: calibration is then
distributed on its own. Per decoder block and per group of layers (q/k/v, o, gate/up, down):

1. each rank runs its share of the calibration batches (whole batches) through the block
   (``shard_batches``), summing each layer's ``XᵀX`` exactly (fp32 batch products, float64 sum:
   the reduced sum is the single process's, so is the checkpoint);
2. each layer's ``XᵀX`` is summed over the ranks into the layer's owner (``reduce``; an
   ``all_reduce`` when layers sharing one input have several owners);
3. layers are given to ranks by solve cost (:func:`plan.assign`, greedy LPT bin-packing); each
   owner solves its layers and broadcasts the result (the compressed layer's stored tensors:
   codes/scales/zeros..., or EoRA's ``B``/``A``). GPTQ instead splits a group of layers reading
   one input by output rows over all ranks (:mod:`.solve`): every rank gets the summed ``XᵀX``,
   GPTQ's factor (the inverse of the Hessian's Cholesky factor) is solved in column chunks shared
   out and gathered, each rank runs the column
   loop on its rows, packs and dequantizes them, and the packed rows (4-bit codes in int32 words)
   travel with their dequantized values;
4. every rank puts the same results in its block and advances its inputs through it.

Streaming (``hfcompress.quantize(dir, ...)``) composes: every rank reads the block it needs from
the shards; rank 0 alone writes, into the temporary folder it swaps in at the end. A rank that
raises ends the job on every rank with its error; a dead or hung rank ends it through the
collective timeout (``HFCOMPRESS_DIST_TIMEOUT``, seconds).
"""

from .context import (
    DistContext,
    DistributedError,
    agree,
    current,
    init_from_env,
    launched,
    rank_device,
    shard_batches,
    shutdown,
)
from .plan import assign, eora_cost, gptq_cost, imbalance

__all__ = [
    "DistContext",
    "DistributedError",
    "agree",
    "assign",
    "current",
    "eora_cost",
    "gptq_cost",
    "imbalance",
    "init_from_env",
    "launched",
    "rank_device",
    "shard_batches",
    "shutdown",
]
