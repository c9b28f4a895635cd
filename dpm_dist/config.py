"""Typed configuration schema (Hydra structured configs).

Each section is a dataclass whose ``__post_init__`` raises ``ValueError`` naming the offending field.
Hydra/OmegaConf type-check the YAML against these classes; :func:`to_config` turns a composed
``DictConfig`` into real dataclass instances, which runs the validation on the final values.

Defaults are the paper's recipe for Occluded-Duke as the official code runs it (SPEC §8); presets in
``configs/experiment/`` change only what the official per-dataset configs change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

DATASETS = ("occluded_duke", "dukemtmc", "market1501", "occluded_reid", "msmt17", "synthetic", "generic")
UPDATE_MODES = ("exact", "reference", "approx")
PRECISIONS = ("fp32", "bf16", "fp16")
DISTANCES = ("masked_cosine", "cosine", "euclidean")
SAMPLERS = ("stream", "exact")


def _check(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise ValueError(f"config field `{name}`: {message}")


def _check_choice(value: str, name: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, name, f"unknown value {value!r}; expected one of {', '.join(choices)}")


def _check_pair(value: List[int], name: str) -> None:
    _check(len(value) == 2 and all(int(v) > 0 for v in value), name, f"expected [height, width] > 0, got {list(value)}")


@dataclass
class ModelConfig:
    """DPM network: timm ViT backbone + SIE + HMG + BNNeck + prototypes (SPEC §1-2, §4.1-4.2)."""

    backbone: str = "vit_base_patch16_224"  # any timm ViT name; built with pretrained=False
    embed_dim: Optional[int] = None  # overrides of the timm architecture (tiny test models)
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    img_size: List[int] = field(default_factory=lambda: [256, 128])
    patch_size: int = 16
    stride: List[int] = field(default_factory=lambda: [11, 11])
    drop_path: float = 0.1
    sie: bool = True  # SIE camera embedding; False gives camera-agnostic features
    sie_coe: float = 3.0
    num_cams: int = 0  # 0: taken from the training shards' manifest
    num_classes: int = 0  # 0: taken from the training shards' manifest
    tap_blocks: List[int] = field(default_factory=lambda: [2, 4, 10, 12])  # 1-based
    pretrained: Optional[str] = None  # local ImageNet ViT file (jx_vit_base_p16_224 or timm state dict)

    def __post_init__(self) -> None:
        _check_pair(self.img_size, "model.img_size")
        _check_pair(self.stride, "model.stride")
        _check(self.patch_size > 0, "model.patch_size", f"must be > 0, got {self.patch_size}")
        for axis, s in zip(("height", "width"), self.stride):
            _check(s <= self.patch_size, "model.stride", f"{axis} stride {s} is larger than the patch ({self.patch_size}): pixels would be skipped")
        for axis, size in zip(("height", "width"), self.img_size):
            _check(size >= self.patch_size, "model.img_size", f"{axis} {size} is smaller than the patch {self.patch_size}")
        _check(0.0 <= self.drop_path < 1.0, "model.drop_path", f"must be in [0, 1), got {self.drop_path}")
        _check(self.sie_coe >= 0.0, "model.sie_coe", f"must be >= 0, got {self.sie_coe}")
        _check(self.num_cams >= 0, "model.num_cams", f"must be >= 0, got {self.num_cams}")
        _check(self.num_classes >= 0, "model.num_classes", f"must be >= 0, got {self.num_classes}")
        _check(len(self.tap_blocks) > 0, "model.tap_blocks", "needs at least one block")
        _check(all(b >= 1 for b in self.tap_blocks), "model.tap_blocks", f"blocks are 1-based, got {list(self.tap_blocks)}")
        if self.depth is not None:
            _check(max(self.tap_blocks) <= self.depth, "model.tap_blocks", f"block {max(self.tap_blocks)} exceeds depth {self.depth}")

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid (h, w) of the overlapping patch embedding (SPEC §1.2: a product, not a sum)."""
        (height, width), (sy, sx) = self.img_size, self.stride
        return (height - self.patch_size) // sy + 1, (width - self.patch_size) // sx + 1


@dataclass
class LossConfig:
    """L = α·CE(plain) + (1−α)·CE(masked ArcFace) + β·L_hem + w_tri·L_triplet (SPEC §4.6)."""

    alpha: float = 0.5  # plain vs masked classification weight
    beta: float = 0.1  # HEM weight (0.01 for Market→Occluded-REID)
    margin: float = 0.5  # ArcFace m
    scale: float = 30.0  # ArcFace s
    triplet_weight: float = 1.0
    hem_ref_batch: int = 64  # L_hem = Σ_b/heads² over this many samples, whatever the per-rank batch

    def __post_init__(self) -> None:
        _check(0.0 <= self.alpha <= 1.0, "loss.alpha", f"must be in [0, 1], got {self.alpha}")
        _check(self.beta >= 0.0, "loss.beta", f"must be >= 0, got {self.beta}")
        _check(0.0 <= self.margin < 3.14159, "loss.margin", f"must be in [0, π), got {self.margin}")
        _check(self.scale > 0.0, "loss.scale", f"must be > 0, got {self.scale}")
        _check(self.triplet_weight >= 0.0, "loss.triplet_weight", f"must be >= 0, got {self.triplet_weight}")
        _check(self.hem_ref_batch > 0, "loss.hem_ref_batch", f"must be > 0, got {self.hem_ref_batch}")


@dataclass
class DataConfig:
    """Where the shards are and how batches are formed (SPEC §5.5, §6)."""

    dataset: str = "occluded_duke"
    root: Optional[str] = None  # folder or URL prefix holding index.json and the shards
    eval_root: Optional[str] = None  # query/gallery from another dataset (Market→Occluded-REID); None: root
    train_urls: List[str] = field(default_factory=list)  # explicit shard URLs; empty: from root/index.json
    query_urls: List[str] = field(default_factory=list)
    gallery_urls: List[str] = field(default_factory=list)
    s3_endpoint: Optional[str] = None  # e.g. http://127.0.0.1:9000 for MinIO; None: AWS default chain
    sampler: str = "exact"  # exact: the official per-epoch PK sampler; stream: resampled shards
    num_ids: int = 16  # P identities per rank-batch
    num_instances: int = 4  # K images per identity
    num_workers: int = 8
    img_size: List[int] = field(default_factory=lambda: [256, 128])
    flip_prob: float = 0.5
    padding: int = 10
    erase_prob: float = 0.5
    color_jitter: bool = False  # on for Market→Occluded-REID (DPM issue #5)
    shuffle_buffer: int = 2000  # stream mode: samples held to form P×K batches
    batches_per_epoch: int = 0  # stream mode: 0 = dataset size / (P·K·world)
    skip_corrupt: bool = False  # count and log corrupt samples instead of raising
    eval_batch_size: int = 256

    def __post_init__(self) -> None:
        _check_choice(self.dataset, "data.dataset", DATASETS)
        _check_choice(self.sampler, "data.sampler", SAMPLERS)
        _check(self.num_ids >= 2, "data.num_ids", f"P must be >= 2 for triplet negatives, got {self.num_ids}")
        _check(self.num_instances >= 2, "data.num_instances", f"K must be >= 2 for triplet positives, got {self.num_instances}")
        _check(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        _check_pair(self.img_size, "data.img_size")
        _check(0.0 <= self.flip_prob <= 1.0, "data.flip_prob", f"must be in [0, 1], got {self.flip_prob}")
        _check(0.0 <= self.erase_prob <= 1.0, "data.erase_prob", f"must be in [0, 1], got {self.erase_prob}")
        _check(self.padding >= 0, "data.padding", f"must be >= 0, got {self.padding}")
        _check(self.shuffle_buffer >= self.num_ids * self.num_instances, "data.shuffle_buffer", "must hold at least one P×K batch")
        _check(self.batches_per_epoch >= 0, "data.batches_per_epoch", f"must be >= 0, got {self.batches_per_epoch}")
        _check(self.eval_batch_size > 0, "data.eval_batch_size", f"must be > 0, got {self.eval_batch_size}")

    @property
    def batch_size(self) -> int:
        return self.num_ids * self.num_instances


@dataclass
class OptimConfig:
    """SGD groups and the per-epoch warmup + cosine schedule of the official code (SPEC §5.1-5.2)."""

    base_lr: float = 0.008
    bias_lr_factor: float = 2.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_bias: float = 1e-4
    epochs: int = 150
    warmup_epochs: int = 5
    warmup_lr_factor: float = 0.01  # warmup starts at base_lr · this
    min_lr_factor: float = 0.002  # cosine floor = base_lr · this
    schedule_mask_generator: bool = False  # official: the HMG optimiser is never scheduled
    steps_per_epoch: int = 0  # 0: one epoch of the sampler; > 0 caps iterations (quick runs)

    def __post_init__(self) -> None:
        _check(self.base_lr > 0.0, "optim.base_lr", f"must be > 0, got {self.base_lr}")
        _check(self.bias_lr_factor > 0.0, "optim.bias_lr_factor", f"must be > 0, got {self.bias_lr_factor}")
        _check(0.0 <= self.momentum < 1.0, "optim.momentum", f"must be in [0, 1), got {self.momentum}")
        _check(self.weight_decay >= 0.0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.weight_decay_bias >= 0.0, "optim.weight_decay_bias", f"must be >= 0, got {self.weight_decay_bias}")
        _check(self.epochs >= 1, "optim.epochs", f"must be >= 1, got {self.epochs}")
        _check(0 <= self.warmup_epochs < self.epochs or self.epochs == 1, "optim.warmup_epochs", f"must be in [0, epochs), got {self.warmup_epochs}")
        _check(self.warmup_lr_factor > 0.0, "optim.warmup_lr_factor", f"must be > 0, got {self.warmup_lr_factor}")
        _check(0.0 <= self.min_lr_factor <= 1.0, "optim.min_lr_factor", f"must be in [0, 1], got {self.min_lr_factor}")
        _check(self.steps_per_epoch >= 0, "optim.steps_per_epoch", f"must be >= 0, got {self.steps_per_epoch}")


@dataclass
class EngineConfig:
    """DeepSpeed wrapping of the two-step DPM update (SPEC §5.4, §10)."""

    update_mode: str = "exact"  # exact | reference | approx (SPEC §10.2-10.3)
    zero_stage: int = 0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (dynamic loss scaling)
    gradient_clipping: float = 0.0  # explicit: DeepSpeed's own default is 1.0
    fp16_initial_scale_power: int = 16
    hem_global_batch: bool = True  # HEM scale against loss.hem_ref_batch samples in total, not per rank
    gather_triplet: bool = False  # mine triplets over features all-gathered from every rank
    sync_bn: bool = False  # SyncBatchNorm for the BNNeck and the HMG BNs
    seed: int = 1234
    deterministic: bool = False

    def __post_init__(self) -> None:
        _check_choice(self.update_mode, "engine.update_mode", UPDATE_MODES)
        _check_choice(self.precision, "engine.precision", PRECISIONS)
        _check(self.zero_stage in (0, 1, 2), "engine.zero_stage", f"supported stages are 0, 1, 2 (got {self.zero_stage}); ZeRO-3 cannot toggle trainable params")
        _check(self.gradient_clipping >= 0.0, "engine.gradient_clipping", f"must be >= 0, got {self.gradient_clipping}")


@dataclass
class EvalConfig:
    """Retrieval protocol (SPEC §7)."""

    period: int = 10  # epochs between evaluations; the last epoch always evaluates
    distance: str = "masked_cosine"  # masked_cosine (DPM) | cosine | euclidean
    max_rank: int = 50
    query_chunk: int = 1024  # queries scored at once; bounds memory
    rerank: bool = False  # k-reciprocal re-ranking (not used for the paper's numbers)
    rerank_k1: int = 20
    rerank_k2: int = 6
    rerank_lambda: float = 0.3
    num_pictures: int = 4  # ranked-list pictures written by dpm-eval

    def __post_init__(self) -> None:
        _check_choice(self.distance, "eval.distance", DISTANCES)
        _check(self.period >= 1, "eval.period", f"must be >= 1, got {self.period}")
        _check(self.max_rank >= 1, "eval.max_rank", f"must be >= 1, got {self.max_rank}")
        _check(self.query_chunk >= 1, "eval.query_chunk", f"must be >= 1, got {self.query_chunk}")
        _check(self.rerank_k1 >= 1 and self.rerank_k2 >= 1, "eval.rerank_k1", "k1 and k2 must be >= 1")
        _check(0.0 <= self.rerank_lambda <= 1.0, "eval.rerank_lambda", f"must be in [0, 1], got {self.rerank_lambda}")


@dataclass
class SearchConfig:
    """Ray Tune search over α, β, m, s (used by dpm-tune only)."""

    metric: str = "mAP"
    mode: str = "max"
    searcher: str = "optuna"  # optuna | random | grid
    scheduler: str = "asha"  # asha | fifo
    num_samples: int = 8
    max_t: int = 0  # ASHA horizon in epochs; 0: optim.epochs
    grace_period: int = 1
    reduction_factor: int = 2
    workers_per_trial: int = 1
    cpus_per_worker: int = 1
    gpus_per_worker: float = 0.0
    max_concurrent_trials: int = 0  # 0: derived from the cluster's resources
    max_failures: int = 1
    storage_path: Optional[str] = None  # local folder or s3://bucket/prefix
    s3_endpoint: Optional[str] = None
    name: str = "dpm_search"
    space: Dict[str, Any] = field(default_factory=dict)  # dotted key -> {type: uniform, low:, high:}

    def __post_init__(self) -> None:
        _check(self.metric in ("mAP", "rank1", "mINP"), "search.metric", f"unknown metric {self.metric!r}; expected mAP, rank1 or mINP")
        _check_choice(self.mode, "search.mode", ("max", "min"))
        _check_choice(self.searcher, "search.searcher", ("optuna", "random", "grid"))
        _check_choice(self.scheduler, "search.scheduler", ("asha", "fifo"))
        _check(self.num_samples >= 1, "search.num_samples", f"must be >= 1, got {self.num_samples}")
        _check(self.workers_per_trial >= 1, "search.workers_per_trial", f"must be >= 1, got {self.workers_per_trial}")


@dataclass
class LogConfig:
    output_dir: str = "runs/default"  # run folder: checkpoints, tb/, config.yaml, results.json
    log_every: int = 10  # iterations between logged scalars
    tensorboard: bool = True
    progress: bool = True
    checkpoint_every: int = 1  # epochs between checkpoints
    keep_last: int = 2
    keep_best: bool = True

    def __post_init__(self) -> None:
        _check(self.log_every >= 1, "log.log_every", f"must be >= 1, got {self.log_every}")
        _check(self.checkpoint_every >= 1, "log.checkpoint_every", f"must be >= 1, got {self.checkpoint_every}")
        _check(self.keep_last >= 1, "log.keep_last", f"must be >= 1, got {self.keep_last}")


@dataclass
class DPMConfig:
    """Root of the configuration tree composed by Hydra."""

    name: str = "dpm"
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    search: SearchConfig = field(default_factory=SearchConfig)

    def __post_init__(self) -> None:
        _check(list(self.model.img_size) == list(self.data.img_size), "data.img_size",
               f"{list(self.data.img_size)} differs from model.img_size {list(self.model.img_size)}")


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore (as ``dpm_schema``). Imports hydra lazily."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="dpm_schema", node=DPMConfig)


def to_config(cfg: Any) -> DPMConfig:
    """Validated :class:`DPMConfig` from a composed DictConfig, a plain dict, or a DPMConfig."""
    from omegaconf import OmegaConf

    if isinstance(cfg, DPMConfig):
        cfg = OmegaConf.structured(cfg)
    merged = OmegaConf.merge(OmegaConf.structured(DPMConfig), cfg)
    return OmegaConf.to_object(merged)  # type: ignore[return-value]
