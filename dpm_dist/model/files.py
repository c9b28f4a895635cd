"""Our model files: ``{"model": fp32 state dict, "meta": {...}}``, written atomically.

``meta`` carries what a reader needs without the training run: the epoch, the final metrics and the
resolved configuration of training, or the converter's facts for an official checkpoint. Training
writes ``model_best.pt`` (at its best evaluation) and ``model_final.pt`` (at the end) into the run folder;
:func:`dpm_dist.model.weights.read_dpm_file` reads them back with errors that name the file.
"""

from __future__ import annotations

import os
import tempfile

import torch


MODEL_BEST, MODEL_FINAL = "model_best.pt", "model_final.pt"  # in a run folder, in the order dpm-eval prefers them


def save_model_file(model: torch.nn.Module, dst: str, meta: dict) -> None:
    """Write ``{"model": fp32 state dict, "meta": meta}`` atomically (temp file + rename)."""
    folder = os.path.dirname(os.path.abspath(dst))
    os.makedirs(folder, exist_ok=True)
    state = {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in model.state_dict().items()}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    os.close(fd)
    try:
        torch.save({"model": state, "meta": meta}, tmp)
        os.replace(tmp, dst)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
