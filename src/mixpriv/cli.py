"""The ``mixpriv`` command line: build the cohort, train, evaluate, make a key, segment, audit privacy, demo."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mixpriv import __version__

log = logging.getLogger("mixpriv")


def _add_build_cohort(sub) -> None:
    p = sub.add_parser("build-cohort", help="build the embedded synthetic brain cohort (nnU-Net v2 layout)")
    p.add_argument("--out", type=Path, default=None, help="folder (default: under $MIXPRIV_HOME or ~/.cache/mixpriv)")
    p.add_argument("--spacing", type=float, default=2.0, help="voxel size in mm (2 by default, 1 for paper size)")
    p.add_argument("--n-patients", type=int, default=60)
    p.add_argument("--scans-per-patient", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_build_cohort)


def _build_cohort(args) -> None:
    from mixpriv.data.cohort import build_cohort, default_cohort_dir

    out = args.out or default_cohort_dir(args.spacing, args.seed, args.n_patients, args.scans_per_patient)
    path = build_cohort(out, n_patients=args.n_patients, scans_per_patient=args.scans_per_patient,
                        spacing=args.spacing, seed=args.seed)
    print(path)


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model from a recipe")
    p.add_argument("--recipe", required=True, help="recipe name (recipes/<name>.yaml) or path")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: runs/<recipe name>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (e.g. after its max_time cap)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. trainer.max_steps=100")
    p.set_defaults(func=_train)


def _train(args) -> None:
    from mixpriv.recipe import load_recipe
    from mixpriv.training import train

    recipe = load_recipe(args.recipe, args.overrides)
    run = train(recipe, args.out or Path("runs") / recipe.get("name", "run"), resume=args.resume)
    print(f"checkpoint: {run.checkpoint}")
    print(f"training: {run.stats['train_seconds_total']} s, {run.stats['patches_per_second']} patches/s")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="Dice table (Baseline, Naive, Naive+TTA, Learned, Learned+TTA) on a test split")
    p.add_argument("--mixpriv", type=Path, required=True, help="Mixup-Privacy checkpoint")
    p.add_argument("--baseline", type=Path, default=None, help="baseline checkpoint (optional row)")
    p.add_argument("--data", type=Path, default=None, help="nnU-Net v2 folder (default: embedded cohort)")
    p.add_argument("--key", type=Path, default=None, help="reference bank (default: drawn from the training split)")
    p.add_argument("--k", type=int, default=8, help="number of TTA references")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-cases", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("outputs/evaluation"))
    p.set_defaults(func=_evaluate)


def _evaluate(args) -> None:
    from mixpriv.data.datamodule import bank_from_cases, resolve_data_dir
    from mixpriv.data.folder import DatasetFolder
    from mixpriv.evaluation.runner import evaluate_models
    from mixpriv.mixing.bank import ReferenceBank
    from mixpriv.training import load_model

    private = load_model(args.mixpriv)
    baseline = load_model(args.baseline) if args.baseline else None
    folder = DatasetFolder(resolve_data_dir(args.data))
    bank = ReferenceBank.load(args.key) if args.key else bank_from_cases(folder, "train", private.hparams.input_spacing)
    result = evaluate_models(baseline, private, folder, bank, args.out, k=args.k, seed=args.seed,
                             max_cases=args.max_cases)
    print(result.table.to_markdown(title="Segmentation (Dice), test split", notes={"K": str(args.k)}))
    print("whole-volume seconds per case:", {k: round(v, 2) for k, v in result.seconds.items()})
    print(f"outputs in {args.out}")


def _add_keygen(sub) -> None:
    p = sub.add_parser("keygen", help="create a secret key: a reference bank saved with owner-only permissions")
    p.add_argument("--out", type=Path, required=True, help="key file to write (e.g. key.mpk)")
    p.add_argument("--data", type=Path, default=None, help="labelled references (default: embedded cohort)")
    p.add_argument("--split", default="train")
    p.add_argument("--n", type=int, default=None, help="number of references (default: all of the split)")
    p.add_argument("--spacing", type=float, default=None, help="resample references to this spacing (mm)")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_keygen)


def _keygen(args) -> None:
    from mixpriv.data.datamodule import bank_from_cases, resolve_data_dir
    from mixpriv.data.folder import DatasetFolder

    bank = bank_from_cases(DatasetFolder(resolve_data_dir(args.data)), args.split, args.spacing, args.n)
    path = bank.save(args.out, overwrite=args.overwrite)
    print(f"wrote {bank!r} to {path} (mode 600)")


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="privately segment one scan in-process (mix, segment, unmix, TTA)")
    p.add_argument("scan", type=Path, help="NIfTI scan")
    p.add_argument("--model", type=Path, required=True, help="Mixup-Privacy checkpoint")
    p.add_argument("--key", type=Path, required=True, help="reference bank from `mixpriv keygen`")
    p.add_argument("--out", type=Path, required=True, help="label map to write (NIfTI, on the scan's grid)")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--method", choices=("learned", "naive"), default="learned")
    p.add_argument("--variance", type=Path, default=None, help="also write the TTA variance map here")
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=_predict)


def _predict(args) -> None:
    import numpy as np
    import torch

    from mixpriv.constants import IMAGE
    from mixpriv.inference.volume import load_scan, save_like, to_original_grid
    from mixpriv.lightning.tta import TTAEnsembler
    from mixpriv.mixing.bank import ReferenceBank
    from mixpriv.training import load_model

    model = load_model(args.model)
    subject, original = load_scan(args.scan, model.hparams.input_spacing)
    ensembler = TTAEnsembler(model, ReferenceBank.load(args.key), k=args.k, methods=(args.method,), seed=args.seed)
    result = ensembler(subject[IMAGE].data.float())[args.method]
    affine = subject[IMAGE].affine
    labels = to_original_grid(result.labels[None].to(torch.uint8), affine, original, label=True)
    print(f"wrote {save_like(labels, args.scan, args.out)}")
    if args.variance:
        variance = to_original_grid(result.variance.sum(0, keepdim=True), affine, original, label=False)
        print(f"wrote {save_like(variance, args.scan, args.variance, dtype=np.float32)}")


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="run the segmentation server: hosts only the segmenter, sees only mixtures")
    p.add_argument("--model", required=True, help="Mixup-Privacy model: registry name, folder or URL")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token-file", type=Path, default=None,
                   help="file holding the bearer token (default: $MIXPRIV_SERVER_TOKEN)")
    p.add_argument("--insecure-no-token", action="store_true", help="serve without authentication (testing only)")
    p.add_argument("--max-k", type=int, default=16, help="most mixtures per request")
    p.add_argument("--max-side", type=int, default=512, help="largest spatial side (voxels)")
    p.add_argument("--min-side", type=int, default=8, help="smallest spatial side (voxels)")
    p.add_argument("--max-body-mb", type=float, default=128.0, help="largest request body (MiB); larger: 413")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a request may wait and run (then 504)")
    p.add_argument("--workers", type=int, default=1, help="inferences run at once")
    p.add_argument("--max-pending", type=int, default=64, help="requests admitted at once (more: 503)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: CPUs / workers)")
    p.add_argument("--batch-size", type=int, default=2, help="patch positions per forward pass")
    p.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate")
    p.add_argument("--ssl-keyfile", default=None)
    p.set_defaults(func=_serve)


def _serve(args) -> None:
    from mixpriv.server.auth import ENV_TOKEN, read_token

    token = read_token(args.token_file)
    if token is None and not args.insecure_no_token:
        raise ValueError(f"no token: set ${ENV_TOKEN} or pass --token-file (or --insecure-no-token to serve without "
                         f"authentication)")
    if token is not None and args.insecure_no_token:
        log.warning("--insecure-no-token ignored: a token was given")
    if token is None:
        log.warning("serving WITHOUT authentication (--insecure-no-token)")

    from mixpriv.server.app import ServerConfig, serve
    from mixpriv.server.wire import MixtureLimits

    limits = MixtureLimits(max_k=args.max_k, min_side=args.min_side, max_side=args.max_side,
                           max_body_bytes=int(args.max_body_mb * 2**20))
    config = ServerConfig(limits=limits, timeout_s=args.timeout, workers=args.workers,
                          max_pending=args.max_pending, batch_size=args.batch_size)
    serve(args.model, args.host, args.port, token, config, threads=args.threads, ssl_certfile=args.ssl_certfile,
          ssl_keyfile=args.ssl_keyfile)


def _add_segment(sub) -> None:
    p = sub.add_parser("segment", help="privately segment a scan through a server (mix and unmix here, "
                                       "only mixtures sent)")
    p.add_argument("scan", type=Path, help="NIfTI scan")
    p.add_argument("--server", required=True, help="server URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--key", type=Path, required=True, help="reference bank from `mixpriv keygen` (stays here)")
    p.add_argument("--model", required=True, help="local Mixup-Privacy model (name, folder or URL): its unmixer")
    p.add_argument("--out", type=Path, required=True, help="label map to write (NIfTI, on the scan's grid)")
    p.add_argument("--k", type=int, default=8, help="references mixed with the scan")
    p.add_argument("--method", choices=("learned", "naive"), default="learned")
    p.add_argument("--probabilities", type=Path, default=None, help="also write the class probabilities here")
    p.add_argument("--variance", type=Path, default=None, help="also write the TTA variance map here")
    p.add_argument("--token-file", type=Path, default=None,
                   help="file holding the bearer token (default: $MIXPRIV_SERVER_TOKEN)")
    p.add_argument("--wire-dtype", choices=("float32", "float16"), default="float32",
                   help="dtype of the mixtures sent (float16: half the bytes)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a request may take")
    p.add_argument("--seed", type=int, default=None, help="seed of the references and weights (reproducible runs)")
    p.set_defaults(func=_segment)


def _segment(args) -> None:
    from mixpriv.server.auth import read_token
    from mixpriv.server.client import PrivateClient, ServerError

    logging.getLogger("httpx").setLevel(logging.WARNING)  # keep the URL-per-request lines out of the output
    try:
        with PrivateClient(args.server, args.key, args.model, token=read_token(args.token_file), k=args.k,
                           method=args.method, seed=args.seed, wire_dtype=args.wire_dtype,
                           timeout=args.timeout) as client:
            written = client.segment_file(args.scan, args.out, args.probabilities, args.variance)
    except ServerError as error:
        log.error("%s", error)
        raise SystemExit(1) from None
    for path in (written.labels, written.probabilities, written.variance):
        if path is not None:
            print(f"wrote {path}")


def _add_models(sub) -> None:
    p = sub.add_parser("models", help="list the published models of the registry")
    p.add_argument("--registry", default=None, help="registry.json path or URL (default: the package's)")
    p.set_defaults(func=_models)


def _models(args) -> None:
    from mixpriv.hub import load_registry

    registry = load_registry(args.registry)
    for name in registry.names():
        print(f"{name}: {registry.models[name].get('description', '')}")


def _add_publish(sub) -> None:
    p = sub.add_parser("publish", help="export a checkpoint as a model-zoo entry (safetensors + card) and register it")
    p.add_argument("checkpoint", type=Path, help="Lightning checkpoint to export")
    p.add_argument("--name", required=True, help="model name, e.g. tissue-mixpriv-2mm")
    p.add_argument("--out", type=Path, default=Path("checkpoints"), help="zoo folder (holds registry.json)")
    p.add_argument("--card", type=Path, default=None, help="JSON file of extra card fields (recipe, data, evaluation)")
    p.add_argument("--bank", type=Path, default=None, help="demo reference bank to publish with a Mixup-Privacy model")
    p.add_argument("--float32", action="store_true", help="store float32 weights (default float16)")
    p.add_argument("--url", default=None, help="base URL the folder will be served from")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=_publish)


def _publish(args) -> None:
    import json

    import torch

    from mixpriv.hub import export_pretrained, update_registry
    from mixpriv.mixing.bank import ReferenceBank
    from mixpriv.training import load_model

    card = json.loads(args.card.read_text()) if args.card else {}
    bank = ReferenceBank.load(args.bank) if args.bank else None
    folder = export_pretrained(load_model(args.checkpoint), args.out, args.name, bank=bank, card=card,
                               dtype=torch.float32 if args.float32 else torch.float16, overwrite=args.overwrite)
    update_registry(folder, args.out / "registry.json", url=args.url)
    print(f"published {args.name} in {folder}")


def _add_finetune(sub) -> None:
    p = sub.add_parser("finetune", help="continue training a published model on your labelled data")
    p.add_argument("--from", dest="source", required=True, help="model name, folder or URL")
    p.add_argument("--data", type=Path, required=True, help="nnU-Net v2 folder with labels")
    p.add_argument("--out", type=Path, default=Path("runs/finetuned"))
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the model's)")
    p.add_argument("--freeze-encoder", action="store_true", help="train only the decoder, head (and unmixer)")
    p.add_argument("--name", default=None, help="name of the exported fine-tuned model")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. data.batch_size=2")
    p.set_defaults(func=_finetune)


def _finetune(args) -> None:
    from mixpriv.finetune import finetune

    run = finetune(args.source, args.data, args.out, max_steps=args.max_steps, lr=args.lr,
                   freeze_encoder=args.freeze_encoder, overrides=args.overrides, export_name=args.name)
    print(f"checkpoint: {run.checkpoint}")


def _add_audit(sub) -> None:
    from mixpriv.constants import AUDIT_PARTS

    p = sub.add_parser("audit", help="privacy audit: re-identification, test-retest ICC, blind source separation, "
                                     "privacy-utility sweep -> report.md, report.json, figures")
    p.add_argument("--model", required=True, help="Mixup-Privacy model: name, folder or URL")
    p.add_argument("--data", type=Path, default=None, help="nnU-Net v2 folder (default: the embedded cohort)")
    p.add_argument("--out", type=Path, required=True, help="report folder")
    p.add_argument("--parts", nargs="+", choices=AUDIT_PARTS, default=list(AUDIT_PARTS),
                   help="parts to run (default: all)")
    p.add_argument("--key", type=Path, default=None, help="reference bank (default: the data's training split)")
    p.add_argument("--split", default="test", help="split whose scans are attacked")
    p.add_argument("--max-cases", type=int, default=None, help="at most this many scans (0: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep-models", nargs="*", default=[],
                   help="models trained for other mixing settings (names or folders), for the sweep's Dice")
    p.add_argument("--baseline", default="tissue-baseline-2mm", help="non-private model the sweep compares with")
    p.add_argument("--k", type=int, default=8, help="TTA references for the sweep's Dice")
    p.add_argument("--dice-cases", type=int, default=8, help="test scans for the sweep's Dice (0: all)")
    p.add_argument("--bss-patches", type=int, default=8, help="patches attacked by source separation")
    p.add_argument("--bss-inits", type=int, default=3, help="random initialisations of each separation")
    p.add_argument("--bss-score-steps", type=int, default=2000, help="training steps of each score network")
    p.add_argument("--bss-steps-per-level", type=int, default=100, help="Langevin steps per noise level")
    p.add_argument("--bss-control-lambda", type=_control_lambda, default=0.5,
                   help="brain weight in the positive control's brain + grating mixtures (default 0.5: equal "
                        "weights); 'client' mixes with the attacked mixtures' λ draws")
    p.set_defaults(func=_audit)


def _control_lambda(text: str) -> float | None:
    """``--bss-control-lambda``: a weight, or ``client`` for the client's λ draws (None)."""
    return None if text == "client" else float(text)


def _audit(args) -> None:
    from mixpriv.mixing.bank import ReferenceBank
    from mixpriv.privacy.attack import SeparationOptions
    from mixpriv.privacy.runner import AuditOptions, run_audit

    options = AuditOptions(parts=args.parts, split=args.split, max_cases=args.max_cases or None, seed=args.seed,
                           sweep_models=args.sweep_models, baseline=args.baseline, k=args.k,
                           dice_cases=args.dice_cases or None,
                           separation=SeparationOptions(num_patches=args.bss_patches, inits=args.bss_inits,
                                                        score_steps=args.bss_score_steps,
                                                        steps_per_level=args.bss_steps_per_level,
                                                        control_lambda=args.bss_control_lambda))
    bank = ReferenceBank.load(args.key) if args.key else None
    paths = run_audit(args.model, args.data, args.out, options, bank=bank)
    print(f"report: {paths['markdown']}")


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="the main job: cohort -> published (or trained) models -> private segmentation "
                                    "-> Dice table")
    p.add_argument("--out", type=Path, default=Path("outputs/demo"))
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--max-cases", type=int, default=2, help="held-out test scans to segment (0: all 24)")
    p.add_argument("--train", action="store_true", help="train the recipes instead of loading the published models")
    p.add_argument("overrides", nargs="*", help="with --train: recipe overrides, e.g. trainer.max_steps=200")
    p.set_defaults(func=_demo)


def _demo(args) -> None:
    from mixpriv.demo import run_demo

    run_demo(args.out, k=args.k, max_cases=args.max_cases or None, train=args.train, overrides=args.overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixpriv", description="Privacy-preserving 3D segmentation (Mixup-Privacy).")
    parser.add_argument("--version", action="version", version=f"mixpriv {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_build_cohort, _add_train, _add_finetune, _add_evaluate, _add_keygen, _add_predict,
                _add_serve, _add_segment, _add_models, _add_publish, _add_audit, _add_demo):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from mixpriv.hub.errors import HubError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, HubError) as error:
        log.error("%s", error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
