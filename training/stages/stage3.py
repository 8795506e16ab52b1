"""Stage 3: BitDistill distillation fine-tuning of the ternary student (arXiv:2510.13998, Eq. 13).

    loss = CE + logits_weight * KD_T + attention_weight * AD

- CE: the student's next-token cross-entropy on the labels (answer tokens only for a labelled task,
  every token for ``stage3.data.task=lm``);
- KD_T: ``logits_kl``: mean over non-padding positions of KL(softmax(z_t/T) || softmax(z_s/T));
- AD: ``training.distill.attention``: Q/K/V relation distillation at one attention layer (Eq. 11).

The T^2 question. The paper's Eq. 12 is the plain tempered KL; Hinton et al. multiply it by T^2 so
its gradient scale does not shrink as 1/T^2, and the usual public KD code (reportedly BitDistill's
released code too, which could not be checked offline) does so. With T = 5 the two differ 25x, so
lambda values from one convention are wrong in the other. Default: no T^2 (the paper's equation,
whose reported lambda/gamma go with it); ``stage3.loss.kd_scale_by_t2=true`` switches.

Other differences from the paper:
  - KD covers every non-padding position (prompt included), not only the answer: the student copies
    the teacher's whole next-token distribution, which for ``task=lm`` is continued pre-training
    distillation. CE stays on the answer.
  - The teacher is the pipeline's FP model unless ``stage3.teacher.pretrained`` names another; the
    paper's teacher is the FP model fine-tuned on the task first (pass such a model there).
  - ``stage3.teacher.url``: a teacher served by vLLM (training/teacher/). KD_T then runs on its
    top-k log-probabilities, both distributions renormalised over those k tokens
    (training/distill/topk.py; ``stage3.teacher.top_k`` gives an in-process teacher the same loss).
    The attention term is OFF with a served teacher (one log line says so): it needs the teacher's
    Q/K/V at the distilled layer, which a server does not return, and a local copy of that one
    layer would not help, because its input is the teacher's hidden state there, which needs every
    layer below it, i.e. the local teacher a server was meant to replace.
  - Lambda stays 1 (fully ternary) throughout; saliency protection is off (it ends with Stage 1.9).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from training.checkpoint import CheckpointManager
from training.data import BlockLoader
from training.data.tasks import (
    IGNORE_INDEX,
    encode_pairs,
    load_task_pairs,
    split_indices,
    task_eval_batches,
)
from training.distill import logits_kl
from training.distill.attention import AttentionDistillLoss
from training.distill.topk import topk_from_logits, topk_kl
from training.stages.common import load_teacher
from training.stages.trainer import LossFn
from training.teacher import ServedTeacher, connect_served_teacher

log = logging.getLogger("training")


@dataclass
class Stage3Loss:
    fn: LossFn
    attention: AttentionDistillLoss | None
    served: ServedTeacher | None = None

    def close(self) -> None:
        """Remove the attention hooks (they hold the latest forward's q/k/v); stop the prefetch thread."""
        if self.attention is not None:
            self.attention.remove()
        if self.served is not None:
            self.served.close()


def make_loss_fn(
    cfg: DictConfig,
    student: nn.Module,
    teacher: nn.Module | None,
    fwd: nn.Module | None = None,
    served: ServedTeacher | None = None,
) -> Stage3Loss:
    """The Stage 3 loss over a batch; ``student`` is the eager module (hooks go on its layers),
    ``fwd`` what to call for its forward (a ``torch.compile`` wrapper of it, or it). ``served``: the
    teacher's answers come from a server (``teacher`` is then unused and may be None)."""
    lc = cfg.stage3.loss
    lam, gamma, temperature = float(lc.logits_weight), float(lc.attention_weight), float(lc.temperature)
    top_k = cfg.stage3.teacher.top_k
    if served is not None and gamma > 0:
        log.info(
            "stage3: attention-relation distillation off (attention_weight=%g ignored): a served teacher "
            "returns no Q/K/V; the loss is CE + %g * top-%d KD", gamma, lam, served.client.s.top_k,
        )  # fmt: skip
        gamma = 0.0
    attention = None
    if gamma > 0:
        attention = AttentionDistillLoss(
            student,
            teacher,
            layer=int(lc.distill_layer),
            relation=bool(lc.use_relation_distill),
            relation_heads=int(lc.relation_heads),
        )
    fwd = student if fwd is None else fwd
    need_teacher = served is None and (lam > 0 or gamma > 0)

    def loss_fn(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        mask = batch.get("attention_mask")
        if need_teacher:
            with torch.no_grad():
                t_out = teacher(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False)
        s_out = fwd(
            input_ids=batch["input_ids"], attention_mask=mask, labels=batch["labels"], use_cache=False
        )
        loss = s_out.loss
        metrics = {"ce": s_out.loss.detach().float().item()}
        if lam > 0:
            t2 = bool(lc.kd_scale_by_t2)
            if served is not None:
                kd = topk_kl(s_out.logits, served.topk(batch), temperature, mask, scale_by_t2=t2)
            elif top_k is not None:
                kd = topk_kl(s_out.logits, topk_from_logits(t_out.logits, top_k, mask), temperature, mask, t2)
            else:
                kd = logits_kl(s_out.logits, t_out.logits, temperature, mask, scale_by_t2=t2)
            loss = loss + lam * kd
            metrics["kd"] = kd.detach().item()
        if attention is not None:
            ad = attention(mask)
            loss = loss + gamma * ad
            metrics["attn"] = ad.detach().item()
        return loss, metrics

    return Stage3Loss(loss_fn, attention, served)


@dataclass
class Stage3Data:
    loader: Any  # BlockLoader over TaskExamples, or the LM text's loader
    eval: list[dict[str, torch.Tensor]]
    eval_pairs: list[tuple[str, str]] = field(default_factory=list)  # held-out (input, target), tasks only


def build_task_data(cfg: DictConfig, tokenizer: Any, lm_loader: Any, lm_eval: list) -> Stage3Data:
    """Stage 3's train loader and eval batches: the LM text's, or a labelled task's as prompts."""
    d3 = cfg.stage3.data
    if d3.task == "lm":
        return Stage3Data(lm_loader, lm_eval)
    pairs = load_task_pairs(d3.task, d3.path, d3.input_field, d3.target_field)
    examples = encode_pairs(pairs, tokenizer, d3.prompt, cfg.data.seq_len)
    train_idx, eval_idx = split_indices(len(examples), d3.eval_examples, seed=cfg.data.seed)
    train, held_out = examples.select(train_idx), examples.select(eval_idx)
    log.info(
        "stage3: %s task, %d train / %d eval examples of %d tokens (%s)",
        d3.task,
        len(train),
        len(held_out),
        examples.seq_len,
        d3.path or "built-in",
    )
    loader = BlockLoader(train, cfg.stage3.batch_size, seed=cfg.data.seed + 3)
    eval_pairs = [pairs[i] for i in eval_idx.tolist()]
    return Stage3Data(loader, task_eval_batches(held_out, cfg.data.eval_batch_size), eval_pairs)


@torch.no_grad()
def classification_accuracy(
    model: nn.Module,
    tokenizer: Any,
    pairs: list[tuple[str, str]],
    prompt: str,
    seq_len: int,
    device: torch.device,
    batch_size: int = 32,
) -> float:
    """Held-out accuracy: the predicted class is the label whose answer (label tokens + EOS) has the
    highest total log-likelihood after the prompt; candidates are the labels seen in ``pairs``."""
    labels = sorted({t for _, t in pairs})
    rows = encode_pairs([(x, c) for x, _ in pairs for c in labels], tokenizer, prompt, seq_len)
    was_training = model.training
    model.eval()
    scores = []
    for batch in task_eval_batches(rows, batch_size):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        target = batch["labels"][:, 1:]
        picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        scores.append((picked * (target != IGNORE_INDEX)).sum(-1).cpu())
    model.train(was_training)
    pred = torch.cat(scores).view(len(pairs), len(labels)).argmax(dim=1)
    gold = torch.tensor([labels.index(t) for _, t in pairs])
    return float((pred == gold).float().mean())


def task_metrics(
    cfg: DictConfig, data: Stage3Data, tokenizer: Any, model: nn.Module, device
) -> dict[str, float]:
    """Task-specific held-out metrics after Stage 3: accuracy (and the majority-class rate) for
    classification; nothing extra for the other tasks (their eval loss is the held-out answer CE)."""
    if cfg.stage3.data.task != "classification":
        return {}
    acc = classification_accuracy(
        model,
        tokenizer,
        data.eval_pairs,
        cfg.stage3.data.prompt,
        cfg.data.seq_len,
        device,
        cfg.data.eval_batch_size,
    )
    targets = [t for _, t in data.eval_pairs]
    majority = max(targets.count(t) for t in set(targets)) / len(targets)
    # Binomial standard error over the held-out examples (Ax's noise), floored at 1/n so an accuracy
    # of 0 or 1 is not reported as exact.
    sem = math.sqrt(max(acc * (1.0 - acc), 1.0 / len(targets)) / len(targets))
    return {"accuracy": acc, "accuracy_sem": sem, "majority_rate": majority}


def connect_teacher(cfg: DictConfig, tokenizer: Any, student: nn.Module) -> ServedTeacher | None:
    """The served teacher of ``stage3.teacher.url``, checked against the student's tokenizer, or None."""
    vocab = student.get_output_embeddings().weight.shape[0]
    return connect_served_teacher(cfg.stage3.teacher, "stage3.teacher", tokenizer, vocab, cfg.data.seq_len)


def load_stage3_teacher(
    cfg: DictConfig, device: torch.device, dtype: torch.dtype, student: nn.Module
) -> nn.Module:
    """The frozen FP teacher for Stage 3: ``stage3.teacher.pretrained`` if set, else the model's."""
    name = cfg.stage3.teacher.pretrained
    if name:
        cfg = OmegaConf.create(OmegaConf.to_container(cfg))
        cfg.model.pretrained = name
    teacher, _ = load_teacher(cfg, device, dtype)
    t_vocab = teacher.get_output_embeddings().weight.shape[0]
    s_vocab = student.get_output_embeddings().weight.shape[0]
    if t_vocab != s_vocab:
        raise ValueError(
            f"stage3.teacher.pretrained: {name!r} has a {t_vocab}-token vocabulary, the student {s_vocab}; "
            "the teacher must share the student's tokenizer"
        )
    return teacher


def load_init_checkpoint(model: nn.Module, path: str) -> None:
    """Load ``stage3.init_checkpoint`` (a checkpoint file with a ``model`` state dict) into the student."""
    p = PurePosixPath(path)
    if p.suffix != ".pt":
        raise ValueError(
            f"stage3.init_checkpoint: {path!r} is not a .pt checkpoint file (e.g. <ckpt dir>/final.pt)"
        )
    state = CheckpointManager(str(p.parent)).load(p.stem)
    if "model" not in state:
        raise ValueError(f"stage3.init_checkpoint: {path!r} has no 'model' state dict")
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ValueError(
            f"stage3.init_checkpoint: {path!r} does not match this student ({first}); "
            "use the same model/quantisation/saliency config that wrote it"
        ) from None
    log.info("stage3: student initialised from %s", path)
