"""Masked ArcFace CE: the two-matmul form of dpm_dist.train.losses vs the official per-sample loop.

    .venv/bin/python benchmarks/masked_arcface.py --batch 64 --classes 702 --dim 768 --reps 15

Both run forward + backward (gradients into the features, the mask and the prototypes) on the same
inputs, interleaved in one process; the median time of each and their ratio are printed, with the
largest absolute difference of the logits, the loss and the gradients. The official loop is
``MArcface.forward`` of stone96123/DPM (loss/metric_learning.py): per sample, normalise W, multiply
by the mask, renormalise, dot with the normalised feature, and grow the result with ``torch.cat``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

from dpm_dist.train.losses import arcface_logits, masked_cosine


def official_logits(
    feat: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, margin: float, scale: float
) -> torch.Tensor:
    for i in range(feat.shape[0]):
        query_vector = F.normalize(feat[i, :].unsqueeze(0))
        gallery_prototype = mask[i, :].unsqueeze(0) * F.normalize(weight)
        cosine_single = F.linear(F.normalize(query_vector), F.normalize(gallery_prototype))
        cosine = cosine_single if i == 0 else torch.cat((cosine, cosine_single), 0)
    sine = torch.sqrt(1.0 - torch.pow(cosine, 2))
    phi = cosine * math.cos(margin) - sine * math.sin(margin)
    phi = torch.where(cosine > math.cos(math.pi - margin), phi, cosine - math.sin(math.pi - margin) * margin)
    one_hot = torch.zeros(cosine.size(), device=cosine.device).scatter_(1, labels.view(-1, 1).long(), 1)
    return scale * ((one_hot * phi) + ((1.0 - one_hot) * cosine))


def vectorised_logits(
    feat: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, margin: float, scale: float
) -> torch.Tensor:
    return arcface_logits(masked_cosine(feat, mask, weight), labels, margin=margin, scale=scale)


def run(fn, inputs: list[torch.Tensor], labels: torch.Tensor) -> tuple[float, torch.Tensor, list[torch.Tensor]]:
    """One forward + backward; returns (seconds, logits, grads)."""
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    sync = torch.cuda.synchronize if leaves[0].is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    logits = fn(*leaves, labels, 0.5, 30.0)
    F.cross_entropy(logits, labels).backward()
    sync()
    return time.perf_counter() - start, logits.detach(), [t.grad for t in leaves]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--classes", type=int, default=702)  # Occluded-Duke training identities
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    feat = torch.randn(args.batch, args.dim, generator=g)
    mask = torch.sigmoid(torch.randn(args.batch, args.dim, generator=g))
    weight = torch.empty(args.classes, args.dim)
    torch.nn.init.xavier_uniform_(weight, generator=g)
    inputs = [t.to(args.device) for t in (feat, mask, weight)]
    labels = torch.randint(args.classes, (args.batch,), generator=g).to(args.device)

    fns = {"official": official_logits, "vectorised": vectorised_logits}
    for fn in fns.values():  # warm-up
        run(fn, inputs, labels)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(args.reps):
        for name, fn in fns.items():
            times[name].append(run(fn, inputs, labels)[0])

    _, logits_o, grads_o = run(official_logits, inputs, labels)
    _, logits_v, grads_v = run(vectorised_logits, inputs, labels)
    loss_o, loss_v = (F.cross_entropy(z, labels) for z in (logits_o, logits_v))
    med = {name: statistics.median(t) for name, t in times.items()}
    print(
        f"device={args.device} threads={torch.get_num_threads()} B={args.batch} C={args.classes} D={args.dim} "
        f"reps={args.reps} (forward+backward, median)"
    )
    for name in fns:
        print(f"  {name:<10} {1e3 * med[name]:9.2f} ms")
    print(f"  speed-up (official / vectorised): {med['official'] / med['vectorised']:.1f}x")
    diffs = {"logits": logits_o - logits_v, "loss": loss_o - loss_v}
    diffs.update({f"grad {n}": a - b for n, a, b in zip(("feat", "mask", "W"), grads_o, grads_v)})
    print("  max |Δ| " + ", ".join(f"{n} {float(d.abs().max()):.2e}" for n, d in diffs.items()))


if __name__ == "__main__":
    main()
