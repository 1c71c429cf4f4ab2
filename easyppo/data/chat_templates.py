"""The built-in chat formats written as Hugging Face Jinja chat templates, for exported models.

An export carries the template of the format its run trained with, so that
``tokenizer.apply_chat_template(messages, add_generation_prompt=True)`` in ``transformers`` gives the
very ids easyppo trained and sampled with (tests/test_export_chat_template.py checks it token for
token). Each template starts with ``bos_token`` because ``apply_chat_template`` tokenises its text
without adding special tokens, and trims contents as the formats do.
"""

from __future__ import annotations

TULU = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' + message['content'] | trim + eos_token }}{% if not loop.last %}{{ '\\n' }}{% endif %}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] | trim + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)

LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

PLAIN = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['content'] }}{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)

BY_FORMAT = {"tulu": TULU, "llama3": LLAMA3, "plain": PLAIN}
