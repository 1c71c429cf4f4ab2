"""Specification of the converter's files: round trips, input layouts, sharded output, the CLI, errors.

Numerical parity with ``transformers`` is in test_hf_parity.py; here the reference is the bytes that
``transformers``' own ``save_pretrained`` wrote (or ``torch.save``), compared bit for bit.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from easyppo.cli import convert as convert_cli
from easyppo.models import llama
from easyppo.weights import hf_files, hf_mapping, huggingface, model_checkpoint
from easyppo.weights import verify as verify_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=32,
    pad_token_id=0,
)
TOKENIZER_FILES = {"tokenizer.json": '{"model": "test"}', "tokenizer_config.json": '{"add_bos_token": true}'}


def _hf_dir(directory, model_class=None, dtype=torch.float32, seed=0, **overrides) -> str:
    """A tiny random HF model saved by ``save_pretrained``, with two tokenizer files beside it."""
    model_class = model_class or transformers.LlamaForCausalLM
    torch.manual_seed(seed)
    model = model_class(transformers.LlamaConfig(**{**TINY, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    model.to(dtype).save_pretrained(directory)
    for name, text in TOKENIZER_FILES.items():
        with open(os.path.join(directory, name), "w") as f:
            f.write(text)
    return str(directory)


def _read_safetensors(directory) -> dict[str, np.ndarray]:
    tensors = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), framework="numpy") as f:
                tensors.update({key: f.get_tensor(key) for key in f.keys()})  # noqa: SIM118
    return tensors


def _assert_bitwise_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


def _round_trip(hf_dir, tmp_path, **to_easyppo) -> str:
    checkpoint, out = str(tmp_path / "easyppo"), str(tmp_path / "hf_out")
    model_checkpoint.convert_hf_to_easyppo(hf_dir, checkpoint, **to_easyppo)
    model_checkpoint.convert_easyppo_to_hf(checkpoint, out)
    return out


# ----------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hf_to_easyppo_checkpoint_to_hf_round_trip_is_bitwise(dtype, tmp_path):
    hf_dir = _hf_dir(tmp_path / "hf", dtype=dtype)
    out = _round_trip(hf_dir, tmp_path)
    _assert_bitwise_equal(_read_safetensors(out), _read_safetensors(hf_dir))
    written = hf_files.read_config(out)
    assert written["architectures"] == ["LlamaForCausalLM"]
    assert written["dtype"] == str(dtype).removeprefix("torch.")


def test_round_trip_with_stacked_layers_and_llama3_rope_keeps_tensors_and_architecture(tmp_path):
    rope = dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
    )
    hf_dir = _hf_dir(tmp_path / "hf", num_hidden_layers=3, rope_theta=500000.0, rope_scaling=rope)
    out = _round_trip(hf_dir, tmp_path, scan_layers=True)
    _assert_bitwise_equal(_read_safetensors(out), _read_safetensors(hf_dir))
    original = transformers.AutoConfig.from_pretrained(hf_dir).to_dict()
    reloaded = transformers.AutoConfig.from_pretrained(out).to_dict()
    for key in (
        "rope_parameters",
        "num_hidden_layers",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
    ):
        assert reloaded[key] == original[key], key


def test_reward_model_round_trip_keeps_score_head_one_label_and_pad_token(tmp_path):
    hf_dir = _hf_dir(tmp_path / "hf", transformers.LlamaForSequenceClassification, num_labels=1, pad_token_id=5)
    config, kind = model_checkpoint.convert_hf_to_easyppo(hf_dir, str(tmp_path / "easyppo"))
    assert kind == "reward"
    out = str(tmp_path / "hf_out")
    model_checkpoint.convert_easyppo_to_hf(str(tmp_path / "easyppo"), out)
    _assert_bitwise_equal(_read_safetensors(out), _read_safetensors(hf_dir))
    reloaded = transformers.AutoConfig.from_pretrained(out)
    assert reloaded.architectures == ["LlamaForSequenceClassification"]
    assert (reloaded.num_labels, reloaded.pad_token_id) == (1, 5)


def test_tied_embeddings_are_written_once_as_transformers_does(tmp_path):
    hf_dir = _hf_dir(tmp_path / "hf", tie_word_embeddings=True)
    out = _round_trip(hf_dir, tmp_path)
    tensors = _read_safetensors(out)
    assert "lm_head.weight" not in tensors
    _assert_bitwise_equal(tensors, _read_safetensors(hf_dir))


def test_tokenizer_files_travel_into_the_checkpoint_and_back_out(tmp_path):
    hf_dir = _hf_dir(tmp_path / "hf")
    out = _round_trip(hf_dir, tmp_path)
    for directory in (tmp_path / "easyppo", out):
        for name, text in TOKENIZER_FILES.items():
            with open(os.path.join(directory, name)) as f:
                assert f.read() == text


# ----------------------------------------------------------------------------------- input layouts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_bin_state_dict_is_read_like_the_tensors_it_holds(dtype, tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).to(dtype)
    model.config.save_pretrained(tmp_path)
    state = model.state_dict()
    torch.save(state, tmp_path / "pytorch_model.bin")
    config, _, params = huggingface.load_hf(str(tmp_path), param_dtype="float32")
    expected_down = state["model.layers.1.mlp.down_proj.weight"].float().numpy().T
    np.testing.assert_array_equal(params["model"]["layers_1"]["mlp"]["down_proj"]["kernel"], expected_down)
    np.testing.assert_array_equal(params["lm_head"]["kernel"], state["lm_head.weight"].float().numpy().T)


def test_sharded_bin_files_are_read_through_their_index_slice_by_slice(tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
    model.config.save_pretrained(tmp_path)
    state = model.state_dict()
    names = list(state)
    halves = {
        "pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
        "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :],
    }
    for file, keys in halves.items():
        torch.save({k: state[k] for k in keys}, tmp_path / file)
    weight_map = {k: file for file, keys in halves.items() for k in keys}
    (tmp_path / hf_files.TORCH_INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    mesh = jax.make_mesh((1, 4, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    _, _, params = huggingface.load_hf(str(tmp_path), mesh=mesh)
    q_kernel = params["model"]["layers_1"]["self_attn"]["q_proj"]["kernel"]
    assert not q_kernel.sharding.is_fully_replicated
    np.testing.assert_array_equal(q_kernel, state["model.layers.1.self_attn.q_proj.weight"].numpy().T)
    np.testing.assert_array_equal(params["lm_head"]["kernel"], state["lm_head.weight"].numpy().T)


def test_unreadable_bin_file_is_named(tmp_path):
    transformers.LlamaConfig(**TINY).save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="pytorch_model.bin as a torch state dict"):
        huggingface.load_hf(str(tmp_path))


def test_sharded_safetensors_are_read_through_their_index(tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
    model.save_pretrained(tmp_path, max_shard_size="8KB")
    assert os.path.isfile(tmp_path / hf_files.SAFETENSORS_INDEX_FILE)
    _, _, params = huggingface.load_hf(str(tmp_path))
    expected = model.model.layers[1].self_attn.o_proj.weight.detach().numpy().T
    np.testing.assert_array_equal(params["model"]["layers_1"]["self_attn"]["o_proj"]["kernel"], expected)


def test_legacy_rotary_buffers_in_old_checkpoints_are_ignored(tmp_path):
    hf_dir = _hf_dir(tmp_path)
    tensors = _read_safetensors(hf_dir)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(2, np.float32)
    save_file(tensors, os.path.join(hf_dir, "model.safetensors"))
    _, _, params = huggingface.load_hf(hf_dir)
    np.testing.assert_array_equal(params["model"]["norm"]["scale"], tensors["model.norm.weight"])


# ----------------------------------------------------------------------------------- output layouts


def test_export_above_the_size_cap_is_sharded_with_an_index_transformers_loads(tmp_path):
    config = llama.LlamaConfig(**TINY)
    params = llama.init_params(config, "causal_lm", jax.random.key(0))
    files = huggingface.save_hf(str(tmp_path), config, params, max_shard_bytes=10_000)
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    with open(tmp_path / hf_files.SAFETENSORS_INDEX_FILE) as f:
        weight_map = json.load(f)["weight_map"]
    assert sorted(set(weight_map.values())) == sorted(files)
    for name in files:
        assert os.path.getsize(tmp_path / name) < 10_000 + 2_000  # cap plus the safetensors header
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    np.testing.assert_array_equal(
        model.model.layers[1].mlp.gate_proj.weight.detach().numpy(),
        np.asarray(params["model"]["layers_1"]["mlp"]["gate_proj"]["kernel"]).T,
    )


def test_plan_shards_keeps_order_and_gives_an_oversized_tensor_its_own_shard():
    def planned(name, n):
        return hf_files.PlannedTensor(name, (n,), np.dtype(np.float32), lambda: np.zeros(n, np.float32))

    shards = hf_files.plan_shards([planned("a", 10), planned("b", 10), planned("big", 100), planned("c", 5)], 80)
    assert [[t.name for t in shard] for shard in shards] == [["a", "b"], ["big"], ["c"]]


def test_config_written_without_transformers_is_read_by_transformers(tmp_path, monkeypatch):
    config = llama.LlamaConfig(**{**TINY, "rope_theta": 500000.0}, rope_scaling=llama.RopeScaling())
    hf_config = hf_mapping.hf_config_dict(config, "reward", dtype="bfloat16")
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails
        hf_files.write_config(str(tmp_path), hf_config)
    reloaded = transformers.LlamaConfig.from_pretrained(tmp_path)
    assert reloaded.num_labels == 1 and reloaded.pad_token_id == 0
    assert reloaded.rope_parameters["rope_type"] == "llama3"
    assert reloaded.rope_parameters["rope_theta"] == 500000.0
    assert reloaded.dtype == torch.bfloat16
    assert llama.LlamaConfig.from_hf_dict(reloaded.to_dict()) == config


def test_exporting_into_a_directory_with_weights_is_refused(tmp_path):
    config = llama.LlamaConfig(**TINY)
    params = llama.init_params(config, "causal_lm", jax.random.key(0))
    huggingface.save_hf(str(tmp_path), config, params)
    with pytest.raises(FileExistsError, match="already holds weights"):
        huggingface.save_hf(str(tmp_path), config, params)


# ------------------------------------------------------------------------------ easyppo checkpoints


def test_checkpoint_restores_onto_requested_shardings_and_dtype(tmp_path):
    config = llama.LlamaConfig(**TINY, param_dtype="bfloat16")
    params = llama.init_params(config, "value", jax.random.key(0))
    model_checkpoint.save_checkpoint(str(tmp_path / "ckpt"), config, params, "value")
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp"))
    shardings = jax.tree.map(lambda _: split, params)
    restored_config, kind, restored = model_checkpoint.load_checkpoint(
        str(tmp_path / "ckpt"), shardings=shardings, param_dtype="float32"
    )
    assert kind == "value"
    assert restored_config == config.replace(param_dtype="float32")
    embedding = restored["model"]["embed_tokens"]["embedding"]
    assert embedding.dtype == np.float32 and embedding.sharding == split
    saved = np.asarray(params["model"]["embed_tokens"]["embedding"], np.float32)
    np.testing.assert_array_equal(embedding, saved)


def test_params_that_do_not_match_the_config_are_named(tmp_path):
    config = llama.LlamaConfig(**TINY)
    params = llama.init_params(config, "causal_lm", jax.random.key(0))
    with pytest.raises(ValueError, match="missing model/layers_1/mlp/up_proj/kernel"):
        del params["model"]["layers_1"]["mlp"]["up_proj"]
        model_checkpoint.save_checkpoint(str(tmp_path), config, params, "causal_lm")


# ------------------------------------------------------------------------------------------- CLI


def test_cli_converts_in_a_subprocess_and_prints_the_max_abs_difference(tmp_path):
    hf_dir = _hf_dir(tmp_path / "hf")
    result = subprocess.run(
        [sys.executable, "-m", "easyppo", "convert", "to-easyppo", hf_dir, str(tmp_path / "ckpt"), "--verify"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 0, result.stderr
    line = next(row for row in result.stdout.splitlines() if row.startswith("max abs difference of logits"))
    assert float(line.split(":")[1].split()[0]) <= 1e-4
    assert "OK: within tolerance" in result.stdout


def test_cli_to_hf_then_verify_reports_reward_score_difference(tmp_path, capsys):
    hf_dir = _hf_dir(tmp_path / "hf", transformers.LlamaForSequenceClassification, num_labels=1)
    assert convert_cli.main(["to-easyppo", hf_dir, str(tmp_path / "ckpt"), "--kind", "value"]) == 0
    assert convert_cli.main(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    assert hf_files.read_config(str(tmp_path / "out"))["dtype"] == "bfloat16"
    capsys.readouterr()
    assert convert_cli.main(["verify", hf_dir, "--checkpoint", str(tmp_path / "ckpt"), "--kind", "reward"]) == 0
    output = capsys.readouterr().out
    assert "max abs difference of scores (easyppo vs transformers)" in output


def test_cli_converts_split_over_a_mesh_to_the_same_checkpoint_as_on_one_device(tmp_path):
    hf_dir = _hf_dir(tmp_path / "hf")
    assert convert_cli.main(["to-easyppo", hf_dir, str(tmp_path / "one")]) == 0
    assert convert_cli.main(["to-easyppo", hf_dir, str(tmp_path / "mesh"), "--mesh", "1,-1,1"]) == 0
    _, _, one = model_checkpoint.load_checkpoint(str(tmp_path / "one"))
    _, _, split = model_checkpoint.load_checkpoint(str(tmp_path / "mesh"))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(split), jax.device_get(one))
    assert convert_cli.main(["to-hf", str(tmp_path / "mesh"), str(tmp_path / "back"), "--mesh", "2,2,2"]) == 0
    assert convert_cli.main(["verify", hf_dir, "--checkpoint", str(tmp_path / "mesh")]) == 0


def test_cli_rejects_a_mesh_that_does_not_fit_the_devices(tmp_path, capsys):
    hf_dir = _hf_dir(tmp_path / "hf")
    assert convert_cli.main(["to-easyppo", hf_dir, str(tmp_path / "ckpt"), "--mesh", "3,1,1"]) == 2
    assert "mesh.data=3" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        convert_cli.main(["to-easyppo", hf_dir, str(tmp_path / "ckpt"), "--mesh", "fsdp"])


def test_verify_fails_when_the_checkpoint_differs_from_the_hf_model(tmp_path, capsys):
    hf_dir = _hf_dir(tmp_path / "hf")
    other_dir = _hf_dir(tmp_path / "other", seed=1)
    model_checkpoint.convert_hf_to_easyppo(other_dir, str(tmp_path / "ckpt"))
    result = verify_lib.verify(hf_dir, checkpoint_dir=str(tmp_path / "ckpt"))
    assert result.max_abs_diff > 0.1
    assert convert_cli.main(["verify", hf_dir, "--checkpoint", str(tmp_path / "ckpt")]) == 1
    assert "FAILED" in capsys.readouterr().out


@pytest.mark.parametrize(
    "text, size", [("5GB", 5 * 10**9), ("2GiB", 2 * 2**30), ("500MB", 500 * 10**6), ("1000", 1000)]
)
def test_shard_sizes_parse_like_transformers_max_shard_size(text, size):
    assert convert_cli.parse_size(text) == size


# ------------------------------------------------------------------------------------------ errors


def test_missing_config_json_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        huggingface.load_hf(str(tmp_path))


def test_unsupported_architecture_is_named(tmp_path):
    hf_dir = _hf_dir(tmp_path)
    config = hf_files.read_config(hf_dir)
    config["architectures"] = ["LlamaForTokenClassification"]
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="architecture 'LlamaForTokenClassification' is not supported"):
        huggingface.load_hf(hf_dir)


def test_classifier_with_more_than_one_label_is_rejected(tmp_path):
    hf_dir = _hf_dir(tmp_path, transformers.LlamaForSequenceClassification, num_labels=2)
    with pytest.raises(ValueError, match="num_labels=2; easyppo reward and value models have a single"):
        huggingface.load_hf(hf_dir, "reward")


def test_kind_that_does_not_fit_the_architecture_is_rejected(tmp_path):
    hf_dir = _hf_dir(tmp_path)
    with pytest.raises(ValueError, match="has no score head; load it with kind='causal_lm'"):
        huggingface.load_hf(hf_dir, "reward")


def test_missing_tensor_is_named_with_its_file(tmp_path):
    hf_dir = _hf_dir(tmp_path)
    tensors = _read_safetensors(hf_dir)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, os.path.join(hf_dir, "model.safetensors"))
    path = os.path.join(hf_dir, "model.safetensors")
    with pytest.raises(ValueError, match=f"'model.layers.1.mlp.up_proj.weight' is missing from {path}"):
        huggingface.load_hf(hf_dir)


def test_tensor_whose_shape_contradicts_config_is_named(tmp_path):
    hf_dir = _hf_dir(tmp_path)
    tensors = _read_safetensors(hf_dir)
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 16), np.float32)
    save_file(tensors, os.path.join(hf_dir, "model.safetensors"))
    message = r"k_proj.weight' in .* has shape \[16, 16\], but config.json implies \[8, 16\]"
    with pytest.raises(ValueError, match=message):
        huggingface.load_hf(hf_dir)


def test_unexpected_tensors_are_listed(tmp_path):
    hf_dir = _hf_dir(tmp_path)
    tensors = _read_safetensors(hf_dir)
    tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(16, np.float32)
    save_file(tensors, os.path.join(hf_dir, "model.safetensors"))
    with pytest.raises(ValueError, match="no place for: 'model.layers.0.self_attn.q_proj.bias'"):
        huggingface.load_hf(hf_dir)


def test_directory_without_weights_lists_the_expected_files(tmp_path):
    transformers.LlamaConfig(**TINY).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="expected model.safetensors, model.safetensors.index.json"):
        huggingface.load_hf(str(tmp_path))


def test_reward_export_without_a_pad_token_is_refused():
    config = llama.LlamaConfig(**{**TINY, "pad_token_id": None})
    with pytest.raises(ValueError, match="needs a pad token id"):
        hf_mapping.hf_config_dict(config, "reward", dtype="float32")


def test_cli_reports_bad_input_on_stderr_with_exit_code_2(tmp_path, capsys):
    assert convert_cli.main(["to-easyppo", str(tmp_path), str(tmp_path / "ckpt")]) == 2
    assert capsys.readouterr().err.startswith("error:")


def test_relative_paths_work_everywhere_and_leave_no_stray_folders(tmp_path, monkeypatch, capsys):
    from easyppo.weights import loading

    _hf_dir(tmp_path / "hf")
    monkeypatch.chdir(tmp_path)
    assert convert_cli.main(["to-easyppo", "hf", "ckpt"]) == 0
    assert convert_cli.main(["to-hf", "ckpt", "out"]) == 0
    assert convert_cli.main(["verify", "out", "--checkpoint", "ckpt"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "hf", "out"]  # no orbax temporary left beside them
    model = loading.default_config()
    model.init_from = "ckpt"  # a model source relative to the working directory
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor"))
    config, _, params = loading.load_model(model, "causal_lm", mesh=mesh, rng=jax.random.key(0))
    assert config.vocab_size == TINY["vocab_size"] and params["lm_head"]["kernel"].shape == (16, 64)


# ------------------------------------------------------------------------------- pushing to the hub


class _RecordingHub:
    """Stands in for huggingface_hub.HfApi (the hub is out of reach here): records the calls and
    keeps a copy of what would be uploaded, so the test sees exactly what a user would publish."""

    calls: list = []

    def __init__(self, *args, **kwargs):
        pass

    def create_repo(self, repo_id, *, private=False, exist_ok=False, **kwargs):
        self.calls.append(("create_repo", repo_id, private))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(self, repo_id, *, branch, exist_ok=False, **kwargs):
        self.calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, *, folder_path, repo_id, revision=None, commit_message="", **kwargs):
        self.calls.append(("upload_folder", repo_id, revision, sorted(os.listdir(folder_path))))


def test_to_hf_pushes_the_finished_export_to_a_hub_repository(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", _RecordingHub)
    _RecordingHub.calls = []
    hf_dir = _hf_dir(tmp_path / "hf")
    assert convert_cli.main(["to-easyppo", hf_dir, str(tmp_path / "ckpt")]) == 0
    argv = ["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--push_to_hub=me/tiny@v1", "--private"]
    assert convert_cli.main(argv) == 0
    assert _RecordingHub.calls[:2] == [("create_repo", "me/tiny", True), ("create_branch", "me/tiny", "v1")]
    name, repo, revision, uploaded = _RecordingHub.calls[2]
    assert (name, repo, revision) == ("upload_folder", "me/tiny", "v1")
    assert {"config.json", "model.safetensors"} <= set(uploaded)
    assert "pushed to https://huggingface.co/me/tiny" in capsys.readouterr().out


def test_a_push_the_hub_refuses_is_one_line_naming_the_repository(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hf_dir = _hf_dir(tmp_path / "hf")
    assert convert_cli.main(["to-easyppo", hf_dir, str(tmp_path / "ckpt")]) == 0
    capsys.readouterr()
    assert convert_cli.main(["to-hf", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--push_to_hub=me/tiny"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "'me/tiny'" in err[0], err
    assert (tmp_path / "out" / "model.safetensors").exists()  # the export itself stays


def test_verify_without_torch_says_what_to_install_before_converting_anything(tmp_path, monkeypatch, capsys):
    import importlib.util

    hf_dir = _hf_dir(tmp_path / "hf")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real_find_spec(name, *a)
    )
    assert convert_cli.main(["to-easyppo", hf_dir, str(tmp_path / "ckpt"), "--verify"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "pip install 'easyppo[verify]'" in err[0], err
    assert not (tmp_path / "ckpt").exists()
