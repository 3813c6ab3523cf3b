"""A pool's forecast kept across restarts: one JSON file per model under the Ember home.

A predictive pool that forgot the day's shape on every restart would spend its first
day after each deploy as a scale-to-zero pool. The pool manager saves its forecaster
now and then and when it closes, and takes the saved state up when it starts. The file
is written whole and renamed into place, so a crash mid-write leaves the previous one.
A file that cannot be used (another forecaster's parameters, corrupt JSON) is set aside
as ``*.rejected`` with a warning saying why, and learning starts afresh: a forecast is
worth keeping, never worth refusing to serve over.

Example::

    path = forecast_path(home, "smollm2-135m")
    note = load_forecast(forecaster, path, now_s=time.time())   # "resumed ..." or None
    save_forecast(forecaster, path)
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from ember_warmpool.forecast import Forecaster

__all__ = ["forecast_path", "load_forecast", "save_forecast"]

log = logging.getLogger(__name__)

_VERSION = 1


def forecast_path(home: Path, model: str) -> Path:
    """Where the pool of ``model`` keeps its forecast: a name derived from the model's."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model).strip("-.") or "model"
    return home / "pools" / f"{slug}.forecast.json"


def save_forecast(forecaster: Forecaster, path: Path) -> None:
    """Writes the forecaster's state to ``path`` atomically (temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"version": _VERSION, "state": forecaster.state()}))
    os.replace(tmp, path)


def load_forecast(forecaster: Forecaster, path: Path, *, now_s: float) -> str | None:
    """Restores ``forecaster`` from ``path`` if there is a usable file there.

    Returns what happened, for the log, or None when there was no file. A file that
    cannot be used is renamed to ``<name>.rejected`` so that the next save does not
    silently overwrite what an operator may want to look at.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:  # unreadable: say so, and serve without it
        message = f"forecast in {path} not read ({exc}); learning afresh"
        log.warning("%s", message)
        return message
    try:
        saved = json.loads(text)
        if not isinstance(saved, dict) or saved.get("version") != _VERSION:
            raise ValueError(f"not a version {_VERSION} forecast file")
        forecaster.restore(saved["state"], now_s)
    except (ValueError, KeyError, TypeError) as exc:
        rejected = path.with_name(path.name + ".rejected")
        try:
            os.replace(path, rejected)
            kept = f"moved to {rejected.name}"
        except OSError as move_error:
            kept = f"left in place ({move_error})"
        message = f"forecast in {path} not used ({exc}); {kept}, learning afresh"
        log.warning("%s", message)
        return message
    return f"forecast resumed from {path}"
