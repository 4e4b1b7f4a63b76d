"""Fast paths that compute the same function as the plain code in model.py.

``linear_cross_entropy``: the LM head and the cross-entropy in one step, row chunk by row
chunk, so the (B*T, V) logits never exist whole. In the plain path a GPT-2 124M step at
B=64, T=1024 materialises 64*1024*50304 logits, 13 GB in fp32. Here each chunk's logits
live only long enough to give the loss and the gradients of the hidden states and the head
weight (softmax - one-hot), which are kept for the backward pass (the Liger-kernel idea,
in plain PyTorch so torch.compile can fuse the element-wise work).
"""

from __future__ import annotations

import torch


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of softcap((hidden @ weight.T)[:, :vocab_size]) against targets (-1 ignored)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size: int, chunk_size: int, softcap: float = 0.0):
        N = hidden.size(0)
        need_grad = ctx.needs_input_grad[0] or ctx.needs_input_grad[1]
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_grad else None
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        valid_total = (targets != -1).sum()
        for start in range(0, N, chunk_size):
            h = hidden[start : start + chunk_size]  # (n, C)
            t = targets[start : start + chunk_size]  # (n,)
            logits = (h @ weight.t()).float()  # (n, Vp); autocast decides the matmul dtype
            if softcap:  # c tanh(z / c); its derivative 1 - tanh^2 scales the gradient below
                squash = logits.div_(softcap).tanh_()
                logits = squash * softcap
            if logits.size(1) > vocab_size:
                logits[:, vocab_size:] = float("-inf")  # padded rows: never in the loss
            valid = t != -1
            t_safe = t.clamp(min=0)[:, None]  # (n, 1)
            lse = torch.logsumexp(logits, dim=1)  # (n,)
            loss_sum += ((lse - logits.gather(1, t_safe).squeeze(1)) * valid).sum()
            if need_grad:
                # d(sum of losses)/d(logits) = softmax - one_hot, zero on ignored rows
                g = logits.sub_(lse[:, None]).exp_()
                g.scatter_add_(1, t_safe, -torch.ones_like(t_safe, dtype=g.dtype))
                g.mul_(valid[:, None])
                if softcap:
                    g.mul_(1 - squash.square())
                g = g.to(h.dtype)
                grad_hidden[start : start + chunk_size] = g @ weight.to(h.dtype)
                grad_weight += (g.t() @ h).float()
        scale = 1.0 / valid_total.float()
        if need_grad:
            ctx.save_for_backward(grad_hidden, grad_weight, scale)
            ctx.weight_dtype = weight.dtype
        return loss_sum * scale

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, scale = ctx.saved_tensors
        s = grad_loss * scale
        return grad_hidden * s.to(grad_hidden.dtype), (grad_weight * s).to(ctx.weight_dtype), None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    vocab_size: int,
    chunk_size: int = 8192,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy of the LM head's logits, computed chunk by chunk.

    hidden (B, T, C) or (N, C); weight (V_padded, C); targets matching hidden's leading dims.
    Equals ``F.cross_entropy((hidden @ weight.T)[..., :vocab_size], targets, ignore_index=-1)``, with the
    logits first soft-capped to softcap * tanh(logits / softcap) when softcap > 0 (model.softcap).
    """
    return _LinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.size(-1)), weight, targets.reshape(-1), vocab_size, chunk_size, softcap
    )
