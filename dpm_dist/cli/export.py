"""``dpm-export``: a model file, run folder or official checkpoint as ONNX or TorchScript.

    dpm-export runs/tiny_synthetic model.onnx        # ONNX (dynamo exporter; opset and facts in metadata_props)
    dpm-export runs/tiny_synthetic/model_best.pt model_ts.pt   # TorchScript (facts in dpm_meta.json)
    dpm-export transformer_150.pth dpm_occluded_duke.onnx      # an official checkpoint (ViT-B, 256x128)

The format comes from OUTPUT's suffix. Inputs ``images`` (B, 3, H, W) float32 normalised as the test
transform does and ``camids`` (B,) int64; outputs ``feat``, ``feat_bn``, ``mask`` (B, D); the batch axis is
dynamic. A model trained on several datasets takes the model's camera ids (a dataset's camera + its
``cam_offset``; the file records the ``datasets`` list). After writing, the file is run on random inputs against eager PyTorch and the largest relative
difference printed. ONNX needs the ``deploy`` extra: pip install "dpm-dist[deploy]".
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from dpm_dist.cli.common import absolute_path, run_guarded

PROG = "dpm-export"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="our model file (.pt), a run folder, or an official DPM state dict (.pth)")
    parser.add_argument("output", help="OUTPUT.onnx (ONNX) or OUTPUT.pt (TorchScript)")
    parser.add_argument("--check-batch", type=int, default=3, help="batch of the parity check after writing; 0: skip")
    args = parser.parse_args(argv)
    return run_guarded(PROG, lambda: _as_user_error(lambda: export(args.checkpoint, args.output, args.check_batch)))


def _as_user_error(fn):
    """A missing optional dependency is the user's to install: a one-line error, not a traceback."""
    from dpm_dist.deploy.export import DEPLOY_MODULES

    try:
        return fn()
    except ModuleNotFoundError as err:
        if err.name not in DEPLOY_MODULES:
            raise
        raise ValueError(str(err)) from None


def export(checkpoint: str, output: str, check_batch: int) -> int:
    from dpm_dist.deploy.export import export_model, format_of, parity, require_deploy_extra
    from dpm_dist.deploy.loading import load_model
    from dpm_dist.model.files import resolve_model_path

    dst = absolute_path(output)
    if format_of(dst) == "onnx":  # before the model is read: a missing extra fails in a second
        require_deploy_extra("ONNX export")
    path, note = resolve_model_path(checkpoint, flag="CHECKPOINT")
    if note:
        print(f"{PROG}: {note}", file=sys.stderr, flush=True)
    loaded = load_model(path)
    meta = export_model(loaded, dst)
    how = f"{meta['exporter']} exporter, opset {meta['opset']}" if meta["format"] == "onnx" else meta["exporter"]
    line = (
        f"{PROG}: wrote {dst} ({meta['format']}, {how}; input {meta['img_size'][0]}x{meta['img_size'][1]}, "
        f"{meta['num_cams']} cameras, test feature {meta['test_feature']})"
    )
    if len(meta["datasets"]) > 1:
        line += (
            "; camids are the model's: a dataset's camera + its cam_offset ("
            + ", ".join(f"{d['name']} +{d['cam_offset']}" for d in meta["datasets"])
            + ", recorded as datasets)"
        )
    if meta.get("dynamo_error"):
        line += f"; the dynamo exporter failed ({meta['dynamo_error']})"
    print(line, flush=True)
    if check_batch > 0:
        errors = parity(loaded, dst, batch=check_batch)
        print(
            f"{PROG}: parity vs eager PyTorch at batch {check_batch}: "
            + json.dumps({k: float(f"{v:.3g}") for k, v in errors.items()}),
            flush=True,
        )
        worst = max(errors.values())
        if worst > 1e-3:
            raise ValueError(f"{dst}: the exported model differs from PyTorch by {worst:.3g} (relative); not usable")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
