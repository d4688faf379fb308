"""Stored histories of real runs must replay on the current workflow code.

A change to a workflow that would break runs already in flight (non-determinism) fails
here: guard it with `workflow.patched()` (ARCHITECTURE.md, "Versioning"). Never re-record a
history to make this pass - the directory is append-only (test_histories_append_only). A new
behaviour gets a new history: run its e2e test with ZERODOWN_RECORD_HISTORIES=1
(tests/e2e_support.keep_history), or `temporal workflow show --workflow-id ID --output json >
tests/histories/ID.json` (the file's name is the workflow id the replay uses).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.converter import DataConverter
from temporalio.worker import Replayer

from workflows.procedure import ProcedureOptions
from workflows.registry import ALL_WORKFLOWS, INPUTS

HISTORIES = sorted((Path(__file__).parent / "histories").glob("*.json"))


def test_there_are_histories_to_replay() -> None:
    assert HISTORIES, "tests/histories/ holds no history"


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
async def test_history_replays_on_current_code(path: Path) -> None:
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    assert len(history.events) > 50
    result = await Replayer(workflows=ALL_WORKFLOWS).replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None, f"{path.name} no longer replays: {result.replay_failure}"


@pytest.mark.parametrize("path", HISTORIES, ids=[p.stem for p in HISTORIES])
def test_the_stored_input_decodes_into_todays_input_type(path: Path) -> None:
    # Inputs and results change only compatibly: what a run started with still decodes (the
    # option fields now come from ProcedureOptions, top-level as they were).
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    started = history.events[0].workflow_execution_started_event_attributes
    procedure = started.workflow_type.name
    (value,) = DataConverter.default.payload_converter.from_payloads(
        list(started.input.payloads), [INPUTS[procedure]]
    )
    assert isinstance(value, INPUTS[procedure])
    assert isinstance(value, ProcedureOptions) and value.on_failure in ("ask", "rollback")
    assert dataclasses.asdict(value)["inventory"]["nodes"]
