"""ONNX and TorchScript export of a loaded model (``dpm-export``), with the model's facts inside the file.

:class:`ExportModule` wraps DPMNet so that ``forward(images, camids)`` returns the tuple
``(feat, feat_bn, mask)``: exporters and tracers need plain tensors, and DPMNet's dataclass output (and so
training) stays as it is. Both formats take a dynamic batch axis.

- ONNX: ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript); if that fails, the TorchScript-based
  exporter (``dynamo=False``). The exporter and the opset are recorded with the other facts in the file's
  ``metadata_props`` (keys ``dpm.*``, values JSON).
- TorchScript: ``torch.jit.trace``; the facts are the ``_extra_files`` entry ``dpm_meta.json``.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from dpm_dist.deploy.loading import LoadedModel
from dpm_dist.fsio import atomic_path

FORMATS = {".onnx": "onnx", ".pt": "torchscript"}
DEPLOY_MODULES = ("onnx", "onnxscript", "onnxruntime")
DEPLOY_HINT = 'pip install "dpm-dist[deploy]"'
OPSET = 18
INPUTS, OUTPUTS = ("images", "camids"), ("feat", "feat_bn", "mask")
META_FILE = "dpm_meta.json"  # TorchScript _extra_files entry
EXAMPLE_BATCH = 2


class ExportModule(torch.nn.Module):
    """``forward(images (B, 3, H, W) float32, camids (B,) int64) -> (feat, feat_bn, mask)``, each (B, D)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor, camids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.net(images, camids)
        return out.feat, out.feat_bn, out.mask


def format_of(path: str) -> str:
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in FORMATS:
        raise ValueError(
            f"{path}: unknown export format {suffix or '(no suffix)'!r}; the output's suffix picks it: "
            f".onnx (ONNX) or .pt (TorchScript)"
        )
    return FORMATS[suffix]


def require_deploy_extra(purpose: str) -> None:
    """ModuleNotFoundError naming the missing modules and the extra that installs them."""
    missing = []
    for name in DEPLOY_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ModuleNotFoundError(
            f"{purpose} needs {', '.join(missing)} (not installed): {DEPLOY_HINT}", name=missing[0]
        )


def metadata(loaded: LoadedModel, **extra: Any) -> dict[str, Any]:
    """What every exported file records: inputs, outputs and the model's facts (no training config)."""
    facts = {k: v for k, v in loaded.meta.items() if k != "config"}
    return {**facts, "inputs": list(INPUTS), "outputs": list(OUTPUTS), "batch_axis": "dynamic", **extra}


def example_inputs(loaded: LoadedModel, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    height, width = loaded.meta["img_size"]
    images = torch.randn(batch, 3, height, width, generator=gen).clamp_(-1, 1)
    camids = torch.randint(0, max(loaded.num_cams, 1), (batch,), generator=gen)
    return images.to(loaded.device), camids.to(loaded.device)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters' known chatter (deprecation of jit.trace, tracer constant warnings, progress prints)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def export_onnx(loaded: LoadedModel, dst: str, *, opset: int = OPSET, dynamo: bool = True) -> dict[str, Any]:
    """Write ``dst`` (.onnx); returns the recorded metadata (``exporter``: dynamo or torchscript, ``opset``)."""
    require_deploy_extra("ONNX export")
    import onnx

    wrapper = ExportModule(loaded.model).eval()
    args = example_inputs(loaded, EXAMPLE_BATCH)
    proto, exporter, why = None, "dynamo", None
    if dynamo:
        try:
            proto = _dynamo_proto(wrapper, args, opset)
        except Exception as err:  # any exporter failure: fall back, and say why in the metadata
            why = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    if proto is None:
        exporter = "torchscript"
        proto = _torchscript_proto(wrapper, args, opset)
    opset_found = next((int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), opset)
    meta = metadata(loaded, format="onnx", exporter=exporter, opset=opset_found, dynamo_error=why)
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"dpm.{key}", json.dumps(value)
    with atomic_path(dst) as tmp:
        onnx.save(proto, tmp)
    return meta


def _dynamo_proto(wrapper: torch.nn.Module, args: tuple[torch.Tensor, ...], opset: int) -> Any:
    batch = torch.export.Dim("batch")
    with _quiet(), contextlib.redirect_stdout(open(os.devnull, "w")):
        program = torch.onnx.export(
            wrapper,
            args,
            dynamo=True,
            opset_version=opset,
            input_names=list(INPUTS),
            output_names=list(OUTPUTS),
            dynamic_shapes={"images": {0: batch}, "camids": {0: batch}},
            verbose=False,
        )
    return program.model_proto


def _torchscript_proto(wrapper: torch.nn.Module, args: tuple[torch.Tensor, ...], opset: int) -> Any:
    import io

    import onnx

    buffer = io.BytesIO()
    axes = {name: {0: "batch"} for name in INPUTS + OUTPUTS}
    with _quiet():
        torch.onnx.export(
            wrapper,
            args,
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=list(INPUTS),
            output_names=list(OUTPUTS),
            dynamic_axes=axes,
        )
    return onnx.load_from_string(buffer.getvalue())


def export_torchscript(loaded: LoadedModel, dst: str) -> dict[str, Any]:
    """Write ``dst`` (.pt, ``torch.jit.load``-able); returns the metadata stored as ``dpm_meta.json`` inside."""
    wrapper = ExportModule(loaded.model).eval()
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(wrapper, example_inputs(loaded, EXAMPLE_BATCH), check_trace=False)
    meta = metadata(loaded, format="torchscript", exporter="torch.jit.trace", torch=torch.__version__)
    with _quiet():
        with atomic_path(dst) as tmp:
            torch.jit.save(traced, tmp, _extra_files={META_FILE: json.dumps(meta)})
    return meta


# ---- running an exported file (parity checks, the benchmark) ------------------------------------------------


def onnx_session(path: str, providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> Any:
    require_deploy_extra("running an ONNX model")
    import onnxruntime as ort

    return ort.InferenceSession(path, providers=list(providers))


def run_onnx(session: Any, images: torch.Tensor, camids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    feeds = {"images": images.cpu().numpy(), "camids": camids.cpu().numpy()}
    feeds = {i.name: feeds[i.name] for i in session.get_inputs()}  # an exporter may drop an unused input
    return tuple(torch.from_numpy(o) for o in session.run(list(OUTPUTS), feeds))


def read_onnx_metadata(path: str) -> dict[str, Any]:
    import onnx

    proto = onnx.load(path, load_external_data=False)
    return {p.key[len("dpm.") :]: json.loads(p.value) for p in proto.metadata_props if p.key.startswith("dpm.")}


def read_torchscript(path: str, device: str = "cpu") -> tuple[torch.jit.ScriptModule, dict[str, Any]]:
    files = {META_FILE: ""}
    with _quiet():
        module = torch.jit.load(path, map_location=device, _extra_files=files)
    return module, json.loads(files[META_FILE])


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| / max |ref|: one number per output, robust to entries near zero."""
    return float((ours.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


@torch.no_grad()
def parity(loaded: LoadedModel, path: str, *, batch: int, seed: int = 1) -> dict[str, float]:
    """Relative error of each output of the exported file against the eager model on random inputs."""
    images, camids = example_inputs(loaded, batch, seed)
    ref = ExportModule(loaded.model).eval()(images, camids)
    if format_of(path) == "onnx":
        got = run_onnx(onnx_session(path), images, camids)
    else:
        module, _ = read_torchscript(path, str(loaded.device))
        got = module(images, camids)
    return {name: relative_error(g.to(r.device), r) for name, g, r in zip(OUTPUTS, got, ref)}


def export_model(loaded: LoadedModel, dst: str) -> dict[str, Any]:
    """Export in the format ``dst``'s suffix names (.onnx or .pt)."""
    fmt = format_of(dst)
    return export_onnx(loaded, dst) if fmt == "onnx" else export_torchscript(loaded, dst)
