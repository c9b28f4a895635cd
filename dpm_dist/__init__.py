"""dpm-dist: distributed training and evaluation of DPM (Dynamic Prototype Mask) for occluded ReID.

Importing the package initialises no process group and imports none of deepspeed, ray or hydra.
"""

__version__ = "0.1.0"
