"""Warm pools of function workers: the pool policy, load forecasting, traces, simulation.

Everything here is pure Python (no torch, no processes, no clock): the process manager
observes its workers and carries out what :func:`decide` returns.
"""

from ember_warmpool.forecast import Forecaster, HoltForecaster, SeasonalForecaster
from ember_warmpool.policy import (
    Decision,
    PoolPolicy,
    StartOrder,
    StopOrder,
    can_start,
    can_stop,
    decide,
    start_hold,
)
from ember_warmpool.view import PoolView, Warmth, WorkerView

__all__ = [
    "Decision",
    "Forecaster",
    "HoltForecaster",
    "PoolPolicy",
    "PoolView",
    "SeasonalForecaster",
    "StartOrder",
    "StopOrder",
    "Warmth",
    "WorkerView",
    "can_start",
    "can_stop",
    "decide",
    "start_hold",
]
