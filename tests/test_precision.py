"""The compute-dtype policy behind ``model.dtype = "auto"``."""

import pytest

from easyppo.core import precision
from easyppo.weights import loading


@pytest.mark.parametrize(
    "platform,flags,expected",
    [
        ("tpu", frozenset(), "bfloat16"),
        ("gpu", frozenset(), "bfloat16"),
        ("cpu", frozenset({"avx2", "fma"}), "float32"),  # AVX2 only: bf16 is emulated, slower
        ("cpu", frozenset({"avx512f", "avx512_bf16"}), "float32"),  # conversions, no bf16 matmul unit
        ("cpu", frozenset({"avx512f", "amx_tile", "amx_bf16"}), "bfloat16"),  # AMX: native bf16 matmuls
    ],
)
def test_auto_computes_in_bfloat16_only_where_the_hardware_does(platform, flags, expected):
    assert precision.resolve_dtype("auto", platform=platform, flags=flags) == expected


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16"])
def test_an_explicit_dtype_is_kept(name):
    assert precision.resolve_dtype(name, platform="tpu", flags=frozenset()) == name


def test_a_model_config_with_auto_resolves_for_this_machine():
    cfg = loading.default_config()
    cfg.dtype = "auto"
    expected = precision.resolve_dtype("auto")
    assert loading.resolve_architecture(cfg).dtype == expected
    assert expected in ("float32", "bfloat16")
