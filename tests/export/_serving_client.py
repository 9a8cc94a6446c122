"""A serving client in a fresh process that knows nothing of tfdp_prune (test_saved_model.py).

Run as a script, without the repository on the path:
  python _serving_client.py VERSION_DIR INPUTS.npy INPUT_NAME OUT.json
It loads the export with plain `tf.saved_model.load`, runs `serving_default` on the inputs, asks
the `privacy_metadata` signature for a few fields and for one (a scalar name), calls
`privacy_metadata_json()`, and writes what it got to OUT.json. It exits with an error if tfdp_prune (or Keras) was imported: the export
must be usable by TensorFlow alone.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import numpy as np  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top

FIELDS = ["epsilon", "private", "all", "no_such_field"]


def main(version_dir, inputs_path, input_name, out_path):
  loaded = tf.saved_model.load(version_dir)
  x = np.load(inputs_path)
  outputs = loaded.signatures["serving_default"](**{input_name: tf.constant(x)})
  values = loaded.signatures["privacy_metadata"](field=tf.constant(FIELDS))["value"]
  one = loaded.signatures["privacy_metadata"](field=tf.constant("epsilon"))["value"]
  imported = sorted(m for m in ("tfdp_prune", "tf_keras") if m in sys.modules)
  if imported:
    sys.exit(f"The export needed {imported}: it must load with TensorFlow alone.")
  result = {
      "probabilities": outputs["probabilities"].numpy().tolist(),
      "probabilities_dtype": outputs["probabilities"].dtype.name,
      "class_id": outputs["class_id"].numpy().tolist(),
      "class_id_dtype": outputs["class_id"].dtype.name,
      "fields": dict(zip(FIELDS, (v.decode("utf-8") for v in values.numpy()))),
      "privacy_metadata_json": loaded.privacy_metadata_json().numpy().decode("utf-8"),
      "one_field": one.numpy().decode("utf-8"),
      "imported": imported,
  }
  with open(out_path, "w", encoding="utf-8") as f:
    json.dump(result, f)


if __name__ == "__main__":
  main(*sys.argv[1:5])
