"""Typed, closed config schemas for the training pipeline (Hydra structured configs).

Every YAML under training/conf is merged onto these dataclasses, so an unknown or misspelt
key fails at compose time with the key named (Hydra's struct mode). One knob per idea:
model size lives in the model group, step counts and learning rates in the stage groups.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class TinyConfig:
    """The embedded default teacher; mirrors training.models.TinyModelSpec field for field (a test
    holds the defaults equal, so ``model=tiny`` loads the teacher that ``--build-tiny`` cached)."""

    vocab_size: int = 2048
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    seq_len: int = 128
    pretrain_steps: int = 600
    pretrain_lr: float = 3e-3
    warmup_fraction: float = 0.08
    weight_decay: float = 0.1
    batch_size: int = 16
    eval_fraction: float = 0.05
    seed: int = 0


@dataclass
class ModelConfig:
    name: str = MISSING
    # Hub name or local directory of a Hugging Face causal LM; null selects the tiny teacher.
    pretrained: str | None = None
    tiny: TinyConfig = field(default_factory=TinyConfig)
    # BitLinear activation quantisation (per-token absmax int8); off = weight-only ternary.
    quantize_activations: bool = True
    # BitLinear's forward GEMM at lambda = 1 (training/bitnet/gemm.py): auto (the exact int8 GEMM on CUDA,
    # else the regular matmul, one log line) | bf16 (regular matmul) | int8 | fp8 (refuse to start where
    # the device lacks them).
    gemm: str = "auto"
    fp8_out_dtype: str = "bfloat16"  # bfloat16 | float32: the FP8 GEMM's output
    # torch._scaled_mm(use_fast_accum=True): the notebook's faster "bf16 accumulation" (fp8.py: its error).
    fp8_fast_accum: bool = False


@dataclass
class DataConfig:
    name: str = MISSING
    source: str = "builtin"  # builtin | files | hf
    path: str | None = None  # glob for source=files
    text_field: str = "text"
    hf_name: str | None = None
    hf_config: str | None = None
    split: str = "train"
    seq_len: int = 128
    # Held-out blocks scored by every eval; 8 batches at the default batch size, so the eval-batch
    # standard error (a diagnostic: trials share the eval set) is itself estimated from 8 values.
    eval_blocks: int = 64
    eval_batch_size: int = 8
    max_docs: int | None = None
    # The train/eval split (and, mixed in, the training order): changing it changes the eval set.
    seed: int = 0
    # The order of training batches only (never the eval split): 0 is the order data.seed gives;
    # another value reshuffles the train blocks (a repeat of a trial with fresh data-order noise).
    # Streaming sources (source=hf) keep stream order at 0 and shuffle within windows of
    # shuffle_window blocks otherwise.
    order_seed: int = 0
    shuffle_window: int = 1024


@dataclass
class OptimizerConfig:
    name: str = "muon"  # adamw | muon | muonclip | apollo
    lr: float = 3e-3
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    momentum: float = 0.95
    nesterov: bool = True
    adamw_lr: float | None = None
    qk_clip_tau: float = 100.0
    apollo_rank: int = 128
    # Muon's Newton-Schulz dtype: bfloat16 (torch.optim.Muon, the notebook) | float32 (~14x faster on CPU).
    ns_dtype: str = "bfloat16"
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | linear | constant
    min_lr_ratio: float = 0.1


@dataclass
class DistillLossConfig:
    type: str = "mse_normalized"
    layer_weights: Any = "progressive"  # uniform | progressive | exponential | [w_1, ..., w_L]
    lm_loss_weight: float = 0.5
    temperature: float = 2.0


@dataclass
class SaliencyConfig:
    enabled: bool = False
    initial_k: float = 0.1
    final_k: float = 0.0
    schedule: str = "cosine"
    ema_decay: float = 0.99
    warmup_steps: int = 0
    update_interval: int = 10


@dataclass
class LambdaWarmupConfig:
    enabled: bool = True
    warmup_steps: int = 1000
    schedule: str = "linear"


@dataclass
class ServedTeacherConfig:
    """A teacher served by vLLM (OpenAI-compatible completions with prompt_logprobs) instead of held
    in memory; docs/served-teacher.md. Only the logits KD can use it (a server returns no hidden
    states or Q/K/V)."""

    url: str | None = None  # e.g. http://10.0.0.5:8000 (or .../v1); null: the in-process teacher
    served_model: str | None = None  # the server's model name; null: the only model it serves
    # KD over the teacher's top-k tokens, renormalised (training/distill/topk.py). null: the full
    # vocabulary in process, 20 (vLLM's default --max-logprobs) when served.
    top_k: int | None = None
    timeout_s: float = 60.0  # per request; a stalled server counts as a failed attempt
    retries: int = 5  # extra attempts per request, with exponential backoff from backoff_s
    backoff_s: float = 1.0
    prefetch: bool = True  # fetch the next batch's answer in a thread while this one trains
    # Name of the environment variable holding the server's API key (vllm serve --api-key), if any.
    api_key_env: str | None = "VLLM_API_KEY"


@dataclass
class Stage3TeacherConfig(ServedTeacherConfig):
    # Hub id or directory of the FP teacher (the paper uses one fine-tuned on the task); null: model's.
    pretrained: str | None = None


@dataclass
class StageConfig:
    enabled: bool = True
    max_steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    grad_clip: float = 1.0
    # Held-out eval (at lambda = 1) every N optimizer steps, recorded in the metrics JSONL and the
    # stage's eval_curve; 0: only the evaluations at the end of the stage / pipeline.
    eval_every: int = 0
    log_every: int = 10
    # Search the largest micro-batch that fits in memory, keeping batch_size * grad_accum as the
    # effective batch (training/batch_size.py); batch_size is then the search's starting point.
    # auto: on for CUDA (single process), off on CPU; also true / false.
    auto_batch_size: str = "auto"
    # The search's memory target in GiB of peak allocation per step (CUDA); null: run.memory_fraction
    # of the GPU's memory. GPU presets (gpu=...) set it from the notebook's table.
    auto_batch_memory_gb: float | None = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)


@dataclass
class Stage19Config(StageConfig):
    # The notebook's effective batch (its Stage 1.9 / Stage 2 runs used 32 sequences per step).
    batch_size: int = 32
    loss: DistillLossConfig = field(default_factory=DistillLossConfig)
    saliency: SaliencyConfig = field(default_factory=SaliencyConfig)
    # A served teacher gives logits only: with a url, lm_loss_weight must be 1 (CE + logits KL, no
    # layer-wise hidden-state term).
    teacher: ServedTeacherConfig = field(default_factory=ServedTeacherConfig)
    # Off by default: Stage 1.9 distils the fully ternary student (lambda = 1), as the notebook did.
    lambda_warmup: LambdaWarmupConfig = field(default_factory=lambda: LambdaWarmupConfig(enabled=False))


@dataclass
class Stage2Config(StageConfig):
    batch_size: int = 32  # the notebook's effective batch, as Stage 1.9
    lambda_warmup: LambdaWarmupConfig = field(default_factory=LambdaWarmupConfig)
    # Where Stage 2's lambda warmup starts: restart = from 0 (the notebook's recipe); continue = from
    # the lambda Stage 1.9 ended at (1 unless Stage 1.9 did not run), warming the rest of the way.
    lambda_start: str = "restart"


@dataclass
class Stage3LossConfig:
    """BitDistill Eq. 13: CE + logits_weight * KD_T + attention_weight * attention distillation."""

    logits_weight: float = 10.0  # lambda
    temperature: float = 5.0
    # T^2 on the KD term (Hinton et al.; common in public KD code) or not (the paper's Eq. 12).
    kd_scale_by_t2: bool = False
    attention_weight: float = 1.0  # gamma
    use_relation_distill: bool = True  # false: MiniLM attention maps + value relations instead
    distill_layer: int = -1  # one attention layer; negative counts from the last
    relation_heads: int = 0  # 0: the model's number of attention heads


@dataclass
class TaskDataConfig:
    task: str = "lm"  # lm (the data group's text) | classification | summarization
    path: str | None = None  # jsonl of labelled examples; null: built-in examples (training/data/tasks.py)
    input_field: str | None = None  # null: text (classification) / document (summarization)
    target_field: str | None = None  # null: label / summary
    prompt: str = "{input}\nAnswer:"
    eval_examples: int = 32


@dataclass
class Stage3Config(StageConfig):
    enabled: bool = False  # run after Stage 2 in run.stage=pipeline
    # A checkpoint with a "model" state dict of the converted student (e.g. a pipeline's final.pt)
    # to start from; null: the student as the preceding stages (or Stage 1 alone) left it.
    init_checkpoint: str | None = None
    # teacher.pretrained: another FP teacher (hub id or directory); teacher.url: a served one.
    teacher: Stage3TeacherConfig = field(default_factory=Stage3TeacherConfig)
    loss: Stage3LossConfig = field(default_factory=Stage3LossConfig)
    data: TaskDataConfig = field(default_factory=TaskDataConfig)


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "bitnet-sweep"
    entity: str | None = None  # W&B team or user; None: the API key's default entity
    group: str | None = None
    name: str | None = None
    # offline unless WANDB_API_KEY is set in the environment (the key is never stored in configs).
    mode: str = "auto"
    tags: list[str] = field(default_factory=list)


@dataclass
class RunConfig:
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Weights/optimizer state vs compute dtype (training/precision.py): auto (bf16-mixed on CUDA, fp32 on
    # CPU) | bf16-mixed (fp32 master weights and optimizer state, bf16 autocast) | bf16-pure | fp32.
    precision: str = "auto"
    # Auto batch size's default memory target: this fraction of the GPU's total memory.
    memory_fraction: float = 0.85
    # The GPU preset a gpu=<name> config group applied (training/conf/gpu/); informational.
    gpu_preset: str | None = None
    # torch.compile the student: auto = on for CUDA, off on CPU (compile minutes dwarf tiny runs);
    # also true / false. CUDA-graph modes need gradient_checkpointing (training/config.py says why).
    compile: str = "auto"
    compile_mode: str = "default"
    # HF gradient checkpointing (non-reentrant) on the student: less activation memory, ~20% slower.
    gradient_checkpointing: bool = False
    # Several processes: auto = FSDP2 when launched by torchrun (WORLD_SIZE > 1) | fsdp | none
    # (training/distributed.py).
    distributed: str = "auto"
    out_dir: str = "runs/default"
    # Checkpoints at stage boundaries always; also every N stage-2 steps when N > 0.
    checkpoint_every: int = 0
    # Where checkpoints go (a local path or any fsspec URI such as gs://...); default out_dir/ckpt.
    checkpoint_dir: str | None = None
    # Keep only the final checkpoint once the pipeline completes.
    keep_final_only: bool = True
    # Resume from the newest checkpoint in checkpoint_dir when one exists.
    resume: bool = True
    # JSONL of every logged step (the sweep worker tails it); default out_dir/metrics.jsonl
    metrics_file: str | None = None
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class RootConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    stage1_9: Stage19Config = field(default_factory=Stage19Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    stage3: Stage3Config = field(default_factory=Stage3Config)
    # pipeline: Stage 1, then every enabled stage of 1.9 -> 2 -> 3; stage1_9 | stage2 | stage3: Stage 1
    # then that stage only (whatever its enabled flag; see training/stages/pipeline.py).
    stage: str = "pipeline"
    run: RunConfig = field(default_factory=RunConfig)


def register_configs() -> None:
    """Register the schema so config.yaml can list it first in its defaults."""
    ConfigStore.instance().store(name="base_config", node=RootConfig)
