"""Training: the two-step DPM update on DeepSpeed, losses, optimisers, checkpoints and the loop.

Owns the engine (``engine``: the two-step update, built by ``DPMEngine.from_config``, and its own part of a
checkpoint), the one interface of the prototype head (``heads``: replicated, or ``sharded_head``'s rows per rank),
the ZeRO state on another world size (``zero_reshard``; with ``engine``, the only modules that import DeepSpeed),
what makes R ranks train one rank's model (``invariant``: global BatchNorm, sample-keyed drop-path),
the loss terms as pure functions (``losses``), optimisers and the learning-rate schedule
(``optim``), full-state checkpoints (``checkpoint``), ``train()`` itself (``loop``: build -> resume ->
epochs -> evaluate -> save, read top to bottom) and the run's state it carries (``state``: ``RunState``, saved
in checkpoints, written into model files and results.json, returned by ``train()``), and the one-live-run lock
of a run folder (``run_lock``).

Must not import Ray or the command-line modules.
"""
