"""Make the repository root and this folder importable when pytest runs from a checkout."""

import pathlib
import sys

_HERE = pathlib.Path(__file__).resolve().parent
for p in (_HERE.parents[1], _HERE):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
