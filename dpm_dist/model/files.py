"""Our model files: ``{"model": fp32 state dict, "meta": {...}}``, written atomically.

``meta`` carries what a reader needs without the training run: the epoch, the final metrics and the
resolved configuration of training, or the converter's facts for an official checkpoint. Training
writes ``model_best.pt`` (at its best evaluation) and ``model_final.pt`` (at the end) into the run folder;
:func:`dpm_dist.model.weights.read_dpm_file` reads them back with errors that name the file.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch

MODEL_BEST, MODEL_FINAL = "model_best.pt", "model_final.pt"  # in a run folder, in the order dpm-eval prefers them


def save_model_file(model: torch.nn.Module | dict[str, torch.Tensor], dst: str, meta: dict) -> None:
    """Write ``{"model": fp32 state dict, "meta": meta}`` atomically (temp file + rename); ``model``: a module or its
    state dict."""
    folder = os.path.dirname(os.path.abspath(dst))
    os.makedirs(folder, exist_ok=True)
    tensors = model if isinstance(model, dict) else model.state_dict()
    state = {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pt")
    os.close(fd)
    try:
        torch.save({"model": state, "meta": meta}, tmp)
        os.replace(tmp, dst)
    except (OSError, RuntimeError) as err:
        if not is_write_failure(err):
            raise
        raise OSError(
            f"writing the model file {dst} failed: {describe_write_failure(err, folder)}; no file was replaced"
        ) from err
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def is_write_failure(err: BaseException) -> bool:
    """OSError, or torch.save's RuntimeError from its zip writer (which does not raise OSError on a full disk)."""
    return isinstance(err, OSError) or (
        isinstance(err, RuntimeError)
        and any(s in str(err) for s in ("inline_container", "PytorchStreamWriter", "file write failed"))
    )


def describe_write_failure(err: BaseException, folder: str) -> str:
    """Why a write into ``folder`` failed and the free space at that moment (call it before removing partial
    files), e.g. ``No space left on device (0.0 MiB free of 14 MiB)``."""
    probe = folder
    while probe and not os.path.isdir(probe):
        probe = os.path.dirname(probe)
    try:
        usage = shutil.disk_usage(probe or ".")
    except OSError:
        usage = None
    free = f"{usage.free / 2**20:,.1f} MiB free of {usage.total / 2**20:,.0f} MiB" if usage else "free space unknown"
    if isinstance(err, OSError) and err.strerror:
        why = err.strerror
    elif usage and usage.free < 2**20:
        why = "No space left on device"
    else:
        why = f"write failed ({str(err).splitlines()[0]})"
    return f"{why} ({free})"


def find_model_file(path: str, *, flag: str = "--checkpoint", verb: str = "evaluating") -> tuple[str, str | None]:
    """``(model file, note)``: a file as given; a run folder's model_best.pt, else its model_final.pt.

    Training-state folders (``checkpoints/``, ``checkpoints/epoch_XXXX``) hold DeepSpeed shards, not a model:
    the error names the file to pass instead. ``flag`` names the argument in errors, ``verb`` the use in the note.
    """
    if os.path.isfile(path):
        return path, None
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{flag}: no such file or folder: {path}")
    found = [name for name in (MODEL_BEST, MODEL_FINAL) if os.path.isfile(os.path.join(path, name))]
    if found:
        why = "the best evaluation" if found[0] == MODEL_BEST else "the last epoch"
        other = f"; pass {os.path.join(path, found[1])} for the other" if len(found) > 1 else ""
        return os.path.join(path, found[0]), f"{path} is a run folder: {verb} {found[0]} ({why}{other})"
    run = _run_of_training_state(path)
    if run is not None:
        files = [os.path.join(run, n) for n in (MODEL_BEST, MODEL_FINAL) if os.path.isfile(os.path.join(run, n))]
        advice = (
            f"pass {' or '.join(files)}"
            if files
            else f"the run {run} has no model file yet (training writes {MODEL_BEST} at its best evaluation "
            f"and {MODEL_FINAL} at the end)"
        )
        raise ValueError(
            f"{flag} {path}: a training-state checkpoint folder (DeepSpeed shards), not a model file; {advice}"
        )
    what = "an empty folder" if not os.listdir(path) else "a folder"
    raise FileNotFoundError(
        f"{flag} {path}: {what} without {MODEL_BEST} or {MODEL_FINAL} (not a run folder); pass a model file"
    )


def _run_of_training_state(path: str) -> str | None:
    """The run folder above a ``checkpoints/`` folder or one of its ``epoch_XXXX`` folders, else None."""
    names = set(os.listdir(path))
    if "meta.json" in names and os.path.basename(path).startswith("epoch_"):
        return os.path.dirname(os.path.dirname(path))
    if "latest" in names or any(n.startswith("epoch_") for n in names):
        return os.path.dirname(path)
    return None
