"""Inference time and peak memory of each network on CPU for a 300-slice study (prints figures).

Run: ``.venv/bin/python benchmarks/inference.py [--slices 300] [--size 512] [--width full|tiny]``

For each network the full pipeline step is timed on a synthetic 300 x 512 x 512 HU volume
(0.75 mm pixels, 1 mm slices): preprocessing (canonical, resampling, normalisation) plus the forward pass
(sliding window for segmentation, 7 vertebral crops for DenseNet, one sagittal reformat for the 2D
ResNet-50, one 512 x 512 radiograph). Weights are random (speed does not depend on them). Peak memory is
the process' peak resident set size (``ru_maxrss``) measured in a fresh subprocess per network, so figures
do not leak into each other.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def _volume(slices: int, size: int):  # type: ignore[no-untyped-def]
    import numpy as np

    from dicomnode.imaging.volume import Volume

    rng = np.random.default_rng(0)
    data = rng.normal(40.0, 20.0, (slices, size, size)).astype(np.float32)
    data[:, : size // 10, :] = -1000.0
    data[:, :, : size // 10] = -100.0
    aff = np.diag([0.75, 0.75, 1.0, 1.0])
    return Volume(data=data, affine=aff, header={"Modality": "CT"})


def run_one(name: str, slices: int, size: int, full: bool, threads: int) -> dict[str, float | str]:
    import numpy as np
    import torch

    torch.set_num_threads(threads)
    from dicomnode.ml import bundle as bdl
    from dicomnode.ml import networks as nw
    from dicomnode.ml.inference import predict_vbmd_prepared, segment_levels_prepared
    from dicomnode.ml.preprocess import prepare

    vol = _volume(slices, size)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    t0 = time.perf_counter()
    if name == "seg_unet":
        kw: dict[str, Any] = {"n_classes": 3, "width": 32 if full else 16, "num_res_units": 2 if full else 0}
        spec = bdl.InputSpec(
            spacing_mm=(3.0, 3.0, 3.0), patch_size=(48, 48, 48), intensity_normalisation="fat-soft-tissue"
        )
        net = nw.build("seg_unet", kw).eval()
        man = bdl.Manifest(
            "bench", "0", "segmentation", "seg_unet", kw, "", "0" * 64, spec, {"units": "class-index"}, "", ""
        )
        prep = prepare(vol, spec.spacing_mm, spec.intensity_window, spec.intensity_normalisation)
        t_prep = time.perf_counter() - t0
        # network + naming of the levels on the coarse grid + upsampling to the 300 x 512 x 512 grid; with
        # random weights the mask is arbitrary, so the naming part is closer to a worst case than typical
        segment_levels_prepared(bdl.LoadedBundle(Path("."), man, net), prep)
    elif name == "densenet121_3d":
        kw = {"out_channels": 1, "width": 64 if full else 8, "growth_rate": 32 if full else 8,
              "block_config": [6, 12, 24, 16] if full else [2, 2, 2, 2]}  # fmt: skip
        spec = bdl.InputSpec(
            spacing_mm=(2.0, 2.0, 2.0), patch_size=(32, 32, 32), intensity_normalisation="fat-soft-tissue"
        )
        net = nw.build("densenet121_3d", kw).eval()
        man = bdl.Manifest(
            "bench", "0", "bmd", "densenet121_3d", kw, "", "0" * 64, spec, {"units": "mg/cm3"}, "", ""
        )
        prep = prepare(vol, spec.spacing_mm, spec.intensity_window, spec.intensity_normalisation)
        t_prep = time.perf_counter() - t0
        centre = vol.index_to_lps([size / 2, size / 2, slices / 2])
        cents = {f"L{i}": (centre[0], centre[1], centre[2] + 30.0 * (i - 3)) for i in range(7)}
        predict_vbmd_prepared(bdl.LoadedBundle(Path("."), man, net), prep, cents)
    elif name == "resnet50_2d_sagittal":
        net = nw.resnet50_2d(out_channels=2, width=64 if full else 16).eval()
        prep = prepare(vol, (0.75, 0.75, 0.75), (-200.0, 1200.0), "none")
        t_prep = time.perf_counter() - t0
        sag = prep.array[:, :, prep.array.shape[2] // 2]  # mid-sagittal reformat (k, j)
        with torch.no_grad():
            net(torch.from_numpy(np.ascontiguousarray(sag))[None, None])
    elif name == "resnet50_2d_radiograph":
        net = nw.resnet50_2d(out_channels=2, width=64 if full else 16).eval()
        t_prep = 0.0
        with torch.no_grad():
            net(torch.rand(1, 1, 512, 512))
    else:
        raise SystemExit(f"unknown network {name}")
    total = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {
        "network": name,
        "parameters": nw.n_parameters(net),
        "preprocess_s": round(t_prep, 2),
        "total_s": round(total, 2),
        "peak_rss_mib": round(peak, 0),
        "rss_before_mib": round(base_rss, 0),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--width", choices=("full", "tiny"), default="full")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only:
        print(json.dumps(run_one(args.only, args.slices, args.size, args.width == "full", args.threads)))
        return
    names = ("seg_unet", "densenet121_3d", "resnet50_2d_sagittal", "resnet50_2d_radiograph")
    print(
        f"CPU inference, {args.slices} x {args.size} x {args.size} study, "
        f"{args.width} width, {args.threads} threads"
    )
    print(f"{'network':26s} {'params':>10s} {'prep s':>8s} {'total s':>8s} {'peak RSS MiB':>13s}")
    for name in names:
        cmd = [sys.executable, __file__, "--only", name, "--slices", str(args.slices)]
        cmd += ["--size", str(args.size), "--width", args.width, "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
        if proc.returncode != 0:
            print(
                f"{name:26s} failed: "
                f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
            )
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        print(
            f"{name:26s} {r['parameters']:>10,d} {r['preprocess_s']:>8.2f} {r['total_s']:>8.2f} "
            f"{r['peak_rss_mib']:>13.0f}"
        )


if __name__ == "__main__":
    main()
