# Sourced by the device scripts, which set DEADLINE (seconds) and T0 (their start, `date +%s`).
# run_before_deadline NAME LIMIT_S OUTFILE CMD...: CMD with a time limit that ends no later than the
# deadline (skipped when under 30 s would be left), its output without the loading bars in OUTFILE,
# followed by its exit status; prints the file's tail.
run_before_deadline() {
  local name=$1 limit=$2 out=$3; shift 3
  local left=$(( DEADLINE - ($(date +%s) - T0) ))
  [ $left -gt 30 ] || { echo "skipped $name: deadline"; return; }
  [ $limit -lt $left ] || limit=$left
  echo "== $name (limit $limit s, at $(( $(date +%s) - T0 )) s)"
  timeout $limit "$@" 2>&1 | grep -v '^Loading\|^Writing' > $out
  echo "exit ${PIPESTATUS[0]}" >> $out
  tail -16 $out
}
