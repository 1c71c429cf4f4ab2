"""PPO presets: ``--config=ppo:<preset>`` (or ``configs/ppo.py:<preset>`` from a checkout).

* ``demo``: PPO on the bundled prompts (demo/make_data.py), with the policy and the reference from the
  demo's SFT export (``runs/demo/sft/hf``) and the reward and value models from the demo's reward
  model (``runs/demo/rm/hf``); run configs/sft.py:demo and configs/rm.py:demo first (``make demo``
  does). Under a minute on 2 CPU cores. The held-out reward-model score rises from about -0.9 to
  about 9.9 with a KL to the SFT policy of about 1.7 nats per response (2026-11-30, AMD EPYC). The
  KL coefficient is deliberately high: at 0.05 the score ends a little higher (10.2) but the KL
  reaches 8.8 nats and answers lose the task's frame ("The X is a, b and c. So it goes."), the
  reward model being exploited rather than the rule learned.

* ``tulu25_13b_uf_mean``: the Tulu 2.5 PPO recipe (Ivison et al. 2024, "Unpacking DPO and PPO:
  Disentangling Best Practices for Learning from Preference Feedback", arXiv:2406.09279) as this
  project's PPO issue specifies it: Tulu 2 13B SFT policy and reference (``allenai/tulu-2-13b``), the
  70B preference-mixture reward model (``allenai/tulu-v2.5-70b-preference-mix-rm``) scoring and
  initialising the value model, UltraFeedback prompts (``allenai/tulu-2.5-preference-data``, split
  ``ultrafeedback_mean_aspects``, prompts only). Where each value comes from:

  - lr 1e-6 (policy and value), total batch 64, Adam betas (0.9, 0.999) eps 1e-8, linear schedule
    with warmup ratio 0.1, 1 epoch over the prompts, KL coefficient 0.0325: the Tulu 2.5 PPO model
    cards' "Training hyperparameters".
  - gamma 1, lambda 0.95, clip 0.2 (policy and value), value-loss coefficient 0.1, temperature 0.7,
    1024 new tokens, a score of -10 for responses without EOS: the public recipe's remaining values
    (the paper's PPO appendix, as summarised in this project's PPO issue; not re-checked offline).
  - one sample per prompt, one PPO epoch over each rollout as a single minibatch, fixed KL coefficient,
    k1 KL estimate, prompts up to 1024 tokens: this library's reading of the recipe where the sources
    above are silent.
  - mesh, dtype, remat, scan and gradient accumulation are TPU-pod engineering, not the recipe.

  The released ``allenai/tulu-v2.5-ppo-13b-uf-mean`` model card names the 13B UltraFeedback reward
  model (``allenai/tulu-v2.5-13b-uf-rm``) instead; ``tulu25_13b_uf_mean_13b_uf_rm`` is that variant.
"""

from __future__ import annotations

from easyppo.configs.common import DEMO_DATA, apply_demo_settings, apply_pod_settings, demo_runs
from easyppo.run.config import base_config

PRESETS = ("demo", "tulu25_13b_uf_mean", "tulu25_13b_uf_mean_13b_uf_rm")


def _tulu25_ppo(c, *, reward_model: str, output_name: str) -> None:
    c.output_dir = f"runs/{output_name}"
    apply_pod_settings(c, init_from="allenai/tulu-2-13b")
    c.train.preemption_sync_every_steps = 1  # iterations take minutes: agree on a SIGTERM every one
    for model in (c.ppo.reward_model, c.ppo.value_model):
        model.dtype = "bfloat16"
        model.scan_layers = True
    c.ppo.reward_model.init_from = reward_model
    c.ppo.value_model.remat = "dots_no_batch"
    c.data.hf_dataset = "allenai/tulu-2.5-preference-data"
    c.data.split = "ultrafeedback_mean_aspects"
    c.data.chat_format = "tulu"
    c.data.max_prompt_len = 1024
    c.data.global_batch_size = 64
    c.data.num_epochs = 1
    # 64 rollout rows in 2 microbatches of 32, over mesh.tensor=4: divisible on 32-, 64- and 128-chip
    # slices alike (fsdp = chips / 4); the 70B models' 8 KV heads allow tensor up to 8.
    c.train.grad_accum_steps = 2
    c.mesh.tensor = 4
    for optim in (c.optim, c.ppo.value_optim):
        optim.learning_rate = 1e-6
        optim.schedule = "linear"
        optim.warmup_ratio = 0.1
        optim.b1, optim.b2, optim.eps = 0.9, 0.999, 1e-8
    c.ppo.kl_coef = 0.0325
    c.ppo.gamma = 1.0
    c.ppo.lam = 0.95
    c.ppo.clip_ratio = 0.2
    c.ppo.value_clip = 0.2
    c.ppo.vf_coef = 0.1
    c.ppo.sampling.temperature = 0.7
    c.ppo.sampling.max_new_tokens = 1024
    c.ppo.missing_eos_penalty = -10.0
    c.ppo.missing_eos_mode = "replace"
    c.logging.samples_every_steps = 50
    c.checkpoint.save_every_steps = 50


def get_config(preset: str = "demo"):
    c = base_config("ppo")
    if preset == "demo":
        apply_demo_settings(c, output_name="ppo")
        c.model.init_from = str(demo_runs() / "sft" / "hf")
        c.ppo.reward_model.init_from = str(demo_runs() / "rm" / "hf")
        c.data.path = str(DEMO_DATA / "prompts_train.jsonl")
        c.eval.path = str(DEMO_DATA / "prompts_eval.jsonl")
        c.eval.batch_size = 64
        c.data.max_prompt_len = 24
        c.data.global_batch_size = 32
        c.train.num_steps = 40
        c.train.log_every_steps = 5
        c.eval.every_steps = 20
        c.optim.learning_rate = 3e-4
        c.optim.warmup_ratio = 0.1
        c.ppo.value_optim.learning_rate = 1e-4
        c.ppo.value_optim.warmup_ratio = 0.1
        c.ppo.samples_per_prompt = 2
        c.ppo.num_minibatches = 2
        c.ppo.ppo_epochs = 2
        c.ppo.kl_coef = 0.5  # see the module docstring: a small coefficient lets the policy hack the RM
        c.ppo.sampling.temperature = 1.0
        c.ppo.sampling.max_new_tokens = 32
        c.ppo.missing_eos_penalty = -5.0
        c.logging.samples_every_steps = 10
        c.ppo.eval_greedy = False  # sampled held-out responses: the reward the policy is trained on
        c.checkpoint.save_every_steps = 20
    elif preset == "tulu25_13b_uf_mean":
        _tulu25_ppo(c, reward_model="allenai/tulu-v2.5-70b-preference-mix-rm", output_name="tulu25_13b_ppo_uf_mean")
    elif preset == "tulu25_13b_uf_mean_13b_uf_rm":
        _tulu25_ppo(c, reward_model="allenai/tulu-v2.5-13b-uf-rm", output_name="tulu25_13b_ppo_uf_mean_13b_uf_rm")
    else:
        raise ValueError(f"unknown ppo preset {preset!r}: use one of {', '.join(PRESETS)}")
    return c
