#!/usr/bin/env python3
"""Prints the import graph between the top-level modules of a Rust crate's
source folder (which module names `crate::other`), and exits 1 if any of
them import each other in a cycle. Test modules (`#[cfg(test)] mod tests`)
are left out: a unit test may reach anywhere.

Usage: python3 .ci/modcycles.py src [cli/src bench/src ...]
"""
import os
import re
import sys


def graph(root):
    mods = set()
    for entry in os.listdir(root):
        path = os.path.join(root, entry)
        if entry.endswith(".rs") and entry not in ("lib.rs", "main.rs"):
            mods.add(entry[:-3])
        elif os.path.isdir(path) and entry != "bin":
            mods.add(entry)
    edges = {m: set() for m in mods}
    for m in mods:
        files = []
        folder = os.path.join(root, m)
        if os.path.isdir(folder):
            for d, _, fs in os.walk(folder):
                files += [os.path.join(d, f) for f in fs if f.endswith(".rs")]
        if os.path.exists(folder + ".rs"):
            files.append(folder + ".rs")
        for f in files:
            text = open(f, encoding="utf-8").read()
            cut = text.find("#[cfg(test)]\nmod tests")
            if cut >= 0:
                text = text[:cut]
            names = re.findall(r"crate::(\w+)", text)
            for group in re.findall(r"crate::\{([^}]*)\}", text):
                names += re.findall(r"(?:^|,)\s*(\w+)", group)
            edges[m] |= {n for n in names if n in mods and n != m}
    return edges


def cycles(edges):
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def main():
    failed = False
    for root in sys.argv[1:] or ["src"]:
        edges = graph(root)
        print(f"== {root}")
        for m in sorted(edges):
            print(f"{m} -> {', '.join(sorted(edges[m]))}")
        found = cycles(edges)
        print("cycles:", found if found else "none")
        failed |= bool(found)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
