"""The outputs of a search, from the study's storage alone: trials table, Pareto front, pick, best.yaml, page.

Nothing here runs a trial, so `compresspipe search --pick ...` re-picks from the finished trials, and any worker
(on any machine) can write the outputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from html import escape
from typing import TYPE_CHECKING, Any

from compresspipe.artifacts.files import atomic_write_json, atomic_write_text
from compresspipe.recipe.search import FIGURES, better_direction, figure_names, limit_figure
from compresspipe.recipe.yamlio import dump_yaml
from compresspipe.search import SEARCH_FORMAT, SEARCH_VERSION

if TYPE_CHECKING:
    import optuna

    from compresspipe.search.trial import SearchSetup

STATE_NAMES = {"COMPLETE": "complete", "PRUNED": "stopped early", "FAIL": "failed", "RUNNING": "running",
               "WAITING": "waiting"}


def trial_rows(trials: list[optuna.trial.FrozenTrial], objectives: list[str]) -> list[dict[str, Any]]:
    rows = []
    # an interrupted trial's folder moves to the trial that retries it
    moved = {str(t.user_attrs["retry_of"]): t.user_attrs.get("folder") for t in trials if t.user_attrs.get("retry_of")}
    for t in trials:
        ua = t.user_attrs
        if ua.get("surplus"):  # asked for by racing workers after the budget was reached: it ran nothing
            continue
        state = STATE_NAMES.get(t.state.name, t.state.name.lower())
        if state == "failed" and ua.get("interrupted"):
            state = "interrupted"
        values = dict(zip(objectives, t.values, strict=False)) if t.values is not None else {}
        rows.append({
            "number": t.number, "state": state, "params": dict(t.params), "values": values,
            "figures": ua.get("figures") or ua.get("early_figures") or {}, "gates_passed": ua.get("gates_passed"),
            "gates": ua.get("gates") or [], "host": ua.get("host"),
            "folder": _folder(state, ua.get("folder"), moved),
            "seconds": ua.get("seconds"), "error": ua.get("error"), "stopped": ua.get("stopped"),
            "retry_of": ua.get("retry_of"), "reused": ua.get("reused"), "threads": ua.get("threads"),
        })
    return rows


def _folder(state: str, folder: Any, moved: dict[str, Any]) -> str | None:
    name = str(folder or "").rsplit("/", 1)[-1]
    if state == "interrupted" and name in moved:
        return f"-> {moved[name]}"
    return None if folder is None else str(folder)


def feasible(row: dict[str, Any]) -> bool:
    """A complete trial whose run passed the recipe's gates."""
    return row["state"] == "complete" and row.get("gates_passed") is not False


def _better(a: dict[str, Any], b: dict[str, Any], objectives: Mapping[str, str]) -> bool:
    """a dominates b: at least as good in every objective, better in one."""
    strictly = False
    for name, direction in objectives.items():
        x, y = a["figures"].get(name), b["figures"].get(name)
        if x is None or y is None:
            return False
        if direction == "maximize":
            x, y = -x, -y
        if x > y:
            return False
        strictly = strictly or x < y
    return strictly


def pareto_front(rows: list[dict[str, Any]], objectives: Mapping[str, str]) -> list[int]:
    """Numbers of the feasible trials no other feasible trial dominates in the objectives."""
    pool = [r for r in rows if feasible(r) and all(r["figures"].get(o) is not None for o in objectives)]
    return [r["number"] for r in pool if not any(_better(o, r, objectives) for o in pool if o is not r)]


def default_pick(setup: SearchSetup) -> dict[str, Any]:
    spec = setup.spec
    if spec.pick is not None:
        return dict(spec.pick)
    first, direction = next(iter(spec.objectives.items()))
    return {direction: first}


def pick(rows: list[dict[str, Any]], rule: dict[str, Any], objectives: Mapping[str, str],
         names: list[str]) -> tuple[dict[str, Any] | None, str]:
    """The trial the rule picks among the feasible ones (ties: the objectives in order, then the earlier trial),
    and a sentence saying why or why none."""
    goal = "minimize" if "minimize" in rule else "maximize"
    figure = str(rule[goal])
    limits = [(k, limit_figure(k, names), float(v)) for k, v in rule.items() if k not in ("minimize", "maximize")]

    def fits(row: dict[str, Any]) -> bool:
        for key, fig, limit in limits:
            value = row["figures"].get(fig) if fig else None
            if value is None or (key.startswith("max_") and value > limit + 1e-12) or \
                    (key.startswith("min_") and value < limit - 1e-12):
                return False
        return row["figures"].get(figure) is not None

    done = [r for r in rows if r["state"] == "complete"]
    pool = [r for r in done if feasible(r) and fits(r)]
    text = ", ".join(f"{k}={v}" for k, v in rule.items())
    if not pool:
        why = (f"no finished trial passes the recipe's gates and {text}" if done else "no trial has finished")
        return None, why

    def key(row: dict[str, Any]) -> tuple:
        sign = 1 if goal == "minimize" else -1
        ties = [row["figures"].get(o) * (1 if d == "minimize" else -1) for o, d in objectives.items()
                if row["figures"].get(o) is not None]
        return (sign * row["figures"][figure], *ties, row["number"])

    best = min(pool, key=key)
    return best, f"trial {best['number']}: {goal} {figure} among {len(pool)} of {len(done)} finished trial(s) that " \
                 f"pass the gates" + (f" and {', '.join(k for k, _, _ in limits)}" if limits else "")


def _fmt(name: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if name == "bytes":
        from compresspipe.report.build import fmt_bytes

        return fmt_bytes(int(value))  # KiB/MiB, as every size compresspipe prints
    if name in ("accuracy", "accuracy_drop", "sparsity"):
        return f"{100 * value:.2f}%"
    if name.startswith("latency_b"):
        return f"{value:.4f} ms"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def columns(setup: SearchSetup) -> list[str]:
    """The figures the table shows: the objectives, then accuracy, bytes and the deploy latencies."""
    names = figure_names(setup.recipe.deploy_batch_sizes())
    shown = list(setup.spec.objectives)
    for extra in ("accuracy", "accuracy_drop", "bytes", *[n for n in names if n.startswith("latency_b")]):
        if extra not in shown:
            shown.append(extra)
    return shown


def table_rows(setup: SearchSetup, doc: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    figures = columns(setup)
    params = list(setup.spec.space)
    header = ["#", "state", *params, *figures, "gates", "folder"]
    out = []
    for row in doc["trials"]:
        mark = " *" if row["number"] in doc["pareto"] else ""
        mark += " <- picked" if row["number"] == doc["picked"] else ""
        gates = "" if row["gates_passed"] is None else ("pass" if row["gates_passed"] else "FAIL")
        out.append([f"{row['number']}{mark}", row["state"],
                    *[_param(row["params"].get(p)) for p in params],
                    *[_fmt(f, row["figures"].get(f)) for f in figures], gates, str(row.get("folder") or "")])
    return header, out


def _param(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def build(setup: SearchSetup, study: optuna.Study, storage: str, rule: dict[str, Any] | None = None) -> dict[str, Any]:
    """search.json's content."""
    spec = setup.spec
    rows = trial_rows(study.get_trials(deepcopy=False), list(spec.objectives))
    rule = rule or default_pick(setup)
    names = figure_names(setup.recipe.deploy_batch_sizes())
    chosen, why = pick(rows, rule, spec.objectives, names)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    return {
        "format": SEARCH_FORMAT, "version": SEARCH_VERSION, "recipe": setup.recipe.name, "study": study.study_name,
        "storage": storage, "sampler": spec.sampler, "n_trials": spec.trials(),
        "objectives": dict(spec.objectives), "judged_stage": setup.judged(),
        "space": {k: d.describe() for k, d in spec.space.items()}, "pick": rule, "picked": None if chosen is None
        else chosen["number"], "pick_reason": why, "pareto": pareto_front(rows, spec.objectives), "counts": counts,
        "trials": rows,
    }


def write(setup: SearchSetup, doc: dict[str, Any]) -> None:
    """search.json, search.html and best.yaml (removed when no trial is picked) in the search folder."""
    folder = setup.folder
    atomic_write_json(folder / "search.json", doc)
    atomic_write_text(folder / "search.html", render_html(setup, doc))
    best = folder / "best.yaml"
    chosen = next((r for r in doc["trials"] if r["number"] == doc["picked"]), None)
    if chosen is None:
        best.unlink(missing_ok=True)
        return
    figures = ", ".join(f"{f} {_fmt(f, chosen['figures'].get(f))}" for f in columns(setup))
    rule = ", ".join(f"{k}={v}" for k, v in doc["pick"].items())
    header = (f"# best.yaml: trial {chosen['number']} of search {setup.recipe.name!r} (study {doc['study']!r}), "
              f"picked by {rule}\n"
              f"# its shipped file ({doc['judged_stage']}): {figures}\n"
              f"# searched values: {', '.join(f'{k}={_param(v)}' for k, v in chosen['params'].items())}\n"
              f"# a plain recipe: `compresspipe run best.yaml` then `compresspipe verify` on its run folder reproduce "
              f"it; its run is {chosen.get('folder')}/ in the search folder\n"
              f"# the trial trained with {chosen.get('threads')} torch thread(s); CPU training is bit-exact only with "
              f"the same count: OMP_NUM_THREADS={chosen.get('threads')} compresspipe run best.yaml\n")
    atomic_write_text(best, header + dump_yaml(setup.trial_data(chosen["params"], None)))


def render_html(setup: SearchSetup, doc: dict[str, Any]) -> str:
    from compresspipe.report.html import page, scatter, table

    trials = doc["trials"]
    done = [r for r in trials if r["state"] == "complete"]
    names = [f"#{r['number']}" for r in done]
    accs = [r["figures"].get("accuracy") for r in done]
    costs = [f for f in columns(setup) if f not in ("accuracy", "accuracy_drop") and better_direction(f) == "minimize"]
    counts = ", ".join(f"{n} {s}" for s, n in doc["counts"].items())
    meta = (f"Study {doc['study']} in {doc['storage']}, sampler {doc['sampler']}, {len(trials)} trial(s) ({counts}). "
            f"Objectives: {', '.join(f'{d} {o}' for o, d in doc['objectives'].items())}, measured on the shipped "
            f"file of stage {doc['judged_stage']}; constraints: the recipe's gates. Pick: {doc['pick_reason']}.")
    body = ['<h2 id="pareto">Pareto front</h2>', '<div class="plots">']
    for cost in costs:
        label = FIGURES.get(cost, ("", ""))[0] or cost
        body += ["<figure>", scatter(f"accuracy vs {cost}", cost, names,
                                     [r["figures"].get(cost) for r in done], accs),
                 f"<figcaption>Every finished trial; red: no other trial is both at least as accurate and at least "
                 f"as low in {escape(cost)} ({escape(label)}).</figcaption>", "</figure>"]
    body.append("</div>")
    header, rows = table_rows(setup, doc)
    classes = [" ".join(c for c in ("pareto" if r["number"] in doc["pareto"] else "",
                                    "reference" if r["number"] == doc["picked"] else "") if c) for r in trials]
    body += ['<h2 id="trials">Trials</h2>',
             table(header, rows, {1, *range(2, 2 + len(setup.spec.space)), len(header) - 1}, classes,
                   cell_classes={"pass": "pass", "FAIL": "fail"}),
             '<p class="meta">\u2605 on the Pareto front of every objective (among trials that pass the gates). '
             'Bold: the picked trial (best.yaml). Each trial is a run folder with its own report.html.</p>']
    problems = [r for r in trials if r.get("error") or r.get("stopped")]
    if problems:
        body += ['<h2 id="failed">Stopped and failed trials</h2>', '<ul class="notes">']
        body += [f"<li><strong>#{r['number']}</strong>: {escape(str(r.get('stopped') or r.get('error')))}</li>"
                 for r in problems]
        body.append("</ul>")
    return page(f"compresspipe search: {setup.recipe.name}", meta, body)
