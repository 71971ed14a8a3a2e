"""Patient re-identification by retrieval (paper Table 2).

The attacker sees one encoded image per scan. For each scan it ranks every *other* encoded image by
MS-SSIM and predicts the patient of the most similar one. Re-identification is scored by

* the macro F1 over patient identities of these top-1 predictions, and
* the mean average precision (mAP) of the ranked lists, a scan of the same patient being relevant.

Only scans whose patient has at least one other scan can be re-identified: the others are skipped as
queries (for F1, top-1 accuracy and mAP) but stay in every ranked list as distractors. Since every
relevant scan appears in the ranked list, the average precision of a query is normalised by the
number of its patient's other scans, as in the Privacy-Net protocol.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import f1_score

from mixpriv.inference.mixtures import mix_with_references
from mixpriv.mixing.bank import ReferenceBank
from mixpriv.mixing.settings import DEFAULT_MIXING, MixingSettings
from mixpriv.privacy.similarity import MSSSIMSettings, similarity_matrix
from mixpriv.validation import InputError, check_finite

Encoder = Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]]


@dataclass(frozen=True)
class QueryResult:
    """The retrieval outcome for one query scan.

    Attributes:
        index: position of the query in the similarity matrix.
        patient_id: the query's patient.
        predicted_id: the patient of the most similar other scan.
        average_precision: average precision of the ranked list of all other scans.
        num_relevant: number of other scans of the same patient.
    """

    index: int
    patient_id: str
    predicted_id: str
    average_precision: float
    num_relevant: int

    @property
    def correct(self) -> bool:
        """Whether the top-1 prediction is the query's patient."""
        return self.predicted_id == self.patient_id


@dataclass(frozen=True)
class ReidResult:
    """Re-identification scores over the queries (scans whose patient has another scan).

    Attributes:
        f1: macro F1 over the queries' patient identities of the top-1 predictions.
        mean_average_precision: mean over the queries of their average precision.
        top1_accuracy: fraction of queries whose top-1 prediction is their patient.
        num_queries: number of queries scored.
        num_skipped: scans not scored as queries (their patient has a single scan); still in the gallery.
        per_query: the outcome of each query, in matrix order.
    """

    f1: float
    mean_average_precision: float
    top1_accuracy: float
    num_queries: int
    num_skipped: int
    per_query: list[QueryResult]


def retrieval_metrics(similarity: torch.Tensor, patient_ids: Sequence[str]) -> ReidResult:
    """Score retrieval from a similarity matrix: row ``i`` ranks the other scans for query ``i``.

    Ties are broken deterministically: among equally similar scans the one with the lower index ranks
    first (a stable sort). The macro F1 averages the per-patient F1 over the patients of the queries
    (scikit-learn's ``f1_score(average="macro")`` with those labels; a patient never predicted gets 0).

    Args:
        similarity: (N, N) scores, higher is more similar; the diagonal is ignored and the matrix need
            not be symmetric.
        patient_ids: the patient of each of the N scans.

    Returns:
        The scores, with each query's outcome.

    Raises:
        InputError: for a non-square or non-finite matrix, a wrong number of ids, or no patient with two scans.

    Example:
        >>> similarity = torch.tensor([[1.0, 0.9, 0.2, 0.1],
        ...                            [0.9, 1.0, 0.3, 0.2],
        ...                            [0.2, 0.3, 1.0, 0.4],
        ...                            [0.1, 0.5, 0.4, 1.0]])
        >>> result = retrieval_metrics(similarity, ["a", "a", "b", "b"])
        >>> [query.predicted_id for query in result.per_query]
        ['a', 'a', 'b', 'a']
        >>> result.top1_accuracy, result.mean_average_precision
        (0.75, 0.875)
        >>> round(result.f1, 4)
        0.7333
    """
    scores = _check_similarity(similarity, patient_ids)
    ids = [str(patient) for patient in patient_ids]
    scans_per_patient = Counter(ids)
    queries = [i for i, patient in enumerate(ids) if scans_per_patient[patient] > 1]
    if not queries:
        raise InputError("no patient has two scans: re-identification needs at least one patient with two scans")
    per_query = [_query_result(scores, ids, i) for i in queries]
    truth = [query.patient_id for query in per_query]
    predicted = [query.predicted_id for query in per_query]
    return ReidResult(
        f1=float(f1_score(truth, predicted, labels=sorted(set(truth)), average="macro", zero_division=0)),
        mean_average_precision=float(np.mean([query.average_precision for query in per_query])),
        top1_accuracy=float(np.mean([query.correct for query in per_query])),
        num_queries=len(per_query),
        num_skipped=len(ids) - len(per_query),
        per_query=per_query,
    )


def encode_scans(
    images: Sequence[torch.Tensor],
    bank: ReferenceBank,
    mixing: MixingSettings = DEFAULT_MIXING,
    generator: torch.Generator | None = None,
    references_per_scan: int = 1,
    *,
    case_ids: Sequence[str],
    patient_ids: Sequence[str] | None = None,
) -> list[torch.Tensor]:
    """Encode each scan as the client would: mix it with randomly drawn references of the bank.

    The references are drawn uniformly among the bank's references whose id differs from the scan's
    case id (a scan mixed with itself would not be encoded at all) and, given ``patient_ids``, whose
    patient differs from the scan's (:func:`draw_other_references`), distinct unless more are asked
    than the bank holds; each weight is drawn uniformly in ``mixing.lambda_range``, and each mixture
    takes ``mixing.references_per_mix`` references with Dirichlet weights
    (:func:`mixpriv.inference.mixtures.mix_with_references`).

    Args:
        images: preprocessed scans (1, D, H, W).
        bank: the client's reference bank.
        mixing: how the client mixes (λ range, references per mixture, Dirichlet α).
        generator: random generator for the references and the weights (reproducible encodings).
        references_per_scan: mixtures per scan (1 in the paper's protocol; K as the server sees with TTA).
        case_ids: each scan's case id, compared with ``bank.ids``.
        patient_ids: each scan's patient, compared with ``bank.patient_ids`` (``None``: not compared).

    Returns:
        The mixtures of each scan (references_per_scan, D, H, W), the only data the attacker sees.

    Raises:
        InputError: for a wrong number of case ids, fewer than one reference per scan, or a bank whose
            only reference is the scan itself.

    Example:
        >>> bank = ReferenceBank(torch.ones(2, 1, 4, 4, 4), torch.zeros(2, 4, 4, 4, dtype=torch.long),
        ...                      {"background": 0}, ids=["case0", "case1"])
        >>> scans = [torch.zeros(1, 4, 4, 4), torch.zeros(1, 4, 4, 4)]
        >>> encoded = encode_scans(scans, bank, MixingSettings((0.7, 0.9)), torch.Generator().manual_seed(0),
        ...                        case_ids=["case0", "case7"])
        >>> [tuple(mixture.shape) for mixture in encoded]
        [(1, 4, 4, 4), (1, 4, 4, 4)]
        >>> bool(((encoded[0] >= 0.1 - 1e-6) & (encoded[0] <= 0.3 + 1e-6)).all())  # (1 - lambda) * reference
        True
    """
    if len(case_ids) != len(images):
        raise InputError(f"{len(case_ids)} case ids given for {len(images)} scans")
    if patient_ids is not None and len(patient_ids) != len(images):
        raise InputError(f"{len(patient_ids)} patient ids given for {len(images)} scans")
    if references_per_scan < 1:
        raise InputError(f"references_per_scan must be at least 1, got {references_per_scan}")
    encoded = []
    r = mixing.references_per_mix
    for index, (image, case_id) in enumerate(zip(images, case_ids)):
        patient = None if patient_ids is None else str(patient_ids[index])
        drawn = draw_other_references(bank, str(case_id), references_per_scan * r, generator, patient)
        indices = [tuple(drawn[i:i + r]) for i in range(0, len(drawn), r)]
        # more references asked than the bank allows are drawn with replacement: keep each composite's distinct
        indices = [chunk if len(set(chunk)) == r else tuple(draw_other_references(bank, str(case_id), r, generator,
                                                                                    patient))
                   for chunk in indices]
        mixtures = mix_with_references(image, bank, references_per_scan, mixing, generator, reference_indices=indices)
        encoded.append(mixtures.mixtures[:, 0])
    return encoded


def reidentify(
    images: Sequence[torch.Tensor],
    patient_ids: Sequence[str],
    encoder: Encoder | None = None,
    settings: MSSSIMSettings | None = None,
    progress: bool = True,
) -> ReidResult:
    """Re-identify patients by MS-SSIM retrieval over raw or encoded scans.

    Args:
        images: preprocessed scans (1, D, H, W) of one shape.
        patient_ids: the patient of each scan.
        encoder: ``None`` to attack the raw scans ("No proxy"), or a function mapping the list of scans to
            their encoded versions (one volume each), e.g.
            ``functools.partial(encode_scans, bank=bank, case_ids=case_ids, generator=generator)``.
        settings: MS-SSIM setting (see :mod:`mixpriv.privacy.similarity`); ``None`` for the shape's default.
        progress: show a progress bar over the pairs.

    Returns:
        The retrieval scores.

    Raises:
        InputError: if the encoder returns another number of volumes, or as :func:`retrieval_metrics`.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> patients = [torch.rand(1, 10, 10, 10, generator=g) for _ in range(3)]
        >>> scans = [p + 0.05 * torch.rand(1, 10, 10, 10, generator=g) for p in patients for _ in range(2)]
        >>> reidentify(scans, ["p0", "p0", "p1", "p1", "p2", "p2"], progress=False).mean_average_precision
        1.0
    """
    volumes = images if encoder is None else encoder(images)
    if len(volumes) != len(images):
        raise InputError(f"the encoder returned {len(volumes)} volumes for {len(images)} scans")
    return retrieval_metrics(similarity_matrix(volumes, settings, progress=progress), patient_ids)


def _check_similarity(similarity: torch.Tensor, patient_ids: Sequence[str]) -> np.ndarray:
    """The validated similarity matrix as a float64 array."""
    scores = torch.as_tensor(similarity).detach().cpu().double().numpy()
    if scores.ndim != 2 or scores.shape[0] != scores.shape[1]:
        raise InputError(f"the similarity matrix must be square (N, N), got shape {scores.shape}")
    if len(patient_ids) != scores.shape[0]:
        raise InputError(f"{len(patient_ids)} patient ids given for a similarity matrix of {scores.shape[0]} scans")
    check_finite(scores, "the similarity matrix")
    return scores


def _query_result(scores: np.ndarray, ids: list[str], query: int) -> QueryResult:
    """Rank the other scans for ``query`` (stable: ties keep index order) and score the ranking."""
    others = np.array([j for j in range(len(ids)) if j != query])
    ranked = others[np.argsort(-scores[query, others], kind="stable")]
    relevant = np.array([ids[j] == ids[query] for j in ranked])
    hits = np.cumsum(relevant)
    precision_at_hits = hits[relevant] / (np.flatnonzero(relevant) + 1)
    return QueryResult(index=query, patient_id=ids[query], predicted_id=ids[ranked[0]],
                       average_precision=float(precision_at_hits.mean()), num_relevant=int(relevant.sum()))


def draw_other_references(bank: ReferenceBank, case_id: str, k: int, generator: torch.Generator | None,
                          patient_id: str | None = None) -> list[int]:
    """``k`` reference indices of the bank that are neither case ``case_id`` nor a scan of
    ``patient_id`` (distinct while the bank allows).

    The client never mixes a scan with itself or with another scan of the same patient, which a key
    holding the patient's cases would allow (their difference would leave the patient in the clear).

    Example:
        >>> bank = ReferenceBank(torch.rand(3, 1, 4, 4, 4), torch.zeros(3, 4, 4, 4, dtype=torch.long),
        ...                      {"background": 0}, ids=["a", "b", "c"], patient_ids=["p0", "p1", "p1"])
        >>> sorted(draw_other_references(bank, "b", 2, torch.Generator().manual_seed(0)))
        [0, 2]
        >>> draw_other_references(bank, "x", 2, torch.Generator().manual_seed(0), patient_id="p1")
        [0, 0]
    """
    allowed = [index for index, (reference_id, patient) in enumerate(zip(bank.ids, bank.patient_ids))
               if str(reference_id) != case_id and (patient_id is None or patient != patient_id)]
    if not allowed:
        raise InputError(f"the reference bank holds no reference other than case {case_id!r}"
                         + (f" and the other scans of patient {patient_id!r}" if patient_id is not None else "")
                         + " itself")
    if k <= len(allowed):
        picks = torch.randperm(len(allowed), generator=generator)[:k]
    else:
        picks = torch.randint(len(allowed), (k,), generator=generator)
    return [allowed[pick] for pick in picks.tolist()]
