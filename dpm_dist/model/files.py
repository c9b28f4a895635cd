"""Model files: how a DPM model file is written, found, read and loaded (the one place for all four).

Our model files are ``{"model": fp32 state dict, "meta": {...}}``. ``meta`` carries what a reader needs
without the training run: the epoch, the final metrics and the resolved configuration of training, or the
converter's facts for an official checkpoint. Training writes ``model_best.pt`` (at its best evaluation) and
``model_final.pt`` (at the end) into the run folder.

    write   save_model_file(model, dst, meta)        atomic (dpm_dist.fsio), the umask's mode
    find    find_model_file(path) / resolve_model_path(path)   a file, or a run folder's best/final file
    read    ModelFile.read(path)                     ours, the converter's or an official state dict
    load    load_model_file(file, fallback)          the recorded architecture, weights loaded strictly

``dpm-eval`` (:mod:`dpm_dist.eval.run`), ``dpm_dist.load_model`` (:mod:`dpm_dist.deploy.loading`), training
and the converter all go through these. The architecture is a :class:`dpm_dist.config.ModelConfig`, passed
in as ``fallback`` (the model package never imports the config schema): the file's recorded ``model``
section wins, else the facts the converter recorded are applied to ``fallback``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from dpm_dist.fsio import atomic_path, describe_write_failure, is_write_failure
from dpm_dist.model.dpm import DPMNet, build_model
from dpm_dist.model.weights import describe_state_dict, load_state_dict_checked, read_dpm_file

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "MODEL_BEST",
    "MODEL_FINAL",
    "ModelFile",
    "describe_write_failure",
    "find_model_file",
    "is_write_failure",
    "load_model_file",
    "model_config_for",
    "resolve_model_path",
    "save_model_file",
]

MODEL_BEST, MODEL_FINAL = "model_best.pt", "model_final.pt"  # in a run folder, in the order dpm-eval prefers them
CONVERTER_FACTS = ("img_size", "stride", "backbone", "tap_blocks", "embed_dim", "depth", "patch_size")
Arch = TypeVar("Arch", bound="DataclassInstance")  # dpm_dist.config.ModelConfig, passed in by the caller


# ---- write ------------------------------------------------------------------------------------------------------


def save_model_file(model: torch.nn.Module | dict[str, torch.Tensor], dst: str, meta: dict) -> None:
    """Write ``{"model": fp32 state dict, "meta": meta}`` atomically; ``model``: a module or its state dict.

    A failed write (a full disk) raises an OSError naming ``dst``, why and the free space, and replaces nothing.
    """
    tensors = model if isinstance(model, dict) else model.state_dict()
    state = {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in tensors.items()}
    with atomic_path(dst, what="the model file") as tmp:
        torch.save({"model": state, "meta": meta}, tmp)


# ---- find -------------------------------------------------------------------------------------------------------


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


def resolve_model_path(path: str | os.PathLike, *, flag: str = "model") -> tuple[str, str | None]:
    """:func:`find_model_file` of a user's path (``~`` expanded, made absolute), the note saying "using"."""
    return find_model_file(os.path.abspath(os.path.expanduser(os.fspath(path))), flag=flag, verb="using")


def _run_of_training_state(path: str) -> str | None:
    """The run folder above a ``checkpoints/`` folder or one of its ``epoch_XXXX`` folders, else None."""
    names = set(os.listdir(path))
    if "meta.json" in names and os.path.basename(path).startswith("epoch_"):
        return os.path.dirname(os.path.dirname(path))
    if "latest" in names or any(n.startswith("epoch_") for n in names):
        return os.path.dirname(path)
    return None


# ---- read -------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelFile:
    """A model file read once: its path, the DPM state dict in our naming, and its ``meta`` ({} if none)."""

    path: str
    state: dict[str, torch.Tensor]
    meta: dict[str, Any]

    @classmethod
    def read(cls, path: str) -> ModelFile:
        """Our file, the converter's or an official DPM state dict; errors name the file."""
        state, meta = read_dpm_file(path)
        return cls(os.path.abspath(path), state, meta)

    @property
    def config(self) -> dict[str, Any]:
        """The resolved training config our model files carry (``meta.config``), else {}."""
        saved = self.meta.get("config")
        return saved if isinstance(saved, dict) else {}


# ---- load -------------------------------------------------------------------------------------------------------


def model_config_for(fallback: Arch, meta: dict[str, Any]) -> Arch:
    """The file's own architecture when it records one (our files), else ``fallback`` with the converter's facts.

    ``fallback`` is a :class:`dpm_dist.config.ModelConfig`; the result is one too.
    """
    saved = (meta.get("config") or {}).get("model")
    if saved:
        fields = {f.name for f in dataclasses.fields(fallback)}
        return type(fallback)(**{k: v for k, v in saved.items() if k in fields})
    return dataclasses.replace(fallback, **{k: meta[k] for k in CONVERTER_FACTS if k in meta})


def load_model_file(source: ModelFile | str, fallback: Arch) -> tuple[DPMNet, Arch, dict[str, Any]]:
    """``(model, its ModelConfig, meta)``: the DPM model ``source`` records, its weights loaded strictly.

    Class and camera counts come from the weights; errors name the file and the key.
    """
    file = source if isinstance(source, ModelFile) else ModelFile.read(source)
    facts = describe_state_dict(file.state)
    model_cfg = model_config_for(fallback, file.meta)
    model = build_model(model_cfg, num_classes=facts["num_classes"], num_cams=facts["num_cams"])
    load_state_dict_checked(model, file.state, source=file.path)
    return model, model_cfg, file.meta
