"""Calibration text sampled from the model itself (``dataset="generated"``).

The model's own distribution covers what it was trained on, not one domain, so GPTQ calibrated
on it does not over-fit a domain the way a single text does. Samples start from the BOS token
(or EOS when the tokenizer has none) and are drawn with plain ancestral sampling at alternating
temperatures (1.0 and 0.8, batch by batch), seeded: the same model, sizes and seed always give
the same tokens. The result can be cached as a safetensors file (token ids only).
"""

from __future__ import annotations

import os

import torch

TEMPERATURES = (1.0, 0.8)


@torch.no_grad()
def generate_calibration_ids(model, tokenizer, n_samples: int, seq_len: int, seed: int = 0,
                             batch_size: int = 16) -> torch.Tensor:
    """``n_samples`` sequences of ``seq_len`` sampled tokens: LongTensor ``[n_samples, seq_len]``."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("generated calibration needs a BOS or EOS token in the tokenizer to start from")
    device = next(model.parameters()).device
    out = []
    for i in range(0, n_samples, batch_size):
        b = min(batch_size, n_samples - i)
        torch.manual_seed(seed + i)  # generate() samples from the global generator
        x = torch.full((b, 1), start, dtype=torch.long, device=device)
        y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=True,
                           temperature=TEMPERATURES[(i // batch_size) % len(TEMPERATURES)], top_k=0, top_p=1.0,
                           max_new_tokens=seq_len, min_new_tokens=seq_len, pad_token_id=tokenizer.eos_token_id)
        out.append(y[:, 1:seq_len + 1].cpu())
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
