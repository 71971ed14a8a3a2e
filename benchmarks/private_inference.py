"""Whole-volume private inference against the baseline, on the published models, as a Markdown table.

Measured in one run, on one held-out scan of the embedded cohort (88 x 104 x 88 at 2 mm), each
number the median of ``--repeats`` runs taken in turn (so that the machine's noise hits them alike)
after one warm-up:

* ``baseline_s``: the non-private segmenter over the patch grid;
* ``private_k1_s``, ``private_k8_s``: mix with K references, segment, learned unmixing, average
  (:class:`mixpriv.inference.pipeline.PrivatePipeline`, fused per patch);
* ``unmix_share_k8``: the learned unmixer's share of the K = 8 time (its calls timed inside the run);
* ``server_k8_ratio``: one request of K = 8 mixtures through a real ``mixpriv serve`` on 127.0.0.1
  (encode, HTTP, gzip, decode) over the same segmentation in-process; ``server_k8_inference_s``
  is the server's own segmentation time within it (its ``Server-Timing`` header).

``--compare N`` also scores Learned+TTA and Naive+TTA Dice on N test scans for the fused pipeline
and the two-pass one (segment the K mixtures over the grid, then unmix the stitched answer: what
the remote client does, and what mixpriv did in process before), at the default overlap (a quarter
of a patch: 27 patches on the cohort volume) and at an eighth of a patch (12 patches).

Usage:
    .venv/bin/python benchmarks/private_inference.py --json outputs/private_inference.json
    .venv/bin/python benchmarks/private_inference.py --private runs/x/export --compare 8
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from mixpriv.memory import tune_cpu_memory

MEMORY = tune_cpu_memory()  # as the mixpriv command line does, here and in the server it starts (mixpriv.memory)
import torch
from server_load import Server, default_setup

from mixpriv.constants import IMAGE, LABEL, TEST
from mixpriv.data.cohort import build_cohort
from mixpriv.data.folder import DatasetFolder
from mixpriv.data.preprocessing import preprocessing
from mixpriv.evaluation.dice import dice_per_class, mean_foreground
from mixpriv.files import write_text_atomically
from mixpriv.hub import from_pretrained
from mixpriv.inference.pipeline import PrivatePipeline, segment_mixtures
from mixpriv.inference.volume import segment_volume
from mixpriv.server.client import PrivateClient


def synchronize(device: torch.device | None) -> None:
    """Wait for queued GPU work, so that a timer sees it."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(runs: dict[str, Callable[[], object]], repeats: int,
                        device: torch.device | None = None) -> dict[str, float]:
    """Median seconds of each function, run in turn ``repeats`` times after one warm-up each."""
    for fn in runs.values():
        fn()
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


class TimedUnmixer:
    """Wraps an unmixer and adds up the seconds spent in its calls (synchronised on a GPU) in ``seconds``."""

    def __init__(self, unmix, device: torch.device) -> None:
        self.unmix, self.device, self.seconds = unmix, device, 0.0

    def __call__(self, *args):
        synchronize(self.device)
        start = time.perf_counter()
        out = self.unmix(*args)
        synchronize(self.device)
        self.seconds += time.perf_counter() - start
        return out


def server_ratio(model_ref: str, model, key, image, k: int, repeats: int, batch_size: int,
                 warmup: int) -> tuple[float, float, float]:
    """(in-process, through-the-server, the server's own inference) seconds of one request of K mixtures.

    The third is the median of the server's ``Server-Timing`` ``infer`` durations: the segmenter's
    work in the server process, without HTTP, the wire encoding or the client.

    Both are compared in steady state: this process has already run the K = 8 pipeline many
    times, so the fresh server process first answers ``warmup`` untimed requests (a new process
    measured 10.1, 8.5, 8.5, 7.7 s for its first four K = 8 segmentations, with no HTTP at all).
    """
    mixtures = PrivatePipeline.of_model(model).mix(image, key, k, torch.Generator().manual_seed(0)).mixtures
    server = Server(model_ref, workers=1, threads=torch.get_num_threads(), max_k=max(16, k))
    try:
        server.wait_ready()
        with PrivateClient(server.url, key, model, token=server.token, k=k) as client:
            for _ in range(warmup):
                client.segment_mixtures(mixtures)
            inferences = []

            def remote():
                client.segment_mixtures(mixtures)
                inferences.append(client.last_server_timing["infer"])

            times = interleaved_medians({
                "local": lambda: segment_mixtures(model.segment_mixture, mixtures, model.hparams.patch_size,
                                                  batch_size=batch_size),
                "remote": remote,
            }, repeats)
    finally:
        server.stop()
    return times["local"], times["remote"], statistics.median(inferences[1:])


def compare_pipelines(model, baseline, folder: DatasetFolder, key, cases: int, k: int) -> list[tuple[str, ...]]:
    """Dice of the fused and two-pass pipelines at two overlaps on ``cases`` test scans (same draws)."""
    rows = []
    transform = preprocessing(model.hparams.input_spacing)
    subjects = [transform(case.to_subject()) for case in folder.cases(TEST)[:cases]]
    patch = model.hparams.patch_size
    for overlap in (None, patch // 8):
        grid = "default (a quarter of a patch)" if overlap is None else f"{patch // 8} (an eighth of a patch)"
        local = PrivatePipeline.of_model(model, overlap=overlap)
        remote = PrivatePipeline.of_model(model, overlap=overlap, segment_volumes=lambda sent, o=overlap: (
            segment_mixtures(model.segment_mixture, sent, patch, overlap=o)))
        scores = {"fused": {"learned": [], "naive": []}, "two-pass": {"learned": [], "naive": []}, "baseline": []}
        for index, subject in enumerate(subjects):
            image, label = subject[IMAGE].data.float(), subject[LABEL].data[0]
            mixtures = local.mix(image, key, k, torch.Generator().manual_seed(index))
            for name, pipeline in (("fused", local), ("two-pass", remote)):
                run = pipeline.run(mixtures, ("learned", "naive"))
                for method in ("learned", "naive"):
                    scores[name][method].append(mean_foreground(dice_per_class(run[method].labels, label,
                                                                              model.label_names)))
            probs = segment_volume(lambda x: torch.softmax(baseline(x).float(), 1), image, patch, overlap=overlap)
            scores["baseline"].append(mean_foreground(dice_per_class(probs.argmax(0), label, model.label_names)))
        mean = statistics.fmean
        rows.append((grid, f"{mean(scores['baseline']):.4f}", f"{mean(scores['fused']['learned']):.4f}",
                     f"{mean(scores['two-pass']['learned']):.4f}", f"{mean(scores['fused']['naive']):.4f}",
                     f"{mean(scores['two-pass']['naive']):.4f}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="tissue-baseline-2mm", help="baseline model: name, folder or URL")
    parser.add_argument("--private", default="tissue-mixpriv-2mm", help="Mixup-Privacy model: name, folder or URL")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=2, help="patches per forward pass (all pipelines)")
    parser.add_argument("--no-server", action="store_true", help="skip the client-server measurement")
    parser.add_argument("--server-warmup", type=int, default=3,
                        help="untimed K = 8 requests that warm the fresh server process up first")
    parser.add_argument("--compare", type=int, default=0, metavar="N", help="also compare Dice on N test scans")
    parser.add_argument("--device", default="cpu", help="where the networks run (cpu, cuda)")
    parser.add_argument("--json", type=Path, default=None, help="write the measured numbers here")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    device = torch.device(args.device)
    baseline = from_pretrained(args.baseline).eval().to(device)
    private = from_pretrained(args.private).eval().to(device)
    folder = DatasetFolder(build_cohort(progress=False))
    _, key = default_setup(None, None, private)
    image = preprocessing(private.hparams.input_spacing)(folder.cases(TEST)[0].to_subject())[IMAGE].data.float()
    patch = private.hparams.patch_size

    pipeline = PrivatePipeline.of_model(private, batch_size=args.batch_size)
    if pipeline.unmix_volumes is not None:  # the coarse-context unmixer, on whole volumes
        timed = pipeline.unmix_volumes = TimedUnmixer(pipeline.unmix_volumes, device)
    else:
        timed = pipeline.unmix = TimedUnmixer(pipeline.unmix, device)
    generator = torch.Generator().manual_seed(0)
    k8_calls = []

    def private_k8():
        timed.seconds = 0.0
        start = time.perf_counter()
        pipeline(image, key, 8, ("learned",), generator)
        synchronize(device)
        k8_calls.append(timed.seconds / (time.perf_counter() - start))

    seconds = interleaved_medians({
        "baseline_s": lambda: segment_volume(lambda x: torch.softmax(baseline(x).float(), 1), image, patch,
                                             batch_size=args.batch_size, device=device),
        "private_k1_s": lambda: pipeline(image, key, 1, ("learned",), generator),
        "private_k8_s": private_k8,
    }, args.repeats, device)
    results = {**seconds, "unmix_share_k8": statistics.median(k8_calls[1:])}
    if not args.no_server and device.type == "cpu":  # the server process runs on the CPU
        local, remote, inference = server_ratio(args.private, private, key, image, 8, args.repeats,
                                                args.batch_size, args.server_warmup)
        results.update(server_k8_local_s=local, server_k8_remote_s=remote, server_k8_ratio=remote / local,
                       server_k8_inference_s=inference, server_warmup=args.server_warmup)
    base = results["baseline_s"]
    shape = "×".join(str(s) for s in image.shape[1:])
    print(f"### Whole-volume inference, {shape} voxels, {args.private} vs {args.baseline} "
          f"(median of {args.repeats}; torch {torch.__version__}, {torch.get_num_threads()} threads)\n")
    print("| what | seconds | ratio | target |\n|---|---:|---:|---|")
    print(f"| baseline | {base:.3f} | 1.00 × baseline | |")
    print(f"| private, K = 1 | {results['private_k1_s']:.3f} | {results['private_k1_s'] / base:.2f} × baseline | ≤ 1.2 |")
    print(f"| private, K = 8 | {results['private_k8_s']:.3f} | {results['private_k8_s'] / base:.2f} × baseline | ≤ 8.8 |")
    print(f"| learned unmixer within K = 8 | {results['unmix_share_k8'] * results['private_k8_s']:.3f} | "
          f"{results['unmix_share_k8']:.1%} of K = 8 | ≤ 15% |")
    if "server_k8_ratio" in results:
        print(f"| one K = 8 request, in process | {results['server_k8_local_s']:.3f} | 1.00 | |")
        print(f"| one K = 8 request through `mixpriv serve` | {results['server_k8_remote_s']:.3f} | "
              f"{results['server_k8_ratio']:.2f} × in process | ≤ 1.05 |")
        print(f"| of which the server's own inference (Server-Timing) | {results['server_k8_inference_s']:.3f} | "
              f"{results['server_k8_inference_s'] / results['server_k8_local_s']:.2f} × in process | |")
    if args.compare:
        print(f"\n### Mean foreground Dice on {args.compare} test scans, K = 8, same draws\n")
        print("| grid overlap | Baseline | Learned+TTA fused | Learned+TTA two-pass | Naive+TTA fused | "
              "Naive+TTA two-pass |\n|---|---:|---:|---:|---:|---:|")
        for row in compare_pipelines(private, baseline, folder, key, args.compare, 8):
            print("| " + " | ".join(row) + " |")
    if args.json:
        results.update(model=args.private, baseline=args.baseline, shape=list(image.shape[1:]), device=str(device),
                       **MEMORY,
                       torch_threads=torch.get_num_threads(), repeats=args.repeats, batch_size=args.batch_size)
        write_text_atomically(args.json, json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
