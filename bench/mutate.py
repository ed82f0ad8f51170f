"""A mutation pass: does the suite catch the one-line bugs a reader could copy out of the method code?

    python3 bench/mutate.py [--only N,N,...] [--timeout S] [--check]

bench/mutations.txt lists plausible one-line bugs in the method part of gan.py, lapgan.py and vaegan.py
(above each script's Appendix line). The whole tree is copied once into a temporary folder (the real files
are never written); there each bug is put in on its own, the tests that concern it are run
(`pytest -x test_gans.py -k EXPR`), and the file is put back. A bug is caught when a test fails (or the
run times out); it survives when the tests pass. Before the bugs, the same tests run once on the clean copy,
so that a failure can only be the bug's doing. The last line: `caught N of M`.

Each entry of the list, entries separated by a blank line, lines starting with '#' ignored:
    SCRIPT: one-line description
    k: the -k expression naming the tests to run
    - the original fragment (it must occur exactly once in SCRIPT, above its Appendix line)
    + its replacement
--check only checks the list against the scripts. This tool imports nothing of the scripts.
"""
import argparse, os, re, shutil, subprocess, sys, tempfile, time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIST = os.path.join(ROOT, "bench", "mutations.txt")
APPENDIX = re.compile(r"^# -+ Appendix", re.M)  # the line that ends a script's method part
SKIP = shutil.ignore_patterns(".git", "__pycache__", "*.pyc", ".pytest_cache", "out", "data", "_wip_*")


@dataclass
class Mutation:
    number: int  # its place in the list, from 1
    script: str  # gan.py, lapgan.py or vaegan.py
    what: str  # the one-line description
    tests: str  # pytest's -k expression
    old: str  # the original fragment
    new: str  # its replacement


def read_list(path=LIST):
    """The entries of the list, in order. A malformed entry is an error naming it."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    blocks = [b for b in "\n".join(lines).split("\n\n") if b.strip()]
    out = []
    for i, block in enumerate(blocks, 1):
        rows = block.strip("\n").split("\n")
        tags = [row[:2] for row in rows]
        if len(rows) != 4 or tags[1:] != ["k:", "- ", "+ "] or ": " not in rows[0]:
            sys.exit(f"error: entry {i} of {path} is not 'SCRIPT: what', 'k: EXPR', '- OLD', '+ NEW'")
        script, what = rows[0].split(": ", 1)
        out.append(Mutation(i, script, what, rows[1][2:].strip(), rows[2][2:], rows[3][2:]))
    return out


def problem(m, root=ROOT):
    """Why mutation m cannot be applied to the scripts under root, or None when it can."""
    path = os.path.join(root, m.script)
    if not os.path.isfile(path):
        return f"{m.script} does not exist"
    with open(path, encoding="utf-8") as f:
        text = f.read()
    count = text.count(m.old)
    if count != 1:
        return f"its fragment occurs {count} times in {m.script}, not once: {m.old!r}"
    end = APPENDIX.search(text)
    if end is None or text.index(m.old) > end.start():
        return f"its fragment is not above the Appendix line of {m.script}"
    if m.old == m.new:
        return "its replacement is the fragment itself"
    return None


def run_tests(folder, expr, timeout):
    """-> 'passed', 'failed', 'timeout', 'no test matches -k' or 'error: ...' for `pytest -k expr`."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "test_gans.py", "-k", expr]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}  # no stale .pyc
    try:
        r = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout"
    if r.returncode == 0:
        return "passed"
    if r.returncode == 1:
        return "failed"
    if r.returncode == 5:
        return "no test matches -k"
    last = (r.stdout.strip().splitlines() or ["no output"])[-1]
    return f"error: pytest exit {r.returncode} ({last})"  # 2, 3, 4: the run itself broke


def mutate(folder, m, timeout):
    """Puts m into the copy, runs its tests, puts the file back. -> the outcome."""
    path = os.path.join(folder, m.script)
    with open(path, encoding="utf-8") as f:
        original = f.read()
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(original.replace(m.old, m.new))
        return run_tests(folder, m.tests, timeout)
    finally:
        with open(path, "w", encoding="utf-8") as f:
            f.write(original)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", help="comma-separated entry numbers (from 1) to run; default: all")
    p.add_argument("--timeout", type=float, default=300, help="seconds per test run (default 300)")
    p.add_argument("--check", action="store_true", help="only check that every entry applies once")
    args = p.parse_args(argv)
    muts = read_list()
    bad = [f"entry {m.number} ({m.script}: {m.what}): {why}" for m in muts if (why := problem(m))]
    if bad:
        sys.exit("error: the list does not fit the scripts; fix these entries:\n  " + "\n  ".join(bad))
    if args.only:
        wanted = {int(n) for n in args.only.split(",")}
        muts = [m for m in muts if m.number in wanted]
    if args.check or not muts:
        print(f"{len(muts)} mutations, each applying exactly once")
        return 0
    with tempfile.TemporaryDirectory(prefix="mutate-") as tmp:
        folder = os.path.join(tmp, "tree")
        shutil.copytree(ROOT, folder, ignore=SKIP)
        every = " or ".join(f"({m.tests})" for m in muts)
        clean = run_tests(folder, every, args.timeout * 2)
        if clean != "passed":
            sys.exit(f"error: the chosen tests do not pass on the unchanged code ({clean}); fix that first")
        caught = 0
        for m in muts:
            start = time.time()
            outcome = mutate(folder, m, args.timeout)
            if outcome.startswith("error"):
                sys.exit(f"error: entry {m.number}: {outcome}; check its -k expression: {m.tests}")
            hit = outcome in ("failed", "timeout")
            caught += hit
            verdict = "caught  " if hit else "SURVIVED"
            note = "" if outcome in ("failed", "passed") else f" ({outcome})"
            took = f"[{time.time() - start:.0f} s]"
            print(f"{verdict} {m.number:2d} {m.script}: {m.what}{note} {took}", flush=True)
    print(f"caught {caught} of {len(muts)}")
    return 0 if caught == len(muts) else 1


if __name__ == "__main__":
    sys.exit(main())
