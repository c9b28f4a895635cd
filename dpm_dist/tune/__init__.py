"""Hyper-parameter search: Ray Tune over α, β, m, s (and lr), each trial a Ray Train run of the training loop.

Owns the search (``search``: the only package that imports Ray) and its results table, CSV and best-config
preset (``results``). Must not import the command-line modules.
"""
