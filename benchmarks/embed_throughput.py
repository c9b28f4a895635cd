"""Images/s of the embedding forward for the tiny model and ViT-B (random init): eager vs TorchScript vs onnxruntime.

    DS_ACCELERATOR=cpu .venv/bin/python benchmarks/embed_throughput.py              # this CPU, a few minutes
    .venv/bin/python benchmarks/embed_throughput.py --device cuda --vit-batch 64    # a GPU (onnxruntime: CUDA provider)

The same inputs go through each runtime (the model's normalised images and camera ids, already decoded:
this measures the model, which dominates dpm-embed on a CPU); one warm-up batch, then ``--iters`` timed
batches. Prints one line per (model, runtime), the ratios to eager, and a JSON line with everything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dpm_dist.config import DataConfig, DPMConfig, ModelConfig

TINY = ModelConfig(embed_dim=64, depth=4, num_heads=4, img_size=[128, 64], stride=[12, 12], tap_blocks=[1, 2, 3, 4])
VIT_B = ModelConfig()  # the paper's ViT-B/16 at 256x128, stride 11


def build(model_cfg: ModelConfig, folder: str, name: str, device: str):
    import dataclasses

    import dpm_dist
    from dpm_dist.model.dpm import build_model
    from dpm_dist.model.files import save_model_file

    torch.manual_seed(0)
    net = build_model(model_cfg, num_classes=100, num_cams=4)
    torch.nn.init.normal_(net.mask_gen.fc.weight, std=0.05)  # zero-initialised: every mask would be 0.5
    cfg = DPMConfig(model=model_cfg, data=DataConfig(img_size=list(model_cfg.img_size)))
    path = os.path.join(folder, f"{name}.pt")
    save_model_file(net, path, {"config": dataclasses.asdict(cfg)})
    return dpm_dist.load_model(path, device)


def timed(run, images, camids, iters: int) -> float:
    run(images, camids)  # warm-up (also the jit/ORT first-run optimisations)
    if images.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        run(images, camids)
    if images.is_cuda:
        torch.cuda.synchronize()
    return images.shape[0] * iters / (time.perf_counter() - start)


def bench(name: str, model_cfg: ModelConfig, batch: int, iters: int, device: str, folder: str) -> dict:
    from dpm_dist.deploy import export

    loaded = build(model_cfg, folder, name, device)
    images, camids = export.example_inputs(loaded, batch, seed=3)
    wrapper = export.ExportModule(loaded.model).eval()
    rates = {}
    with torch.no_grad():
        rates["eager"] = timed(wrapper, images, camids, iters)
        export.export_torchscript(loaded, os.path.join(folder, f"{name}_ts.pt"))
        module, _ = export.read_torchscript(os.path.join(folder, f"{name}_ts.pt"), device)
        rates["torchscript"] = timed(module, images, camids, iters)
    onnx_path = os.path.join(folder, f"{name}.onnx")
    meta = export.export_onnx(loaded, onnx_path)
    providers = (
        ("CUDAExecutionProvider", "CPUExecutionProvider") if device.startswith("cuda") else ("CPUExecutionProvider",)
    )
    session = export.onnx_session(onnx_path, providers)
    rates["onnxruntime"] = timed(lambda x, c: export.run_onnx(session, x, c), images, camids, iters)
    out = {
        "model": name,
        "batch": batch,
        "iters": iters,
        "device": device,
        "threads": torch.get_num_threads(),
        "onnx_exporter": meta["exporter"],
        "providers": session.get_providers(),
        "images_per_s": rates,
        "ratio_to_eager": {k: v / rates["eager"] for k, v in rates.items()},
        "parity": export.parity(loaded, onnx_path, batch=2),
    }
    for runtime, rate in rates.items():
        print(
            f"{name:6s} batch {batch:3d}  {runtime:12s} {rate:9.1f} images/s  x{rate / rates['eager']:.2f}", flush=True
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--tiny-batch", type=int, default=64)
    parser.add_argument("--vit-batch", type=int, default=8)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--skip-vit", action="store_true")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as folder:
        results.append(bench("tiny", TINY, args.tiny_batch, args.iters, args.device, folder))
        if not args.skip_vit:
            results.append(bench("vit_b", VIT_B, args.vit_batch, args.iters, args.device, folder))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
