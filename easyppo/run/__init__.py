"""Running a job: the run config and its single validation pass, the train loop, metric sinks,
multi-host start-up, and sampling a prompts file."""
