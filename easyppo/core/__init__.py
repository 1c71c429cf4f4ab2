"""Pure JAX numerics with no model names, files or config objects: log-prob and RL ops, gradient
accumulation and the guarded optimizer update, optimizers and schedules, the mesh and the
partition-rule machinery, and multi-host agreement."""
