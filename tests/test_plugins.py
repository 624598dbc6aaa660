"""A researcher's own method, from a module outside the package: on Ray (the default executor),
through `--import`, and as an installed `fsbench.plugins` entry point."""

import os
import subprocess
import sys
import textwrap

import pytest
import yaml

# The README's worked example (kept equal to it by test_readme_example_is_this_module).
PLUGIN = '''\
import torch

import fsbench
from fsbench.methods.base import FewShotMethod


class Brightness(FewShotMethod):
    """Foreground where the query is brighter than its mean: no training, no supports."""

    trainable = False

    def forward(self, episode):
        image = episode.query_images.mean(1)  # [Q, H, W]
        foreground = image - image.mean((1, 2), keepdim=True)
        return torch.stack([torch.zeros_like(foreground), foreground], 1)


@fsbench.register_method()
def brightness() -> Brightness:
    """Query pixels brighter than the query's mean are foreground (a plugin example)."""
    return Brightness()
'''


@pytest.fixture
def plugin_grid(tmp_path, voc_root):
    (tmp_path / "my_methods.py").write_text(PLUGIN)
    grid = {
        "name": "plugin",
        "imports": ["my_methods"],
        "dataset": {"name": "pascal5i", "data_root": str(voc_root)},
        "input_size": 32,
        "episodes": 6,
        "seeds": [1, 2],
        "folds": [0],
        "shots": [1],
        "methods": ["brightness", "all_background"],
    }
    path = tmp_path / "plugin.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path


@pytest.mark.slow
def test_own_method_from_a_module_outside_the_package_runs_on_ray(plugin_grid, tmp_path):
    # In a fresh interpreter, as a user's script: the module sits next to the grid file only.
    script = textwrap.dedent(
        f"""
        import fsbench
        frame = fsbench.run({str(plugin_grid)!r}, results={str(tmp_path / "r")!r},
                            num_cpus=1, tracking=False, progress=False)
        print(frame.groupby("method").miou.mean().to_json())
        print(sorted(set(frame["seed"])))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd="/", timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    means, seeds = done.stdout.strip().splitlines()[-2:]
    means = yaml.safe_load(means)
    assert set(means) == {"brightness", "all_background"} and seeds == "[1, 2]"
    assert means["brightness"] > means["all_background"] == 0


@pytest.mark.slow
def test_import_option_and_unknown_module(plugin_grid, tmp_path):
    grid = yaml.safe_load(plugin_grid.read_text())
    del grid["imports"]
    plain = tmp_path / "plain.yaml"
    plain.write_text(yaml.safe_dump(grid))
    command = [sys.executable, "-m", "fsbench.benchmarks.cli", "run", str(plain), "--serial"]
    options = ["--no-tracking", "--no-report", "--results", str(tmp_path / "r")]
    without = subprocess.run([*command, *options], capture_output=True, text=True, cwd=tmp_path)
    assert without.returncode == 2 and "unknown method 'brightness'" in without.stderr
    done = subprocess.run(
        [*command, "--import", "my_methods", *options], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0 and "2 cells written" in done.stdout, done.stderr[-2000:]
    missing = subprocess.run(
        [*command, "--import", "no_such_module", *options],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert missing.returncode == 2
    assert "imports: cannot import 'no_such_module'" in missing.stderr


@pytest.mark.slow
def test_installed_plugin_entry_point(tmp_path):
    site = tmp_path / "site"
    (site / "fake_plugin-0.1.dist-info").mkdir(parents=True)
    (site / "fake_plugin-0.1.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fake-plugin\nVersion: 0.1\n"
    )
    (site / "fake_plugin-0.1.dist-info" / "entry_points.txt").write_text(
        "[fsbench.plugins]\nbrightness = fake_plugin_methods\n"
    )
    (site / "fake_plugin_methods.py").write_text(PLUGIN)
    listed = subprocess.run(
        [sys.executable, "-m", "fsbench.benchmarks.cli", "list"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(site), os.environ["PYTHONPATH"]])},
    )
    assert listed.returncode == 0, listed.stderr
    line = next(x for x in listed.stdout.splitlines() if "brightness" in x)
    assert "no train" in line and "brighter than the query's mean" in line


def test_readme_example_is_this_module():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert PLUGIN.strip() in readme
