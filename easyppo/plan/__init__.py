"""Planning a run before booking hardware: compile its programs for a target topology and report
memory, FLOPs and a roofline time (work in progress on the ``planner`` branch; see issue #15)."""
