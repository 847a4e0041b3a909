"""Executor, run folder, artifacts (save/load with an edit log), resume and reports. Imports torch."""
