"""Calibration engine: text -> token batches -> a block-by-block, true-sequential runner.

Usage (what GPTQ and EoRA do)::

    from hfcompress.calibration import get_calibration_batches, iterate_blocks

    batches = get_calibration_batches(tokenizer, dataset=None, n_samples=128, seq_len=512)
    #   dataset: None (the bundled mixed corpus), a text file path, a list of strings,
    #   or a datasets.Dataset with a "text" column -> list of LongTensor [b, seq_len]
    for step in iterate_blocks(model, batches, skip=["lm_head"], device="cuda", progress=True):
        # step.index, step.name ("model.layers.3"), step.block (on `device`),
        # step.inputs / step.args / step.kwargs: what the model passed the block per batch,
        # step.linear_names: block-relative linear layers in execution order
        for group in step.sequential_groups():          # e.g. [q,k,v], [o], [gate,up], [down]
            stats = step.collect_input_stats(group)     # name -> InputStats (.xtx float64, .n_tokens; merge_)
            for name in group:
                H = stats[name].hessian()               # 2 X^T X / n   [K, K]
                ...                                     # replace step.module(name) in step.block
            step.mark_final(group)                      # optional promise: these layers stay as they are
            #   now; later passes replay a child (e.g. self_attn) whose layers are all final
        # arbitrary statistics: step.run(hooks={name: fn(module, x, y)}) runs the block on all
        # inputs; step.run() returns the block's outputs.
    # leaving the loop body: the runner runs the *changed* block and feeds its outputs to the
    # next block (true-sequential). Only the current block is moved to `device`.

``iterate_blocks(..., load_block=f, release_block=g)`` lets a caller materialise a block's
weights just before its turn and free them after (hfcompress.streaming uses this to quantize
models larger than memory from their safetensors shards).
"""

from .blocks import BlockStep, InputStats, capture_block_inputs, find_blocks, iterate_blocks
from .data import EVAL_DOMAINS, bundled_text, eval_texts, get_calibration_batches, load_texts, tokenize_text

__all__ = [
    "EVAL_DOMAINS",
    "BlockStep",
    "InputStats",
    "bundled_text",
    "capture_block_inputs",
    "eval_texts",
    "find_blocks",
    "get_calibration_batches",
    "iterate_blocks",
    "load_texts",
    "tokenize_text",
]
