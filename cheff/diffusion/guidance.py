"""Classifier-free guidance as an ``eps_fn`` wrapper: any sampler runs it unchanged.

Ho & Salimans (2022): eps = eps(x, null) + w (eps(x, c) - eps(x, null)). w = 1 is plain
conditional sampling (one network call, no null branch), w = 0 the null-conditioned model,
w > 1 follows the condition more closely at some cost in diversity. The model must have seen
the null condition in training (``--cond-drop p > 0``) for w != 1 to mean anything.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from cheff.diffusion.samplers import EpsFn

#: The network with its condition: (x, t, context) -> eps.
ContextEpsFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def classifier_free(
    eps: ContextEpsFn, context: Tensor, null_context: Tensor, scale: float
) -> EpsFn:
    """An ``eps_fn(x, t)`` guiding ``eps`` towards ``context`` with weight ``scale``.

    ``context`` is (B, L, D) for a batch of B; ``null_context`` is (1 or B, L, D). Both
    branches run as one batch of 2B. ``scale == 1`` calls only the conditional branch.
    """
    if scale == 1.0:
        return lambda x, t: eps(x, t, context)
    null = null_context.expand(context.shape[0], -1, -1)
    both_contexts = torch.cat([null, context])

    def guided(x: Tensor, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        unconditional, conditional = eps(torch.cat([x, x]), torch.cat([t, t]), both_contexts).chunk(
            2
        )
        return unconditional + scale * (conditional - unconditional)

    return guided
