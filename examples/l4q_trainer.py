"""L4Q with the transformers Trainer: quantization-aware LoRA that ends in a packed 3-bit checkpoint.

    python examples/l4q_trainer.py --model path/to/causal-lm --text train.txt --out l4q-w3g64
    python examples/l4q_trainer.py            # a tiny random Llama and a toy text: runs in seconds

1. ``get_peft_model(model, hfcompress.L4QConfig(bits=3, group_size=64))``: every linear layer of
   the blocks now computes with ``Q(W0 + s * B A)`` (learned step sizes and integer offsets).
2. ``Trainer`` trains it; ``hfcompress.L4QCallback`` freezes the step sizes for a warm-up and logs
   the clipped fraction / mean step; ``hfcompress.l4q.optimizer_groups`` gives the quantizer its
   own (small) learning rate.
3. ``hfcompress.l4q.export`` writes an int_group checkpoint (no LoRA branch) that
   ``AutoModelForCausalLM.from_pretrained`` loads after ``import hfcompress``; its logits equal
   the trained model's.
"""

from __future__ import annotations

import argparse

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

import hfcompress


class Blocks(torch.utils.data.Dataset):
    """Consecutive ``seq``-token blocks of a token stream, as causal-LM examples."""

    def __init__(self, ids: torch.Tensor, seq: int):
        n = ids.numel() // seq
        self.blocks = ids[:n * seq].view(n, seq)

    def __len__(self):
        return len(self.blocks)

    def __getitem__(self, i):
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a causal LM folder (default: a tiny random Llama)")
    ap.add_argument("--text", default=None, help="training text file (default: a toy repeated phrase)")
    ap.add_argument("--out", default="l4q-out")
    ap.add_argument("--bits", type=int, default=3)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--quantizer-lr", type=float, default=1e-5)
    args = ap.parse_args(argv)

    if args.model is None:
        model = tiny_llama()
        ids = torch.arange(64).repeat(40) % 256
    else:
        from transformers import AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(args.model)
        ids = tok(open(args.text, encoding="utf-8").read(), return_tensors="pt").input_ids[0]

    # 1. L4Q as a PEFT method
    config = hfcompress.L4QConfig(r=16, lora_alpha=32, bits=args.bits, group_size=args.group_size,
                                  init_scales="mse")
    pm = get_peft_model(model, config)
    pm.print_trainable_parameters()

    # 2. the Trainer, with the L4Q callback and a separate learning rate for step sizes/offsets
    optimizer = torch.optim.AdamW(hfcompress.l4q.optimizer_groups(pm, lr=args.lr, quantizer_lr=args.quantizer_lr))
    targs = TrainingArguments(output_dir=args.out + "-trainer", max_steps=args.steps, per_device_train_batch_size=4,
                              learning_rate=args.lr, warmup_steps=max(1, args.steps // 10), logging_steps=5,
                              report_to=[], save_strategy="no", use_cpu=not torch.cuda.is_available())
    callback = hfcompress.L4QCallback(freeze_scales_steps=args.steps // 10)
    Trainer(model=pm, args=targs, train_dataset=Blocks(ids, args.seq), callbacks=[callback],
            optimizers=(optimizer, None)).train()
    print("last L4Q stats:", {k: round(v, 5) for k, v in callback.history[-1].items()})

    # 3. export -> a plain hfcompress checkpoint, reloaded with from_pretrained
    pm.eval()
    x = Blocks(ids, args.seq)[0]["input_ids"][None].to(pm.device)
    with torch.no_grad():
        trained = pm(input_ids=x).logits
    hfcompress.l4q.export(pm, args.out)
    reloaded = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32).to(pm.device)
    from hfcompress.ops import set_cpu_fast_path

    previous = set_cpu_fast_path("off")  # bit-exactness is defined against the fp32 reference (the default
    try:  # CPU path computes quantized matmuls in bf16 for speed)
        with torch.no_grad():
            same = torch.equal(reloaded(input_ids=x).logits, trained)
    finally:
        set_cpu_fast_path(previous)
    print(f"exported to {args.out}; {type(reloaded.model.layers[0].mlp.down_proj).__name__} layers; "
          f"logits identical to the trained model: {same}")
    return same


if __name__ == "__main__":
    main()
