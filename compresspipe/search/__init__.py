"""`compresspipe search`: a recipe's `search:` block run as an Optuna study.

Optuna schedules and stores the trials (its samplers, its RDB and journal storages, its heartbeat and retry of
failed trials); this package turns a trial into an ordinary run of a plain recipe and back into numbers.

- `study`: where the study lives (SQLite in the search folder, any SQLAlchemy URL, a journal file), the sampler,
  and the study's identity (the search recipe it was created for, stored with it).
- `trial`: one trial: the recipe with the sampled values, run into `trials/NNNN/` (starting from an earlier
  trial's finished stages when their recipe is the same up to there), stopped early when hopeless; its figures,
  gates and folder go to the trial's attributes.
- `results`: the trials table, the Pareto front, the pick, best.yaml and the search page, all from the storage,
  so `--pick` re-picks without running anything and any machine can write them.
- `driver`: the workers: local processes (`--workers`), others that `--join`, recovery of trials a killed
  worker left running.

The search folder (default runs/<name>-search/):
  search.yaml    the search recipe (what --join DIR reads)      study.db      the default storage
  trials/NNNN.yaml, trials/NNNN/   each trial's plain recipe and run folder
  search.json    trials, Pareto front and pick (format compresspipe.search, version 1)
  search.html    the trials table and the Pareto plots           best.yaml     the picked trial's plain recipe
"""

SEARCH_FORMAT = "compresspipe.search"
SEARCH_VERSION = 1
