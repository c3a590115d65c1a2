# tether's remote toolkit: the one POSIX sh script the docker and ssh signallers run on
# their targets (dash, bash and busybox ash). docker runs it as `sh -c SCRIPT tether OP
# ARGS...`, ssh as `sh -s -- OP ARGS...` with this text on stdin. User data only ever
# arrives as positional parameters; every value is quoted where it is used, globbing is
# off except for the /proc globs, and nothing here reads stdin (ops_main runs with stdin
# from /dev/null, so no command can eat the rest of a script read by `sh -s`).
#
# Operations (the Python side, signallers/remote/, is the only caller and the only parser):
#   scan GROUP_MARK AGENT_MARK CGROUP
#       P <scanner pid>, I <boot id> (a reboot makes every pid and start time new),
#       N <uptime seconds read before the snapshot>, then S, every
#       /proc/PID/stat line (a command name may hold newlines: continuation lines follow),
#       the line "$TABLE_END" (longer than any piece of a 15-byte command name, and not
#       starting with a digit, so no process can fake it), then C <pid> per pid in
#       CGROUP/cgroup.procs, M <pid> per process whose environment holds both marks
#       exactly (G if this host has no grep), and Z as the last line.
#   proc PID GROUP_MARK AGENT_MARK
#       One process: I <boot id>, B <btime>, H <clock ticks per second>, S... as above, then M (both
#       marks), U (environment unreadable) or nothing, c <its cgroup v2 path>,
#       m <cgroup2 mount root> <mount point>, Z as the last line.
#   signal SIGS CGROUP TARGET...
#       SIGS: comma-separated names, sent in order. TARGET: PID:START signals PID only if
#       it still started at START and is not a zombie; -PID:START signals process group
#       PID only while PID still holds START (a zombie still holds its number, so the
#       group cannot be a stranger's); gPID:START is a member of that group, skipped when
#       the group was signalled. With KILL and a CGROUP, cgroup.kill too. Prints
#       e PID for a kill that failed (another user's process), then Z.
#   watch ROUNDS TARGET...
#       Exits 0 ("gone") once no PID:START target is alive; with ROUNDS > 0 exits 1
#       ("alive") after that many looks. Backs off from 10 ms to 200 ms between looks and
#       prints a heartbeat line each round, so it dies of SIGPIPE when its reader goes.
#   spawn MODE CWD LOG HASPATH SEARCH CGMODE CGROOT CGNAME GROUP_MARK NENV K=V... ARGV...
#       Checks the working directory, resolves the command the way execvp will (in
#       SEARCH; "-" means this shell's PATH) and opens the log; a failure prints
#       "fail CODE why" and exits CODE (127 not found, 126 not executable, 125 cwd
#       missing, 124 cwd not enterable, 123 log not writable, 122 log directory missing,
#       121 a tool is missing, 120 no cgroup, 119 unusable command path). Then
#       MODE exec:   prints "ok PID START BTIME CLK" and execs `env -i -- K=V... ARGV` in
#                    place (docker: runc makes every exec a session leader), its output
#                    appended to LOG (or /dev/null);
#       MODE attach: as exec, but without LOG its output stays the exec's own stdout and
#                    stderr (docker: the agent reads them from the attached stream);
#       MODE detach: joins a cgroup (CGMODE auto|cgroup, under CGROOT or a delegated
#                    directory found here), runs `setsid env -i -- K=V... ARGV` in the
#                    background, waits until GROUP_MARK shows in its environment (the exec
#                    happened) and prints "ok PID START BTIME CLK", "cgroup DIR",
#                    "exited STATUS" if it died first (ssh).
#       MODE spool:  as detach, but without LOG the program's stdout and stderr go to
#                    DIR/out and DIR/err of a private directory (mktemp -d, mode 0700)
#                    named by "spool DIR" (ssh capture; see op spool). Where none can be
#                    made: "note ..." and the output is discarded, as in detach.
#       Both print "boot ID" (the boot id) before "ok".
#       Without HASPATH the command runs by its resolved path (execvp's default search
#       path may differ from the one searched).
#   spool DIR OUTOFF ERROFF MAX CAP FINAL PUNCH
#       Reads a spool (MODE spool) from byte offsets: "tether-spool 1", then per stream
#       (o: DIR/out, e: DIR/err) "k S OFF" when more than CAP bytes were unread (the
#       older ones are skipped: reading resumes at OFF), and "S OFF COUNT" followed by
#       COUNT raw bytes (at most MAX) when there are new ones; "Z" last. FINAL=1: when
#       nothing is left unread, removes DIR and prints "R"; FINAL=2 removes it at once.
#       PUNCH=1 frees the disk blocks of the bytes before the offsets (fallocate
#       --punch-hole, where the tool and filesystem allow). "G": DIR is gone.
#   rmcg CGROUP
#       Removes a group's (empty) cgroup directory.

TABLE_END="E end-of-process-table"

ops_die() { printf '%s\n' "$*" >&2; exit 2; }

# stat_of PID: st_state st_ppid st_pgid st_sid st_start from /proc/PID/stat; 1 if gone.
# The whole file is read: a command name may hold newlines and ") ".
stat_of() {
  case $1 in ''|*[!0-9]*) return 1 ;; esac
  st_line=
  { while IFS= read -r st_l || [ -n "$st_l" ]; do
      st_line="$st_line$st_l "
    done < "/proc/$1/stat"; } 2>/dev/null
  case $st_line in *") "*) ;; *) return 1 ;; esac
  set -- ${st_line##*) }
  [ $# -ge 20 ] || return 1
  st_state=$1 st_ppid=$2 st_pgid=$3 st_sid=$4 st_start=${20}
}

boot_id() {
  bi=
  { IFS= read -r bi < /proc/sys/kernel/random/boot_id; } 2>/dev/null
}

# alive_as PID START: PID is alive (not a zombie) and started at START.
alive_as() {
  stat_of "$1" || return 1
  [ "$st_start" = "$2" ] || return 1
  case $st_state in Z|X|x) return 1 ;; esac
}

# How this host can search environments: 1 grep -z, 2 tr + grep, 0 not at all.
zgrep_mode() {
  if printf 'x\0' | grep -qzx x 2>/dev/null; then zgrep=1
  elif command -v grep >/dev/null 2>&1 && command -v tr >/dev/null 2>&1; then zgrep=2
  else zgrep=0
  fi
}

# has_marks FILE MARK...: the NUL-separated environment FILE holds every MARK exactly.
has_marks() {
  hm_f=$1; shift
  for hm_m; do
    if [ $zgrep = 1 ]; then
      grep -qzxF -e "$hm_m" "$hm_f" 2>/dev/null || return 1
    else
      { tr '\0' '\n' < "$hm_f" | grep -qxF -e "$hm_m"; } 2>/dev/null || return 1
    fi
  done
}

# Every process's stat, from /proc (one cat where there is one).
stat_lines() {
  echo S
  (
    cd /proc || exit 0
    set +f
    rc=127
    if command -v cat >/dev/null 2>&1; then
      cat [0-9]*/stat 2>/dev/null
      rc=$?
    fi
    if [ $rc -ge 126 ]; then
      for sl_d in [0-9]*; do
        { while IFS= read -r sl_l || [ -n "$sl_l" ]; do
            printf '%s\n' "$sl_l"
          done < "$sl_d/stat"; } 2>/dev/null
      done
    fi
  )
  echo "$TABLE_END"
}

# M <pid> for every process carrying both marks; G if they cannot be searched here.
marked() {
  [ $zgrep = 0 ] && { echo G; return 0; }
  (
    cd /proc || exit 0
    set +f
    if [ $zgrep = 1 ]; then
      grep -lzxF -e "$1" [0-9]*/environ 2>/dev/null
      [ $? -lt 126 ] && exit 0
    fi
    for mk_f in [0-9]*/environ; do
      has_marks "$mk_f" "$1" && printf '%s\n' "$mk_f"
    done
  ) | while IFS= read -r mk_f; do
    has_marks "/proc/$mk_f" "$2" && printf 'M %s\n' "${mk_f%/environ}"
  done
}

op_scan() {
  [ $# -eq 3 ] || ops_die "scan: wants GROUP_MARK AGENT_MARK CGROUP"
  echo "P $$"
  boot_id
  [ -n "$bi" ] && printf 'I %s\n' "$bi"
  IFS=' ' read -r sc_up sc_rest < /proc/uptime && echo "N $sc_up"
  stat_lines
  if [ -n "$3" ] && [ -r "$3/cgroup.procs" ]; then
    while read -r sc_p; do echo "C $sc_p"; done < "$3/cgroup.procs"
  fi
  if [ -n "$1" ]; then
    zgrep_mode
    marked "$1" "$2"
  fi
  echo Z
}

btime_clk() {
  btime=0
  while read -r bc_k bc_v; do
    if [ "$bc_k" = btime ]; then btime=$bc_v; break; fi
  done < /proc/stat
  clk=$(getconf CLK_TCK 2>/dev/null) || clk=100
  case $clk in ''|*[!0-9]*) clk=100 ;; esac
}

op_proc() {
  [ $# -eq 3 ] || ops_die "proc: wants PID GROUP_MARK AGENT_MARK"
  case $1 in ''|*[!0-9]*) ops_die "proc: bad pid" ;; esac
  btime_clk
  boot_id
  [ -n "$bi" ] && printf 'I %s\n' "$bi"
  echo "B $btime"
  echo "H $clk"
  echo S
  { while IFS= read -r pr_l || [ -n "$pr_l" ]; do
      printf '%s\n' "$pr_l"
    done < "/proc/$1/stat"; } 2>/dev/null
  echo "$TABLE_END"
  zgrep_mode
  if [ $zgrep = 0 ]; then echo G
  elif [ -r "/proc/$1/environ" ]; then has_marks "/proc/$1/environ" "$2" "$3" && echo M
  else echo U
  fi
  { while IFS= read -r pr_l; do
      case $pr_l in 0::*) printf 'c %s\n' "${pr_l#0::}" ;; esac
    done < "/proc/$1/cgroup"; } 2>/dev/null
  while read -r _ _ _ pr_root pr_point pr_rest; do
    case " $pr_rest " in *" - cgroup2 "*) printf 'm %s %s\n' "$pr_root" "$pr_point"; break ;; esac
  done < /proc/self/mountinfo
  echo Z
}

op_signal() {
  [ $# -ge 2 ] || ops_die "signal: wants SIGS CGROUP TARGET..."
  sg_sigs=$1 sg_cg=$2
  shift 2
  case $sg_sigs in ''|*[!A-Z0-9,]*) ops_die "signal: bad signal list" ;; esac
  sg_grouped=0
  for sg_t; do
    case $sg_t in -*) ;; *) continue ;; esac
    sg_p=${sg_t#-} sg_s=${sg_t#*:}
    sg_p=${sg_p%%:*}
    case $sg_p in ''|*[!0-9]*|0|1) continue ;; esac
    stat_of "$sg_p" && [ "$st_start" = "$sg_s" ] || continue
    IFS=,
    for sg_n in $sg_sigs; do kill -s "$sg_n" -- "-$sg_p" 2>/dev/null; done
    unset IFS
    sg_grouped=1
  done
  for sg_t; do
    case $sg_t in
      -*) continue ;;
      g*) [ $sg_grouped = 1 ] && continue; sg_t=${sg_t#g} ;;
    esac
    sg_p=${sg_t%%:*} sg_s=${sg_t#*:}
    case $sg_p in ''|*[!0-9]*|0|1) continue ;; esac
    alive_as "$sg_p" "$sg_s" || continue
    IFS=,
    for sg_n in $sg_sigs; do kill -s "$sg_n" "$sg_p" 2>/dev/null || echo "e $sg_p"; done
    unset IFS
  done
  case ",$sg_sigs," in *,KILL,*)
    if [ -n "$sg_cg" ] && [ -w "$sg_cg/cgroup.kill" ]; then
      { echo 1 > "$sg_cg/cgroup.kill"; } 2>/dev/null
    fi ;;
  esac
  echo Z
}

# backoff: sleep 10 ms, doubling to 200 ms (whole seconds where sleep takes no fraction).
backoff() {
  if [ "$bo_frac" = 0 ]; then sleep 1; return; fi
  sleep "$bo_delay"
  case $bo_delay in
    0.01) bo_delay=0.02 ;; 0.02) bo_delay=0.04 ;; 0.04) bo_delay=0.08 ;;
    0.08) bo_delay=0.16 ;; *) bo_delay=0.2 ;;
  esac
}

op_watch() {
  [ $# -ge 1 ] || ops_die "watch: wants ROUNDS TARGET..."
  case $1 in ''|*[!0-9]*) ops_die "watch: bad rounds" ;; esac
  wt_rounds=$1 wt_n=0
  shift
  if sleep 0.001 2>/dev/null; then bo_frac=1; else bo_frac=0; fi
  bo_delay=0.01
  while :; do
    wt_any=0
    for wt_t; do
      if alive_as "${wt_t%%:*}" "${wt_t#*:}"; then wt_any=1; break; fi
    done
    [ $wt_any = 0 ] && { echo gone; exit 0; }
    wt_n=$((wt_n + 1))
    [ "$wt_rounds" -gt 0 ] && [ $wt_n -ge "$wt_rounds" ] && { echo alive; exit 1; }
    echo . || exit 3
    backoff
  done
}

fail() { printf 'fail %s\n' "$*"; exit "$1"; }

# resolve CMD: the file execvp will run, in $sp_search; 0, 126 or 127 like a shell.
resolve() {
  case $1 in
    */*) sp_cmd=$1
         if [ -f "$1" ] && [ -x "$1" ]; then return 0; fi
         if [ -e "$1" ]; then return 126; fi
         return 127 ;;
  esac
  rs_denied=0
  IFS=:
  for rs_d in $sp_search; do
    [ -n "$rs_d" ] || rs_d=.
    if [ -f "$rs_d/$1" ]; then
      if [ -x "$rs_d/$1" ]; then sp_cmd=$rs_d/$1; unset IFS; return 0; fi
      rs_denied=1
    fi
  done
  unset IFS
  [ $rs_denied = 1 ] && return 126
  return 127
}

# A delegated cgroup v2 directory this user may create groups in and move into.
detect_cgroot() {
  dc_mp= dc_mr= dc_rel=
  while read -r _ _ _ dc_root dc_point dc_rest; do
    case " $dc_rest " in *" - cgroup2 "*) dc_mp=$dc_point dc_mr=$dc_root; break ;; esac
  done < /proc/self/mountinfo
  [ -n "$dc_mp" ] || return 0
  while IFS= read -r dc_l; do
    case $dc_l in 0::*) dc_rel=${dc_l#0::} ;; esac
  done < /proc/self/cgroup
  [ -n "$dc_rel" ] || return 0
  [ "$dc_mr" = / ] || dc_rel=${dc_rel#"$dc_mr"}
  dc_cur=$dc_mp${dc_rel%/}
  for dc_c in "${dc_cur%/*}" "$dc_cur"; do
    [ "${#dc_c}" -gt "${#dc_mp}" ] || continue
    if [ -w "$dc_c" ] && [ -w "$dc_c/cgroup.procs" ]; then printf '%s\n' "$dc_c"; return 0; fi
  done
}

join_cgroup() {
  sp_cg=
  [ "$sp_cgmode" = none ] && return 0
  case $sp_cgname in ''|*/*|.|..) fail 120 "bad cgroup name" ;; esac
  jc_root=$sp_cgroot
  [ -n "$jc_root" ] || jc_root=$(detect_cgroot)
  if [ -n "$jc_root" ]; then
    jc_c=$jc_root/tether-$sp_cgname
    { rmdir "$jc_c"; } 2>/dev/null
    if { mkdir "$jc_c" && echo $$ > "$jc_c/cgroup.procs"; } 2>/dev/null; then
      sp_cg=$jc_c
    else
      { rmdir "$jc_c"; } 2>/dev/null
      printf 'note cgroup %s could not be created or joined\n' "$jc_c"
    fi
  else
    printf 'note no delegated cgroup v2 directory is writable by %s\n' "$(id -un 2>/dev/null)"
  fi
  if [ "$sp_cgmode" = cgroup ] && [ -z "$sp_cg" ]; then fail 120 "no cgroup"; fi
}

# other_uid PID: PID runs as another user (a setuid program: its environ is not ours).
other_uid() {
  { while read -r ou_k _ ou_e _; do
      if [ "$ou_k" = Uid: ]; then [ "$ou_e" != "$sp_uid" ]; return; fi
    done < "/proc/$1/status"; } 2>/dev/null
  return 1
}

op_spawn() {
  [ $# -ge 11 ] || ops_die "spawn: too few arguments"
  sp_mode=$1 sp_cwd=$2 sp_log=$3 sp_haspath=$4 sp_search=$5 sp_cgmode=$6 sp_cgroot=$7
  sp_cgname=$8 sp_mark=$9
  shift 9
  sp_nenv=$1
  shift
  case $sp_nenv in ''|*[!0-9]*) ops_die "spawn: bad env count" ;; esac
  [ $# -gt "$sp_nenv" ] || ops_die "spawn: no command"
  echo "tether-spawn 1"
  command -v env >/dev/null 2>&1 || fail 121 "env is not installed (PATH=${PATH-})"
  if [ "$sp_mode" = detach ] || [ "$sp_mode" = spool ]; then
    command -v setsid >/dev/null 2>&1 || fail 121 "setsid is not installed (PATH=${PATH-})"
  fi
  if [ -n "$sp_cwd" ]; then
    cd "$sp_cwd" 2>/dev/null || { [ -d "$sp_cwd" ] && fail 124 "cannot enter"; fail 125 "missing"; }
  fi
  [ "$sp_search" = - ] && [ "$sp_haspath" = 0 ] && sp_search=${PATH-}
  sp_i=0
  for sp_a; do
    if [ $sp_i -eq "$sp_nenv" ]; then break; fi
    sp_i=$((sp_i + 1))
  done
  resolve "$sp_a"
  sp_rc=$?
  [ $sp_rc = 0 ] || fail $sp_rc "resolve"
  sp_out=/dev/null
  if [ -n "$sp_log" ]; then
    if ! ( : >> "$sp_log" ) 2>/dev/null; then  # a subshell: a failed redirection of `:` ends a shell
      sp_dir=${sp_log%/*}
      [ -d "${sp_dir:-/}" ] && fail 123 "log not writable"
      fail 122 "log directory missing"
    fi
    sp_out=$sp_log
  fi
  if [ "$sp_haspath" = 0 ]; then
    # Run the file that was found: rebuild "$@" with it in the command's place.
    case $sp_cmd in *=*) fail 119 "the command's path holds '='" ;; esac
    sp_n=$# sp_i=0
    while [ $sp_i -lt $sp_n ]; do
      sp_a=$1
      shift
      [ $sp_i -eq "$sp_nenv" ] && sp_a=$sp_cmd
      set -- "$@" "$sp_a"
      sp_i=$((sp_i + 1))
    done
  fi
  btime_clk
  boot_id
  printf 'boot %s\n' "$bi"
  if [ "$sp_mode" = exec ] || [ "$sp_mode" = attach ]; then
    stat_of $$ || fail 119 "cannot read /proc/$$/stat"
    echo "ok $$ $st_start $btime $clk"
    if [ "$sp_mode" = exec ] || [ -n "$sp_log" ]; then
      exec >> "$sp_out" 2>&1
    fi
    exec env -i -- "$@"
  fi
  join_cgroup
  zgrep_mode
  # Still connected? A wrapper whose channel died (the client sweeps and retries) must
  # not start a second leader: writing to the dead channel kills it with SIGPIPE here.
  echo "forking" || exit 118
  sp_uid=$(id -u)
  sp_spool=
  if [ "$sp_mode" = spool ] && [ -z "$sp_log" ]; then
    sp_spool=$(umask 077; mktemp -d "${TMPDIR:-/tmp}/tether-out.XXXXXXXX" 2>/dev/null) \
      || sp_spool=
    case $sp_spool in /*/tether-out.*) ;; *) sp_spool= ;; esac
    if [ -n "$sp_spool" ] && ( umask 077; : > "$sp_spool/out" && : > "$sp_spool/err" ) \
        2>/dev/null; then
      printf 'spool %s\n' "$sp_spool"
    else
      [ -n "$sp_spool" ] && rm -rf -- "$sp_spool"
      sp_spool=
      echo "note no private spool directory could be made in ${TMPDIR:-/tmp} (mktemp -d)"
    fi
  fi
  if [ -n "$sp_spool" ]; then
    setsid env -i -- "$@" >> "$sp_spool/out" 2>> "$sp_spool/err" &
  else
    setsid env -i -- "$@" >> "$sp_out" 2>&1 &
  fi
  sp_pid=$!
  sp_n=0 sp_seen=0 sp_gone=0 st_start=0
  while :; do
    # Gone: reaped by this shell while it looked; `wait` still has the status.
    if ! stat_of "$sp_pid"; then sp_gone=1; break; fi
    case $st_state in Z|X|x) sp_gone=1; break ;; esac
    if [ "$st_pgid" = "$sp_pid" ]; then
      [ $zgrep = 0 ] && break
      if has_marks "/proc/$sp_pid/environ" "$sp_mark"; then sp_seen=1; break; fi
      other_uid "$sp_pid" && break
    fi
    sp_n=$((sp_n + 1))
    if [ $sp_n -gt 20 ]; then sleep 0.01 2>/dev/null || sleep 1; fi
    [ $sp_n -gt 520 ] && break
  done
  echo "ok $sp_pid $st_start $btime $clk"
  [ -n "$sp_cg" ] && printf 'cgroup %s\n' "$sp_cg"
  if [ $sp_gone = 1 ]; then
    wait "$sp_pid"
    echo "exited $?"
  elif [ $sp_seen = 0 ]; then
    echo "note the exec of the command was not confirmed (pid $sp_pid shows no marker)"
  fi
  exit 0
}

# size_of FILE: its size in bytes (sz), 1 if it cannot be read.
size_of() {
  sz=$(stat -c %s -- "$1" 2>/dev/null) || sz=$(wc -c < "$1" 2>/dev/null) || return 1
  set -- $sz
  case ${1-} in ''|*[!0-9]*) return 1 ;; esac
  sz=$1
}

# spool_stream TAG FILE OFF: what FILE holds past OFF (see op spool).
spool_stream() {
  size_of "$2" || return 0
  ss_off=$3
  if [ $((sz - ss_off)) -gt "$sl_cap" ]; then
    ss_off=$((sz - sl_cap))
    printf 'k %s %s\n' "$1" "$ss_off"
  fi
  [ "$sz" -gt "$ss_off" ] || return 0
  ss_n=$((sz - ss_off))
  if [ "$ss_n" -gt "$sl_max" ]; then ss_n=$sl_max; sl_left=1; fi
  printf '%s %s %s\n' "$1" "$ss_off" "$ss_n"
  tail -c "+$((ss_off + 1))" "$2" | head -c "$ss_n"
  if [ "$sl_punch" = 1 ] && [ "$3" -gt 0 ]; then
    { fallocate -p -o 0 -l "$3" "$2"; } 2>/dev/null
  fi
}

op_spool() {
  [ $# -eq 7 ] || ops_die "spool: wants DIR OUTOFF ERROFF MAX CAP FINAL PUNCH"
  case $1 in /*/tether-out.*) ;; *) ops_die "spool: not a tether spool: $1" ;; esac
  case $1 in */../*|*/..) ops_die "spool: not a tether spool: $1" ;; esac
  for sl_a in "$2" "$3" "$4" "$5"; do
    case $sl_a in ''|*[!0-9]*) ops_die "spool: bad number $sl_a" ;; esac
  done
  sl_max=$4 sl_cap=$5 sl_punch=$7 sl_left=0
  echo "tether-spool 1"
  if [ ! -d "$1" ]; then echo G; echo Z; exit 0; fi
  if [ "$6" = 2 ]; then rm -rf -- "$1"; echo R; echo Z; exit 0; fi
  spool_stream o "$1/out" "$2"
  spool_stream e "$1/err" "$3"
  if [ "$6" = 1 ] && [ $sl_left = 0 ]; then rm -rf -- "$1"; echo R; fi
  echo Z
}

op_rmcg() {
  case $1 in /*/tether-*) ;; *) ops_die "rmcg: not a tether cgroup: $1" ;; esac
  [ -d "$1" ] && rmdir "$1"
  exit 0
}

ops_main() {
  set -f
  unset IFS
  ops_op=${1-}
  [ $# -gt 0 ] && shift
  case $ops_op in
    scan) op_scan "$@" ;;
    proc) op_proc "$@" ;;
    signal) op_signal "$@" ;;
    watch) op_watch "$@" ;;
    spawn) op_spawn "$@" ;;
    rmcg) op_rmcg "$@" ;;
    spool) op_spool "$@" ;;
    *) ops_die "unknown operation: $ops_op" ;;
  esac
}

ops_main "$@" < /dev/null
