"""Op times of the step_time.py arms' `fit` steps from TF's profiler (2026-12-02, behind "The CNN
and the WRN on an AMD EPYC with AVX-512", benchmarks/README.md): N steps traced with
tf.profiler.experimental, op durations read from the xplane and summed per op type and per op
(both compute threads; "Process" is the executor's wrapper around them). Run from the repo root:

  python benchmarks/results/i18/avx512/trace_ops.py tfdp cnn 30
  python benchmarks/results/i18/avx512/trace_ops.py nonprivate cnn 30

The trace stays in /tmp/s14/trace_<arm>_<model> for trace_timeline.py.
"""
import sys, collections, glob, os, shutil
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
import numpy as np, tensorflow as tf
import step_time
from tensorflow.tsl.profiler.protobuf import xplane_pb2
arm = sys.argv[1]; model_name = sys.argv[2] if len(sys.argv) > 2 else "cnn"; steps = int(sys.argv[3]) if len(sys.argv) > 3 else 30
spec = step_time.MODELS[model_name]
B = spec["batch"]
model, _ = step_time._build(model_name, arm, B, spec["input_shape"], 0)
rng = np.random.default_rng(0)
x = rng.random((B,) + spec["input_shape"], dtype=np.float32); y = rng.integers(0, 10, B)
step = step_time.fit_step(model, x, y)
for _ in range(5): step()
logdir = f"/tmp/s14/trace_{arm}_{model_name}"
shutil.rmtree(logdir, ignore_errors=True)
tf.profiler.experimental.start(logdir)
for _ in range(steps): step()
tf.profiler.experimental.stop()
path = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0]
xs = xplane_pb2.XSpace(); xs.ParseFromString(open(path, "rb").read())
by_type = collections.Counter(); by_name = collections.Counter(); count = collections.Counter()
for plane in xs.planes:
  md = plane.event_metadata
  for line in plane.lines:
    if "tf_" not in line.name and "Compute" not in line.name and "Inter" not in line.name: continue
    for ev in line.events:
      name = md[ev.metadata_id].name
      if ":" in name:
        n, t = name.rsplit(":", 1)
      else:
        n, t = name, name
      by_type[t] += ev.duration_ps / 1e9 / steps
      by_name[n + ":" + t] += ev.duration_ps / 1e9 / steps
      count[t] += 1 / steps
print("lines:", sorted({l.name for p in xs.planes for l in p.lines})[:30])
tot = sum(by_type.values())
print(f"total op time per step {tot:.2f} ms, ops per step {sum(count.values()):.0f}")
for t, v in by_type.most_common(30):
  print(f"  {t:40s} {v:7.3f} ms  n={count[t]:.0f}")
print("top ops")
for t, v in by_name.most_common(40):
  print(f"  {t[-90:]:90s} {v:7.3f} ms")
