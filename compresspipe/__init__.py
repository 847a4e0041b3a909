"""compresspipe: make a PyTorch model smaller and faster from one YAML recipe."""

__version__ = "0.1.0"
