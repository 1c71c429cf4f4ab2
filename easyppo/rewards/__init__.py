"""Verifiable rewards: functions of decoded text that score a response against a row's ground truth.

A reward source is a name in ``easyppo.rewards.functions.BUILTIN`` (``exact_match``, ``numeric``,
``math_verify``, ``format``), the reserved name ``reward_model`` (the run's reward model, scored on the
device), or a user function given as ``module:function``. A run combines several with weights
(``rewards="math_verify,format=0.1"``); ``easyppo.rewards.sources`` parses and evaluates such a spec.

Every function is batched and host-side:

    fn(responses: list[str], answers: list[str | None], prompts: list[str]) -> sequence of floats

Nothing here imports JAX: reward code is plain Python a user can test on strings.
"""
