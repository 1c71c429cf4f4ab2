"""Specification of what a run does when things go wrong around it: a second run into the same
directory, an export directory that is not empty, a finished run started again, an interrupted
export, and Ctrl-C."""

import json
import logging
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers.demo_data import DEMO_DATA
from helpers.runs import small_demo_data, tiny_config
from helpers.tokenizers import train_tiny_sentencepiece

from easyppo.algorithms import get_algorithm
from easyppo.models import llama
from easyppo.run import config as run_config
from easyppo.run import export as export_lib
from easyppo.run import loop
from easyppo.run.lock import RunLock, RunLockedError, lock_path
from easyppo.run.pacing import PreemptionFlag
from easyppo.weights import huggingface, run_checkpoint, run_directory, step_digests

small_data = pytest.fixture(scope="module", name="small_data")(small_demo_data)


def _write_lock(path, **holder):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps({"host": socket.gethostname(), "started": time.time(), "heartbeat": time.time()} | holder)
    )


@pytest.fixture()
def live_process():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process.pid
    process.kill()
    process.wait()


# ---------------------------------------------------------------------------- one run per directory


def test_a_second_run_into_a_directory_in_use_is_refused_naming_the_holder(tmp_path, small_data, live_process):
    config = tiny_config("sft", tmp_path, small_data)
    _write_lock(lock_path(str(tmp_path / "checkpoints")), pid=live_process)
    with pytest.raises(RunLockedError, match=rf"in use by the run of process {live_process} on host"):
        loop.train(config)
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_a_lock_left_by_a_killed_run_on_this_host_is_taken_over_and_released_at_the_end(tmp_path, small_data):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    config = tiny_config("sft", tmp_path, small_data, num_steps=2)
    lock = lock_path(str(tmp_path / "checkpoints"))
    _write_lock(lock, pid=dead.pid)
    assert loop.train(config).status == "completed"
    assert not lock.exists()


@pytest.mark.parametrize("age_s, stale", [(3600.0, True), (5.0, False)])
def test_a_lock_from_another_host_is_stale_once_its_heartbeat_stops(tmp_path, age_s, stale):
    directory = str(tmp_path / "checkpoints")
    _write_lock(lock_path(directory), host="another-worker", pid=1, heartbeat=time.time() - age_s)
    lock = RunLock(directory, stale_after_s=600.0)
    if stale:
        lock.acquire()
        lock.release()
    else:
        with pytest.raises(RunLockedError, match="another-worker"):
            lock.acquire()


def test_two_runs_of_one_process_cannot_hold_one_directory(tmp_path):
    directory = str(tmp_path / "checkpoints")
    with RunLock(directory), pytest.raises(RunLockedError, match=f"process {os.getpid()}"):
        RunLock(directory).acquire()
    with RunLock(directory):  # released: free again
        pass


def test_the_lock_heartbeat_is_refreshed_while_the_run_holds_it(tmp_path):
    directory = str(tmp_path / "checkpoints")
    with RunLock(directory, heartbeat_s=0.05):
        first = json.loads(lock_path(directory).read_text())["heartbeat"]
        time.sleep(0.3)
        assert json.loads(lock_path(directory).read_text())["heartbeat"] > first


# ------------------------------------------------------------------------------------------ exports


def test_an_export_directory_holding_other_files_is_refused_before_training(tmp_path, small_data):
    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors").write_bytes(b"someone else's weights")
    config = tiny_config("sft", tmp_path / "run", small_data, export_hf_dir=str(export))
    with pytest.raises(run_config.ConfigError, match="config.train.export_hf_dir: .* not this run's export"):
        loop.train(config)
    reader = run_checkpoint.default_config()
    reader.directory = str(tmp_path / "run" / "checkpoints")
    assert (
        not (tmp_path / "run" / "checkpoints").exists()
        or run_checkpoint.Checkpointer(reader, read_only=True).latest_step() is None
    )


def test_a_finished_run_started_again_reports_complete_and_leaves_its_export_alone(tmp_path, small_data):
    config = tiny_config("sft", tmp_path, small_data, num_steps=3, export_hf_dir=str(tmp_path / "hf"))
    first = loop.train(config)
    weights = tmp_path / "hf" / "model.safetensors"
    written = weights.stat().st_mtime_ns
    again = loop.train(config)
    assert (first.status, again.status) == ("completed", "completed")
    assert again.step == 3 and again.export_dir == str(tmp_path / "hf")
    assert weights.stat().st_mtime_ns == written
    marker = json.loads((tmp_path / "hf" / export_lib.MARKER_FILE).read_text())
    assert marker["step"] == 3 and len(marker["tokenizer_fingerprint"]) == 64


def test_an_interrupted_export_leaves_nothing_under_the_final_name_and_a_rerun_finishes_it(
    tmp_path, small_data, monkeypatch
):
    config = tiny_config("rm", tmp_path, small_data, num_steps=3, export_hf_dir=str(tmp_path / "hf"))

    def killed_while_copying_the_tokenizer(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_tokenizer_files", killed_while_copying_the_tokenizer)
    with pytest.raises(KeyboardInterrupt):
        loop.train(config)
    assert not (tmp_path / "hf").exists()
    assert (tmp_path / ("hf" + export_lib.STAGING_SUFFIX)).exists()
    monkeypatch.undo()
    result = loop.train(config)  # the checkpoint is at the last step: nothing to train, only the export
    assert result.status == "completed" and result.step == 3
    assert (tmp_path / "hf" / "config.json").exists() and (tmp_path / "hf" / "tokenizer.model").exists()
    assert not (tmp_path / ("hf" + export_lib.STAGING_SUFFIX)).exists()


# ---------------------------------------------------------------------------------------- signals


def test_ctrl_c_once_asks_for_a_clean_stop_and_twice_aborts():
    flag = PreemptionFlag()
    with flag.installed():
        signal.raise_signal(signal.SIGINT)
        assert flag.requested
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is not flag._interrupt  # restored


def test_sigterm_before_the_first_step_stops_after_one_saved_step(tmp_path, small_data):
    flag = PreemptionFlag()
    flag.request()  # as if SIGTERM arrived during start-up
    result = loop.train(tiny_config("sft", tmp_path, small_data), preemption=flag)
    assert result.status == "preempted" and result.step == 1
    reader = run_checkpoint.default_config()
    reader.directory = result.checkpoint_dir
    assert run_checkpoint.Checkpointer(reader, read_only=True).latest_step() == 1


# ------------------------------------------------------------------------------------ checkpoints


def _truncate_largest_array_file(step_dir):
    data = max(
        (p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)), key=lambda p: p.stat().st_size
    )
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])


def _empty_the_step(step_dir):
    shutil.rmtree(step_dir)
    step_dir.mkdir()  # what an interrupted copy of a run directory leaves


@pytest.mark.parametrize(
    "damage", [_truncate_largest_array_file, _empty_the_step], ids=["truncated_chunk", "empty_step"]
)
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_step_and_is_kept(tmp_path, small_data, damage, caplog):
    config = tiny_config("sft", tmp_path, small_data, num_steps=6)
    config.checkpoint.save_every_steps, config.checkpoint.max_to_keep = 2, 0
    loop.train(config)
    expected = jax.device_get(final_params(tmp_path, config))
    damage(tmp_path / "checkpoints" / "6")
    with caplog.at_level(logging.WARNING, logger="easyppo.weights.run_checkpoint"):
        result = loop.train(config)  # resumes from step 4 and redoes steps 5 and 6
    assert result.status == "completed" and result.step == 6
    assert any("checkpoint step 6" in r.getMessage() and "falling back" in r.getMessage() for r in caplog.records)
    assert (tmp_path / "checkpoints" / f"6{run_checkpoint.DAMAGED_SUFFIX}").is_dir()  # moved aside, not deleted
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(final_params(tmp_path, config)), expected)


def final_params(run_dir, config):
    model_config = llama.get_preset("tiny", pad_token_id=3)
    abstract = llama.abstract_params(model_config, "causal_lm")
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract)
    return run_directory.restore_subtree(run_dir / "checkpoints", {"params": target})["params"]


# ----------------------------------------------------------------------------------------- resume


@pytest.fixture()
def stopped_run(tmp_path, small_data):
    """A tiny SFT run stopped at step 2 of 4, with its own copy of the demo tokenizer."""
    tokenizer = tmp_path / "tokenizer.model"
    shutil.copy(DEMO_DATA / "tokenizer.model", tokenizer)
    config = tiny_config("sft", tmp_path / "run", small_data, num_steps=4, stop_at_step=2)
    config.data.tokenizer_path = str(tokenizer)
    assert loop.train(config).status == "stopped"
    config.train.stop_at_step = 0  # a key that may change on resume
    return config


def _latest_step(config):
    reader = run_checkpoint.default_config()
    reader.directory = str(pathlib.Path(config.output_dir) / "checkpoints")
    return run_checkpoint.Checkpointer(reader, read_only=True).latest_step()


def test_resuming_with_a_changed_learning_rate_is_refused_listing_the_key(stopped_run):
    stopped_run.optim.learning_rate = 5e-4
    with pytest.raises(
        run_config.ConfigError,
        match=r"optim\.learning_rate \(0\.001 -> 0\.0005\).*resume_with_changes=optim\.learning_rate",
    ):
        loop.train(stopped_run)
    assert _latest_step(stopped_run) == 2  # nothing was trained


def test_a_change_named_in_resume_with_changes_is_accepted(stopped_run):
    stopped_run.optim.learning_rate = 5e-4
    stopped_run.train.resume_with_changes = "optim.learning_rate"
    assert loop.train(stopped_run).step == 4


def test_changes_that_do_not_alter_the_computation_resume_without_asking(stopped_run, caplog):
    stopped_run.train.log_every_steps = 2
    stopped_run.logging.progress_bar = True
    stopped_run.checkpoint.max_to_keep = 1
    with caplog.at_level(logging.WARNING):
        assert loop.train(stopped_run).step == 4
    assert not [r for r in caplog.records if "falling back" in r.getMessage()]  # step 2 was intact


def test_resuming_with_a_different_tokenizer_at_the_same_path_is_refused(stopped_run, tmp_path):
    train_tiny_sentencepiece(tmp_path, vocab_size=400, pad_piece=True, filename="tokenizer.model")  # the run's copy
    with pytest.raises(
        run_config.ConfigError, match=r"config\.data\.tokenizer_path: .* is not the tokenizer the checkpoint of step 2"
    ):
        loop.train(stopped_run)


def test_a_run_starting_from_a_model_trained_with_another_tokenizer_is_refused(tmp_path, small_data):
    model_dir = tmp_path / "pretrained"
    model_config = llama.get_preset("tiny", pad_token_id=3)
    huggingface.save_hf(str(model_dir), model_config, llama.init_params(model_config, "causal_lm", jax.random.key(0)))
    train_tiny_sentencepiece(model_dir, vocab_size=400, pad_piece=True, filename="tokenizer.model")
    config = tiny_config("sft", tmp_path / "run", small_data)
    config.model.init_from = str(model_dir)
    with pytest.raises(run_config.ConfigError, match=r"config\.model\.init_from: .* another tokenizer"):
        loop.train(config)
    shutil.copy(DEMO_DATA / "tokenizer.model", model_dir / "tokenizer.model")  # now the run's own
    assert loop.train(config).status == "completed"


def test_the_model_sources_checked_are_the_policy_and_every_model_section_of_the_algorithm():
    config = run_config.base_config("ppo")
    config.model.init_from, config.ppo.reward_model.init_from = "/policy", "/rm"
    assert loop._model_sources(config, get_algorithm("ppo")) == [
        ("model", "/policy"),
        ("ppo.reward_model", "/rm"),
        ("ppo.value_model", ""),
    ]


def _flip_a_byte_in_the_largest_array_file(step_dir):
    data = max(
        (p for p in (step_dir / "state").rglob("*") if p.is_file() and "/d/" in str(p)), key=lambda p: p.stat().st_size
    )
    content = bytearray(data.read_bytes())
    content[len(content) // 2] ^= 0xFF  # same size; it may still decode, into wrong numbers
    data.write_bytes(bytes(content))


def test_a_flipped_byte_in_the_latest_checkpoint_is_caught_by_its_digests(tmp_path, small_data, caplog):
    config = tiny_config("sft", tmp_path, small_data, num_steps=6)
    config.checkpoint.save_every_steps, config.checkpoint.max_to_keep = 2, 0
    loop.train(config)
    for step in (2, 4, 6):  # recorded for every step, and a finished run's steps all check out
        assert (tmp_path / "checkpoints" / str(step) / step_digests.DIGESTS_FILE).exists()
        assert step_digests.check(tmp_path / "checkpoints" / str(step)) is None
    expected = jax.device_get(final_params(tmp_path, config))
    _flip_a_byte_in_the_largest_array_file(tmp_path / "checkpoints" / "6")
    with caplog.at_level(logging.WARNING, logger="easyppo.weights.run_checkpoint"):
        assert loop.train(config).step == 6
    assert any("differs from its recorded digest" in r.getMessage() for r in caplog.records)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(final_params(tmp_path, config)), expected)


def test_digests_name_a_changed_missing_or_extra_file(tmp_path):
    step = tmp_path / "7"
    (step / "state").mkdir(parents=True)
    (step / "state" / "a").write_bytes(b"weights")
    (step / "metadata.json").write_text("{}")
    step_digests.record(step)
    assert step_digests.check(step) is None
    (step / "state" / "a").write_bytes(b"weighTs")
    assert step_digests.check(step) == "state/a differs from its recorded digest"
    (step / "state" / "a").unlink()
    assert step_digests.check(step) == "state/a is missing"
    (step / "state" / "a").write_bytes(b"weights")
    (step / "extra").write_text("")
    assert step_digests.check(step) == "extra was not part of the saved step"


RACE = """
import sys, time
from easyppo.run.lock import RunLock, RunLockedError
lock = RunLock(sys.argv[1])
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # both start acquiring at the same moment
try:
    lock.acquire()
except RunLockedError:
    print("refused")
else:
    print("acquired")
    time.sleep(2.0)
    lock.release()
"""


def test_two_runs_racing_for_one_directory_one_wins_and_the_other_is_refused(tmp_path):
    directory, start = str(tmp_path / "checkpoints"), str(time.time() + 3.0)
    env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parent.parent)}
    racers = [
        subprocess.Popen([sys.executable, "-c", RACE, directory, start], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    outcomes = sorted(racer.communicate(timeout=60)[0].strip() for racer in racers)
    assert outcomes == ["acquired", "refused"]
