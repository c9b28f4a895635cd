"""dpm-dist: distributed training and evaluation of DPM (Dynamic Prototype Mask) for occluded ReID.

Importing the package initialises no process group and imports none of deepspeed, ray or hydra.
:func:`load_model` (``dpm_dist.deploy.loading``) is imported on first use, so ``import dpm_dist`` stays light.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_model"]


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from dpm_dist.deploy.loading import load_model

        return load_model
    raise AttributeError(f"module 'dpm_dist' has no attribute {name!r}")
