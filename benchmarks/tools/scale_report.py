"""The scale benchmark's printed table and plot (benchmarks/tools/scale.py)."""

from __future__ import annotations

from pathlib import Path

from fsbench.benchmarks.report.figures import _style, save_figure


def plot(results: list[dict], path: Path) -> None:

    plt = _style()
    sizes = [r["cells"] for r in results]
    fig, (left, right) = plt.subplots(1, 2, figsize=(7, 2.8))
    left.plot(sizes, [r["makespan_s"] for r in results], "o-", color="black", label="makespan")
    left.plot(sizes, [r["ideal_s"] for r in results], "s--", color="grey", label="ideal")
    left.set_xscale("log")
    left.set_xlabel("cells")
    left.set_ylabel("seconds")
    left.legend(frameon=False)
    right.plot(sizes, [r["driver_ms"] for r in results], "o-", color="black", label="driver CPU")
    right.plot(sizes, [r["mlflow_ms"] for r in results], "s--", color="grey", label="MLflow")
    right.set_xscale("log")
    right.set_xlabel("cells")
    right.set_ylabel("ms per cell")
    right.legend(frameon=False)
    gpus = int(results[0]["gpus"])
    fig.suptitle(f"Simulated cluster: {gpus} GPUs, stand-in method", fontsize=10)
    save_figure(fig, path)
    plt.close(fig)


def _row(r: dict) -> str:
    return (
        f"{r['cells']:>6} cells: makespan {r['makespan_s']:.0f} s (ideal {r['ideal_s']:.0f} s, "
        f"{r['ratio']:.2f}x), GPU use {r['utilisation']:.0%}"
        + (" [node killed]" if r.get("node_killed") else "")
    )


_COLUMNS = (  # (heading, key, format): the printed table
    ("tracking", "tracking", "<9"), ("cells", "cells", ">6"), ("makespan", "makespan_s", ">10.1f"),
    ("ideal", "ideal_s", ">8.1f"), ("ratio", "ratio", ">7.2f"), ("GPU use", "utilisation", ">9.0%"),
    ("driver ms", "driver_ms", ">11.1f"), ("mlflow ms", "mlflow_ms", ">11.1f"),
    ("lag s", "lag_s", ">7.1f"), ("cells/s", "cells_per_s", ">9.1f"),
    ("RSS GB", "peak_rss_gb", ">8.2f"), ("enc/img", "encodings_per_image", ">9.2f"),
    ("lost", "lost", ">6"), ("dup", "duplicated", ">5"), ("search s", "search_s", ">10.2f"),
    ("sync s", "sync_s", ">8.2f"), ("report s", "report_s", ">10.1f"),
)  # fmt: skip


def _table(results: list[dict]) -> str:
    head = "".join(f"{name:{spec.split('.')[0].rstrip('%')}}" for name, _, spec in _COLUMNS)
    lines = [head]
    for r in results:
        lines.append("".join(f"{r.get(key, ''):{spec}}" for _, key, spec in _COLUMNS))
    return "\n".join(lines)
