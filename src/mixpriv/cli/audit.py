"""``mixpriv audit``: the privacy audit (re-identification, test-retest ICC, source separation, sweep)."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_audit(sub: argparse._SubParsersAction) -> None:
    """Declare ``mixpriv audit``: write ``report.md``, ``report.json`` and the figures of the audit.

    Example:
        >>> from mixpriv.cli import build_parser
        >>> args = build_parser().parse_args(["audit", "--model", "m", "--out", "report",
        ...                                   "--bss-control-lambda", "client"])
        >>> args.split, args.k, args.bss_inits, args.bss_control_lambda, args.compared
        ('test', 8, 3, None, [])
    """
    from mixpriv.constants import AUDIT_PARTS
    from mixpriv.privacy.attackers import ATTACKERS, REQUEST_DESIGNS

    p = sub.add_parser("audit", help="privacy audit: re-identification (attacker suite), test-retest ICC, blind source separation, "
                                     "privacy-utility sweep -> report.md, report.json, figures")
    p.add_argument("--model", required=True, help="Mixup-Privacy model: name, folder or URL")
    p.add_argument("--data", type=Path, default=None, help="nnU-Net v2 folder (default: the embedded cohort)")
    p.add_argument("--out", type=Path, required=True, help="report folder")
    p.add_argument("--parts", nargs="+", choices=AUDIT_PARTS, default=list(AUDIT_PARTS),
                   help="parts to run (default: all)")
    p.add_argument("--key", type=Path, default=None, help="reference bank (default: the data's training split)")
    p.add_argument("--split", default="test", help="split whose scans are attacked")
    p.add_argument("--attacker-split", default="val",
                   help="split of the attacker's own public scans (population mean, learned attacker's training)")
    p.add_argument("--attacker-data", type=Path, default=None,
                   help="another nnU-Net folder holding the attacker's scans (default: the audited data)")
    p.add_argument("--attackers", nargs="+", choices=ATTACKERS, default=list(ATTACKERS),
                   help="re-identification attackers (default: all; the worst case leads the report)")
    p.add_argument("--learned-steps", type=int, default=600, help="training steps of the learned attacker")
    p.add_argument("--compared", nargs="+", default=[], metavar="MODEL",
                   help="Privacy-Net and Deformation-Proxy models (names, folders, checkpoints or URLs): their servers' "
                        "views are attacked too (the paper and learned attackers; Privacy-Net's returned segmentation "
                        "as well), next to no proxy and Mixup-Privacy (paper Table 2)")
    p.add_argument("--compared-views", type=int, default=4,
                   help="views the learned attacker draws of each of its own scans through Deformation-Proxy (its "
                        "own random keys)")
    p.add_argument("--key-neighbours", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="mixtures the key-recovery attacker averages into each mixture's reference (how often it "
                        "expects a reference to recur in the traffic); the best of these is reported")
    p.add_argument("--request-designs", nargs="+", choices=REQUEST_DESIGNS, default=["request"],
                   help="how the client sends each scan's K mixtures: in one request, shuffled with the mixtures "
                        "of the other scans of the batch (attacked by clustering), or only one (no TTA); the "
                        "first is the sweep's")
    p.add_argument("--max-cases", type=int, default=None, help="at most this many scans (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reid-settings", nargs="*", type=_mixing_setting, default=[], metavar="LOW:HIGH[:R[:WARP]]",
                   help="mixing settings the reid part attacks instead of the model's own (privacy only, no Dice; "
                        "the format of --sweep-settings)")
    p.add_argument("--sweep-settings", nargs="*", type=_mixing_setting, default=None, metavar="LOW:HIGH[:R[:WARP]]",
                   help="mixing settings the sweep attacks besides its models' (default: the five of the paper's "
                        "sweep), e.g. 0.35:0.65 0.5:0.8:3 (R references per mixture) 0.1:0.3:1:4 (each "
                        "reference warped afresh for each mixture, peak 4 voxels)")
    p.add_argument("--sweep-models", nargs="*", default=[],
                   help="models trained for other mixing settings (names or folders), for the sweep's Dice")
    p.add_argument("--baseline", default="tissue-baseline-2mm", help="non-private model the sweep compares with")
    p.add_argument("--k", type=int, default=8,
                   help="the client's K: mixtures per request the attackers see, and TTA references of the sweep's Dice")
    p.add_argument("--dice-cases", type=int, default=8, help="test scans for the sweep's Dice (0: all)")
    p.add_argument("--no-sweep-separation", dest="sweep_separation", action="store_false",
                   help="skip the sweep's separation attacks (about 15 CPU minutes per setting on the cohort)")
    p.add_argument("--bss-patches", type=int, default=8, help="patches attacked by source separation")
    p.add_argument("--bss-inits", type=int, default=3, help="random initialisations of each separation")
    p.add_argument("--bss-score-steps", type=int, default=2000, help="training steps of each score network")
    p.add_argument("--bss-steps-per-level", type=int, default=100, help="Langevin steps per noise level")
    p.add_argument("--bss-control-lambda", type=_control_lambda, default=0.5,
                   help="brain weight in the positive control's brain + grating mixtures (default 0.5: equal "
                        "weights); 'client' mixes with the attacked mixtures' λ draws")
    p.set_defaults(func=_audit)


def _mixing_setting(text: str):
    """``--sweep-settings``: ``LOW:HIGH[:R[:WARP]]`` as a :class:`~mixpriv.mixing.settings.MixingSettings`
    (R references per mixture, default 1; WARP the references' fresh warps in voxels, default 0).

    Example:
        >>> _mixing_setting("0.2:0.5:3").name
        'λ∈[0.2, 0.5], 3 refs'
        >>> _mixing_setting("0.1:0.3:1:4").name
        'λ∈[0.1, 0.3], refs warped 4 vox'
    """
    from mixpriv.mixing.settings import MixingSettings
    from mixpriv.validation import InputError

    parts = text.split(":")
    try:
        if len(parts) not in (2, 3, 4):
            raise ValueError
        return MixingSettings((float(parts[0]), float(parts[1])), int(parts[2]) if len(parts) > 2 else 1,
                              reference_warp=float(parts[3]) if len(parts) > 3 else 0.0)
    except (ValueError, InputError) as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not LOW:HIGH[:R[:WARP]] with 0 < LOW <= HIGH <= 1 "
                                         f"({error})") from None


def _control_lambda(text: str) -> float | None:
    """``--bss-control-lambda``: a weight, or ``client`` for the client's λ draws (None)."""
    return None if text == "client" else float(text)


def _audit(args: argparse.Namespace) -> None:
    from mixpriv.mixing.bank import ReferenceBank
    from mixpriv.privacy.attackers import AttackerOptions, LearnedAttackerOptions
    from mixpriv.privacy.bss import SeparationOptions
    from mixpriv.privacy.runner import AuditOptions, run_audit

    attackers = AttackerOptions(tuple(args.attackers), args.k, tuple(args.request_designs),
                                LearnedAttackerOptions(steps=args.learned_steps), tuple(args.key_neighbours))
    options = AuditOptions(parts=args.parts, split=args.split, attacker_split=args.attacker_split,
                           attacker_data=args.attacker_data, attackers=attackers,
                           max_cases=args.max_cases or None, seed=args.seed,
                           sweep_models=args.sweep_models, baseline=args.baseline, k=args.k,
                           reid_settings=tuple(args.reid_settings) or None,
                           **({"sweep_settings": tuple(args.sweep_settings)} if args.sweep_settings is not None else {}),
                           dice_cases=args.dice_cases or None, sweep_separation=args.sweep_separation,
                           compared=tuple(args.compared), compared_views=args.compared_views,
                           separation=SeparationOptions(num_patches=args.bss_patches, inits=args.bss_inits,
                                                        score_steps=args.bss_score_steps,
                                                        steps_per_level=args.bss_steps_per_level,
                                                        control_lambda=args.bss_control_lambda))
    bank = ReferenceBank.load(args.key) if args.key else None
    paths = run_audit(args.model, args.data, args.out, options, bank=bank)
    print(f"report: {paths['markdown']}")
