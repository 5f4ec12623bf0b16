"""The evaluation summary on the terminal: one aligned table per evaluator.

Rates (accuracies, recalls; any metric with a ``_chance`` or ``_majority`` entry) are
shown as percentages with their baselines beside them: chance (1/C, k/N) and, where
the evaluator reports it, the majority-class rate (what always answering the largest
class scores on an imbalanced set). Other numbers (a loss, counts) are shown as they are.
"""

from __future__ import annotations

import math

BASELINES = ("_chance", "_majority")
_RATE_WORDS = ("acc", "top", "recall", "R@")


def _is_rate(name: str, results: dict) -> bool:
    return any(f"{name}{b}" in results for b in BASELINES) or any(w in name for w in _RATE_WORDS)


def _cell(value, rate: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.1%}" if rate else f"{value:.4g}"


def rows(results: dict) -> list[tuple[str, str, str, str]]:
    """(metric, value, chance, majority) cells of the scalar metrics, in the results' order."""
    out = []
    for name, value in results.items():
        if name.endswith((*BASELINES, "_l2")) or isinstance(value, bool):
            continue
        if not isinstance(value, int | float):
            continue
        rate = _is_rate(name, results)
        out.append(
            (
                name,
                _cell(value, rate),
                _cell(results.get(f"{name}_chance"), True),
                _cell(results.get(f"{name}_majority"), True),
            )
        )
    return out


def print_table(title: str, results: dict) -> None:
    """The table of ``results`` under ``title``; the widest name and cell set the columns."""
    body = rows(results)
    header = ("metric", "value", "chance", "majority")
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(4)]
    cells = lambda r: (f"{c:>{w}}" for c, w in zip(r[1:], widths[1:], strict=True))
    line = lambda r: f"{r[0]:<{widths[0]}}  " + "  ".join(cells(r))
    print(f"\n{title}\n{line(header)}")
    for r in body:
        print(line(r))
    for attribute, report in results.get("prompt_sensitivity", {}).items():
        print(
            f"prompts ({attribute}): ensemble {report['ensemble']:.1%}, best single "
            f"{report['best_single']:.1%}, worst {report['worst_single']:.1%}, spread {report['spread']:.1%}"
        )
    print(flush=True)
