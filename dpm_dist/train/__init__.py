"""Training: the two-step DPM update on DeepSpeed, losses, optimisers, checkpoints and the loop.

Owns the engine (``engine``: the only module that imports DeepSpeed, including the ZeRO state
resharding), the loss terms as pure functions (``losses``), optimisers and the learning-rate schedule
(``optim``), full-state checkpoints (``checkpoint``) and ``train()`` itself (``loop``: build -> resume ->
epochs -> evaluate -> save, read top to bottom).

Must not import Ray or the command-line modules.
"""
