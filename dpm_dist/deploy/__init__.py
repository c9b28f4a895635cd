"""Deployment: a trained model outside the training system.

Owns the one-call loader (``loading``: ``dpm_dist.load_model``, the inference wrapper around
:mod:`dpm_dist.model.files`), ONNX and TorchScript export (``export``),
embedding images to a Parquet file (``embed``, the library part of ``dpm-embed``) and top-k search between
two such files (``search``, the library part of ``dpm-search``). It reuses ``model``, ``data`` and ``eval``.

Must not import ``train``, ``tune`` or ``cli``, DeepSpeed, Ray or Hydra: a deployment installs none of them
at run time (onnx, onnxscript and onnxruntime come with the optional ``deploy`` extra and load lazily).
"""
