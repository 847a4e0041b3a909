"""The shared training loop (train, fine-tuning, distillation, QAT), its losses and data-parallel helpers."""
