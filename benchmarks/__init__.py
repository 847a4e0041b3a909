"""`make bench`: the performance claims, measured side by side as ratios in one run."""
