# lib.sh - shared helpers for start.sh / stop.sh / ctl.sh (source it, don't run it).
#
# A throwaway mail system on 127.0.0.1 for integration tests:
#   dovecot  : IMAP (+STARTTLS), IMAPS, LMTP (unix socket), SASL auth socket for Postfix
#   mta-b    : Postfix instance "owner side": delivers example.test to Dovecot via LMTP
#   mta-a    : Postfix instance "site side" (optional): relays everything to mta-b
# Everything (config, queues, mail, logs, pid files, TLS material) lives under $MAILTEST_DIR.

MT_LIB_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

mt_die() { echo "mailtest: ERROR: $*" >&2; exit 1; }
mt_log() { [ -n "${MAILTEST_QUIET:-}" ] || echo "mailtest: $*" >&2; }

# Monotonic-enough milliseconds (for timings printed to stderr).
mt_now_ms() { date +%s%3N; }

# ---------------------------------------------------------------- settings
# Resolve settings: explicit env var > value saved by the previous start in
# $BASE/settings.env > default.  Saved settings make re-runs (idempotent start,
# ctl.sh start b after an outage) use the same ports.
mt_settings() {
  BASE=${MAILTEST_DIR:-/tmp/mailtest}
  case "$BASE" in /*) ;; *) BASE="$(pwd)/$BASE" ;; esac
  BASE=${BASE%/}
  local saved="$BASE/settings.env"
  local s_off="" s_relay="" s_dom="" s_users="" s_sza="" s_szb="" s_catch="" s_caps=""
  if [ -f "$saved" ]; then
    # shellcheck disable=SC1090
    s_off=$(. "$saved"; echo "${MAILTEST_PORT_OFFSET:-}")
    s_relay=$(. "$saved"; echo "${MAILTEST_RELAY:-}")
    s_dom=$(. "$saved"; echo "${MAILTEST_DOMAIN:-}")
    s_users=$(. "$saved"; echo "${MAILTEST_USERS:-}")
    s_sza=$(. "$saved"; echo "${MAILTEST_SIZE_LIMIT_A:-}")
    s_szb=$(. "$saved"; echo "${MAILTEST_SIZE_LIMIT_B:-}")
    s_catch=$(. "$saved"; echo "${MAILTEST_CATCHALL_PASSWORD-__unset__}")
    s_caps=$(. "$saved"; echo "${MAILTEST_IMAP_CAPABILITY:-}")
  fi
  OFF=${MAILTEST_PORT_OFFSET:-${s_off:-0}}
  RELAY=${MAILTEST_RELAY:-${s_relay:-1}}
  DOMAIN=${MAILTEST_DOMAIN:-${s_dom:-example.test}}
  USERS=${MAILTEST_USERS:-${s_users:-"owner@$DOMAIN:owner-secret site1@$DOMAIN:site1-secret site2@$DOMAIN:site2-secret"}}
  # message_size_limit (bytes) of each MTA. 10 MiB by default (Postfix default is 10240000).
  SIZE_B=${MAILTEST_SIZE_LIMIT_B:-${MAILTEST_SIZE_LIMIT:-${s_szb:-10485760}}}
  SIZE_A=${MAILTEST_SIZE_LIMIT_A:-${MAILTEST_SIZE_LIMIT:-${s_sza:-$SIZE_B}}}
  # Catch-all users: any t-*@DOMAIN logs in with this password and gets a fresh
  # mailbox (per-test isolation without editing the users file). Empty = off.
  if [ "${MAILTEST_CATCHALL_PASSWORD+set}" = set ]; then CATCHALL=$MAILTEST_CATCHALL_PASSWORD
  elif [ "$s_catch" != "__unset__" ] && [ -f "$saved" ]; then CATCHALL=$s_catch
  else CATCHALL=test-secret; fi
  # Dovecot's imap_capability after login: empty = Dovecot's full default list. Set it to a short
  # list (e.g. "IMAP4rev1 IDLE UIDPLUS") to test clients against servers without MOVE.
  IMAP_CAPS=${MAILTEST_IMAP_CAPABILITY:-$s_caps}

  case "$OFF" in ''|*[!0-9]*) mt_die "MAILTEST_PORT_OFFSET must be a non-negative integer (got '$OFF')";; esac

  IMAP_PORT=$((1143 + OFF));  IMAPS_PORT=$((1993 + OFF))
  B_SMTP_PORT=$((2525 + OFF)); B_SUBM_PORT=$((2587 + OFF)); B_SUBMS_PORT=$((2465 + OFF))
  A_SMTP_PORT=$((3525 + OFF)); A_SUBM_PORT=$((3587 + OFF)); A_SUBMS_PORT=$((3465 + OFF))
  [ "$A_SUBM_PORT" -le 65535 ] || mt_die "port offset $OFF too large (highest port 3587+offset)"

  TLS=$BASE/tls; DV=$BASE/dovecot; LOGS=$BASE/logs
  DV_RUN=$DV/run
  LMTP_SOCK=$DV_RUN/lmtp; AUTH_SOCK=$DV_RUN/auth-postfix
  # AF_UNIX paths are limited to 107 bytes; dovecot puts sockets up to ~30 chars
  # below base_dir (e.g. login/..., replication-notify-fifo).
  [ $(( ${#DV_RUN} + 32 )) -le 107 ] || mt_die "MAILTEST_DIR '$BASE' is too long for unix socket paths (keep it under ~60 chars, e.g. /tmp/mailtest-xyz)"
}

mt_save_settings() {
  {
    printf 'MAILTEST_PORT_OFFSET=%q\n' "$OFF"
    printf 'MAILTEST_RELAY=%q\n' "$RELAY"
    printf 'MAILTEST_DOMAIN=%q\n' "$DOMAIN"
    printf 'MAILTEST_USERS=%q\n' "$USERS"
    printf 'MAILTEST_SIZE_LIMIT_A=%q\n' "$SIZE_A"
    printf 'MAILTEST_SIZE_LIMIT_B=%q\n' "$SIZE_B"
    printf 'MAILTEST_CATCHALL_PASSWORD=%q\n' "$CATCHALL"
    printf 'MAILTEST_IMAP_CAPABILITY=%q\n' "$IMAP_CAPS"
  } > "$BASE/settings.env.tmp" && mv "$BASE/settings.env.tmp" "$BASE/settings.env"
}

mt_print_env() {
  cat <<EOF
MAILTEST_DIR=$BASE
MAILTEST_DOMAIN=$DOMAIN
MAILTEST_HOST=127.0.0.1
MAILTEST_IMAP_PORT=$IMAP_PORT
MAILTEST_IMAPS_PORT=$IMAPS_PORT
MAILTEST_SMTP_PORT=$B_SMTP_PORT
MAILTEST_SUBMISSION_PORT=$B_SUBM_PORT
MAILTEST_SUBMISSIONS_PORT=$B_SUBMS_PORT
EOF
  if [ "$RELAY" = 1 ]; then cat <<EOF
MAILTEST_RELAY_SMTP_PORT=$A_SMTP_PORT
MAILTEST_RELAY_SUBMISSION_PORT=$A_SUBM_PORT
MAILTEST_RELAY_SUBMISSIONS_PORT=$A_SUBMS_PORT
EOF
  fi
  cat <<EOF
MAILTEST_CA_CERT=$TLS/ca.pem
MAILTEST_TLS_NAME=localhost
MAILTEST_SIZE_LIMIT=$SIZE_B
MAILTEST_RELAY_SIZE_LIMIT=$SIZE_A
MAILTEST_USERS='$USERS'
MAILTEST_CATCHALL_PASSWORD='$CATCHALL'
EOF
}

# ---------------------------------------------------------------- processes
# mt_pid_ok PIDFILE COMM -> prints pid and returns 0 if the pid file names a live
# process whose comm is COMM (guards against stale pid files / pid reuse).
mt_pid_ok() {
  local f=$1 comm=$2 pid
  [ -s "$f" ] || return 1
  pid=$(tr -dc '0-9' < "$f" | head -c 10)
  [ -n "$pid" ] && mt_alive "$pid" || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$comm" ] || return 1
  echo "$pid"
}

# mt_alive PID: process exists and is not a zombie. Daemons are reparented to PID 1 when
# they detach; if PID 1 reaps slowly (containers, process_api here: ~2 s), a dead master
# stays visible in /proc as state Z - treat that as dead.
mt_alive() {
  local st
  st=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$st" ] && [ "${st%% *}" != Z ] && [ "${st%% *}" != X ]
}

mt_pidfile() {
  case $1 in
    dovecot) echo "$DV_RUN/master.pid" ;;
    a|b) echo "$BASE/mta-$1/spool/pid/master.pid" ;;
    *) mt_die "unknown component '$1'" ;;
  esac
}
mt_comm() { case $1 in dovecot) echo dovecot ;; *) echo master ;; esac; }

# mt_pid COMPONENT -> prints the pid of that component of THIS instance, or fails.
# Besides pid file + comm, checks the process really belongs to $BASE: a Postfix master
# runs with cwd = its queue dir; Dovecot's master has "-c $DV/dovecot.conf" on its cmdline.
mt_pid() {
  local c=$1 pid
  pid=$(mt_pid_ok "$(mt_pidfile "$c")" "$(mt_comm "$c")") || return 1
  case $c in
    dovecot) tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "-c $DV/dovecot.conf " || return 1 ;;
    *) [ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" = "$BASE/mta-$c/spool" ] || return 1 ;;
  esac
  echo "$pid"
}
mt_running() { mt_pid "$1" >/dev/null; }

# Refuse to chmod/rm a directory that is obviously not ours.
mt_guard_base() {
  case "$BASE" in
    /|/tmp|/var|/var/tmp|/root|/home|/usr|/etc|/dev|/proc|/sys|/run) mt_die "refusing to use '$BASE' as MAILTEST_DIR" ;;
  esac
  if [ -d "$BASE" ] && [ -n "$(ls -A "$BASE" 2>/dev/null)" ] \
     && [ ! -e "$BASE/settings.env" ] && [ ! -e "$BASE/.lock" ]; then
    mt_die "$BASE is not empty and not a mailtest dir (no settings.env); refusing to touch it"
  fi
}

# Stop one component by its pid file: SIGTERM, poll, SIGKILL only that pid as last resort.
mt_stop_component() {
  local c=$1 pid i kids
  if ! pid=$(mt_pid "$c"); then
    mt_log "$c: not running"; return 0
  fi
  # Dovecot 2.3's imap processes outlive a SIGTERMed master (shutdown_clients notwithstanding) and
  # keep serving logged-in clients, so an "outage" would not drop sessions. Remember the master's
  # direct children (pid:comm) now and end the ones still alive once the master is gone.
  kids=$(mt_children "$pid")
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 500); do            # up to 10 s
    mt_alive "$pid" || break
    sleep 0.02
  done
  if mt_alive "$pid"; then
    mt_log "$c: pid $pid did not exit after SIGTERM, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  mt_end_orphans $kids
  # Wait until its listening ports are closed (children exit shortly after the master).
  local ports
  ports=$(mt_ports_of "$c")
  for i in $(seq 1 250); do
    mt_any_listening $ports || break
    sleep 0.02
  done
  mt_log "$c: stopped (pid $pid)"
}

# mt_children PID -> "pid:comm" of each direct child of PID (no forks: reads /proc with bash only).
mt_children() {
  local parent=$1 d st comm
  local -a f
  for d in /proc/[0-9]*; do
    read -r st 2>/dev/null < "$d/stat" || continue
    read -ra f <<< "${st##*) }"          # after the comm: state ppid ...
    [ "${f[1]:-}" = "$parent" ] || continue
    read -r comm 2>/dev/null < "$d/comm" || continue
    echo "${d#/proc/}:$comm"
  done
}

# mt_end_orphans pid:comm... : SIGTERM (then SIGKILL) each pid that is still alive with the same comm,
# so a reused pid is never signalled.
mt_end_orphans() {
  local entry p comm i left
  for entry in "$@"; do
    p=${entry%%:*}; comm=${entry#*:}
    mt_alive "$p" && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$comm" ] && kill -TERM "$p" 2>/dev/null || true
  done
  for i in $(seq 1 100); do            # up to 2 s
    left=0
    for entry in "$@"; do
      p=${entry%%:*}; comm=${entry#*:}
      mt_alive "$p" && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$comm" ] && left=1
    done
    [ "$left" = 0 ] && return 0
    sleep 0.02
  done
  for entry in "$@"; do
    p=${entry%%:*}; comm=${entry#*:}
    mt_alive "$p" && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$comm" ] && kill -KILL "$p" 2>/dev/null || true
  done
}

mt_ports_of() {
  case $1 in
    dovecot) echo "$IMAP_PORT $IMAPS_PORT" ;;
    b) echo "$B_SMTP_PORT $B_SUBM_PORT $B_SUBMS_PORT" ;;
    a) echo "$A_SMTP_PORT $A_SUBM_PORT $A_SUBMS_PORT" ;;
  esac
}

# True if a TCP socket listens on PORT (any address). Uses ss(8) so that probing
# does not open connections (which would fill the logs with "lost connection");
# falls back to a connect() via bash's /dev/tcp.
if command -v ss >/dev/null 2>&1; then
  mt_accepts() { [ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]; }
else
  mt_accepts() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
fi
mt_any_listening() { local p; for p in "$@"; do mt_accepts "$p" && return 0; done; return 1; }

mt_wait_ports() {
  local deadline=$(( $(date +%s) + ${MAILTEST_READY_TIMEOUT:-30} )) p
  for p in "$@"; do
    until mt_accepts "$p"; do
      [ "$(date +%s)" -lt "$deadline" ] || mt_die "port $p not accepting connections (see $LOGS)"
      sleep 0.02
    done
  done
}

mt_postfix() { # mt_postfix a|b ARGS... : run the postfix command for instance a|b
  local c=$1; shift
  MAIL_CONFIG="$BASE/mta-$c/conf" postfix -c "$BASE/mta-$c/conf" "$@"
}
mt_postqueue() {
  local c=$1; shift
  MAIL_CONFIG="$BASE/mta-$c/conf" postqueue -c "$BASE/mta-$c/conf" "$@"
}

# mt_install TMP DEST: move TMP over DEST only if the content differs, and backdate
# its mtime. Postfix programs refuse to read a main.cf (or map file) whose mtime is
# less than ~2 s old: they poll every 300 ms until it is "stable", which made every
# "postfix start" after a config rewrite take 2-3 s instead of 0.3 s.
mt_install() {
  if [ -f "$2" ] && cmp -s "$1" "$2"; then rm -f "$1"; return 0; fi
  mv "$1" "$2"
  touch -d '10 seconds ago' "$2"
}
