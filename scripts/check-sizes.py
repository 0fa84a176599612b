#!/usr/bin/env python3
"""House rule check: no source file over 800 lines and no function over 100 lines, outside
tests. Scans every crate's src/ (not tests/, benches/, fuzz/, or `#[cfg(test)]` modules).
A function's length runs from its `fn` line to its closing brace (brace depth, with strings,
chars and comments skipped). Exits 1 and lists every violation."""
import pathlib, re, sys

MAX_FILE, MAX_FN = 800, 100
root = pathlib.Path(__file__).resolve().parent.parent
FN = re.compile(r'^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?(extern\s+"C"\s+)?fn\s+(\w+)')


def strip(line, state):
    """The line without comments and string/char literals; `state` carries a block comment."""
    out, i = [], 0
    while i < len(line):
        if state['block']:
            j = line.find('*/', i)
            if j < 0:
                return ''.join(out)
            state['block'], i = False, j + 2
            continue
        c = line[i]
        if line.startswith('//', i):
            break
        if line.startswith('/*', i):
            state['block'], i = True, i + 2
            continue
        if c == '"':
            j = i + 1
            while j < len(line) and line[j] != '"':
                j += 2 if line[j] == '\\' else 1
            i = j + 1
            continue
        if c == "'" and re.match(r"'(\\.|[^\\'])'", line[i:]):
            i += len(re.match(r"'(\\.|[^\\'])'", line[i:]).group(0))
            continue
        out.append(c)
        i += 1
    return ''.join(out)


def check(path):
    bad = []
    lines = path.read_text().split('\n')
    # Lines of `#[cfg(test)]` items are not counted.
    code, skip_depth, depth, state, pending_test = [], None, 0, {'block': False}, False
    fns = []  # (name, start, depth at start)
    for n, raw in enumerate(lines, 1):
        s = strip(raw, state)
        if skip_depth is None and raw.strip().startswith('#[cfg(test)]'):
            pending_test = True
        if skip_depth is None and pending_test and '{' in s:
            skip_depth, pending_test = depth, False
        elif skip_depth is None and pending_test and s.strip().endswith(';'):
            pending_test = False
        if skip_depth is None:
            code.append(n)
            m = FN.match(s)
            if m and not s.rstrip().endswith(';'):
                fns.append((m.group(7), n, depth))
        for c in s:
            if c == '{':
                depth += 1
            elif c == '}':
                depth -= 1
                if skip_depth is not None and depth == skip_depth:
                    skip_depth = None
                while fns and depth == fns[-1][2] and '}' in s:
                    name, start, _ = fns.pop()
                    if n - start + 1 > MAX_FN:
                        bad.append(f'{path.relative_to(root)}:{start}: fn {name} is {n - start + 1} lines (max {MAX_FN})')
                    break
    if len(code) > MAX_FILE:
        bad.append(f'{path.relative_to(root)}: {len(code)} lines outside tests (max {MAX_FILE})')
    return bad


def main():
    bad = []
    for src in sorted(root.glob('*/src')) + sorted(root.glob('*/*/src')):
        if 'target' in src.parts or 'fuzz' in src.parts:
            continue
        for f in sorted(src.rglob('*.rs')):
            if 'tests' in f.relative_to(src).parts:
                continue
            bad += check(f)
    print('\n'.join(bad) if bad else 'sizes: every file <= 800 lines and every fn <= 100 lines (outside tests)')
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
