"""The LLaMA family: config and presets, the trunk and its three heads, the KV cache, LLaMA's
partition rules and mesh-fit checks, the jitted sampler, and sequence helpers. Knows no files."""
