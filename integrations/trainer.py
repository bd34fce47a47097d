"""Trainer callbacks. Import-light: only ``transformers.trainer_callback`` and torch at import
time; nothing here imports the Trainer or PEFT (LoRA layers are read by their public attributes).

:class:`LoRAPruneCallback` — LoRAPrune: prunes head groups and MLP channels of a PEFT LoRA
model while the Trainer fine-tunes it, with importance estimated from the LoRA weights and
gradients only (see hfcompress.prune.importance).

:class:`L4QCallback` — L4Q: freezes the learned step sizes for a warm-up and logs the clipped
fraction and mean step size of the L4Q layers (section at the end of this file).
"""

from __future__ import annotations

import torch
from transformers.trainer_callback import TrainerCallback

from hfcompress.prune.groups import (
    ATTN_PROJ,
    MLP_PROJ,
    StructuredMasks,
    attention_group_sums,
    mlp_channel_sums,
)
from hfcompress.prune.importance import EMA, lora_importance, normalise
from hfcompress.prune.schedule import SCHEDULES


def _lora_tensors(module, adapter: str | None):
    """``(W, A, B, G_A, G_B, scaling)`` of a PEFT LoRA layer, or None when it is not one (or has no
    gradients yet). Read through PEFT's public layer attributes (lora_A, lora_B, scaling)."""
    lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
    if lora_a is None or lora_b is None or not hasattr(module, "get_base_layer"):
        return None
    name = adapter or (module.active_adapters[0] if module.active_adapters else None)
    if name not in lora_a:
        return None
    a, b = lora_a[name].weight, lora_b[name].weight  # [r, in], [out, r]
    if a.grad is None or b.grad is None:
        return None
    return module.get_base_layer().weight, a.detach(), b.detach(), a.grad, b.grad, module.scaling[name]


class LoRAPruneCallback(TrainerCallback):
    """Prune a PEFT LoRA model during ``Trainer.train()``, LoRAPrune style.

    Every optimizer step, each LoRA layer of the (Llama/Qwen2/Mistral) blocks scores its
    merged weights with ``|Ĝ ⊙ (W + s·B·A)|`` (Ĝ from the LoRA gradients), summed per head
    group / MLP channel, normalised per block and smoothed by an EMA (``ema`` weight on the
    past). Every ``prune_every`` steps the masks drop the lowest-scoring groups until the
    scheduled sparsity (cubic from 0 after ``warmup_steps`` to ``target_sparsity`` at
    ``max_steps - cooldown_steps``) of head groups and of MLP channels is reached in each
    block other than the first ``keep_first_layers`` and last ``keep_last_layers``.
    Masked heads/channels are zeroed at the inputs of ``o_proj`` and ``down_proj``; after
    training, :func:`hfcompress.prune.export` removes them for real.

    LoRA must target at least one attention projection and one MLP projection of every
    pruned block (e.g. ``target_modules="all-linear"``); every targeted projection adds to the
    importance of its groups.
    """

    def __init__(self, target_sparsity: float = 0.5, schedule: str = "cubic", warmup_steps: int = 0,
                 cooldown_steps: int = 0, prune_every: int = 10, ema: float = 0.9, keep_first_layers: int = 1,
                 keep_last_layers: int = 1, adapter_name: str | None = None):
        if not isinstance(target_sparsity, (int, float)) or not 0.0 <= target_sparsity < 1.0:
            raise ValueError(f"LoRAPruneCallback: target_sparsity must be in [0, 1), got {target_sparsity!r}")
        if schedule not in SCHEDULES:
            raise ValueError(f"LoRAPruneCallback: schedule={schedule!r} is unknown; known: {sorted(SCHEDULES)}")
        for name, v in (("warmup_steps", warmup_steps), ("cooldown_steps", cooldown_steps),
                        ("prune_every", prune_every)):
            if not isinstance(v, int) or isinstance(v, bool) or v < (1 if name == "prune_every" else 0):
                raise ValueError(f"LoRAPruneCallback: {name} must be an int >= {1 if name == 'prune_every' else 0}, "
                                 f"got {v!r}")
        self.target_sparsity = float(target_sparsity)
        self.schedule = SCHEDULES[schedule]
        self.warmup_steps, self.cooldown_steps, self.prune_every = warmup_steps, cooldown_steps, prune_every
        self.ema = EMA(ema)
        self.keep_first_layers, self.keep_last_layers = keep_first_layers, keep_last_layers
        self.adapter_name = adapter_name
        self.masks: StructuredMasks | None = None
        self.total_steps = 0
        self.history: list[tuple[int, float]] = []  # (step, sparsity) at each pruning

    # -- Trainer events -------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("LoRAPruneCallback needs the model (use it inside transformers.Trainer)")
        self.masks = StructuredMasks(model, self.keep_first_layers, self.keep_last_layers)
        self.masks.method = "loraprune"
        self._check_lora(model)
        self.masks.install_(model)
        self.total_steps = state.max_steps
        self.schedule(0, self.total_steps, self.target_sparsity, self.warmup_steps, self.cooldown_steps)  # validates

    @torch.no_grad()
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.accumulate_()

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        end = self.total_steps - self.cooldown_steps
        if step % self.prune_every == 0 or step == end:
            self.prune_(self.schedule(step, self.total_steps, self.target_sparsity, self.warmup_steps,
                                      self.cooldown_steps), step)

    def on_train_end(self, args, state, control, **kwargs):
        # Training stopped before the schedule reached the target (e.g. max_steps changed): finish it.
        if self.masks is not None and self.masks.sparsity < self.target_sparsity:
            self.prune_(self.target_sparsity, state.global_step)

    # -- the algorithm ----------------------------------------------------------------------------
    @torch.no_grad()
    def accumulate_(self) -> None:
        """Score every group from the current LoRA gradients and fold the scores into the EMA."""
        for i in self.masks.prunable:
            block = self.masks.blocks[i]
            for names, sums, key in ((ATTN_PROJ, attention_group_sums, 2 * i),
                                     (MLP_PROJ, mlp_channel_sums, 2 * i + 1)):
                scores = {}
                for name in names:
                    t = _lora_tensors(block.module(name), self.adapter_name)
                    if t is not None:
                        scores[name] = lora_importance(*t)
                if scores:
                    self.ema.update_(key, normalise(sums(block, scores)))

    def prune_(self, sparsity: float, step: int) -> None:
        if sparsity <= self.masks.sparsity:
            return
        attn, mlp = {}, {}
        for i in self.masks.prunable:
            b = self.masks.blocks[i]
            attn[i] = self.ema.avg.get(2 * i, torch.zeros(b.n_kv))
            mlp[i] = self.ema.avg.get(2 * i + 1, torch.zeros(b.intermediate))
        self.masks.prune_to_(sparsity, attn, mlp)
        self.history.append((step, sparsity))

    def _check_lora(self, model) -> None:
        for i in self.masks.prunable:
            block = self.masks.blocks[i]
            for kind, names in (("attention", ATTN_PROJ), ("MLP", MLP_PROJ)):
                if not any(hasattr(block.module(n), "lora_A") for n in names):
                    raise ValueError(
                        f"LoRAPruneCallback: model.layers.{i} has no LoRA on any {kind} projection {list(names)}; "
                        "LoRAPrune scores groups from LoRA gradients. Use LoraConfig(target_modules='all-linear') "
                        "or list the projections, or raise keep_first_layers/keep_last_layers to skip this block.")


# ---------------------------------------------------------------------------------------------
# L4Q: schedule and logging for quantization-aware LoRA with learned step sizes.
# L4Q layers are found by their public attributes (``l4q_step``, ``l4q_stats``), not imported.
# ---------------------------------------------------------------------------------------------


def _l4q_layers(model):
    """``(name, layer)`` of every L4Q layer in ``model`` (a PeftModel or the host model); names
    relative to the host model."""
    get_base = getattr(model, "get_base_model", None)
    model = get_base() if callable(get_base) else model
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "l4q_step") and hasattr(m, "l4q_stats")]


class L4QCallback(TrainerCallback):
    """Trainer callback for L4Q (``get_peft_model(model, hfcompress.L4QConfig(...))``).

    * ``freeze_scales_steps``: the learned step sizes and offsets stay frozen for the first
      that many optimizer steps (LoRA factors train from step 0), then train.
    * On every Trainer log, adds ``l4q/clip_fraction`` (fraction of merged weights outside
      their grid, over all L4Q layers) and ``l4q/mean_step`` (mean stored step size) to the
      logs, and with ``per_layer=True`` the same two numbers per layer
      (``l4q/<layer>/clip_fraction`` ...). Every logged record is also kept in ``history``.
    """

    def __init__(self, freeze_scales_steps: int = 0, per_layer: bool = False, adapter_name: str | None = None):
        if not isinstance(freeze_scales_steps, int) or isinstance(freeze_scales_steps, bool) or freeze_scales_steps < 0:
            raise ValueError(f"L4QCallback: freeze_scales_steps must be an int >= 0, got {freeze_scales_steps!r}")
        self.freeze_scales_steps = freeze_scales_steps
        self.per_layer = bool(per_layer)
        self.adapter_name = adapter_name
        self.history: list[dict] = []
        self._frozen: bool | None = None

    def _set_scales_trainable(self, model, trainable: bool) -> None:
        if self._frozen is (not trainable):
            return
        for _, layer in _l4q_layers(model):
            for table in (layer.l4q_step, layer.l4q_zero):
                for name, p in table.items():
                    if self.adapter_name is None or name == self.adapter_name:
                        p.requires_grad_(trainable)
                        if not trainable:
                            p.grad = None
        self._frozen = not trainable

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        if not _l4q_layers(model):
            raise ValueError("L4QCallback: the model has no L4Q layers; build it with "
                             "peft.get_peft_model(model, hfcompress.L4QConfig(...))")
        self._frozen = None
        self._set_scales_trainable(model, state.global_step >= self.freeze_scales_steps)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._set_scales_trainable(model, state.global_step >= self.freeze_scales_steps)

    def stats(self, model) -> dict[str, float]:
        """Clip fraction and mean step, over all L4Q layers and (``per_layer``) per layer."""
        out: dict[str, float] = {}
        clip_sum = step_sum = 0.0
        n_weights = n_steps = 0
        for name, layer in _l4q_layers(model):
            adapter = self.adapter_name or layer._l4q_active()
            if adapter is None:
                continue
            s = layer.l4q_stats(adapter)
            size = layer.in_features * layer.out_features
            groups = layer.l4q_step[adapter].numel()
            clip_sum += s["clip_fraction"] * size
            step_sum += s["mean_step"] * groups
            n_weights += size
            n_steps += groups
            if self.per_layer:
                out[f"l4q/{name}/clip_fraction"] = s["clip_fraction"]
                out[f"l4q/{name}/mean_step"] = s["mean_step"]
        if n_weights:
            out["l4q/clip_fraction"] = clip_sum / n_weights
            out["l4q/mean_step"] = step_sum / n_steps
        return out

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if model is None or logs is None:
            return
        stats = self.stats(model)
        logs.update(stats)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(stats)  # the Trainer stored a copy before calling us
        self.history.append({"step": state.global_step, **stats})
