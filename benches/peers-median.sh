#!/usr/bin/env bash
# The median of each peers.sh case over its runs (RUNS=3 gives three rows per case and body):
# req/s, p50, p99 and proxy CPU per response. Rows as in peers.sh's results table.
#
#   bash benches/peers-median.sh [/tmp/proxybench/results.txt]
set -euo pipefail
in=${1:-/tmp/proxybench/results.txt}
printf '%-17s %-4s %5s %8s %7s %7s %7s\n' case body runs req/s p50ms p99ms us/req
awk 'NR > 1 && NF >= 12 { k = $1 " " $2; if (!(k in n)) order[++m] = k
       n[k]++; rps[k, n[k]] = $4; p50[k, n[k]] = $5; p99[k, n[k]] = $6; us[k, n[k]] = $10 }
     function med(a, k, c,   i, j, t, v) {
       for (i = 1; i <= c; i++) v[i] = (a[k, i] == "-") ? -1 : a[k, i] + 0
       for (i = 2; i <= c; i++) for (j = i; j > 1 && v[j-1] > v[j]; j--) { t = v[j]; v[j] = v[j-1]; v[j-1] = t }
       return c % 2 ? v[(c + 1) / 2] : (v[c / 2] + v[c / 2 + 1]) / 2 }
     END { for (i = 1; i <= m; i++) { k = order[i]; split(k, f, " "); u = med(us, k, n[k])
       printf "%-17s %-4s %5d %8.0f %7.2f %7.2f %7s\n", f[1], f[2], n[k], med(rps, k, n[k]),
         med(p50, k, n[k]), med(p99, k, n[k]), u < 0 ? "-" : sprintf("%.1f", u) } }' "$in"
