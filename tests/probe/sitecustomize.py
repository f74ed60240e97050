"""Records which project modules a process imported (tests/test_dvc_deps.py puts this folder on PYTHONPATH).

At exit, every Python process started with ``DFKD_IMPORT_LOG=DIR`` writes ``DIR/<pid>.json``: its command line
and the project files (paths relative to ``DFKD_IMPORT_ROOT``) among its loaded modules. Runs only in tests.
"""

import atexit
import json
import os
import sys


def _dump() -> None:
    log, root = os.environ.get("DFKD_IMPORT_LOG"), os.environ.get("DFKD_IMPORT_ROOT")
    if not log or not root:
        return
    files = set()
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path and os.path.abspath(path).startswith(root + os.sep):
            files.add(os.path.relpath(os.path.abspath(path), root))
    os.makedirs(log, exist_ok=True)
    with open(os.path.join(log, f"{os.getpid()}.json"), "w") as fh:
        json.dump({"argv": sys.argv, "files": sorted(files)}, fh)


atexit.register(_dump)
