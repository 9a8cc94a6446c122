"""tfdp_prune: differentially private Keras training with public-data pruning."""

import re

import setuptools

VERSION = re.search(r'__version__ = "([^"]+)"',
                    open("tfdp_prune/version.py", encoding="utf-8").read()).group(1)

INSTALL_REQUIRES = [
    # TF and tf_keras move together: tf_keras 2.X only supports TensorFlow 2.X.
    "tensorflow==2.21.*",
    "tf-keras==2.21.*",
    # 0.9.0 is the release whose internals (import escape hatch, optimizer classes) compat.py
    # and the benchmarks rely on; its metadata also forces numpy < 2 and Python < 3.12.
    "tensorflow-privacy==0.9.0",
    # 0.8.1: the last release for Keras 2 (tf_keras); tfdp_prune's masks interoperate with it.
    "tensorflow-model-optimization==0.8.1",
    # The exact version tensorflow-privacy 0.9.0 pins; stated so pip never has to backtrack.
    "dp-accounting==0.4.3",
    "tensorflow-datasets>=4.9,<4.10",
    # TF 2.21 no longer installs it; the mask and budget logs go to TensorBoard.
    "tensorboard==2.21.*",
    # PredictionLog records for TF Serving's warmup file; its 2.21 release pins tensorflow 2.21.
    "tensorflow-serving-api==2.21.*",
    "absl-py>=1.0",
    "numpy>=1.23,<2",
    # Its bundled `load_digits` is the embedded default data set (no download needed).
    "scikit-learn>=1.3",
]

setuptools.setup(
    name="tfdp_prune",
    version=VERSION,
    description="Differentially private Keras training of the parameters chosen from public data.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["tfdp_prune", "tfdp_prune.*"]),
    python_requires=">=3.9,<3.12",
    install_requires=INSTALL_REQUIRES,
    entry_points={
        "console_scripts": [
            "tfdp-train = tfdp_prune.trainers.train:run_main",
            "tfdp-export = tfdp_prune.trainers.export:run_main",
            "tfdp-audit = tfdp_prune.trainers.audit:run_main",
        ],
    },
    extras_require={
        "test": ["pytest>=7", "scipy>=1.10", "psutil>=5", "matplotlib>=3.7"],
    },
)
