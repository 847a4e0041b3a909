"""What stages use to hand on a model: the model state, its pickle-free files (safetensors + model.json with
the edit log and hand-off records), the edit kinds, and atomic file writes. Imports torch."""
