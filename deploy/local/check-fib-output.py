"""demo-check: did the last run of fib.py in the demo's live log print exactly
the first 20 Fibonacci numbers?  Reads the `shoal watch` rendering: a
`$ python3 ... fib.py` action line, then its `◀ terminal` observation with
indented continuation lines."""
import re
import sys

expected = [0, 1]
while len(expected) < 20:
    expected.append(expected[-1] + expected[-2])

text = re.sub(r"\x1b\[[0-9;]*m", "", open(sys.argv[1], encoding="utf-8", errors="replace").read())
lines = text.splitlines()
runs = []
for i, line in enumerate(lines):
    if not re.search(r"\$ .*python3?\b.*fib\.py", line):
        continue
    for j in range(i + 1, len(lines)):
        if "◀ terminal" in lines[j]:
            out = [lines[j].split("◀ terminal", 1)[1]]
            k = j + 1
            while k < len(lines) and re.match(r"^\s{6,}\S", lines[k]):
                out.append(lines[k])
                k += 1
            runs.append("\n".join(out))
            break
if not runs:
    sys.exit("no run of fib.py in the log")
last = re.sub(r"\[[^\]]*\]", " ", runs[-1])
numbers = [int(n) for n in re.findall(r"-?\d+", last)]
if numbers != expected:
    sys.exit(f"the last run of fib.py printed {numbers}, not the first 20 Fibonacci numbers")
print("fib.py printed the first 20 Fibonacci numbers")
