#!/usr/bin/env bash
# Checks that the modules under src/server/ do not import each other in a cycle.
#
#   scripts/check-server-cycles.sh          # prints each module's imports, then the verdict
#   scripts/check-server-cycles.sh -q       # the verdict only
#
# A module is one file (`src/server/native/jobs.rs` is `server::native::jobs`,
# a `mod.rs` is its folder). A module imports another when its code names it
# through `crate::server::…`, `super::…`, `self::…` or a child module declared
# with `mod x;` (in `use` lines and inline paths alike, `{…}` groups expanded).
# Declaring a child (`mod x;`) is not an import; `#[cfg(test)] mod tests`
# blocks and comments are not read. The edges go through `tsort`, which names
# the modules of any loop. Exit status: 0 without a cycle, 1 with one.
#
# Needs only bash, awk (POSIX; mawk or gawk) and tsort (coreutils).
set -euo pipefail

cd "$(dirname "$0")/.."
quiet=${1:-}

modules=$(find src/server -name '*.rs' | sort | sed -e 's#^src/##' -e 's#\.rs$##' -e 's#/mod$##' -e 's#/#::#g')

edges=$(
    for file in $(find src/server -name '*.rs' | sort); do
        module=$(printf '%s\n' "$file" | sed -e 's#^src/##' -e 's#\.rs$##' -e 's#/mod$##' -e 's#/#::#g')
        awk -v module="$module" -v modules="$modules" '
            function parent(m,    i) {
                i = last_sep(m)
                return i ? substr(m, 1, i - 1) : ""
            }
            function last_sep(m,    i, found) {
                found = 0
                for (i = 1; i < length(m); i++) if (substr(m, i, 2) == "::") found = i
                return found
            }
            # Resolves `base` followed by the segments of `rest` (joined by ::) to the
            # deepest module that exists, and records the edge.
            function edge(base, rest,    n, segs, i, target) {
                target = base
                n = split(rest, segs, "::")
                for (i = 1; i <= n; i++) {
                    if (segs[i] == "" || segs[i] == "*") break
                    if ((target "::" segs[i]) in known) target = target "::" segs[i]
                    else break
                }
                if (target != module && target != "") print module, target
            }
            # Reads one path starting at position p of `text` (after a prefix that
            # resolved to `base` with segments `rest` so far); expands `{...}` groups.
            function path_at(p, base, rest,    c, ident, depth, start, item, q) {
                while (substr(text, p, 1) == " ") p++
                if (substr(text, p, 1) == "{") return group_at(p, base, rest)
                while (1) {
                    ident = ""
                    while (p <= length(text) && substr(text, p, 1) ~ /[A-Za-z0-9_*]/) {
                        ident = ident substr(text, p, 1); p++
                    }
                    if (ident != "") rest = (rest == "" ? ident : rest "::" ident)
                    while (substr(text, p, 1) == " ") p++
                    if (substr(text, p, 2) == "::") {
                        p += 2
                        while (substr(text, p, 1) == " ") p++
                        if (substr(text, p, 1) == "{") return group_at(p, base, rest)
                        continue
                    }
                    edge(base, rest)
                    return p
                }
            }
            # Reads a `{a, b::c, ...}` group at position p; each item continues the path.
            function group_at(p, base, rest,    c, depth, start, q) {
                depth = 1; p++; start = p
                while (p <= length(text) && depth > 0) {
                    c = substr(text, p, 1)
                    if (c == "{") depth++
                    else if (c == "}") depth--
                    if ((c == "," && depth == 1) || depth == 0) {
                        q = item_start(start)
                        if (q < p) path_at(q, base, rest)
                        start = p + 1
                    }
                    p++
                }
                return p
            }
            function item_start(q) {
                while (substr(text, q, 1) ~ /[ \t]/) q++
                return q
            }
            BEGIN {
                n = split(modules, list, "\n")
                for (i = 1; i <= n; i++) known[list[i]] = 1
                text = ""
            }
            /^[ \t]*(pub(\([a-z]+\))? )?mod tests[ \t]*\{/ { stopped = 1 }
            stopped { next }
            {
                line = $0
                sub(/^[ \t]*\/\/.*$/, "", line)
                sub(/[ \t;,)]\/\/.*$/, "", line)
                if (match(line, /^[ \t]*(pub(\([a-z]+\))? )?mod [A-Za-z0-9_]+;/)) {
                    decl = line
                    sub(/^[ \t]*(pub(\([a-z]+\))? )?mod /, "", decl)
                    sub(/;.*$/, "", decl)
                    children[decl] = 1
                    next
                }
                text = text " " line
            }
            END {
                L = length(text)
                for (p = 1; p <= L; p++) {
                    c = substr(text, p, 1)
                    if (c !~ /[A-Za-z_]/) continue
                    if (p > 1 && substr(text, p - 1, 1) ~ /[A-Za-z0-9_:]/) continue
                    q = p
                    word = ""
                    while (q <= L && substr(text, q, 1) ~ /[A-Za-z0-9_]/) { word = word substr(text, q, 1); q++ }
                    if (substr(text, q, 2) != "::") { p = q; continue }
                    if (word == "crate" && substr(text, q + 2, 8) == "server::") {
                        p = path_at(q + 10, "server", "")
                    } else if (word == "crate" && substr(text, q + 2, 6) == "server" && substr(text, q + 8, 1) !~ /[A-Za-z0-9_]/) {
                        print module, "server"; p = q + 8
                    } else if (word == "super") {
                        base = parent(module); r = q + 2
                        while (substr(text, r, 7) == "super::") { base = parent(base); r += 7 }
                        p = path_at(r, base, "")
                    } else if (word == "self") {
                        p = path_at(q + 2, module, "")
                    } else if (word in children) {
                        p = path_at(p, module, "")
                    } else {
                        p = q
                    }
                }
            }
        ' "$file"
    done | sort -u
)

if [ "$quiet" != "-q" ]; then
    echo "imports between src/server modules (module -> what it imports):"
    for m in $modules; do
        targets=$(printf '%s\n' "$edges" | awk -v m="$m" '$1 == m { printf "%s ", $2 }')
        printf '  %-28s -> %s\n' "$m" "${targets:-(none)}"
    done
fi

if out=$( { printf '%s\n' "$edges"; printf '%s %s\n' $(printf '%s\n' $modules | sed 's/.*/& &/'); } | tsort 2>&1 >/dev/null); then
    echo "no import cycle in src/server ($(printf '%s\n' $modules | wc -l) modules, $(printf '%s\n' "$edges" | grep -c . || true) imports)"
else
    echo "import cycle in src/server:"
    printf '%s\n' "$out" | sed -e 's/^tsort: -: input contains a loop:/  loop:/' -e 's/^tsort: /  /'
    exit 1
fi
