"""QUARTCHAT_GC_THRESHOLD: parsed or refused by name, and applied by a server process."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from quartchat.config import Settings
from quartchat.errors import ConfigError
from quartchat.server import tune_gc


@pytest.fixture
def restore_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


def test_the_default_is_larger_than_pythons() -> None:
    """10000,10,10 makes 10,000 connects 25 % faster. Before quartchat.tcpfree a closed
    socket left a cycle, and 3,000 connect/close cycles left 6 MB more behind with them
    (tests/test_churn.py's bound is 15 MB); now the same 3,000 leave the same as Python's."""
    assert Settings.from_env({}, env_file=None).gc_threshold == (10_000, 10, 10)


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        ("default", None),
        (" Default ", None),
        ("50000,20,10", (50_000, 20, 10)),
        ("1, 2, 3", (1, 2, 3)),
    ],
)
def test_values(raw: str, value: tuple[int, int, int] | None) -> None:
    assert Settings.from_env({"QUARTCHAT_GC_THRESHOLD": raw}, env_file=None).gc_threshold == value


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("700,10", "three comma-separated integers"),
        ("0,10,10", "G0 must be 1..10000000"),
        ("700,x,10", "G1 must be an integer"),
        ("off", "three comma-separated integers"),
    ],
)
def test_bad_values_are_refused_by_name(raw: str, says: str) -> None:
    with pytest.raises(ConfigError, match="QUARTCHAT_GC_THRESHOLD") as info:
        Settings.from_env({"QUARTCHAT_GC_THRESHOLD": raw}, env_file=None)
    assert says in str(info.value)


@pytest.mark.usefixtures("restore_gc")
def test_a_server_process_freezes_its_start_up_objects_and_sets_the_thresholds() -> None:
    start_up = [object() for _ in range(10)], {"kept": True}  # tracked, alive
    assert gc.get_freeze_count() == 0
    tune_gc((12_345, 6, 7))
    assert gc.get_threshold() == (12_345, 6, 7)
    assert gc.get_freeze_count() > 0
    assert not gc.is_finalized(start_up)
    # Garbage made after start-up is still collected.
    cycle: list[object] = []
    cycle.append(cycle)
    del cycle
    assert gc.collect() >= 1


@pytest.mark.usefixtures("restore_gc")
def test_default_keeps_pythons_thresholds() -> None:
    before = gc.get_threshold()
    tune_gc(None)
    assert gc.get_threshold() == before
