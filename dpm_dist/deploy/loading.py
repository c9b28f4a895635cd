"""``dpm_dist.load_model``: a DPM model file, run folder or official checkpoint ready for inference.

Finding, reading and building the model is :mod:`dpm_dist.model.files` (``resolve_model_path``,
``ModelFile.read``, ``load_model_file``: strict loading, errors naming the key), exactly as ``dpm-eval``
does; this module adds what inference needs: the test transform at the recorded input size, the metadata
an exported file or an embedding file carries, and the masked distance of the evaluator.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from dpm_dist.config import ModelConfig
from dpm_dist.data.shards import file_sha256
from dpm_dist.data.transforms import eval_transform
from dpm_dist.eval.retrieval import arccos_distance, cosine_similarity, masked_cosine_similarity
from dpm_dist.model.files import ModelFile, load_model_file, resolve_model_path

PIXEL_MEAN = (0.5, 0.5, 0.5)  # dpm_dist.data.transforms.to_normalised (the official PIXEL_MEAN/STD)
PIXEL_STD = (0.5, 0.5, 0.5)
ImageInput = str | os.PathLike | Image.Image | torch.Tensor


@dataclasses.dataclass(frozen=True)
class TestTransform:
    """PIL image (any mode) -> normalised (3, H, W) tensor: the evaluator's bilinear resize at the model's size."""

    size: tuple[int, int]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return eval_transform(image.convert("RGB"), size=self.size)


@dataclasses.dataclass
class Embedding:
    """Test-time outputs of a batch: rows line up with the input images."""

    feat: torch.Tensor  # (B, D) before the BNNeck
    feat_bn: torch.Tensor  # (B, D) after the BNNeck
    mask: torch.Tensor  # (B, D) HMG mask in (0, 1)

    def test_feature(self, neck_feat: str) -> torch.Tensor:
        return self.feat_bn if neck_feat == "after" else self.feat


@dataclasses.dataclass
class LoadedModel:
    """A DPM model in eval mode with its test transform and facts. ``meta`` is JSON-serialisable."""

    model: torch.nn.Module
    transform: TestTransform
    meta: dict[str, Any]
    device: torch.device

    @property
    def num_cams(self) -> int:
        return int(self.meta["num_cams"])

    @property
    def datasets(self) -> list[dict[str, Any]]:
        """The datasets the model was trained on (``meta["datasets"]``; [] for files that record none)."""
        return self.meta["datasets"]

    @property
    def needs_dataset(self) -> bool:
        """Trained on several datasets with an SIE camera embedding: a camera id means nothing without its dataset."""
        return bool(self.meta["sie"]) and len(self.datasets) > 1

    def dataset_names(self) -> str:
        """The recorded names as ``a|b|c`` (for messages)."""
        return "|".join(d["name"] for d in self.datasets)

    def dataset(self, name: str) -> dict[str, Any]:
        """The ``meta["datasets"]`` entry called ``name``; ValueError listing the recorded names."""
        found = next((d for d in self.datasets if d["name"] == name), None)
        if found is None:
            known = f"one of {self.dataset_names()}" if self.datasets else "none: the model file records no datasets"
            raise ValueError(f"dataset {name!r}: not a dataset the model was trained on ({known})")
        return found

    def camera(self, dataset: str, camid: int) -> int:
        """The model's camera id of ``dataset``'s own 0-based camera ``camid``: ``camid + cam_offset``."""
        entry = self.dataset(dataset)
        if not 0 <= int(camid) < int(entry["num_cams"]):
            raise ValueError(f"camid {camid}: outside dataset {dataset}'s cameras 0..{int(entry['num_cams']) - 1}")
        return int(camid) + int(entry["cam_offset"])

    @torch.no_grad()
    def embed(
        self,
        images: Sequence[ImageInput] | torch.Tensor,
        camids: Sequence[int] | None = None,
        *,
        dataset: str | None = None,
    ) -> Embedding:
        """Embed images (file paths, PIL images, transformed (3, H, W) tensors, or one (B, 3, H, W) batch).

        ``camids`` (0-based camera ids, one per image) are required when the model has an SIE camera
        embedding (``meta["num_cams"] > 1``) and ignored otherwise. A model trained on several datasets
        with SIE needs ``dataset`` (a name of ``meta["datasets"]``): ``camids`` are then that dataset's own
        and are shifted by its ``cam_offset`` (:meth:`camera`).
        """
        batch = images if isinstance(images, torch.Tensor) else torch.stack([self._tensor(x) for x in images])
        if camids is None and self.meta["sie"]:
            raise ValueError(
                f"camids are required: the model has an SIE camera embedding over {self.num_cams} cameras "
                f"(pass camids=[...], 0-based, one per image)"
            )
        if dataset is None and self.needs_dataset:
            raise ValueError(
                f"dataset is required: the model was trained on {len(self.datasets)} datasets with an SIE "
                f"camera embedding (cameras shifted per dataset); pass dataset=NAME, one of {self.dataset_names()}"
            )
        cams = list(camids) if camids is not None else [0] * len(batch)
        if dataset is not None:
            self.dataset(dataset)  # a wrong name is an error with or without camids
            cams = [self.camera(dataset, c) for c in cams] if camids is not None else cams
        cams = torch.as_tensor(cams, dtype=torch.long)
        if cams.numel() != len(batch):
            raise ValueError(f"{cams.numel()} camera ids for {len(batch)} images")
        out = self.model(batch.to(self.device, torch.float32), cams.to(self.device))
        return Embedding(out.feat.float().cpu(), out.feat_bn.float().cpu(), out.mask.float().cpu())

    def _tensor(self, image: ImageInput) -> torch.Tensor:
        if isinstance(image, torch.Tensor):
            return image
        if isinstance(image, Image.Image):
            return self.transform(image)
        with Image.open(image) as img:
            return self.transform(img)

    def distance(self, query: Embedding, gallery: Embedding, *, metric: str = "masked_cosine") -> torch.Tensor:
        """(Q, G) DPM distances ``arccos(clip(cos))`` of the model's test feature; the query's mask only.

        ``metric="cosine"`` is the plain cosine distance. The masked one is asymmetric: ``query`` masks.
        """
        neck = self.meta["neck_feat"]
        q, g = query.test_feature(neck), gallery.test_feature(neck)
        if metric == "masked_cosine":
            return arccos_distance(masked_cosine_similarity(q, query.mask, g))
        if metric == "cosine":
            return arccos_distance(cosine_similarity(q, g))
        raise ValueError(f"unknown metric {metric!r}; expected masked_cosine or cosine")


def load_model(
    path: str | os.PathLike, device: str | torch.device = "cpu", *, model: ModelConfig | None = None
) -> LoadedModel:
    """Load a DPM model for inference: our model file, a run folder, or an official DPM checkpoint.

    The architecture is the one the file records (our files carry their training config, the converter's
    files their facts); an official ``.pth`` records none, so ``model`` (default: the paper's ViT-B at
    256×128, stride 11) describes it. Class and camera counts always come from the weights.

    Example::

        import dpm_dist
        m = dpm_dist.load_model("runs/tiny_synthetic")
        e = m.embed(["a.jpg", "b.jpg"], camids=[0, 1])
        print(m.distance(e, e))
    """
    file_path, _ = resolve_model_path(path)
    file = ModelFile.read(file_path)
    net, model_cfg, _ = load_model_file(file, model or ModelConfig())
    target = torch.device(device)
    net.to(target).eval()
    return LoadedModel(
        model=net,
        transform=TestTransform(tuple(int(s) for s in model_cfg.img_size)),
        meta=describe(file, net, model_cfg),
        device=target,
    )


def describe(file: ModelFile, net: torch.nn.Module, model_cfg: ModelConfig) -> dict[str, Any]:
    """The facts exported files and embedding files record (JSON-serialisable)."""
    saved_eval = file.config.get("eval") or {}
    neck = saved_eval.get("neck_feat", "before")
    backbone = net.backbone
    return {
        "source": file.path,
        "source_sha256": file_sha256(file.path),
        "format": "dpm-dist" if file.config else ("converted" if file.meta else "official"),
        "img_size": [int(s) for s in model_cfg.img_size],
        "mean": list(PIXEL_MEAN),
        "std": list(PIXEL_STD),
        "num_cams": int(backbone.num_cams),
        "sie": backbone.sie_embed is not None,
        "num_classes": int(net.classifier.weight.shape[0]),
        "embed_dim": int(backbone.embed_dim),
        "neck_feat": neck,
        "test_feature": "feat_bn" if neck == "after" else "feat",
        "distance": saved_eval.get("distance", "masked_cosine"),
        "model": dataclasses.asdict(model_cfg),
        "epoch": file.meta.get("epoch"),
        "datasets": list(file.meta.get("datasets") or []),  # training's data.roots: names and camera offsets
        "config": file.config or None,
    }
