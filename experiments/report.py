"""Writing an experiment's outputs: results.md, results.csv, configs.json and plot.png."""

from __future__ import annotations

import csv
import json
import os
from typing import Callable, Optional, Sequence


def write_report(out: str, *, markdown: str, header: Sequence[str], rows: Sequence[Sequence],
                 configs: dict, plot: Optional[Callable] = None) -> None:
    """`plot(plt)` draws and returns a matplotlib figure; skipped when matplotlib is absent."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown.rstrip("\n") + "\n")
    with open(os.path.join(out, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    with open(os.path.join(out, "configs.json"), "w") as f:
        json.dump(configs, f, indent=1, default=str)
    if plot is None:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig = plot(plt)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "plot.png"), dpi=120)
    plt.close(fig)
