"""One optimizer object holding torch.optim.Muon (hidden matrices) and torch.optim.AdamW (the rest)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .muon_gathered import GatheredMuon, is_dtensor
from .param_split import decay_groups
from .spec import MUON_ADJUST_LR_FN


class MuonAdamW(torch.optim.Optimizer):
    """Muon for ``muon_params``, AdamW for ``adamw_params``, behind the plain ``Optimizer`` interface.

    The wrapper's ``param_groups`` *are* the two inner optimizers' group dicts (Muon's first, so
    ``param_groups[0]["lr"]`` is the Muon lr), and its ``state`` is the one dict both inner optimizers
    write to. So an LR scheduler, ``zero_grad``, grad clipping and ``state_dict``/``load_state_dict``
    all act on both parts without knowing there are two; group key ``"part"`` says which is which.

    Muon runs with ``adjust_lr_fn="match_rms_adamw"`` (see ``spec.MUON_ADJUST_LR_FN``): update RMS
    0.2 * lr, the scale at which Muon and AdamW lrs are comparable. ``ns_dtype="float32"`` runs the
    Newton-Schulz iteration in float32 (``GatheredMuon``) instead of torch.optim.Muon's bfloat16.
    """

    def __init__(
        self,
        muon_params: list[nn.Parameter],
        adamw_params: list[nn.Parameter],
        *,
        lr: float,
        adamw_lr: float,
        weight_decay: float = 0.0,
        momentum: float = 0.95,
        nesterov: bool = True,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        ns_dtype: str = "bfloat16",
    ) -> None:
        muon_params, adamw_params = list(muon_params), list(adamw_params)
        if not muon_params:
            raise ValueError(
                "muon: the model has no 2-D weights inside repeated blocks to give Muon; use 'adamw'"
            )
        # Under FSDP2 the matrices are DTensor shards; GatheredMuon runs Newton-Schulz on the full matrix.
        # GatheredMuon also runs the float32 iteration (torch.optim.Muon's is bfloat16, hard-coded).
        sharded = any(is_dtensor(p) for p in muon_params)
        muon_cls = GatheredMuon if sharded or ns_dtype != "bfloat16" else torch.optim.Muon
        self._muon = muon_cls(
            [{"params": muon_params, "part": "muon", **({"ns_dtype": ns_dtype} if ns_dtype != "bfloat16" else {})}],
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            adjust_lr_fn=MUON_ADJUST_LR_FN,
        )
        adamw_groups = [{**g, "part": "adamw"} for g in decay_groups(adamw_params, weight_decay)]
        self._adamw = (
            torch.optim.AdamW(adamw_groups, lr=adamw_lr, betas=betas, eps=eps, weight_decay=weight_decay)
            if adamw_groups
            else None
        )
        super().__init__(self._muon.param_groups + self._inner_adamw_groups(), defaults={})
        self._link_inner()

    def _inner_adamw_groups(self) -> list[dict]:
        return [] if self._adamw is None else list(self._adamw.param_groups)

    def _link_inner(self) -> None:
        """Point the inner optimizers at this wrapper's group dicts and state (again after a load)."""
        n_muon = len(self._muon.param_groups)
        self._muon.param_groups = self.param_groups[:n_muon]
        self._muon.state = self.state
        if self._adamw is not None:
            self._adamw.param_groups = self.param_groups[n_muon:]
            self._adamw.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        # Optimizer.load_state_dict replaces param_groups and state with new objects; relink or the
        # inner optimizers would keep stepping with the pre-load lrs and moments.
        super().load_state_dict(state_dict)
        self._link_inner()

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._muon.step()
        if self._adamw is not None:
            self._adamw.step()
        return loss
