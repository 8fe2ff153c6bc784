"""hsd-jax: Hierarchical Speculative Decoding in JAX.

    model = hsd_jax.load_model("checkpoints/smollm2-135m-instruct")
    out = hsd_jax.ar_generate(model, prompt_tokens, prompt_lengths, key, max_new_tokens=64)
    h = hsd_jax.Hierarchy([draft0, draft1, model], buffers=(4, 8), verifier="block")
    out = hsd_jax.hsd_generate(h, prompt_tokens, prompt_lengths, key, max_new_tokens=64)

Sharded over a device mesh (see `hsd_jax.sharding`; several hosts: `hsd_jax.distributed`):

    mesh = hsd_jax.parse_mesh("data=2,model=4")
    model = hsd_jax.load_model("checkpoints/smollm2-135m-instruct", mesh=mesh)
"""

from hsd_jax.models.cache import KVCache
from hsd_jax.io.checkpoint import load_model, load_tokenizer, save_model
from hsd_jax.models.config import ModelConfig, UnsupportedArchitectureError
from hsd_jax.decoding.ar import GenerationOutput, ar_generate
from hsd_jax.decoding.hsd import Hierarchy, HSDStats, hsd_generate
from hsd_jax.models.decoder import Model, decode_step, forward, init_params, param_logical_axes
from hsd_jax.decoding.ngram import NGramDrafter
from hsd_jax.decoding.sampling import SamplingParams
from hsd_jax.parallel.sharding import ModelSharding, parse_mesh, shard_batch, shard_hierarchy, shard_model
from hsd_jax.parallel import distributed, sharding

__all__ = [
    "GenerationOutput", "HSDStats", "Hierarchy", "KVCache", "Model", "ModelConfig", "ModelSharding", "NGramDrafter",
    "SamplingParams", "UnsupportedArchitectureError", "ar_generate", "decode_step", "distributed", "forward",
    "hsd_generate", "init_params", "load_model", "load_tokenizer", "param_logical_axes", "parse_mesh", "save_model",
    "shard_batch", "shard_hierarchy", "shard_model", "sharding",
]
