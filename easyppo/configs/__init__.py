"""Presets, one module per algorithm, each with ``PRESETS`` and ``get_config(preset)``.

Named on the command line as ``--config=ALGORITHM:PRESET`` (``easyppo train --config=ppo:demo``).
They are installed with the package, with the demo's data in ``demo_data/``.
"""
