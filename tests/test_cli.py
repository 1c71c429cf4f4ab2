"""Specification of the one ``easyppo`` command: subcommands, help, installed presets, one-line errors."""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

from easyppo.cli import main as cli_main
from easyppo.cli import train as train_cli
from easyppo.run import config as run_config
from easyppo.run.lock import RunLock

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_the_command_lists_its_subcommands(capsys):
    assert cli_main.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("train", "generate", "convert"):
        assert f"\n  {command} " in out


def test_an_unknown_subcommand_is_one_error_line(capsys):
    assert cli_main.main(["trian"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown command 'trian'") and err.count("\n") == 1


@pytest.mark.parametrize("command", ["generate", "convert"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main.main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"easyppo {command}" in capsys.readouterr().out


def test_train_help_lists_the_installed_presets(capsys):
    assert cli_main.main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--config=ALGORITHM:PRESET" in out
    for algorithm, presets in train_cli.installed_presets().items():
        assert f"  {algorithm}: {', '.join(presets)}" in out
    assert set(train_cli.installed_presets()) == {"sft", "rm", "dpo", "ppo", "grpo", "online_dpo"}


def test_an_installed_preset_is_named_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = train_cli.config_from_argv(["easyppo train", "--config=sft:demo", "--config.optim.learning_rate=0.5"])
    assert config.algorithm == "sft" and config.optim.learning_rate == 0.5
    # The demo's data ships inside the package, and its outputs go below the working directory.
    assert pathlib.Path(config.data.path.split(",")[0]).is_file()
    assert pathlib.Path(config.output_dir).is_relative_to(tmp_path)


def test_a_config_file_from_a_checkout_still_works():
    config = train_cli.config_from_argv(["easyppo train", f"--config={REPO}/configs/ppo.py:demo"])
    assert config.algorithm == "ppo"


@pytest.mark.parametrize(
    "reference, message",
    [("ppo:nope", "ppo has no preset 'nope'"), ("kto:demo", "neither a config file nor ALGORITHM:PRESET")],
)
def test_an_unknown_preset_names_the_choices(reference, message):
    with pytest.raises(run_config.ConfigError, match=message):
        train_cli.config_from_argv(["easyppo train", f"--config={reference}"])


def test_train_reports_a_bad_override_in_one_line(capsys):
    assert train_cli.main(["--config=sft:demo", "--config.optim.learning_rat=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: config.optim.learning_rat: unknown key") and err.count("\n") == 1


def test_python_dash_m_easyppo_runs_the_same_command():
    done = subprocess.run(
        [sys.executable, "-m", "easyppo", "train", "--help"],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "installed presets:" in done.stdout


def test_the_wheel_ships_the_command_the_presets_and_the_demo_data(tmp_path):
    """What a plain ``pip install .`` gets: the installed command finds its presets and data anywhere."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "easyppo", source / "easyppo", ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("easyppo-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    demo_files = {p.name for p in (REPO / "easyppo" / "configs" / "demo_data").iterdir()}
    assert {f"easyppo/configs/demo_data/{name}" for name in demo_files} <= names
    assert {f"easyppo/configs/{name}.py" for name in ("sft", "rm", "dpo", "ppo")} <= names
    assert "easyppo = easyppo.cli.main:main" in entry_points


# ------------------------------------------------------------------------------- one-line errors


def _train_argv(tmp_path, *extra):
    return ["--config=sft:demo", f"--config.output_dir={tmp_path / 'run'}", "--config.train.export_hf_dir=", *extra]


@pytest.mark.parametrize(
    "contents, expected",
    [
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', r"bad\.jsonl, row 1, field 'messages"),
        ("", r"bad\.jsonl: no valid rows among 0"),
    ],
    ids=["bad_row", "empty_file"],
)
def test_train_reports_a_data_error_in_one_line_naming_the_file(tmp_path, capsys, contents, expected):
    (tmp_path / "bad.jsonl").write_text(contents)
    argv = _train_argv(tmp_path, f"--config.data.path={tmp_path / 'bad.jsonl'}")
    assert train_cli.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and re.search(expected, err[0]), err


def test_train_reports_a_missing_model_in_one_line_and_verbose_shows_the_traceback(tmp_path, capsys):
    argv = _train_argv(tmp_path, f"--config.model.init_from={tmp_path / 'nowhere'}")
    assert train_cli.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "nowhere" in err[0] and "does not exist" in err[0]
    with pytest.raises(FileNotFoundError):
        train_cli.main([*argv, "--verbose"])


def test_train_reports_a_directory_in_use_in_one_line(tmp_path, capsys):
    with RunLock(str(tmp_path / "run" / "checkpoints")):
        assert train_cli.main(_train_argv(tmp_path)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and f"process {os.getpid()}" in err[0]


def test_train_lists_every_key_with_its_value_and_description(capsys):
    assert cli_main.main(["train", "--config=ppo:demo", "--config.ppo.kl_coef=0.1", "--list_keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    by_key = {line.split(" = ", 1)[0]: line for line in lines}
    assert (
        by_key["ppo.kl_coef"].startswith("ppo.kl_coef = 0.1")
        and "# weight of the per-token KL" in by_key["ppo.kl_coef"]
    )
    assert "# Padded width of sft / preference sequences" in by_key["data.max_seq_len"]
    assert "# peak learning rate" in by_key["optim.learning_rate"]
    assert "# peak learning rate" in by_key["ppo.value_optim.learning_rate"]  # an embedded optim section
    assert "#" in by_key["ppo.sampling.temperature"]  # the sampler's docstring
    described = [line for line in lines if "  # " in line]
    assert len(described) >= 0.9 * len(lines), [line for line in lines if "  # " not in line]


def test_train_prints_the_resolved_config_without_running(tmp_path, capsys):
    output = tmp_path / "never_written"
    argv = [
        "train",
        "--config=sft:demo",
        f"--config.output_dir={output}",
        "--config.optim.learning_rate=0.5",
        "--print_config",
    ]
    assert cli_main.main(argv) == 0
    out = capsys.readouterr().out
    assert "learning_rate: 0.5" in out and f"output_dir: {output}" in out
    assert not output.exists()


def test_commands_are_quiet_by_default_and_verbose_shows_library_info():
    import logging
    import warnings

    from easyppo.cli import logs

    with warnings.catch_warnings():
        logs.configure(verbose=False)
        assert logging.getLogger("easyppo.run.loop").isEnabledFor(logging.INFO)
        assert not logging.getLogger("orbax.checkpoint").isEnabledFor(logging.INFO)
        assert not logging.getLogger("absl").isEnabledFor(logging.INFO)
        logs.configure(verbose=True)
        assert logging.getLogger("orbax.checkpoint").isEnabledFor(logging.INFO)
