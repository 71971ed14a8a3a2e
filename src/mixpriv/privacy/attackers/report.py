"""The attacker suite in the audit report: the worst-case table, the MS-SSIM calibration, two figures.

Example:
    >>> data, lines = attackers_section(audit, Path("audit"))  # doctest: +SKIP
    >>> data["settings"][0]["worst_case_map"]  # doctest: +SKIP
    0.98
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from mixpriv.evaluation.report import markdown_table
from mixpriv.plotting import save_figure
from mixpriv.privacy.attackers.compared import (
    COMPARED_ATTACKERS,
    NO_PROXY,
    SEGMENTATION,
    VIEW,
    ComparedAudit,
    attacker_name,
)
from mixpriv.privacy.attackers.suite import (
    ATTACKERS,
    PAPER,
    AttackerAudit,
    SettingAttacks,
    WorstCase,
)
from mixpriv.privacy.figures import (
    PAPER_LINE_STYLES,
    PAPER_TABLE_2_MAP,
    plot_similarity_matrices,
)
from mixpriv.privacy.reidentification import ReidResult

__all__ = ["attackers_section", "compared_section", "plot_attackers"]

_DESCRIPTIONS = {
    "paper": "one mixture per scan, MS-SSIM retrieval (the paper's Table 2 attacker)",
    "request-mean": "the mean of the request's K mixtures",
    "population": "one mixture minus the expected reference (1 − λ̂)·μ, divided by λ̂",
    "request-population": "the request mean minus the expected reference",
    "request-rank1": "least-squares rank-1 fit of the K mixtures about the population mean (their shared component)",
    "correlation": ("Pearson correlation of the request's mean coarse features (minus the population mean, "
                    "pooled by 2) over the whole traffic"),
    "key-recovery": ("the key's references recovered from the traffic: each mixture minus its projection on the mean "
                     "of its n most correlated mixtures of other requests (those that share its reference), then "
                     "correlation; the best n of the audit's choices"),
    "learned": "3D embedding trained contrastively on mixtures of the attacker's own scans (against warped "
               "references: mixed with warped copies of them), one mixture",
    "learned-request": "the same embedding of the request's mean",
}


def _fmt(value: float | None) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _scores(result: ReidResult) -> dict[str, float]:
    return {"map": result.mean_average_precision, "f1": result.f1, "top1_accuracy": result.top1_accuracy}


def plot_attackers(rows: Sequence[Mapping], no_proxy_map: float, path: str | Path) -> Path:
    """Grouped bars: each attacker's mAP per setting, the raw scans' mAP and the paper's Table 2 rows as lines.

    Example:
        >>> import tempfile, os
        >>> rows = [{"setting": "a", "attackers": {"paper": {"map": 0.9}, "learned": {"map": 0.5}}}]
        >>> plot_attackers(rows, 1.0, os.path.join(tempfile.mkdtemp(), "attackers.png")).name
        'attackers.png'
    """
    names = [name for name in ATTACKERS if any(name in row["attackers"] for row in rows)]
    figure = Figure(figsize=(max(6.0, 1.6 * len(rows) + 2), 4.2))
    ax = figure.subplots()
    width = 0.8 / max(1, len(names))
    for j, name in enumerate(names):
        values = [row["attackers"].get(name, {}).get("map", np.nan) for row in rows]
        ax.bar(np.arange(len(rows)) + (j - (len(names) - 1) / 2) * width, values, width, label=name)
    ax.axhline(no_proxy_map, color="black", lw=0.8, label="no proxy (raw scans)")
    for (label, value), style in zip(PAPER_TABLE_2_MAP.items(), PAPER_LINE_STYLES):
        ax.axhline(value, color="grey", lw=0.8, ls=style, label=label)
    ax.set_xticks(np.arange(len(rows)), [row["setting"] for row in rows], fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("re-identification mAP (lower = more private)")
    ax.legend(fontsize=7, ncol=2, loc="upper right")
    figure.suptitle("Re-identification by every attacker; a setting is as private as its highest bar", fontsize=10)
    return save_figure(figure, path, dpi=110, bbox_inches="tight")


def attackers_section(audit: AttackerAudit, out_dir: Path) -> tuple[dict, list[str]]:
    """The suite as report JSON (per setting ``worst_case_map`` and each attacker's scores) and Markdown."""
    rows = []
    for row in audit.settings:
        rows.append({
            "setting": row.name, "design": row.design, "linking_ari": row.linking_ari,
            "key_recovery_ari": row.key_recovery_ari, "key_recovery_neighbours": row.key_recovery_neighbours,
            "lambda_range": list(row.setting.lambda_range),
            "references_per_mix": row.setting.references_per_mix, "dirichlet_alpha": row.setting.dirichlet_alpha,
            "worst_case_map": row.worst_case_map, "worst_case_attacker": row.worst_attacker,
            "attackers": {name: _scores(r) for name, r in row.results.items()},
            "msssim_estimate_vs_patient": row.patient_msssim,
        })
    no_proxy = _scores(audit.no_proxy)
    bars = plot_attackers(rows, no_proxy["map"], out_dir / "attackers.png")
    matrices = plot_similarity_matrices(
        {"No proxy": audit.no_proxy_similarity,
         **{f"{row.name}\n{row.worst_attacker}": row.similarities[row.worst_attacker]
            for row in audit.settings}},
        audit.patient_ids, out_dir / "reidentification.png")
    names = [name for name in ATTACKERS if any(name in row["attackers"] for row in rows)]
    table = [["No proxy (raw scans)", _fmt(no_proxy["map"]), "—", "—", "—", "—", *(["—"] * len(names))]]
    table += [[r["setting"], f"**{_fmt(r['worst_case_map'])}**", r["worst_case_attacker"], _fmt(r["linking_ari"]),
               _fmt(r["key_recovery_ari"]), str(r["key_recovery_neighbours"] or "—"), *(_fmt(r["attackers"].get(name, {}).get("map")) for name in names)] for r in rows]
    other, same = audit.other_patient_msssim, audit.same_patient_msssim
    calibration = [[r["setting"], *(_fmt(r["msssim_estimate_vs_patient"].get(name)) for name in names
                                    if any(name in x["msssim_estimate_vs_patient"] for x in rows)),
                    "no" if max(r["msssim_estimate_vs_patient"].values(), default=math.nan) > other else "yes"]
                   for r in rows]
    estimating = [name for name in names if any(name in r["msssim_estimate_vs_patient"] for r in rows)]
    queries = audit.no_proxy.num_queries
    lines = ["## Patient re-identification: the attacker suite (worst case)", "",
             (f"The client sends K = {audit.k} mixtures of each scan (K = 1: what the paper attacks), each with "
              "references never of the scan's own patient: all K in one request (design `request`); the "
              "mixtures of the whole batch of scans shuffled (`shuffled`; the server then links them by "
              "clustering, and the request attackers see the cluster of each scan's first mixture; the adjusted "
              "Rand index (ARI) says how well the clusters found the scans, by the plain features and after "
              "the key-recovery attacker removed the estimated references); or only the first mixture, no TTA "
              "(`single`). Every attacker below re-identifies "
              "patients "
              f"by retrieval over the {len(audit.patient_ids)} scans ({queries} queries from "
              f"{len(set(audit.patient_ids))} patients); a setting's privacy is its **worst-case mAP**, the highest "
              f"of any attacker. Estimates are ranked by 3D MS-SSIM ({audit.msssim.describe()}); the population "
              f"and learned attackers learnt from {audit.attacker_data}."), "",
             *(f"- **{name}**: {_DESCRIPTIONS[name]}" for name in names), "",
             *markdown_table(["Setting", "worst-case mAP", "worst attacker", "linking ARI", "key-recovery ARI",
                              "key-recovery n", *names], table), "",
             f"![attackers]({bars.name})", "",
             ("**Is the server's view closer to the patient than another patient is?** Mean MS-SSIM of each "
              "attacker's estimate of a scan against that scan, next to a scan against the scans of other "
              f"patients ({_fmt(other)}) and against its patient's other scan ({_fmt(same)}). Privacy means no "
              "estimate beats another patient."), "",
             *markdown_table(["Setting", *estimating, f"no estimate above another patient ({_fmt(other)})?"],
                             calibration), "",
             f"![similarity matrices of the worst attackers]({matrices.name})", ""]
    data = {"k": audit.k, "msssim": audit.msssim.describe(), "attacker_data": audit.attacker_data,
            "no_proxy": no_proxy, "msssim_other_patient": other, "msssim_same_patient": same, "settings": rows,
            "figures": [bars.name, matrices.name]}
    return data, lines


def compared_section(audit: ComparedAudit, out_dir: Path, mixup: Sequence[SettingAttacks] = (),
                     mixup_model: str = "—") -> tuple[dict, list[str]]:
    """The compared systems' re-identification (paper Table 2): one row per system, No proxy first, then
    Privacy-Net, Deformation-Proxy and, from the attacker suite, Mixup-Privacy (``mixup``: its rows of the
    audited model's setting), each with its worst case and the F1 / mAP of every applicable attacker.

    Example:
        >>> data, lines = compared_section(audit, Path("audit"), reid.settings[:1])  # doctest: +SKIP
        >>> [row["system"] for row in data["systems"]]  # doctest: +SKIP
        ['No proxy', 'Privacy-Net', 'Deformation-Proxy', 'Mixup-Privacy (λ∈[0.65, 0.95])']
    """
    labelled: list[tuple[str, str, WorstCase, dict[str, float]]] = [
        (row.system, row.model, row, row.patient_msssim) for row in audit.systems]
    labelled += [(f"Mixup-Privacy ({row.name})", mixup_model, row, row.patient_msssim) for row in mixup]
    rows = [{"system": system, "model": model, "worst_case_map": row.worst_case_map,
             "worst_case_attacker": row.worst_attacker,
             "attackers": {name: _scores(r) for name, r in row.results.items()},
             "msssim_view_vs_patient": {view: own[attacker_name(PAPER, view)] for view in (VIEW, SEGMENTATION)
                                        if attacker_name(PAPER, view) in own},
             "paper_reported_map": PAPER_TABLE_2_MAP.get(f"{system.split(' (')[0]} (paper)")}
            for system, model, row, own in labelled]
    names = [attacker_name(attacker, view) for view in (VIEW, SEGMENTATION) for attacker in COMPARED_ATTACKERS
             if any(attacker_name(attacker, view) in row["attackers"] for row in rows)]
    views = [view for view in (VIEW, SEGMENTATION) if any(view in row["msssim_view_vs_patient"] for row in rows)]
    table = [[row["system"], f"**{_fmt(row['worst_case_map'])}**", row["worst_case_attacker"],
              *(f"{_fmt(row['attackers'][name]['f1'])} / {_fmt(row['attackers'][name]['map'])}"
                if name in row["attackers"] else "—" for name in names),
              *(_fmt(row["msssim_view_vs_patient"].get(view)) for view in views),
              _fmt(row["paper_reported_map"]), row["model"]] for row in rows]
    figure = plot_similarity_matrices(
        {f"{row.system}\n{row.worst_attacker}": row.similarities[row.worst_attacker] for row in audit.systems},
        audit.patient_ids, out_dir / "compared_reidentification.png")
    other, same = audit.other_patient_msssim, audit.same_patient_msssim
    lines = ["## Compared systems: re-identification (paper Table 2)", "",
             ("What the server holds of each scan: the scan itself (No proxy), Privacy-Net's encoded image and the "
              "segmentation it returns (on the scan's own grid: the client's answer, so the server holds the "
              "patient's anatomy; attacked as its label map, `· segmentation`), or the scan warped by "
              "Deformation-Proxy's secret key (a fresh key per scan; the answer stays in the same secret geometry "
              "until the client warps it back). The attacker suite's attackers that apply: `paper`, 3D MS-SSIM "
              f"retrieval of the view ({audit.msssim.describe()}), and `learned`, the learned attacker's embedding "
              "trained on the views it makes of its own scans with the published client half (the models are "
              "public in the zoo: the attacker runs Privacy-Net's encoder and segmenter and draws its own "
              f"deformation keys, {audit.views_per_scan} views of each of its scans), retrieved by cosine; it learnt "
              f"from {audit.attacker_data}. The request, population and traffic attackers do not apply (one view "
              "per scan, no key shared between scans). The Mixup-Privacy rows come from the attacker suite above "
              "(its worst case over the whole suite). Cells: F1 / mAP over "
              f"{len(audit.patient_ids)} scans of {len(set(audit.patient_ids))} patients; a system's privacy is "
              "its **worst-case mAP**. *Reported mAP*: what the Mixup-Privacy paper's Table 2 reports for the "
              "system (its attacker: MS-SSIM retrieval, the `paper` column)."), "",
             *markdown_table(["System", "worst-case mAP", "worst attacker", *(f"{name} F1 / mAP" for name in names),
                              *(f"MS-SSIM({view}, own scan)" for view in views), "reported mAP", "model"], table), "",
             (f"A scan against the scans of other patients scores MS-SSIM {_fmt(other)}, against its patient's other "
              f"scan {_fmt(same)}: a view protects its patient only if MS-SSIM(view, own scan) is no higher than "
              f"another patient's ({NO_PROXY}: 1, the view is the scan)."), "",
             f"![similarity matrices of the compared systems' worst attackers]({figure.name})", ""]
    data = {"msssim": audit.msssim.describe(), "attacker_data": audit.attacker_data,
            "views_per_scan": audit.views_per_scan, "msssim_other_patient": other, "msssim_same_patient": same,
            "systems": rows, "figure": figure.name}
    return data, lines
