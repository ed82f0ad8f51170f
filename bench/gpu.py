"""Everything README's Speed section measures on a GPU, in one command that ends within 8 minutes.

    python3 bench/gpu.py --out out/gpu [--examples DIR]    # a CUDA machine with PyTorch; no network needed
    python3 bench/gpu.py --out out/gpu-dry --dry-run       # the same parts, tiny, on the CPU in a minute

Each part runs in processes of its own, each with a time limit (an out-of-memory, a crash or a hang ends
that run only), and writes under OUT (logs/ holds every run's output, with times; a second try replaces
OUT's logs/ and lapgan-* runs); the report is printed as README-ready markdown and written to OUT/report.md:

  a. speed: bench/bench.py for each script with --cuda: fp32, --amp and --amp --compile, at batch 64 and at
     a large batch (1024, halved while CUDA runs out of memory): images/s, ms/step and peak memory.
  b. compare: bench/compare_dcgan.py --accel against pytorch/examples' dcgan/main.py from --examples DIR
     (a checkout at a pinned commit; needs torchvision), and the ratio; skipped with a line without it.
  c. lapgan: `lapgan.py --dataset cifar10 --cuda`, the paper's schedule, on a generated file in CIFAR-10's
     official python format and size (OUT/data). The first --lapgan-epochs epochs run (the first E epochs of
     a 25-epoch run are the same steps), and the 25 epochs are projected from them; then with --amp
     --compile. lapgan.py accepts only the official checksums: the process this command starts for the run
     adds the generated file's checksums to its own copy of lapgan.CIFAR_MD5 before calling lapgan.main.
     There is no flag or variable for it, so a plain `lapgan.py --dataroot OUT/data` refuses the file.
  d. profile: torch.profiler's ten costliest kernels in one LAPGAN and one DCGAN training step, and the
     DCGAN step's model FLOP utilisation (MFU): FLOPs counted by torch.utils.flop_counter over the measured
     step time, over the GPU's dense bf16 peak (BF16_PEAK_TFLOPS by name, or --peak-tflops).

--variants adds speed rows for bench.py's GPU experiments (channels-last, fused-opt, cuda-graphs,
merge-steps) at batch 64 with --amp, for the GPU run to decide whether the scripts should take them.
--dry-run runs every part's code on the CPU with tiny networks, steps and data (fp32; --compile is left
out, as compiling on a small CPU takes minutes), so that the command does not meet its first bug on a GPU.
"""
import argparse, datetime, hashlib, importlib.util, io, json, os, pickle, platform, re, shutil, signal
import subprocess, sys, tarfile, threading, time
from dataclasses import dataclass, field
import numpy as np
import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
sys.path[:0] = [ROOT, BENCH]
import bench  # noqa: E402  (bench/bench.py)
import lapgan  # noqa: E402

BF16_PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312}  # dense (no sparsity), by a part of the name
PAPER_EPOCHS = lapgan.make_parser().get_default("epochs")  # lapgan.py's default: the paper's schedule
NETWORKS = {  # script -> (README's name for it, its flags in the Speed table)
    "gan": ("gan.py DCGAN 64x64 (= pytorch/examples)",
            "--dataset cifar10 --image-size 64 --ngf 64 --ndf 64 --nz 100".split()),
    "lapgan": ("lapgan.py CIFAR-10 8-14-28, paper nets, all levels", ["--dataset", "cifar10"]),
    "vaegan": ("vaegan.py 64x64, paper nets (width 64)", ["--dataset", "folder"])}
TINY = {"gan": "--ngf 8 --ndf 8 --image-size 32".split(), "lapgan": "--width-g 8 --width-d 8".split(),
        "vaegan": "--width 8 --image-size 32".split()}  # the dry run's networks
VARIANTS = {"channels-last": ["--amp"], "fused-opt": ["--amp"], "cuda-graphs": ["--amp", "--compile"],
            "merge-steps": ["--amp"]}  # bench.py's experiment -> the mode it is tried in
CIFAR_CLASSES = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship",
                 b"truck"]
PROGRESS = re.compile(r"\[e (\d+)/\d+ it (\d+)/(\d+)\]")  # the scripts' progress line
RATE = re.compile(r"([\d.]+) img/s, ([\d.]+) ms/step, peak memory (.+)$")  # bench.py's first line


def fail(msg):
    raise SystemExit(f"error: {msg}")


@dataclass
class Plan:
    """What this command measures: the GPU's sizes, or the dry run's tiny ones on the CPU."""
    out: str              # the output folder
    dry: bool             # the CPU dry run
    device: list          # the scripts' device flag: ["--cuda"], or [] on the CPU
    batches: tuple        # the Speed table's batches: 64, then the large one (halved while out of memory)
    steps: tuple          # timed bench.py steps at each of those batches
    modes: list           # the Speed table's modes, as script flags
    lapgan_modes: list    # the modes of the CIFAR-10 runs
    cifar: tuple          # generated CIFAR-10 images: (train, test)
    epochs: int           # lapgan epochs run; the rest of the paper's schedule is projected
    extra: dict           # script -> flags added to every run of it (the dry run's tiny networks)
    lapgan_extra: list    # flags added to the CIFAR-10 runs (the dry run's small batch and selection)
    limits: dict          # a run's or a part's name -> its seconds
    peak: float = None    # the device's dense bf16 peak in FLOP/s, when known
    rates: dict = field(default_factory=dict)  # (script, mode, batch) -> images/s measured in part a


def make_plan(args):
    if args.dry_run:
        return Plan(args.out, dry=True, device=[], batches=(8, 16), steps=(3, 2), modes=[[]],
                    lapgan_modes=[[]], cifar=(80, 32), epochs=2, extra=TINY,
                    lapgan_extra=["--batch-size", "16", "--select", "16", "--width-g", "8", "--width-d", "8"],
                    limits={"speed": 120, "fp32": 60, "compile": 60, "compare": 120, "lapgan": 120,
                            "lapgan_run": 60, "profile": 90},
                    peak=args.peak_tflops and args.peak_tflops * 1e12)
    if not torch.cuda.is_available():
        fail("PyTorch sees no CUDA GPU; run on a GPU machine, or add --dry-run to try the command on the CPU")
    return Plan(args.out, dry=False, device=["--cuda"], batches=(64, 1024), steps=(50, 20),
                modes=[[], ["--amp"], ["--amp", "--compile"]], lapgan_modes=[[], ["--amp", "--compile"]],
                cifar=(50000, 10000), epochs=args.lapgan_epochs, extra={}, lapgan_extra=[],
                limits={"speed": 200, "fp32": 40, "compile": 90, "compare": 50, "lapgan": 160,
                        "lapgan_run": 85, "profile": 45},  # 455 s in all, within --budget's 470
                peak=bf16_peak(args.peak_tflops))


def bf16_peak(typed):
    """FLOP/s: --peak-tflops, else the table's figure for this GPU's name, else None (MFU is not given)."""
    if typed:
        return typed * 1e12
    name = torch.cuda.get_device_name(0)
    return next((t * 1e12 for key, t in BF16_PEAK_TFLOPS.items() if key in name), None)


@dataclass
class Part:
    """One part of the report: its heading, its time, its markdown lines and what became of it."""
    title: str                # the report's heading
    deadline: float           # time.perf_counter() by which it ends
    lines: list = field(default_factory=list)  # markdown for the report
    notes: list = field(default_factory=list)  # failures, time-outs and skips, for the summary
    seconds: float = 0.0      # the part's wall time

    def left(self, cap):
        """Seconds the next run may take: cap, or what is left of the part's time if that is less."""
        return min(cap, self.deadline - time.perf_counter())


@dataclass
class Ran:
    """One child process, finished or stopped at its time limit."""
    rc: int           # exit status; None when it was stopped at its limit
    lines: list       # (seconds since its start, line) of its stdout and stderr
    seconds: float    # its wall time

    def tail(self):
        """Its last line of output, for a report row that says why it failed."""
        return self.lines[-1][1].strip() if self.lines else "(no output)"


# ------------------------------------------------------------------------------------ running children
def run_child(cmd, limit, log_path):
    """cmd in its own process group, ended with everything it started after `limit` seconds. Every line it
    prints is kept with the time it arrived (its Python unbuffered) and written to log_path. A limit under a
    second starts nothing."""
    start = time.perf_counter()
    if limit < 1:
        return Ran(None, [], 0.0)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=env, start_new_session=True)
    lines = []

    def read():
        for line in proc.stdout:
            lines.append((time.perf_counter() - start, line.rstrip("\n")))
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=max(limit, 0.1))
    except subprocess.TimeoutExpired:
        rc = None
    try:  # also what it started and left behind (compile workers, say): nothing holds the GPU afterwards
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    reader.join(10)
    with open(log_path, "w") as f:
        f.write(" ".join(cmd) + "\n" + "".join(f"{t:8.2f}  {line}\n" for t, line in lines))
        f.write(f"exit status {rc} after {time.perf_counter() - start:.1f} s\n")
    return Ran(rc, lines, time.perf_counter() - start)


def child(func, *params):
    """A command that runs gpu.FUNC(*params) in a fresh Python: this file's own code, no script's flag."""
    code = f"import sys; sys.path.insert(0, {BENCH!r}); import gpu; gpu.{func}(*sys.argv[1:])"
    return [sys.executable, "-c", code, *map(str, params)]


def outcome(ran, limit):
    """A failed or stopped run in a few words; None when it succeeded."""
    if ran.rc is None and not ran.seconds:
        return "not started: the part's time was spent"
    if ran.rc is None:
        return f"stopped at its time limit ({limit:.0f} s)"
    return None if ran.rc == 0 else f"failed: {ran.tail()[:120]}"


def log_path(plan, name):
    return os.path.join(plan.out, "logs", re.sub(r"[^\w.+-]+", "_", name) + ".log")


# ------------------------------------------------------------------------------------ a. speed
def bench_command(plan, name, flags, batch):
    steps = plan.steps[plan.batches.index(batch)] if batch in plan.batches else plan.steps[-1]
    return ["python3", "bench/bench.py", name, *NETWORKS[name][1], *plan.extra.get(name, []), *plan.device,
            *flags, "--batch-size", str(batch), "--steps", str(steps)]


def time_config(plan, part, name, flags, batch):
    """bench.py in a process of its own; a large batch that runs out of CUDA memory is halved (down to
    the first batch). -> (the batch that ran, the Ran, its command, why it failed or None)."""
    limit = plan.limits["compile" if "--compile" in flags else "fp32"]
    while True:
        cmd, left = bench_command(plan, name, flags, batch), part.left(limit)
        ran = run_child([sys.executable] + cmd[1:], left, log_path(plan, " ".join(cmd[2:])))
        memory = any("out of memory" in line.lower() for _, line in ran.lines)
        if ran.rc == 0 or not memory or batch // 2 < plan.batches[0]:
            return batch, ran, cmd, outcome(ran, left)
        batch //= 2


def speed_row(plan, name, flags, batch, ran, cmd, why):
    """A README row: script, network | batch | mode | device | images/s | ms/step | peak memory | command."""
    mode = "+".join(f.lstrip("-") for f in flags) or "fp32"
    device = plan_device_name(plan)
    found = [m for m in (RATE.search(line) for _, line in ran.lines) if m]
    if why or not found:
        return f"| {NETWORKS[name][0]} | {batch} | {mode} | {device} | {why or 'no figures printed'} | | | " \
               f"`{' '.join(cmd)}` |"
    rate, ms, mem = found[0].groups()
    plan.rates[name, mode, batch] = float(rate)
    return f"| {NETWORKS[name][0]} | {batch} | {mode} | {device} | {float(rate):.0f} | {ms} | {mem} | " \
           f"`{' '.join(cmd)}` |"


def speed_configs(plan, variants):
    """(script, flags, batch) in the order they run: every fp32 row first, compilation last, then the
    experiments at the first batch."""
    rows = [(name, mode, batch) for mode in plan.modes for batch in plan.batches for name in NETWORKS]
    if plan.dry:  # to keep it short: each script once, vaegan.py's at the large batch
        rows = [r for r in rows if r[2] == plan.batches[r[0] == "vaegan"]]
    for v in variants:
        mode = [f for f in VARIANTS[v] if plan.device or f != "--compile"]
        rows += [(name, mode + [f"--{v}"], plan.batches[0]) for name in NETWORKS
                 if v != "merge-steps" or name == "lapgan"]
    return rows


def speed(plan, part, args):
    part.lines += ["| script, network | batch | mode | device | images/s | ms/step | peak memory | command |",
                   "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, flags, batch in speed_configs(plan, variants(args)):
        batch, ran, cmd, why = time_config(plan, part, name, flags, batch)
        part.lines.append(speed_row(plan, name, flags, batch, ran, cmd, why))
        if why:
            part.notes.append(f"{name} {' '.join(flags) or 'fp32'} batch {batch}: {why}")


# ------------------------------------------------------------------------------------ b. compare
def compare(plan, part, args):
    """compare_dcgan.py against pytorch/examples' dcgan/main.py in --examples, and its ratio line."""
    main_py = os.path.join(args.examples or "", "dcgan", "main.py")
    if not args.examples or not os.path.isfile(main_py):
        part.lines.append(f"Skipped: no {main_py if args.examples else '--examples DIR'} (a checkout of "
                          f"github.com/pytorch/examples holding dcgan/main.py).")
        return part.notes.append("skipped: no pytorch/examples")
    if importlib.util.find_spec("torchvision") is None:
        part.lines.append("Skipped: pytorch/examples' dcgan/main.py needs torchvision; it is not installed.")
        return part.notes.append("skipped: no torchvision")
    commit = subprocess.run(["git", "-C", args.examples, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "commit unknown"
    sizes = ["--accel", "--repeats", "2"] if plan.device else ["--batch-size", "8", "--repeats", "1"]
    cmd = ["python3", "bench/compare_dcgan.py", args.examples, *sizes]
    left = part.left(plan.limits["compare"])
    ran = run_child([sys.executable] + cmd[1:], left, log_path(plan, "compare_dcgan"))
    ratio = [line for _, line in ran.lines if " ratio " in line]
    why = outcome(ran, left) or (None if ratio else "no ratio printed")
    said = ratio[-1].strip() if ratio else why
    part.lines.append(f"pytorch/examples at {commit}: {said} (`{' '.join(cmd)}`)")
    if why:
        return part.notes.append(why)
    theirs = float(re.search(r"dcgan: ([\d.]+) img/s", ratio[-1]).group(1))
    for (name, mode, batch), rate in plan.rates.items():  # gan.py's other modes, from part a
        if name == "gan" and batch == 64:
            part.lines.append(f"- gan.py {mode}, batch 64 (part a): {rate:.0f} img/s, {rate / theirs:.2f}x "
                              f"theirs")


# ------------------------------------------------------------------------------------ c. lapgan on CIFAR-10
def cifar_batch(rng, n, label):
    """One pickled dict as the official batches hold it: data uint8 n x 3072 (R, G, B planes of 32 x 32
    rows), labels a list of ints. Smooth 8 x 8 blocks enlarged 4 x, so the tarball compresses quickly."""
    blocks = rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8)
    data = blocks.repeat(4, 2).repeat(4, 3).reshape(n, 3072)
    names = [f"generated_{i:05d}.png".encode() for i in range(n)]
    return {b"batch_label": label.encode(), b"labels": rng.integers(0, 10, n).tolist(), b"data": data,
            b"filenames": names}


def write_cifar(root, n_train, n_test, seed=0):
    """A generated cifar-10-python.tar.gz in the official layout (cifar-10-batches-py/data_batch_1..5,
    test_batch, batches.meta; pickles with bytes keys, as Python 2 wrote the official ones, but protocol 3:
    protocol 2 spells bytes through codecs, which the readers refuse). -> {file name: md5} for the tarball
    and each member."""
    rng, per = np.random.default_rng(seed), n_train // 5
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    sizes = [per] * 5 + [n_test]
    blobs = {n: pickle.dumps(cifar_batch(rng, size, n), protocol=3) for n, size in zip(names, sizes)}
    meta = {b"num_cases_per_batch": per, b"label_names": CIFAR_CLASSES, b"num_vis": 3072}
    blobs["batches.meta"] = pickle.dumps(meta, protocol=3)
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "cifar-10-python.tar.gz")
    with tarfile.open(path + ".tmp", "w:gz", compresslevel=1) as t:
        for name, blob in blobs.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size, info.mtime = len(blob), time.time()
            t.addfile(info, io.BytesIO(blob))
    os.replace(path + ".tmp", path)
    sums = {name: hashlib.md5(blob).hexdigest() for name, blob in blobs.items()}
    sums["cifar-10-python.tar.gz"] = lapgan.md5_of(path)
    return sums


def trusted_lapgan(sums_json, *argv):
    """Runs in the process that `lapgan_run` starts, and only there: lapgan.main on the generated file,
    read by lapgan.py's own reader after its checksums are added to this process's lapgan.CIFAR_MD5."""
    lapgan.CIFAR_MD5.update(json.loads(sums_json))
    lapgan.main(list(argv))


def epoch_times(lines):
    """From a run's timed progress lines -> (end of each finished epoch in seconds since the start,
    seconds per step over the last stretch of lines, steps per epoch); None for what the lines lack."""
    marks = []  # (seconds since the start, epoch, step within the epoch, steps per epoch)
    for t, line in lines:
        m = PROGRESS.match(line)
        if m:
            marks.append((t, int(m[1]), int(m[2]), int(m[3])))
    ends = {e: t for t, e, it, n in marks if it == n}
    by_epoch = {}
    for mark in marks:
        by_epoch.setdefault(mark[1], []).append(mark)
    same = ([v for v in by_epoch.values() if len(v) > 1] or [[]])[-1]  # the last epoch with two lines
    per_step = (same[-1][0] - same[0][0]) / (same[-1][2] - same[0][2]) if len(same) > 1 else None
    return ends, per_step, marks[-1][3] if marks else None


def projection(ran):
    """-> (seconds of the first epoch, of a steady one, of the paper's schedule projected; how the steady
    epoch was measured); None for what the run's lines do not give."""
    ends, per_step, steps = epoch_times(ran.lines)
    last = max(ends, default=0)
    if last >= 2:  # steady: the last whole epoch, its start-of-epoch work and its model selection included
        steady, how = ends[last] - ends[last - 1], f"epoch {last}"
    elif per_step:
        steady, how = per_step * steps, "its steps only (no whole second epoch)"
    else:
        return None, None, None, "too few progress lines"
    first = ends.get(1)
    total = None if first is None else first + (PAPER_EPOCHS - 1) * steady
    return first, steady, total, how


def lapgan_run(plan, part, sums, flags):
    """One CIFAR-10 run of lapgan.py in its own process, timed and projected. -> a report row."""
    mode = "+".join(f.lstrip("-") for f in flags) or "fp32"
    outf = os.path.join(plan.out, f"lapgan-{mode}")
    shutil.rmtree(outf, ignore_errors=True)  # this command's own folder from a previous try
    argv = ["--dataset", "cifar10", "--dataroot", os.path.join(plan.out, "data"), *plan.device, *flags,
            "--epochs", str(plan.epochs), "--log-every", "50", "--outf", outf, *plan.lapgan_extra]
    left = part.left(plan.limits["lapgan_run"])
    ran = run_child(child("trusted_lapgan", json.dumps(sums), *argv), left, log_path(plan, f"lapgan-{mode}"))
    first, steady, total, how = projection(ran)
    why = outcome(ran, left)
    if why:
        part.notes.append(f"lapgan {mode}: {why}")
    steps = epoch_times(ran.lines)[2]  # printed only once lapgan.py's reader has accepted the file
    cells = [f"{v:.1f} s" if v is not None else "n/a" for v in (first, steady)]
    projected = f"{total / 60:.1f} min" if total is not None else "n/a"
    command = " ".join(["python3 lapgan.py --dataset cifar10", *plan.device, *flags, *plan.lapgan_extra])
    return f"| {mode} | {plan_device_name(plan)} | {steps or 'none'} | {cells[0]} | {cells[1]} ({how}) | " \
           f"{projected} | {why or 'ok'} | `{command}` |"


def lapgan_part(plan, part, args):
    n_train, n_test = plan.cifar
    start = time.perf_counter()
    sums = write_cifar(os.path.join(plan.out, "data"), n_train, n_test)
    part.lines += [f"Generated {n_train:,} + {n_test:,} CIFAR-10-format images in {plan.out}/data "
                   f"({time.perf_counter() - start:.1f} s). Each run trains the first {plan.epochs} of the "
                   f"paper's {PAPER_EPOCHS} epochs; the {PAPER_EPOCHS}-epoch total is PROJECTED: the first "
                   f"epoch (with start-up and any compilation) + {PAPER_EPOCHS - 1} x the steady epoch.", "",
                   f"The first epoch is timed from the process's start; `steps per epoch` is read from "
                   f"lapgan.py's progress lines, printed once its reader has accepted the file.", "",
                   "| mode | device | steps per epoch | first epoch | steady epoch | 25 epochs, projected | "
                   "outcome | command |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for flags in plan.lapgan_modes:
        part.lines.append(lapgan_run(plan, part, sums, flags))


# ------------------------------------------------------------------------------------ d. profile and MFU
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def warm_step(name, argv, warmup=3):
    """bench.py's training step of a script for these flags, after warm-up. -> (step, args, device)."""
    mod = __import__(name)
    args = mod.get_args(argv)
    device = mod.pick_device(args)
    torch.manual_seed(args.seed)
    run = mod.setup_run(args, device, bench.random_data(args, max(256, 4 * args.batch_size)))
    step = bench.step_function(name, mod, run)
    for _ in range(warmup):
        step()
    sync(device)
    return step, args, device


def kernel_table(title, step, device, top=10):
    """The `top` costliest kernels of one step by self time on the device (on the CPU: operators by CPU
    time), as a markdown table."""
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                    if device.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        step()
        sync(device)
    on = "device" if device.type == "cuda" else "cpu"
    events = [e for e in prof.key_averages() if e.device_type.name.lower() == device.type]
    events.sort(key=lambda e: getattr(e, f"self_{on}_time_total"), reverse=True)
    total = sum(getattr(e, f"self_{on}_time_total") for e in events)
    lines = [f"{title}: {total / 1000:.2f} ms of {'GPU kernels' if on == 'device' else 'CPU operators'} "
             f"in one step", "", "| kernel | calls | self time (ms) | share |", "| --- | --- | --- | --- |"]
    for e in events[:top]:
        t = getattr(e, f"self_{on}_time_total")
        lines.append(f"| `{e.key[:80]}` | {e.count} | {t / 1000:.3f} | {t / max(total, 1e-9):.1%} |")
    return lines + [""]


def step_flops(step):
    """FLOPs of one call of step (forward and backward passes; torch.utils.flop_counter's count)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def seconds_per_step(step, device, n):
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        step()
    sync(device)
    return (time.perf_counter() - start) / n


def mfu_row(argv, flags, batch, steps, peak):
    """| batch | mode | GFLOP per step | ms/step | TFLOP/s | MFU | for the DCGAN step."""
    step, args, device = warm_step("gan", argv + flags + ["--batch-size", str(batch)])
    flops, dt = step_flops(step), seconds_per_step(step, device, steps)
    mfu = f"{flops / dt / peak:.1%}" if peak else "n/a (unknown GPU: give --peak-tflops)"
    mode = "+".join(f.lstrip("-") for f in flags) or "fp32"
    return f"| {batch} | {mode} | {flops / 1e9:.2f} | {dt * 1000:.2f} | {flops / dt / 1e12:.3f} | {mfu} |"


def profile_steps(spec_json):
    """Runs in a process of its own: the kernel tables and the MFU rows, as markdown in OUT/profile.md."""
    spec = json.loads(spec_json)
    lines = []
    steps = (("One DCGAN step (gan.py)", "gan"), ("One LAPGAN step (lapgan.py, all levels)", "lapgan"))
    for title, name in steps:
        step, args, device = warm_step(name, spec["argv"][name] + ["--batch-size", str(spec["batches"][0])])
        lines += kernel_table(f"{title}, batch {args.batch_size}", step, device)
    peak = spec["peak"]
    lines += [f"DCGAN step's model FLOP utilisation over a dense bf16 peak of "
              f"{f'{peak / 1e12:g} TFLOP/s' if peak else 'n/a'}:", "",
              "| batch | mode | GFLOP per step | ms/step | TFLOP/s | MFU |",
              "| --- | --- | --- | --- | --- | --- |"]
    for batch in spec["batches"]:
        for flags in spec["modes"]:
            lines.append(mfu_row(spec["argv"]["gan"], flags, batch, spec["steps"], peak))
    with open(os.path.join(spec["out"], "profile.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def profile_part(plan, part, args):
    argv = {n: NETWORKS[n][1] + plan.extra.get(n, []) + plan.device for n in ("gan", "lapgan")}
    modes = [m for m in plan.lapgan_modes + [["--amp"]] if "--compile" not in m]
    modes = [list(m) for m in dict.fromkeys(map(tuple, modes))]  # each once
    spec = {"argv": argv, "batches": plan.batches, "modes": modes, "steps": plan.steps[0], "peak": plan.peak,
            "out": plan.out}
    path = os.path.join(plan.out, "profile.md")
    if os.path.exists(path):
        os.remove(path)
    left = part.left(plan.limits["profile"])
    ran = run_child(child("profile_steps", json.dumps(spec)), left, log_path(plan, "profile"))
    why = outcome(ran, left)
    if why or not os.path.exists(path):
        part.notes.append(why or "no profile.md written")
        return part.lines.append(f"Not measured: {why or ran.tail()}")
    part.lines += open(path).read().splitlines()


# ------------------------------------------------------------------------------------ the report
PARTS = {"a": ("a. Speed: bench/bench.py", speed, "speed"),
         "b": ("b. Against pytorch/examples' DCGAN: bench/compare_dcgan.py", compare, "compare"),
         "c": ("c. lapgan.py --dataset cifar10, the paper's schedule, on generated CIFAR-10-sized data",
               lapgan_part, "lapgan"),
         "d": ("d. Profile of one training step, and the DCGAN step's MFU", profile_part, "profile")}


def plan_device_name(plan):
    return torch.cuda.get_device_name(0) if plan.device else "CPU"


def driver_version():
    """The NVIDIA driver's version from the kernel module, where nvidia-smi is missing."""
    try:
        found = re.search(r"Kernel Module\s+([\d.]+)", open("/proc/driver/nvidia/version").read())
    except OSError:
        found = None
    return found.group(1) if found else "unknown"


def header(plan):
    """The machine, the software and the date, as the README's Speed rows need them."""
    if plan.device:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True) if shutil.which("nvidia-smi") else None
        driver = smi.stdout.strip().splitlines()[0] if smi and smi.returncode == 0 else driver_version()
        machine = f"{plan_device_name(plan)}, driver {driver}, CUDA {torch.version.cuda}"
    else:
        machine = f"CPU ({platform.machine()}, {os.cpu_count()} cores), DRY RUN: tiny networks, steps, data"
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    return [f"# bench/gpu.py report, {datetime.date.today().isoformat()}", "",
            f"{machine}; PyTorch {torch.__version__}; numpy {np.__version__}; Python "
            f"{platform.python_version()}; code at commit {commit}.", ""]


def summary(done, total):
    lines = ["## Summary", "", "| part | seconds | outcome |", "| --- | --- | --- |"]
    for part in done:
        lines.append(f"| {part.title.split(':')[0]} | {part.seconds:.0f} | {'; '.join(part.notes) or 'ok'} |")
    return lines + ["", f"Total: {total:.0f} s."]


def run_parts(plan, args, start):
    """Each chosen part within its own limit and within what is left of --budget."""
    done = []
    for key in args.parts:
        title, func, limit = PARTS[key]
        began = time.perf_counter()
        part = Part(title, min(began + plan.limits[limit], start + args.budget))
        print(f"--- {title}", flush=True)
        func(plan, part, args)
        part.seconds = time.perf_counter() - began
        print("\n".join(part.lines), flush=True)
        done.append(part)
    return done


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the report, logs, generated data and runs")
    p.add_argument("--examples", help="a checkout of github.com/pytorch/examples (for part b)")
    p.add_argument("--dry-run", action="store_true", help="every part on the CPU, tiny: tests the command")
    p.add_argument("--parts", default="abcd", help="which parts to run, e.g. ac (default abcd)")
    p.add_argument("--budget", type=float, default=470, help="seconds for all parts together")
    p.add_argument("--lapgan-epochs", type=int, default=2, help="CIFAR-10 epochs run (the rest projected)")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, where the table lacks it")
    p.add_argument("--variants", default="", help=f"bench.py's experiments, e.g. {','.join(VARIANTS)}")
    args = p.parse_args(argv)
    checks = [(not args.parts or set(args.parts) - set(PARTS), f"--parts {args.parts!r}: letters of abcd"),
              (set(variants(args)) - set(VARIANTS), f"--variants: choose from {', '.join(VARIANTS)}"),
              (not args.budget > 0, f"--budget {args.budget}: a positive number of seconds"),  # NaN too
              (args.lapgan_epochs < 1, f"--lapgan-epochs {args.lapgan_epochs} must be at least 1"),
              (args.peak_tflops is not None and not args.peak_tflops > 0, "--peak-tflops must be above 0")]
    for bad, msg in checks:
        if bad:
            fail(msg)
    return args


def variants(args):
    """--variants as a list of bench.py's experiments."""
    return [v for v in args.variants.split(",") if v]


def main(argv=None):
    args, start = get_args(argv), time.perf_counter()
    plan = make_plan(args)
    shutil.rmtree(os.path.join(plan.out, "logs"), ignore_errors=True)  # this command's, from a previous try
    try:
        os.makedirs(os.path.join(plan.out, "logs"))
    except OSError as e:
        fail(f"--out {plan.out} cannot hold the report ({e.strerror}); choose a folder you can write")
    lines = header(plan)
    print("\n".join(lines), flush=True)
    done = run_parts(plan, args, start)
    for part in done:
        lines += [f"## {part.title}", ""] + part.lines + [""]
    lines += summary(done, time.perf_counter() - start)
    with open(os.path.join(plan.out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(summary(done, time.perf_counter() - start)))
    print(f"wrote {os.path.join(plan.out, 'report.md')}")
    return done


if __name__ == "__main__":
    main()
