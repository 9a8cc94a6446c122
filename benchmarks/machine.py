"""The machine a benchmark ran on: CPU model, core count, AVX-512 (shared by the benchmarks)."""

import datetime
import os
import platform


def cpu_info(path="/proc/cpuinfo") -> dict:
  """CPU model and vector extensions from /proc/cpuinfo (Linux); empty fields elsewhere.

  TF's, XLA's and PyTorch's CPU kernels (oneDNN, Eigen) pick AVX-512 (and AMX) paths when
  present, so the ratios between batched matmuls and per-example loops differ between CPUs:
  results name theirs."""
  model, flags = None, set()
  try:
    with open(path) as f:
      for line in f:
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
          model = value.strip()
        elif key == "flags" and not flags:
          flags = set(value.split())
  except OSError:
    pass
  avx512 = sorted(f for f in flags if f.startswith("avx512"))
  amx = sorted(f for f in flags if f.startswith("amx"))
  return {"cpu_model": model, "avx512": bool(avx512), "avx512_flags": avx512,
          "avx2": "avx2" in flags, "amx": bool(amx), "amx_flags": amx}


def machine() -> dict:
  info = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
          "processor": platform.processor() or None,
          "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
          "loadavg": list(os.getloadavg())}
  info.update(cpu_info())
  try:
    import psutil  # pylint: disable=import-outside-toplevel
    info["total_memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
  except ImportError:
    pass
  return info
