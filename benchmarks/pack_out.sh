#!/usr/bin/env bash
# pack_out.sh OUT: fit a GPU lease's output folder to what the lease returns
# (/work/.library/device/README.md, "Limits"): at most 8 files, each at most 16 MiB, named in
# letters, digits, '.', '_' and '-', none deeper than OUT/a/b/file. Whatever is over is left
# out by the lease, silently but for a line in its answer, so benchmarks/gpu_session.sh runs
# this after the variants and on exit (again: it changes nothing already packed). A chain and
# four variants would otherwise leave 12 files, 15 with the benchmark.
#
#   1. bench-<model>.log go: bench.log holds each of them (the script appends them there when
#      the model's run ends; one cut off before that is appended here first).
#   2. variant-<i>.log / .json go into variants.tgz (tar xzf variants.tgz to read them).
#   3. Still more than 8 files: every file but the archives (*.tgz), the journal (*.journal,
#      carried as it is by ORDERS_FROM) and env.txt goes into logs.tgz.
#   4. What the lease would still leave out (a file over 16 MiB, a name with other characters,
#      more than 8 files, more than 64 MiB together) is printed as a WARNING line, on stderr.
# Prints one line naming the files that stay. Exit status 0, also when it warns.
set -u
OUT=${1:?usage: pack_out.sh OUT}
[ -d "$OUT" ] || exit 0
cd "$OUT" || exit 0
shopt -s nullglob

for f in bench-*.log; do
  model=${f#bench-}
  model=${model%.log}
  # appended by the script when the model's run ended ("bench <model>: rc=..." is its last line)
  grep -q "^bench $model: rc=" bench.log 2>/dev/null || cat "$f" >>bench.log
  rm -f "$f"
done

# pack NAME FILE...: FILE... into the archive NAME, added to what NAME already holds (this runs
# twice: after the variants and on exit), written whole by a rename; then FILE... are removed.
# On failure nothing is removed, no partial archive is left, and the status is 1.
pack() {
  local name=$1 tmp status=1
  shift
  tmp=$(mktemp -d .pack.XXXXXX) || return 1
  if { [ ! -f "$name" ] || tar xzf "$name" -C "$tmp"; } && cp -- "$@" "$tmp"/ &&
    (cd "$tmp" && tar czf "../$name.part" -- *) && mv "$name.part" "$name"; then
    rm -f -- "$@"
    status=0
  fi
  rm -rf "$tmp" "$name.part"
  return $status
}

variant_files=(variant-*)
[ ${#variant_files[@]} -gt 0 ] && pack variants.tgz "${variant_files[@]}"

mapfile -t files < <(find . -maxdepth 1 -type f -printf '%P\n' | sort)
if [ ${#files[@]} -gt 8 ]; then
  loose=()
  for f in "${files[@]}"; do
    case $f in *.tgz | *.journal | env.txt) ;; *) loose+=("$f") ;; esac
  done
  [ ${#loose[@]} -gt 0 ] && pack logs.tgz "${loose[@]}"
fi

mapfile -t files < <(find . -type f -printf '%P\n' | sort)
for f in "${files[@]}"; do
  if [ "$(stat -c %s "$f")" -gt $((16 * 1024 * 1024)) ]; then
    echo "pack_out: WARNING: $f is over 16 MiB: the lease will not return it" >&2
  fi
  if [[ ! $f =~ ^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+){0,2}$ ]]; then
    echo "pack_out: WARNING: $f: the lease returns names of letters, digits, . _ - only," \
      "at most two folders down" >&2
  fi
done
if [ ${#files[@]} -gt 8 ]; then
  echo "pack_out: WARNING: ${#files[@]} files: the lease returns 8" >&2
fi
total=$(du -cb "${files[@]}" 2>/dev/null | tail -1 | cut -f1)
if [ "${total:-0}" -gt $((64 * 1024 * 1024)) ]; then
  echo "pack_out: WARNING: $total bytes together: the lease returns 64 MiB" >&2
fi
echo "pack_out: $OUT holds ${#files[@]} files: ${files[*]}"
