"""Model: the DPM network and its weights, as pure torch.

Owns ``DPMNet`` (``dpm``: timm ViT with overlapping patches and SIE, the Hierarchical Mask Generator, the
HEM attention logits, BNNeck, prototypes), loading ImageNet and official DPM weights (``weights``), the
official-checkpoint converter (``convert``) and our model files (``files``).

Must not import ``torch.distributed``, DeepSpeed, the config schema (``dpm_dist.config``) or anything from
``data``, ``train``, ``eval``, ``tune`` or ``cli``: constructors take explicit arguments.
"""
