"""``dpm-train``: the Hydra entry point. The same command runs under any launcher.

    dpm-train                                   # the CPU demo (experiment=tiny on the synthetic shards)
    dpm-train experiment=occluded_duke engine=zero1_fp16 model.pretrained=/path/jx_vit_base_p16_224-80ecf9dd.pth
    torchrun --nproc-per-node 8 -m dpm_dist.cli.train experiment=occluded_duke
    deepspeed --hostfile launch/hostfile --module dpm_dist.cli.train experiment=occluded_duke

Re-running the same command resumes from ``<log.output_dir>/checkpoints/latest``.
"""

from __future__ import annotations

import json
import os
from typing import Any

from dpm_dist.cli.common import CONFIG_NAME, CONFIG_PATH, check_local_inputs, resolve_paths, run_guarded

PROG = "dpm-train"


def run_training(cfg_node: Any) -> dict[str, float]:
    """Validate the composed config, join the process group, train, and return the final metrics."""
    from dpm_dist.config import to_config
    from dpm_dist.dist import DistEnv, init_process_group
    from dpm_dist.train.loop import train

    cfg = resolve_paths(to_config(cfg_node))
    check_local_inputs(cfg)  # before any process group or model
    env = DistEnv.from_env()
    init_process_group(env)
    results = train(cfg, env)
    if env.is_main:
        tb = os.path.join(cfg.log.output_dir, "tb")
        print(json.dumps({"results": results, "tensorboard": tb}), flush=True)
        if results:
            print(f"rank-1 {results['rank1']:.1%}  mAP {results['mAP']:.1%}  ({int(results['num_query'])} queries, "
                  f"{int(results['num_gallery'])} gallery images)   TensorBoard: tensorboard --logdir {tb}", flush=True)
    return results


def main() -> None:
    import hydra

    from dpm_dist.config import register_configs

    register_configs()
    def task(cfg_node: Any) -> None:
        run_guarded(PROG, lambda: run_training(cfg_node))

    hydra.main(config_path=CONFIG_PATH, config_name=CONFIG_NAME, version_base="1.3")(task)()


if __name__ == "__main__":
    main()
