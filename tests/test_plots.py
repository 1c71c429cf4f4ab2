"""Specification of ``easyppo plot``: PNG training curves from a run's metrics log."""

import json

import pytest

from easyppo.cli import main as cli_main
from easyppo.run import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_log(run_dir, rows):
    (run_dir / "logs").mkdir(parents=True)
    (run_dir / "logs" / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


PPO_LIKE = [
    {"step": 0, "wall_time": 1.0, "eval/score": -1.0, "eval/kl_per_sequence": 0.0},
    {
        "step": 5,
        "wall_time": 2.0,
        "score": 0.5,
        "policy_loss": 0.1,
        "value_loss": 3.0,
        "kl_per_sequence": 0.2,
        "tokens_per_second": 900.0,
        "learning_rate": 1e-4,
    },
    {
        "step": 10,
        "wall_time": 3.0,
        "score": 1.5,
        "policy_loss": "nan",
        "value_loss": 2.0,
        "kl_per_sequence": 0.4,
        "tokens_per_second": 950.0,
        "learning_rate": 1e-4,
    },
    {"step": 10, "wall_time": 4.0, "eval/score": 2.0, "eval/kl_per_sequence": 0.5},
]


def test_plot_writes_one_png_per_panel_with_data_and_an_overview(tmp_path, capsys):
    write_log(tmp_path / "run", PPO_LIKE)
    assert cli_main.main(["plot", str(tmp_path / "run")]) == 0
    written = sorted(path.name for path in (tmp_path / "run" / "plots").iterdir())
    assert written == ["curves.png", "kl.png", "loss.png", "reward.png", "throughput.png"]  # no accuracy data
    for name in written:
        assert (tmp_path / "run" / "plots" / name).read_bytes().startswith(PNG_SIGNATURE)
    assert capsys.readouterr().out.startswith("wrote ")


def test_each_panel_holds_its_train_curves_and_the_matching_eval_points():
    series = plots.read_series([json.dumps(row) for row in PPO_LIKE])
    by_panel = {panel.name: set(plots.panel_curves(series, panel)) for panel in plots.PANELS}
    assert by_panel["loss"] == {"policy_loss", "value_loss"}
    assert by_panel["reward"] == {"score", "eval/score"}
    assert by_panel["kl"] == {"kl_per_sequence", "eval/kl_per_sequence"}
    assert by_panel["throughput"] == {"tokens_per_second"}
    assert series["eval/score"] == {0: -1.0, 10: 2.0}


def test_a_step_logged_twice_keeps_the_later_line_as_after_a_resume():
    lines = [json.dumps({"step": 5, "loss": 1.0}), json.dumps({"step": 5, "loss": 0.5})]
    assert plots.read_series(lines)["loss"] == {5: 0.5}


def test_the_output_directory_can_be_chosen(tmp_path):
    write_log(tmp_path / "run", PPO_LIKE)
    written = plots.write_plots(str(tmp_path / "run" / "logs" / "metrics.jsonl"), str(tmp_path / "figs"))
    assert all(path.startswith(str(tmp_path / "figs")) for path in written)


@pytest.mark.parametrize(
    "rows,message",
    [
        (None, "no metrics log here"),
        ([{"step": 1, "learning_rate": 0.1}], "no metric to plot (found: learning_rate)"),
        (["not json"], "metrics.jsonl:1: not a metrics row"),
    ],
)
def test_what_cannot_be_plotted_is_one_error_line(tmp_path, capsys, rows, message):
    if rows is not None:
        (tmp_path / "run" / "logs").mkdir(parents=True)
        text = "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)
        (tmp_path / "run" / "logs" / "metrics.jsonl").write_text(text)
    assert cli_main.main(["plot", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
