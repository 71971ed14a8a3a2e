"""Write the privacy audit as Markdown + JSON (+ the figures of :mod:`mixpriv.privacy.figures`).

Each ``*_section`` function turns one part's result into a JSON-ready dict and Markdown lines, so a
part run alone is reported the same way as in the full audit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

from mixpriv.evaluation.report import markdown_table
from mixpriv.files import write_text_atomically
from mixpriv.privacy.audit import SweepAudit, TestRetestAudit
from mixpriv.privacy.bss import (
    CONTROL,
    LAMBDA_ESTIMATED,
    LAMBDA_KNOWN,
    AttackResult,
    SeparationAudit,
)
from mixpriv.privacy.figures import (
    plot_privacy_utility,
    plot_separation,
    plot_test_retest,
)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def reliability_section(audit: TestRetestAudit, out_dir: Path) -> tuple[dict, list[str]]:
    """Table 1's ICC rows: ICC(A,1) of the per-case Dice of two predictions with different references."""
    figure = plot_test_retest(audit.first, audit.second, audit.icc, out_dir / "test_retest.png")
    data = {name: {"icc": r.icc, "ci95": [r.ci_low, r.ci_high], "n": r.n, "n_dropped": r.n_dropped}
            for name, r in audit.icc.items()}
    lines = ["## Test-retest reliability (paper Table 1, ICC)", "",
             (f"Each of {len(audit.case_ids)} scans is segmented twice (Learned, one reference each, two different "
             "references); ICC(A,1) (McGraw & Wong: two-way random, absolute agreement, single measure; "
             "pingouin 0.7.0) of the per-case Dice."), "",
             *markdown_table(["Class", "ICC(A,1)", "95% CI", "n"],
                             [[name, _fmt(v["icc"]), f"[{_fmt(v['ci95'][0])}, {_fmt(v['ci95'][1])}]", str(v["n"])]
                              for name, v in data.items()]),
             "", f"![test-retest]({figure.name})", ""]
    return {"icc": data, "case_ids": audit.case_ids, "dice_first": audit.first, "dice_second": audit.second,
            "figure": figure.name}, lines


def sweep_section(audit: SweepAudit, out_dir: Path) -> tuple[dict, list[str]]:
    """The privacy-utility sweep: per mixing setting, re-identification, separation and Dice; the recommendation."""
    rows = [{"setting": row.name, "mixing": row.setting.name, "design": row.design,
             "lambda_range": list(row.setting.lambda_range),
             "references_per_mix": row.setting.references_per_mix, "worst_case_map": row.reid_map,
             "worst_case_attacker": row.reid_attacker,
             "bss": row.bss, "bss_trivial": row.bss_trivial, "bss_request": row.bss_request,
             "bss_request_trivial": row.bss_request_trivial, "dice": row.dice, "model": row.model}
            for row in audit.rows]
    figure = plot_privacy_utility(rows, out_dir / "privacy_utility.png", audit.baseline_dice)
    recommended = audit.recommended()
    separation = any(r["bss"] is not None or r["bss_request"] is not None for r in rows)
    bss_note = ("BSS = MS-SSIM of the target recovered by the λ-known separation "
                "attack on each setting's mixtures (same patches and MS-SSIM setting as the separation section), "
                "next to MS-SSIM(mixture, target) on the same patches: the attack recovers the target only where "
                "it beats the mixture. *BSS on requests*: the same targets, each with the K mixtures of its request "
                "separated jointly, next to MS-SSIM(request mean, target). ") if separation else ""
    header = ["Setting", "worst-case mAP", "worst attacker"]
    header += ["BSS MS-SSIM", "mixture MS-SSIM", "BSS on requests", "request mean MS-SSIM"] if separation else []
    table = [[r["setting"], _fmt(r["worst_case_map"]), r["worst_case_attacker"],
              *([_fmt(r["bss"]), _fmt(r["bss_trivial"]), _fmt(r["bss_request"]), _fmt(r["bss_request_trivial"])]
                if separation else []),
              _fmt(r["dice"]), r["model"] or "—"] for r in rows]
    lines = ["## Privacy-utility sweep", "",
             ("Re-identification: the worst-case mAP of the attacker suite, and the attacker that reached it. "
              f"{bss_note}Dice = Learned+TTA (K = {audit.k}; "
              "Learned for one mixture per scan, the `single` design) of a model trained for the setting, "
              f"on {audit.dice_cases} test scans (— = no model given for the setting). "
              f"Non-private baseline on the same scans: {_fmt(audit.baseline_dice)}."), "",
             *markdown_table([*header, "Dice (Learned+TTA; single: Learned)", "model"], table),
             "",
             (f"**Recommended:** {recommended.name}: the lowest worst-case mAP among the settings "
              "whose Dice is within 0.01 of the baseline." if recommended else
              "**Recommended:** none: no setting with a measured Dice is within 0.01 of the baseline."),
             "", f"![privacy-utility]({figure.name})", ""]
    data = {"rows": rows, "baseline_dice": audit.baseline_dice, "dice_cases": audit.dice_cases, "k": audit.k,
            "recommended": recommended.name if recommended else None, "figure": figure.name}
    return data, lines


_FIGURE_FILES = {LAMBDA_KNOWN: "separation_lambda_known.png", LAMBDA_ESTIMATED: "separation_lambda_estimated.png",
                 CONTROL: "separation_control.png"}


def _separation_figure(result: AttackResult, path: Path) -> Path:
    index = result.figure_patch()
    recovered = [result.recovered[index, i, 0] for i in range(result.recovered.shape[1])]
    title = (f"{result.name}: patch {index + 1} (median of {result.scores.shape[0]}), λ = {float(result.lam[index]):.2f}"
             + (f", λ̂ = {float(result.lam_used[index]):.2f}" if result.estimated else "")
             + f"; mixture vs target MS-SSIM {float(result.trivial[index]):.3f}")
    return plot_separation(result.target[index, 0], result.reference[index, 0], result.mixture[index, 0], recovered,
                           result.scores[index].tolist(), path, title)


def separation_section(audit: SeparationAudit, out_dir: str | Path) -> tuple[dict, list[str]]:
    """Paper Fig. 4: one figure per attack and a table of MS-SSIM against the trivial baseline.

    Returns:
        A JSON-ready dict and the Markdown lines of the section (for
        :func:`mixpriv.privacy.report.write_report`).

    Example:
        >>> data, lines = separation_section(audit, Path("audit"))  # doctest: +SKIP
        >>> data["attacks"]["λ known"]["msssim_mean"]  # doctest: +SKIP
        0.41
    """
    out_dir = Path(out_dir)
    options = audit.options
    data: dict = {"msssim": audit.msssim.describe(), "patch_size": options.patch_size,
                  "references_per_mix": audit.references_per_mix,
                  "num_patches": options.num_patches, "inits": options.inits,
                  "lambda_range": list(audit.lambda_range), "num_levels": options.num_levels,
                  "steps_per_level": options.steps_per_level, "score_steps": options.score_steps,
                  "training_seconds": audit.training_seconds, "denoising": audit.denoising, "options": asdict(options),
                  "attacks": {}}
    rows = []
    for name, result in audit.attacks.items():
        figure = _separation_figure(result, out_dir / _FIGURE_FILES.get(name, f"separation_{len(rows)}.png"))
        data["attacks"][name] = {
            "msssim_mean": result.mean, "msssim_std": result.std, "msssim_best_init_mean": result.best_init_mean,
            "trivial_mean": result.trivial_mean, "trivial_std": result.trivial_std,
            "lambda_error": result.lambda_error, "lambda_error_folded": result.lambda_error_folded,
            "reference_mean": result.reference_mean, "reference_trivial_mean": result.reference_trivial_mean,
            "scores": result.scores.tolist(), "trivial": result.trivial.tolist(), "lambda": result.lam.tolist(),
            "lambda_used": result.lam_used.tolist(), "figure": figure.name}
        rows.append([name, f"{_fmt(result.mean)} ± {_fmt(result.std)}", _fmt(result.best_init_mean),
                     f"{_fmt(result.trivial_mean)} ± {_fmt(result.trivial_std)}",
                     f"{_fmt(result.reference_mean)} / {_fmt(result.reference_trivial_mean)}",
                     _fmt(result.lambda_error)])
    low, high = audit.lambda_range
    lines = ["## Blind source separation attack (paper Fig. 4)", "",
             f"BASIS separation of {options.num_patches} brain-containing {options.patch_size}³ patches of mixtures "
             f"λ·target + (1 − λ)·{_second_source(audit.references_per_mix)}, λ ~ U({low:g}, {high:g}), "
             f"{options.inits} random initialisations each; "
             f"annealed Langevin dynamics over {options.num_levels} noise levels × {options.steps_per_level} steps "
             f"(σ {options.sigma_max:g} → {options.sigma_min:g}, δ = {options.delta:g}); each score network trained "
             f"for {options.score_steps} steps. Scores: {audit.msssim.describe()}. The first MS-SSIM column is the "
             "mean ± std over all patches and initialisations (the attack run once); *best init* is the mean over "
             "patches of the best initialisation, picked with the truth (an optimistic oracle). λ error: mean "
             "|λ̂ − λ| of the grid search over " + ", ".join(f"{c:g}" for c in options.lambda_candidates)
             + " (one side of 0.5: a shared prior cannot tell λ from 1 − λ). The control mixes a brain patch with a "
             f"grating ({_control_weights(options.control_lambda)}) and separates them with the brain prior and a "
             "grating prior (λ known). *Second source*: "
             "MS-SSIM of the other recovered source (the secret reference; the grating for the control) against "
             "the true one, next to MS-SSIM(mixture, second source): a separation that works recovers both.", "",
             *markdown_table(["Attack", "MS-SSIM recovered vs target (mean ± std)", "best init",
                              "MS-SSIM mixture vs target (trivial)", "second source: recovered / mixture",
                              "λ error"], rows),
             "", ("**Reading rule:** the attack *recovers* the target only where its MS-SSIM clearly exceeds the "
                  "trivial mixture-vs-target baseline; the positive control must do so for a low brain + brain score "
                  "to mean privacy rather than a broken attack."), "",
             *[f"![{name}]({data['attacks'][name]['figure']})" for name in audit.attacks], "",
             *_denoising_lines(audit.denoising)]
    return data, lines


def _second_source(references_per_mix: int) -> str:
    if references_per_mix == 1:
        return "reference"
    return f"reference (the Dirichlet-weighted sum of {references_per_mix} references, one source for BASIS)"


def _control_weights(control_lambda: float | None) -> str:
    if control_lambda is None:
        return "brain weight λ, the attacked mixtures' draws"
    return f"brain weight {control_lambda:g}, grating weight {1 - control_lambda:g}"


def _denoising_lines(denoising: Mapping[str, list[dict[str, float]]]) -> list[str]:
    """The priors' one-step denoising check: RMSE noisy -> denoised per noise level."""
    if not denoising:
        return []
    names = list(denoising)
    sigmas = [row["sigma"] for row in denoising[names[0]]]
    rows = [[f"{sigma:.3g}", *(f"{_fmt(denoising[n][i]['noisy_rmse'])} → {_fmt(denoising[n][i]['denoised_rmse'])}"
                               for n in names)] for i, sigma in enumerate(sigmas)]
    return [("**Are the priors trained enough?** One-step (Tweedie) denoising x̃ + σ²·s(x̃, σ) of the attacked "
             "target patches (brain prior) and of the control gratings (grating prior): RMSE of the noisy input → "
             "RMSE of the denoised estimate, per noise level. A useful prior lowers it at every level."), "",
            *markdown_table(["σ", *(f"{name} prior" for name in names)], rows), ""]


def write_report(sections: Mapping[str, tuple[dict, list[str]]], metadata: Mapping, out_dir: str | Path,
                 title: str = "Privacy audit") -> dict[str, Path]:
    """Write ``report.md`` and ``report.json`` from the sections (name -> (data, Markdown lines)).

    Example:
        >>> import tempfile
        >>> paths = write_report({"demo": ({"x": 1}, ["## Demo", ""])}, {"model": "m"}, tempfile.mkdtemp())
        >>> sorted(paths)
        ['json', 'markdown']
    """
    out_dir = Path(out_dir)
    header = [f"# {title}", "", *[f"- **{key}:** {value}" for key, value in metadata.items()], ""]
    report = {"metadata": dict(metadata), **{name: data for name, (data, _) in sections.items()}}
    return {"markdown": write_text_atomically(out_dir / "report.md", "\n".join(
                header + [line for _, lines in sections.values() for line in lines])),
            "json": write_text_atomically(out_dir / "report.json",
                                          json.dumps(_json_ready(report), indent=2, allow_nan=False) + "\n")}


def _json_ready(value):
    """``value`` with numbers as plain floats and NaN or infinite ones as ``None`` (strict JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(key): _json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(item) for item in value]
    if value is None or isinstance(value, (bool, int, str)):
        return value
    number = float(value)
    return number if math.isfinite(number) else None
