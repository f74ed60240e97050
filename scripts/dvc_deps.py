"""Keep every DVC stage's code dependencies equal to the code it runs.

Each stage of ``dvc.yaml`` depends on the project files its command imports when it runs (the shared core, its
stage module, its method's and terms' modules), so an edit of one method's module re-runs only that method's
stages. Which files those are is measured, not guessed: the default pipeline is run with tiny params (a few
rounds, one epoch) in a scratch copy whose code is the one that runs, every process recording the project modules
it imported (``tests/probe/sitecustomize.py``) under the stage DVC ran it for (``DVC_STAGE``; the records of a
stage's worker processes are merged into it).

    python scripts/dvc_deps.py            # measure (about 4 minutes on 2 cores) and report what differs
    python scripts/dvc_deps.py --write    # ... and rewrite the code deps in dvc.yaml

``tests/pipeline/test_e2e.py`` runs the same measurement inside its ``dvc repro`` test and fails when dvc.yaml misses a
file a stage imports or lists one it does not. Deps are files, never directories: DVC hashes everything in a
directory, so a file added to it later (a new task, a new method) would re-run stages that never import it. Stages
of one ``foreach`` share their deps: items that run different code belong in different stages. Frozen stages
(``prior``) never run here and keep their deps as written. What is measured is what the shrunk run imports: a
branch the tiny params never take (a registry name looked up only there) is not seen.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
CODE = ("dfkd_common", "stages")  # the project's own code, the only deps this script manages
PROBE = ROOT / "tests" / "probe"

#: the tiny params of a measuring run: every numeric param named here is capped at this value
SHRINK: dict[str, Any] = {
    "epochs": 1, "rounds": 1, "g_steps": 2, "batch_size": 32, "kd_steps": 2, "g_loops": 1, "warmup": 0,
    "warmup_epochs": 0, "warmup_loops": 1, "photo_crops": 60, "digits_variants": 1, "noise": 30,
    "num_select": 64, "iterations": 2, "sample_per_epoch": 16, "student_steps": 1, "sources": 8, "k": 1,
    "steps": 2,
}


def shrink(node: Any) -> Any:
    """``params.yaml`` with every :data:`SHRINK` param capped (the code paths stay those of the real run)."""
    if isinstance(node, dict):
        return {k: (min(v, SHRINK[k]) if k in SHRINK and isinstance(v, int | float) and not isinstance(v, bool)
                    else shrink(v)) for k, v in node.items()}
    return node


def env(log: Path | None = None, code: Path | None = None) -> dict[str, str]:
    """The environment of a measuring run: offline, no progress bars, this interpreter's tools first."""
    out = {**os.environ, "DFKD_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if log is not None and code is not None:  # the probe first, then ``code``: what DVC hashes is what runs
        path = os.pathsep.join([str(PROBE), str(code), os.environ.get("PYTHONPATH", "")])
        out.update({"PYTHONPATH": path.rstrip(os.pathsep), "DFKD_IMPORT_LOG": str(log), "DFKD_IMPORT_ROOT": str(code)})
    return out


def prepare(work: Path) -> None:
    """A scratch study in ``work`` (emptied first): the code, dvc.yaml, the shrunk params, the frozen prior's output."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for name in (*CODE, "priors"):  # priors/: the frozen prior stage's committed output
        shutil.copytree(ROOT / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", work / "dvc.yaml")
    shutil.copy(ROOT / ".dvcignore", work / ".dvcignore")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (work / "params.yaml").write_text(yaml.safe_dump(shrink(params)))
    for stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].values():
        for dep in (stage.get("do") or stage).get("deps") or []:
            path = work / str(dep)
            if str(dep).split("/")[0] in CODE and not path.exists():
                # a dep on a file that is gone (renamed, removed): an empty stand-in lets the measuring run
                # start, and the comparison reports it as a dep nothing imports (--write drops it)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()


def dvc(work: Path, *args: str, log: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["dvc", *args], cwd=work, env=env(log, work), capture_output=True, text=True, timeout=1800)


def stages(work: Path) -> dict[str, Any]:
    """Every stage of ``work``'s dvc.yaml by its name (``distill_cpnet@cpnet_wide``), foreach resolved."""
    from dvc.repo import Repo

    with Repo(str(work)) as repo:
        return {s.name: s for s in repo.index.stages}


def closures(log: Path) -> dict[str, set[str]]:
    """Stage name -> the project files its command imported (every process of the stage together)."""
    out: dict[str, set[str]] = {}
    for record in (json.loads(p.read_text()) for p in sorted(log.glob("*.json"))):
        if record.get("stage"):
            files = {f for f in record["files"] if f.split("/")[0] in CODE}
            out.setdefault(record["stage"].rsplit(":", 1)[-1], set()).update(files)
    return out


def python_files(path: Path) -> set[str]:
    """The ``.py`` files a dep on ``path`` (relative to the project) covers (a directory: all below it)."""
    full = ROOT / path
    if full.is_dir():
        return {str(p.relative_to(ROOT)) for p in full.rglob("*.py") if "__pycache__" not in p.parts}
    return {str(path)}


def code_deps(stage: Any) -> set[str]:
    """The project files a stage's deps cover (its code deps expanded to files)."""
    return set().union(*(python_files(Path(d.def_path)) for d in stage.deps
                         if Path(d.def_path).parts[:1] and Path(d.def_path).parts[0] in CODE))


def drift(work: Path, measured: dict[str, set[str]]) -> list[str]:
    """One line per stage whose code deps are not exactly what it imported (missing or not imported)."""
    problems = []
    for name, stage in stages(work).items():
        if stage.frozen:
            continue
        if name not in measured:
            problems.append(f"{name}: did not run (no recording)")
            continue
        have = code_deps(stage)
        missing, extra = sorted(measured[name] - have), sorted(have - measured[name])
        if missing:
            problems.append(f"{name}: imports but does not depend on {', '.join(missing)}")
        if extra:
            problems.append(f"{name}: depends on but does not import {', '.join(extra)}")
    return problems


def write(dvc_file: Path, measured: dict[str, set[str]]) -> None:
    """Rewrite the code deps of every measured stage in ``dvc_file`` (ruamel keeps its comments and layout)."""
    from ruamel.yaml import YAML

    rt = YAML()
    rt.preserve_quotes = True
    rt.width = 120
    rt.indent(mapping=2, sequence=4, offset=2)
    doc = rt.load(dvc_file.read_text())
    for group, spec in doc["stages"].items():
        names = [n for n in measured if n == group or n.startswith(f"{group}@")]
        if not names:
            continue
        wanted = {frozenset(measured[n]) for n in names}
        if len(wanted) > 1:
            raise SystemExit(f"{group}: its foreach items run different code; give them stages of their own")
        body = spec["do"] if "foreach" in spec else spec
        keep = [d for d in body.get("deps") or [] if str(d).split("/")[0] not in CODE]
        body["deps"] = keep + sorted(next(iter(wanted)))
    with dvc_file.open("w") as fh:
        rt.dump(doc, fh)


def measure(work: Path) -> tuple[dict[str, set[str]], subprocess.CompletedProcess[str]]:
    """Run the shrunk default pipeline in ``work`` with every process recording its imports."""
    prepare(work)
    log = work.parent / "imports"
    shutil.rmtree(log, ignore_errors=True)
    init = dvc(work, "init", "--no-scm", "-q")
    if init.returncode:
        raise RuntimeError(init.stderr)
    run = dvc(work, "repro", log=log)
    return closures(log), run


def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="rewrite dvc.yaml's code deps with what was measured")
    ap.add_argument("--keep", type=Path, help="measure in this folder and keep it (default: a temporary one)")
    args = ap.parse_args(list(argv) if argv is not None else None)
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        measured, run = measure(base / "study")
        if run.returncode:
            print(run.stdout[-3000:], run.stderr[-3000:], file=sys.stderr)
            return 1
        if args.write:
            write(ROOT / "dvc.yaml", measured)
            shutil.copy(ROOT / "dvc.yaml", base / "study" / "dvc.yaml")
        problems = drift(base / "study", measured)
    print("\n".join(problems) if problems else "every stage depends on exactly the code it runs")
    return 1 if problems else 0


if __name__ == "__main__":
    raise SystemExit(main())
