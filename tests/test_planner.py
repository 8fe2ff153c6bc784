"""The planner: exact latency model vs Monte Carlo, Leviathan's closed form, the GSP DP vs brute
force, solve time, stats validation, plan.json, the `plan` command and `hierarchy_from_plan`."""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np
import pytest

from hsd_jax.cli.plan import add_parser as add_plan_parser
from hsd_jax.cli.plan import run as run_plan
from hsd_jax.planning import (
    Plan,
    RoundPrediction,
    expected_latency,
    expected_round,
    forward_cost,
    gsp_candidates,
    hierarchy_from_plan,
    load_plan,
    load_stats,
    plan_label,
    save_plan,
    simulate,
    solve,
    surrogate_latency,
)


def _cost_table(rng: np.random.Generator, base: float, kmax: int = 16) -> list[float]:
    """c(1..kmax): increasing in k (a fixed part plus a random per-token slope)."""
    return (base * (1.0 + np.cumsum(np.r_[0.0, rng.uniform(0.01, 0.3, kmax - 1)]))).tolist()


def _stats(names, tables, alpha, *, target=None, temperature=0.0, sources=None, params=None) -> dict:
    """A stats dict over models in cost order; alpha[j][i] for j < i is the greedy acceptance."""
    size = len(names)
    acceptance = {
        names[j]: {names[i]: float(alpha[j][i]) for i in range(j + 1, size)} for j in range(size - 1)
    }
    mode = "greedy" if temperature == 0 else "sampled"
    return {"version": 1, "hardware": "test", "dtype": "float32", "batch_size": 1, "temperature": temperature,
            "versions": {}, "target": target or names[-1],
            "models": [{"name": n, "source": (sources or {}).get(n, f"models/{n}"),
                        "params": (params or {}).get(n, 1000 * (k + 1)), "cost_s": list(t)}
                       for k, (n, t) in enumerate(zip(names, tables))],
            "acceptance": {mode: acceptance}}


def _random_stats(rng: np.random.Generator, size: int, kmax: int = 16) -> dict:
    bases = np.sort(rng.uniform(0.5, 20.0, size)) * 1e-3
    tables = [_cost_table(rng, b, kmax) for b in bases]
    alpha = rng.uniform(0.3, 0.95, (size, size))
    return _stats([f"m{k}" for k in range(size)], tables, alpha)


# ------------------------------------------------------------------------- latency model


def test_exact_model_matches_simulation():
    """`expected_latency` (overshoot, fixed widths, catch-up) agrees with a 200k-round Monte Carlo
    of the same algorithm within 1% on random chains, i.i.d. and per-position acceptance."""
    rng = np.random.default_rng(1234)
    worst = 0.0
    for case in range(12):
        depth = int(rng.integers(1, 4))
        bases = np.sort(rng.uniform(0.2, 10.0, depth + 1))
        costs = [_cost_table(rng, b) for b in bases]
        acceptances = list(rng.uniform(0.3, 0.95, depth))
        if case >= 10:  # per-position profiles: the last entry repeats
            acceptances = [tuple(rng.uniform(0.3, 0.95, int(rng.integers(1, 5)))) for _ in range(depth)]
        buffers = [int(t) for t in rng.integers(1, 7, depth)]
        exact = expected_latency(costs, acceptances, buffers)
        mc = simulate(costs, acceptances, buffers, rounds=200_000, rng=rng)
        worst = max(worst, abs(mc / exact - 1))
        assert mc == pytest.approx(exact, rel=0.01), (depth, acceptances, buffers)
    assert worst < 0.01


@pytest.mark.parametrize("alpha,gamma", [(0.3, 1), (0.6, 4), (0.8, 5), (0.95, 7), (1.0, 3), (0.0, 2)])
def test_k1_constant_cost_is_leviathan(alpha, gamma):
    """K = 1 with width-independent costs: E[tokens] = (1 - a^(γ+1))/(1 - a) and latency
    (γ c_0 + c_1) / E[tokens] (Leviathan et al. 2023)."""
    c0, c1 = 0.002, 0.03
    tokens = gamma + 1 if alpha == 1 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    want = (gamma * c0 + c1) / tokens
    costs = [[c0] * 3, [c1] * 3]  # constant beyond the table too (flat extrapolation)
    assert expected_latency(costs, [alpha], [gamma]) == pytest.approx(want, rel=1e-12)
    assert surrogate_latency(costs, [alpha], [gamma]) == pytest.approx(want, rel=1e-12)
    round_ = expected_round(costs, [alpha], [gamma])  # the round's two halves, checked apart
    assert round_.tokens == pytest.approx(tokens, rel=1e-12)
    assert round_.seconds == pytest.approx(gamma * c0 + c1, rel=1e-12)


def test_cost_extrapolation_and_target_alone():
    table = [1.0, 2.0, 4.0]
    assert forward_cost(table, 2) == 2.0
    assert forward_cost(table, 5) == 8.0  # slope of the last two points
    assert forward_cost([3.0, 2.0], 4) == 2.0  # a decreasing tail is not extrapolated downwards
    assert expected_latency([table], [], []) == 1.0
    assert expected_round([table], [], []) == RoundPrediction(1.0, 1.0)
    assert simulate([table], [], [], rounds=10) == 1.0


# ------------------------------------------------------------------------------ the solver


def _brute_force(stats_dict: dict, n_max: int) -> tuple[float, float]:
    """(min surrogate, min exact latency) over every chain and buffer vector."""
    stats = load_stats(stats_dict)
    models = [m.name for m in stats.candidates()]
    best_surrogate = best_exact = models and stats.model(stats.target).cost_s[0]
    for size in range(1, len(models)):
        for below in itertools.combinations(models[:-1], size):
            chain = [*below, models[-1]]
            costs, acceptances = stats.chain_inputs(chain, "greedy")
            for buffers in itertools.product(range(1, n_max + 1), repeat=size):
                best_surrogate = min(best_surrogate, surrogate_latency(costs, acceptances, buffers))
                best_exact = min(best_exact, expected_latency(costs, acceptances, buffers))
    return best_surrogate, best_exact


def test_dp_matches_brute_force():
    """The k-best GSP DP finds the surrogate optimum exactly, and after the exact re-ranking its
    best plan is within 2% of the brute-force exact optimum (with the default keep=32)."""
    rng = np.random.default_rng(7)
    n_max = 5
    for size in (2, 3, 4, 4, 5, 5):
        stats_dict = _random_stats(rng, size)
        surrogate, exact = _brute_force(stats_dict, n_max)
        stats = load_stats(stats_dict)
        models = stats.candidates()
        alpha = np.full((size, size), np.nan)
        for d, v in stats.pairs():
            alpha[[m.name for m in models].index(d), [m.name for m in models].index(v)] = stats.alpha(
                d, v, "greedy"
            )
        found = gsp_candidates([m.cost_s for m in models], alpha, n_max=n_max)
        assert found[0].surrogate == pytest.approx(surrogate, rel=1e-12)
        best = solve(stats, n_max=n_max)[0]
        assert best.predicted_latency_s <= exact * 1.02
        assert best.predicted_latency_s >= exact * (1 - 1e-12)


def test_solve_ten_models_under_a_second():
    stats = load_stats(_random_stats(np.random.default_rng(3), 10, kmax=64))
    solve(stats, n_max=32)  # warm-up (imports, caches)
    start = time.process_time()  # this process's CPU time: another test file may share the cores
    plans = solve(stats, n_max=32)
    assert time.process_time() - start < 1.0
    assert plans[0].predicted_latency_s == min(p.predicted_latency_s for p in plans)
    assert any(len(p.chain) == 1 for p in plans)  # the no-drafts baseline is always listed


def test_target_alone_when_drafts_are_poor():
    rng = np.random.default_rng(5)
    names = ["ngram3", "small", "medium", "target"]
    tables = [_cost_table(rng, b) for b in (0.2e-3, 2e-3, 6e-3, 20e-3)]
    plans = solve(load_stats(_stats(names, tables, np.full((4, 4), 0.05))), n_max=16)
    assert plans[0].chain == ("target",) and plans[0].buffers == ()
    assert plans[0].predicted_speedup == pytest.approx(1.0)
    # asked for drafts anyway: the best hierarchies that have them, still ranked by the exact model
    forced = solve(load_stats(_stats(names, tables, np.full((4, 4), 0.05))), n_max=16, min_drafts=2)
    assert forced and all(len(p.chain) >= 3 for p in forced)
    assert [p.predicted_latency_s for p in forced] == sorted(p.predicted_latency_s for p in forced)
    assert forced[0].predicted_latency_s > plans[0].predicted_latency_s
    with pytest.raises(ValueError, match="at least 4 drafts"):
        solve(load_stats(_stats(names, tables, np.full((4, 4), 0.05))), n_max=16, min_drafts=4)
    # and with good drafts it does speculate
    good = solve(load_stats(_stats(names, tables, np.full((4, 4), 0.9))), n_max=16)
    assert len(good[0].chain) > 1 and good[0].predicted_speedup > 1.5


def test_position_profiles_change_the_prediction():
    rng = np.random.default_rng(9)
    names = ["small", "target"]
    data = _stats(names, [_cost_table(rng, 1e-3), _cost_table(rng, 10e-3)], np.full((2, 2), 0.8))
    data["position_acceptance"] = {"greedy": {"small": {"target": [0.95, 0.5]}}}
    stats = load_stats(data)
    with_profile = solve(stats, n_max=8, position_profiles=True)[0]
    iid = solve(stats, n_max=8, position_profiles=False)[0]
    chain = with_profile.chain
    costs, _ = stats.chain_inputs(chain, "greedy")
    assert with_profile.predicted_latency_s == pytest.approx(
        expected_latency(costs, [(0.95, 0.5)] * (len(chain) - 1), with_profile.buffers))
    assert with_profile.predicted_latency_s != pytest.approx(iid.predicted_latency_s)


# ----------------------------------------------------------------------------- validation


def _valid() -> dict:
    rng = np.random.default_rng(0)
    names = ["ngram3", "small", "target"]
    tables = [_cost_table(rng, b) for b in (0.1e-3, 2e-3, 20e-3)]
    return _stats(names, tables, np.full((3, 3), 0.7), sources={"ngram3": "ngram:3"}, params={"ngram3": 0})


def test_valid_stats_load():
    stats = load_stats(_valid())
    assert [m.name for m in stats.candidates()] == ["ngram3", "small", "target"]
    assert stats.default_mode == "greedy"


@pytest.mark.parametrize("break_it,words", [
    (lambda d: d["acceptance"]["greedy"]["small"].pop("target"), ["small", "target"]),
    (lambda d: d["models"][1]["cost_s"].__setitem__(2, 0.0), ["small", "c(3)"]),
    (lambda d: d["models"][2]["cost_s"].__setitem__(0, -1.0), ["target", "c(1)"]),
    (lambda d: d["models"][0]["cost_s"].__setitem__(0, float("nan")), ["ngram3", "c(1)"]),
    (lambda d: d["models"][1].__setitem__("cost_s", []), ["small", "empty cost table"]),
    (lambda d: d["acceptance"]["greedy"]["ngram3"].__setitem__("small", 1.5), ["ngram3", "small", "[0, 1]"]),
    (lambda d: d.__setitem__("target", "huge"), ["unknown target", "huge"]),
    (lambda d: d["models"][1].__setitem__("name", "target"), ["duplicate", "target"]),
    (lambda d: d["models"][0].__setitem__("source", "ngram:x"), ["ngram3", "ngram:N"]),
    (lambda d: d.__setitem__("version", 2), ["version"]),
])
def test_malformed_stats_name_the_problem(break_it, words):
    data = _valid()
    break_it(data)
    with pytest.raises(ValueError) as err:
        load_stats(data)
    for word in words:
        assert word in str(err.value)


def test_stats_from_file_and_missing_mode(tmp_path):
    path = tmp_path / "stats.json"
    path.write_text(json.dumps(_valid()))
    stats = load_stats(path)
    with pytest.raises(ValueError, match="no 'sampled' acceptance"):
        solve(stats, mode="sampled")
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_stats(path)


# ---------------------------------------------------------------------------- plans, CLI


def test_plan_json_round_trip(tmp_path):
    plans = solve(load_stats(_valid()), n_max=8)
    best = plans[0]
    again = Plan.from_json(json.dumps(best.to_json()))
    assert again == best
    data = best.to_json()
    assert data["chain"][-1] == {"name": "target", "source": "models/target"}
    assert data["predicted_speedup"] == pytest.approx(data["ar_latency_s"] / data["predicted_latency_s"])
    assert [r["chain"] for r in data["runner_up"]] == [list(p.chain) for p in plans[1:]]
    assert plan_label(["ngram3", "draft-s", "target"], [4, 8]) == "ngram3[4] > draft-s[8] > target"
    assert plan_label(["target"], []) == "target"


def test_run_plan_end_to_end(tmp_path, capsys):
    stats_path, out, png, measured = (tmp_path / n for n in ("stats.json", "plan.json", "plan.png", "m.json"))
    stats_path.write_text(json.dumps(_valid()))
    parser = argparse.ArgumentParser()
    add_plan_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", "--stats", str(stats_path), "--out", str(out), "--n-max", "8"])
    assert run_plan(args) == 0
    best = load_plan(out)
    measured.write_text(json.dumps({best.label: best.predicted_latency_s * 1.1, "target": 0.02}))
    args = parser.parse_args(["plan", "--stats", str(stats_path), "--out", str(out), "--n-max", "8",
                              "--plot", str(png), "--measure", str(measured), "--temperature-mode", "greedy"])
    assert run_plan(args) == 0
    printed = capsys.readouterr().out
    assert f"chosen: {best.label}" in printed and "measured" in printed and "target" in printed
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_plan(out) == best
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_hierarchy_from_plan(tmp_path):
    """Sources resolve against base_dir (absolute ones as given), "ngram:N" becomes an
    NGramDrafter with the target's vocabulary, "int8:DIR" an int8 copy, and the buffers and
    verifier carry over."""
    import jax
    from families import tiny_config

    from hsd_jax.decoding.ngram import NGramDrafter
    from hsd_jax.io.checkpoint import save_model
    from hsd_jax.models import Model, init_params

    for name, layers in (("base/models/small", 1), ("abs/target", 2)):
        config = tiny_config(vocab=32, layers=layers)
        save_model(tmp_path / name, Model(init_params(config, jax.random.PRNGKey(layers)), config))
    plan = Plan(
        chain=("ngram3", "small", "target-int8", "target"),
        sources=("ngram:3", "models/small", f"int8:{tmp_path / 'abs/target'}", str(tmp_path / "abs/target")),
        buffers=(2, 3, 4),
        predicted_latency_s=0.01,
        ar_latency_s=0.02,
    )
    hierarchy = hierarchy_from_plan(plan, base_dir=tmp_path / "base", dtype="float32")
    assert hierarchy.buffers == (2, 3, 4) and hierarchy.verifiers == ("tokenwise",) * 3
    assert isinstance(hierarchy.models[0], NGramDrafter) and hierarchy.models[0].n == 3
    assert hierarchy.models[0].vocab_size == 32 and hierarchy.models[1].config.num_layers == 1
    assert hasattr(hierarchy.models[2].params["lm_head"], "in_dims")  # int8
    from hsd_jax import Hierarchy

    save_plan(plan, tmp_path / "plan.json")
    with pytest.raises(ValueError, match="outside its directory"):  # a plan file's absolute source
        Hierarchy.from_plan(tmp_path / "plan.json", base_dir=tmp_path / "base", dtype="float32")
    again = Hierarchy.from_plan(tmp_path / "plan.json", base_dir=tmp_path / "base", dtype="float32",
                                allow_outside_plan_dir=True)
    assert again.buffers == hierarchy.buffers and [type(m) for m in again.models] == [
        type(m) for m in hierarchy.models
    ]


def test_plan_sources_resolve_against_the_plan_file(tmp_path, monkeypatch):
    """A plan file's relative sources resolve against its own directory from any working
    directory (a path, a Plan from `load_plan`, `Hierarchy.from_plan`); a plan dict resolves
    against `base_dir` (default: the working directory); a non-string source is refused; and the
    `plan` command writes sources relative to the plan file it writes."""
    import jax
    from families import tiny_config

    from hsd_jax import Hierarchy
    from hsd_jax.io.checkpoint import save_model
    from hsd_jax.models import Model, init_params

    plans = tmp_path / "plans"
    config = tiny_config(vocab=32, layers=1)
    save_model(plans / "tiny", Model(init_params(config, jax.random.PRNGKey(0)), config))
    plan = Plan(chain=("ngram3", "tiny"), sources=("ngram:3", "tiny"), buffers=(2,), predicted_latency_s=0.01,
                ar_latency_s=0.02)
    save_plan(plan, plans / "plan.json")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = plans / "plan.json"
    for hierarchy in (
        hierarchy_from_plan(path),
        hierarchy_from_plan(str(path)),
        hierarchy_from_plan(load_plan(path)),
        Hierarchy.from_plan(path, dtype="float32"),
    ):
        assert hierarchy.buffers == (2,) and hierarchy.models[1].config.num_layers == 1
    assert load_plan(path).directory() == plans / "tiny"
    with pytest.raises(ValueError, match="tiny"):  # a dict resolves against the working directory
        hierarchy_from_plan(plan.to_json())
    assert hierarchy_from_plan(plan.to_json(), base_dir=plans).buffers == (2,)
    bad = plan.to_json()
    bad["chain"][1]["source"] = ["tiny"]
    with pytest.raises(ValueError, match="source must be a string"):
        hierarchy_from_plan(bad)
    bad["chain"] = "tiny"
    with pytest.raises(ValueError, match="chain"):
        Plan.from_json(bad)

    # `hsd-jax plan`: the stats' sources are relative to the working directory; plan.json's to itself
    stats_path, out = tmp_path / "stats.json", tmp_path / "out" / "plan.json"
    stats_path.write_text(json.dumps(_valid()))
    out.parent.mkdir()
    parser = argparse.ArgumentParser()
    add_plan_parser(parser.add_subparsers(dest="command"))
    assert (
        run_plan(parser.parse_args(["plan", "--stats", str(stats_path), "--out", str(out), "--n-max", "4"]))
        == 0
    )
    written = load_plan(out)
    assert written.sources[-1] == "../elsewhere/models/target"
    assert written.directory().resolve() == (elsewhere / "models/target").resolve()
