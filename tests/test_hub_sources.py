"""Model and tokenizer sources that are Hugging Face hub names, served from a local hub cache (no
network here: the hub is offline, as on these machines, and the cache is laid out as
huggingface_hub lays it out)."""

import shutil

import jax
import numpy as np
import pytest
from helpers.demo_data import DEMO_DATA

from easyppo.core import sharding
from easyppo.data import pipeline
from easyppo.models import llama
from easyppo.weights import hub, huggingface, loading

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TINY = llama.get_preset("tiny", pad_token_id=3, vocab_size=512)


@pytest.mark.parametrize(
    "source,expected",
    [
        ("allenai/tulu-2-13b", True),
        ("meta-llama/Llama-3.1-8B-Instruct@main", True),
        ("allenai/tulu-2-13b@0123abc", True),
        ("runs/demo/sft/hf", False),  # three parts: a path
        ("./org/name", False),
        ("~/org", False),
        ("tulu", False),
        ("gs://bucket/model", False),
    ],
)
def test_what_reads_as_a_hub_name(source, expected):
    assert hub.is_hub_name(source) == expected


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An offline hub whose cache holds ``org/tiny`` (an HF model with the demo tokenizer) at COMMIT."""
    import huggingface_hub.constants as constants

    cache = tmp_path / "hub"
    repo = cache / "models--org--tiny"
    snapshot = repo / "snapshots" / COMMIT
    params = llama.init_params(TINY, "causal_lm", jax.random.key(0))
    huggingface.save_hf(str(snapshot), TINY, params)
    shutil.copy(DEMO_DATA / "tokenizer.model", snapshot / "tokenizer.model")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no local folder org/tiny here
    return params


@pytest.mark.parametrize("source", ["org/tiny", f"org/tiny@{COMMIT}"])
def test_a_hub_name_loads_from_the_hub_cache(offline_hub, source):
    cfg = loading.default_config()
    cfg.init_from = source
    mesh = sharding.make_mesh(sharding.default_config(), jax.devices()[:1])
    config, _, params = loading.load_model(cfg, "causal_lm", mesh=mesh, rng=jax.random.key(1))
    assert config.vocab_size == 512
    np.testing.assert_array_equal(params["lm_head"]["kernel"], offline_hub["lm_head"]["kernel"])


def test_a_hub_name_serves_as_the_tokenizer(offline_hub):
    data = pipeline.default_config()
    data.tokenizer_path, data.pad_id, data.chat_format = "org/tiny", 3, "tulu"
    tokenizer, _ = pipeline.load_tokenizer_and_format(data)
    assert tokenizer.vocab_size == 512


def test_a_name_the_hub_cannot_provide_is_one_line_naming_the_key(offline_hub):
    cfg = loading.default_config()
    cfg.init_from = "org/not-cached"
    with pytest.raises(FileNotFoundError) as error:
        loading.resolve_architecture(cfg)
    message = str(error.value)
    assert message.startswith("model.init_from='org/not-cached' is not a local path, and the Hugging Face hub")
    assert "\n" not in message
