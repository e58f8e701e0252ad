#!/usr/bin/env bash
# batchpipe-tick.sh: advance batchpipe jobs one step from cron (see jobs/cron/crontab).
#
# Each run calls `batchpipe tick` once: it polls in-flight batches, collects results, resends
# transient failures and exports finished jobs, then exits without waiting. Submit jobs first
# with `batchpipe submit` (same database); this script only moves them along.
#
# Non-blocking and safe when runs overlap: a lock file lets one tick run at a time; a run that
# finds the lock taken logs a JSON line and exits 75 at once instead of queueing behind it.
# (batchpipe's job leases protect the jobs anyway, even across machines; the lock just keeps
# slow ticks from piling up.)
#
# Logs: JSON lines appended to $BATCHPIPE_TICK_LOG: batchpipe's own log lines, its messages
# wrapped as {"event": "cli.message"}, and a tick.exit (or tick.skipped) line per run.
#
# Exit codes (batchpipe's own, passed through unchanged):
#   0    every job advanced, or nothing to do
#   1    a job failed for good, or finished with more failed rows than its --max-failed
#        allows (the log says which and why; `batchpipe status` shows it)
#   2    usage or configuration error (bad flag, unreadable database URL)
#   75   temporary: the API is unavailable, an asked-for job is busy, or another tick holds
#        the lock. Nothing is lost; the next run carries on.
#   130  interrupted
# Never 99 (Airflow's BashOperator would read it as "skip").
#
# Arguments go to `batchpipe tick` (e.g. --job NAME). Environment:
#   BATCHPIPE_BIN           the batchpipe executable (default: batchpipe on PATH)
#   BATCHPIPE_DATABASE_URL  the state database (default: sqlite:///batchpipe.db in the cwd)
#   BATCHPIPE_TICK_LOG      log file (default: $HOME/.local/state/batchpipe/tick.log)
#   BATCHPIPE_TICK_LOCK     lock file (default: the log file's path with .lock)
#   ANTHROPIC_API_KEY, ANTHROPIC_BASE_URL  as for batchpipe itself
set -uo pipefail

bin="${BATCHPIPE_BIN:-batchpipe}"
logfile="${BATCHPIPE_TICK_LOG:-$HOME/.local/state/batchpipe/tick.log}"
lockfile="${BATCHPIPE_TICK_LOCK:-${logfile%.log}.lock}"
mkdir -p "$(dirname "$logfile")" "$(dirname "$lockfile")" || exit 2

now() { date -u +%Y-%m-%dT%H:%M:%S.%6NZ; }

exec 9>>"$lockfile" || exit 2
if ! flock --nonblock 9; then
  printf '{"event": "tick.skipped", "reason": "another tick holds %s", "level": "info", "timestamp": "%s"}\n' \
    "$lockfile" "$(now)" >>"$logfile"
  exit 75
fi

# batchpipe's log lines are JSON already; its one-line messages (and a traceback, should one
# ever escape) become {"event": "cli.message"} lines, so the whole file is JSON lines.
as_json_lines() {
  sed -u -e '/^{.*}$/b' \
    -e 's/\\/\\\\/g; s/"/\\"/g; s/\t/\\t/g; s/[[:cntrl:]]//g' \
    -e 's/^/{"event": "cli.message", "message": "/; s/$/", "level": "info"}/'
}

"$bin" --log-format json tick "$@" </dev/null 2>&1 | as_json_lines >>"$logfile"
rc=${PIPESTATUS[0]}
printf '{"event": "tick.exit", "exit_code": %d, "level": "info", "timestamp": "%s"}\n' \
  "$rc" "$(now)" >>"$logfile"
exit "$rc"
