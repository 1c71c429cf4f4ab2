"""Test-wide setup: an 8-device emulated CPU mesh and no network.

No persistent compilation cache: with jaxlib 0.10.2 on CPU, an executable with cross-device
collectives loaded back from the cache can hang in its all-reduce rendezvous (seen here with the
8 emulated devices), which costs far more than the compile time it saves.

The environment variables must be set before JAX initialises a backend, which is why they live at the
very top of this file rather than in a fixture.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The planner's tests describe TPU topologies with libtpu in every pytest worker at once (easyppo
# plan sets this for itself); without it libtpu refuses all but one process.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax

# With 8 emulated devices on 2 cores, several asynchronously dispatched programs that each run a
# collective can wait on one another's threads forever (an all-reduce rendezvous never completes).
# Synchronous CPU dispatch keeps one program in flight at a time; real accelerators are unaffected.
jax.config.update("jax_cpu_enable_async_dispatch", False)
