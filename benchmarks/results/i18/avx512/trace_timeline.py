"""One traced step's ops in time order (start, duration in ms, thread), and the per-step durations
of the CNN's largest per-example ops, from a trace_ops.py trace (2026-12-02):

  python benchmarks/results/i18/avx512/trace_timeline.py /tmp/s14/trace_tfdp_cnn
"""
import sys, glob
from tensorflow.tsl.profiler.protobuf import xplane_pb2
logdir = sys.argv[1]
path = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0]
xs = xplane_pb2.XSpace(); xs.ParseFromString(open(path, "rb").read())
evs = []
for plane in xs.planes:
  md = plane.event_metadata
  for line in plane.lines:
    if not any(s in line.name for s in ("tf_Compute", "Eigen", "python")): continue
    for ev in line.events:
      name = md[ev.metadata_id].name
      evs.append(((line.timestamp_ns * 1000 + ev.offset_ps) / 1e9, ev.duration_ps / 1e9, line.name[:14], name))
evs.sort()
# find step boundaries: events named like '__inference_train_function' on python line
starts = [e for e in evs if "train_function" in e[3] and e[2].startswith("python")]
print(len(starts), "python train_function events")
s0 = starts[len(starts)//2]
t0, dur = s0[0], s0[1]
print(f"step at {t0:.3f} ms, duration {dur:.2f} ms")
for t, d, ln, n in evs:
  if t0 <= t <= t0 + dur and d > 0.15 and "Process" not in n:
    print(f"{t - t0:7.2f} {d:6.2f} {ln:14s} {n[-95:]}")
print("per-step durations of selected ops:")
import collections
d = collections.defaultdict(list)
for t, du, ln, n in evs:
  for key in ("DepthwiseConv2dNativeBackpropFilter", "ExtractImagePatches", "cond_1/MatMul:", "train_function"):
    if key in n and "Process" not in n and (key != "train_function" or ln.startswith("python")):
      d[key].append(round(du, 2))
for k, v in d.items():
  print(k, v[:40])
