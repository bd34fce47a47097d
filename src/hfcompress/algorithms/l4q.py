"""L4Q: quantization-aware LoRA with learned step sizes (Jeon et al., 2024).

A target linear ``y = x W^T + b`` with frozen ``W0 [N, K]`` trains a LoRA pair ``A [r, K]``,
``B [N, r]`` *and* the quantizer of the merged weight, so the model that trains is already the
quantized model that ships::

    W   = W0 + a * B A                                  [N, K]  (a = lora_alpha / r)
    v   = W / s[:, g(k)]                                 [N, K]  (s: per-group step, LSQ)
    q   = clamp(round(v) + z[:, g(k)], 0, 2**bits - 1)   [N, K]  (z: per-group integer offset)
    W_q = (q - z[:, g(k)]) * s[:, g(k)]                  [N, K]
    y   = x W_q^T + b

Written so that what trains is exactly what the int_group format stores: the step used in the
forward is the learned step rounded to fp16 (the stored scale dtype) and the offset is the
learned offset rounded to an integer in ``[0, 2**bits - 1]`` (the stored zero point), both with
straight-through gradients. Symmetric grids fix ``z = 2**(bits-1)``. Exporting the codes ``q``
with those scales and zeros therefore gives a checkpoint whose dequantized weight equals
``W_q`` bit for bit.

Gradients (``G = dL/dW_q = dY^T X``, ``M`` = not clipped, ``Q_N = -z``, ``Q_P = maxq - z``):

* ``dL/dA = a B^T (M * G)``, ``dL/dB = a (M * G) A^T``  (straight-through ``round``; clipped
  weights pass no gradient to the LoRA factors);
* ``dL/ds = g * sum_group G * (round(v) - v  if M,  Q_N if clipped low,  Q_P if clipped high)``;
* ``dL/dz = g * sum_group G * (0 if M,  -s if clipped)``  (LSQ+ offset gradient in code units);
* ``g = 1 / sqrt(n_group * Q_P_max)``, the LSQ step-gradient scale (``n_group`` = group size,
  ``Q_P_max = 2**bits - 1`` asymmetric, ``2**(bits-1) - 1`` symmetric).

:class:`L4QLinearFunction` saves only ``x`` and the small factors (``W0`` is a frozen
parameter that exists anyway): ``W_q`` and ``G`` are recomputed in backward, one layer at a
time, so training memory stays close to plain LoRA's.
"""

from __future__ import annotations

import math

import torch

from ..formats.int_group import SCALE_DTYPE, IntGroupSpec, default_g_idx


def step_grad_scale(spec: IntGroupSpec, in_features: int) -> float:
    """LSQ's ``1 / sqrt(N * Q_P)`` with ``N`` the number of weights sharing one step."""
    q_p = spec.maxq if not spec.sym else (1 << (spec.bits - 1)) - 1
    return 1.0 / math.sqrt(spec.effective_group_size(in_features) * q_p)


def stored_step(step: torch.Tensor) -> torch.Tensor:
    """The learned step ``[N, G]`` as stored: positive, rounded to fp16, back in fp32."""
    return step.detach().float().clamp(min=torch.finfo(SCALE_DTYPE).tiny).to(SCALE_DTYPE).float()


def stored_zero(zero: torch.Tensor | None, spec: IntGroupSpec, like: torch.Tensor) -> torch.Tensor:
    """The learned offset ``[N, G]`` as stored: an integer in ``[0, maxq]`` (fp32 values)."""
    if spec.sym:
        return torch.full_like(like, float(1 << (spec.bits - 1)))
    return torch.round(zero.detach().float()).clamp(0, spec.maxq)


def merged_weight(w0: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """``W0 + a * B A`` in fp32, ``[N, K]``."""
    return w0.float() + scaling * (lora_b.float() @ lora_a.float())


def quantize_merged(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, spec: IntGroupSpec, g_idx: torch.Tensor):
    """``w [N, K]`` on the grid ``s, z [N, G]`` (stored values) -> ``(q, v, r)``, all ``[N, K]`` fp32:
    codes ``q``, ``v = w / s`` and ``r = round(v)`` (the unclamped integer before the offset)."""
    s_k, z_k = s[:, g_idx], z[:, g_idx]  # [N, K]
    v = w / s_k
    r = torch.round(v)
    q = torch.clamp(r + z_k, 0, spec.maxq)
    return q, v, r


def fake_quantize(w: torch.Tensor, s: torch.Tensor, z: torch.Tensor, spec: IntGroupSpec,
                  g_idx: torch.Tensor) -> torch.Tensor:
    """``W_q [N, K]`` fp32: exactly the int_group dequantization of :func:`quantize_merged`'s codes."""
    q, _, _ = quantize_merged(w, s, z, spec, g_idx)
    return (q - z[:, g_idx]) * s[:, g_idx]


def _group_sum(t: torch.Tensor, g_idx: torch.Tensor, n_groups: int) -> torch.Tensor:
    """``[N, K]`` -> ``[N, G]``: sum of each row over the columns of every group."""
    out = torch.zeros(t.shape[0], n_groups, dtype=t.dtype, device=t.device)
    return out.index_add_(1, g_idx, t)


class L4QLinearFunction(torch.autograd.Function):
    """``y = x Q(W0 + a B A)^T + bias`` with the L4Q gradients (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, w0, lora_a, lora_b, step, zero, bias, scaling: float, spec: IntGroupSpec):
        # x [..., K]; w0 [N, K]; lora_a [r, K]; lora_b [N, r]; step, zero [N, G]; bias [N] | None
        g_idx = default_g_idx(spec, w0.shape[1], w0.device).long()
        s, z = stored_step(step), stored_zero(zero, spec, step)
        w_q = fake_quantize(merged_weight(w0, lora_a, lora_b, scaling), s, z, spec, g_idx)
        # the same ops, in the same order, as int_group_mm's reference on the exported layer
        y = torch.matmul(x, w_q.to(x.dtype).t())
        if bias is not None:
            y = y + bias.to(y.dtype)
        ctx.save_for_backward(x, w0, lora_a, lora_b, step, zero)  # no [N, K] tensor of its own
        ctx.scaling, ctx.spec, ctx.has_bias = scaling, spec, bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, w0, lora_a, lora_b, step, zero = ctx.saved_tensors
        spec, a = ctx.spec, ctx.scaling
        n_out, k = w0.shape
        n_groups = spec.n_groups(k)
        g_idx = default_g_idx(spec, k, w0.device).long()
        # recompute the quantizer state (nothing [N, K] was kept from the forward)
        s, z = stored_step(step), stored_zero(zero, spec, step)
        q, v, r = quantize_merged(merged_weight(w0, lora_a, lora_b, a), s, z, spec, g_idx)
        z_k = z[:, g_idx]
        low, high = r + z_k < 0, r + z_k > spec.maxq
        inside = ~(low | high)

        grad_x = grad_bias = grad_a = grad_b = grad_step = grad_zero = None
        if ctx.needs_input_grad[0]:
            w_q = (q - z_k) * s[:, g_idx]
            grad_x = torch.matmul(grad_y, w_q.to(grad_y.dtype)).to(x.dtype)
            del w_q
        gy2 = grad_y.reshape(-1, n_out).float()  # [T, N]
        x2 = x.reshape(-1, k).float()  # [T, K]
        if ctx.has_bias and ctx.needs_input_grad[6]:
            grad_bias = gy2.sum(0).to(ctx.bias_dtype)
        if not any(ctx.needs_input_grad[2:6]):
            return grad_x, None, grad_a, grad_b, grad_step, grad_zero, grad_bias, None, None
        grad_w = gy2.t() @ x2  # G = dL/dW_q, [N, K], recomputed, freed at the end of this layer
        g = step_grad_scale(spec, k)
        if ctx.needs_input_grad[4]:
            q_n, q_p = -z_k, spec.maxq - z_k
            d_wq_ds = torch.where(inside, r - v, torch.where(low, q_n, q_p))  # [N, K]
            grad_step = (g * _group_sum(grad_w * d_wq_ds, g_idx, n_groups)).to(step.dtype)
            del d_wq_ds
        if zero is not None and ctx.needs_input_grad[5]:
            clipped_grad = torch.where(inside, torch.zeros_like(grad_w), grad_w)
            grad_zero = (-g * s * _group_sum(clipped_grad, g_idx, n_groups)).to(zero.dtype)
            del clipped_grad
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            grad_w.mul_(inside)  # M * G (straight-through inside the range, nothing when clipped)
            if ctx.needs_input_grad[2]:
                grad_a = (a * (lora_b.float().t() @ grad_w)).to(lora_a.dtype)  # [r, K]
            if ctx.needs_input_grad[3]:
                grad_b = (a * (grad_w @ lora_a.float().t())).to(lora_b.dtype)  # [N, r]
        return grad_x, None, grad_a, grad_b, grad_step, grad_zero, grad_bias, None, None


def l4q_linear(x: torch.Tensor, w0: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
               step: torch.Tensor, zero: torch.Tensor | None, bias: torch.Tensor | None, scaling: float,
               spec: IntGroupSpec) -> torch.Tensor:
    """Functional entry point of :class:`L4QLinearFunction`."""
    return L4QLinearFunction.apply(x, w0, lora_a, lora_b, step, zero, bias, scaling, spec)


def l4q_linear_naive(x, w0, lora_a, lora_b, step, zero, bias, scaling: float, spec: IntGroupSpec):
    """The same function through plain autograd (STE by ``detach``; LSQ's gradient-scale trick).
    Stores every ``[N, K]`` intermediate; the reference the custom backward is tested against."""
    k = w0.shape[1]
    g_idx = default_g_idx(spec, k, w0.device).long()
    g = step_grad_scale(spec, k)

    def ste(value, differentiable):  # forward: value; backward: identity into `differentiable`
        return differentiable + (value - differentiable).detach()

    step_scaled = ste(step.float(), step.float() * g)  # grad * g
    s = ste(stored_step(step), step_scaled)
    if spec.sym:
        z = stored_zero(None, spec, step)
    else:
        zero_scaled = ste(zero.float(), zero.float() * g)
        z = ste(stored_zero(zero, spec, step), zero_scaled)
    w = merged_weight(w0, lora_a, lora_b, scaling)
    s_k, z_k = s[:, g_idx], z[:, g_idx]
    v = w / s_k
    c = torch.clamp(ste(torch.round(v), v) + z_k, 0, spec.maxq)
    w_q = (c - z_k) * s_k
    y = torch.matmul(x, w_q.to(x.dtype).t())
    return y if bias is None else y + bias.to(y.dtype)
