"""Multi-process (multi-host) start-up and global batches.

    hsd_jax.distributed.initialize()          # first thing, before any other JAX call
    mesh = hsd_jax.sharding.parse_mesh("data=4,model=8")   # spans the devices of every process
    prompts, lengths = hsd_jax.distributed.global_batch(mesh, my_prompts, my_lengths)

Every process runs the same program. Call the generators under `jax.jit` there: outside it
`ar_generate`/`hsd_generate` read prompt values on the host, which a process cannot do for rows
that live on another host.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from hsd_jax.parallel.sharding import DATA, check_batch

try:  # JAX's own launcher auto-detection; private, so guarded
    from jax._src import clusters as _clusters
except ImportError:  # pragma: no cover - a future JAX may move it
    _clusters = None


def detected_cluster() -> tuple[str, int | None] | None:
    """The multi-process launcher JAX recognises here (a Cloud TPU VM, Slurm, Open MPI,
    Kubernetes, ...; a JAX_COORDINATOR_ADDRESS in the environment counts as one) and its process
    count (None: unknown), or None outside any launcher."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS", None
    try:
        envs = [env for env in _clusters.ClusterEnv._cluster_types if not env.opt_in_only_method]
        found = next((env for env in envs if env.is_env_present()), None)
        return None if found is None else (found.__name__, found.get_process_count())
    except Exception:  # detectors probe metadata servers and job variables: many ways to fail
        return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: int | Sequence[int] | None = None,
               **kwargs) -> bool:
    """Join a multi-process JAX job (`jax.distributed.initialize`); call before any other JAX use.

    With no arguments the launcher is auto-detected (TPU VMs; Slurm, Open MPI, Kubernetes for
    multi-process GPU; see `detected_cluster`). Outside any launcher, on a single-process one
    (e.g. a single-host TPU VM), with `num_processes=1` or when already initialized this is a
    no-op. Returns whether this process is part of a distributed job. Extra keyword arguments go
    to `jax.distributed.initialize`. (Multi-process CPU also needs
    `jax.config.update("jax_cpu_collectives_implementation", "gloo")`.)
    """
    if jax.distributed.is_initialized():
        return True
    if num_processes == 1:
        return False
    explicit = (coordinator_address, num_processes, process_id, local_device_ids)
    if all(a is None for a in explicit) and not kwargs.get("cluster_detection_method"):
        cluster = detected_cluster()
        if cluster is None or cluster[1] == 1:
            return False
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids, **kwargs)
    except RuntimeError as e:
        if "before any JAX" in str(e) or "must be called before" in str(e):
            raise RuntimeError(f"{e}: call hsd_jax.distributed.initialize() first thing, before creating "
                               "meshes, arrays or models") from e
        raise
    return True


def global_batch(mesh: Mesh, *local_arrays) -> tuple[jax.Array, ...]:
    """Assemble global batch arrays from this process's rows (`jax.make_array_from_process_local_data`).

    Each process passes the rows of its own slice of the `data` axis, e.g. `prompt_tokens [b, P]`
    and `prompt_lengths [b]` (processes that share a data slice, because `model` spans them, pass
    the same rows); rows are split over `data`. Single-process, this is `sharding.shard_batch`.
    """
    sharding = NamedSharding(mesh, PartitionSpec(DATA))
    local_slices = len({index[0].start for index in
                        sharding.addressable_devices_indices_map((mesh.shape[DATA], 1)).values()})
    out = []
    for local in local_arrays:
        local = np.asarray(local)
        if local.ndim not in (1, 2):
            raise ValueError(f"batch arrays are [rows] or [rows, width]; got shape {local.shape}")
        if local.shape[0] % local_slices:
            raise ValueError(
                f"this process holds {local_slices} slices of mesh axis {DATA!r}, which do not divide "
                f"its {local.shape[0]} rows; give every process a multiple of {local_slices} rows"
            )
        array = jax.make_array_from_process_local_data(sharding, local)
        check_batch(mesh, array.shape[0])
        out.append(array)
    return tuple(out)
