"""gs:// paths end to end, against a local GCS server (tests/helpers/fake_gcs.py).

A user on a pod points output_dir, data and tokenizer at a bucket. Everything a run writes
(checkpoints, metrics, samples, config.json, the HF export, plots) must land in the bucket, a rerun
must resume from it, and nothing may create a local folder named ``gs:`` in the working directory.
"""

from __future__ import annotations

import json
import pathlib

import pytest
from etils import epath
from helpers.demo_data import DEMO_DATA
from helpers.fake_gcs import fake_gcs

from easyppo.cli import main as cli_main
from easyppo.cli.train import config_from_argv
from easyppo.core import files
from easyppo.run import config as run_config
from easyppo.weights import step_digests


@pytest.fixture(scope="module")
def bucket():
    with fake_gcs("bucket") as url:
        yield url


def _lines(path: str) -> list[str]:
    return epath.Path(path).read_text().splitlines()


# ----------------------------------------------------------------------------- the file layer


def test_an_append_file_in_a_bucket_is_uploaded_whole_and_reopened_where_it_ended(bucket):
    path = "gs://bucket/append/metrics.jsonl"
    log = files.AppendFile(path, sync_every_s=3600)
    log.write("one\n")
    assert not epath.Path(path).exists()  # not yet due for upload
    log.sync()
    assert _lines(path) == ["one"]
    log.write("two\n")
    log.close()
    assert _lines(path) == ["one", "two"]

    again = files.AppendFile(path, sync_every_s=0)  # a resumed run: every write uploads at once
    again.write("three\n")
    assert _lines(path) == ["one", "two", "three"]
    again.close()


def test_a_remote_directory_is_mirrored_once_and_again_after_it_changes(bucket, tmp_path):
    remote = epath.Path("gs://bucket/mirror/model")
    (remote / "sub").mkdir(parents=True, exist_ok=True)
    (remote / "config.json").write_text("{}")
    (remote / "sub" / "weights.bin").write_bytes(b"\x00" * 10)
    first = files.local_mirror(str(remote), cache_root=str(tmp_path))
    assert pathlib.Path(first, "sub", "weights.bin").read_bytes() == b"\x00" * 10
    assert files.local_mirror(str(remote), cache_root=str(tmp_path)) == first
    (remote / "sub" / "weights.bin").write_bytes(b"\x01" * 12)
    second = files.local_mirror(str(remote), cache_root=str(tmp_path))
    assert second != first and pathlib.Path(second, "sub", "weights.bin").read_bytes() == b"\x01" * 12


def test_a_staged_directory_is_uploaded_only_when_complete_and_never_over_files(bucket):
    target = "gs://bucket/staged/export"
    with pytest.raises(RuntimeError), files.staged_directory(target) as local:
        (epath.Path(local) / "half.txt").write_text("x")
        raise RuntimeError("failed halfway")
    assert not epath.Path(target).exists()
    with files.staged_directory(target) as local:
        (epath.Path(local) / "a" / "b.txt").parent.mkdir(parents=True)
        (epath.Path(local) / "a" / "b.txt").write_text("done")
    assert (epath.Path(target) / "a" / "b.txt").read_text() == "done"
    with pytest.raises(FileExistsError, match="already holds files"), files.staged_directory(target):
        pass


def test_caches_must_be_local_and_say_so_before_anything_runs():
    config = config_from_argv(["easyppo train", "--config=dpo:demo", "--config.data.cache_dir=gs://bucket/cache"])
    with pytest.raises(run_config.ConfigError, match=r"data\.cache_dir.*must be a local directory"):
        run_config.validate(config, num_devices=1)
    config = config_from_argv(["easyppo train", "--config=dpo:demo", "--config.dpo.reference_cache_dir=gs://b/r"])
    with pytest.raises(run_config.ConfigError, match=r"dpo\.reference_cache_dir.*must be a local directory"):
        run_config.validate(config, num_devices=1)


# -------------------------------------------------------------------------- a run in a bucket


def _train(*overrides: str) -> int:
    return cli_main.main(
        [
            "train",
            "--config=sft:demo",
            "--config.output_dir=gs://bucket/run",
            "--config.data.path=gs://bucket/data/sft_train.jsonl",
            "--config.data.tokenizer_path=gs://bucket/data/tokenizer.model",
            "--config.eval.path=gs://bucket/data/sft_eval.jsonl",
            "--config.eval.max_batches=1",
            "--config.data.global_batch_size=8",
            "--config.checkpoint.save_every_steps=2",
            "--config.logging.progress_bar=False",
            "--config.train.log_every_steps=1",
            *overrides,
        ]
    )


@pytest.mark.slow
def test_a_run_reads_from_and_writes_everything_to_a_bucket_and_resumes_from_it(bucket, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EASYPPO_CACHE", str(tmp_path / "cache"))
    for name in ("sft_train.jsonl", "sft_eval.jsonl", "tokenizer.model"):
        (epath.Path("gs://bucket/data") / name).write_bytes((DEMO_DATA / name).read_bytes())
    run = epath.Path("gs://bucket/run")

    assert _train("--config.train.num_steps=2", "--config.train.export_hf_dir=") == 0
    assert (run / "checkpoints" / "2").is_dir()
    digests = json.loads((run / "checkpoints" / "2" / "easyppo_digests.json").read_text())
    assert digests and all(value.split(":")[1] for value in digests.values())  # the store's own checksums
    assert [json.loads(line)["step"] for line in _lines("gs://bucket/run/logs/metrics.jsonl")][-1] == 2
    assert json.loads((run / "logs" / "config.json").read_text())["output_dir"] == "gs://bucket/run"

    # Rerun longer: resumes from the bucket's step 2, appends to its metrics, exports there.
    assert _train("--config.train.num_steps=4", "--config.train.resume_with_changes=train.num_steps") == 0
    assert "resum" in capsys.readouterr().err.lower()
    steps = [json.loads(line)["step"] for line in _lines("gs://bucket/run/logs/metrics.jsonl")]
    assert {1, 2, 3, 4} <= set(steps) and steps[-1] == 4
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= {p.name for p in (run / "hf").iterdir()}

    # A later export of an earlier step, plots, and a new run starting from the bucket's export.
    assert cli_main.main(["convert", "to-hf", "gs://bucket/run", "gs://bucket/step2", "--step=2"]) == 0
    assert (epath.Path("gs://bucket/step2") / "model.safetensors").exists()
    assert cli_main.main(["plot", "gs://bucket/run"]) == 0
    assert any(p.name.endswith(".png") for p in (run / "plots").iterdir())
    second = [
        "--config.output_dir=gs://bucket/run2",
        "--config.model.init_from=gs://bucket/run/hf",
        "--config.train.num_steps=1",
        "--config.train.export_hf_dir=",
    ]
    assert _train(*second) == 0
    assert (epath.Path("gs://bucket/run2/checkpoints") / "1").is_dir()

    local = {p.name for p in tmp_path.iterdir()}
    assert not any(name.startswith(("gs:", "gs")) for name in local), local


def test_a_checkpoint_step_copied_between_disk_and_bucket_still_checks_as_intact(bucket, tmp_path):
    local = tmp_path / "7"
    (local / "state").mkdir(parents=True)
    (local / "state" / "array").write_bytes(b"\x01" * 64)
    step_digests.record(epath.Path(local))
    in_bucket = "gs://bucket/copied/7"
    files.upload_tree(str(local), in_bucket)  # gcloud storage cp -r runs/x gs://...
    assert step_digests.check(epath.Path(in_bucket)) is None

    saved_in_bucket = epath.Path("gs://bucket/saved/7")
    (saved_in_bucket / "state" / "array").parent.mkdir(parents=True, exist_ok=True)
    (saved_in_bucket / "state" / "array").write_bytes(b"\x02" * 64)
    step_digests.record(saved_in_bucket)
    copied_down = files.local_mirror(str(saved_in_bucket), cache_root=str(tmp_path / "cache"))
    assert step_digests.check(epath.Path(copied_down)) is None
    pathlib.Path(copied_down, "state", "array").write_bytes(b"\x02" * 63)  # truncated on the way
    assert "differs in size" in step_digests.check(epath.Path(copied_down))


def test_a_lora_adapter_round_trips_through_a_bucket(bucket, tmp_path, monkeypatch):
    import jax
    import numpy as np

    from easyppo.core import sharding
    from easyppo.models import llama, lora
    from easyppo.weights import peft_adapters

    monkeypatch.setenv("EASYPPO_CACHE", str(tmp_path / "cache"))
    config = llama.get_preset("tiny").replace(lora=lora.LoraConfig(rank=2, targets=("q_proj", "down_proj")))
    params = llama.init_params(config, "reward", jax.random.key(0))
    url = "gs://bucket/adapters/rm"
    peft_adapters.save_adapter(url, config, params, "reward")
    assert sorted(p.name for p in epath.Path(url).iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    loaded = peft_adapters.load_adapter(url, config, "reward", mesh=mesh)
    jax.tree.map(np.testing.assert_array_equal, loaded, lora.split(params)[0])  # adapters and the score head
