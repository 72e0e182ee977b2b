"""Which timm CNN families lcnnify covers: one model per family (docs/lcnn.md's table), converted at
3×64×64 (Inception-v3 at 96×96) with the default ``gates="keep"`` and with ``gates="remove"``.

    python benchmarks/families.py [--models resnet18 regnety_002 ...]

One line per model: the verdict for each setting and, when not covered, the first reason."""
from __future__ import annotations

import argparse
import warnings

import timm
import torch

import lcnn_zoo

FAMILIES = ["resnet18", "seresnet18", "ecaresnet26t", "resnext26ts", "gernet_s", "repvgg_a0", "regnetx_002",
            "regnety_002", "mobilenetv2_050", "mnasnet_small", "fbnetc_100", "efficientnet_b0", "tinynet_e",
            "mixnet_s", "hardcorenas_a", "mobilenetv3_small_050", "lcnet_050", "ghostnet_050", "rexnet_100",
            "densenet121", "dpn48b", "cspresnet50", "cspdarknet53", "cs3darknet_s", "res2net50_14w_8s", "xception41",
            "resnetv2_50", "dla34", "hrnet_w18_small", "selecsls42b", "ese_vovnet19b_dw", "vgg11", "inception_v3",
            "resnest14d", "skresnet18", "nf_resnet26", "tresnet_m"]


def verdict(name: str, **options) -> str:
    size = 96 if name == "inception_v3" else 64
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = lcnn_zoo.lcnnify(timm.create_model(name, num_classes=10), input_size=(3, size, size), **options)
    report = model.lcnn_report
    if report.ok:
        return "covered"
    first = next(iter(report.unconverted))
    return f"not ({first[0] or '<root>'}: {first[2][:90]})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=FAMILIES)
    args = parser.parse_args()
    counts = [0, 0]
    for name in args.models:
        keep, remove = verdict(name), verdict(name, gates="remove")
        counts[0] += keep == "covered"
        counts[1] += remove == "covered"
        print(f"{name:22s} keep: {keep}\n{'':22s} remove: {remove}", flush=True)
    print(f"covered: {counts[0]} of {len(args.models)} with the defaults, {counts[1]} with gates='remove'")


if __name__ == "__main__":
    main()
