"""Check that ``dvc plots show`` writes a page that renders with the network off, and keep a screenshot.

    python scripts/check_plots_offline.py [--out docs/plots_offline.png]   # after `dvc repro` (the plots' data)

Runs ``dvc plots show`` in the project (its page template, ``assets/dvc_plots/offline.html``, carries Vega itself),
opens the page in headless Chromium with every host name unresolvable (so nothing can load from the network),
screenshots it and fails unless the charts drew: a blank page is one colour, drawn charts have lines and text in
many. Needs Chromium (Debian: ``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "plots_offline.png")
    args = ap.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        print("no Chromium on PATH (apt-get install chromium)", file=sys.stderr)
        return 2
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["dvc", "plots", "show", "-o", "dvc_plots"], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    page = ROOT / "dvc_plots" / "index.html"
    html = page.read_text()
    if "cdn.jsdelivr" in html or "<script src=" in html:
        print(f"{page} loads scripts from the network", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND",
                        "--virtual-time-budget=10000", "--window-size=1300,2400",
                        f"--screenshot={args.out}", page.as_uri()], check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(args.out).convert("RGB"))
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    inked = float((pixels.mean(axis=2) < 200).mean())
    print(f"{args.out}: {pixels.shape[1]}x{pixels.shape[0]}, {colours} colours, {100 * inked:.1f} % inked")
    if colours < 20 or inked < 0.005:
        print("the page is blank: the charts did not draw", file=sys.stderr)
        return 1
    rows = np.nonzero((pixels < 250).any(axis=(1, 2)))[0]
    Image.fromarray(pixels[: rows[-1] + 20]).save(args.out)  # the charts, without the window's empty bottom
    return 0


if __name__ == "__main__":
    sys.exit(main())
