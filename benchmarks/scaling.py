"""How the per-layer engine's cost grows with the batch size and the model width.

Runs `step_time.py` (one subprocess per arm, as there) for the MNIST tutorial CNN at batch
sizes 32 .. 1024 and for WRN-16-k at widths k = 1, 2, 4 (batch 32), with the arms nonprivate,
tfdp (per-layer engine, no mask) and tfdp_mask80, and writes the ratios to non-private training
as JSON plus a markdown table.

Usage (from the repo root, about 15 minutes on 2 CPU cores):
  /work/venv/bin/python benchmarks/scaling.py --out=benchmarks/results/scaling.json
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ARMS = ("nonprivate", "tfdp", "tfdp_mask80")
CNN_BATCHES = (32, 64, 128, 256, 512, 1024)
WRN_WIDTHS = (1, 2, 4)


def _run(model, extra, budget_s, work_dir):
  """One step_time.py run over ARMS; returns its results by arm."""
  out = os.path.join(work_dir, f"{model}-{'-'.join(extra)}.json".replace("--", ""))
  subprocess.run([sys.executable, os.path.join(HERE, "step_time.py"), f"--models={model}",
                  f"--arms={','.join(ARMS)}", f"--budget_s={budget_s}", "--steps=30",
                  f"--out={out}", *extra], check=True, stdout=subprocess.DEVNULL)
  with open(out) as f:
    return {r["arm"]: r for r in json.load(f)["results"]}


def _row(label, results):
  base = results["nonprivate"]
  row = {"setting": label, "nonprivate_median_s": base["median_step_s"],
         "nonprivate_peak_rss_mb": base["peak_rss_mb"]}
  for arm in ARMS[1:]:
    r = results[arm]
    row[f"{arm}_x_time_median"] = r["median_step_s"] / base["median_step_s"]
    row[f"{arm}_x_time_min"] = r["min_step_s"] / base["min_step_s"]
    row[f"{arm}_x_cpu"] = r["median_cpu_step_s"] / base["median_cpu_step_s"]
    row[f"{arm}_x_peak_rss"] = r["peak_rss_mb"] / base["peak_rss_mb"]
  return row


def _markdown(rows, command):
  lines = ["# Cost of the per-layer engine vs batch size and width", "",
           f"Command: `{command}`", "",
           "Ratios to non-private tf_keras SGD on the same model and batch (median / min wall "
           "step time / median CPU seconds per step; peak RSS of the arm's own process).", "",
           "| setting | non-private step (s) | tfdp x time (median / min / CPU) | tfdp_mask80 x "
           "time (median / min / CPU) | tfdp x peak RSS | tfdp_mask80 x peak RSS |",
           "| --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    lines.append(
        f"| {r['setting']} | {r['nonprivate_median_s']:.3f} | "
        f"{r['tfdp_x_time_median']:.2f} / {r['tfdp_x_time_min']:.2f} / {r['tfdp_x_cpu']:.2f} | "
        f"{r['tfdp_mask80_x_time_median']:.2f} / {r['tfdp_mask80_x_time_min']:.2f} / "
        f"{r['tfdp_mask80_x_cpu']:.2f} | "
        f"{r['tfdp_x_peak_rss']:.2f} | {r['tfdp_mask80_x_peak_rss']:.2f} |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default=os.path.join(HERE, "results", "scaling.json"))
  parser.add_argument("--budget_s", type=float, default=6.0)
  args = parser.parse_args()
  rows = []
  with tempfile.TemporaryDirectory() as work_dir:
    for batch in CNN_BATCHES:
      print(f"cnn batch {batch}", flush=True)
      rows.append(_row(f"CNN, batch {batch}",
                       _run("cnn", [f"--batch={batch}"], args.budget_s, work_dir)))
    for width in WRN_WIDTHS:
      print(f"wrn width {width}", flush=True)
      rows.append(_row(f"WRN-16-{width}, batch 32",
                       _run("wrn", [f"--wrn_width={width}"], args.budget_s, work_dir)))
  command = " ".join([sys.executable] + sys.argv)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"command": command, "rows": rows}, f, indent=2)
  markdown = _markdown(rows, command)
  with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
    f.write(markdown)
  print(markdown)


if __name__ == "__main__":
  main()
