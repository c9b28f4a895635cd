"""Evaluation: exactly-once extraction, gathering, masked retrieval, metrics, re-ranking and pictures.

Owns the rows an evaluation passes around (``embeddings``), the distributed evaluator (``evaluator``), masked
cosine and CMC/mAP/mINP as pure tensor functions (``retrieval``), k-reciprocal re-ranking (``rerank``, dense;
``rerank_sparse``, from k-NN lists), gallery-sharded exact evaluation (``sharded``), per-query top-k lists
(``topk``), the pictures of an evaluation (``pictures``) and evaluating a model file end to end (``run``).

Must not import DeepSpeed, Ray, the training package or the command-line modules.
"""
