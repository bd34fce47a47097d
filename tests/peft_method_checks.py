"""PEFT's own common checks, for the hfcompress PEFT methods (Compacter, MoS): each check takes a
config factory (non-identity init, so save/load and switching cannot pass trivially) and a tiny
model builder, and asserts on values."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch
from peft import PeftModel, get_peft_model

from tiny_models import inputs

REPO_TESTS = os.path.dirname(__file__)


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def check_nonidentity_and_disable(make_config, build):
    model = get_peft_model(build(), make_config())
    x = inputs()
    y = logits(model, x)
    with model.disable_adapter():
        y_off = logits(model, x)
    assert torch.equal(y_off, logits(build(), x)), "disable_adapter must give exactly the base model"
    assert (y - y_off).abs().max() > 1e-3, "non-identity init must change the output"
    assert torch.equal(logits(model, x), y), "re-enabled adapter must give the same output"


def check_grads_only_on_adapter(make_config, build, prefix):
    model = get_peft_model(build(), make_config())
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(prefix in n for n in trainable), sorted(trainable)[:5]
    x = inputs()
    model(input_ids=x, labels=x).loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{n}: no gradient"
        else:
            assert p.grad is None, f"{n}: frozen parameter got a gradient"
    n_train, _ = model.get_nb_trainable_parameters()
    assert n_train == sum(p.numel() for p in model.parameters() if p.requires_grad)


def train_steps(model, steps=3, lr=1e-2, seed=0):
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    x = inputs(batch=4, seq=24, seed=seed + 5)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


def check_save_load(make_config, build, tmp_path):
    model = get_peft_model(build(), make_config())
    train_steps(model)
    x = inputs()
    ref = logits(model, x)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build(), tmp_path)
    assert torch.equal(logits(loaded, x), ref)
    return model, ref


def check_fresh_process_reload(make_config, build_name, tmp_path):
    """Save here; load in a fresh interpreter: without ``import hfcompress`` loading fails loudly,
    after it the logits are bit-identical."""
    from safetensors.torch import save_file

    import tiny_models

    model = get_peft_model(tiny_models.BUILDERS[build_name](), make_config())
    train_steps(model)
    x = inputs()
    save_file({"logits": logits(model, x).contiguous()}, str(tmp_path / "ref.safetensors"))
    model.save_pretrained(tmp_path / "adapter")
    code = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {REPO_TESTS!r})
        import tiny_models
        from peft import PeftModel
        from safetensors.torch import load_file
        try:
            PeftModel.from_pretrained(tiny_models.BUILDERS[{build_name!r}](), {str(tmp_path / "adapter")!r})
        except (KeyError, ValueError) as e:
            print("WITHOUT_HFCOMPRESS_FAILS", type(e).__name__)
        import hfcompress
        m = PeftModel.from_pretrained(tiny_models.BUILDERS[{build_name!r}](), {str(tmp_path / "adapter")!r})
        with torch.no_grad():
            y = m(tiny_models.inputs()).logits
        print("BIT_IDENTICAL", torch.equal(y, load_file({str(tmp_path / "ref.safetensors")!r})["logits"]))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "WITHOUT_HFCOMPRESS_FAILS" in out.stdout, out.stdout
    assert "BIT_IDENTICAL True" in out.stdout, out.stdout


def check_two_adapters(make_config, make_config_other, build, tmp_path):
    """load_adapter of a second adapter, set_adapter switching, delete_adapter."""
    first = get_peft_model(build(), make_config())
    first.save_pretrained(tmp_path / "a")
    second = get_peft_model(build(), make_config_other())
    second.save_pretrained(tmp_path / "b")
    x = inputs()
    ya, yb = logits(first, x), logits(second, x)
    assert not torch.equal(ya, yb)

    model = PeftModel.from_pretrained(build(), tmp_path / "a", adapter_name="a")
    model.load_adapter(tmp_path / "b", adapter_name="b")
    assert torch.equal(logits(model, x), ya)  # loading "b" leaves "a" active
    model.set_adapter("b")
    assert torch.equal(logits(model, x), yb)
    model.set_adapter("a")
    assert torch.equal(logits(model, x), ya)
    model.base_model.set_adapter("b")
    model.delete_adapter("a")
    assert list(model.peft_config) == ["b"]
    assert not any(".a." in k or k.endswith(".a") for k in model.state_dict())
    assert torch.equal(logits(model, x), yb)


def tiny_lm_dataset(n=32, seq=24, distinct=4):
    """A list of {"input_ids", "labels"} rows (Trainer's default collator stacks them): ``distinct``
    random sequences repeated, so a few steps can measurably fit them."""
    x = inputs(batch=distinct, seq=seq, seed=11)
    return [{"input_ids": x[i % distinct], "labels": x[i % distinct]} for i in range(n)]


def check_trainer(model, prefix, tmp_path):
    """A real transformers Trainer run: the loss falls and exactly the adapter params (``prefix``) change."""
    from transformers import Trainer, TrainingArguments

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=8, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                             logging_steps=1, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=tiny_lm_dataset())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-2:]) < sum(losses[:2])
    for n, p in model.named_parameters():
        assert (not torch.equal(p, before[n])) == (prefix in n), n
