"""CUDA checks (``-m gpu``; skipped without a CUDA device): mixed-precision forward/backward, the exact update
against the reference update, NCCL, the evaluator against the CPU, fused SDPA under the HEM hook, and the
fast paths (fused SGD, pinned batches). Run by benchmarks/gpu_check.sh on the GPU machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpm_dist.dist import DistEnv, init_process_group

sys.path.insert(0, str(Path(__file__).parent))
import engine_worker as W

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (no CUDA device)")]


@pytest.fixture(scope="module")
def env() -> DistEnv:
    init_process_group(DistEnv())  # NCCL on CUDA
    return DistEnv()


@pytest.fixture
def strict_fp32():
    """No TF32 and deterministic cuDNN, so two fp32 runs of the same math round alike."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic = saved


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_forward_backward_under_autocast(dtype):
    from dpm_dist.train.losses import dpm_loss

    model = W.fresh_model().cuda().train()
    batch = {k: v.cuda() for k, v in W.batches(DistEnv(), 1)[0].items()}
    with torch.autocast("cuda", dtype=dtype):
        out = model(batch["images"], batch["camids"])
        loss = dpm_loss(
            feat=out.feat,
            feat_bn=out.feat_bn,
            mask=out.mask,
            attn_logits=out.attn_logits,
            prototypes=model.prototypes,
            labels=batch["pids"],
            alpha=0.5,
            beta=0.1,
            margin=0.5,
            scale=30.0,
            triplet_weight=1.0,
            hem_ref_batch=6,
        )["loss"]
    assert out.attn_logits.dtype == dtype and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_exact_update_equals_the_reference_update(env, strict_fp32):
    reference = W.run("reference", 0, env)
    exact = W.run("exact", 0, env)
    assert exact["backbone.pos_embed"].is_cuda
    worst = max(
        float((exact[k].double() - reference[k].double()).abs().max()) for k in exact if exact[k].is_floating_point()
    )
    assert worst <= 1e-5, f"max |Δw| = {worst:.3g}"


def test_fused_sgd_on_cuda_gives_the_same_update(env, strict_fp32):
    from dpm_dist.train.engine import DPMEngine

    states = []
    for fused in (False, True):
        cfg = W.make_cfg("exact", 1)
        cfg.optim.fused = fused
        engine = DPMEngine.from_config(cfg, env, W.fresh_model())
        engine.start_epoch(2)
        for batch in W.batches(env, 2):
            engine.step(batch)
        states.append(engine.model.state_dict())
    worst = max(float((states[0][k] - states[1][k]).abs().max()) for k in states[0] if states[0][k].is_floating_point())
    assert worst <= 1e-5


def test_nccl_process_group_of_one_rank(tmp_path):
    code = (
        "import torch, torch.distributed as d\n"
        f"d.init_process_group('nccl', store=d.FileStore({str(tmp_path / 'store')!r}, 1), rank=0, world_size=1,"
        " device_id=torch.device('cuda', 0))\n"
        "x = torch.ones(4, device='cuda'); d.all_reduce(x); torch.cuda.synchronize()\n"
        "assert d.get_backend() == 'nccl' and x.tolist() == [1.0] * 4\n"
        "d.destroy_process_group(); print('nccl ok')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=dict(os.environ)
    )
    assert proc.returncode == 0 and "nccl ok" in proc.stdout, proc.stderr[-3000:]


def _features(num_query: int, num_gallery: int, dim: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(40, dim, generator=g, dtype=dtype)
    q_pids, g_pids = torch.randint(0, 40, (num_query,), generator=g), torch.randint(0, 40, (num_gallery,), generator=g)
    qf = centres[q_pids] + 2.0 * torch.randn(num_query, dim, generator=g, dtype=dtype)
    gf = centres[g_pids] + 2.0 * torch.randn(num_gallery, dim, generator=g, dtype=dtype)
    qm = torch.sigmoid(torch.randn(num_query, dim, generator=g, dtype=dtype))
    cams = torch.randint(0, 4, (num_query + num_gallery,), generator=g)
    return qf, gf, q_pids, g_pids, cams[:num_query], cams[num_query:], qm


@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 2e-4)])
def test_evaluator_on_cuda_equals_the_cpu_metrics(dtype, atol, strict_fp32):
    from dpm_dist.eval.retrieval import evaluate_features

    *args, qm = _features(300, 2000, 128, dtype)
    cpu = evaluate_features(*args, q_mask=qm, query_chunk=64).as_dict()
    gpu = evaluate_features(*[a.cuda() for a in args], q_mask=qm.cuda(), query_chunk=64).as_dict()
    assert cpu.keys() == gpu.keys()
    assert all(abs(cpu[k] - gpu[k]) <= atol for k in cpu), (cpu, gpu)


def test_extracted_features_on_cuda_match_the_cpu(strict_fp32):
    from dpm_dist.eval.evaluator import extract

    model = W.fresh_model()
    batches = [{**b, "keys": [f"k{i}" for i in range(6)], "roles": ["query"] * 6} for b in W.batches(DistEnv(), 2)]
    cpu = extract(model, batches, device="cpu")
    gpu = extract(model.cuda(), batches, device="cuda")
    assert torch.allclose(cpu.feats, gpu.feats.cpu(), atol=1e-4) and torch.allclose(
        cpu.masks, gpu.masks.cpu(), atol=1e-5
    )


class _Ops(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_attention_runs_fused_sdpa_while_the_hem_logits_are_taken(dtype):
    """Math SDPA is excluded (it would raise); every block, the hooked last one too, calls a fused kernel."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dpm_dist.model.dpm import create_model

    torch.manual_seed(0)
    model = (
        create_model(
            num_classes=10,
            num_cams=3,
            img_size=(256, 128),
            stride=(11, 11),
            embed_dim=192,
            depth=3,
            num_heads=3,
            tap_blocks=(1, 2, 3),
        )
        .cuda()
        .eval()
    )
    images, camids = torch.randn(4, 3, 256, 128, device="cuda"), torch.tensor([0, 1, 2, 0], device="cuda")
    ops = _Ops()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]), ops:
            out = model(images, camids)
    fused = [
        n
        for n in ops.names
        if n.startswith(("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention"))
    ]
    assert len(fused) == 3, sorted({n for n in ops.names if "scaled_dot" in n})
    assert not [n for n in ops.names if "math" in n]
    assert out.attn_logits.shape == (4, 3, 22 * 11) and torch.isfinite(out.attn_logits).all()


def test_pinned_batches_reach_the_device(tiny_shards):
    from dpm_dist.config import DataConfig
    from dpm_dist.data.loader import build_train_loader

    cfg = DataConfig(
        root=str(tiny_shards),
        dataset="synthetic",
        num_ids=4,
        num_instances=2,
        num_workers=1,
        img_size=[32, 16],
        pin_memory=True,
    )
    batch = next(iter(build_train_loader(cfg, DistEnv(), epoch=1, seed=0)))
    assert batch["images"].is_pinned()
    assert batch["images"].to("cuda", non_blocking=True).is_cuda
