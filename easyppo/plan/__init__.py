"""Planning a run before booking hardware (``easyppo plan``): its programs compiled for a target, a
TPU topology through libtpu or this machine's devices, without weights or data; per program XLA's
memory plan and the analytic work, a roofline time, and bounded suggestions when it does not fit."""
