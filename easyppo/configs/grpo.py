"""Group-RL presets: ``--config=grpo:<preset>`` (or ``configs/grpo.py:<preset>`` from a checkout).

* ``demo``: GRPO on the bundled counting task (demo/make_data.py): each prompt asks for a description
  "with N nice words" (N is 0 or 3) and its ``answer`` is N; the reward (easyppo/configs/demo_rewards.py)
  is 1 when the response keeps the demo's frame and uses exactly N cheerful words. The policy starts
  from the demo's SFT export (``runs/demo/sft/hf``; run configs/sft.py:demo first, ``make demo`` does),
  which mixes moods at random and is right well under a tenth of the time at temperature 1. No reward
  model, no critic, no reference (no KL term). Held-out accuracy is measured on sampled responses (the
  policy being trained), as the PPO demo measures its reward. About a minute on 2 CPU cores.

Pod presets start from Tulu 3 8B DPO (``allenai/Llama-3.1-Tulu-3-8B-DPO``, a Llama 3.1 8B) and
reward mathematical correctness with the ``math_verify`` source (the ``math`` extra). Where a value
comes from is noted value by value; "not checked offline" marks values taken from memory of a paper
or script that could not be re-read from this machine.

* ``tulu3_8b_rlvr``: GRPO with verifiable rewards as AllenAI's open-instruct runs it for Tulu 3.1
  (``open_instruct/grpo_fast.py`` launch scripts in allenai/open-instruct): KL as a k3 loss term with
  beta 0.01, 16 samples per prompt, learning rate 5e-7, 64 unique prompts per rollout (the scripts
  use 48 or 64), ``ground_truth`` as the answer field, data ``allenai/RLVR-GSM-MATH-IF-Mixed-Constraints``.
  Not checked offline: temperature 1.0 and 2048 new tokens (the code-RL scripts' value). The
  dataset's instruction-following rows need IFEval-style verifiers, which easyppo does not ship:
  ``math_verify`` scores them 0, so filter the set to its GSM8K and MATH rows (or add a
  ``module:function`` source for the constraints).
* ``dr_grpo``: Dr.GRPO's corrections (Liu et al. 2025, "Understanding R1-Zero-like training",
  arXiv:2503.20783): group-mean advantages without the std division, each response's token sum
  divided by the constant generation budget (``seq-mean-token-sum-norm``), no KL term, clip 0.2.
  Not checked offline: learning rate 1e-6, 8 samples per prompt, temperature 1.0, 3000 new tokens
  and 128 prompts per rollout (the paper's Oat-Zero runs on Qwen2.5-Math-7B, here on a Llama start).
* ``dapo``: DAPO (Yu et al. 2025, arXiv:2503.14476): clip-higher (0.2 low, 0.28 high), token-mean
  loss over the whole batch, dynamic sampling, soft overlong punishment over the last 4096 of 20480
  tokens (factor 1.0), no KL term, learning rate 1e-6, 16 samples per prompt, 512 prompts per
  rollout in 16 minibatches (512 responses each), temperature 1.0, data
  ``BytedTsinghua-SIA/DAPO-Math-17k`` (answer at ``reward_model.ground_truth``). Not checked offline:
  every value is from the paper's experimental settings as remembered; the paper trains Qwen2.5-32B.
  It does not fit a TPU pod yet (``easyppo plan``, easyppo/configs/pod_slices.py): scoring 20,480-token
  responses needs each attention layer's T x T scores, about 15 GB per row, and easyppo has no
  blockwise attention kernel. Shorter responses do: with ``sampling.max_new_tokens=8192`` and
  ``overlong_buffer=2048`` it plans at 63 GiB per chip on a v5p-256 (``rollout_batch_size=32``, remat
  ``full``, 16 microbatches), about 9 minutes per iteration at the roofline.
"""

from __future__ import annotations

from easyppo.configs.common import DEMO_DATA, apply_demo_settings, apply_pod_settings, demo_runs
from easyppo.run.config import base_config

PRESETS = ("demo", "tulu3_8b_rlvr", "dr_grpo", "dapo")
TULU3_8B_DPO = "allenai/Llama-3.1-Tulu-3-8B-DPO"
# (Hugging Face dataset, its answer field)
RLVR_MIXTURE = ("allenai/RLVR-GSM-MATH-IF-Mixed-Constraints", "ground_truth")
DAPO_MATH = ("BytedTsinghua-SIA/DAPO-Math-17k", "reward_model.ground_truth")


def _pod_rlvr(c, *, output_name: str, dataset: tuple[str, str]) -> None:
    """What every pod preset shares: the start, the data, the chat format, math rewards, pod engineering."""
    c.output_dir = f"runs/{output_name}"
    c.data.hf_dataset, c.data.answer_field = dataset
    c.data.split = "train"
    apply_pod_settings(c, init_from=TULU3_8B_DPO, save_every_steps=50)
    c.train.preemption_sync_every_steps = 1  # iterations take minutes: agree on a SIGTERM every one
    c.data.kind = "prompt"
    c.data.chat_format = "tulu"
    c.data.max_prompt_len = 1024
    c.data.num_epochs = 1
    c.grpo.rewards = "math_verify"
    c.grpo.rollout_dtype = "bfloat16"
    c.grpo.importance_correction = "tis"  # the bfloat16 sampler's mismatch, corrected (cap C = 2)
    c.grpo.sampling.temperature = 1.0
    c.mesh.tensor = 4
    c.logging.samples_every_steps = 50


def get_config(preset: str = "demo"):
    c = base_config("grpo")
    if preset == "demo":
        apply_demo_settings(c, output_name="grpo")
        c.model.init_from = str(demo_runs() / "sft" / "hf")
        c.data.kind = "prompt"
        c.data.path = str(DEMO_DATA / "counting_train.jsonl")
        c.eval.path = str(DEMO_DATA / "counting_eval.jsonl")
        c.eval.batch_size = 64
        c.data.max_prompt_len = 40
        c.data.global_batch_size = 16
        c.train.num_steps = 120
        c.train.log_every_steps = 5
        c.eval.every_steps = 40
        c.optim.learning_rate = 5e-4
        c.optim.warmup_ratio = 0.1
        c.grpo.rewards = "easyppo.configs.demo_rewards:nice_word_count"
        c.grpo.advantage_estimator = "grpo"
        c.grpo.samples_per_prompt = 8
        c.grpo.num_minibatches = 2
        c.grpo.kl_coef = 0.0
        c.grpo.kl_loss_coef = 0.0
        c.grpo.sampling.temperature = 1.0
        c.grpo.sampling.max_new_tokens = 32
        c.grpo.loss_aggregation = "token-mean"
        c.grpo.eval_greedy = False
        c.logging.samples_every_steps = 10
        c.checkpoint.save_every_steps = 20
    elif preset == "tulu3_8b_rlvr":
        _pod_rlvr(c, output_name="tulu3_8b_rlvr", dataset=RLVR_MIXTURE)
        c.data.global_batch_size = 64
        c.grpo.advantage_estimator = "grpo"
        c.grpo.samples_per_prompt = 16
        c.grpo.kl_loss_coef = 0.01
        c.grpo.kl_coef = 0.0
        c.grpo.sampling.max_new_tokens = 2048
        c.optim.learning_rate = 5e-7
        c.optim.schedule = "linear"
        c.train.grad_accum_steps = 8
    elif preset == "dr_grpo":
        _pod_rlvr(c, output_name="dr_grpo_tulu3_8b", dataset=RLVR_MIXTURE)
        c.data.global_batch_size = 128
        c.grpo.advantage_estimator = "dr_grpo"
        c.grpo.loss_aggregation = "seq-mean-token-sum-norm"
        c.grpo.samples_per_prompt = 8
        c.grpo.kl_coef = 0.0
        c.grpo.kl_loss_coef = 0.0
        c.grpo.clip_ratio = 0.2
        c.grpo.sampling.max_new_tokens = 3000
        c.optim.learning_rate = 1e-6
        c.optim.schedule = "constant"
        c.train.grad_accum_steps = 8
    elif preset == "dapo":
        _pod_rlvr(c, output_name="dapo_tulu3_8b", dataset=DAPO_MATH)
        c.data.global_batch_size = 512
        c.grpo.advantage_estimator = "grpo"
        c.grpo.samples_per_prompt = 16
        c.grpo.num_minibatches = 16
        c.grpo.clip_ratio = 0.2
        c.grpo.clip_ratio_high = 0.28
        c.grpo.loss_aggregation = "token-mean"
        c.grpo.dynamic_sampling = True
        c.grpo.max_sampling_rounds = 3
        c.grpo.kl_coef = 0.0
        c.grpo.kl_loss_coef = 0.0
        c.grpo.sampling.max_new_tokens = 20480
        c.grpo.overlong_buffer = 4096
        c.grpo.overlong_penalty = 1.0
        c.optim.learning_rate = 1e-6
        c.optim.schedule = "constant"
        c.train.grad_accum_steps = 4
    else:
        raise ValueError(f"unknown grpo preset {preset!r}: use one of {', '.join(PRESETS)}")
    return c
