"""The simulator: a virtual clock and a simulated network driving the real protocol/.

`run_scenario(path, out_dir, seed=None) -> dict` is the whole public surface most
callers need (the daemon's `celld simulate` calls it); `simulate(scenario)` returns the
report without writing anything.
"""

from simulations.model.report import run_scenario, simulate
from simulations.model.scenario import Scenario, ScenarioError, load

__all__ = ["Scenario", "ScenarioError", "load", "run_scenario", "simulate"]
