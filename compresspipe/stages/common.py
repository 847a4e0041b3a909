"""Layer selectors shared by several stage configs (no torch). Training settings live in `recipe.training`."""

from __future__ import annotations

Selector = list[str]
SELECTOR_HELP = "module-name globs (e.g. 'features.*'), or 'type:Conv2d' to match by layer type"
