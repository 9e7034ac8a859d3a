"""Auxiliary-loss-free expert load balancing (DeepSeek-V3 style) through ZAYA's `balancing_biases`.

The router picks argmax(probs + biases) but weighs the expert by its probability alone, so the biases
only steer the choice. After each step every real expert's bias moves by `rate` towards balance
(up when under-loaded, down when over-loaded), then the real-expert biases are re-centred to mean 0.
The skip class keeps -1.0: transformers re-applies that value when it loads a checkpoint.
"""

from __future__ import annotations

import torch

from workers.models.zaya import ZayaRouter


class LoadBalancer:
    def __init__(self, model: torch.nn.Module, rate: float = 1e-3):
        self.rate = rate
        self.routers = [m for m in model.modules() if isinstance(m, ZayaRouter)]
        self.counts = [torch.zeros(r.num_experts + 1) for r in self.routers]
        self.active = True  # set False around evaluation forwards
        self._hooks = [r.register_forward_hook(self._hook(i)) for i, r in enumerate(self.routers)]

    def _hook(self, i: int):
        def record(module, inputs, outputs):
            if not self.active:
                return
            ids = outputs[0].detach().reshape(-1)  # [N] expert id, -1 = skip
            self.counts[i] += torch.bincount(torch.where(ids < 0, module.num_experts, ids),
                                             minlength=module.num_experts + 1).float()
        return record

    @torch.no_grad()
    def update(self) -> list[list[float]]:
        """Apply one bias update from the counts since the last call; returns each layer's load fractions."""
        loads = []
        for router, counts in zip(self.routers, self.counts, strict=True):
            real = counts[:-1]
            total = counts.sum().clamp_min(1)
            loads.append((counts / total).tolist())
            if real.sum() > 0:
                b = router.balancing_biases
                b[:-1] += self.rate * torch.sign(real.mean() - real)
                b[:-1] -= b[:-1].mean()
                b[-1] = -1.0
            counts.zero_()
        return loads

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
