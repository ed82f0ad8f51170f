"""Time pytorch/examples' DCGAN against gan.py on the same network, batch and device.

    git clone https://github.com/pytorch/examples /tmp/pytorch-examples    # needs torchvision
    python3 bench/compare_dcgan.py /tmp/pytorch-examples [--accel] [--batch-size 64] [--repeats 2]

pytorch/examples trains on its `fake` dataset (1,000 random images, so 16 iterations at batch 64) and
prints one line per iteration; this script timestamps those lines and reports the steady-state rate
between iterations 3 and 15, which includes that script's own data loading, as a user would run it.
gan.py is timed with bench/bench.py (its own training step) on the identical network
(`--arch dcgan --image-size 64 --ngf 64 --ndf 64 --nz 100`). The two runs alternate, `--repeats` times,
so that both see the same machine.
"""
import argparse, os, re, subprocess, sys, time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def time_examples(repo, batch, accel):
    cmd = [sys.executable, os.path.join(repo, "dcgan", "main.py"), "--dataset", "fake", "--niter", "1",
           "--batchSize", str(batch), "--imageSize", "64", "--workers", "2", "--manualSeed", "1",
           "--outf", os.path.join("/tmp", "dcgan-examples-out")] + (["--accel"] if accel else [])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stamps = {}
    for line in proc.stdout:
        m = re.match(r"\[0/1\]\[(\d+)/(\d+)\]", line)
        if m:
            stamps[int(m.group(1))] = time.perf_counter()
    if proc.wait() != 0 or len(stamps) < 6:
        raise SystemExit(f"error: pytorch/examples' dcgan/main.py did not run: {' '.join(cmd)}")
    first, last = 3, max(stamps)
    return batch * (last - first) / (stamps[last] - stamps[first])


def time_ours(batch, accel, iters):
    cmd = [sys.executable, os.path.join(HERE, "bench", "bench.py"), "gan", "--dataset", "cifar10",
           "--arch", "dcgan", "--image-size", "64", "--ngf", "64", "--ndf", "64", "--nz", "100",
           "--batch-size", str(batch), "--steps", str(iters)] + (["--cuda"] if accel else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(re.search(r"([\d.]+) img/s,", out).group(1))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("repo", help="a checkout of github.com/pytorch/examples")
    p.add_argument("--accel", action="store_true", help="run both on the GPU")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    theirs, ours = [], []
    for _ in range(args.repeats):
        theirs.append(time_examples(args.repo, args.batch_size, args.accel))
        ours.append(time_ours(args.batch_size, args.accel, 200 if args.accel else 12))
    t, o = max(theirs), max(ours)
    print(f"pytorch/examples dcgan: {t:.0f} img/s   gan.py: {o:.0f} img/s   ratio {o / t:.2f}x "
          f"(best of {args.repeats}, batch {args.batch_size}, {'GPU' if args.accel else 'CPU'})")


if __name__ == "__main__":
    main()
