"""Map fastmdm.kernels to the sibling kernels/ directory where nothing else provides it.

Installs ship kernels/ as fastmdm.kernels (pyproject's package-dir; an editable install maps it
too), but a source tree's fastmdm/ imported ahead of a regular install (Python started in the
repository root) has no fastmdm/kernels/ of its own. Imported first by fastmdm/__init__.py.
"""

from __future__ import annotations

import importlib.util
import os
import sys

PACKAGE = __name__.rpartition(".")[0]


def map_source_kernels() -> None:
    """Register ../kernels as ``fastmdm.kernels`` unless the import system already finds it."""
    if importlib.util.find_spec(f"{PACKAGE}.kernels") is not None:
        return
    root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    init = os.path.join(root, "__init__.py")
    if not os.path.isfile(init):
        return
    spec = importlib.util.spec_from_file_location(f"{PACKAGE}.kernels", init,
                                                  submodule_search_locations=[root])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    sys.modules[PACKAGE].kernels = module


map_source_kernels()
