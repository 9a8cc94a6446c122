"""An export that is killed in the middle (the SIGKILL test of test_saved_model.py).

Run as a script with the repository on PYTHONPATH:
  python _export_worker.py EXPORT_DIR SIGNAL_FILE
It exports a tiny model into EXPORT_DIR, but the model card renderer (a late step: the SavedModel,
the metadata and the warmup file are already written into the temporary directory) is replaced
by one that creates SIGNAL_FILE and sleeps, so the parent can kill the process right there.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["CUDA_VISIBLE_DEVICES"] = ""

from tfdp_prune.compat import keras  # pylint: disable=g-import-not-at-top
from tfdp_prune.export import saved_model  # pylint: disable=g-import-not-at-top
from tfdp_prune.export import serving_files  # pylint: disable=g-import-not-at-top


def main(export_dir, signal_file):

  def render_and_hang(metadata, signature_info, **kwargs):
    del metadata, signature_info, kwargs
    with open(signal_file + ".tmp", "w", encoding="utf-8") as f:
      f.write(str(os.getpid()))
    os.replace(signal_file + ".tmp", signal_file)
    time.sleep(600)  # the parent kills us here
    raise RuntimeError("not killed")

  serving_files.render_model_card = render_and_hang
  keras.utils.set_random_seed(0)
  model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
  saved_model.export_saved_model(model, export_dir)


if __name__ == "__main__":
  main(sys.argv[1], sys.argv[2])
