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
    # re-pinned when GPTQ's factor became one Cholesky (U = R^-1): its rounding moved codes on ties; with
    # the reference factor the bytes are the earlier pin's (test_gptq_pin_with_the_reference_factor)
    "gptq-w4-g32-actorder": "bcbea6a4387abc223663aff6128d01c6d34401e5ae368ebc9e3faae8c548dd76",
    "gptq-w2-g16-static": "7c98eda45d5df2db2354c94848568d27102a30cdfcebee00652aca715da1deb7",
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


def write_checkpoint(case: str, out: str) -> str:
    torch.manual_seed(0)
    model = llama_gqa(seed=3)
    batches = [inputs(batch=2, seq=16, seed=s) for s in range(2)]
    hfcompress.quantize_(model, _config(case), batches=batches)
    model.save_pretrained(out)
    return checkpoint_digest(out)


@pytest.mark.parametrize("case", sorted(PINNED))
def test_checkpoint_bytes_are_pinned(case, tmp_path):
    assert write_checkpoint(case, str(tmp_path / case)) == PINNED[case]


#: the digest of "gptq-w4-g32-actorder" before GPTQ's factor changed (Cholesky, inverse, Cholesky)
REFERENCE_FACTOR_PIN = "c49c6ebb767b2c68900604f467e22b9213f7a0f331ed54b8f7c9640135a34e06"


def test_gptq_pin_with_the_reference_factor(tmp_path, monkeypatch):
    """The GPTQ pin moved with GPTQ's numbers, not with the format: with the factor computed as GPTQ's
    reference does (``U = chol((H + λI)^-1)`` through the explicit inverse), the checkpoint is byte for
    byte the one pinned before."""
    import hfcompress.algorithms.gptq as G

    def reference_factor(H, damp, solve_inverse=None):
        H = H.clone()
        k = H.shape[0]
        H[range(k), range(k)] += damp * torch.mean(torch.diag(H))
        Hinv = torch.cholesky_solve(torch.eye(k), torch.linalg.cholesky(H))
        return torch.linalg.cholesky(Hinv, upper=True)

    monkeypatch.setattr(G, "inverse_hessian_cholesky", reference_factor)
    assert write_checkpoint("gptq-w4-g32-actorder", str(tmp_path / "ref")) == REFERENCE_FACTOR_PIN


if __name__ == "__main__":  # prints the digests (run once when a format version changes)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        for case in sorted(PINNED):
            print(f'    "{case}": "{write_checkpoint(case, os.path.join(d, case))}",')
