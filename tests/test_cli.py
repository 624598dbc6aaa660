"""Command-line conventions: options and overrides in any order, --version, help everywhere,
`config` prints the resolved grid, `list` describes the methods."""

import argparse

import pytest
import yaml

from fsbench.benchmarks.cli.main import get_args_parser, main


def test_overrides_and_options_in_any_order(capsys, tmp_path):
    for argv in (
        ["run", "quickstart.yaml", "--dry-run", "shots=[1]", "folds=[0]", "--serial"],
        ["run", "quickstart.yaml", "shots=[1]", "--dry-run", "folds=[0]"],
    ):
        assert main([*argv, "--results", str(tmp_path)]) == 0
        assert "5 cells, 0 done, 5 to run" in capsys.readouterr().out


def test_unknown_option_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", "quickstart.yaml", "--dry-run", "--bogus"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "unrecognized arguments: --bogus" in err[0]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("fsbench 0.")


def test_every_option_has_help():
    parser = get_args_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [
        f"{name} {action.option_strings or action.dest}"
        for name, sub in commands.choices.items()
        for action in sub._actions
        if not action.help
    ]
    assert not missing, missing
    ui_help = commands.choices["ui"].format_help()
    assert "--host" in ui_help and "--port" in ui_help


def test_config_prints_the_resolved_grid(capsys):
    assert main(["config", "quickstart.yaml", "shots=[1]", "train.lr=2e-3"]) == 0
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out)
    assert resolved["shots"] == [1] and resolved["train"]["lr"] == 0.002
    assert "# 20 cells" in out and "PANet · fold 0 · 1-shot" in out


def test_list_describes_methods(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    panet = next(line for line in out.splitlines() if line.strip().startswith("panet "))
    assert "trains" in panet and "prototype alignment" in panet
    notrain = next(line for line in out.splitlines() if "prototype_notrain" in line)
    assert "no train" in notrain


def test_manifest_names_its_sampler_and_the_grid_takes_one(capsys, tmp_path, voc_root):
    """`fsbench manifest` replays the protocol's official episodes unless --sampler fsbench; a
    grid's `sampler:` joins the cell id only when official (old fsbench-sampled ids stay)."""
    import json

    from fsbench.benchmarks.grid.files import parse_grid

    for extra, sampler in (([], "official:panet"), (["--sampler", "fsbench"], "fsbench")):
        out = tmp_path / f"{sampler}.json"
        argv = ["manifest", "--data-root", str(voc_root), "--fold", "0", "--episodes", "5"]
        assert main([*argv, "--output", str(out), *extra]) == 0
        assert f"sampler {sampler}" in capsys.readouterr().out
        assert json.loads(out.read_text()).get("sampler", "fsbench") == sampler
    base = {"name": "g", "dataset": "pascal5i", "methods": ["all_background"], "folds": [0]}
    official, own = (
        parse_grid({**base, **extra}).expand()[0] for extra in ({}, {"sampler": "fsbench"})
    )
    assert official.sampler == "official" and own.sampler == "fsbench"
    assert "sampler" in official.config() and "sampler" not in own.config()
    with pytest.raises(Exception, match="sampler"):
        parse_grid({**base, "sampler": "random"})


@pytest.mark.slow
def test_the_run_docstring_example_runs(tmp_path, monkeypatch, capsys):
    import textwrap

    import fsbench
    from fsbench.benchmarks.cli import api
    from fsbench.methods import METHODS

    doc = api.run.__doc__
    example = textwrap.dedent(doc.split("Example (run by tests/test_cli.py)::")[1])
    monkeypatch.setenv("FSBENCH_RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(METHODS, "_builders", dict(METHODS._builders))  # my_method stays here
    # the user's class: a trainable FewShotMethod (the suite's narrow PANet); a shorter run
    namespace = {"MyMethod": lambda **kwargs: METHODS.build("test_panet")}
    shorter = '"episodes=20", "train.steps=4", "train.lr_milestones=[3]"'
    example = example.replace('"compare=[]"]', f'"compare=[]", {shorter}]')
    exec(compile(example, "fsbench.run docstring", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "fold" in printed and len(namespace["frame"]) == 4 * 2  # 4 folds × 2 seeds
    assert fsbench.run is api.run
