"""Tokens/s of greedy AR and HSD decoding on each data x model mesh next to one device.

    .venv/bin/python scripts/bench_mesh.py [--devices 8] [--json out.json]

Without accelerators it runs on N fake CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=N,
set here before jax is imported), which all share the host's cores: expect meshes to be slower
than one device there; the numbers show the partitioned programs run, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=8, help="fake CPU devices when no accelerator is present")
    p.add_argument("--meshes", default="data=1,model=8;data=2,model=4;data=4,model=2;data=8,model=1",
                   help="';'-separated mesh specs")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", dest="json_out")
    args = p.parse_args(argv)
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (
            f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"
        )

    import jax

    from hsd_jax.bench.meshes import bench_meshes, format_bench
    from hsd_jax.decoding.ngram import NGramDrafter
    from hsd_jax.models import Model, init_params
    from hsd_jax.models.config import ModelConfig

    config = ModelConfig(
        model_type="llama",
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=1024,
        num_layers=4,
        num_heads=8,
        num_kv_heads=8,
        head_dim=32,
        max_position_embeddings=512,
    )
    target = Model(init_params(config, jax.random.PRNGKey(0), scale=0.1), config)
    draft_config = ModelConfig(**{**config.__dict__, "num_layers": 1})
    draft = Model(
        {**target.params, "layers": jax.tree.map(lambda x: x[:1], target.params["layers"])}, draft_config
    )
    rows = bench_meshes(target, drafts=[NGramDrafter(3, config.vocab_size), draft], buffers=(2, 3),
                        meshes=args.meshes.split(";"), batch=args.batch, max_new_tokens=args.max_new_tokens,
                        repeats=args.repeats)
    device = jax.devices()[0]
    print(f"{jax.device_count()} x {device.platform} ({device.device_kind}), {os.cpu_count()} host cores; "
          f"llama {config.num_layers}x{config.hidden_size}, vocab {config.vocab_size}, batch {args.batch}, "
          f"{args.max_new_tokens} new tokens; HSD = ngram(3) < 1-layer prefix (replicated) < target (tensor)")
    print(format_bench(rows))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f, indent=2)
    return 0 if all(r["same_tokens"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
