"""A command on a node that outlives the activity attempt that started it.

Why: a long tool run (OX's runupdate on a big schema, the whole upgradeschemata tool) must
never be started twice while an earlier start may still be running - a worker lost
mid-run, or an attempt timed out, leaves the command running on the node. So the command
runs detached (its own session, output to files) in a job folder on the node named by a
key the workflow makes (same key on every retry of the same step), and any later attempt
with that key attaches to it instead of starting it again:

  * the key's job has an exit status      -> its outcome is read, nothing is started;
  * the key's job is running              -> waited for (the activity heartbeats), then read;
  * another job of the same `family` runs (e.g. runupdate of the same schema, started by an
    earlier step attempt with another key)  -> that one is followed instead;
  * the key's job was started but is gone without an exit status (the node rebooted) ->
    `lost`: the caller decides (run it again, or report);
  * nothing yet                           -> started, and waited for in the same command
    (one SSH round trip for the common case).

A job may have a follow-up (`then`): a command the node runs right after the job's command
when that exited 0 and printed nothing on stdout (OX's runupdate when every update task ran)
within its budget (past it the step has failed, and nothing may happen behind the back of
whoever decides what next), before the job counts as done - so a schema is enabled the
moment its update ended, without a trip through the worker, and a worker lost in between
changes nothing (a retry reads the follow-up's outcome with the job's).

The secret (if any) is read from standard input into ZD_SECRET, which the command refers to
as "$ZD_SECRET" - never written to the job folder, the command text or the history. The
job folders stay (a retry must find its outcome); folders older than a week are pruned.
"""

from __future__ import annotations

import contextlib
import hashlib
import shlex
from collections.abc import AsyncIterator
from dataclasses import dataclass

import activities.ssh as ssh
from activities.common import fail
from errors import DETACHED_OUTPUT_UNEXPECTED, DETACHED_TIMEOUT
from inventory.model import SshTarget

JOBS_DIR = ".zerodown/jobs"
MARK = "@@zerodown-job"
# Over its budget: the job is left running (killing a tool half-way is worse); the step fails.
# A poll of a job this command did not start (how soon its end is noticed).
POLL_S = 0.05


@dataclass(frozen=True)
class JobOutcome:
    key: str  # the job folder's name (another key when a running job of the family was followed)
    state: str  # started | running | done | lost
    exit_status: int | None  # None: lost (no exit status)
    stdout: str
    stderr: str
    followed: bool = False
    then: FollowUp | None = None  # the follow-up's outcome; None: it did not run (or none given)


@dataclass(frozen=True)
class FollowUp:
    """How a job's follow-up (`then`) ended, timed by the node's clock."""

    exit_status: int
    output: str  # stdout and stderr, as they came
    started: float  # seconds since the epoch, node clock
    ended: float


def job_key(family: str, *parts: str) -> str:
    """A folder path under JOBS_DIR: the family's folder (readable, e.g.
    "runupdate-oxdatabase_5": every run of one operation, looked through for a live one) and
    a hash of the parts that make the step unique (workflow, run, the operator's retry)."""
    digest = hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]
    return f"{_safe(family)}/{digest}"


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "_-" else "-" for c in text)[:80] or "job"


def job_script(
    key: str,
    family: str,
    command: str,
    *,
    rerun_lost: bool,
    stdin_text: str = "",
    budget_s: float = 3600.0,
    gated: bool = False,
    then: str = "",
) -> str:
    """The shell command (POSIX sh) that starts or attaches to the job `key`. `command` is a
    shell command line; it may use
    "$ZD_SECRET". `stdin_text` (not secret) is the command's standard input. `gated`: after
    the secret it waits for a line "go" on stdin and does nothing without it (`staged_job`).
    `then`: a command line run after `command` when that exited 0 with nothing on stdout
    within `budget_s`, its output and exit status kept beside the job's (no stdin;
    "$ZD_SECRET" usable).

    Lean on purpose: it runs inside a schema's disabled window (runupdate), so builtins where
    they do (read, test, printf) and only mkdir, setsid and two cats forked on the common path."""
    d = f"{JOBS_DIR}/{key}"
    fam = f"{JOBS_DIR}/{_safe(family)}/"
    budget = max(1, int(budget_s))
    # A subshell: whatever the command does (exit, exec), the exit status is written after it.
    inner = f'd=$1; ( {command.strip()} ) >"$d/out" 2>"$d/err" <"$d/in"; r=$?'
    if then.strip():
        # Only within the budget: past it the caller has given up on the job (the step failed
        # and someone decides), so nothing may follow behind their back. The clock is
        # /proc/uptime (seconds with two decimals), read by a builtin (no fork in the window).
        # A subshell, so whatever the follow-up does rc is written; then.rc before rc: a job
        # is done once its follow-up is.
        inner = (
            "read t0 _ </proc/uptime 2>/dev/null || t0=0.00; "
            + inner
            + "; read t1 _ </proc/uptime 2>/dev/null || t1=0.00"
            + '; if [ $r = 0 ] && [ ! -s "$d/out" ] && '
            + f"[ $(( ${{t1%.*}}${{t1#*.}} - ${{t0%.*}}${{t0#*.}} )) -lt {budget * 100} ]; "
            + f'then ( {then.strip()} ) >"$d/then.out" 2>&1 </dev/null; echo $? >"$d/then.rc"; fi'
        )
    inner += '; echo $r >"$d/rc"'
    return "\n".join(
        [
            "umask 077",
            f"d={shlex.quote(d)}",
            "IFS= read -r ZD_SECRET || ZD_SECRET=",
            "export ZD_SECRET",
            *(["IFS= read -r go || go=", '[ "$go" = go ] || exit 0'] if gated else []),
            "followed=",
            # A live job of the same family started under another key: follow it, start nothing.
            'if [ ! -s "$d/rc" ]; then',
            f"  for p in {shlex.quote(fam)}*/pid; do",
            '    [ -e "$p" ] || continue',
            '    o="${p%/pid}"',
            '    [ "$o" = "$d" ] && continue',
            '    [ -s "$o/rc" ] && continue',
            '    read q < "$p" && kill -0 "$q" 2>/dev/null && { d="$o"; followed=1; break; }',
            "  done",
            "fi",
            'if [ -s "$d/rc" ]; then state=done',
            'elif [ -s "$d/pid" ] && read q < "$d/pid" && kill -0 "$q" 2>/dev/null; then state=running',
            f'elif [ -e "$d/pid" ] && [ {"0" if rerun_lost else "1"} = 1 ]; then state=lost',
            "else",
            "  state=started",
            '  if [ -d "$d" ]; then rm -f "$d/pid" "$d/out" "$d/err" "$d/then.out" "$d/then.rc"; '
            'else mkdir -p "$d" || exit 97; fi',
            f'  printf %s {shlex.quote(stdin_text)} > "$d/in"',
            # Own session: the job survives this SSH channel (a lost worker closes it).
            f'  setsid sh -c {shlex.quote(inner)} zd "$d" </dev/null >/dev/null 2>&1 &',
            '  echo $! > "$d/pid"',
            "  wait $! 2>/dev/null",
            "fi",
            f'echo "{MARK} state $state ${{d#{JOBS_DIR}/}} $followed"',
            'if [ "$state" = running ]; then',
            '  started=$(stat -c %Y "$d/pid" 2>/dev/null || date +%s)',
            '  while [ ! -s "$d/rc" ] && read q < "$d/pid" && kill -0 "$q" 2>/dev/null; do',
            f"    if [ $(( $(date +%s) - started )) -ge {budget} ]; then "
            f'echo "{MARK} over-budget"; break; fi',
            f"    sleep {POLL_S}",
            "  done",
            "fi",
            f'if [ -s "$d/rc" ] && read rc < "$d/rc"; then echo "{MARK} rc $rc"; '
            f'else echo "{MARK} rc none"; fi',
            # Read with builtins (no cat forked): a tool's output is a few lines.
            'show() { [ -s "$1" ] || return 0; while IFS= read -r l || [ -n "$l" ]; do '
            'printf \'%s\\n\' "$l"; done < "$1"; }',
            # The follow-up's status and times (its output file made when it started, rc when it
            # ended): past the window, so stat may fork.
            'if [ -s "$d/then.rc" ] && read tr < "$d/then.rc"; then',
            f'  echo "{MARK} then-rc $tr '
            '$(stat -c %.3Y "$d/then.out" "$d/then.rc" 2>/dev/null | tr "\\n" " ")"',
            f'  echo "{MARK} then"; show "$d/then.out"',
            "fi",
            f'echo "{MARK} out"; show "$d/out"; printf "\\n{MARK} err\\n"; show "$d/err"',
            # Jobs older than a week pruned now and then (one call in 64), in the background.
            f"[ $(($$ % 64)) = 0 ] && (find {JOBS_DIR} -mindepth 2 -maxdepth 2 -type d -mtime +7 "
            "-exec rm -rf {} + </dev/null >/dev/null 2>&1 &)",
            "exit 0",
        ]
    )


def parse_job_output(text: str) -> tuple[str, str, bool, int | None, bool, str, str]:
    """(state, key, followed, exit status or None, over budget, stdout, stderr) of a job_script run."""
    head, sep, rest = text.partition(f"{MARK} out\n")
    if not sep:
        fail(DETACHED_OUTPUT_UNEXPECTED, f"job output without its markers: {text[-300:]!r}")
    state, key, followed, rc, over = "", "", False, None, False
    for line in head.splitlines():
        if not line.startswith(MARK):
            continue
        fields = line.split()
        if fields[1] == "state":
            state, key, followed = fields[2], fields[3], len(fields) > 4 and fields[4] == "1"
        elif fields[1] == "over-budget":
            over = True
        elif fields[1] == "rc" and fields[2] != "none":
            rc = int(fields[2])
    out, _, err = rest.rpartition(f"\n{MARK} err\n")
    return state, key, followed, rc, over, out, err


def parse_follow_up(text: str) -> FollowUp | None:
    """The follow-up's outcome in a job_script run's output (None: it did not run)."""
    head = text.partition(f"{MARK} out\n")[0]
    status: FollowUp | None = None
    for line in head.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[0] == MARK and fields[1] == "then-rc":
            times = [float(f) for f in fields[3:5]] or [0.0, 0.0]
            status = FollowUp(exit_status=int(fields[2]), output="", started=times[0], ended=times[-1])
    if status is None:
        return None
    _, sep, output = head.partition(f"{MARK} then\n")
    return FollowUp(
        exit_status=status.exit_status,
        output=output if sep else "",
        started=status.started,
        ended=status.ended,
    )


def _outcome(stdout: str, secret: str, budget_s: float, target: SshTarget, what: str) -> JobOutcome:
    state, found_key, followed, rc, over, out, err = parse_job_output(stdout)
    then = parse_follow_up(stdout)
    if secret:
        out, err = out.replace(secret, "***"), err.replace(secret, "***")
        if then is not None:
            then = FollowUp(
                exit_status=then.exit_status,
                output=then.output.replace(secret, "***"),
                started=then.started,
                ended=then.ended,
            )
    if over:
        fail(
            DETACHED_TIMEOUT,
            f"{what}: still running after its budget of {budget_s:g}s; left running on "
            f"{target.host} (job {found_key})",
        )
    return JobOutcome(
        key=found_key, state=state, exit_status=rc, stdout=out, stderr=err, followed=followed, then=then
    )


def _over_budget(e: Exception, budget_s: float, target: SshTarget, key: str, what: str) -> None:
    if getattr(e, "type", "") == "SshCommandTimeout":
        fail(
            DETACHED_TIMEOUT,
            f"{what}: still running after its budget of {budget_s:g}s; left running "
            f"on {target.host} (job {key})",
            cause=e,
        )


async def run_detached(
    target: SshTarget,
    key: str,
    family: str,
    command: str,
    *,
    secret: str = "",
    stdin_text: str = "",
    budget_s: float,
    rerun_lost: bool,
    what: str,
) -> JobOutcome:
    """Start or attach to the job `key` on `target` and wait for its end (heartbeating), at most
    `budget_s` after it started; a job over its budget is left running and the step fails
    with DetachedCommandTimeout (non-retryable: a retry would only wait again)."""
    script = job_script(key, family, command, rerun_lost=rerun_lost, stdin_text=stdin_text, budget_s=budget_s)
    try:
        r = await ssh.run(target, script, timeout_s=budget_s + 2.0, check=False, input=secret + "\n")
    except Exception as e:
        _over_budget(e, budget_s, target, key, what)
        raise
    return _outcome(r.stdout, secret, budget_s, target, what)


class StagedJob:
    """A job whose channel and script are started ahead of time (see `staged_job`)."""

    def __init__(
        self, handle: ssh.Staged, key: str, secret: str, budget_s: float, target: SshTarget, what: str
    ) -> None:
        self._handle, self.key, self._secret = handle, key, secret
        self._budget_s, self._target, self._what = budget_s, target, what

    def go(self) -> None:
        self._handle.go("go\n")

    async def outcome(self) -> JobOutcome:
        try:
            r = await self._handle.result(self._budget_s + 2.0)
        except Exception as e:
            _over_budget(e, self._budget_s, self._target, self.key, self._what)
            raise
        return _outcome(r.stdout, self._secret, self._budget_s, self._target, self._what)


@contextlib.asynccontextmanager
async def staged_job(
    target: SshTarget,
    key: str,
    family: str,
    command: str,
    *,
    secret: str = "",
    budget_s: float,
    rerun_lost: bool,
    what: str,
    then: str = "",
) -> AsyncIterator[StagedJob]:
    """`run_detached`, but its SSH channel opened and its script started now, waiting for
    `go()`: the job then starts without the channel's set-up (a schema's disabled window
    holds the tool's own work, not SSH's). Left without `go()`, it does nothing. `then`: the
    job's follow-up (job_script)."""
    script = job_script(key, family, command, rerun_lost=rerun_lost, budget_s=budget_s, gated=True, then=then)
    async with ssh.staged(target, script, first_input=secret + "\n") as handle:
        yield StagedJob(handle, key, secret, budget_s, target, what)
