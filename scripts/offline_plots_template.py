"""Build ``assets/dvc_plots/offline.html``: DVC's plots page with Vega, Vega-Lite and Vega-Embed inside it.

Why: ``dvc plots show`` writes a page that loads these three libraries from a CDN, so offline (the way dfkd is
meant to run) it is blank. DVC takes an HTML template (``.dvc/config``: ``[plots] html_template``) whose
``{plot_divs}`` it fills; this one carries the libraries itself, at the versions DVC's own page asks for, and no
``{scripts}`` placeholder, so nothing is fetched. The libraries come from their npm packages (BSD-3-Clause, the
Interactive Data Lab of the University of Washington; the notices are kept in the page). Run it again to change
versions: ``python scripts/offline_plots_template.py`` (needs npm and its registry, once; the page is committed).
"""

from __future__ import annotations

import subprocess
import tarfile
import tempfile
from pathlib import Path

PACKAGES = {"vega": "5.20.2", "vega-lite": "5.2.0", "vega-embed": "6.18.2"}  # dvc_render's CDN versions
OUT = Path(__file__).resolve().parents[1] / "assets" / "dvc_plots" / "offline.html"

PAGE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>dfkd: DVC plots</title>
<!-- Vega {versions}: inlined from their npm packages by scripts/offline_plots_template.py, so this page needs no
network. Each library is BSD-3-Clause licensed; its notice follows.
{licenses}
-->
{libraries}
<style>body {{ font-family: sans-serif; }} table {{ border-spacing: 15px; }}</style>
</head>
<body>
{{plot_divs}}
</body>
</html>
"""


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        libraries, licenses = [], []
        for name, version in PACKAGES.items():
            subprocess.run(["npm", "pack", "--silent", f"{name}@{version}"], cwd=tmp, check=True,
                           capture_output=True)
            with tarfile.open(Path(tmp) / f"{name}-{version}.tgz") as tar:
                code = tar.extractfile(f"package/build/{name}.min.js").read().decode()  # type: ignore[union-attr]
                notice = tar.extractfile("package/LICENSE").read().decode()  # type: ignore[union-attr]
            if "</script" in code:
                raise SystemExit(f"{name}.min.js holds '</script': it cannot be inlined as it is")
            libraries.append(f'<script type="text/javascript">/* {name} {version} */\n{code}\n</script>')
            licenses.append(f"{name} {version}:\n{notice.replace('--', '- -')}")
    versions = ", ".join(f"{n} {v}" for n, v in PACKAGES.items())
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(PAGE.format(versions=versions, licenses="\n".join(licenses), libraries="\n".join(libraries)))
    print(f"{OUT} ({OUT.stat().st_size / 1e6:.2f} MB): {versions}")


if __name__ == "__main__":
    main()
