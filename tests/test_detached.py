"""activities/detached.py: a command that outlives the attempt that started it, run by a real
`sh` in a temporary login folder (what the SSH server runs on a node)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from activities import detached

Parsed = tuple[str, str, bool, int | None, bool, str, str]


def _start(
    tmp: Path,
    key: str,
    command: str,
    *,
    secret: str = "s3cret",
    rerun_lost: bool = True,
    stdin_text: str = "",
    budget_s: float = 30.0,
    family: str = "fam",
    then: str = "",
) -> subprocess.Popen[str]:
    """The job script as the SSH server runs it: `sh -c`, the secret on stdin."""
    script = detached.job_script(
        key, family, command, rerun_lost=rerun_lost, stdin_text=stdin_text, budget_s=budget_s, then=then
    )
    assert secret not in script
    p = subprocess.Popen(
        ["sh", "-c", script], cwd=tmp, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert p.stdin is not None
    p.stdin.write(secret + "\n")
    p.stdin.flush()
    return p


def _output(tmp: Path, key: str, command: str, **kw: object) -> str:
    p = _start(tmp, key, command, **kw)  # type: ignore[arg-type]
    out, _ = p.communicate(timeout=30)
    return out


def _run(tmp: Path, key: str, command: str, **kw: object) -> Parsed:
    return detached.parse_job_output(_output(tmp, key, command, **kw))


def test_a_job_runs_once_and_a_retry_reads_its_outcome(tmp_path: Path) -> None:
    key = detached.job_key("fam", "wf", "run", "1")
    cmd = 'echo "ran with $ZD_SECRET" >> count; read x; echo "out $x"; echo err >&2; exit 3'
    state, found, followed, rc, over, out, err = _run(tmp_path, key, cmd, stdin_text="answer\n")
    assert (state, found, followed, rc, over) == ("started", key, False, 3, False)
    assert out == "out answer\n" and err == "err\n"
    # The retry (same key) starts nothing: it reads the first run's outcome.
    state, _, _, rc, _, out, _ = _run(tmp_path, key, cmd)
    assert (state, rc, out) == ("done", 3, "out answer\n")
    assert (tmp_path / "count").read_text() == "ran with s3cret\n"
    # The secret is in no file of the job folder.
    for f in (tmp_path / detached.JOBS_DIR / key).iterdir():
        assert "s3cret" not in f.read_text()


def test_a_retry_while_the_first_still_runs_waits_for_it(tmp_path: Path) -> None:
    first_key = detached.job_key("fam", "attempt", "1")
    cmd = "sleep 1; echo x >> count; echo finished"
    first = _start(tmp_path, first_key, cmd)
    time.sleep(0.3)
    first.kill()  # the first attempt's SSH channel is gone; its job is not
    # Another key of the same family (an operator's retry) follows the running job.
    state, found, followed, rc, _, out, _ = _run(tmp_path, detached.job_key("fam", "attempt", "2"), cmd)
    assert (state, found, followed, rc, out) == ("running", first_key, True, 0, "finished\n")
    assert (tmp_path / "count").read_text() == "x\n"


def test_a_lost_job_is_reported_or_run_again(tmp_path: Path) -> None:
    key = detached.job_key("fam", "lost")
    d = tmp_path / detached.JOBS_DIR / key
    d.mkdir(parents=True)
    (d / "pid").write_text("999999\n")  # started once, gone without an exit status
    state, _, _, rc, _, _, _ = _run(tmp_path, key, "echo again", rerun_lost=False)
    assert (state, rc) == ("lost", None)
    state, _, _, rc, _, out, _ = _run(tmp_path, key, "echo again", rerun_lost=True)
    assert (state, rc, out) == ("started", 0, "again\n")


def test_a_followed_job_over_its_budget_is_left_running(tmp_path: Path) -> None:
    key = detached.job_key("fam", "slow")
    first = _start(tmp_path, key, "sleep 3; echo done")
    time.sleep(0.3)
    first.kill()
    state, _, _, rc, over, _, _ = _run(tmp_path, key, "sleep 3", budget_s=1)
    assert (state, rc, over) == ("running", None, True)


# The follow-up reads the secret as the job does; it records what it saw, and a marker.
THEN = (
    'echo "then with $ZD_SECRET" >> then-count; echo enabled; '
    "[ ! -e fail-then ] || { echo no >&2; exit 107; }"
)


def test_a_follow_up_runs_on_the_node_once_after_a_quiet_success(tmp_path: Path) -> None:
    key = detached.job_key("fam", "then")
    text = _output(tmp_path, key, "echo ran >> count", then=THEN)
    state, _, _, rc, _, out, _ = detached.parse_job_output(text)
    then = detached.parse_follow_up(text)
    assert (state, rc, out) == ("started", 0, "")
    assert then is not None and then.exit_status == 0 and then.output == "enabled\n"
    assert 0 <= then.ended - then.started < 30 and abs(then.ended - time.time()) < 30
    # A retry reads both outcomes and runs neither again.
    text = _output(tmp_path, key, "echo ran >> count", then=THEN)
    again = detached.parse_follow_up(text)
    assert detached.parse_job_output(text)[0] == "done" and again == then
    assert (tmp_path / "count").read_text() == "ran\n"
    assert (tmp_path / "then-count").read_text() == "then with s3cret\n"
    # Its output, like the job's, is kept in the job folder without the secret.
    for f in (tmp_path / detached.JOBS_DIR / key).iterdir():
        assert "s3cret" not in f.read_text()


@pytest.mark.parametrize("command", ["exit 3", "echo 'The following update task(s) failed:'"])
def test_no_follow_up_after_a_failure_or_any_output(tmp_path: Path, command: str) -> None:
    text = _output(tmp_path, detached.job_key("fam", command), command, then=THEN)
    assert detached.parse_job_output(text)[3] is not None
    assert detached.parse_follow_up(text) is None and not (tmp_path / "then-count").exists()


def test_a_failed_follow_up_is_reported_with_its_output(tmp_path: Path) -> None:
    (tmp_path / "fail-then").touch()
    text = _output(tmp_path, detached.job_key("fam", "then-fails"), "true", then=THEN)
    then = detached.parse_follow_up(text)
    assert detached.parse_job_output(text)[3] == 0
    assert then is not None and then.exit_status == 107 and then.output == "enabled\nno\n"


def test_a_retry_waits_for_the_follow_up_too(tmp_path: Path) -> None:
    # The job counts as done only once its follow-up ended: a retry arriving in between waits.
    key = detached.job_key("fam", "slow-then")
    first = _start(tmp_path, key, "true", then="sleep 1; echo late")
    time.sleep(0.3)
    first.kill()
    text = _output(tmp_path, key, "true", then="sleep 1; echo late")
    then = detached.parse_follow_up(text)
    assert detached.parse_job_output(text)[0] == "running"
    assert then is not None and then.output == "late\n"


def test_no_follow_up_past_the_budget(tmp_path: Path) -> None:
    # Past its budget the caller has failed the step and someone decides what next: a job that
    # ends later must not act behind their back.
    text = _output(tmp_path, detached.job_key("fam", "late"), "sleep 1.2", then=THEN, budget_s=1)
    assert detached.parse_job_output(text)[3] == 0
    assert detached.parse_follow_up(text) is None and not (tmp_path / "then-count").exists()
