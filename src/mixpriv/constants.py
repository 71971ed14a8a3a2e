"""String keys and defaults shared across mixpriv (one place, no magic strings)."""

from __future__ import annotations

# Keys of images inside a ``torchio.Subject``.
IMAGE = "image"
LABEL = "label"
REFERENCE_IMAGE = "reference_image"
REFERENCE_LABEL = "reference_label"

# Keys of attributes recorded on a subject by the mixing transforms.
MIX_LAMBDA = "mix_lambda"
MIX_REFERENCE_ID = "mix_reference_id"
MIX_REFERENCE_WEIGHTS = "mix_reference_weights"

# The tumour task's classes (BraTS 2021 labels 1 NCR, 2 ED, 4 ET, remapped to consecutive values).
TUMOUR_CLASSES = {"background": 0, "NCR": 1, "ED": 2, "ET": 3}

# Split names of a dataset folder.
TRAIN = "train"
VAL = "val"
TEST = "test"
SPLITS = (TRAIN, VAL, TEST)

# Default range of the mixing weight lambda, drawn uniformly per patch / volume.
# The paper draws lambda from a uniform distribution; the bounds did not survive in the
# text we work from, so we keep lambda above 0.5 (the target dominates, and the naive
# unmixing of Eq. 4 amplifies the server's error by at most 1/lambda < 2).
DEFAULT_LAMBDA_RANGE = (0.65, 0.95)

# K-way mixing: the target keeps weight lambda, the remaining 1 - lambda is split over this
# many references with Dirichlet(alpha, ..., alpha) weights. One reference is the paper's scheme.
DEFAULT_REFERENCES_PER_MIX = 1
DEFAULT_DIRICHLET_ALPHA = 1.0

# Naive unmixing divides by lambda; below this value it refuses (see ``naive_unmix``).
MIN_UNMIX_LAMBDA = 0.05

ENV_HOME = "MIXPRIV_HOME"

# Parts of the privacy audit (mixpriv audit --parts): re-identification, test-retest ICC,
# blind source separation with its positive control, privacy-utility sweep.
AUDIT_PARTS = ("reid", "icc", "bss", "sweep")

# Keys of a same-or-different-patient patch pair batch (the Siamese discriminators of Privacy-Net and
# Deformation-Proxy learn from them): two scans' patches at the same place, and whether one patient took both.
PAIR_IMAGE_A = "image_a"
PAIR_LABEL_A = "label_a"
PAIR_IMAGE_B = "image_b"
PAIR_LABEL_B = "label_b"
PAIR_SAME_PATIENT = "same_patient"
