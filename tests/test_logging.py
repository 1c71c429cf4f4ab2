"""Specification of easyppo.run.metrics: the JSONL record, the samples table, the sinks and their rules."""

import glob
import json
import os
import re
import struct
import sys
import time
import types

import jax.numpy as jnp
import numpy as np
import pytest

from easyppo.run import metrics as metrics_lib


def log_config(directory, **overrides):
    config = metrics_lib.default_config()
    config.directory = str(directory)
    config.progress_bar = False
    config.update(overrides)
    return config


def read_jsonl(path):
    def reject_constant(name):  # strict JSON: Python's json would otherwise accept NaN / Infinity
        raise ValueError(f"non-standard JSON constant {name}")

    with open(path, encoding="utf-8") as f:
        return [json.loads(line, parse_constant=reject_constant) for line in f]


def test_each_log_call_is_one_json_line_with_step_and_wall_time(tmp_path):
    before = time.time()
    with metrics_lib.MetricLogger(log_config(tmp_path)) as logger:
        logger.log(1, {"loss": jnp.float32(0.25), "accuracy": np.float64(0.75), "tokens": 4096, "phase": "train"})
        logger.log(2, {"loss": jnp.array(0.125, jnp.bfloat16), "clipped": jnp.bool_(True)})
    after = time.time()
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    assert all(before <= r["wall_time"] <= after for r in records)
    assert {k: v for k, v in records[0].items() if k != "wall_time"} == {
        "step": 1,
        "loss": 0.25,
        "accuracy": 0.75,
        "tokens": 4096,
        "phase": "train",
    }
    assert {k: v for k, v in records[1].items() if k != "wall_time"} == {"step": 2, "loss": 0.125, "clipped": True}


def test_each_line_is_on_disk_before_the_logger_is_closed(tmp_path):
    logger = metrics_lib.MetricLogger(log_config(tmp_path))
    logger.log(3, {"loss": 1.5})
    assert [r["loss"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1.5]
    logger.close()


def test_a_resumed_run_appends_to_the_same_file(tmp_path):
    with metrics_lib.MetricLogger(log_config(tmp_path)) as first_attempt:
        first_attempt.log(1, {"loss": 3.0})
        first_attempt.log(2, {"loss": 2.0})
    with metrics_lib.MetricLogger(log_config(tmp_path), start_step=2) as resumed:
        resumed.log(3, {"loss": 1.0})
    assert [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == [(1, 3.0), (2, 2.0), (3, 1.0)]


def test_non_finite_values_are_written_as_strings_that_float_reads_back(tmp_path):
    with metrics_lib.MetricLogger(log_config(tmp_path)) as logger:
        logger.log(1, {"nan": jnp.float32(jnp.nan), "inf": float("inf"), "neg_inf": np.float32(-np.inf), "ok": 2.5})
    (record,) = read_jsonl(tmp_path / "metrics.jsonl")
    assert (record["nan"], record["inf"], record["neg_inf"], record["ok"]) == ("nan", "inf", "-inf", 2.5)
    assert np.isnan(float(record["nan"])) and float(record["inf"]) == np.inf and float(record["neg_inf"]) == -np.inf


def test_a_non_scalar_metric_is_rejected_by_name(tmp_path):
    with metrics_lib.MetricLogger(log_config(tmp_path)) as logger:
        with pytest.raises(ValueError, match=r"'per_token_kl' must be a scalar, got an array of shape \(4,\)"):
            logger.log(1, {"per_token_kl": jnp.zeros(4)})


def test_a_metric_named_like_a_record_field_is_rejected(tmp_path):
    with metrics_lib.MetricLogger(log_config(tmp_path)) as logger:
        with pytest.raises(ValueError, match="'step' is reserved"):
            logger.log(1, {"step": 5})


def test_samples_table_has_one_line_per_row_tagged_with_the_step(tmp_path):
    with metrics_lib.MetricLogger(log_config(tmp_path)) as logger:
        logger.log_samples(
            10,
            {"prompt": ["2+2?", "Hi"], "response": ["4", "Hello!"], "score": jnp.array([1.5, jnp.nan], jnp.float32)},
        )
        logger.log_samples(20, {"prompt": ["Why?"], "response": ["Because."], "score": [0.25]})
    assert read_jsonl(tmp_path / "samples.jsonl") == [
        {"step": 10, "prompt": "2+2?", "response": "4", "score": 1.5},
        {"step": 10, "prompt": "Hi", "response": "Hello!", "score": "nan"},
        {"step": 20, "prompt": "Why?", "response": "Because.", "score": 0.25},
    ]


def test_samples_with_unequal_column_lengths_are_rejected(tmp_path):
    with metrics_lib.MetricLogger(log_config(tmp_path)) as logger:
        with pytest.raises(ValueError, match=r"equal lengths, got \{'prompt': 2, 'response': 1\}"):
            logger.log_samples(1, {"prompt": ["a", "b"], "response": ["c"]})


def test_jsonl_table_can_be_used_on_its_own(tmp_path):
    table = metrics_lib.JsonlTable(tmp_path / "eval" / "generations.jsonl")
    table.write(0, {"prompt": ["p"], "token_ids": [np.array([5, 7])]})
    table.close()
    assert read_jsonl(tmp_path / "eval" / "generations.jsonl") == [{"step": 0, "prompt": "p", "token_ids": [5, 7]}]


def test_only_process_zero_writes_or_initialises_sinks(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # would raise if process 1 tried to import it
    config = log_config(tmp_path / "logs", progress_bar=True)
    config.wandb.enabled = True
    config.tensorboard.enabled = True
    with metrics_lib.MetricLogger(config, process_index=1) as logger:
        assert not logger.is_writer
        logger.log(1, {"loss": 1.0})
        logger.log_samples(1, {"prompt": ["a"]})
    assert not os.path.exists(tmp_path / "logs")


def test_enabled_wandb_without_the_package_names_the_config_key(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    config = log_config(tmp_path)
    config.wandb.enabled = True
    with pytest.raises(ImportError, match=r"config key 'wandb.enabled' is True but the 'wandb' package"):
        metrics_lib.MetricLogger(config, process_index=0)


def test_enabled_tensorboard_without_the_package_names_the_config_key(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    config = log_config(tmp_path)
    config.tensorboard.enabled = True
    with pytest.raises(ImportError, match=r"config key 'tensorboard.enabled' is True but the 'tensorboardX'"):
        metrics_lib.MetricLogger(config, process_index=0)


def test_unset_directory_is_a_clear_error():
    with pytest.raises(ValueError, match="'directory' is not set"):
        metrics_lib.MetricLogger(metrics_lib.default_config(), process_index=0)


def test_progress_bar_shows_step_of_total_eta_loss_and_throughput(tmp_path, capsys):
    with metrics_lib.MetricLogger(log_config(tmp_path, progress_bar=True), total_steps=100, start_step=10) as logger:
        logger.log(15, {"loss": 0.5, "tokens_per_second": 12345.0, "kl": 0.01})
        shown = capsys.readouterr().err
    assert re.search(r"15/100 \[\d\d:\d\d<\d\d:\d\d", shown)  # step of total, elapsed<ETA
    assert "loss=0.5, tokens_per_second=1.234e+04" in shown
    assert "kl=" not in shown


class _FakeWandb(types.ModuleType):
    """Records the calls easyppo makes; the real signatures were checked against wandb 0.30."""

    class Run:
        def __init__(self, **init_kwargs):
            self.init_kwargs, self.logged, self.finished = init_kwargs, [], False

        def log(self, data, step=None):
            self.logged.append((step, data))

        def finish(self):
            self.finished = True

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    def __init__(self):
        super().__init__("wandb")
        self.runs = []

    def init(self, **kwargs):
        self.runs.append(self.Run(**kwargs))
        return self.runs[-1]


def test_wandb_sink_receives_metrics_samples_and_the_run_config(tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = log_config(tmp_path)
    config.wandb.enabled = True
    config.wandb.name = "dpo-tiny"
    with metrics_lib.MetricLogger(config, run_config={"beta": 0.1}) as logger:
        logger.log(4, {"loss": jnp.float32(0.5), "diverged": jnp.float32(jnp.nan)})
        logger.log_samples(4, {"prompt": ["a", "b"], "score": [1.0, 2.0]})
    (run,) = fake.runs
    assert run.init_kwargs["project"] == "easyppo" and run.init_kwargs["name"] == "dpo-tiny"
    assert run.init_kwargs["config"] == {"beta": 0.1} and run.init_kwargs["resume"] == "allow"
    (step, scalars), (samples_step, samples) = run.logged
    assert step == 4 and scalars["loss"] == 0.5 and np.isnan(scalars["diverged"])
    assert samples_step == 4 and samples["samples"].columns == ["prompt", "score"]
    assert samples["samples"].data == [["a", 1.0], ["b", 2.0]]
    assert run.finished


def test_wandb_run_id_is_kept_so_a_resumed_run_continues_the_same_run(tmp_path, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    config = log_config(tmp_path)
    config.wandb.enabled = True
    metrics_lib.MetricLogger(config).close()
    metrics_lib.MetricLogger(config, start_step=50).close()
    first_id, resumed_id = (run.init_kwargs["id"] for run in fake.runs)
    assert first_id and first_id == resumed_id
    with open(tmp_path / metrics_lib.WANDB_RUN_ID_FILENAME, encoding="utf-8") as f:
        assert f.read().strip() == first_id


def _read_tensorboard_scalars(logdir):
    """(step, tag, value) from TFRecord-framed Event protos: u64 length, u32 crc, payload, u32 crc."""
    event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
    scalars = []
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data, offset = f.read(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            scalars += [(event.step, v.tag, v.simple_value) for v in event.summary.value]
    return scalars


def test_tensorboard_sink_writes_numeric_metrics_as_scalar_events(tmp_path):
    pytest.importorskip("tensorboardX")
    config = log_config(tmp_path)
    config.tensorboard.enabled = True
    with metrics_lib.MetricLogger(config) as logger:
        logger.log(1, {"loss": 0.5, "phase": "train"})
        logger.log(2, {"loss": 0.25, "accuracy": jnp.float32(0.75)})
    assert _read_tensorboard_scalars(tmp_path / "tensorboard") == [
        (1, "loss", 0.5),
        (2, "loss", 0.25),
        (2, "accuracy", 0.75),
    ]
