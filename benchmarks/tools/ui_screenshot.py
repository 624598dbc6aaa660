"""Open the MLflow UI of a results folder as a researcher does and photograph it: starts `fsbench
ui` (one process), measures how long it takes to answer and how much memory it holds, then takes
headless-Chromium screenshots of the URL it prints (the leaderboard: row runs by mIoU), of the
by-method view (cells grouped by method and shot) and of the compare view of two cells.
Prints the figures; the README's screenshots come from here.

    python -m fsbench.benchmarks.tools.ui_screenshot --results results --grid quickstart \\
        --out benchmarks/tools/figures
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _session(pid: int) -> list[int]:
    """PIDs of the live processes in the session `pid` leads (the UI and its children)."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[3]) == pid:
                members.append(int(entry))
    return members


def _rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def _shoot(
    browser: str, url: str, path: Path, size: str = "1600,1000", budget_ms: int = 20000
) -> None:
    subprocess.run(
        [
            browser,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--window-size={size}",
            f"--virtual-time-budget={budget_ms}",
            f"--screenshot={path}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=180,
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default="results")
    parser.add_argument("--grid", default="quickstart")
    parser.add_argument("--out", default="benchmarks/tools/figures")
    parser.add_argument("--browser", default=shutil.which("chromium") or "chromium")
    args = parser.parse_args(argv)
    results, out = Path(args.results).resolve(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    started = time.perf_counter()
    ui = subprocess.Popen(
        [sys.executable, "-m", "fsbench.benchmarks.cli", "ui", args.grid]
        + ["--results", str(results), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        line = ui.stdout.readline()
        while line and "open " not in line:  # "starting …", then the URL once it answers
            line = ui.stdout.readline()
        url = line.split("open ", 1)[1].split()[0]
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.2)
        answered = time.perf_counter() - started
        time.sleep(2)
        members = _session(ui.pid)
        print(
            f"UI answered in {answered:.1f} s; {len(members)} processes, "
            f"{_rss_bytes(members) / 2**20:.0f} MiB RSS; runs view: {url}"
        )
        _shoot(args.browser, url, out / "mlflow_runs.png")
        if "viewStateShareKey=leaderboard" in url:
            by_method = url.replace("viewStateShareKey=leaderboard", "viewStateShareKey=by-method")
            _shoot(args.browser, by_method, out / "mlflow_by_method.png")
            charts = url.replace("viewStateShareKey=leaderboard", "viewStateShareKey=charts")
            # (the chart cards load their metric histories after the page: more time)
            _shoot(args.browser, charts + "&compareRunsMode=CHART", out / "mlflow_charts.png",
                   "1600,1400", 60000)  # fmt: skip
        cells = _cell_runs(port, url)
        if len(cells) >= 2:
            experiment = url.split("/experiments/")[1].split("/")[0]
            compare = (
                f"http://127.0.0.1:{port}/#/compare-runs?runs={json.dumps(cells[:2])}"
                f"&experiments={json.dumps([experiment])}"
            ).replace(" ", "")
            _shoot(args.browser, compare, out / "mlflow_compare.png")
        print(f"screenshots: {', '.join(str(p) for p in sorted(out.glob('mlflow_*.png')))}")
    finally:
        for pid in _session(ui.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return 0


def _cell_runs(port: int, url: str) -> list[str]:
    """Ids of the first two cell runs of the experiment (through the tracking REST API)."""
    experiment = url.split("/experiments/")[1].split("/")[0]
    body = json.dumps(
        {
            "experiment_ids": [experiment],
            "filter": "tags.`fsbench.kind` = 'cell'",
            "max_results": 2,
            "order_by": ["metrics.miou DESC"],
        }
    ).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        runs = json.loads(response.read()).get("runs", [])
    return [run["info"]["run_id"] for run in runs]


if __name__ == "__main__":
    sys.exit(main())
