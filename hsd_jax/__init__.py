"""hsd-jax: Hierarchical Speculative Decoding in JAX.

    model = hsd_jax.load_model("checkpoints/smollm2-135m-instruct")
    out = hsd_jax.ar_generate(model, prompt_tokens, prompt_lengths, key, max_new_tokens=64)
    h = hsd_jax.Hierarchy([draft0, draft1, model], buffers=(4, 8), verifier="block")
    out = hsd_jax.hsd_generate(h, prompt_tokens, prompt_lengths, key, max_new_tokens=64)
    for chunk in hsd_jax.stream(h, prompt_tokens, prompt_lengths, key, max_new_tokens=64):
        ...  # chunk[b]: row b's newly committed tokens (same tokens as hsd_generate, as they come)

Sharded over a device mesh (see `hsd_jax.sharding`; several hosts: `hsd_jax.distributed`):

    mesh = hsd_jax.parse_mesh("data=2,model=4")
    model = hsd_jax.load_model("checkpoints/smollm2-135m-instruct", mesh=mesh)

The subpackages, lowest first: `models`, `decoding`, `parallel`, `io`, `planning`, `train`,
`bench`, `cli` (README, "Architecture").
"""

from hsd_jax import planning  # registers how a plan becomes a Hierarchy (Hierarchy.from_plan)
from hsd_jax.decoding.ar import GenerationOutput, ar_generate
from hsd_jax.decoding.drafter import Drafter
from hsd_jax.decoding.hsd import Hierarchy, HSDStats, hsd_generate
from hsd_jax.decoding.ngram import NGramDrafter
from hsd_jax.decoding.sampling import SamplingParams
from hsd_jax.decoding.stream import Streamer, stream
from hsd_jax.io.checkpoint import load_model, load_tokenizer, save_model
from hsd_jax.io.sources import from_source
from hsd_jax.models import (
                            KVCache,
                            Model,
                            ModelConfig,
                            UnsupportedArchitectureError,
                            decode_step,
                            forward,
                            init_params,
                            param_logical_axes,
)
from hsd_jax.parallel import distributed, sharding
from hsd_jax.parallel.sharding import ModelSharding, parse_mesh, shard_batch, shard_hierarchy, shard_model

__all__ = [
    "Drafter",
    "GenerationOutput",
    "HSDStats",
    "Hierarchy",
    "KVCache",
    "Model",
    "ModelConfig",
    "ModelSharding",
    "NGramDrafter",
    "SamplingParams",
    "UnsupportedArchitectureError",
    "ar_generate",
    "decode_step",
    "distributed",
    "forward",
    "from_source",
    "hsd_generate",
    "init_params",
    "load_model",
    "load_tokenizer",
    "param_logical_axes",
    "parse_mesh",
    "planning",
    "save_model",
    "shard_batch",
    "shard_hierarchy",
    "shard_model",
    "sharding",
    "stream",
    "Streamer",
]
