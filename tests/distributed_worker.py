"""One rank of a distributed calibration test (started by tests/test_distributed.py with RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT set, as torchrun sets them).

    python distributed_worker.py SCENARIO OUT_DIR [SRC_DIR]

``equal``: GPTQ (one, two, and three / two calibration batches per rank; the first two with every
factor's chunks shared out, the third with the narrow factors solved whole on each rank, as shipped),
SpQR and EoRA in memory; every rank saves what it ended with to OUT_DIR/rank{r}-*.safetensors (and
what the first and third GPTQ jobs sent, per kind, to rank{r}-sent-*.json); then a job whose config differs
between the ranks, whose error each rank saves to OUT_DIR/rank{r}-mismatch.json. ``raise`` / ``die`` / ``hang``:
GPTQ streaming SRC_DIR into OUT_DIR/model where rank 1 raises, exits or stops answering when it
solves its first layer of block 1. Rank 0 reports the outcome in OUT_DIR/rank0.json.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta

sys.path.insert(0, os.path.dirname(__file__))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from tiny_models import VOCAB, llama_gqa  # noqa: E402

import hfcompress  # noqa: E402
from hfcompress.distributed.context import timeout  # noqa: E402


def batches(n_rows: int, batch: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return list(torch.randint(0, VOCAB, (n_rows, 32), generator=g).split(batch))


def gptq_model(n_rows: int, batch: int):
    model = llama_gqa()
    hfcompress.quantize_(model, hfcompress.GPTQConfig(bits=4, group_size=32), batches=batches(n_rows, batch))
    return model


def spqr_model():
    model = llama_gqa()
    hfcompress.quantize_(model, hfcompress.SpQRConfig(bits=3, group_size=16, outlier_threshold=0.5),
                         batches=batches(4, 2))
    return model


def eora_adapter():
    original = llama_gqa()
    compressed = llama_gqa()
    hfcompress.quantize_(compressed, hfcompress.RTNConfig(bits=3, group_size=32))
    config = hfcompress.EoRAConfig(rank=4, dataset=torch.cat(batches(4, 2)), n_samples=4, seq_len=32, batch_size=2)
    peft_model = hfcompress.compensate(compressed, original, config)
    return {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}


def tensors(model_or_dict) -> dict[str, torch.Tensor]:
    d = model_or_dict if isinstance(model_or_dict, dict) else model_or_dict.state_dict()
    return {k: v.detach().contiguous().clone() for k, v in d.items()}


def fault(kind: str):
    """A GPTQ config whose quantize_group fails on rank 1 at its first layer of block 1."""
    cfg = hfcompress.GPTQConfig(bits=4, group_size=32, n_samples=8, seq_len=32)
    solve = cfg.quantize_group

    def quantize_group(modules, H, where):
        if dist.get_rank() == 1 and ".layers.1." in where:
            if kind == "raise":
                raise ValueError(f"injected fault at {where}")
            if kind == "die":
                os._exit(17)
            time.sleep(3600)  # hang
        return solve(modules, H, where)

    cfg.quantize_group = quantize_group
    return cfg


def main() -> None:
    scenario, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo", timeout=timeout())
    rank = dist.get_rank()
    if scenario == "equal":
        from hfcompress.distributed import current, solve

        def sent_by(job, name):  # bytes one GPTQ job sent, per kind
            before = dict(current().sent)
            save_file(tensors(job()), os.path.join(out, f"rank{rank}-{name}.safetensors"))
            with open(os.path.join(out, f"rank{rank}-sent-{name}.json"), "w") as f:
                json.dump({k: v - before.get(k, 0) for k, v in current().sent.items()}, f)

        wide = solve.FACTOR_SHARE_MIN_K
        solve.FACTOR_SHARE_MIN_K = 0  # the tiny model's factors are narrow: share them out all the same
        sent_by(lambda: gptq_model(4, 2), "gptq-1batch")
        save_file(tensors(gptq_model(8, 2)), os.path.join(out, f"rank{rank}-gptq-2batches.safetensors"))
        solve.FACTOR_SHARE_MIN_K = wide  # as shipped: every rank solves these factors whole
        sent_by(lambda: gptq_model(10, 2), "gptq-5batches")
        for name, result in (("spqr", spqr_model), ("eora", eora_adapter)):
            save_file(tensors(result()), os.path.join(out, f"rank{rank}-{name}.safetensors"))
        try:  # ranks that disagree on the job (here: the group size) are refused before any work
            hfcompress.quantize_(llama_gqa(), hfcompress.GPTQConfig(bits=4, group_size=32 if rank == 0 else 16),
                                 batches=batches(4, 2))
            mismatch = None
        except Exception as e:  # noqa: BLE001 - the test reads it
            mismatch = f"{type(e).__name__}: {e}"
        with open(os.path.join(out, f"rank{rank}-mismatch.json"), "w") as f:
            json.dump({"error": mismatch}, f)
        dist.destroy_process_group()
        return
    src = sys.argv[3]
    t0 = time.perf_counter()
    try:
        hfcompress.quantize(src, fault(scenario), out_dir=os.path.join(out, "model"), batches=batches(8, 2))
        outcome = {"error": None}
    except Exception as e:  # noqa: BLE001 - the test reads what each rank saw
        outcome = {"error": f"{type(e).__name__}: {e}"}
    outcome["seconds"] = time.perf_counter() - t0
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(outcome, f)
    sys.exit(1 if outcome["error"] else 0)


if __name__ == "__main__":
    main()
