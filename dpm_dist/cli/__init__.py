"""Command-line entry points, one thin module per command: parse, resolve paths, call the library, print.

``train`` (dpm-train), ``eval`` (dpm-eval), ``tune`` (dpm-tune), ``shards`` (dpm-shards), ``convert``
(dpm-convert), ``export`` (dpm-export), ``embed`` (dpm-embed), ``search`` (dpm-search), ``report``
(dpm-report); ``common`` finds the shipped configs and turns user errors into one-line messages.
Nothing outside this package imports it.
"""
