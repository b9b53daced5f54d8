"""Typed configuration: one dataclass per section, a docstring per field, validation in one place.

The YAML files in ``configs/`` are merged onto these dataclasses by :mod:`pipeline.config_loader` (OmegaConf
structured configs), which rejects unknown keys and wrong types. Semantic checks (ranges, allowed values,
combinations) live in :func:`kd.config_checks.validate_config` and nowhere else; every set of allowed values
is declared once, next to the code that implements it, and validated against from there.

Stable keys (other tools rely on them): ``teacher.model``, ``teacher.backend``, ``teacher.top_k``,
``student.model``, ``data.train``, ``data.num_fewshot``, ``cache.path``, ``train.output_dir``,
``train.max_steps``, ``seed``. (``data.train`` is null in mixture configs, whose sources are in
``data.mixture`` / ``data.mixture_file``.)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from omegaconf import MISSING


@dataclass
class RelationConfig:
    """Attention-relation targets (MiniLMv2 / BitDistill); ``hf`` teacher backend only."""

    enabled: bool = False
    """Compute and cache Q-Q, K-K and V-V relation matrices over the answer span."""
    layer: int = -1
    """Teacher layer whose q/k/v projections are used (negative counts from the last layer)."""
    num_heads: int = 8
    """Relation heads A_r: projections are re-split into A_r heads of width d_r = width / A_r."""


@dataclass
class ServerConfig:
    """OpenAI-compatible vLLM servers that score for stage one (``teacher.backend: server``)."""

    urls: List[str] = field(default_factory=list)
    """Base URLs of the servers (``http://host:8000``); they share the requests, a dead one's go to the others."""
    model_name: Optional[str] = None
    """The name the servers serve the teacher under (``--served-model-name``; None: ``teacher.model``)."""
    max_in_flight: int = 8
    """Requests (one sequence each) in flight per server; the server batches them itself."""
    timeout_s: float = 600.0
    """Seconds one request may take (connect, queue, prefill and response) before it is retried."""
    retries: int = 4
    """Retries of a request on connection errors, timeouts, 429 and 5xx before its server is given up."""
    backoff_s: float = 1.0
    """Wait before the first retry; doubled for each further one (capped at 30 s)."""
    api_key_env: Optional[str] = None
    """Name of an environment variable holding the servers' API key (``vllm serve --api-key``); None: no key."""


@dataclass
class TeacherConfig:
    """The teacher model and how stage one runs it."""

    model: str = MISSING
    """HF hub id or local directory of the teacher."""
    backend: str = "vllm"
    """Scoring engine: ``vllm`` (offline LLM, prompt_logprobs), ``hf`` (transformers forward) or ``server``
    (running vLLM servers, ``teacher.server``; ``teacher.model`` then only provides the tokenizer and config)."""
    scoring: str = "auto"
    """``vllm``: ``span`` (the pooling runner's final hidden states, the teacher's lm_head + log-softmax + top-K
    only at the scored rows; prefix cache on), ``prompt_logprobs`` (vLLM's own logprobs at every prompt
    position), or ``auto``: span where the architecture's logits are reproducible, else prompt_logprobs."""
    top_k: int = 64
    """K: how many of the teacher's most likely next tokens are cached per distilled position."""
    dtype: str = "auto"
    """Compute dtype: ``auto`` (bf16 on GPU; bf16 for vllm and fp32 for hf on CPU), or an explicit dtype."""
    logprob_mode: str = "raw_logprobs"
    """Cached logprobs are the full-vocabulary log-softmax of the raw logits at temperature 1."""
    max_batch_tokens: int = 8192
    """``hf``: token budget of one forward batch (length-sorted)."""
    logprob_chunk: int = 1024
    """``hf`` and the vllm span path: rows per lm_head / log_softmax / top-K chunk at scored positions (bounds fp32 logits memory)."""
    tensor_parallel_size: int = 1
    """``vllm``: GPUs per engine."""
    gpu_memory_utilization: float = 0.85
    """``vllm``: fraction of GPU memory the engine may take."""
    max_num_batched_tokens: Optional[int] = None
    """``vllm``: scheduler token budget per step (None: the engine's default)."""
    max_model_len: Optional[int] = None
    """``vllm``: context length the engine reserves (None: the model's own)."""
    attention: RelationConfig = field(default_factory=RelationConfig)
    """Optional attention-relation targets."""
    server: ServerConfig = field(default_factory=ServerConfig)
    """``server``: where the vLLM servers are and how they are called."""


@dataclass
class LoraConfig:
    """peft LoRA adapter settings (``student.mode: lora``)."""

    r: int = 16
    """Adapter rank."""
    alpha: int = 32
    """Scaling numerator (effective scale alpha / r)."""
    dropout: float = 0.05
    """Dropout on the adapter input."""
    target_modules: List[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Module names that get adapters."""


@dataclass
class QuantConfig:
    """Quantized students (``student.mode`` qat_int4, qat_int4_lora, ternary)."""

    group_size: int = 32
    """qat_int4: weights per int4 scale (symmetric, per group along the input dimension)."""
    activations: str = "none"
    """qat_int4 / qat_int4_lora: ``none`` (weight-only int4) or ``int8`` (dynamic per-token int8 activations,
    torchao's Int8DynamicActivationIntxWeightConfig)."""
    lm_head: bool = False
    """qat_int4 / qat_int4_lora: also fake-quantize the lm_head (the input embedding is ``embedding``'s; with
    tied embeddings this quantizes the shared matrix on the output side only)."""
    embedding: bool = False
    """qat_int4 / qat_int4_lora: also fake-quantize the input embedding (weight-only int4, a scale per ``group_size``
    values along the embedding dim, whatever ``activations`` is; frozen in qat_int4_lora). With tied embeddings
    each side reads the one shared latent matrix through its own quantizer, so ``lm_head=false`` keeps a full
    precision output side, and ``pipeline export`` unties them (an int4 embedding plus the lm_head as set)."""
    subln: bool = True
    """ternary: an extra RMSNorm before the attention output and MLP down projections (BitDistill's SubLN)."""


@dataclass
class StudentConfig:
    """The student model and how it is trained."""

    model: str = MISSING
    """HF hub id or local directory of the student's initial weights."""
    mode: str = "lora"
    """``lora`` (adapters on a frozen base), ``full`` (every weight trains), or a quantized mode: ``qat_int4``,
    ``qat_int4_lora``, ``ternary`` (see ``student.quant``)."""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA settings (used when mode is ``lora``)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    dtype: str = "auto"
    """Weights while training: ``auto`` (float32 on CPU and for ``full``; a bfloat16 frozen base for ``lora`` on
    GPUs with bf16), or an explicit dtype. Trainable weights of a bf16/fp16 base stay float32 (peft)."""
    save_merged: bool = True
    """``lora``: also write the adapter merged into the base (``final/merged``), loadable without peft (vLLM)."""
    quant: QuantConfig = field(default_factory=QuantConfig)
    """Settings of the quantized modes (qat_int4: torchao QAT; qat_int4_lora: LoRA on a frozen fake-quantized
    base; ternary: BitNet b1.58 linears)."""
    relation_layer: int = -1
    """Student layer whose q/k/v projections give the attention relations matched to the teacher's
    (train.attention_weight > 0; negative counts from the last layer)."""


@dataclass
class MixtureEntry:
    """One source of a data mixture (``data.mixture``)."""

    name: str = MISSING
    """Source name: recorded per sample in the cache, shown by inspect-cache, keyed by train.source_weights."""
    path: str = MISSING
    """Local JSONL / parquet file of the source."""
    proportion: float = 1.0
    """Share of the mixture budget (normalised over all sources; >= 0)."""
    format: Optional[str] = None
    """The source's data format (None: data.format)."""


@dataclass
class DataConfig:
    """Where the samples come from and how prompts are built."""

    train: Optional[str] = None
    """Training samples: a local JSONL / parquet file, or a HF dataset name (machines with internet only).
    Required unless data.mixture or data.mixture_file gives the sources."""
    test: Optional[str] = None
    """Test problems for evaluation by generation."""
    dataset_config: Optional[str] = None
    """HF dataset config name (``main`` for openai/gsm8k)."""
    fewshot_pool: Optional[str] = None
    """Where worked examples for the teacher come from (None: the training samples)."""
    num_fewshot: int = 0
    """Worked examples shown to the teacher before each question (0: teacher input equals student input)."""
    fewshot_sets: int = 0
    """Shared shot sets: M > 0 draws M fixed disjoint sets of num_fewshot shots once (from ``seed``) and gives each
    sample one of them (from seed + index; never one holding the sample itself), so samples of a set share the
    teacher prefix and stage one computes it once per set (vLLM prefix cache). 0: shots drawn per sample."""
    fewshot_answers: str = "gold"
    """``gold``: each worked example shows its own answer; ``shuffled``: another example's answer (an ablation)."""
    max_seq_len: int = 2048
    """Longest student sequence; longer few-shot teacher contexts drop shots first, then the sample is skipped."""
    max_teacher_len: Optional[int] = None
    """Longest teacher sequence (None: no limit beyond the engine's); shots are dropped to fit."""
    max_samples: Optional[int] = None
    """Use only the first N training samples (None: all)."""
    on_error: str = "fail"
    """Malformed rows: ``fail`` (stop, naming file:line) or ``skip`` (skip and count)."""
    format: str = "gsm8k"
    """Row format: gsm8k, alpaca, sharegpt, openai (chat: only assistant turns distilled), text, tokenized
    (every token / loss_mask distilled), or auto (detected from the first row). See kd/data/formats.py."""
    system_prompt: Optional[str] = None
    """System message given to teacher and student for conversations without one (chat formats)."""
    teacher_system_prompt: Optional[str] = None
    """Privileged teacher context: a system prompt only the teacher sees (chat formats); the student learns to
    behave as if it had been told. Merged in front of the row's own system message."""
    window_stride: Optional[int] = None
    """text/tokenized: documents longer than max_seq_len become windows starting every window_stride tokens
    (None: max_seq_len, no overlap); each token is distilled once. Never truncated."""
    mixture: List[MixtureEntry] = field(default_factory=list)
    """Sources drawn in proportion (instead of data.train); see kd/data/mixture.py."""
    mixture_file: Optional[str] = None
    """A mixture file instead of data.mixture: lines ``name path proportion [format]``."""
    mixture_budget: Optional[int] = None
    """Size of the mixture draw in mixture_unit (required with a mixture)."""
    mixture_unit: str = "samples"
    """``samples`` or ``tokens`` (student tokens): what mixture_budget and the proportions count."""


@dataclass
class CacheConfig:
    """Where and how the teacher cache is written."""

    path: str = MISSING
    """Directory of the Zarr v3 cache."""
    shard_size: int = 256
    """Samples per part: the unit of parallel work and of resumption."""
    logprob_dtype: str = "float16"
    """Storage dtype of top-K logprobs: ``float16`` (half the bytes) or ``float32`` (exact)."""
    encoding: str = "plain"
    """How top-K rows are stored: ``plain`` (ids in the smallest integer type + ``logprob_dtype`` logprobs, zstd)
    or ``compact`` (ids sorted and delta-coded, logprobs as 8-bit codes 1/16 nat apart below each row's exact
    top, zstd 9): about 0.55-0.6x the bytes at real vocabularies for a logprob error < 0.0625 nats (never
    upward); the loader decodes it vectorised."""
    temperatures: Optional[list[float]] = None
    """Temperatures at which the cache stores the teacher's log-normalizer log Σ_V p^(1/τ) (4 bytes per scored
    position each), so ``train.topk_handling: tail`` tempers the tail exactly at them; 1 is always included.
    null: 1 plus ``train.temperature`` when the backend can (hf sees the full logit row; vLLM's prompt
    logprobs are at τ=1 only). ``renormalize`` is exact at any τ and needs none."""
    targets: str = "topk"
    """What is stored per scored position: ``topk`` (the teacher's top-K logprobs), ``sampled`` (Random-Sampling
    KD: ``samples_per_position`` draws from the teacher at ``train.temperature``, kept as unique ids + counts, an
    unbiased target; no top-K) or ``both``. Sampling needs the full logit row: ``teacher.backend=hf``."""
    samples_per_position: int = 32
    """S, the teacher draws per scored position for sampled targets (1-255; the paper's ~12 unique ids come from a
    few dozen draws). The unbiased target of a position is count/S."""


@dataclass
class TrainConfig:
    """Stage two: optimisation, losses, logging and checkpoints."""

    output_dir: str = MISSING
    """Run directory: checkpoints, metrics.jsonl, TensorBoard logs, final model."""
    max_steps: int = 100
    """Optimizer steps."""
    batch_size: int = 8
    """Samples per micro-batch per process."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step."""
    lr: float = 2e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warmup steps before the cosine decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 disables)."""
    kd_weight: float = 1.0
    """Weight of the distillation term."""
    ce_weight: float = 0.0
    """Weight of the cross-entropy term on the actual tokens."""
    kd_kind: str = "forward_kl"
    """Distillation loss: forward_kl, reverse_kl, jsd, mse_topk."""
    jsd_beta: float = 0.5
    """Generalized JSD interpolation (0: forward KL, 1: reverse KL)."""
    temperature: float = 1.0
    """Softening temperature applied to both sides."""
    temperature_squared: bool = True
    """Multiply the KD term by temperature² (Hinton); TRL and Liger do not."""
    topk_handling: str = "tail"
    """``tail`` (K+1-th bucket with the remaining mass) or ``renormalize`` (both over the top-K ids)."""
    kd_targets: str = "topk"
    """Which cached targets the KD term uses: ``topk`` or ``sampled`` (the cache's sampled ids and counts, an
    unbiased estimate of the teacher's distribution; forward KL only, at the τ the cache sampled at)."""
    eval_every: int = 50
    """Validation every N steps (0: never)."""
    save_every: int = 50
    """Checkpoint every N steps (0: only at the end)."""
    log_every: int = 10
    """Log scalars every N steps."""
    num_validation_samples: int = 64
    """Cache samples held out for validation of the cache (a seeded draw, the same for every process)."""
    mixed_precision: str = "auto"
    """Autocast: ``auto`` (bf16 where the GPU has it, none on CPU), ``no``, ``bf16`` or ``fp16``."""
    logprob_chunk: int = 1024
    """Distilled rows per student lm_head / log-softmax chunk (bounds the [chunk, V] logits memory)."""
    keep_checkpoints: int = 2
    """Most recent complete checkpoints kept in output_dir/checkpoints (0: keep all)."""
    source_weights: Dict[str, float] = field(default_factory=dict)
    """Train-time reweighting of the cache's sources without re-caching: a source's samples are drawn
    ``weight`` times as often as cached (0 drops the source; unlisted sources keep 1). When set, each epoch
    draws as many samples as the training split holds, with replacement, by these weights."""
    attention_weight: float = 0.0
    """γ: weight of the attention-relation distillation term (MiniLMv2 / BitDistill); needs a cache with
    relations (teacher.attention.enabled, hf backend). 0: off."""


@dataclass
class EvalConfig:
    """Evaluation (``pipeline eval``, the last step of ``run-all``): generation, metrics and baselines."""

    backend: str = "auto"
    """Generation engine: ``vllm``, ``hf`` (transformers generate), or ``auto`` (vllm when importable and a GPU
    is present; on CPU an engine start costs more than generating a small test split with transformers)."""
    max_new_tokens: int = 256
    """Longest generated answer; a solution cut here usually has no ``####`` mark and counts as no answer."""
    stop_strings: List[str] = field(default_factory=list)
    """Extra strings that end generation (the template's end of turn and eos always do)."""
    batch_size: int = 32
    """``hf``: prompts per generate call (length-sorted, left-padded). vLLM schedules all prompts itself."""
    max_samples: Optional[int] = None
    """Evaluate only the first N test problems (None: the whole ``data.test``)."""
    steps: List[int] = field(default_factory=list)
    """Checkpoint steps to evaluate ([]: every complete checkpoint in the run directory)."""
    baseline: str = "none"
    """``sft``: ``run-all`` also trains a cross-entropy-only student (kd_weight=0, ce_weight=1) with the same
    steps into ``<train.output_dir>-sft``, and the report shows it beside the distilled student."""
    teacher: bool = True
    """Also evaluate the teacher, with ``data.num_fewshot`` shots and with none (the in-context gap)."""
    answer_fallback: str = "last_number"
    """No ``####`` mark in the output: ``last_number`` takes the last number (reported separately), ``none``
    counts it as no answer."""
    perplexity: bool = True
    """Perplexity of each model on the test answers given zero-shot prompts."""
    held_out_kl: bool = True
    """KL(teacher || student) on the held-out cache samples of stage two (kept mass and tail bucket)."""


@dataclass
class Config:
    """A whole run: teacher, student, data, cache and training settings."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """The teacher and stage one's engine."""
    student: StudentConfig = field(default_factory=StudentConfig)
    """The student and its training mode."""
    data: DataConfig = field(default_factory=DataConfig)
    """Samples and prompt recipe."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """The teacher cache."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Stage two."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation and baselines."""
    seed: int = 0
    """Seed for shot drawing, shuffling and initialisation."""
    name: str = "run"
    """A short name for logs and reports."""


def config_to_dict(cfg: Config) -> dict:
    """A plain, JSON-able snapshot of a resolved config (for cache metadata and run directories)."""
    return dataclasses.asdict(cfg)
