"""What drives the stages: the executor, the run folder (lock, resume, run.json), plan and verify."""
