"""Client-server overhead and throughput of ``mixpriv serve``, as Markdown tables.

Starts a real server process (``python -m mixpriv.cli serve``) on a free port of 127.0.0.1 and
measures, on the same machine:

* latency of one private whole-volume segmentation (mix K references, segment, learned unmix,
  average) through the server versus the same work in-process (segment the K mixtures over the
  grid, then unmix the stitched answer, as the remote client must), median of ``--repeats`` runs
  after one warm-up, and their ratio (the cost of the wire: encoding, HTTP, gzip, copies);
* server throughput: ``POST /v1/segment`` requests per second (K mixtures each, prepared
  beforehand) with 1, 8 and 32 concurrent clients (threads, one HTTP connection each), and
  the median request latency.

Client and server share the CPU, so on a small machine the ratio includes their contention
(give both sides the same ``--threads``; OpenMP threads that spin after their work slow the
other process down); the server's inference pool runs ``--workers`` inferences at once.

Usage:
    .venv/bin/python benchmarks/server_load.py                       # tissue-mixpriv-2mm, a cohort test scan
    .venv/bin/python benchmarks/server_load.py --model runs/x/export --scan scan.nii.gz --key key.mpk
    .venv/bin/python benchmarks/server_load.py --tiny --repeats 1     # smoke run: tiny model, 24³ phantom
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import torch
from timing import median_seconds

from mixpriv.constants import IMAGE
from mixpriv.inference.pipeline import PrivatePipeline, segment_mixtures
from mixpriv.inference.volume import load_scan
from mixpriv.mixing.bank import ReferenceBank
from mixpriv.server.auth import ENV_TOKEN
from mixpriv.server.client import PrivateClient

log = logging.getLogger("mixpriv.benchmarks.server_load")



def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tiny_setup(folder: Path) -> tuple[str, Path, ReferenceBank]:
    """A tiny exported Mixup-Privacy model, a 24³ phantom scan and a 4-reference key (smoke runs)."""
    import nibabel as nib

    from mixpriv.hub import export_pretrained
    from mixpriv.lightning.mixup import MixupPrivacyModule

    labels = {"background": 0, "CSF": 1, "GM": 2, "WM": 3}
    torch.manual_seed(0)
    model = MixupPrivacyModule(labels, {"encoder_name": "mixpriv-light-8", "encoder_depth": 3,
                                        "decoder_channels": [16, 8, 8]}, {"channels": [4, 8]},
                               patch_size=16, input_spacing=2.0).eval()
    model_dir = export_pretrained(model, folder, "tiny-server-bench")
    rng = np.random.default_rng(0)
    scan = folder / "scan.nii.gz"
    nib.save(nib.Nifti1Image(rng.random((24, 24, 24), dtype=np.float32), np.diag([2.0, 2.0, 2.0, 1.0])), str(scan))
    key = ReferenceBank(torch.rand(4, 1, 24, 24, 24), torch.randint(0, 4, (4, 24, 24, 24)), labels)
    return str(model_dir), scan, key


def default_setup(scan: Path | None, key_path: Path | None, model) -> tuple[Path, ReferenceBank]:
    """The scan (default: the first test scan of the embedded cohort) and the key (default: the model's demo bank)."""
    if scan is None:
        from mixpriv.data.cohort import build_cohort
        from mixpriv.data.folder import DatasetFolder

        scan = DatasetFolder(build_cohort()).cases("test")[0].image_paths[0]
    if key_path is not None:
        key = ReferenceBank.load(key_path)
    elif getattr(model, "default_bank", None) is not None:
        key = model.default_bank
    else:
        from mixpriv.data.cohort import build_cohort
        from mixpriv.data.datamodule import bank_from_cases
        from mixpriv.data.folder import DatasetFolder

        key = bank_from_cases(DatasetFolder(build_cohort()), "train", model.hparams.input_spacing, 16)
    return Path(scan), key


class Server:
    """``mixpriv serve`` in a child process, with a fresh random token."""

    def __init__(self, model: str, workers: int, threads: int | None, max_k: int) -> None:
        self.token = secrets.token_urlsafe(24)
        self.url = f"http://127.0.0.1:{free_port()}"
        command = [sys.executable, "-m", "mixpriv.cli", "serve", "--model", model, "--host", "127.0.0.1",
                   "--port", self.url.rsplit(":", 1)[1], "--workers", str(workers), "--max-k", str(max_k),
                   "--max-pending", "256", "--timeout", "3600"]
        if threads:
            command += ["--threads", str(threads)]
        self.log_file = tempfile.TemporaryFile()  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(command, env={**os.environ, ENV_TOKEN: self.token}, stdout=self.log_file,
                                     stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log_file.seek(0)
                raise RuntimeError(f"the server exited:\n{self.log_file.read().decode(errors='replace')}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the server did not answer /health within {timeout} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log_file.close()


def throughput(client_factory: Callable[[], PrivateClient], mixtures: torch.Tensor, concurrency: int,
               requests_per_client: int) -> tuple[float, float, float]:
    """(wall seconds, requests/s, median latency) of ``concurrency`` clients sending their requests at once."""
    clients = [client_factory() for _ in range(concurrency)]
    for client in clients:
        client.server_info()  # connect before the clock starts
    latencies: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(concurrency + 1)

    def run(client: PrivateClient) -> None:
        barrier.wait()
        for _ in range(requests_per_client):
            start = time.perf_counter()
            client.segment_mixtures(mixtures)
            with lock:
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=run, args=(c,)) for c in clients]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    for client in clients:
        client.close()
    return wall, len(latencies) / wall, statistics.median(latencies)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tissue-mixpriv-2mm", help="Mixup-Privacy model: name, folder or URL")
    parser.add_argument("--scan", type=Path, default=None, help="NIfTI scan (default: a cohort test scan)")
    parser.add_argument("--key", type=Path, default=None, help="reference bank (default: the model's demo bank)")
    parser.add_argument("--k", type=int, default=8, help="references per private segmentation")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each latency (median)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32], help="concurrent clients")
    parser.add_argument("--requests", type=int, default=2, help="requests per client in the throughput runs")
    parser.add_argument("--workers", type=int, default=1, help="server inferences at once")
    parser.add_argument("--threads", type=int, default=None, help="server torch threads (default: CPUs / workers)")
    parser.add_argument("--client-threads", type=int, default=None,
                        help="torch threads of this (client / in-process) side (default: as many as the server's)")
    parser.add_argument("--tiny", action="store_true", help="smoke run: a tiny model and a 24³ phantom scan")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    server_threads = args.threads or max(1, (os.cpu_count() or 1) // args.workers)
    torch.set_num_threads(args.client_threads or server_threads)

    from mixpriv.hub import from_pretrained

    scratch = tempfile.TemporaryDirectory()
    if args.tiny:
        model_ref, scan, key = tiny_setup(Path(scratch.name))
        model = from_pretrained(model_ref)
    else:
        model_ref = args.model
        model = from_pretrained(model_ref)
        scan, key = default_setup(args.scan, args.key, model)
    subject, _ = load_scan(scan, model.hparams.input_spacing)
    image = subject[IMAGE].data.float()
    log.info("model %s, scan %s (preprocessed %s), K = %d", model_ref, scan.name, tuple(image.shape[1:]), args.k)

    server = Server(model_ref, args.workers, server_threads, max(16, args.k))
    try:
        server.wait_ready()
        pipeline = PrivatePipeline.of_model(model, segment_volumes=lambda sent: segment_mixtures(
            model.segment_mixture, sent, model.hparams.patch_size))
        local = median_seconds(lambda: pipeline(image, key, args.k), args.repeats)
        client = PrivateClient(server.url, key, model, token=server.token, k=args.k, seed=0)
        remote = median_seconds(lambda: client.segment(image), args.repeats)
        mixtures = pipeline.mix(image, key, args.k).mixtures
        rows = []
        for concurrency in args.concurrency:
            log.info("throughput with %d concurrent client(s)", concurrency)
            wall, rate, latency = throughput(
                lambda: PrivateClient(server.url, key, model, token=server.token, k=args.k), mixtures, concurrency,
                args.requests)
            rows.append((concurrency, concurrency * args.requests, wall, rate, latency))
        client.close()
    finally:
        server.stop()
        scratch.cleanup()

    shape = "×".join(str(s) for s in image.shape[1:])
    print(f"\n### Private whole-volume segmentation, K = {args.k}, {shape} voxels "
          f"(median of {args.repeats}; torch threads: {torch.get_num_threads()} client, {server_threads} server)\n")
    print("| pipeline | seconds | ratio |")
    print("|---|---:|---:|")
    print(f"| in-process (mix, segment, learned unmix, average) | {local:.3f} | 1.00 |")
    print(f"| through `mixpriv serve` (same work + wire) | {remote:.3f} | {remote / local:.2f} |")
    print(f"\n### Server throughput: `POST /v1/segment` with K = {args.k} mixtures, {args.workers} worker(s)\n")
    print("| concurrent clients | requests | wall s | requests/s | median latency s |")
    print("|---:|---:|---:|---:|---:|")
    for concurrency, n, wall, rate, latency in rows:
        print(f"| {concurrency} | {n} | {wall:.2f} | {rate:.2f} | {latency:.3f} |")


if __name__ == "__main__":
    main()
