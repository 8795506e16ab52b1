"""Which parameters Muon optimises and which stay on AdamW."""

from __future__ import annotations

from torch import nn


def split_muon_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(muon_params, adamw_params) over the trainable parameters of ``model``, each once.

    Muon gets the 2-D weights that live inside a repeated block, i.e. under an ``nn.ModuleList``
    (``model.layers.N`` in HF decoders: attention and MLP projections, BitLinear or not). AdamW gets
    everything else: token embeddings, the lm_head, norm gains, biases, any other 1-D or >2-D tensor,
    and any ``nn.Embedding`` even inside a block. Muon's orthogonalised update is meant for hidden
    matrices; embeddings and the output head are lookup/readout tables for which it is known to do
    worse (Keller Jordan; Moonshot).

    Tied weights: ``named_parameters`` yields a shared tensor once, so a tied embedding/lm_head (SmolLM2)
    appears once, under the embedding's name, and goes to AdamW. Parameters with
    ``requires_grad=False`` (a frozen teacher part, say) are left out of both lists.
    """
    in_blocks: set[int] = set()
    excluded: set[int] = set()
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for block in module:
                in_blocks.update(id(p) for p in block.parameters())
        if isinstance(module, nn.Embedding):
            excluded.update(id(p) for p in module.parameters())
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        head = getattr(model, getter, lambda: None)()
        if isinstance(head, nn.Module):
            excluded.update(id(p) for p in head.parameters())

    muon: list[nn.Parameter] = []
    adamw: list[nn.Parameter] = []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim == 2 and id(p) in in_blocks and id(p) not in excluded:
            muon.append(p)
        else:
            adamw.append(p)
    return muon, adamw


def decay_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    """Split into a decayed group (>= 2-D) and a non-decayed one (1-D: norm gains, biases); empty groups dropped.

    Decaying a norm gain towards 0 or a bias towards 0 has no regularising meaning and hurts
    conversion from a pretrained model, so only matrices and embeddings decay.
    """
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups
