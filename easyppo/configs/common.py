"""Settings shared by the presets in this package.

The demo's data (``demo_data/``, written by the repository's demo/make_data.py) ships inside the
package, so ``easyppo train --config=sft:demo`` works after a plain ``pip install`` from any
directory; demo outputs go to ``runs/demo/`` below the working directory the presets are built in.
"""

from __future__ import annotations

import pathlib

DEMO_DATA = pathlib.Path(__file__).resolve().parent / "demo_data"


def demo_runs() -> pathlib.Path:
    """Where the demo writes: ``runs/demo`` below the working directory when a preset is built, made
    absolute so a stage finds the previous stage's output."""
    return pathlib.Path.cwd() / "runs" / "demo"


def apply_demo_settings(c, *, output_name: str) -> None:
    """The bundled demo: the tiny model and tokenizer, short sequences, CPU-sized batches."""
    c.output_dir = str(demo_runs() / output_name)
    c.train.export_hf_dir = c.get_ref("output_dir") + "/hf"  # follows an overridden output_dir
    c.model.preset = "tiny"
    c.model.vocab_size = 512
    c.model.pad_token_id = 3
    c.model.max_position_embeddings = 128
    c.data.tokenizer_path = str(DEMO_DATA / "tokenizer.model")
    c.data.pad_id = 3
    c.data.chat_format = "tulu"
    c.data.max_seq_len = 64
    c.data.max_prompt_len = 40
    c.data.global_batch_size = 32
    c.data.num_proc = 1
    c.data.cache_dir = str(demo_runs() / "cache")
    c.checkpoint.save_every_steps = 50
    c.checkpoint.max_to_keep = 2
    c.logging.progress_bar = True
    c.train.log_every_steps = 10


def apply_pod_settings(c, *, init_from: str, save_every_steps: int = 500) -> None:
    """Large-model engineering shared by the accelerator presets (not part of any recipe).

    ``init_from`` is a Hugging Face hub name in the presets (downloaded once into the hub cache, see
    easyppo/weights/hub.py), or a local copy of that checkpoint.
    """
    c.model.init_from = init_from
    c.data.tokenizer_path = init_from
    c.model.dtype = "bfloat16"
    c.model.remat = "dots_no_batch"
    c.model.scan_layers = True
    c.mesh.fsdp = -1
    c.checkpoint.save_every_steps = save_every_steps
