"""Data: dataset folders -> shards -> identity-balanced P×K batches and exactly-once eval streams.

Owns the dataset layouts (``layouts``), reading from local disk, HTTP(S) and S3 (``storage``), the shard
format and its manifest (``shards``), the synthetic occluded-person set (``synth``), P×K batch formation
(``sampling``), the image transforms (``transforms``), the training and evaluation sets a config names
(``manifest``: manifests merged, shard lists), exact mode's local shard copies and sample index (``shard_cache``),
the webdataset pipelines and the per-run training loader (``loader``) and several datasets trained as one
(``union``: label and camera offsets, the union's manifest).

Must not import model code (``dpm_dist.model``), the engine, the evaluator, Ray or DeepSpeed.
"""
