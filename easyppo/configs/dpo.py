"""DPO-family presets: ``--config=dpo:<preset>`` (or ``configs/dpo.py:<preset>`` from a checkout).

* ``demo``: DPO on the bundled preference data (demo/make_data.py), starting the policy and the
  reference from the demo's SFT export (``runs/demo/sft/hf``; run configs/sft.py:demo first) with
  precomputed, cached reference log-probs; about a minute on 2 CPU cores. Any loss of the family runs
  on it: ``--config.dpo.loss=ipo``, ``--config.dpo.loss=simpo --config.dpo.beta=2``,
  ``--config.dpo.length_normalize=True``, ``--config.dpo.label_smoothing=0.1``.

* ``tulu25_13b_uf_mean``: the Tulu 2.5 DPO recipe (Ivison et al. 2024, "Unpacking DPO and PPO:
  Disentangling Best Practices for Learning from Preference Feedback", arXiv:2406.09279), as used
  for ``allenai/tulu-v2.5-dpo-13b-uf-mean``. Where each value comes from:

  - start (policy and reference): Tulu 2 13B SFT, ``allenai/tulu-2-13b`` (model card: "base_model").
  - data: ``allenai/tulu-2.5-preference-data``, split ``ultrafeedback_mean_aspects``: UltraFeedback
    binarised by the mean of the fine-grained aspect scores (model card: "Dataset ... specifically
    the ultrafeedback_mean_aspects split"); Tulu chat format (model card: "Input Format").
  - lr 5e-7; linear schedule with warmup ratio 0.1 (linear warmup then linear decay to 0); 3 epochs;
    effective batch 32; Adam betas (0.9, 0.999), eps 1e-8: the "Training hyperparameters" section of
    the Tulu 2.5 DPO model cards, the same values as Tulu 2's DPO (Ivison et al. 2023, "Camels in a
    Changing Climate", arXiv:2311.10702), which the paper says it follows.
  - beta 0.1, plain sigmoid loss, summed log-probs: the paper's DPO setup (after Tulu 2 / Zephyr).
  - sequences of 4096 tokens: the length budget this project's DPO issue specifies for the recipe (not
    re-checked against the paper offline; the Tulu 2 SFT models accept 8192).
  - reference log-probs precomputed: a choice of this library, not of the recipe; it gives the same
    loss as an on-the-fly reference and spares a 13B forward pass per step and the reference's memory.
  - mesh, dtype, remat, scan and gradient accumulation are TPU-pod engineering choices, not part of
    the recipe: effective batch 32 = data.global_batch_size (accumulation splits it, never grows it).

* ``tulu3_8b_dpo_norm``: length-normalised DPO as in Tulu 3 (Lambert et al. 2024, "Tulu 3: Pushing
  Frontiers in Open Language Model Post-Training", arXiv:2411.15124, DPO hyperparameter table for
  the 8B model): ``allenai/Llama-3.1-Tulu-3-8B-SFT`` start, the
  ``allenai/llama-3.1-tulu-3-8b-preference-mixture`` data, lr 5e-7, linear schedule with warmup ratio
  0.1, 1 epoch, effective batch 128, beta 5 (on *mean* log-probs, hence the large beta), sequences
  of 2048 tokens.
"""

from __future__ import annotations

from easyppo.configs.common import DEMO_DATA, apply_demo_settings, apply_pod_settings, demo_runs
from easyppo.run.config import base_config

PRESETS = ("demo", "tulu25_13b_uf_mean", "tulu3_8b_dpo_norm")


def _pod_settings(c, init_from: str) -> None:
    apply_pod_settings(c, init_from=init_from)
    c.dpo.reference = "precomputed"


def get_config(preset: str = "demo"):
    c = base_config("dpo")
    if preset == "demo":
        apply_demo_settings(c, output_name="dpo")
        c.model.init_from = str(demo_runs() / "sft" / "hf")
        c.data.path = str(DEMO_DATA / "preference_train.jsonl")
        c.eval.path = str(DEMO_DATA / "preference_eval.jsonl")
        c.data.num_epochs = 1
        c.optim.learning_rate = 1e-4
        c.optim.warmup_ratio = 0.1
        # A larger beta than the 7B+ recipes: it keeps the tiny policy's log-probs near the SFT
        # model's while the held-out margin grows (with 0.1 both responses' log-probs plunge first).
        c.dpo.beta = 0.5
        c.dpo.reference = "precomputed"
        c.dpo.reference_cache_dir = str(demo_runs() / "cache" / "reference_logprobs")
    elif preset == "tulu25_13b_uf_mean":
        c.output_dir = "runs/tulu25_13b_dpo_uf_mean"
        _pod_settings(c, "allenai/tulu-2-13b")
        c.data.hf_dataset = "allenai/tulu-2.5-preference-data"
        c.data.split = "ultrafeedback_mean_aspects"
        c.data.chat_format = "tulu"
        c.data.max_seq_len = 4096
        c.data.max_prompt_len = 2048
        c.data.global_batch_size = 32  # data * fsdp must divide it: on > 32 chips, set mesh.tensor too
        c.data.num_epochs = 3
        c.train.grad_accum_steps = 1  # raise (e.g. 4) if a 32-pair batch does not fit in memory
        c.optim.learning_rate = 5e-7
        c.optim.schedule = "linear"
        c.optim.warmup_ratio = 0.1
        c.optim.end_lr_ratio = 0.0
        c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
        c.optim.weight_decay = 0.0
        c.dpo.loss = "sigmoid"
        c.dpo.beta = 0.1
    elif preset == "tulu3_8b_dpo_norm":
        c.output_dir = "runs/tulu3_8b_dpo_norm"
        _pod_settings(c, "allenai/Llama-3.1-Tulu-3-8B-SFT")
        c.data.hf_dataset = "allenai/llama-3.1-tulu-3-8b-preference-mixture"
        c.data.chat_format = "tulu"
        c.data.max_seq_len = 2048
        c.data.max_prompt_len = 1024
        c.data.global_batch_size = 128
        c.data.num_epochs = 1
        c.optim.learning_rate = 5e-7
        c.optim.schedule = "linear"
        c.optim.warmup_ratio = 0.1
        c.optim.weight_decay = 0.0
        c.dpo.loss = "sigmoid"
        c.dpo.length_normalize = True
        c.dpo.beta = 5.0
    else:
        raise ValueError(f"unknown dpo preset {preset!r}: use one of {', '.join(PRESETS)}")
    return c
