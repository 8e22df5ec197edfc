"""Draw the headline figure of the benchmark from the tables in docs/benchmarks.md.

Run by ``make docs``: ``python docs/_ext/benchmark_figure.py`` reads the first two tables of
``docs/benchmarks.md`` whose header starts ``| method | test error | NLL |`` (the MLP and the
CNN runs of ``pyro-bqn bench``, mean ± std over seeds) and writes
``docs/figures/benchmark_headline.png``: test NLL against test error per method, with the
standard deviations as error bars and each method's bits per weight. The figure therefore
shows exactly the numbers the benchmarks page states, with the commands that produced them.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from matplotlib.figure import Figure

DOCS = Path(__file__).resolve().parent.parent
HEADER = re.compile(r"^\|\s*method\s*\|\s*test error\s*\|\s*NLL\s*\|")
BAYESIAN_METHODS = {"bqn", "mc-elbo", "lr-discrete", "bayesbinn", "gaussian-bnn"}
PANELS = ("MLP 784-512-256-10", "CNN (8-16-64, LeNet layout)")


def read_tables(markdown: str) -> list[list[dict[str, str]]]:
    """Every table whose header matches ``HEADER``, as a list of rows (column → cell)."""
    tables, lines = [], markdown.splitlines()
    for i, line in enumerate(lines):
        if not HEADER.match(line):
            continue
        columns = [cell.strip() for cell in line.strip("|").split("|")]
        rows = []
        for row in lines[i + 2 :]:
            if not row.startswith("|"):
                break
            rows.append(
                dict(zip(columns, (c.strip() for c in row.strip("|").split("|")), strict=True))
            )
        tables.append(rows)
    return tables


def mean_std(cell: str) -> tuple[float, float]:
    """``"0.0560 ± 0.0052"`` → ``(0.056, 0.0052)``."""
    mean, _, std = cell.partition("±")
    return float(mean), float(std or 0.0)


def headline_figure(tables: list[list[dict[str, str]]]) -> Figure:
    fig = Figure(figsize=(10, 4.2), layout="constrained")
    axes = fig.subplots(1, len(tables), sharey=False)
    for ax, rows, title in zip(axes, tables, PANELS, strict=True):
        placed: list[tuple[float, float]] = []
        errors = [100 * mean_std(row["test error"])[0] for row in rows]
        nlls = [mean_std(row["NLL"])[0] for row in rows]
        span = (max(errors) - min(errors) or 1.0, max(nlls) - min(nlls) or 1.0)
        for row in rows:
            error, error_std = mean_std(row["test error"])
            nll, nll_std = mean_std(row["NLL"])
            bayesian = row["method"] in BAYESIAN_METHODS
            ax.errorbar(
                100 * error,
                nll,
                xerr=100 * error_std,
                yerr=nll_std,
                fmt="o" if bayesian else "s",
                color="C0" if row["method"] == "bqn" else "0.45",
                markersize=8 if row["method"] == "bqn" else 5,
                capsize=2,
            )
            # A label near an earlier one goes below its point instead of above.
            crowded = any(
                abs(100 * error - x) < 0.15 * span[0] and abs(nll - y) < 0.05 * span[1]
                for x, y in placed
            )
            placed.append((100 * error, nll))
            ax.annotate(
                f"{row['method']} ({row['bits/weight']} bit)",
                (100 * error, nll),
                textcoords="offset points",
                xytext=(6, -12 if crowded else 4),
                fontsize=8,
                weight="bold" if row["method"] == "bqn" else "normal",
            )
        ax.set_title(title)
        ax.set_xlabel("test error (%)")
        ax.set_ylabel("test NLL (nats)")
        ax.grid(alpha=0.3)
    fig.suptitle(
        "pyro-bqn bench on the MNIST subset (mean ± std over 3 seeds; circles: Bayesian methods)"
    )
    return fig


def main() -> int:
    tables = read_tables((DOCS / "benchmarks.md").read_text(encoding="utf-8"))[: len(PANELS)]
    if len(tables) != len(PANELS) or not all(tables):
        print(f"docs/benchmarks.md: expected {len(PANELS)} results tables, found {len(tables)}")
        return 1
    out = DOCS / "figures" / "benchmark_headline.png"
    out.parent.mkdir(exist_ok=True)
    headline_figure(tables).savefig(out, dpi=120)
    print(f"wrote {out.relative_to(DOCS.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
