"""Checkpoints are pinned byte for byte: the format registry (and anything after it) must not
change what an existing format writes. The digests were taken from checkpoints written before
the int_group format moved into its own folder; a change here is a format change and needs a
new ``format_version``."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

import hfcompress
from tiny_models import inputs, llama_gqa

# sha256 over (model.safetensors bytes, quantization_config as sorted JSON)
PINNED = {
    "rtn-w4-g32": "8df2f35e5658e3d06b183820f55d8c31eaa5f15b46d0a7046d7e4c895f1b0205",
    "rtn-w3-sym-perchannel": "c2326c8d1f292b2a6e57be0c8d5d4f3749fef9e9d7b5ab99ddabf31600d3866f",
    "rtn-w8-g-1": "9809f4626b8e2653584f24c036db68e5f098605b1b59aef595653bc0b4a63986",
    # GPTQ with the identity for the inverse Hessian's factor (see write_checkpoint)
    "gptq-w4-g32-actorder": "7a87b70029481441515481b63cb4dd3806fbe02dd2fc270cc9d058548d25dbfb",
    "gptq-w2-g16-static": "f777a15935cb28a1fab640d3086ce1396c5b739c9093c010532f51eb87a98f05",
}


def _config(case: str):
    if case == "rtn-w4-g32":
        # min-max grids: these pins are about what the format writes, not about the grid search (whose
        # values may improve without a format change)
        return hfcompress.RTNConfig(bits=4, group_size=32, mse_clip=False, zero_point="int")
    if case == "rtn-w3-sym-perchannel":
        return hfcompress.RTNConfig(bits=3, group_size=-1, sym=True, mse_clip=False)
    if case == "rtn-w8-g-1":
        return hfcompress.RTNConfig(bits=8, group_size=-1, mse_clip=False, zero_point="int")  # (as above)
    if case == "gptq-w4-g32-actorder":
        return hfcompress.GPTQConfig(bits=4, group_size=32, act_order=True, static_groups=False, zero_point="int",
                                     mse_clip=False)  # min-max: as RTN's; g_idx groups, integer zeros
    if case == "gptq-w2-g16-static":
        return hfcompress.GPTQConfig(bits=2, group_size=16, act_order=True, static_groups=True, sym=True,
                                     mse_clip=False)
    raise KeyError(case)


def checkpoint_digest(path: str) -> str:
    """The digest of the checkpoint without the identity of the save that wrote it (a random id and
    tensor digests in the safetensors metadata and config.json, hfcompress.integrity): the file is
    re-serialized by safetensors with the remaining metadata, which gives the bytes a save wrote
    before save identities existed."""
    from safetensors import safe_open
    from safetensors.torch import save

    h = hashlib.sha256()
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        metadata = {k: v for k, v in (f.metadata() or {}).items() if not k.startswith("hfcompress.")}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    h.update(save(tensors, metadata=metadata))
    with open(os.path.join(path, "config.json")) as f:
        qconfig = json.load(f)["quantization_config"]
    qconfig.pop("save_id", None)
    h.update(json.dumps(qconfig, sort_keys=True).encode())
    return h.hexdigest()


def _identity_factor(H, damp, solve_inverse=None, flipped=False):
    return torch.eye(H.shape[0], dtype=H.dtype, device=H.device)


def write_checkpoint(case: str, out: str) -> str:
    """The case's checkpoint and its digest. GPTQ runs with the identity as the factor of ``H^-1``: no
    error is propagated, so its codes and grids are elementwise functions of the weights (what every CPU
    computes alike), while act-order, groups, ``g_idx`` and packing run as always. With the real factor
    the codes come from MKL's solves, whose last bits depend on the CPU type it dispatches to (and, for
    unaligned buffers, on alignment): codes on rounding ties moved between the project's machines and
    between runs, which is GPTQ's numerics, not the format this test pins."""
    import hfcompress.algorithms.gptq as G

    torch.manual_seed(0)
    model = llama_gqa(seed=3)
    batches = [inputs(batch=2, seq=16, seed=s) for s in range(2)]
    factor = G.inverse_hessian_cholesky
    if case.startswith("gptq"):
        G.inverse_hessian_cholesky = _identity_factor
    try:
        hfcompress.quantize_(model, _config(case), batches=batches)
    finally:
        G.inverse_hessian_cholesky = factor
    model.save_pretrained(out)
    return checkpoint_digest(out)


@pytest.mark.parametrize("case", sorted(PINNED))
def test_checkpoint_bytes_are_pinned(case, tmp_path):
    assert write_checkpoint(case, str(tmp_path / case)) == PINNED[case]


if __name__ == "__main__":  # prints the digests (run once when a format version changes)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        for case in sorted(PINNED):
            print(f'    "{case}": "{write_checkpoint(case, os.path.join(d, case))}",')
