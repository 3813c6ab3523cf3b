"""A pool's forecast kept across restarts: the file, and ModelPool saving and resuming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ember_warmpool import HoltForecaster, PoolPolicy, SeasonalForecaster
from ember_warmpool.forecast_file import forecast_path, load_forecast, save_forecast
from ember_warmpool.manager import ModelPool

EPOCH_S = 1_764_000_000.0


def trained(bucket_s: float = 5.0) -> SeasonalForecaster:
    f = SeasonalForecaster(season_s=120.0, profile_buckets=6, bucket_s=bucket_s)
    for t in range(1, 400):
        f.observe(EPOCH_S + t, 3 if (t % 120) < 60 else 0)
    return f


def test_a_saved_forecast_loads_back_into_the_same_forecaster(tmp_path: Path) -> None:
    path = forecast_path(tmp_path, "smollm2-135m")
    assert path == tmp_path / "pools" / "smollm2-135m.forecast.json"
    assert load_forecast(trained(), path, now_s=EPOCH_S) is None  # nothing saved yet
    f = trained()
    save_forecast(f, path)
    g = SeasonalForecaster(season_s=120.0, profile_buckets=6, bucket_s=5.0)
    assert load_forecast(g, path, now_s=EPOCH_S + 399.0) == f"forecast resumed from {path}"
    assert g.state() == f.state()
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left


def test_model_paths_make_one_file_name_each(tmp_path: Path) -> None:
    assert forecast_path(tmp_path, "/models/My Model/").name == "models-My-Model.forecast.json"
    assert forecast_path(tmp_path, "..").name == "model.forecast.json"


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("{not json", "Expecting property name"),
        (json.dumps({"version": 99, "state": {}}), "not a version 1 forecast file"),
        (None, "this pool uses a SeasonalForecaster"),  # learned with another bucket
    ],
)
def test_an_unusable_forecast_is_set_aside_and_learning_starts_afresh(
    tmp_path: Path, content: str | None, why: str
) -> None:
    path = forecast_path(tmp_path, "m")
    if content is None:
        save_forecast(trained(bucket_s=10.0), path)
    else:
        path.parent.mkdir(parents=True)
        path.write_text(content)
    f = SeasonalForecaster(season_s=120.0, profile_buckets=6, bucket_s=5.0)
    note = load_forecast(f, path, now_s=EPOCH_S)
    assert note is not None and why in note and "learning afresh" in note
    assert not path.exists() and path.with_name(path.name + ".rejected").exists()
    assert not f.learned and f.rate(EPOCH_S, 0.0) == 0.0


def test_a_pool_saves_its_forecast_on_close_and_the_next_one_resumes_it(tmp_path: Path) -> None:
    # No worker is started: min_warm=0 and no forecast use (predictive off) keep the
    # policy from starting any, so ticks only feed the forecaster.
    clock = {"s": 100.0}
    path = forecast_path(tmp_path, "m")

    def pool() -> ModelPool:
        return ModelPool(
            "m",
            home=tmp_path,
            policy=PoolPolicy(min_warm=0, buffer=0),
            forecaster=HoltForecaster(bucket_s=5.0),
            forecast_file=path,
            clock=lambda: clock["s"],
            wall_clock=lambda: EPOCH_S + clock["s"] - 100.0,
        )

    first = pool()
    for _ in range(60):
        clock["s"] += 1.0
        first.admit()
        first.admit()
        first.tick()
    first.close()
    saved = json.loads(path.read_text())["state"]
    assert saved["level"] == pytest.approx(2.0, abs=0.05)  # two arrivals a second
    assert saved["bucket_start_s"] == EPOCH_S + 60.0  # wall-clock time, not pool time

    clock["s"] += 3.0  # restarted three seconds later
    second = pool()
    assert second._forecast is not None
    assert second._forecast.forecaster.rate(EPOCH_S + 63.0, 0.0) == pytest.approx(2.0, abs=0.05)
    second.close()


def test_a_state_that_fails_half_way_leaves_the_forecaster_untouched(tmp_path: Path) -> None:
    path = forecast_path(tmp_path, "m")
    save_forecast(trained(), path)
    saved = json.loads(path.read_text())
    saved["state"]["baseline"] = "two"  # read after the level, trend and profile
    path.write_text(json.dumps(saved))
    f = SeasonalForecaster(season_s=120.0, profile_buckets=6, bucket_s=5.0)
    before = f.state()
    note = load_forecast(f, path, now_s=EPOCH_S + 400.0)
    assert note is not None and "learning afresh" in note
    assert f.state() == before


def test_an_unreadable_forecast_is_reported_not_raised(tmp_path: Path) -> None:
    path = forecast_path(tmp_path, "m")
    path.mkdir(parents=True)  # a directory where the file should be: read_text fails
    note = load_forecast(trained(), path, now_s=EPOCH_S)
    assert note is not None and "not read" in note
