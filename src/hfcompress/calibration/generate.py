"""Calibration token ids sampled from the model itself (pass them as ``dataset=``).

The model's own distribution covers what it was trained on, not one domain, so GPTQ calibrated
on it does not over-fit a domain the way a single text does. Every sample starts from the BOS
token (or EOS when the tokenizer has none) and is drawn by plain ancestral sampling (no top-k /
top-p; end-of-turn tokens are kept, so an instruct model writes whole conversations), at
temperature 1.0 for even rows and 0.8 for odd rows, from a ``torch.Generator`` seeded with
``seed``: the same model, sizes, batch size and seed always give the same tokens. The result can
be cached as a safetensors file (token ids only).

Not the default: measured on SmolLM2-135M on CPU (benchmarks/calibration_sets.py), sampling the
calibration tokens one step at a time costs several times GPTQ's own quantization time (the
target is at most a quarter of it; benchmarks/README.md has the numbers).
"""

from __future__ import annotations

import os

import torch

TEMPERATURES = (1.0, 0.8)


@torch.no_grad()
def generate_calibration_ids(model, tokenizer, n_samples: int, seq_len: int, seed: int = 0,
                             batch_size: int = 32) -> torch.Tensor:
    """``n_samples`` sequences of ``seq_len`` sampled tokens: LongTensor ``[n_samples, seq_len]``."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("generated calibration needs a BOS or EOS token in the tokenizer to start from")
    for name, v in (("n_samples", n_samples), ("seq_len", seq_len), ("batch_size", batch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"generate_calibration_ids: {name} must be a positive int, got {v!r}")
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    temps = torch.tensor([TEMPERATURES[i % len(TEMPERATURES)] for i in range(n_samples)])  # [n]
    out = []
    for i in range(0, n_samples, batch_size):
        t = temps[i:i + batch_size, None]                                # [b, 1]
        x = torch.full((t.shape[0], 1), start, dtype=torch.long, device=device)
        past, rows = None, []
        for _ in range(seq_len):
            o = model(input_ids=x, past_key_values=past, use_cache=True)
            past = o.past_key_values
            probs = torch.softmax(o.logits[:, -1].float().cpu() / t, dim=-1)  # [b, vocab]
            nxt = torch.multinomial(probs, 1, generator=gen)             # [b, 1]
            rows.append(nxt)
            x = nxt.to(device)
        out.append(torch.cat(rows, dim=1))                               # [b, seq_len]
    return torch.cat(out)


def cached_generated_ids(model, tokenizer, n_samples: int, seq_len: int, cache_dir: str | None, seed: int = 0
                         ) -> torch.Tensor:
    """:func:`generate_calibration_ids`, read from / written to
    ``cache_dir/generated-n{n}-s{seq_len}-seed{seed}.safetensors`` when ``cache_dir`` is given
    (written atomically; an unreadable or mismatched cache file is regenerated, never trusted)."""
    from safetensors.torch import load_file, save_file

    path = None
    if cache_dir:
        path = os.path.join(cache_dir, f"generated-n{n_samples}-s{seq_len}-seed{seed}.safetensors")
        if os.path.isfile(path):
            try:
                ids = load_file(path)["input_ids"]
                if tuple(ids.shape) == (n_samples, seq_len) and ids.dtype == torch.long:
                    return ids
            except Exception:  # noqa: BLE001 - a damaged cache is regenerated
                pass
    ids = generate_calibration_ids(model, tokenizer, n_samples, seq_len, seed=seed)
    if path:
        try:
            os.makedirs(cache_dir, exist_ok=True)
            tmp = f"{path}.tmp{os.getpid()}"
            save_file({"input_ids": ids.contiguous()}, tmp)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only model directory: nothing cached
    return ids
