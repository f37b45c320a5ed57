#!/usr/bin/env python3
"""cuda-sim: rewrites a .cu file into C++ that g++ compiles (with include/cuda_sim_device.h).

  kernel<<<grid, block[, smem[, stream]]>>>(args)
      -> ::pyr_sim::launch(kernel, "kernel", grid, block[, smem[, stream]])(args)
  extern __shared__ T name[];
      -> T* name = static_cast<T*>(::pyr_sim::dynamic_smem());
  __shared__ T name[N][M];
      -> auto& name = ::pyr_sim::block_shared<T[N][M], __COUNTER__>();
         (storage the runtime fills with 0xFF bytes at every block start; declarations of
         other forms stay `static thread_local', unpoisoned, with a warning)

`kernel' is a name, possibly qualified and with template arguments (k<T, 4>). Comments and
string literals are left alone. Line numbers are kept (and a #line points at the original),
so compiler messages name the real source.

usage: rewrite_launches.py IN.cu OUT.cpp
"""
import re
import sys


def code_mask(src):
    """A copy of src with comments and string/char literals blanked (newlines kept)."""
    out = list(src)
    i, n = 0, len(src)
    while i < n:
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
        elif src[i] in "\"'":
            j = i + 1
            while j < n and src[j] != src[i]:
                j += 2 if src[j] == "\\" else 1
            j += 1
        else:
            i += 1
            continue
        for k in range(i, min(j, n)):
            if out[k] != "\n":
                out[k] = " "
        i = j
    return "".join(out)


def kernel_start(code, end):
    """Start index of the kernel expression that ends just before `end` (the <<<)."""
    i = end
    while i > 0 and code[i - 1].isspace():
        i -= 1
    if i > 0 and code[i - 1] == ">":  # template arguments: back to the matching <
        depth = 0
        while i > 0:
            i -= 1
            if code[i] == ")":  # a parenthesised argument may hold < or >
                parens = 1
                while parens and i > 0:
                    i -= 1
                    parens += {")": 1, "(": -1}.get(code[i], 0)
                continue
            depth += {">": 1, "<": -1}.get(code[i], 0)
            if depth == 0:
                break
        if depth != 0:
            raise ValueError("unbalanced template arguments before <<<")
    while i > 0 and (code[i - 1].isalnum() or code[i - 1] in "_:"):
        i -= 1
    return i


def config_end(code, start):
    """Index of the >>> that closes the launch configuration opened at `start`."""
    depth = 0
    i = start
    while i < len(code):
        c = code[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0 and code.startswith(">>>", i):
            return i
        i += 1
    raise ValueError("launch configuration without >>>")


ALIGN = r"(?:__align__\s*\(\s*\d+\s*\)\s*)?"
EXTERN_SHARED = re.compile(
    r"extern\s+__shared__\s+" + ALIGN + r"([A-Za-z_][\w:\s]*?)\s*" + ALIGN + r"\b(\w+)\s*\[\s*\]\s*;")


SHARED = re.compile(
    r"__shared__\s+" + ALIGN + r"([A-Za-z_][\w:\s<>*]*?)\s*" + ALIGN + r"\b(\w+)\s*((?:\[[^\]]+\]\s*)*);")


def rewrite(src):
    code = code_mask(src)
    edits = []  # (start, end, replacement), non-overlapping
    for m in re.finditer(r"<<<", code):
        lt = m.start()
        if edits and lt < edits[-1][1]:
            continue
        k0 = kernel_start(code, lt)
        kernel = src[k0:lt].strip()
        if not kernel or not re.match(r"[A-Za-z_:]", kernel):
            raise ValueError(f"line {src.count(chr(10), 0, lt) + 1}: no kernel name before <<<")
        gt = config_end(code, lt + 3)
        config = src[lt + 3:gt]
        name = " ".join(kernel.split()).replace("\\", "")
        # the configuration verbatim: it keeps its line breaks (and their backslashes in a
        # macro body)
        edits.append((k0, gt + 3, f'::pyr_sim::launch({src[k0:lt]}, "{name}", {config})'))
    for m in EXTERN_SHARED.finditer(code):
        t, name = " ".join(m.group(1).split()), m.group(2)
        edits.append((m.start(), m.end(), f"{t}* {name} = static_cast<{t}*>(::pyr_sim::dynamic_smem());"))
    for m in re.finditer(r"\b__shared__\b", code):
        if any(a <= m.start() < b for a, b, _ in edits):  # extern __shared__
            continue
        d = SHARED.match(code, m.start())
        if not d:
            line = src.count("\n", 0, m.start()) + 1
            print(f"warning: line {line}: __shared__ declaration left unpoisoned", file=sys.stderr)
            continue
        t, name, dims = d.group(1).strip(), d.group(2), "".join(d.group(3).split())
        edits.append((d.start(), d.end(),
                      f"auto& {name} = ::pyr_sim::block_shared<{t}{dims}, __COUNTER__>();"))
    edits.sort()
    out, pos = [], 0
    for a, b, text in edits:
        out.append(src[pos:a])
        out.append(text)
        pos = b
    out.append(src[pos:])
    return "".join(out), sum(1 for e in edits if "pyr_sim::launch" in e[2])


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    src_path, out_path = sys.argv[1], sys.argv[2]
    with open(src_path) as f:
        src = f.read()
    try:
        text, launches = rewrite(src)
    except ValueError as e:
        sys.exit(f"{src_path}: {e}")
    with open(out_path, "w") as f:
        f.write(f'#line 1 "{src_path}"\n' + text)
    print(f"rewrote {launches} launches in {src_path}")


if __name__ == "__main__":
    main()
