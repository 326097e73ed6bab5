"""The memory plan for a model and a layout: per-GPU and host memory of each ZeRO option at
each batch size, whether it fits, and the nearest layout that does (docpipe/model/memory_plan.py).

Defaults are the practitioners' setting: MiniCPM-V 2.6 (8.1 B parameters; Qwen2-7B and
SigLIP-400M shapes) on one node of 4 x 48 GB, batch 4 x 2048 tokens, 9 slices + overview.
Give ``--model DIR_OR_S3`` to read a real checkpoint's shape and parameter count instead.

    .venv/bin/python benchmarks/memory_plan.py [--model PATH] [--gpus 4] [--nodes 1] [--gpu-gib 48]
"""

from __future__ import annotations

import argparse
import json

from docpipe.config import S3Config
from docpipe.model.memory_plan import MINICPM_V_2_6, TRIED, Layout, estimate, nearest_fit, shape_of, tensor_sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a model folder or s3:// URI (default: MiniCPM-V 2.6's published shape)")
    parser.add_argument("--gpus", type=int, default=4)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--gpu-gib", type=float, default=48)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--slices", type=int, default=10)
    args = parser.parse_args()
    shape = MINICPM_V_2_6
    if args.model:
        from docpipe.model.compatibility import read_model_config

        shape = shape_of(read_model_config(args.model, S3Config()), tensor_sizes(args.model, S3Config()))
    print(
        f"{shape.parameters / 1e9:.2f} B parameters; {args.nodes} node(s) x {args.gpus} GPU(s) of {args.gpu_gib:g} GiB"
    )
    for option in TRIED:
        for batch in (args.batch, max(args.batch // 2, 1), 1):
            layout = Layout(
                deepspeed=option,
                batch=batch,
                tokens=args.tokens,
                slices=args.slices,
                gpus_per_node=args.gpus,
                nodes=args.nodes,
            )
            found = estimate(shape, layout, args.gpu_gib)
            print(f"{'fits ' if found.fits else 'NO   '} {found.describe()}")
    asked = Layout(
        deepspeed="zero2",
        batch=args.batch,
        tokens=args.tokens,
        slices=args.slices,
        gpus_per_node=args.gpus,
        nodes=args.nodes,
    )
    near = nearest_fit(shape, asked, args.gpu_gib, None)
    print(json.dumps({"asked": "zero2", "nearest_fit": near.describe() if near else None}))


if __name__ == "__main__":
    main()
