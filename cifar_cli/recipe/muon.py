"""Muon for convolution filters (after Keller Jordan's airbench94_muon), SGD-Nesterov for everything else.

Muon keeps each filter bank at a fixed norm and steps along an approximately orthogonalised momentum (five-term
Newton-Schulz iteration), so its step size does not depend on the gradient's scale.
"""

from __future__ import annotations

import torch

# Quintic Newton-Schulz coefficients chosen for a steep slope at zero (airbench94_muon).
NEWTON_SCHULZ = (3.4445, -4.7750, 2.0315)


def orthogonalize(
    matrix: torch.Tensor, steps: int = 3, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Approximately U V^T of `matrix` = U S V^T (singular values end up near 1, within about 0.5..1.5); of each
    matrix of a stack (..., rows, columns) at once, in as many products as one takes.

    `dtype`: of the iteration's matrix products; bf16 as in airbench on GPUs and bf16-capable CPUs, fp32 where bf16
    is emulated (AVX2 CPUs: there one bf16 step of the fast preset's filters took 1.6 s instead of ~0.03 s).
    """
    a, b, c = NEWTON_SCHULZ
    x = matrix.to(dtype)
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # top singular value <= 1
    transposed = x.size(-2) > x.size(-1)
    if transposed:
        x = x.mT
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if transposed else x).to(matrix.dtype)


def orthogonalize_all(directions: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """orthogonalize() of each filter bank's direction (out_channels x the rest), the banks of one shape stacked
    into one batch of products: on a GPU, where a step waits on kernel launches, a few large products instead of
    many small ones (hiverge's record batches Muon over layers likewise)."""
    by_shape: dict[torch.Size, list[int]] = {}
    for index, direction in enumerate(directions):
        by_shape.setdefault(direction.shape, []).append(index)
    results: list[torch.Tensor] = list(directions)
    for shape, indices in by_shape.items():
        stack = torch.stack([directions[i].reshape(shape[0], -1) for i in indices])
        for i, matrix in zip(indices, orthogonalize(stack, dtype=dtype).unbind(0)):
            results[i] = matrix.view(shape)
    return results


class MuonSGD(torch.optim.Optimizer):
    """One optimiser, two rules: groups with `use_muon=True` take Muon steps, the others SGD with (Nesterov)
    momentum and weight decay exactly as torch.optim.SGD. Each group steps all its tensors at once (torch's
    _foreach kernels; Muon's products batched by shape): the same rule as one tensor at a time, fewer launches."""

    def __init__(
        self,
        groups: list[dict],
        lr: float,
        momentum: float,
        nesterov: bool = True,
        matmul_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__(
            groups, {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": 0.0, "use_muon": False}
        )
        self.matmul_dtype = matmul_dtype  # of the orthogonalisation; not in the state dict (a speed choice)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201 - torch's signature
        for group in self.param_groups:
            parameters = [parameter for parameter in group["params"] if parameter.grad is not None]
            if not parameters:
                continue
            directions = self._momentum_directions(parameters, group)
            if group["use_muon"]:
                # Keep each filter bank's norm at sqrt(out_channels), then step orthogonally.
                # (No tensor of the targets: a list copied to a GPU each step would wait for the GPU to catch up.)
                scales = torch._foreach_norm(parameters)
                torch._foreach_clamp_min_(scales, 1e-12)
                torch._foreach_reciprocal_(scales)
                torch._foreach_mul_(scales, [len(parameter) ** 0.5 for parameter in parameters])
                torch._foreach_mul_(parameters, scales)
                directions = orthogonalize_all(directions, self.matmul_dtype)
            torch._foreach_add_(parameters, directions, alpha=-group["lr"])

    def _momentum_directions(self, parameters: list[torch.Tensor], group: dict) -> list[torch.Tensor]:
        """Each tensor's step direction: its gradient (plus weight decay) through the momentum buffer, Nesterov's
        way where asked; buffers start as the first gradient, as torch.optim.SGD's."""
        gradients = [parameter.grad for parameter in parameters]
        if group["weight_decay"]:
            gradients = torch._foreach_add(gradients, parameters, alpha=group["weight_decay"])
        states = [self.state[parameter] for parameter in parameters]
        running = [i for i, state in enumerate(states) if "momentum_buffer" in state]
        for i, state in enumerate(states):
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = gradients[i].clone()
        if running:
            buffers = [states[i]["momentum_buffer"] for i in running]
            torch._foreach_mul_(buffers, group["momentum"])
            torch._foreach_add_(buffers, [gradients[i] for i in running])
        buffers = [state["momentum_buffer"] for state in states]
        if group["nesterov"]:
            return torch._foreach_add(gradients, buffers, alpha=group["momentum"])
        return buffers
