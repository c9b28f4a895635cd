"""Worker of tests/test_invariance.py, run under ``torchrun --nproc-per-node R`` (R = 1, 2, 3).

For each variant (``zero<k>:<classifier>``) it trains as ``dpm-train`` does (the config composed from overrides,
:func:`dpm_dist.config.for_world_size`, the loop's model build and seeding, the exact sampler's loader with every
augmentation, the engine's steps) for a few steps of one epoch, then writes, on rank 0, ``<out>/<variant>.pt``: the
metrics every step returned (what the loop logs), the whole model state (weights, the BN running statistics, all
of W) and the whole optimiser state (momentum of every parameter, gathered from the ZeRO partitions and the head's
shards), keyed by parameter name.
"""

from __future__ import annotations

import argparse
import os
import sys
from itertools import islice

import torch

STEPS = 5
GLOBAL_IDS = 6  # P of the global batch (× K = 2): 12 images, shared by 1, 2 or 3 ranks
OVERRIDES = [
    "model=vit_tiny",
    "model.img_size=[64,32]",
    "model.stride=[6,6]",
    "model.patch_size=8",
    "model.drop_path=0.1",
    "data.img_size=[64,32]",
    f"data.global_num_ids={GLOBAL_IDS}",
    "data.num_instances=2",
    "data.num_workers=0",
    "data.sampler=exact",
    "data.flip_prob=0.5",
    "data.padding=4",
    "data.erase_prob=0.5",
    "data.color_jitter=true",
    "optim.name=sgd",
    "optim.base_lr=0.001",
    "optim.epochs=1",
    "optim.warmup_epochs=0",
    "optim.min_lr_factor=1.0",  # a constant lr: the one epoch is not the cosine's floor
    "engine.precision=fp32",
    "engine.update_mode=exact",
    "loss.hem_ref_batch=12",
]


def _zero_momentum(ds_engine, p: torch.nn.Parameter) -> torch.Tensor:
    """``p``'s whole momentum from a ZeRO-1/2 engine's flat partitions: each rank's fragment, summed over ranks."""
    from dpm_dist import dist

    zopt = ds_engine.optimizer
    full = torch.zeros(p.numel())
    mapping = p._hp_mapping
    if mapping is not None:
        group = next(g for g, params in enumerate(zopt.bit16_groups) if any(q is p for q in params))
        flat = zopt.single_partition_of_fp32_groups[group]
        state = zopt.optimizer.state[flat]["momentum_buffer"]
        lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
        full.narrow(0, lp.start, lp.numel).copy_(state.narrow(0, hp.start, hp.numel))
    return dist.all_reduce_sum(full).view_as(p)


def _optimizer_state(engine) -> dict[str, torch.Tensor]:
    """Every parameter's momentum by name, whole (ZeRO-1/2: gathered from the partitions; collective)."""
    out: dict[str, torch.Tensor] = {}
    for ds_engine, opt, module, prefix in (
        (engine.main, engine.opt_main, engine.model, ""),
        (engine.mask, engine.opt_mask, engine.model.mask_gen, "mask_gen."),
    ):
        for name, p in module.named_parameters():
            if not p.requires_grad or (prefix == "" and name.startswith("mask_gen.")):
                continue
            if engine.options.zero_stage > 0:
                state = _zero_momentum(ds_engine, p)
            else:
                state = opt.state.get(p, {}).get("momentum_buffer")
            if state is not None:
                out[prefix + name] = state.detach().clone().cpu()
    head = getattr(engine.head, "optimizer", None)
    if head is not None:  # the sharded head: each rank's rows, in rank order
        from dpm_dist import dist

        rows = head.state[engine.head.weight]["momentum_buffer"].detach().cpu()
        out["classifier.weight"] = torch.cat(dist.all_gather_objects(rows))
    return out


def run(variant: str, shards: str, switch: str, env, extra: tuple[str, ...] = ()) -> dict:
    from dpm_dist.cli.common import compose_config
    from dpm_dist.config import for_world_size
    from dpm_dist.data.loader import TrainLoader, load_manifest
    from dpm_dist.train.loop import build_engine, seed_everything

    zero, classifier = variant.split(":")
    cfg = compose_config(
        [
            *OVERRIDES,
            f"data.root={shards}",
            f"engine.zero_stage={zero.removeprefix('zero')}",
            f"model.classifier={classifier}",
            f"engine.invariant={switch}",
            *extra,
        ]
    )
    cfg = for_world_size(cfg, env.world_size)  # as the loop's _run
    manifest = load_manifest(cfg.data)
    engine = build_engine(cfg, env, manifest)
    seed_everything(cfg.engine.seed * 1000 + env.rank + 7919)  # the loop's per-rank RNG (today's drop-path draws)
    loader = TrainLoader(cfg.data, env, seed=cfg.engine.seed, sample_keyed=cfg.engine.invariant == "on")
    engine.start_epoch(1)
    metrics = [engine.step(batch) for batch in islice(iter(loader.epoch(1)), STEPS)]
    assert len(metrics) == STEPS, f"the epoch has only {len(metrics)} steps"
    state = engine.model_state()  # collective: all of W on rank 0
    optim = _optimizer_state(engine)  # collective
    return {"metrics": metrics, "state": state, "optim": optim, "world_size": env.world_size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--shards", required=True)
    parser.add_argument("--switch", default="on", help="engine.invariant")
    parser.add_argument("--override", action="append", default=[], help="one more config override (repeatable)")
    parser.add_argument("variants", nargs="+", help="zero<k>:<replicated|sharded>")
    args = parser.parse_args(argv)
    from dpm_dist.dist import DistEnv, init_process_group

    torch.set_num_threads(1)
    env = DistEnv.from_env()
    init_process_group(env)
    for variant in args.variants:
        result = run(variant, args.shards, args.switch, env, tuple(args.override))
        if env.is_main:
            torch.save(result, os.path.join(args.out, variant.replace(":", "_") + ".pt"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
