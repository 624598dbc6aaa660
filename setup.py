"""Maps the top-level code folders onto the `fsbench.*` namespace (metadata lives in pyproject)."""

import os

from setuptools import setup

FOLDERS = ("methods", "datasets", "benchmarks")


def computed_packages():
    """Every folder holding Python files under the mapped roots, as an `fsbench.` package name."""
    packages = []
    for root in FOLDERS:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))
            if any(name.endswith(".py") for name in filenames):
                packages.append("fsbench." + dirpath.replace(os.sep, "."))
    return packages


setup(
    # `fsbench` itself is the small public API in fsbench/ (run, register_method, …).
    packages=["fsbench", *computed_packages()],
    package_dir={"fsbench": "fsbench", **{f"fsbench.{root}": root for root in FOLDERS}},
    package_data={
        "fsbench.benchmarks": ["configs/*.yaml", "reported.yaml"],
        "fsbench.datasets": ["lists/*/*/*.txt", "lists/*/*/*/*.txt", "lists/*/*/*.json.gz"],
    },
)
