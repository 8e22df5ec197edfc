"""Result tables shared by ``pyro-bqn fit`` and ``pyro-bqn bench``.

Usage::

    >>> print(markdown_table(["method", "error"], [["bqn", "0.05"]]), end="")
    | method | error |
    | --- | --- |
    | bqn | 0.05 |
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["markdown_table", "metrics_row"]

#: The calibration metrics a results table shows, in order, with their column titles.
METRIC_COLUMNS = {"error": "test error", "nll": "NLL", "ece": "ECE", "mce": "MCE", "brier": "Brier"}


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table with ``header`` and one line per row (each as long as ``header``).

    :raises ValueError: if a row has another number of cells than the header.
    """
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row {list(row)} has {len(row)} cells for {len(header)} columns")
    lines = [header, ["---"] * len(header), *rows]
    return "".join("| " + " | ".join(line) + " |\n" for line in lines)


def metrics_row(name: str, report: Mapping[str, float], extra: Sequence[str] = ()) -> list[str]:
    """The cells of one predictive's row: ``name``, the :data:`METRIC_COLUMNS` of
    ``report`` (a :func:`~pyro_bqn.diagnostics.calibration_report`) to four decimals, then
    ``extra`` cells."""
    return [name, *(f"{report[key]:.4f}" for key in METRIC_COLUMNS), *extra]
