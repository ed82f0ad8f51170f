"""Time real training steps of gan.py, lapgan.py or vaegan.py on random data of the configured size.

    python3 bench/bench.py SCRIPT [script flags] --steps N [--warmup 3]

    python3 bench/bench.py gan --dataset fashion-mnist --conditional --steps 50
    python3 bench/bench.py lapgan --dataset cifar10 --steps 10 --cuda --amp --compile

The script's own flags (parsed by its own `get_args`) pick the network, batch, device and modes; the data
is random uint8 images of the dataset's size, held on the device as the scripts hold real data. After
the warm-up steps (cuDNN autotuning, compilation) the clock runs over N steps of the script's own
`train_step`, synchronising the GPU before each reading. Prints images/s, ms/step, peak GPU memory and a
row for README.md's Speed table. This file imports the scripts; they import nothing of it.
"""
import argparse, os, sys, time
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPTS = ("gan", "lapgan", "vaegan")
NATIVE_SIZE = {"mnist": 28, "fashion-mnist": 28, "folder": 64}  # cifar10 and shapes: 32


def random_data(args, n, seed=0):
    """(uint8 images n x C x H x W, int64 labels over 10 classes, class names), like a loader's output."""
    size = args.image_size or NATIVE_SIZE.get(args.dataset, 32)
    nc = args.channels or (1 if args.dataset in ("mnist", "fashion-mnist") else 3)
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, nc, size, size), dtype=torch.uint8, generator=g)
    return images, torch.randint(0, 10, (n,), generator=g), [str(i) for i in range(10)]


def step_function(name, mod, run):
    """One call = one training step exactly as the script's own loop makes it, on the next batch."""
    state = {"i": 0}

    def indices():
        idx = mod.batches(run, 1)
        state["i"] += 1
        return idx[state["i"] % len(idx)]

    def gan_step():
        return mod.train_step(run, *mod.get_batch(run, indices()))

    def lapgan_step():
        b = indices()  # B/2 real images; the loop adds 3B/2 random ones whose coarse images condition G
        extra = torch.randint(len(run.images), (len(b) * 3,), device=b.device)
        return mod.train_step(run, torch.cat([b, extra]))

    def vaegan_step():
        return mod.train_step(run, mod.get_batch(run, indices()))

    return {"gan": gan_step, "lapgan": lapgan_step, "vaegan": vaegan_step}[name]


def bench(name, script_argv, steps, warmup=3):
    """-> (images per second, seconds per step, peak GPU memory in bytes or None)."""
    mod = __import__(name)
    args = mod.get_args(script_argv)
    device = mod.pick_device(args)
    torch.manual_seed(args.seed)
    run = mod.setup_run(args, device, random_data(args, max(4096, 4 * args.batch_size)))
    step = step_function(name, mod, run)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    return args.batch_size / dt, dt, peak


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in SCRIPTS:
        raise SystemExit(f"error: the first argument names the script, one of {', '.join(SCRIPTS)}; "
                         f"e.g. bench/bench.py gan --dataset cifar10 --steps 20")
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--steps", type=int, default=20, help="timed training steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (autotuning, compilation)")
    ours, script_argv = p.parse_known_args(argv[1:])
    if ours.steps < 1 or ours.warmup < 0:
        raise SystemExit("error: --steps must be at least 1 and --warmup at least 0")
    rate, dt, peak = bench(argv[0], script_argv, ours.steps, ours.warmup)
    args = __import__(argv[0]).get_args(script_argv)
    mem = f"{peak / 2**30:.2f} GiB" if peak is not None else "n/a"
    mode = "+".join(m for m in ("amp", "compile") if getattr(args, m)) or "fp32"
    device = "CUDA" if args.cuda else "CPU"
    print(f"{rate:.0f} img/s, {dt * 1000:.1f} ms/step, peak memory {mem}")
    # a row for README.md's Speed table: script | batch | mode | device | images/s | peak memory | command
    print(f"| {argv[0]}.py | {args.batch_size} | {mode} | {device} | {rate:.0f} | {mem} | "
          f"`python3 bench/bench.py {' '.join(argv)}` |")
    return rate


if __name__ == "__main__":
    main()
