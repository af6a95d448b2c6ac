"""How do models compare on the same data?

Trains and evaluates a list of configs ("path/to/config.py[:variant]") one
after the other, each in its own workdir under a common one (an existing
workdir resumes, so a comparison can be re-run and extended), and lays their
test results out in one table: retrieval models by median rank per task (the
shape of the DU2MCE paper's Tables 2 and 4), recommendation models by P@K,
R@K and AUC, each beside its random baseline. Configs that generate the same
embedded corpus share one copy of it. A retrieval task whose pair of
modalities no loss term trained (e.g. image->user with l3 = 0) is zero-shot:
marked with * and reported against random like the rest; + marks user tasks
whose users are the mean embedding of their training posts (Avg-Text/Image).
"""

import dataclasses
import importlib.util
import json
import os
from collections.abc import Mapping, Sequence

import ml_collections

from input_pipeline import embedded, records
from sempre_jax import losses, train
from sempre_jax.evals import retrieval

RETRIEVAL_COLUMNS = ("text->user", "image->text", "image->user", "user->text",
                     "text->image", "user->image")
TASK_TERM = {"text->user": "tu", "user->text": "tu", "image->text": "it",
             "text->image": "it", "image->user": "iu", "user->image": "iu"}


def load_config(spec: str) -> ml_collections.ConfigDict:
  """"configs/x.py[:variant]" -> x.get_config([variant])."""
  path, _, variant = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path} not found")
  module_spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def run_name(spec: str) -> str:
  path, _, variant = spec.partition(":")
  name = os.path.splitext(os.path.basename(path))[0]
  return f"{name}:{variant}" if variant else name


@dataclasses.dataclass
class Run:
  name: str
  config: ml_collections.ConfigDict
  results: dict


def run_all(specs: Sequence[str], workdir: str,
            overrides: Mapping[str, object] | None = None, log=print) -> list[Run]:
  """Trains and evaluates every config (with `overrides`, dotted keys)."""
  runs, shared = [], {}
  for spec in specs:
    config = load_config(spec)
    if overrides:
      config.update_from_flattened_dict(dict(overrides))
    name = run_name(spec)
    if not config.data.dir:          # one copy of each embedded corpus
      key = json.dumps(embedded.arguments(config), sort_keys=True)
      if key not in shared:
        shared[key] = embedded.for_config(config, os.path.join(workdir, f"corpus{len(shared)}"))
      config.data.dir = shared[key]
    log(f"\n=== {name} ({spec}) ===")
    _, results = train.train_and_evaluate(
        config, os.path.join(workdir, name.replace(":", "_")), config.data.dir,
        records.read_metadata(config.data.dir))
    runs.append(Run(name, config, results["test"]))
  return runs


def _trained_terms(run: Run) -> set[str]:
  """The loss terms with a non-zero weight in some stage of a DU2MCE run."""
  config = run.config
  stages = [{**config.loss.to_dict(), **dict(s.get("loss") or {})}
            for s in config.get("stages") or [{}]]
  return {t for s in stages for t, w in losses.term_weights(s["l1"], s["l2"]).items() if w > 0}


def format_retrieval(runs: Sequence[Run]) -> str:
  """Median rank per task (random in the last row); * = zero-shot."""
  head = f"{'model':<22}" + "".join(f"{c:>13}" for c in RETRIEVAL_COLUMNS) + f"{'joint':>8}"
  lines = [head, "-" * len(head)]
  for run in runs:
    terms, r = _trained_terms(run), run.results
    averaged = run.config.evals.test.get("user_vectors", "model") != "model"
    cells = []
    for c in RETRIEVAL_COLUMNS:
      mark = ("+" if averaged and "user" in c else "") or ("" if TASK_TERM[c] in terms else "*")
      cells.append(f"{r[c]['median_rank']:>12.1f}{mark or ' '}" if r[c].get("queries")
                   else f"{'-':>12} ")
    lines.append(f"{run.name:<22}" + "".join(cells)
                 + f"{r['joint']['normalised_median_rank']:>8.3f}")
  r = runs[0].results
  joint = sum(r[c]["random_median_rank"] / r[c]["candidates"]
              for c in retrieval.JOINT_TASKS if r[c].get("queries"))
  lines.append(f"{'random':<22}" + "".join(
      f"{r[c]['random_median_rank']:>12.1f} " if r[c].get("queries") else f"{'-':>12} "
      for c in RETRIEVAL_COLUMNS) + f"{joint:>8.3f}")
  lines.append("median rank of the ground truth on the test split (lower is better); "
               "* zero-shot: no loss term trained this pair; + users are the mean "
               "embedding of their training posts; joint = sum of median rank / "
               "candidates over text->user, image->text, image->user")
  return "\n".join(lines)


def format_recommendation(runs: Sequence[Run]) -> str:
  """P@K, R@K, AUC per model, each with its random baseline in brackets."""
  names = [k for k in runs[0].results if k[:2] in ("P@", "R@")] + ["AUC"]
  head = f"{'model':<22}" + "".join(f"{n:>15}" for n in names)
  lines = [head, "-" * len(head)]
  for run in runs:
    r = run.results
    lines.append(f"{run.name:<22}" + "".join(
        f"{r[n]:>7.3f} ({r['random_' + n]:.3f})" for n in names))
  lines.append("per-user means on the held-out actions; (random baseline)")
  return "\n".join(lines)


def format_tables(runs: Sequence[Run]) -> str:
  retrieval = [r for r in runs if r.config.model.get("name", "du2mce") == "du2mce"]
  others = {}
  for r in runs:
    if r not in retrieval:
      others.setdefault(r.config.model.name, []).append(r)
  parts = [format_retrieval(retrieval)] if retrieval else []
  parts += [format_recommendation(group) for group in others.values()]
  return "\n\n".join(parts)

