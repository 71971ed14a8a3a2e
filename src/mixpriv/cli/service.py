"""``mixpriv serve`` and ``mixpriv segment``: the segmentation server and its (Mixup-Privacy) private client."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from mixpriv.cli.options import add_connection, add_reference_warp, server_errors_exit

log = logging.getLogger("mixpriv")


def add_serve(sub: argparse._SubParsersAction) -> None:
    """Declare ``mixpriv serve``: host a private model's segmenter behind a token; it never sees a raw scan.

    It serves Mixup-Privacy (sent mixtures), Privacy-Net (encoded scans) and Deformation-Proxy
    (deformed scans) models, and refuses a baseline, which would be sent raw scans.

    Example:
        >>> from mixpriv.cli import build_parser
        >>> args = build_parser().parse_args(["serve", "--model", "tissue-mixpriv-2mm"])
        >>> args.host, args.port, args.max_k, args.max_body_mb, args.insecure_no_token
        ('127.0.0.1', 8000, 16, 128.0, False)
        >>> args.max_pending_mb, args.body_timeout, args.header_timeout, args.max_connections
        (1024.0, 120.0, 10.0, 256)
    """
    p = sub.add_parser("serve", help="run the segmentation server: hosts only the segmenter of a private model, "
                                     "sees only mixtures, encoded or deformed scans")
    p.add_argument("--model", required=True, help="private model (Mixup-Privacy, Privacy-Net or Deformation-Proxy; "
                                                  "not a baseline): registry name, folder or URL")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token-file", type=Path, default=None,
                   help="file holding the bearer token (default: $MIXPRIV_SERVER_TOKEN)")
    p.add_argument("--insecure-no-token", action="store_true", help="serve without authentication (testing only)")
    p.add_argument("--max-k", type=int, default=16, help="most volumes (mixtures or views) per request")
    p.add_argument("--max-side", type=int, default=512, help="largest spatial side (voxels)")
    p.add_argument("--min-side", type=int, default=8, help="smallest spatial side (voxels)")
    p.add_argument("--max-body-mb", type=float, default=128.0, help="largest request body (MiB); larger: 413")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds a request may wait and run (then 504)")
    p.add_argument("--workers", type=int, default=1, help="inferences run at once")
    p.add_argument("--max-pending", type=int, default=64, help="requests admitted at once (more: 503)")
    p.add_argument("--max-pending-mb", type=float, default=1024.0,
                   help="memory budget (MiB) of the bodies of the admitted requests together (more: 503)")
    p.add_argument("--body-timeout", type=float, default=120.0,
                   help="seconds to receive a request body (then 408, connection closed)")
    p.add_argument("--header-timeout", type=float, default=10.0,
                   help="seconds a connection may take to send its request headers (then closed)")
    p.add_argument("--max-connections", type=int, default=256,
                   help="open connections at once (more: 503 and closed)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: CPUs / workers)")
    p.add_argument("--batch-size", type=int, default=2, help="patches (of any of the K volumes) per forward pass")
    p.add_argument("--ssl-certfile", default=None, help="serve HTTPS with this certificate")
    p.add_argument("--ssl-keyfile", default=None)
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> None:
    from mixpriv.server.auth import ENV_TOKEN, read_token

    token = read_token(args.token_file)
    if token is None and not args.insecure_no_token:
        raise ValueError(f"no token: set ${ENV_TOKEN} or pass --token-file (or --insecure-no-token to serve without "
                         f"authentication)")
    if token is not None and args.insecure_no_token:
        log.warning("--insecure-no-token ignored: a token was given")
    if token is None:
        log.warning("serving WITHOUT authentication (--insecure-no-token)")

    from mixpriv.server.app import serve
    from mixpriv.server.config import ServerConfig
    from mixpriv.server.wire import MixtureLimits

    limits = MixtureLimits(max_k=args.max_k, min_side=args.min_side, max_side=args.max_side,
                           max_body_bytes=int(args.max_body_mb * 2**20))
    config = ServerConfig(limits=limits, timeout_s=args.timeout, workers=args.workers,
                          max_pending=args.max_pending, max_pending_bytes=int(args.max_pending_mb * 2**20),
                          body_timeout_s=args.body_timeout, header_timeout_s=args.header_timeout,
                          max_connections=args.max_connections, batch_size=args.batch_size)
    config.check()  # a clear message before the model loads
    serve(args.model, args.host, args.port, token, config, threads=args.threads, ssl_certfile=args.ssl_certfile,
          ssl_keyfile=args.ssl_keyfile)


def add_segment(sub: argparse._SubParsersAction) -> None:
    """Declare ``mixpriv segment``: mix and unmix here, send only the mixtures to a server.

    Example:
        >>> from mixpriv.cli import build_parser
        >>> args = build_parser().parse_args(["segment", "scan.nii.gz", "--server", "http://127.0.0.1:8000",
        ...                                   "--key", "key.mpk", "--model", "m", "--out", "seg.nii.gz"])
        >>> args.k, args.method, args.wire_dtype, args.timeout
        (8, 'learned', 'float32', 600.0)
    """
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
    add_connection(p, "mixtures")
    p.add_argument("--seed", type=int, default=None, help="seed of the references and weights (reproducible runs)")
    p.add_argument("--register", action="store_true",
                   help="register the scan (12-dof affine) to the key's template space first, on this machine: for "
                        "scans in scanner space; results come back on the scan's own grid")
    add_reference_warp(p)
    p.set_defaults(func=_segment)


def _segment(args: argparse.Namespace) -> None:
    from mixpriv.mixing.settings import MixingSettings
    from mixpriv.server.auth import read_token
    from mixpriv.server.client import PrivateClient
    from mixpriv.training import load_model

    model = load_model(args.model, kind="mixpriv")
    mixing = MixingSettings.of_model(model.hparams, reference_warp=args.reference_warp)
    with server_errors_exit(), PrivateClient(args.server, args.key, model, token=read_token(args.token_file),
                                             k=args.k, method=args.method, seed=args.seed,
                                             wire_dtype=args.wire_dtype, timeout=args.timeout,
                                             mixing=mixing) as client:
        written = client.segment_file(args.scan, args.out, args.probabilities, args.variance,
                                      inputs=(args.key, args.model), register=args.register)
    for path in (written.labels, written.probabilities, written.variance):
        if path is not None:
            print(f"wrote {path}")
