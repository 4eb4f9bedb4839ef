#!/usr/bin/env bash
# Lists module cycles inside each crate of the workspace (or the crates named): its library,
# or its binary when it has no library.
# cargo-modules draws the crate's `use` graph between modules, and a strongly connected
# component of two or more modules is a cycle. Edges into the crate root are left out (every
# module reaches the root's re-exports). Exits 1 when a cycle is found.
# Needs cargo-modules (`cargo install cargo-modules --locked`; 0.27 for rustc 1.95).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-modules >/dev/null || {
    echo "cargo-modules is required: cargo install cargo-modules --locked" >&2
    exit 2
}
crates=("$@")
if [ ${#crates[@]} -eq 0 ]; then
    for dir in crates/*/; do
        crates+=("$(basename "$dir")")
    done
fi
found=0
for crate in "${crates[@]}"; do
    target=(--lib)
    [ -f "crates/$crate/src/lib.rs" ] || target=(--bin "$crate")
    cargo modules dependencies --package "$crate" "${target[@]}" --no-externs --no-sysroot \
        --no-fns --no-types --no-traits --no-owns 2>/dev/null \
        | /usr/bin/python3 -c '
import re, sys
crate = sys.argv[1].replace("-", "_")
edges = {}
for line in sys.stdin:
    m = re.match(r"\s*\"([^\"]+)\" -> \"([^\"]+)\" \[label=\"uses\"", line)
    if m and crate not in (m.group(1), m.group(2)):
        edges.setdefault(m.group(1), set()).add(m.group(2))
# Tarjan: strongly connected components of two or more modules are cycles.
index, low, stack, on, out, n = {}, {}, [], set(), [], [0]
def visit(v):
    index[v] = low[v] = n[0]; n[0] += 1; stack.append(v); on.add(v)
    for w in edges.get(v, ()):
        if w not in index:
            visit(w); low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        scc = []
        while True:
            w = stack.pop(); on.discard(w); scc.append(w)
            if w == v: break
        if len(scc) > 1: out.append(sorted(scc))
sys.setrecursionlimit(10000)
for v in list(edges):
    if v not in index: visit(v)
for scc in out:
    print(sys.argv[1] + ": cycle: " + " <-> ".join(m.split("::", 1)[1] for m in scc))
sys.exit(1 if out else 0)
' "$crate" || found=1
done
[ "$found" -eq 0 ] && echo "no module cycles in: ${crates[*]}"
exit "$found"
