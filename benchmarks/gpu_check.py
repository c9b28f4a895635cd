"""Steps of benchmarks/gpu_check.sh, one per call, each writing PARTS/<step>.json; ``report`` merges them.

    python3 benchmarks/gpu_check.py summary PARTS [--dry-run]
    python3 benchmarks/gpu_check.py train PARTS [--compile] [--dry-run]
    python3 benchmarks/gpu_check.py eval PARTS [--dry-run]
    python3 benchmarks/gpu_check.py loader PARTS [--dry-run]
    python3 benchmarks/gpu_check.py report PARTS OUTDIR

(The head step is benchmarks/head_scale.py --json PARTS/head.json; ``report`` reads it as it reads the others.)

gpu_check.sh runs each under its own ``timeout`` and records ``PARTS/<step>.status`` (exit code, seconds)
so that ``report`` can say which step failed or ran out of time. Output: OUTDIR/gpu_check.md (one table)
and OUTDIR/gpu_check.json (every number).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import xml.etree.ElementTree as ET
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # gpu_bench, also under python -P
import gpu_bench

NO_CUDA = "skipped: no CUDA"


def _version(module: str) -> str:
    try:
        return str(__import__(module).__version__)
    except Exception as exc:  # a missing package is a finding of the summary, not a crash
        return f"missing ({type(exc).__name__})"


def _driver() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "no nvidia-smi"


def summary() -> dict[str, Any]:
    """The machine, the versions, and proof that dpm_dist and its configs import from the installed wheel."""
    import torch

    import dpm_dist
    from dpm_dist.cli.common import compose_config

    cfg = compose_config(["experiment=occluded_duke"])
    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "gpu": None,
        "driver": None,
        "nccl": None,
        "deepspeed": _version("deepspeed"),
        "timm": _version("timm"),
        "webdataset": _version("webdataset"),
        "hydra": _version("hydra"),
        "dpm_dist": os.path.dirname(dpm_dist.__file__),
        "configs": f"composed from dpm_dist.configs: experiment=occluded_duke (data.dataset={cfg.data.dataset})",
    }
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=torch.cuda.get_device_name(0),
            memory_gib=round(props.total_memory / 2**30, 1),
            sms=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
            driver=_driver(),
            nccl=".".join(map(str, torch.cuda.nccl.version())),
        )
    return info


# ---- report


def _load(parts: str, name: str) -> dict[str, Any] | None:
    path = os.path.join(parts, f"{name}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _status(parts: str, name: str) -> str:
    """'ok', 'failed (exit N)', 'timed out after N s' or 'not run', from gpu_check.sh's status file."""
    path = os.path.join(parts, f"{name}.status")
    if not os.path.exists(path):
        return "not run"
    rc, seconds = open(path).read().split()
    if rc == "0":
        return "ok"
    return f"timed out after {seconds} s" if rc in ("124", "137") else f"failed (exit {rc})"


def _tests(parts: str, dry: bool) -> list[list[str]]:
    path = os.path.join(parts, "tests.xml")
    if not os.path.exists(path):
        return [["1. pytest -m gpu", "–", _status(parts, "tests")]]
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        result = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                result = f"{child.tag.upper()}: {(child.get('message') or '').splitlines()[0][:120] if child.get('message') else ''}"
            elif child.tag == "skipped":
                result = NO_CUDA if "CUDA" in (child.get("message") or "") else f"skipped: {child.get('message')}"
        rows.append([f"1. test {case.get('name')}", "–", result])
    return rows or [["1. pytest -m gpu", "–", _status(parts, "tests")]]


def _train_rows(parts: str, peak: float | None) -> list[list[str]]:
    rows = []
    eager = (_load(parts, "train_eager") or {}).get("modes", {})
    for name, label in (("train_eager", "eager"), ("train_compile", "torch.compile")):
        data = _load(parts, name)
        status = _status(parts, name)
        if not data or not data.get("modes"):
            rows.append([f"2. train, {label}", "–", status])
            continue
        ref = data["modes"].get("reference", {}).get("images_per_s")
        for mode in gpu_bench.MODES:
            row = data["modes"].get(mode)
            if row is None:
                rows.append([f"2. train {mode}, {label}", "–", status])
                continue
            flops = row.get("flops_per_image") or eager.get(mode, {}).get("flops_per_image")
            rate = row["images_per_s"]
            parts_ = [f"{rate:.1f} images/s", f"{row['s_per_step'] * 1e3:.1f} ms/step"]
            if ref:
                parts_.append(f"{rate / ref:.2f}× reference")
            if flops:
                parts_.append(f"{flops / 1e9:.1f} GFLOP/image")
                parts_.append(f"MFU {flops * rate / peak:.1%}" if peak else "MFU –")
            if row.get("peak_gib") is not None:
                parts_.append(f"peak {row['peak_gib']:.1f} GiB")
            parts_.append(f"warm-up {row['warmup_s']:.0f} s")
            note = " (two full forward/backward passes, the official loop)" if mode == "reference" else ""
            rows.append([f"2. train {mode}, {label}{note}", ", ".join(parts_), "ok" if status == "ok" else status])
    return rows


def _head_rows(parts: str) -> list[list[str]]:
    """One row per C of head_scale.py's JSON: replicated vs Partial FC, step time and peak memory side by side."""
    data = _load(parts, "head")
    status = _status(parts, "head")
    if not data or not data.get("rows"):
        return [["5. head, replicated vs Partial FC", "–", status]]
    rows = []
    rate = data["sample_rate"]
    for row in data["rows"]:
        cells = []
        for kind, label in (("replicated", "replicated"), ("sampled", f"Partial FC {rate:.0%}")):
            got = row.get(kind) or {}
            if "s_per_step" not in got:
                cells.append(f"{label}: {got.get('missing', '–')}")
                continue
            mem = f", {got['peak_gb']:.2f} GB" if got.get("peak_gb") is not None else ""
            cells.append(f"{label}: {got['s_per_step'] * 1e3:.1f} ms/step{mem}")
        rep, smp = row.get("replicated") or {}, row.get("sampled") or {}
        if "s_per_step" in rep and "s_per_step" in smp:
            ratio = f"Partial FC/replicated {smp['s_per_step'] / rep['s_per_step']:.2f}× time"
            if rep.get("peak_gb") and smp.get("peak_gb") is not None:
                ratio += f", {smp['peak_gb'] / rep['peak_gb']:.2f}× memory"
            cells.append(ratio)
        where = data.get("gpu") or data["device"]
        rows.append(
            [
                f"5. head C = {row['classes']:,}, {data['precision']}, {where} (memory: {data['memory']})",
                "; ".join(cells),
                status,
            ]
        )
    return rows


def report(parts: str, outdir: str) -> None:
    dry = os.path.exists(os.path.join(parts, "dry_run"))
    info = _load(parts, "summary") or {}
    peak, peak_note = gpu_bench.peak_flops(info.get("gpu") or "")
    rows = [
        [
            "4. machine",
            f"{info.get('gpu') or 'no GPU'}; driver {info.get('driver')}; CUDA {info.get('cuda')}; "
            f"torch {info.get('torch')}; NCCL {info.get('nccl')}; deepspeed {info.get('deepspeed')}; timm {info.get('timm')}; "
            f"Python {info.get('python')}; {info.get('cpus')} CPUs",
            _status(parts, "summary"),
        ],
        ["4. configs", str(info.get("configs", "–")), _status(parts, "summary")],
    ]
    rows += _tests(parts, dry)
    rows += _train_rows(parts, peak)
    ev = _load(parts, "eval")
    rows.append(
        [
            "3. evaluation",
            f"{ev['num_query']} × {ev['num_gallery']}, D = {ev['dim']}, {ev['device']}: "
            f"{ev['seconds']:.3f} s (mAP {ev['metrics']['mAP']:.4f})"
            if ev
            else "–",
            _status(parts, "eval"),
        ]
    )
    ld = _load(parts, "loader")
    train = (_load(parts, "train_eager") or {}).get("modes", {}).get("exact", {}).get("images_per_s")
    margin = f", {ld['images_per_s'] / train:.2f}× training (exact, eager)" if ld and train else ""
    rows.append(
        [
            "3. loader",
            f"{ld['images_per_s']:.0f} images/s with {ld['workers']} workers{margin}" if ld else "–",
            _status(parts, "loader"),
        ]
    )
    rows += _head_rows(parts)
    header = (
        f"GPU check{' (DRY RUN: CPU, tiny sizes)' if dry else ''}; MFU against {peak_note}; FLOPs per image "
        "counted by torch.utils.flop_counter.FlopCounterMode on one eager iteration (both steps, forward and "
        "backward: matmuls, convolutions, attention; elementwise work not counted) divided by the batch."
    )
    lines = [header, "", "| step | result | status |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    os.makedirs(outdir, exist_ok=True)
    with open(os.path.join(outdir, "gpu_check.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    everything = {
        "dry_run": dry,
        "peak_flops": peak,
        "peak_note": peak_note,
        "rows": rows,
        "status": {
            n: _status(parts, n) for n in ("summary", "tests", "train_eager", "train_compile", "eval", "loader", "head")
        },
        **{n: _load(parts, n) for n in ("summary", "train_eager", "train_compile", "eval", "loader", "head")},
    }
    gpu_bench.write(os.path.join(outdir, "gpu_check.json"), everything)
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=["summary", "train", "eval", "loader", "report"])
    parser.add_argument("parts")
    parser.add_argument("outdir", nargs="?")
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    part = os.path.join(args.parts, f"{args.step}.json")
    if args.step == "summary":
        gpu_bench.timed(lambda: summary(), part)
    elif args.step == "train":
        part = os.path.join(args.parts, "train_compile.json" if args.compile else "train_eager.json")
        gpu_bench.timed(gpu_bench.train, part, dry=args.dry_run, compile=args.compile, part=part)
    elif args.step == "eval":
        gpu_bench.timed(gpu_bench.evaluation, part, dry=args.dry_run)
    elif args.step == "loader":
        workers = 1 if args.dry_run else os.cpu_count() or 1
        gpu_bench.timed(gpu_bench.loader, part, dry=args.dry_run, workers=workers)
    else:
        if not args.outdir:
            parser.error("report needs OUTDIR")
        report(args.parts, args.outdir)


if __name__ == "__main__":
    main()
