"""Model: the DPM network and its weights, as pure torch.

Owns ``DPMNet`` (``dpm``: timm ViT with overlapping patches and SIE, the Hierarchical Mask Generator, the
HEM attention logits, BNNeck, prototypes), loading ImageNet and official DPM weights (``weights``), the
official-checkpoint converter (``convert``) and model files (``files``: how a model file is written, found,
read and loaded; the one module for that, used by training, ``dpm-eval`` and ``dpm_dist.load_model``).

Must not import ``torch.distributed``, DeepSpeed, the config schema (``dpm_dist.config``) or anything from
``data``, ``train``, ``eval``, ``tune`` or ``cli``: constructors take explicit arguments.
"""
