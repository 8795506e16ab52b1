"""Evidence for the conditional-parameter decision in sweep/space.py: Ax 1.3's hierarchical
search space works for Sobol *and* BoTorch while other trials are still running."""

from __future__ import annotations

from pathlib import Path

from sweep.space import load_space

NOTEBOOK = Path(__file__).resolve().parents[1] / "search_spaces" / "stage19_stage2.yaml"
CHILDREN = {"initial_k", "saliency_schedule", "ema_decay"}


def loss(p: dict) -> float:
    return (
        (p["stage1_9_lr"] - 0.003) ** 2 * 1e5
        + (p["stage2_lr"] - 0.0025) ** 2 * 1e5
        + (0.1 if p["saliency"] else 0)
    )


def test_hierarchical_space_generates_with_sobol_and_botorch_under_pending_trials() -> None:
    from ax import Client

    space = load_space(NOTEBOOK)
    client = Client(random_seed=0)
    client.configure_experiment(parameters=space.ax_parameter_configs(), name="h")
    client.configure_optimization(objective=space.objective.ax_objective.replace("final_eval_loss", "loss"))
    client.configure_generation_strategy(initialization_budget=3, initialize_with_center=False)
    pending: list[tuple[int, dict]] = []
    seen: list[tuple[str, dict]] = []
    for _ in range(6):
        ((index, params),) = client.get_next_trials(max_trials=1).items()
        seen.append((client._experiment.trials[index].generator_runs[0]._generation_node_name, params))
        pending.append((index, params))
        if len(pending) > 2:  # two trials stay RUNNING whenever the next one is generated
            done, p = pending.pop(0)
            client.complete_trial(done, {"loss": (loss(p), 0.01)})
    assert [node for node, _ in seen] == ["Sobol"] * 3 + ["MBM"] * 3
    assert {params["saliency"] for _, params in seen} == {True, False}  # both branches exercised
    for _, params in seen:
        # A child exists exactly when its parent enables it; nothing inactive is ever proposed.
        assert (CHILDREN <= params.keys()) is params["saliency"]
        assert params.keys() - CHILDREN == {"stage1_9_lr", "stage2_lr", "saliency"}
        assert space.active_parameters(params) == params
