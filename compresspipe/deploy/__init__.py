"""Time what ships: every row of the report as the file the deploy runtime runs.

`recipe.deploy` names the runtime (torch, onnxruntime, executorch) and the CPUs the files must be correct on.
For each row (baseline and every stage) `stages.ship` writes that runtime's file into the stage folder
(`deploy/`; an export stage's own file is reused) with the writers of `compresspipe.runtimes` and measures its
accuracy and loss on the whole validation split; after the last stage this package times every row's file
interleaved with the reference's, so load on the machine hits them alike and the spread of the per-round ratios
bounds the noise.

Imports torch; the recipe layer must not import this package (`runtimes.cpu` is the torch-free part).
"""
