"""Re-run a notebook on the real SmolLM2 and store its outputs in place (what is committed):

    python notebooks/execute.py notebooks/quality.ipynb [--timeout 900]

Pushing stays off (``HFCOMPRESS_NOTEBOOK_PUSH`` is removed from the environment), the model is the
default (``HFCOMPRESS_NOTEBOOK_MODEL`` removed), and the notebook runs in a scratch directory.
The notebook file is replaced only when every cell ran (atomically, through a temporary file).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import nbformat
from nbclient import NotebookClient


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("notebook")
    ap.add_argument("--timeout", type=int, default=900, help="seconds per cell (default: 900)")
    args = ap.parse_args()
    for var in ("HFCOMPRESS_NOTEBOOK_PUSH", "HFCOMPRESS_NOTEBOOK_MODEL"):
        os.environ.pop(var, None)
    nb = nbformat.read(args.notebook, as_version=4)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hfcompress-notebook-run-") as cwd:
        NotebookClient(nb, timeout=args.timeout, kernel_name="python3",
                       resources={"metadata": {"path": cwd}}).execute()
    tmp = args.notebook + ".tmp"
    nbformat.write(nb, tmp)
    os.replace(tmp, args.notebook)
    print(f"{args.notebook}: executed in {time.perf_counter() - t0:.0f} s, outputs stored")


if __name__ == "__main__":
    main()
