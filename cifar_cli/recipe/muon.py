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
    """Approximately U V^T of `matrix` = U S V^T (singular values end up near 1, within about 0.5..1.5).

    `dtype`: of the iteration's matrix products; bf16 as in airbench on GPUs and bf16-capable CPUs, fp32 where bf16
    is emulated (AVX2 CPUs: there one bf16 step of the fast preset's filters took 1.6 s instead of ~0.03 s).
    """
    a, b, c = NEWTON_SCHULZ
    x = matrix.to(dtype)
    x = x / (x.norm() + eps)  # top singular value <= 1
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.T
    for _ in range(steps):
        gram = x @ x.T
        # b * gram + c * gram @ gram, then a * x + that @ x: two fused multiply-adds instead of seven kernels
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if transposed else x).to(matrix.dtype)


class MuonSGD(torch.optim.Optimizer):
    """One optimiser, two rules: groups with `use_muon=True` take Muon steps, the others SGD with (Nesterov)
    momentum and weight decay exactly as torch.optim.SGD."""

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
            if not group["use_muon"]:
                torch._foreach_add_(parameters, directions, alpha=-group["lr"])
                continue
            for parameter, direction in zip(parameters, directions):
                # Keep the filter bank's norm at sqrt(out_channels), then step orthogonally.
                parameter.mul_(len(parameter) ** 0.5 / parameter.norm().clamp_min(1e-12))
                flat = orthogonalize(direction.reshape(len(direction), -1), dtype=self.matmul_dtype)
                parameter.add_(flat.view_as(parameter), alpha=-group["lr"])

    def _momentum_directions(self, parameters: list[torch.Tensor], group: dict) -> list[torch.Tensor]:
        """Every parameter's (Nesterov) momentum direction, the group's updates made at once (`foreach`: a few
        kernels for the whole group instead of a few per tensor), as torch.optim.SGD computes them."""
        gradients = [parameter.grad for parameter in parameters]
        if group["weight_decay"]:
            gradients = torch._foreach_add(gradients, parameters, alpha=group["weight_decay"])
        states = [self.state[parameter] for parameter in parameters]
        kept = [(state["momentum_buffer"], g) for state, g in zip(states, gradients) if "momentum_buffer" in state]
        if kept:
            torch._foreach_mul_([buffer for buffer, _ in kept], group["momentum"])
            torch._foreach_add_([buffer for buffer, _ in kept], [gradient for _, gradient in kept])
        for state, gradient in zip(states, gradients):  # a parameter's first step: the gradient itself
            state.setdefault("momentum_buffer", torch.clone(gradient).detach())
        buffers = [state["momentum_buffer"] for state in states]
        if group["nesterov"]:
            return torch._foreach_add(gradients, buffers, alpha=group["momentum"])
        return buffers
