"""Build the API reference (HTML) from recframe's docstrings with pdoc: `make docs`.

Fails (exit 1) when pdoc cannot import a module or warns about the docs themselves (an
unresolvable annotation, a broken cross-reference), so CI catches a broken reference.
Third-party import-time warnings (torchrec, fbgemm) are not the reference's and pass.
"""

from __future__ import annotations

import os
import pkgutil
import sys
import warnings
from pathlib import Path

import pdoc
import pdoc.render

import recframe


def modules() -> list[str]:
    """Every recframe module, packages included, except the `python -m` entry point."""
    names = ["recframe"]
    for info in pkgutil.walk_packages(recframe.__path__, prefix="recframe."):
        if not info.name.endswith("__main__"):
            names.append(info.name)
    return sorted(names)


def main(out: str) -> int:
    pdoc_dir = os.path.dirname(pdoc.__file__)
    pdoc.render.configure(docformat="google", search=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pdoc.pdoc(*modules(), output_directory=Path(out))
    ours = [w for w in caught if str(w.filename).startswith(pdoc_dir)]
    for w in ours:
        print(f"api reference: {w.message}", file=sys.stderr)
    pages = sorted(Path(out).rglob("*.html"))
    print(f"api reference: {len(pages)} pages in {out}")
    return 1 if ours else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "build/api"))
