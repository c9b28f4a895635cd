"""Typed configuration schema (Hydra structured configs).

Each section is a dataclass whose ``__post_init__`` raises ``ValueError`` naming the offending field.
Hydra/OmegaConf type-check the YAML against these classes; :func:`to_config` turns a composed
``DictConfig`` into real dataclass instances, which runs the validation on the final values.

Defaults are the paper's recipe for Occluded-Duke as the official code runs it (docs/method.md §8); presets in
``configs/experiment/`` change only what the official per-dataset configs change.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from typing import Any

DATASETS = ("occluded_duke", "dukemtmc", "market1501", "occluded_reid", "msmt17", "synthetic", "generic")
UPDATE_MODES = ("exact", "reference", "approx")
PRECISIONS = ("fp32", "bf16", "fp16")
DISTANCES = ("masked_cosine", "cosine", "euclidean")
SAMPLERS = ("stream", "exact")
LOG_LEVELS = ("warning", "info", "debug")
CLASSIFIERS = ("replicated", "sharded")
INVARIANT_MODES = ("off", "on", "auto")
# The paper's ablations (docs/method.md §4.7): the loss of each classification branch and where the mask acts.
PLAIN_BRANCHES = ("softmax", "arcface")  # Table 4's S / A on the plain (Cls) branch
MASKED_BRANCHES = ("arcface", "softmax", "off")  # Table 4's A / S on the masked (Mask-Cls) branch; off: no branch
MASK_PLACEMENTS = ("P_n", "P", "P_n+F_n", "P+F")  # Table 5's rows


def _check(cond: bool, name: str, message: str) -> None:
    if not cond:
        raise ValueError(f"config field `{name}`: {message}")


def _check_choice(value: str, name: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, name, f"unknown value {value!r}; expected one of {', '.join(choices)}")


def _check_pair(value: list[int], name: str) -> None:
    _check(len(value) == 2 and all(int(v) > 0 for v in value), name, f"expected [height, width] > 0, got {list(value)}")


@dataclass
class ModelConfig:
    """DPM network: timm ViT backbone + SIE + HMG + BNNeck + prototypes (docs/method.md §1-2, §4.1-4.2)."""

    backbone: str = "vit_base_patch16_224"  # any timm ViT name; built with pretrained=False
    embed_dim: int | None = None  # overrides of the timm architecture (tiny test models)
    depth: int | None = None
    num_heads: int | None = None
    img_size: list[int] = field(default_factory=lambda: [256, 128])
    patch_size: int = 16
    stride: list[int] = field(default_factory=lambda: [11, 11])
    drop_path: float = 0.1
    sie: bool = True  # SIE camera embedding; False gives camera-agnostic features
    sie_coe: float = 3.0
    num_cams: int = 0  # 0: taken from the training shards' manifest
    num_classes: int = 0  # 0: taken from the training shards' manifest
    tap_blocks: list[int] = field(default_factory=lambda: [2, 4, 10, 12])  # 1-based
    pretrained: str | None = None  # local ImageNet ViT file: jx_vit_base_p16_224 .pth, timm state dict, .safetensors
    classifier: str = (
        "replicated"  # replicated: W on every rank (the paper) | sharded: C/R rows per rank (docs/training.md)
    )

    def __post_init__(self) -> None:
        _check_pair(self.img_size, "model.img_size")
        _check_pair(self.stride, "model.stride")
        _check_choice(self.classifier, "model.classifier", CLASSIFIERS)
        _check(self.patch_size > 0, "model.patch_size", f"must be > 0, got {self.patch_size}")
        for axis, s in zip(("height", "width"), self.stride):
            _check(
                s <= self.patch_size,
                "model.stride",
                f"{axis} stride {s} is larger than the patch ({self.patch_size}): pixels would be skipped",
            )
        for axis, size in zip(("height", "width"), self.img_size):
            _check(
                size >= self.patch_size, "model.img_size", f"{axis} {size} is smaller than the patch {self.patch_size}"
            )
        _check(0.0 <= self.drop_path < 1.0, "model.drop_path", f"must be in [0, 1), got {self.drop_path}")
        _check(self.sie_coe >= 0.0, "model.sie_coe", f"must be >= 0, got {self.sie_coe}")
        _check(self.num_cams >= 0, "model.num_cams", f"must be >= 0, got {self.num_cams}")
        _check(self.num_classes >= 0, "model.num_classes", f"must be >= 0, got {self.num_classes}")
        _check(len(self.tap_blocks) > 0, "model.tap_blocks", "needs at least one block")
        _check(
            all(b >= 1 for b in self.tap_blocks), "model.tap_blocks", f"blocks are 1-based, got {list(self.tap_blocks)}"
        )
        if self.depth is not None:
            _check(
                max(self.tap_blocks) <= self.depth,
                "model.tap_blocks",
                f"block {max(self.tap_blocks)} exceeds depth {self.depth}",
            )

    @property
    def grid(self) -> tuple[int, int]:
        """Token grid (h, w) of the overlapping patch embedding (docs/method.md §1.2: a product, not a sum)."""
        (height, width), (sy, sx) = self.img_size, self.stride
        return (height - self.patch_size) // sy + 1, (width - self.patch_size) // sx + 1


@dataclass
class LossConfig:
    """L = α·CE(plain) + (1−α)·CE(masked ArcFace) + β·L_hem + w_tri·L_triplet (docs/method.md §4.6)."""

    alpha: float = 0.5  # plain vs masked classification weight
    beta: float = 0.1  # HEM weight (0.01 for Market→Occluded-REID)
    margin: float = 0.5  # ArcFace m
    scale: float = 30.0  # ArcFace s
    triplet_weight: float = 1.0
    hem_ref_batch: int = 64  # L_hem = Σ_b/heads² over this many samples, whatever the per-rank batch
    sample_rate: float = 1.0  # Partial FC (model.classifier=sharded): share of each shard's classes per step; 1 = all
    # Ablations of the paper's tables (docs/method.md §4.7); the defaults are the paper's final model.
    plain_branch: str = "softmax"  # softmax: CE(f_bn·Wᵀ) | arcface: ArcFace(s, m) on cos(f_bn, W)
    masked_branch: str = "arcface"  # arcface: ArcFace(s, m) | softmax: s·cos, no margin | off: no masked branch
    mask_placement: str = "P_n"  # P_n | P | P_n+F_n | P+F: where the mask acts in the masked cosine

    def __post_init__(self) -> None:
        _check_choice(self.plain_branch, "loss.plain_branch", PLAIN_BRANCHES)
        _check_choice(self.masked_branch, "loss.masked_branch", MASKED_BRANCHES)
        _check_choice(self.mask_placement, "loss.mask_placement", MASK_PLACEMENTS)
        _check(0.0 <= self.alpha <= 1.0, "loss.alpha", f"must be in [0, 1], got {self.alpha}")
        _check(self.beta >= 0.0, "loss.beta", f"must be >= 0, got {self.beta}")
        _check(0.0 <= self.margin < 3.14159, "loss.margin", f"must be in [0, π), got {self.margin}")
        _check(self.scale > 0.0, "loss.scale", f"must be > 0, got {self.scale}")
        _check(self.triplet_weight >= 0.0, "loss.triplet_weight", f"must be >= 0, got {self.triplet_weight}")
        _check(self.hem_ref_batch > 0, "loss.hem_ref_batch", f"must be > 0, got {self.hem_ref_batch}")
        _check(0.0 < self.sample_rate <= 1.0, "loss.sample_rate", f"must be in (0, 1], got {self.sample_rate}")


@dataclass
class DataConfig:
    """Where the shards are and how batches are formed (docs/method.md §5.5, §6)."""

    dataset: str = "occluded_duke"
    root: str | None = None  # folder or URL prefix holding index.json and the shards
    roots: list[str] = field(default_factory=list)  # many datasets at once, each its own index.json (docs/data.md)
    root_weights: list[float] = field(default_factory=list)  # per root: share of the P×K chunks; empty: the union's own
    eval_root: str | None = None  # query/gallery from another dataset (Market→Occluded-REID); None: root
    train_urls: list[str] = field(default_factory=list)  # explicit shard URLs; empty: from root/index.json
    query_urls: list[str] = field(default_factory=list)
    gallery_urls: list[str] = field(default_factory=list)
    s3_endpoint: str | None = None  # e.g. http://127.0.0.1:9000 for MinIO; None: AWS default chain
    sampler: str = "exact"  # exact: the official per-epoch PK sampler; stream: resampled shards
    num_ids: int = 16  # P identities per rank-batch (data.global_num_ids, when set, decides it)
    global_num_ids: int = 0  # P identities per global batch, shared over the ranks; 0: data.num_ids per rank
    num_instances: int = 4  # K images per identity
    num_workers: int = 8
    img_size: list[int] = field(default_factory=lambda: [256, 128])
    flip_prob: float = 0.5
    padding: int = 10
    erase_prob: float = 0.5
    color_jitter: bool = False  # on for Market→Occluded-REID (DPM issue #5)
    shuffle_buffer: int = 2000  # stream mode: samples held to form P×K batches
    batches_per_epoch: int = 0  # stream mode: 0 = dataset size / (P·K·world)
    skip_corrupt: bool = False  # count and log corrupt samples instead of raising
    eval_batch_size: int = 256
    verify_sha: bool = True  # check every shard's size and sha256 against index.json when it is read
    cache_dir: str | None = None  # exact mode: local copies of remote shards; None: ~/.cache/dpm-dist/shards
    io_retries: int = 3  # attempts per remote read (index.json, shards), with doubling backoff
    io_backoff_s: float = 0.5  # first wait between attempts
    io_timeout_s: float = 30.0  # per-request timeout for HTTP(S) and S3
    pin_memory: bool = False  # page-locked train/eval batches, so the engine's non_blocking copy overlaps (CUDA)
    persistent_workers: bool = False  # keep the training loader's workers across epochs (same batches); num_workers > 0

    def __post_init__(self) -> None:
        _check_choice(self.dataset, "data.dataset", DATASETS)
        _check_choice(self.sampler, "data.sampler", SAMPLERS)
        _check(self.global_num_ids >= 0, "data.global_num_ids", f"must be >= 0, got {self.global_num_ids}")
        _check(
            self.global_num_ids == 0 or self.global_num_ids >= 2,
            "data.global_num_ids",
            f"P must be >= 2 for triplet negatives, got {self.global_num_ids}",
        )
        _check(
            self.num_ids >= (1 if self.global_num_ids else 2),
            "data.num_ids",
            f"P must be >= 2 for triplet negatives, got {self.num_ids}",
        )
        _check(
            self.num_instances >= 2,
            "data.num_instances",
            f"K must be >= 2 for triplet positives, got {self.num_instances}",
        )
        _check(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        _check_pair(self.img_size, "data.img_size")
        _check(0.0 <= self.flip_prob <= 1.0, "data.flip_prob", f"must be in [0, 1], got {self.flip_prob}")
        _check(0.0 <= self.erase_prob <= 1.0, "data.erase_prob", f"must be in [0, 1], got {self.erase_prob}")
        _check(self.padding >= 0, "data.padding", f"must be >= 0, got {self.padding}")
        _check(
            self.shuffle_buffer >= self.num_ids * self.num_instances,
            "data.shuffle_buffer",
            "must hold at least one P×K batch",
        )
        _check(self.batches_per_epoch >= 0, "data.batches_per_epoch", f"must be >= 0, got {self.batches_per_epoch}")
        _check(self.eval_batch_size > 0, "data.eval_batch_size", f"must be > 0, got {self.eval_batch_size}")
        _check(self.io_retries >= 1, "data.io_retries", f"must be >= 1, got {self.io_retries}")
        _check(self.io_backoff_s >= 0.0, "data.io_backoff_s", f"must be >= 0, got {self.io_backoff_s}")
        _check(self.io_timeout_s > 0.0, "data.io_timeout_s", f"must be > 0, got {self.io_timeout_s}")
        self._check_roots()

    def _check_roots(self) -> None:
        others = [
            f"data.{n}" for n in ("root", "eval_root", "train_urls", "query_urls", "gallery_urls") if getattr(self, n)
        ]
        unset = " ".join(o + ("=[]" if o.endswith("urls") else "=null") for o in others)
        _check(
            not (self.roots and others),
            "data.roots",
            f"cannot be combined with {', '.join(others)} (each root "
            f"brings its own train, query and gallery splits); unset {unset}",
        )
        _check(len(set(self.roots)) == len(self.roots), "data.roots", f"a root is listed twice: {list(self.roots)}")
        _check(
            not self.root_weights or len(self.root_weights) == len(self.roots),
            "data.root_weights",
            f"{len(self.root_weights)} weights for {len(self.roots)} data.roots (one per root, or [] for the union's own)",
        )
        _check(
            all(w > 0 for w in self.root_weights),
            "data.root_weights",
            f"weights must be > 0, got {list(self.root_weights)}",
        )

    @property
    def batch_size(self) -> int:
        return self.num_ids * self.num_instances

    def order_num_ids(self) -> int:
        """P of the global P×K order the exact sampler draws: ``global_num_ids``, else the per-rank ``num_ids``."""
        return self.global_num_ids or self.num_ids

    def for_world_size(self, world_size: int) -> DataConfig:
        """This config with ``num_ids`` the per-rank share of ``global_num_ids`` on ``world_size`` ranks (itself
        when that is unset); raises ``ValueError`` naming the field when the ranks cannot share it equally."""
        if not self.global_num_ids:
            return self
        _check(
            self.global_num_ids % world_size == 0,
            "data.global_num_ids",
            f"{self.global_num_ids} identities per global batch cannot be shared equally by {world_size} ranks; "
            f"use a multiple of {world_size}, or data.global_num_ids=0 and data.num_ids per rank",
        )
        return dataclasses.replace(self, num_ids=self.global_num_ids // world_size)


@dataclass
class OptimConfig:
    """SGD groups and the per-epoch warmup + cosine schedule of the official code (docs/method.md §5.1-5.2)."""

    name: str = "sgd"  # sgd (official) | adamw (not the paper's: for ViTs trained from scratch, e.g. the CPU demo)
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
    fused: bool = False  # torch's fused SGD/AdamW kernel (one launch for all parameters); same update, other rounding

    def __post_init__(self) -> None:
        _check_choice(self.name, "optim.name", ("sgd", "adamw"))
        _check(self.base_lr > 0.0, "optim.base_lr", f"must be > 0, got {self.base_lr}")
        _check(self.bias_lr_factor > 0.0, "optim.bias_lr_factor", f"must be > 0, got {self.bias_lr_factor}")
        _check(0.0 <= self.momentum < 1.0, "optim.momentum", f"must be in [0, 1), got {self.momentum}")
        _check(self.weight_decay >= 0.0, "optim.weight_decay", f"must be >= 0, got {self.weight_decay}")
        _check(self.weight_decay_bias >= 0.0, "optim.weight_decay_bias", f"must be >= 0, got {self.weight_decay_bias}")
        _check(self.epochs >= 1, "optim.epochs", f"must be >= 1, got {self.epochs}")
        _check(self.warmup_epochs >= 0, "optim.warmup_epochs", f"must be >= 0, got {self.warmup_epochs}")
        _check(  # a warmup may fill the run (a quick run of a preset); one that never ends leaves base_lr unused
            self.warmup_epochs <= self.epochs or self.epochs == 1,
            "optim.warmup_epochs",
            f"{self.warmup_epochs} warmup epochs do not fit in optim.epochs={self.epochs}: lower optim.warmup_epochs "
            f"(at most {self.epochs}) or raise optim.epochs",
        )
        _check(self.warmup_lr_factor > 0.0, "optim.warmup_lr_factor", f"must be > 0, got {self.warmup_lr_factor}")
        _check(0.0 <= self.min_lr_factor <= 1.0, "optim.min_lr_factor", f"must be in [0, 1], got {self.min_lr_factor}")
        _check(self.steps_per_epoch >= 0, "optim.steps_per_epoch", f"must be >= 0, got {self.steps_per_epoch}")


@dataclass
class EngineConfig:
    """DeepSpeed wrapping of the two-step DPM update (docs/method.md §5.4, §10)."""

    update_mode: str = "exact"  # exact | reference | approx (docs/method.md §10.2-10.3)
    zero_stage: int = 0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (dynamic loss scaling)
    gradient_clipping: float = 0.0  # explicit: DeepSpeed's own default is 1.0
    fp16_initial_scale_power: int = 16
    hem_global_batch: bool = True  # HEM scale against loss.hem_ref_batch samples in total, not per rank
    gather_triplet: bool = False  # mine triplets over features all-gathered from every rank
    sync_bn: bool = False  # SyncBatchNorm for the BNNeck and the HMG BNs
    # World-size invariance (docs/training.md): sample-keyed random draws, global BatchNorm, the triplet gather and
    # the HEM global batch together. off | on | auto (on when more than one rank runs); true/false read as on/off.
    invariant: str = "off"
    seed: int = 1234
    deterministic: bool = False
    compile: bool = False  # torch.compile the ViT blocks (all but the last: it carries the HEM hook) and the HMG
    compile_backend: str = "inductor"  # any torch.compile backend; aot_eager for quick CPU checks
    collective_timeout_s: float = (
        300.0  # a collective waiting longer on a peer fails the run (lost node; docs/training.md)
    )
    max_nonfinite_steps: int = (
        10  # this many skipped (NaN/Inf loss or gradient) steps in a row stop the run (docs/training.md)
    )

    def __post_init__(self) -> None:
        _check_choice(self.update_mode, "engine.update_mode", UPDATE_MODES)
        _check_choice(self.precision, "engine.precision", PRECISIONS)
        self.invariant = {"true": "on", "false": "off"}.get(str(self.invariant).lower(), str(self.invariant).lower())
        _check_choice(self.invariant, "engine.invariant", INVARIANT_MODES)
        _check(
            self.zero_stage in (0, 1, 2),
            "engine.zero_stage",
            f"supported stages are 0, 1, 2 (got {self.zero_stage}); ZeRO-3 cannot toggle trainable params",
        )
        _check(self.gradient_clipping >= 0.0, "engine.gradient_clipping", f"must be >= 0, got {self.gradient_clipping}")
        _check(
            self.collective_timeout_s > 0.0,
            "engine.collective_timeout_s",
            f"must be > 0, got {self.collective_timeout_s}",
        )
        _check(
            self.max_nonfinite_steps >= 1, "engine.max_nonfinite_steps", f"must be >= 1, got {self.max_nonfinite_steps}"
        )


@dataclass
class EvalConfig:
    """Retrieval protocol (docs/method.md §7) and the distributed evaluator (dpm_dist/eval/evaluator.py)."""

    period: int = 10  # epochs between evaluations; the last epoch always evaluates
    distance: str = "masked_cosine"  # masked_cosine (DPM) | cosine | euclidean
    neck_feat: str = "before"  # test feature: before the BNNeck (official TEST.NECK_FEAT) | after (running stats)
    max_rank: int = 50  # CMC length (shortened to the gallery size when that is smaller)
    query_chunk: int = (
        256  # queries scored at once: memory ~ query_chunk × gallery (share) × 5 bytes; ranks take whole chunks
    )
    shard_gallery: bool = False  # each rank keeps its gallery share (never gathered); same metrics (docs/evaluation.md)
    rerank: bool = False  # k-reciprocal re-ranking on plain Euclidean distances (not used for the paper's numbers)
    rerank_k1: int = 20
    rerank_k2: int = 6
    rerank_lambda: float = 0.3
    rerank_method: str = "dense"  # dense: (Q+G)² matrices | sparse: k-NN lists distributed by rows, same values
    num_pictures: int = 4  # ranked-list pictures written by dpm-eval
    picture_topk: int = 10  # gallery items shown after each query
    topk: int = 0  # > 0: dpm-eval writes each query's top-k gallery keys and distances (dpm_dist/eval/topk.py)
    topk_format: str = "parquet"  # parquet (pyarrow) | jsonl: <output_dir>/topk.<format>

    def __post_init__(self) -> None:
        _check_choice(self.distance, "eval.distance", DISTANCES)
        _check_choice(self.neck_feat, "eval.neck_feat", ("before", "after"))
        _check(self.period >= 1, "eval.period", f"must be >= 1, got {self.period}")
        _check(self.max_rank >= 1, "eval.max_rank", f"must be >= 1, got {self.max_rank}")
        _check(self.query_chunk >= 1, "eval.query_chunk", f"must be >= 1, got {self.query_chunk}")
        _check(self.rerank_k1 >= 1 and self.rerank_k2 >= 1, "eval.rerank_k1", "k1 and k2 must be >= 1")
        _check(0.0 <= self.rerank_lambda <= 1.0, "eval.rerank_lambda", f"must be in [0, 1], got {self.rerank_lambda}")
        _check(self.num_pictures >= 0, "eval.num_pictures", f"must be >= 0, got {self.num_pictures}")
        _check(self.picture_topk >= 1, "eval.picture_topk", f"must be >= 1, got {self.picture_topk}")
        _check(self.topk >= 0, "eval.topk", f"must be >= 0, got {self.topk}")
        _check_choice(self.rerank_method, "eval.rerank_method", ("dense", "sparse"))
        _check_choice(self.topk_format, "eval.topk_format", ("parquet", "jsonl"))
        _check(
            not (self.rerank and self.shard_gallery and self.rerank_method == "dense"),
            "eval.rerank_method",
            "dense needs the gathered gallery; with eval.shard_gallery=true use eval.rerank_method=sparse",
        )


SPACE_TYPES = {  # search-space entry type -> the keys it needs
    "uniform": ("low", "high"),
    "loguniform": ("low", "high"),
    "quniform": ("low", "high", "q"),
    "randint": ("low", "high"),
    "choice": ("values",),
    "grid": ("values",),
}


SCALAR_TYPES = ("float", "int", "str", "bool", "Optional[float]", "Optional[int]", "Optional[str]")


def _scalar_field_type(key: str) -> str | None:
    """The type (as written) of the scalar :class:`DPMConfig` field named by dotted ``key``, or None."""
    import dataclasses

    sections = {
        cls.__name__: cls
        for cls in (ModelConfig, LossConfig, DataConfig, OptimConfig, EngineConfig, EvalConfig, LogConfig, SearchConfig)
    }
    node: Any = DPMConfig
    *path, leaf = key.split(".")
    for part in path:  # field types are strings here (``from __future__ import annotations``)
        types = {f.name: f.type for f in dataclasses.fields(node)}
        if types.get(part) not in sections:
            return None
        node = sections[types[part]]
    kind = {f.name: f.type for f in dataclasses.fields(node)}.get(leaf)
    return kind if kind in SCALAR_TYPES else None


def check_space_entry(key: str, entry: Any, searcher: str) -> None:
    """Raise ``ValueError`` naming ``search.space.<key>`` when the entry is malformed."""
    name = f"search.space.{key}"
    field_type = _scalar_field_type(key)
    _check(
        key.split(".")[0] not in ("search", "log") and field_type is not None,
        name,
        "not a searchable config field (expected a dotted key such as loss.alpha, loss.beta, loss.margin, "
        "loss.scale or optim.base_lr)",
    )
    _check(isinstance(entry, dict) and "type" in entry, name, f"expected {{type: ..., ...}}, got {entry!r}")
    kind = entry["type"]
    _check(kind in SPACE_TYPES, name, f"unknown type {kind!r}; expected one of {', '.join(SPACE_TYPES)}")
    needed = SPACE_TYPES[kind]
    extra = sorted(set(entry) - set(needed) - {"type"})
    _check(not extra, name, f"unexpected keys {extra} for type {kind} (it takes {', '.join(needed)})")
    missing = [k for k in needed if k not in entry]
    _check(not missing, name, f"type {kind} needs {', '.join(missing)}")
    if "values" in needed:
        values = entry["values"]
        _check(
            isinstance(values, (list, tuple)) and len(values) > 0,
            name,
            f"values must be a non-empty list, got {values!r}",
        )
    else:
        low, high = entry["low"], entry["high"]
        _check(
            all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)),
            name,
            f"low and high must be numbers, got {low!r}, {high!r}",
        )
        _check(low < high, name, f"low ({low}) must be < high ({high})")
        if kind == "loguniform":
            _check(low > 0, name, f"loguniform needs low > 0, got {low}")
        if kind == "randint":
            _check(
                isinstance(low, int) and isinstance(high, int),
                name,
                "randint needs integer low and high (high excluded)",
            )
        if kind == "quniform":
            _check(entry["q"] > 0, name, f"q must be > 0, got {entry['q']}")
        _check(
            kind == "randint" or "float" in field_type,
            name,
            f"type {kind} samples floats but the field is {field_type} (use randint or choice)",
        )
        _check(
            "int" in field_type or "float" in field_type,
            name,
            f"type {kind} samples numbers but the field is {field_type}",
        )
    _check(
        not (kind == "grid" and searcher == "optuna"),
        name,
        "type grid cannot be used with search.searcher=optuna (use choice, or searcher=random/grid)",
    )
    _check(
        kind == "grid" or searcher != "grid",
        name,
        f"search.searcher=grid needs every entry to be type grid, got {kind}",
    )


@dataclass
class SearchConfig:
    """Ray Tune search over α, β, m, s, lr (``dpm-tune``; ``dpm-train`` reads only ``metric``, for its best checkpoint).

    ``space`` maps a dotted config key to ``{type: uniform|loguniform|quniform|randint|choice|grid, ...}``:
    ``low``/``high`` (``q`` for quniform; randint excludes high) or ``values``.
    """

    metric: str = "mAP"  # evaluation metric reported to Tune: mAP | rank1 | mINP
    mode: str = "max"
    searcher: str = "optuna"  # optuna (TPE) | random (grid entries expanded, others sampled) | grid
    scheduler: str = "asha"  # asha | fifo
    num_samples: int = 8  # trials (random/optuna); repetitions of the whole grid (grid)
    seed: int | None = None  # searcher seed
    max_t: int = 0  # ASHA horizon in epochs; 0: optim.epochs
    grace_period: int = 1  # ASHA: epochs before a trial can be stopped
    reduction_factor: int = 2
    workers_per_trial: int = 1  # Ray Train (DeepSpeed) workers per trial
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    driver_cpus: float = 1.0  # CPUs held by each trial's Tune function (the Ray Train driver)
    max_concurrent_trials: int = 0  # 0: as many as the cluster's CPUs/GPUs hold
    max_failures: int = 1  # worker-group restarts per trial, each from the trial's last checkpoint
    worker_start_timeout_s: float = 60.0  # a trial's worker group must get its resources within this (Ray Train)
    worker_start_retries: int = 3  # new attempts after a timed-out worker-group start; -1: unbounded (autoscaling)
    storage_path: str | None = None  # local folder, NFS, or s3://bucket/prefix; None: runs/tune
    s3_endpoint: str | None = None  # e.g. http://127.0.0.1:9000 for MinIO; None: AWS default chain
    name: str = "dpm_search"  # experiment folder under storage_path; re-running resumes it
    results_dir: str | None = None  # local folder for results.csv and best/; None: <storage>/<name> if local
    local_dir: str | None = None  # node-local scratch for the workers' run folders; None: system temp
    ray_address: str | None = None  # None: $RAY_ADDRESS, else a new local Ray instance
    num_cpus: int = 0  # CPUs of a new local Ray instance; 0: all of this machine
    space: dict[str, Any] = field(default_factory=dict)  # dotted key -> {type: uniform, low:, high:}

    def __post_init__(self) -> None:
        _check(
            self.metric in ("mAP", "rank1", "mINP"),
            "search.metric",
            f"unknown metric {self.metric!r}; expected mAP, rank1 or mINP",
        )
        _check_choice(self.mode, "search.mode", ("max", "min"))
        _check_choice(self.searcher, "search.searcher", ("optuna", "random", "grid"))
        _check_choice(self.scheduler, "search.scheduler", ("asha", "fifo"))
        _check(self.num_samples >= 1, "search.num_samples", f"must be >= 1, got {self.num_samples}")
        _check(self.max_t >= 0, "search.max_t", f"must be >= 0, got {self.max_t}")
        _check(self.grace_period >= 1, "search.grace_period", f"must be >= 1, got {self.grace_period}")
        _check(self.reduction_factor >= 2, "search.reduction_factor", f"must be >= 2, got {self.reduction_factor}")
        _check(self.workers_per_trial >= 1, "search.workers_per_trial", f"must be >= 1, got {self.workers_per_trial}")
        _check(
            self.cpus_per_worker >= 0 and self.gpus_per_worker >= 0 and self.driver_cpus >= 0,
            "search.cpus_per_worker",
            "cpus_per_worker, gpus_per_worker and driver_cpus must be >= 0",
        )
        _check(
            self.max_concurrent_trials >= 0,
            "search.max_concurrent_trials",
            f"must be >= 0, got {self.max_concurrent_trials}",
        )
        _check(self.max_failures >= 0, "search.max_failures", f"must be >= 0, got {self.max_failures}")
        _check(
            self.worker_start_timeout_s > 0,
            "search.worker_start_timeout_s",
            f"must be > 0, got {self.worker_start_timeout_s}",
        )
        _check(
            self.worker_start_retries >= -1,
            "search.worker_start_retries",
            f"must be >= -1, got {self.worker_start_retries}",
        )
        _check(self.num_cpus >= 0, "search.num_cpus", f"must be >= 0, got {self.num_cpus}")
        _check(
            bool(self.name) and "/" not in self.name,
            "search.name",
            f"must be a non-empty folder name, got {self.name!r}",
        )
        for key, entry in self.space.items():
            check_space_entry(key, entry, self.searcher)


@dataclass
class LogConfig:
    output_dir: str = "runs/default"  # run folder: checkpoints, tb/, config.yaml, results.json
    log_every: int = 10  # iterations between logged scalars
    tensorboard: bool = True
    progress: bool = True
    checkpoint_every: int = 1  # epochs between checkpoints
    checkpoint_every_steps: int = 0  # steps between step checkpoints inside an epoch (0: none; docs/training.md)
    keep_last: int = 2
    keep_last_steps: int = 2  # step checkpoints kept (the newest, none older than the newest epoch checkpoint)
    keep_best: bool = True
    level: str = "warning"  # what libraries may print: warning (default: known noise hidden) | info | debug (all of it)
    allow_config_change: list[str] = field(
        default_factory=list
    )  # resume: fields allowed to differ from the checkpoint's

    def __post_init__(self) -> None:
        _check_choice(self.level, "log.level", LOG_LEVELS)
        _check(self.log_every >= 1, "log.log_every", f"must be >= 1, got {self.log_every}")
        _check(self.checkpoint_every >= 1, "log.checkpoint_every", f"must be >= 1, got {self.checkpoint_every}")
        _check(self.keep_last >= 1, "log.keep_last", f"must be >= 1, got {self.keep_last}")
        _check(
            self.checkpoint_every_steps >= 0,
            "log.checkpoint_every_steps",
            f"must be >= 0 (0: no step checkpoints), got {self.checkpoint_every_steps}",
        )
        _check(self.keep_last_steps >= 1, "log.keep_last_steps", f"must be >= 1, got {self.keep_last_steps}")


@dataclass
class DPMConfig:
    """Root of the configuration tree composed by Hydra."""

    name: str = "dpm"
    paper_row: str = ""  # the paper's table row this run reproduces, e.g. table3/baseline (dpm-report; docs/paper.md)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    search: SearchConfig = field(default_factory=SearchConfig)

    def __post_init__(self) -> None:
        if self.paper_row:
            from dpm_dist.report import PAPER_ROWS

            _check(
                self.paper_row in PAPER_ROWS,
                "paper_row",
                f"unknown row {self.paper_row!r}; expected one of {', '.join(PAPER_ROWS)}",
            )
        _check(
            list(self.model.img_size) == list(self.data.img_size),
            "data.img_size",
            f"{list(self.data.img_size)} differs from model.img_size {list(self.model.img_size)}",
        )
        sharded = self.model.classifier == "sharded"
        _check(
            sharded or self.loss.sample_rate == 1.0,
            "loss.sample_rate",
            f"{self.loss.sample_rate} samples the classes of a sharded head (Partial FC); set model.classifier=sharded "
            "(it also runs on one rank) or loss.sample_rate=1.0",
        )
        _check(
            not (sharded and self.engine.precision == "fp16"),
            "engine.precision",
            "fp16's loss scaling does not cover the sharded head's optimiser; use bf16 or fp32 with model.classifier=sharded",
        )
        _check(
            not (sharded and self.engine.gradient_clipping > 0),
            "engine.gradient_clipping",
            "the global norm would leave out the sharded prototypes; use 0 with model.classifier=sharded",
        )
        for name in ("plain_branch", "masked_branch", "mask_placement"):
            value, paper = getattr(self.loss, name), getattr(LossConfig, name)
            _check(
                not (sharded and value != paper),
                f"loss.{name}",
                f"{value!r} is an ablation of the replicated head only; use model.classifier=replicated",
            )


def for_world_size(cfg: DPMConfig, world_size: int) -> DPMConfig:
    """``cfg`` as it runs on ``world_size`` ranks: ``data.num_ids`` the per-rank share of ``data.global_num_ids``;
    ``engine.invariant`` decided (``auto``: on with more than one rank); on, it turns on the triplet gather and the
    HEM global batch (docs/training.md, "World-size invariance"). The same on every call (idempotent); the config a
    run records (checkpoints, config.yaml) is the one given, not this. Raises ``ValueError`` naming the field."""
    data, e = cfg.data.for_world_size(world_size), cfg.engine
    invariant = e.invariant == "on" or (e.invariant == "auto" and world_size > 1)
    engine = dataclasses.replace(
        e,
        invariant="on" if invariant else "off",
        gather_triplet=e.gather_triplet or invariant,
        hem_global_batch=e.hem_global_batch or invariant,
    )
    _check(
        data.num_ids >= 2 or engine.gather_triplet,
        "data.global_num_ids",
        f"{data.global_num_ids} identities over {world_size} ranks leave {data.num_ids} per rank: the triplet mining "
        "needs engine.gather_triplet=true (or engine.invariant=on) to find negatives on other ranks",
    )
    return dataclasses.replace(cfg, data=data, engine=engine)


def register_configs() -> None:
    """Register the schema with Hydra's ConfigStore (as ``dpm_schema``). Imports hydra lazily."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="dpm_schema", node=DPMConfig)


def _section_types(schema: type) -> dict[str, type]:
    """The fields of dataclass ``schema`` whose type is itself a dataclass (the config sections)."""
    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema) if dataclasses.is_dataclass(hints[f.name])}


def schema_fields(schema: type | None = None, prefix: str = "") -> list[str]:
    """Every dotted field name of the schema (``DPMConfig`` by default), sections and leaves."""
    schema = schema or DPMConfig
    sections = _section_types(schema)
    out = []
    for f in dataclasses.fields(schema):
        out.append(prefix + f.name)
        if f.name in sections:
            out += schema_fields(sections[f.name], f"{prefix}{f.name}.")
    return out


def unknown_fields(tree: Any, schema: type | None = None, prefix: str = "") -> list[str]:
    """Dotted keys of the mapping ``tree`` that are not fields of the schema (``+key=...`` typos, stray YAML keys)."""
    schema = schema or DPMConfig
    names, sections = {f.name for f in dataclasses.fields(schema)}, _section_types(schema)
    out = []
    for key, value in tree.items():
        if key not in names:
            out.append(f"{prefix}{key}")
        elif key in sections and isinstance(value, dict):
            out += unknown_fields(value, sections[key], f"{prefix}{key}.")
    return out


def did_you_mean(key: str) -> str:
    """`` (did you mean `x.y`?)`` for the schema field nearest to ``key``, or an empty string."""
    close = difflib.get_close_matches(key, schema_fields(), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def refuse_unknown_fields(tree: Any) -> None:
    """ValueError naming each key of ``tree`` that is not a config field, with the nearest valid field."""
    unknown = unknown_fields(tree)
    if unknown:
        named = "; ".join(f"`{key}`{did_you_mean(key)}" for key in unknown)
        raise ValueError(f"unknown config field {named}: not a field of the typed config (`--cfg job` lists them)")


def to_config(cfg: Any) -> DPMConfig:
    """Validated :class:`DPMConfig` from a composed DictConfig, a plain dict, or a DPMConfig.

    A key that is not a field of the schema (e.g. ``+optim.base_lrr=0.1``) is refused, never silently dropped."""
    from omegaconf import OmegaConf

    if isinstance(cfg, DPMConfig):
        cfg = OmegaConf.structured(cfg)
    tree = OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else cfg
    refuse_unknown_fields({k: v for k, v in tree.items() if k != "hydra"})
    merged = OmegaConf.merge(OmegaConf.structured(DPMConfig), cfg)
    return OmegaConf.to_object(merged)  # type: ignore[return-value]
