"""Planning: profile a model family, price hierarchies, choose one.

    profile   measure forward costs c(k) and pairwise acceptances -> `Stats`
    stats     the stats schema (`Stats.from_json` / `to_json`, `load_stats`, `save_stats`)
    latency   the cost model: predicted seconds per token of a hierarchy (`expected_latency`)
    solver    the GSP search over chains and buffers (`solve`) -> `Plan`s
    plan      plan.json (`Plan`, `load_plan`, `save_plan`) and `hierarchy_from_plan`
    timing    the one timing rule (compile, warm up, median of repeats)

Importing this package registers `hierarchy_from_plan` as `Hierarchy.from_plan`'s loader.
"""

from hsd_jax.planning.latency import (
                                      Acceptance,
                                      RoundPrediction,
                                      acceptance_vector,
                                      draft_cost,
                                      expected_latency,
                                      expected_round,
                                      expected_tokens,
                                      forward_cost,
                                      simulate,
                                      surrogate_latency,
)
from hsd_jax.planning.plan import PLAN_VERSION, Plan, hierarchy_from_plan, load_plan, plan_label, save_plan
from hsd_jax.planning.profile import (
                                      cost_ks,
                                      greedy_position_profile,
                                      machine_name,
                                      measure_acceptance,
                                      measure_costs,
                                      measure_family_costs,
                                      package_versions,
                                      profile_family,
)
from hsd_jax.planning.solver import Candidate, gsp_candidates, solve
from hsd_jax.planning.stats import (
                                      MODES,
                                      STATS_VERSION,
                                      ModelStats,
                                      Stats,
                                      acceptance_mode,
                                      load_stats,
                                      save_stats,
)
from hsd_jax.planning.timing import (
                                      Stopwatch,
                                      StreamTiming,
                                      median_seconds,
                                      time_once,
                                      time_stream,
                                      timed_runs,
)

__all__ = [
    "Acceptance",
    "Candidate",
    "MODES",
    "ModelStats",
    "PLAN_VERSION",
    "Plan",
    "RoundPrediction",
    "STATS_VERSION",
    "Stats",
    "acceptance_mode",
    "acceptance_vector",
    "cost_ks",
    "draft_cost",
    "expected_latency",
    "expected_round",
    "expected_tokens",
    "forward_cost",
    "greedy_position_profile",
    "gsp_candidates",
    "hierarchy_from_plan",
    "load_plan",
    "load_stats",
    "machine_name",
    "measure_acceptance",
    "measure_costs",
    "measure_family_costs",
    "median_seconds",
    "Stopwatch",
    "package_versions",
    "plan_label",
    "profile_family",
    "save_plan",
    "save_stats",
    "simulate",
    "solve",
    "surrogate_latency",
    "time_once",
    "time_stream",
    "StreamTiming",
    "timed_runs",
]
