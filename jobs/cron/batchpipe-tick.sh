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
# wrapped as {"event": "cli.message"} (level "error" for its `error:` lines, "warning" for
# `warning:`, else "info"), and a tick.exit (or tick.skipped) line per run, whose level is
# "info" for exit 0, "warning" for 75 and "error" otherwise.
#
# Output (what cron mails): nothing while all is well or only delayed (exit 0 or 75). On any
# other exit, batchpipe's `error:` lines (or, if it said none, all it said) go to stderr with
# a line naming the log, so a failed job or a broken setup reaches MAILTO once.
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
# ever escape) become {"event": "cli.message"} lines, so the whole file is JSON lines. Each
# message line is also kept in $said, for stderr should the run fail.
as_json_lines() {
  local line level ts
  export TZ=UTC  # this subshell's clock only; batchpipe keeps the user's
  while IFS= read -r line || [[ -n $line ]]; do
    if [[ $line == \{*\} ]]; then
      printf '%s\n' "$line"
      continue
    fi
    printf '%s\n' "$line" >>"$said"
    case $line in
      error:*) level=error ;;
      warning:*) level=warning ;;
      *) level=info ;;
    esac
    line=${line//\\/\\\\}
    line=${line//\"/\\\"}
    line=${line//$'\t'/\\t}
    line=${line//[[:cntrl:]]/}
    printf -v ts '%(%Y-%m-%dT%H:%M:%S)TZ' -1
    printf '{"event": "cli.message", "message": "%s", "level": "%s", "timestamp": "%s"}\n' \
      "$line" "$level" "$ts"
  done
}

said=$(mktemp "${TMPDIR:-/tmp}/batchpipe-tick.XXXXXX") || exit 2
trap 'rm -f "$said"' EXIT
"$bin" --log-format json tick "$@" </dev/null 2>&1 | as_json_lines >>"$logfile"
rc=${PIPESTATUS[0]}
case $rc in
  0) level=info ;;
  75) level=warning ;;
  *) level=error ;;
esac
printf '{"event": "tick.exit", "exit_code": %d, "level": "%s", "timestamp": "%s"}\n' \
  "$rc" "$level" "$(now)" >>"$logfile"
if [[ $rc != 0 && $rc != 75 ]]; then
  # For cron's mail: what went wrong, once, from the run that found it.
  grep '^error:' "$said" >&2 || cat "$said" >&2
  echo "batchpipe tick exited $rc; its log is $logfile" >&2
fi
exit "$rc"
