"""Readers for JSONL, JSON, Parquet, HF ``datasets`` and TFDS: values, row numbers, file-level errors."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from easyppo.data.errors import DataConfigError, RowError
from easyppo.data.sources import SourceSpec, expand_paths, read_records

ROWS = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}], "id": 1},
    {"messages": [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Ciao"}], "id": 2},
]


@pytest.fixture
def hf_cache_in_tmp(tmp_path_factory, monkeypatch):
    """Keeps datasets.load_dataset's own cache in a temporary directory instead of ~/.cache."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.mktemp("hf_datasets_cache"))


def read(path):
    return list(read_records(SourceSpec(path=str(path))))


def test_jsonl_rows_carry_their_line_numbers(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    records = read(path)
    assert [(r.source, r.row, r.value) for r in records] == [(str(path), 1, ROWS[0]), (str(path), 3, ROWS[1])]


def test_jsonl_line_that_is_not_json_becomes_an_error_record(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{oops\n")
    records = read(path)
    assert records[1].value is None
    assert str(records[1].error).startswith(f"{path}, row 2: not valid JSON")


def test_jsonl_byte_order_mark_is_ignored(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS[0]).encode() + b"\n")
    assert read(path)[0].value == ROWS[0]


def test_json_array_rows_are_numbered_from_one(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(ROWS))
    assert [(r.row, r.value) for r in read(path)] == [(1, ROWS[0]), (2, ROWS[1])]


def test_json_file_that_is_not_an_array_is_rejected(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"rows": ROWS}))
    with pytest.raises(RowError, match=f"{path}: expected a JSON array of row objects .* got object"):
        read(path)


def test_invalid_json_file_reports_line_and_suggests_jsonl(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n")
    with pytest.raises(RowError, match=r"not valid JSON: Extra data at line 2 column 1 .*name it \.jsonl"):
        read(path)


def test_parquet_rows_with_nested_messages(tmp_path):
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path, row_group_size=1)
    assert [(r.row, r.value) for r in read(path)] == [(1, ROWS[0]), (2, ROWS[1])]


def test_parquet_invalid_utf8_names_row_and_column(tmp_path):
    path = tmp_path / "rows.parquet"
    texts = pa.array([b"fine", b"caf\xe9"], type=pa.binary()).view(pa.string())
    pq.write_table(pa.table({"id": [1, 2], "prompt": texts}), path)
    records = read(path)
    assert records[0].value == {"id": 1, "prompt": "fine"}
    assert str(records[1].error) == f"{path}, row 2, field 'prompt': text is not valid UTF-8"


def test_globs_and_comma_separated_paths_expand_in_order(tmp_path):
    for name in ("b.jsonl", "a.jsonl", "c.parquet"):
        (tmp_path / name).write_text("")
    spec = f"{tmp_path}/c.parquet, {tmp_path}/*.jsonl"
    assert expand_paths(spec) == [f"{tmp_path}/c.parquet", f"{tmp_path}/a.jsonl", f"{tmp_path}/b.jsonl"]


@pytest.mark.parametrize(
    "name, message",
    [
        ("missing.jsonl", "data.path: no such file"),
        ("*.jsonl", "data.path: .* matches no files"),
        ("rows.csv", "data.path: unsupported file type"),
    ],
)
def test_unusable_paths_name_the_config_key(tmp_path, name, message):
    (tmp_path / "rows.csv").write_text("a,b\n")
    with pytest.raises(DataConfigError, match=message):
        expand_paths(str(tmp_path / name))


def test_exactly_one_source_must_be_configured():
    with pytest.raises(DataConfigError, match="set exactly one of data.path, data.hf_dataset and data.tfds_dataset"):
        SourceSpec(path="a.jsonl", hf_dataset="org/name")


def test_hf_dataset_from_a_local_directory_of_files(hf_cache_in_tmp, tmp_path):
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    records = list(read_records(SourceSpec(hf_dataset=str(tmp_path), split="train")))
    assert [(r.source, r.row, r.value) for r in records] == [
        (f"{tmp_path}[train]", 1, ROWS[0]),
        (f"{tmp_path}[train]", 2, ROWS[1]),
    ]


def test_hf_dataset_saved_with_save_to_disk(tmp_path):
    import datasets

    datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "saved"))
    records = list(read_records(SourceSpec(hf_dataset=str(tmp_path / "saved"), split="test")))
    assert [r.value for r in records] == ROWS


def test_hf_dataset_without_the_requested_split_names_the_config_key(tmp_path):
    import datasets

    datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataConfigError, match="data.split: .* has no split 'train'; it has test"):
        list(read_records(SourceSpec(hf_dataset=str(tmp_path / "saved"), split="train")))


def test_hf_dataset_that_cannot_be_loaded_names_the_dataset(hf_cache_in_tmp, tmp_path):
    with pytest.raises(RowError, match=r"\[train\]: cannot load the dataset"):
        list(read_records(SourceSpec(hf_dataset=str(tmp_path / "nothing-here"), split="train")))


def test_tfds_rows_are_converted_to_plain_messages(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    pytest.importorskip("array_record")

    class TinyChats(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            message = {"role": tfds.features.Text(), "content": tfds.features.Text()}
            return tfds.core.DatasetInfo(
                builder=self, features=tfds.features.FeaturesDict({"messages": tfds.features.Sequence(message)})
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i, row in enumerate(ROWS):
                yield i, {"messages": row["messages"]}

    TinyChats(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    spec = SourceSpec(tfds_dataset="tiny_chats", tfds_data_dir=str(tmp_path), split="train")
    values = sorted((r.value for r in read_records(spec)), key=lambda v: v["messages"][0]["content"])
    assert values == sorted(({"messages": r["messages"]} for r in ROWS), key=lambda v: v["messages"][0]["content"])
