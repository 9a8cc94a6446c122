"""Seconds per accounting call of `tfdp-train`: epsilon, noise calibration, step-limit search.

What `tfdp-train` computes before and while it trains, for one setting (noise multiplier sigma,
Poisson rate q, steps, delta), with the PLD accountant on its default grid (1e-4):

  epsilon         `PrivacySpec(...).epsilon()` of the whole run (a `--noise_multiplier` run
                  computes it when it plans, then once per epoch and for the export);
  calibration     `calibrate_noise_multiplier(target, delta, q, steps)` (an `--epsilon` run);
                  the target is the setting's own epsilon, so the answer is close to sigma;
  step limit      `budget.max_steps_within(spec, target)`, the PrivacyBudget's search: "warm"
                  right after the calibration in the same process (as tfdp-train runs it),
                  "cold" in a process that computed nothing before (caches cleared).

The grid: the 16 corners of sigma {0.3, 20} x q {1e-5, 1} x steps {1, 1e6} x delta {1e-9,
0.1}, interior points, and the cases named in issue 14 (calibration at delta 0.1 over 2 steps;
the step limit for sigma 5, q 1e-4, target 1; the default tfdp-train run). Every answer is
checked in the child (the step limit s: epsilon(s) <= target < epsilon(s + 1); the calibrated
sigma: epsilon <= target).

Each case runs in its own subprocess (fresh caches, its own peak memory) with a time limit,
importing a copy of tfdp_prune/ made at the start (edits during the run change nothing);
`--code=DIR` copies DIR/tfdp_prune instead (e.g. a checkout of an older commit, to compare).

Usage (from the repo root; about 10-15 minutes on 2 cores):
  /work/main/.venv/bin/python benchmarks/accounting.py --out=benchmarks/results/accounting.json
"""

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import provenance  # benchmarks/provenance.py (the script's directory is on sys.path)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DIGITS_Q = 100 / 1258  # tfdp-train's default run: batch 100 of the 1258 private digits


def _cases():
  """(name, settings): sigma/q/steps/delta as a --noise_multiplier run has them; with a
  `target` but no sigma, a calibration (an --epsilon run); with sigma and target but no
  steps, the step-limit search alone."""
  cases = []
  for sigma in (0.3, 20.0):
    for q in (1e-5, 1.0):
      for steps in (1, 10**6):
        for delta in (1e-9, 0.1):
          cases.append((f"corner sigma={sigma:g} q={q:g} steps={steps:g} delta={delta:g}",
                        dict(sigma=sigma, q=q, steps=steps, delta=delta)))
  for sigma, q, steps, delta in ((1.0, 0.01, 1000, 1e-5), (0.5, 0.1, 100, 1e-3),
                                 (2.0, 1e-3, 10**4, 1e-7), (5.0, 1e-4, 10**5, 1e-6),
                                 (0.3, 1e-3, 10**5, 1e-5), (10.0, 0.3, 10**4, 1e-9)):
    cases.append((f"interior sigma={sigma:g} q={q:g} steps={steps:g} delta={delta:g}",
                  dict(sigma=sigma, q=q, steps=steps, delta=delta)))
  cases += [
      ("issue 14: default tfdp-train run (epsilon 8, delta 1e-5, 189 steps)",
       dict(target=8.0, q=DIGITS_Q, steps=189, delta=1e-5)),
      ("issue 14: --delta=0.1 --steps=2 (epsilon 8)",
       dict(target=8.0, q=DIGITS_Q, steps=2, delta=0.1)),
      ("issue 14: step limit, sigma 5, q 1e-4, target 1 (delta 1e-5)",
       dict(sigma=5.0, q=1e-4, delta=1e-5, target=1.0)),
      ("degenerate: delta 0.1 >= q * steps (epsilon 0 for every sigma), epsilon 8",
       dict(target=8.0, q=1e-5, steps=1, delta=0.1)),
  ]
  return cases


# ------------------------------------------------------------------------------------------------
# Child: one case.


def _clear_caches(accounting, budget):
  accounting._epsilon.cache_clear()  # pylint: disable=protected-access
  budget.max_steps_within.cache_clear()
  pld = sys.modules.get("tfdp_prune._pld")
  if pld is not None:
    pld._one_step.cache_clear()  # pylint: disable=protected-access


def _counts(accounting):
  pld = sys.modules.get("tfdp_prune._pld")
  builds = pld._one_step.cache_info().misses if pld is not None else None  # pylint: disable=protected-access
  return accounting._epsilon.cache_info().misses, builds  # pylint: disable=protected-access


def _timed(accounting, fn):
  """{"seconds", "value" | "error", "evaluations", "one_step_builds"} of fn()."""
  evaluations, builds = _counts(accounting)
  start = time.perf_counter()
  result = {}
  try:
    result["value"] = fn()
  except Exception as error:  # pylint: disable=broad-except
    result["error"] = f"{type(error).__name__}: {str(error)[:300]}"
  result["seconds"] = time.perf_counter() - start
  after = _counts(accounting)
  result["evaluations"] = after[0] - evaluations
  result["one_step_builds"] = None if builds is None else after[1] - builds
  return result


def _child(settings):
  from tfdp_prune import accounting  # pylint: disable=import-outside-toplevel
  from tfdp_prune import budget  # pylint: disable=import-outside-toplevel
  baseline_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  spec = lambda sigma, steps: accounting.PrivacySpec(
      noise_multiplier=sigma, steps=steps, delta=settings["delta"],
      sampling_probability=settings["q"])
  out = {}
  target = settings.get("target")
  sigma = settings.get("sigma")
  steps = settings.get("steps")
  if sigma is not None and steps is not None:
    out["epsilon"] = _timed(accounting, lambda: spec(sigma, steps).epsilon())
    epsilon = out["epsilon"].get("value")
    if epsilon is not None and 0 < epsilon < math.inf:
      target = epsilon
    else:
      target = None  # nothing to calibrate to (0, inf, or not computable)
  if target is not None and steps is not None:
    out["target"] = target

    def calibrate():
      found = accounting.calibrate_noise_multiplier(target, settings["delta"], settings["q"],
                                                    steps)
      if not spec(found, steps).epsilon() <= target:
        raise RuntimeError(f"calibrated sigma {found} exceeds the target")
      return found

    out["calibration"] = _timed(accounting, calibrate)
    sigma = out["calibration"].get("value")
  if target is not None and sigma is not None:
    out["target"] = target

    def step_limit():
      found = budget.max_steps_within(spec(sigma, 0), target)
      if not spec(sigma, found).epsilon() <= target < spec(sigma, found + 1).epsilon():
        raise RuntimeError(f"step limit {found} is not the last step within the target")
      return found

    if "calibration" in out:
      out["step_limit_warm"] = _timed(accounting, step_limit)
    _clear_caches(accounting, budget)
    out["step_limit_cold"] = _timed(accounting, step_limit)
  out["baseline_rss_mb"] = baseline_mb
  out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return out


# ------------------------------------------------------------------------------------------------
# Parent.



def _snapshot(code, dest):
  """Copies code/tfdp_prune to dest; returns a content hash of the copy."""
  import hashlib  # pylint: disable=import-outside-toplevel
  shutil.copytree(os.path.join(code, "tfdp_prune"), os.path.join(dest, "tfdp_prune"),
                  ignore=shutil.ignore_patterns("__pycache__"))
  digest = hashlib.sha256()
  for root, _, files in sorted(os.walk(os.path.join(dest, "tfdp_prune"))):
    for name in sorted(files):
      with open(os.path.join(root, name), "rb") as f:
        digest.update(name.encode() + f.read())
  return digest.hexdigest()[:12]


def _run_case(name, settings, code, timeout):
  env = dict(os.environ, PYTHONPATH=code, TF_CPP_MIN_LOG_LEVEL="3")
  start = time.perf_counter()
  try:
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(settings)], env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return {"name": name, "settings": settings, "timeout_s": timeout,
            "wall_s": time.perf_counter() - start}
  lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
  if done.returncode != 0 or not lines:
    return {"name": name, "settings": settings, "crash": done.stderr[-2000:],
            "wall_s": time.perf_counter() - start}
  result = json.loads(lines[-1][len("RESULT "):])
  result.update(name=name, settings=settings, wall_s=time.perf_counter() - start)
  return result


_PHASES = ("epsilon", "calibration", "step_limit_warm", "step_limit_cold")


def _cell(phase):
  if phase is None:
    return "-"
  text = f"{phase['seconds']:.1f}"
  if "error" in phase:
    return f"{text} ({phase['error'].split(':')[0]})"
  details = [f"{phase['evaluations']} eval"]
  if phase.get("one_step_builds") is not None:
    details.append(f"{phase['one_step_builds']} builds")
  return f"{text} ({', '.join(details)})"


def _value(row):
  parts = []
  if "epsilon" in row:
    epsilon = row["epsilon"]
    parts.append(f"eps {epsilon['value']:.4g}" if "value" in epsilon else "eps: not computable")
  if "calibration" in row and "value" in row["calibration"]:
    parts.append(f"sigma {row['calibration']['value']:.5g}")
  for phase in ("step_limit_cold", "step_limit_warm"):
    if phase in row and "value" in row[phase]:
      parts.append(f"limit {row[phase]['value']}")
      break
  return "; ".join(parts)


def worst(rows):
  """(seconds, name, phase) of the slowest accounting call over all rows (timeouts first)."""
  found = (0.0, None, None)
  for row in rows:
    if "timeout_s" in row:
      return (math.inf, row["name"], "timeout")
    for phase in _PHASES:
      if phase in row and row[phase]["seconds"] > found[0]:
        found = (row[phase]["seconds"], row["name"], phase)
  return found


def _markdown(rows, meta):
  lines = ["# Accounting: seconds per call (PLD, default grid 1e-4)", "",
           f"Command: `{meta['command']}`", "",
           f"Machine: {meta['machine']}; {meta['date']}; tfdp_prune at {meta['git_commit']} "
           f"(snapshot sha256 {meta['snapshot_sha256']}).", "",
           "Seconds per call (in brackets: epsilon evaluations that were not cached, one-step "
           "PLD builds). calibration: to the setting's own epsilon; step limit: right after "
           "the calibration (warm) and in a fresh process (cold). Errors are reported by "
           "name (`PLDTooLargeError`: tfdp-train refuses the run at planning, with "
           "`--accountant=rdp` as the fix).", "",
           "| case | result | epsilon (s) | calibration (s) | step limit warm (s) | "
           "step limit cold (s) | peak RSS (MB) |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  for row in rows:
    if "timeout_s" in row or "crash" in row:
      status = f"TIMEOUT after {row['timeout_s']} s" if "timeout_s" in row else "CRASH"
      lines.append(f"| {row['name']} | {status} | | | | | |")
      continue
    cells = [_cell(row.get(phase)) for phase in _PHASES]
    lines.append(f"| {row['name']} | {_value(row)} | {' | '.join(cells)} | "
                 f"{row['peak_rss_mb']:.0f} |")
  seconds, name, phase = worst(rows)
  lines += ["", f"Worst case: {name}, {phase}: {seconds:.1f} s."]
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--child", help=argparse.SUPPRESS)
  parser.add_argument("--out", default=os.path.join(HERE, "results", "accounting.json"))
  parser.add_argument("--code", default=REPO, help="directory tfdp_prune is imported from")
  parser.add_argument("--cases", default="", help="only cases whose name contains this")
  parser.add_argument("--timeout", type=float, default=600.0, help="seconds per case")
  args = parser.parse_args()
  if args.child:
    print("RESULT " + json.dumps(_child(json.loads(args.child))), flush=True)
    return
  meta = {"command": " ".join([os.path.relpath(sys.executable, REPO)
                               if sys.executable.startswith(REPO) else sys.executable]
                              + sys.argv),
          "code": args.code, "git_commit": provenance.git_commit(args.code),
          "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python "
                     f"{platform.python_version()}, load average at start "
                     f"{os.getloadavg()[0]:.1f}",
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
  rows = []
  with tempfile.TemporaryDirectory() as snapshot:
    meta["snapshot_sha256"] = _snapshot(args.code, snapshot)
    for name, settings in _cases():
      if args.cases and args.cases not in name:
        continue
      print(name, flush=True)
      rows.append(_run_case(name, settings, snapshot, args.timeout))
      print("  " + json.dumps({key: value for key, value in rows[-1].items()
                               if key not in ("name", "settings")}), flush=True)
  meta["load_average_at_end"] = os.getloadavg()[0]
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({**meta, "rows": rows}, f, indent=2)
  markdown = _markdown(rows, meta)
  with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
    f.write(markdown)
  print(markdown)


if __name__ == "__main__":
  main()
