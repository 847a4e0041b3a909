"""Per-layer sensitivity: the task metric after a one-shot change of one layer, without fine-tuning.

Each stage kind that supports it says what it changes (`Stage.sensitivity_settings`, `sensitivity_layers`,
`sensitivity`): prune removes a share of one layer's channels (its coupled group) at several ratios, quantize
makes one layer int8 while the rest stays float, factorize replaces one layer by its low-rank factors at several
ranks. `measure` scores each on a fixed slice of the validation split and caches every layer's curve by the
model's hash and the settings, so a second run (or the prune target allocation of a search trial) does not
measure it again. The `compresspipe sensitivity` command (`.command`) writes the table, `sensitivity.json`
and `sensitivity.html`, measuring layers in parallel processes with `--workers`.

This module imports no torch.
"""

SENSITIVITY_FORMAT = "compresspipe.sensitivity"
SENSITIVITY_VERSION = 1
SENSITIVE_STAGES = ("prune", "quantize", "factorize")
