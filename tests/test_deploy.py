"""dpm_dist.load_model and the exported files: what they read, what they hold, and parity with eager PyTorch.

Parity: the tiny model exported to ONNX (run by onnxruntime, CPU) and to TorchScript gives the eager model's
feat, feat_bn and mask at batch 1 and 7 (the files were traced at batch 2) to 1e-4 relative.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from dpm_dist.config import DataConfig, DPMConfig, ModelConfig
from tests.conftest import official_file

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = ModelConfig(
    embed_dim=64, depth=4, num_heads=4, patch_size=8, img_size=[64, 32], stride=[6, 6], tap_blocks=[1, 2, 3, 4]
)
TOLERANCE = 1e-4


# Two training datasets as dpm-train data.roots=[...] records them: b is the tiny synthetic shards' (8 ids, 3 cameras).
TWO_DATASETS = [
    {
        "name": "a",
        "root": "/data/a",
        "dataset": "synthetic",
        "id_offset": 0,
        "cam_offset": 0,
        "num_train_ids": 5,
        "num_cams": 2,
        "num_images": 20,
        "weight": 0.3,
    },
    {
        "name": "b",
        "root": "/data/b",
        "dataset": "synthetic",
        "id_offset": 5,
        "cam_offset": 2,
        "num_train_ids": 8,
        "num_cams": 3,
        "num_images": 48,
        "weight": 0.7,
    },
]


def save_tiny_model(
    path: Path,
    *,
    model: ModelConfig = TINY_MODEL,
    num_cams: int = 3,
    neck_feat: str = "before",
    datasets: list | None = None,
) -> Path:
    """A tiny DPM with a non-trivial mask, written as training writes model files (weights + resolved config);
    ``datasets``: the ``meta["datasets"]`` record (none: a file from before it existed)."""
    from dpm_dist.model.dpm import build_model
    from dpm_dist.model.files import save_model_file

    torch.manual_seed(0)
    net = build_model(model, num_classes=8, num_cams=num_cams)
    torch.nn.init.normal_(net.mask_gen.fc.weight, std=0.5)  # zero-initialised: every mask would be 0.5
    cfg = DPMConfig(model=model, data=DataConfig(img_size=list(model.img_size)))
    config = dataclasses.asdict(cfg)
    config["eval"]["neck_feat"] = neck_feat
    save_model_file(
        net, str(path), {"epoch": 3, "config": config, **({"datasets": datasets} if datasets is not None else {})}
    )
    return path


def save_two_dataset_model(path: Path) -> Path:
    """A tiny model trained on :data:`TWO_DATASETS`: SIE over their 2 + 3 cameras."""
    return save_tiny_model(path, num_cams=5, datasets=TWO_DATASETS)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model") / "model.pt")


def _inputs(batch: int, seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, 64, 32, generator=gen) * 2 - 1, torch.randint(0, 3, (batch,), generator=gen)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.slow
def test_load_model_reads_model_files_run_folders_and_official_checkpoints(tiny_file, tmp_path):
    import dpm_dist

    loaded = dpm_dist.load_model(tiny_file)
    assert not loaded.model.training
    meta = loaded.meta
    assert meta["img_size"] == [64, 32] and meta["num_cams"] == 3 and meta["sie"] and meta["embed_dim"] == 64
    assert meta["mean"] == meta["std"] == [0.5, 0.5, 0.5] and meta["test_feature"] == "feat"
    assert meta["format"] == "dpm-dist" and meta["config"]["model"]["depth"] == 4 and meta["epoch"] == 3
    assert meta["datasets"] == [] and not loaded.needs_dataset  # a file from before data.roots records none
    images, camids = _inputs(3)
    ref = loaded.embed(images, camids)
    assert ref.feat.shape == ref.feat_bn.shape == ref.mask.shape == (3, 64)

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_file, run / "model_final.pt")
    from_run = dpm_dist.load_model(run)
    official = dpm_dist.load_model(official_file(tiny_file, tmp_path / "transformer_3.pth"), model=TINY_MODEL)
    assert official.meta["format"] == "official" and official.meta["config"] is None
    for other in (from_run, official):
        out = other.embed(images, camids)
        assert torch.equal(out.feat, ref.feat) and torch.equal(out.mask, ref.mask)
    with pytest.raises(ValueError, match="camids are required"):
        loaded.embed(images)
    with pytest.raises(ValueError, match="in the file but .* in the model"):  # official: ViT-B unless told otherwise
        dpm_dist.load_model(tmp_path / "transformer_3.pth")


def test_embed_takes_paths_and_pil_images_and_distance_is_the_evaluators(tiny_file, tmp_path):
    import dpm_dist
    from dpm_dist.eval.retrieval import arccos_distance, masked_cosine_similarity

    loaded = dpm_dist.load_model(tiny_file)
    gen = torch.Generator().manual_seed(1)
    paths = []
    for i in range(3):
        Image.fromarray((torch.rand(40, 20, 3, generator=gen) * 255).byte().numpy()).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    by_path = loaded.embed(paths, camids=[0, 1, 2])
    by_image = loaded.embed([Image.open(p) for p in paths], camids=[0, 1, 2])
    assert torch.equal(by_path.feat, by_image.feat)
    dist = loaded.distance(by_path, by_path)
    assert dist.shape == (3, 3)
    torch.testing.assert_close(
        dist, arccos_distance(masked_cosine_similarity(by_path.feat, by_path.mask, by_path.feat))
    )


@pytest.mark.slow
def test_the_documented_python_example_runs_as_written(tiny_file, tmp_path):
    """The README's "Using a trained model" example (the ```python block, also in docs/deployment.md), unchanged."""
    example, copy = (
        re.search(r"```python\n(.*?)```", (REPO / name).read_text(), re.S).group(1)
        for name in ("README.md", "docs/deployment.md")
    )
    assert example == copy
    assert len(example.strip().splitlines()) <= 5
    (tmp_path / "runs" / "tiny_synthetic").mkdir(parents=True)
    shutil.copy(tiny_file, tmp_path / "runs" / "tiny_synthetic" / "model_final.pt")
    for name, colour in (("a.jpg", (200, 30, 30)), ("b.jpg", (30, 30, 200))):
        Image.new("RGB", (32, 64), colour).save(tmp_path / name)
    proc = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert 0.0 < float(proc.stdout.strip()) < 3.1416


@pytest.mark.parametrize("suffix", [".onnx", ".pt"])
@pytest.mark.slow
def test_exported_model_matches_eager_pytorch_at_batch_1_and_7(tiny_file, tmp_path, suffix):
    import dpm_dist
    from dpm_dist.deploy import export

    loaded = dpm_dist.load_model(tiny_file)
    dst = str(tmp_path / f"model{suffix}")
    meta = export.export_model(loaded, dst)
    if suffix == ".onnx":
        session = export.onnx_session(dst)
        stored = export.read_onnx_metadata(dst)
        assert stored["exporter"] == meta["exporter"] == "dynamo" and stored["opset"] == 18
        assert [i.name for i in session.get_inputs()] == ["images", "camids"]
        run = lambda x, c: export.run_onnx(session, x, c)
    else:
        module, stored = export.read_torchscript(dst)
        run = module
    assert stored["img_size"] == [64, 32] and stored["num_cams"] == 3 and stored["test_feature"] == "feat"
    assert stored["mean"] == [0.5] * 3 and stored["outputs"] == ["feat", "feat_bn", "mask"] and stored["datasets"] == []
    for batch in (1, 7):
        images, camids = _inputs(batch)
        ref = loaded.embed(images, camids)
        with torch.no_grad():
            got = run(images, camids)
        for name, value in zip(("feat", "feat_bn", "mask"), got):
            assert value.shape == (batch, 64)
            assert _rel(value, getattr(ref, name)) < TOLERANCE, (suffix, batch, name)


def test_a_two_dataset_model_embeds_a_datasets_cameras_with_its_offset(tmp_path):
    import dpm_dist
    from dpm_dist.deploy import export

    loaded = dpm_dist.load_model(save_two_dataset_model(tmp_path / "two.pt"))
    assert loaded.meta["datasets"] == loaded.datasets == TWO_DATASETS and loaded.num_cams == 5 and loaded.needs_dataset
    assert [loaded.camera("a", 1), loaded.camera("b", 0), loaded.camera("b", 2)] == [1, 2, 4]
    with pytest.raises(ValueError, match=r"camid 3: outside dataset b's cameras 0\.\.2"):
        loaded.camera("b", 3)
    with pytest.raises(ValueError, match=r"dataset 'c': not a dataset the model was trained on \(one of a\|b\)"):
        loaded.camera("c", 0)
    images, camids = _inputs(4)
    with pytest.raises(ValueError, match=r"dataset is required: .* 2 datasets .* one of a\|b"):
        loaded.embed(images, camids)
    got = loaded.embed(images, camids, dataset="b")
    with torch.no_grad():
        ref, unshifted = loaded.model(images, camids + 2), loaded.model(images, camids)
    assert torch.equal(got.feat, ref.feat) and torch.equal(got.mask, ref.mask)
    assert not torch.allclose(got.feat, unshifted.feat, atol=1e-3)
    export.export_torchscript(loaded, str(tmp_path / "two_ts.pt"))
    _, stored = export.read_torchscript(str(tmp_path / "two_ts.pt"))
    assert stored["datasets"] == TWO_DATASETS  # a serving system shifts cameras with these


def test_an_unknown_suffix_is_refused_before_anything_is_written(tmp_path):
    from dpm_dist.deploy.export import format_of

    with pytest.raises(ValueError, match=r"\.onnx \(ONNX\) or \.pt \(TorchScript\)"):
        format_of(str(tmp_path / "model.engine"))


@pytest.mark.slow
def test_vit_b_exports_to_onnx_within_tolerance(tmp_path):
    """The paper's ViT-B at 256x128 (random init: no weights offline), batch 2, onnxruntime vs eager."""
    import dpm_dist
    from dpm_dist.deploy import export

    path = save_tiny_model(tmp_path / "vit_b.pt", model=ModelConfig(), num_cams=2)
    loaded = dpm_dist.load_model(path)
    dst = str(tmp_path / "vit_b.onnx")
    meta = export.export_model(loaded, dst)
    assert meta["img_size"] == [256, 128] and meta["embed_dim"] == 768
    errors = export.parity(loaded, dst, batch=2)
    assert max(errors.values()) < TOLERANCE, errors
