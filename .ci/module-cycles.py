#!/usr/bin/env python3
"""Prints each module's crate-internal imports and fails on any import cycle between modules.

Usage: module-cycles.py [SRC_DIR]   (default: engine/src)

A module is one .rs file (foo/mod.rs is `foo`). An import is any `use crate::...`, `use
super::...` or inline `crate::a::b` path outside the `#[cfg(test)] mod tests` block, resolved to
the longest module path it names (so `crate::pubsub::hub::Hub` is the module `pubsub::hub`).
Declaring a child module (`mod x;`) is not an import. Exit status 1 if any strongly connected
component has more than one module.
"""
import os
import re
import sys

root = sys.argv[1] if len(sys.argv) > 1 else "engine/src"
mods = {}
for dp, _, fn in os.walk(root):
    for f in fn:
        if f.endswith(".rs"):
            p = os.path.join(dp, f)
            rel = os.path.relpath(p, root)[:-3]
            if rel == "mod" or rel.endswith("/mod"):
                rel = rel[:-4] if rel != "mod" else ""
            mods[rel.replace("/", "::")] = open(p).read()
names = set(mods)


def strip_tests(src):
    i = src.find("#[cfg(test)]\nmod tests")
    return src if i < 0 else src[:i]


def strip_comments(src):
    return re.sub(r"//[^\n]*", "", src)


def expand(tree):
    """Expands a use tree (`a::{b, c::{d}}`) into full paths."""
    tree = "".join(tree.split())
    i = tree.find("{")
    if i < 0:
        return [tree.split(" as ")[0]]
    prefix, body = tree[:i], tree[i + 1 : tree.rfind("}")]
    parts, depth, cur = [], 0, ""
    for ch in body:
        depth += ch == "{"
        depth -= ch == "}"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    out = []
    for p in parts:
        if p:
            out += [prefix + q for q in expand(p)]
    return out


def resolve(path):
    """The longest module named by a `::`-path (relative to the crate root)."""
    segs = [s for s in path.split("::") if s and s != "self"]
    for n in range(len(segs), 0, -1):
        cand = "::".join(segs[:n])
        if cand in names:
            return cand
    return None


edges = {}
for m, src in mods.items():
    src = strip_comments(strip_tests(src))
    here = m.split("::") if m else []
    paths = []
    for blk in re.finditer(r"\buse\s+((?:crate|super)::)", src):
        end = src.index(";", blk.end())  # use trees hold no `;`
        paths += expand(src[blk.start(1) : end])
    rest = re.sub(r"\buse\s+(?:crate|super)::[^;]*;", "", src)
    paths += re.findall(r"\bcrate(?:::\w+)+", rest)
    deps = set()
    for p in paths:
        segs = p.split("::")
        if segs[0] == "crate":
            full = segs[1:]
        else:  # super::
            base = here[:-1] if not os.path.exists(os.path.join(root, *here, "mod.rs")) else here
            while segs and segs[0] == "super":
                segs = segs[1:]
                base = base[:-1]
            full = base + segs
        d = resolve("::".join(full))
        if d is not None and d != m and d != "lib":
            deps.add(d)
    edges[m or "lib"] = deps

for m in sorted(edges):
    print(m, "->", " ".join(sorted(edges[m])))

index, low, stack, on, comps, counter = {}, {}, [], set(), [], [0]


def strongconnect(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in edges.get(v, ()):
        if w not in index:
            strongconnect(w)
            low[v] = min(low[v], low[w])
        elif w in on:
            low[v] = min(low[v], index[w])
    if low[v] == index[v]:
        comp = []
        while True:
            w = stack.pop()
            on.discard(w)
            comp.append(w)
            if w == v:
                break
        if len(comp) > 1:
            comps.append(sorted(comp))


sys.setrecursionlimit(10000)
for v in sorted(edges):
    if v not in index:
        strongconnect(v)
print("cycles (SCCs):", comps)
sys.exit(1 if comps else 0)
