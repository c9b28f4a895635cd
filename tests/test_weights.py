"""Local weight files: ImageNet ViT loading with the faithful pos-embed resize, official DPM key map."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dpm_dist.cli import convert as convert_cli
from dpm_dist.model import convert
from dpm_dist.model.dpm import create_model
from dpm_dist.model.weights import load_dpm_checkpoint, load_imagenet_vit, official_key, resize_pos_embed

TINY = dict(embed_dim=32, depth=4, num_heads=4, tap_blocks=(1, 2, 3, 4), drop_path=0.0)


def test_pos_embed_resize_matches_direct_bilinear_interpolation():
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 14 * 14, 16)
    out = resize_pos_embed(pos, (22, 11))
    assert out.shape == (1, 1 + 22 * 11, 16)
    assert torch.equal(out[:, 0], pos[:, 0])  # class-token slot kept as is
    grid = pos[:, 1:].reshape(1, 14, 14, 16).permute(0, 3, 1, 2)
    direct = F.interpolate(grid, size=(22, 11), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out[:, 1:], direct.permute(0, 2, 3, 1).reshape(1, 242, 16), rtol=0, atol=0)
    # timm's default (bicubic + antialias) is a different function: make sure we are not using it
    bicubic = F.interpolate(grid, size=(22, 11), mode="bicubic", align_corners=False, antialias=True)
    assert not torch.allclose(out[:, 1:], bicubic.permute(0, 2, 3, 1).reshape(1, 242, 16))


def _imagenet_state(model, dim=32, depth=4):
    """An ImageNet-format ViT state dict (224/16 grid, head, 2-D patch weight as in old jx files)."""
    torch.manual_seed(1)
    state = {k: torch.randn_like(v) for k, v in model.backbone.state_dict().items() if k != "sie_embed"}
    state["pos_embed"] = torch.randn(1, 197, dim)
    state["patch_embed.proj.weight"] = torch.randn(dim, 3 * 16 * 16)
    state["head.weight"] = torch.randn(1000, dim)
    state["head.bias"] = torch.randn(1000)
    return state


def test_load_imagenet_vit_jx_format(tmp_path):
    model = create_model(num_classes=5, num_cams=2, img_size=(256, 128), stride=(11, 11), **TINY)
    state = _imagenet_state(model)
    path = tmp_path / "jx_vit.pth"
    torch.save(state, path)
    sie_before = model.backbone.sie_embed.detach().clone()
    load_imagenet_vit(model, str(path))
    bb = model.backbone
    torch.testing.assert_close(bb.blocks[2].attn.qkv.weight, state["blocks.2.attn.qkv.weight"])
    torch.testing.assert_close(bb.patch_embed.proj.weight, state["patch_embed.proj.weight"].reshape(32, 3, 16, 16))
    torch.testing.assert_close(bb.pos_embed, resize_pos_embed(state["pos_embed"], (22, 11)))
    assert bb.patch_embed.proj.stride == (11, 11)
    torch.testing.assert_close(bb.sie_embed, sie_before)


def test_load_imagenet_vit_errors_name_key_and_shapes(tmp_path):
    model = create_model(num_classes=5, num_cams=2, img_size=(256, 128), stride=(12, 12), **TINY)
    state = _imagenet_state(model)
    state["blocks.1.mlp.fc1.weight"] = torch.randn(7, 32)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(
        ValueError, match=r"'blocks.1.mlp.fc1.weight' has shape \(7, 32\) in the file but \(128, 32\) in the model"
    ):
        load_imagenet_vit(model, str(tmp_path / "bad.pth"))
    state = _imagenet_state(model)
    del state["norm.weight"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing key.*norm.weight"):
        load_imagenet_vit(model, str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_imagenet_vit(model, str(tmp_path / "nope.pth"))


def _official_state(
    dim: int, depth: int, tokens: int, cams: int, classes: int, taps: int = 4
) -> dict[str, torch.Tensor]:
    """A reference-named DPM state dict of the right shapes (docs/method.md §7 parity-test naming)."""
    g = torch.Generator().manual_seed(2)
    r = lambda *s: torch.randn(*s, generator=g)
    sd = {
        "base.cls_token": r(1, 1, dim),
        "base.pos_embed": r(1, tokens, dim),
        "base.sie_embed": r(cams, 1, dim),
        "base.patch_embed.proj.weight": r(dim, 3, 16, 16),
        "base.patch_embed.proj.bias": r(dim),
        "base.norm.weight": r(dim),
        "base.norm.bias": r(dim),
        "base.fc.weight": r(1000, dim),
        "base.fc.bias": r(1000),
        "base.attfc.weight": r(dim, dim),
        "base.attfc.bias": r(dim),
        "classifier.weight": r(classes, dim),
    }
    for i in range(depth):
        p = f"base.blocks.{i}."
        sd.update(
            {
                p + "norm1.weight": r(dim),
                p + "norm1.bias": r(dim),
                p + "norm2.weight": r(dim),
                p + "norm2.bias": r(dim),
                p + "attn.qkv.weight": r(3 * dim, dim),
                p + "attn.qkv.bias": r(3 * dim),
                p + "attn.proj.weight": r(dim, dim),
                p + "attn.proj.bias": r(dim),
                p + "mlp.fc1.weight": r(4 * dim, dim),
                p + "mlp.fc1.bias": r(4 * dim),
                p + "mlp.fc2.weight": r(dim, 4 * dim),
                p + "mlp.fc2.bias": r(dim),
            }
        )
    for idx, (cin, cout) in zip((0, 2, 4), ((taps * dim, 2 * dim), (2 * dim, dim), (dim, dim))):
        p = f"base.ConvLayer.{idx}."
        sd.update(
            {
                p + "0.weight": r(cout, cin, 3, 3),
                p + "0.bias": r(cout),
                p + "1.weight": r(cout),
                p + "1.bias": r(cout),
                p + "1.running_mean": r(cout),
                p + "1.running_var": r(cout).abs(),
                p + "1.num_batches_tracked": torch.tensor(7),
            }
        )
    for name in ("weight", "bias", "running_mean"):
        sd["bottleneck." + name] = r(dim)
    sd["bottleneck.running_var"] = r(dim).abs()
    sd["bottleneck.num_batches_tracked"] = torch.tensor(9)
    return {"module." + k: v for k, v in sd.items()}  # DDP-saved files carry a module. prefix


def test_official_checkpoint_round_trip_every_tensor_lands(tmp_path):
    src = tmp_path / "transformer_150.pth"
    official = _official_state(dim=32, depth=4, tokens=243, cams=8, classes=11)
    torch.save(official, src)
    dst = tmp_path / "ours.pt"
    model = convert.convert_official_checkpoint(
        str(src), str(dst), stride=(11, 11), tap_blocks=(1, 2, 3, 4), num_heads=4
    )
    ours = model.state_dict()
    landed = 0
    for key, value in official.items():
        new = official_key(key[len("module.") :])
        if new is None:
            assert key.startswith("module.base.fc.")
            continue
        assert torch.equal(ours[new], value), key
        landed += 1
    assert landed == len(ours)  # every model tensor came from the file
    # the written file loads strictly into a fresh model, and so does the official file itself
    fresh = create_model(num_classes=11, num_cams=8, img_size=(256, 128), stride=(11, 11), **TINY)
    load_dpm_checkpoint(fresh, str(dst))
    assert torch.equal(fresh.mask_gen.fc.weight, official["module.base.attfc.weight"])
    fresh2 = create_model(num_classes=11, num_cams=8, img_size=(256, 128), stride=(11, 11), **TINY)
    load_dpm_checkpoint(fresh2, str(src))
    assert torch.equal(fresh2.backbone.sie_embed, official["module.base.sie_embed"])


def test_official_key_shapes_for_vit_b():
    model = create_model(num_classes=702, num_cams=8, stride=(11, 11))
    own = model.state_dict()
    expected = {
        "base.cls_token": (1, 1, 768),
        "base.pos_embed": (1, 243, 768),
        "base.sie_embed": (8, 1, 768),
        "base.patch_embed.proj.weight": (768, 3, 16, 16),
        "base.blocks.3.attn.qkv.weight": (2304, 768),
        "base.blocks.11.mlp.fc1.weight": (3072, 768),
        "base.blocks.0.mlp.fc2.weight": (768, 3072),
        "base.ConvLayer.0.0.weight": (1536, 3072, 3, 3),
        "base.ConvLayer.2.0.weight": (768, 1536, 3, 3),
        "base.ConvLayer.4.0.weight": (768, 768, 3, 3),
        "base.ConvLayer.4.1.running_var": (768,),
        "base.attfc.weight": (768, 768),
        "classifier.weight": (702, 768),
        "bottleneck.running_mean": (768,),
    }
    for key, shape in expected.items():
        assert tuple(own[official_key(key)].shape) == shape, key
    assert official_key("base.fc.weight") is None


def test_converter_errors_name_key_shapes_and_stride(tmp_path, capsys):
    official = _official_state(dim=32, depth=4, tokens=243, cams=8, classes=11)
    official["module.base.ConvLayer.2.0.weight"] = torch.randn(32, 63, 3, 3)
    torch.save(official, tmp_path / "bad.pth")
    with pytest.raises(
        ValueError, match=r"'mask_gen.layers.2.0.weight' has shape \(32, 63, 3, 3\) in the file but \(32, 64, 3, 3\)"
    ):
        convert.convert_official_checkpoint(
            str(tmp_path / "bad.pth"), stride=(11, 11), tap_blocks=(1, 2, 3, 4), num_heads=4
        )
    torch.save(_official_state(dim=32, depth=4, tokens=243, cams=8, classes=11), tmp_path / "ok.pth")
    with pytest.raises(ValueError, match=r"pos_embed has 243 tokens .*stride \[12, 12\]"):
        convert.convert_official_checkpoint(
            str(tmp_path / "ok.pth"), stride=(12, 12), tap_blocks=(1, 2, 3, 4), num_heads=4
        )
    weird = _official_state(dim=32, depth=4, tokens=243, cams=8, classes=11)
    weird["module.base.mystery"] = torch.zeros(1)
    torch.save(weird, tmp_path / "weird.pth")
    with pytest.raises(ValueError, match="unknown key.*backbone.mystery"):
        convert.convert_official_checkpoint(
            str(tmp_path / "weird.pth"), stride=(11, 11), tap_blocks=(1, 2, 3, 4), num_heads=4
        )


@pytest.mark.slow
def test_convert_cli(tmp_path, capsys):
    torch.save(_official_state(dim=768, depth=12, tokens=211, cams=6, classes=13), tmp_path / "market.pth")
    rc = convert_cli.main([str(tmp_path / "market.pth"), str(tmp_path / "out.pt"), "--stride", "12", "12"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_tokens"] == 211 and report["num_cams"] == 6 and report["num_classes"] == 13
    saved = torch.load(tmp_path / "out.pt", weights_only=True)
    assert saved["meta"]["stride"] == [12, 12] and "backbone.sie_embed" in saved["model"]


def _dpm_convert(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    return subprocess.run(
        [str(Path(sys.executable).parent / "dpm-convert"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.slow
def test_convert_command_relative_paths_and_one_line_errors_naming_the_file(tmp_path):
    torch.save(_official_state(dim=32, depth=4, tokens=243, cams=8, classes=11), tmp_path / "transformer_150.pth")
    data = (tmp_path / "transformer_150.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "noise.pth").write_bytes(os.urandom(2048))
    for name, says in (
        ("cut.pth", "truncated or damaged torch file"),
        ("noise.pth", "not a torch file"),
        ("absent.pth", "weights file not found"),
    ):
        proc = _dpm_convert(name, "out.pt", cwd=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0].startswith("dpm-convert: error: ") and str(tmp_path / name) in lines[0] and says in lines[0], (
            lines[0]
        )
        assert "Traceback" not in proc.stderr and "weights_only" not in proc.stderr and "mmap" not in proc.stderr
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.slow
def test_convert_command_on_another_vit_shape_is_one_line_naming_the_file_and_shape(tmp_path):
    torch.save(_official_state(dim=32, depth=4, tokens=243, cams=8, classes=11), tmp_path / "small.pth")
    for args, says in (
        ((), "a ViT of width 32 and depth 4, but --backbone vit_base_patch16_224 is 768 wide: pass --num-heads"),
        (("--num-heads", "5"), "5 attention heads do not divide the width"),
        (("--num-heads", "4"), "--tap-blocks [2, 4, 10, 12] names block 12; pass blocks <= 4"),
        (("--num-heads", "4", "--tap-blocks", "1", "2", "3"), "its mask generator reads 4 blocks but --tap-blocks"),
    ):
        proc = _dpm_convert("small.pth", "out.pt", *args, cwd=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr
        assert lines[0].startswith(f"dpm-convert: error: {tmp_path / 'small.pth'}: ") and says in lines[0], lines[0]
        assert "Traceback" not in proc.stderr and "AssertionError" not in proc.stderr
    assert not (tmp_path / "out.pt").exists()
    proc = _dpm_convert("small.pth", "out.pt", "--num-heads", "4", "--tap-blocks", "1", "2", "3", "4", cwd=tmp_path)
    assert proc.returncode == 0 and json.loads(proc.stdout)["embed_dim"] == 32, proc.stderr


# ---- our model files (dpm_dist.model.files) -----------------------------------------------------------------------


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_a_model_file_gets_the_umask_mode_so_a_teammate_can_read_a_shared_run(tmp_path, mask, mode):
    import stat

    from dpm_dist.model.files import save_model_file

    old = os.umask(mask)
    try:
        save_model_file(torch.nn.Linear(2, 2), str(tmp_path / "run" / "model_final.pt"), {"epoch": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "run" / "model_final.pt").stat().st_mode) == mode


def test_a_failed_model_file_write_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    import errno

    from dpm_dist.model import files

    dst = tmp_path / "model_final.pt"
    dst.write_bytes(b"previous")

    class Unpicklable:
        def __reduce__(self):
            raise TypeError("not picklable")

    with pytest.raises(TypeError, match="not picklable"):  # not a write failure: passes through unchanged
        files.save_model_file(torch.nn.Linear(2, 2), str(dst), {"bad": Unpicklable()})
    assert dst.read_bytes() == b"previous" and os.listdir(tmp_path) == ["model_final.pt"]

    def half_then_full(obj, path):
        Path(path).write_bytes(b"half a zip")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.torch, "save", half_then_full)
    with pytest.raises(OSError, match=r"writing the model file .*model_final\.pt failed: No space left on device"):
        files.save_model_file(torch.nn.Linear(2, 2), str(dst), {})
    assert dst.read_bytes() == b"previous" and os.listdir(tmp_path) == ["model_final.pt"]


def test_a_model_file_is_found_read_and_loaded_with_its_recorded_architecture(tmp_path):
    import dataclasses

    from dpm_dist.config import ModelConfig
    from dpm_dist.model.dpm import build_model
    from dpm_dist.model.files import ModelFile, find_model_file, load_model_file, save_model_file

    arch = ModelConfig(backbone="vit_tiny_patch16_224", img_size=[64, 64], stride=[16, 16], **TINY)
    model = build_model(arch, num_classes=5, num_cams=3)
    save_model_file(model, str(tmp_path / "run" / "model_final.pt"), {"epoch": 3, "config": {"model": vars(arch)}})
    path, note = find_model_file(str(tmp_path / "run"))
    assert path == str(tmp_path / "run" / "model_final.pt") and "evaluating model_final.pt (the last epoch)" in note
    file = ModelFile.read(path)
    loaded, model_cfg, meta = load_model_file(file, ModelConfig())  # the fallback loses to the recorded model
    assert model_cfg == arch and meta["epoch"] == 3 and dataclasses.is_dataclass(model_cfg)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_load_imagenet_vit_reads_safetensors_like_a_torch_file(tmp_path):
    """Current timm / Hugging Face ViT weights come as .safetensors: read with the same checks as a .pth."""
    from safetensors.torch import save_file

    torch_model = create_model(num_classes=5, num_cams=2, img_size=(256, 128), stride=(11, 11), **TINY)
    safe_model = create_model(num_classes=5, num_cams=2, img_size=(256, 128), stride=(11, 11), **TINY)
    safe_model.load_state_dict(torch_model.state_dict())
    state = _imagenet_state(torch_model)
    torch.save(state, tmp_path / "vit.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    load_imagenet_vit(torch_model, str(tmp_path / "vit.pth"))
    load_imagenet_vit(safe_model, str(tmp_path / "model.safetensors"))
    for (name, a), b in zip(torch_model.state_dict().items(), safe_model.state_dict().values()):
        assert torch.equal(a, b), name
    bad = {**state, "blocks.1.mlp.fc1.weight": torch.randn(7, 32)}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match=r"'blocks.1.mlp.fc1.weight' has shape \(7, 32\) in the file"):
        load_imagenet_vit(safe_model, str(tmp_path / "bad.safetensors"))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.safetensors: truncated or damaged safetensors file"):
        load_imagenet_vit(safe_model, str(tmp_path / "cut.safetensors"))
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.safetensors: not a safetensors file \(an empty file\)"):
        load_imagenet_vit(safe_model, str(tmp_path / "empty.safetensors"))
