"""Test-side fault injection for the real commands, run in subprocesses (never imported by the product).

A test that needs a fault inside ``dpm-train``, torchrun ranks or Ray trial workers puts this folder on
``PYTHONPATH`` and names the faults in ``DPM_TEST_FAULTS`` (comma-separated): Python imports ``sitecustomize``
at interpreter start, and this one imports ``tests/faults/fault_<name>.py`` for each name. Each such module
patches the product from outside (wrapping a function or method) and reads its own parameters from further
environment variables. The product carries no test hooks; ``tests/conftest.py`` builds the environment
(``fault_env``).
"""

import importlib
import os

for _name in filter(None, (part.strip() for part in os.environ.get("DPM_TEST_FAULTS", "").split(","))):
    importlib.import_module(f"fault_{_name}")
