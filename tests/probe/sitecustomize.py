"""Records which project modules a process imported, for ``scripts/dvc_deps.py`` (which puts this folder first on
``PYTHONPATH`` of a measuring run, in ``tests/pipeline/test_e2e.py`` and when a developer measures or rewrites deps).

At exit, every Python process started with ``DFKD_IMPORT_LOG=DIR`` writes ``DIR/<pid>.json``: the DVC stage it ran
for (``DVC_STAGE``, which DVC sets for every stage command and its children), its command line, and the files under
``DFKD_IMPORT_ROOT`` among its loaded modules, relative to that root. Without ``DFKD_IMPORT_LOG`` it does nothing.
"""

import atexit
import json
import os
import sys


def _dump() -> None:
    log, root = os.environ.get("DFKD_IMPORT_LOG"), os.environ.get("DFKD_IMPORT_ROOT")
    if not log or not root:
        return
    root = os.path.realpath(root)
    files = set()
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path:
            real = os.path.realpath(path)
            if real.startswith(root + os.sep):
                files.add(os.path.relpath(real, root))
    os.makedirs(log, exist_ok=True)
    with open(os.path.join(log, f"{os.getpid()}.json"), "w") as fh:
        json.dump({"stage": os.environ.get("DVC_STAGE"), "argv": sys.argv, "files": sorted(files)}, fh)


atexit.register(_dump)
