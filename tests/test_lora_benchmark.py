"""The LoRA savings benchmark measures what it claims: fewer trained parameters, less optimizer state
and less resident memory for LoRA, with both modes timed in the same rounds."""

import argparse
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # benchmarks/ is not an installed package

from benchmarks import lora_savings

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)


@pytest.fixture(scope="module")
def rows(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setattr(lora_savings, "MODEL", TINY)
    args = argparse.Namespace(rank=4, steps=1, rounds=1)
    measured = lora_savings.measure(args, tmp_path_factory.mktemp("b"), algorithms=("dpo",))  # PPO: the same code
    return {(row["algorithm"], row["mode"]): row for row in measured}


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_lora_trains_and_holds_less_than_full_fine_tuning(rows):
    full, adapted = rows[("dpo", "full")], rows[("dpo", "LoRA r=4")]
    assert adapted["trained_params"] < full["trained_params"] / 4
    assert adapted["optimizer_state_bytes"] < full["optimizer_state_bytes"] / 4
    assert adapted["resident_bytes"] < full["resident_bytes"]
    # The full run holds a second policy-sized model (the reference); LoRA's reference is its base.
    assert adapted["held_params"] < full["held_params"]
    for row in (full, adapted):
        assert row["peak_bytes"] > 0 and row["step_time"]["median_s"] > 0
