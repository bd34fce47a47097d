"""Sliding-window perplexity: the one evaluation used by ``hfcompress eval``, the demo and the
benchmarks.

The text is tokenized once (no special tokens); windows of ``window`` tokens advance by
``stride``; each window scores only the tokens not scored by an earlier window (the first
window scores all but its first token), so every token after the first is predicted exactly
once with up to ``window - stride`` tokens of context before it.
``perplexity = exp(total NLL / scored tokens)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Perplexity:
    perplexity: float
    nll: float          # mean negative log-likelihood per scored token (nats)
    n_tokens: int       # scored tokens
    window: int
    stride: int


@torch.no_grad()
def perplexity(model, tokenizer=None, text: str | None = None, ids: torch.Tensor | None = None, window: int = 512,
               stride: int = 256, max_tokens: int | None = None, batch_size: int = 4, progress: bool = False
               ) -> Perplexity:
    """Perplexity of ``model`` on ``text`` (tokenized with ``tokenizer``) or on token ``ids [T]``;
    ``max_tokens`` keeps the first tokens only."""
    if ids is None:
        if text is None or tokenizer is None:
            raise ValueError("perplexity needs text= and tokenizer=, or ids=")
        from .calibration.data import tokenize_text

        ids = tokenize_text(tokenizer, [text])
    ids = ids.reshape(-1)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if not 0 < stride <= window:
        raise ValueError(f"perplexity: stride={stride} must be in (0, window={window}]")
    if ids.numel() < 2:
        raise ValueError("perplexity: the text has fewer than 2 tokens")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    # (start, end, first scored position) of each window
    spans, scored_to = [], 1
    start = 0
    while scored_to < ids.numel():
        end = min(start + window, ids.numel())
        spans.append((start, end, scored_to))
        scored_to = end
        start += stride
        if end == ids.numel():
            break
    total, count = 0.0, 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(spans), desc="perplexity", unit="window")
    # windows of equal length are batched together
    for i in range(0, len(spans), batch_size):
        group = spans[i:i + batch_size]
        same = [s for s in group if s[1] - s[0] == group[0][1] - group[0][0]]
        for chunk in (same, [s for s in group if s not in same]):
            if not chunk:
                continue
            x = torch.stack([ids[s:e] for s, e, _ in chunk]).to(device)  # [b, L]
            logits = model(input_ids=x).logits.float()                    # [b, L, V]
            logp = F.log_softmax(logits[:, :-1], dim=-1)
            nll = -logp.gather(-1, x[:, 1:, None]).squeeze(-1)            # [b, L-1], nll of token t+1
            for row, (s, e, first) in enumerate(chunk):
                keep = nll[row, first - s - 1:]                           # tokens first..e-1
                total += keep.double().sum().item()
                count += keep.numel()
        if bar is not None:
            bar.update(len(group))
    if bar is not None:
        bar.close()
    mean = total / count
    return Perplexity(math.exp(mean), mean, count, window, stride)
