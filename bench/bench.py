"""Time real training steps of gan.py, lapgan.py or vaegan.py on random data of the configured size.

    python3 bench/bench.py SCRIPT [script flags] --steps N [--warmup 3]

    python3 bench/bench.py gan --dataset fashion-mnist --conditional --steps 50
    python3 bench/bench.py lapgan --dataset cifar10 --steps 10 --cuda --amp --compile

The script's own flags (parsed by its own `get_args`) pick the network, batch, device and modes; the data
is random uint8 images of the dataset's size, held on the device as the scripts hold real data. After
the warm-up steps (cuDNN autotuning, compilation) the clock runs over N steps of the script's own
`train_step`, synchronising the GPU before each reading. Prints images/s, ms/step, peak GPU memory and a
row for README.md's Speed table. This file imports the scripts; they import nothing of it.

Experiments that may pay on a GPU and not on a CPU are bench.py's own flags, so that a GPU run can decide
before a script takes them: --channels-last (NHWC networks), --fused-opt (fused optimiser kernels),
--cuda-graphs (with --compile: CUDA graphs, as mode="reduce-overhead"), --merge-steps (lapgan: the G steps
of all levels as one optimiser step). bench/gpu.py runs them with --variants.
"""
import argparse, os, sys, time
import torch
import torch.nn as nn

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


def found(obj, kind, depth=4):
    """Every `kind` object reachable from a Run through its fields, dicts and lists (each once)."""
    if isinstance(obj, kind):
        return [obj]
    if depth == 0 or isinstance(obj, (torch.Tensor, nn.Module, str)):
        return []
    items = []
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        items = list(obj)
    elif hasattr(obj, "__dataclass_fields__"):
        items = [getattr(obj, f) for f in obj.__dataclass_fields__]
    every = [f for item in items for f in found(item, kind, depth - 1)]
    return list({id(f): f for f in every}.values())


def use_fused(opt, device):
    """Switch an optimiser to its fused kernel where PyTorch has one for this device (SGD, Adam)."""
    try:
        type(opt)([torch.zeros(1, device=device, requires_grad=True)], lr=0.1, fused=True)
    except (TypeError, RuntimeError, ValueError):
        print(f"note: {type(opt).__name__} has no fused kernel on {device.type}; left as it is")
        return
    for group in opt.param_groups:
        group.update(fused=True, foreach=False)


def merged_g_step(run):
    """lapgan: the G steps of all levels as one optimiser step at the end of the training step. Exact:
    G_k's weights are read by no later part of the same step. D_k's step stays where it is (G_k's loss
    reads the updated D_k). -> the step function to call after each train_step."""
    opts = [lv.opt_G for lv in run.levels.values()]
    hyper = {k: v for k, v in opts[0].param_groups[0].items() if k != "params"}
    merged = type(opts[0])([p for o in opts for g in o.param_groups for p in g["params"]], **hyper)
    for o in opts:
        o.step = lambda closure=None: None  # left to `merged`
    return merged.step


def tune(name, run, device, ours):
    """The GPU experiments behind bench.py's own flags; the scripts stay as they are. -> extra step."""
    if ours.channels_last:  # NHWC convolutions (tensor cores prefer them); parameters keep their identity
        for m in found(run, nn.Module):
            m.to(memory_format=torch.channels_last)
    for opt in found(run, torch.optim.Optimizer) if ours.fused_opt else []:
        use_fused(opt, device)
    if ours.merge_steps and name != "lapgan":
        raise SystemExit("error: --merge-steps applies to lapgan's levels only; drop it")
    if ours.merge_steps and run.args.balance:
        raise SystemExit("error: --merge-steps cannot follow --balance's per-level choices; drop one")
    return merged_g_step(run) if ours.merge_steps else (lambda: None)


def bench(name, script_argv, steps, warmup=3, ours=None):
    """-> (images per second, seconds per step, peak GPU memory in bytes or None). ours: bench.py's own
    flags (the experiments of `tune`)."""
    mod = __import__(name)
    args = mod.get_args(script_argv)
    device = mod.pick_device(args)
    ours = ours or argparse.Namespace(channels_last=False, fused_opt=False, merge_steps=False)
    torch.manual_seed(args.seed)
    run = mod.setup_run(args, device, random_data(args, max(4096, 4 * args.batch_size)))
    one, after = step_function(name, mod, run), tune(name, run, device, ours)

    def step():
        one()
        after()
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
    # experiments that may pay on a GPU and not on the CPU; the scripts do not have them
    p.add_argument("--channels-last", action="store_true", help="the networks in NHWC memory format")
    p.add_argument("--fused-opt", action="store_true", help="fused optimiser kernels where PyTorch has them")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="with --compile: CUDA graphs, as torch.compile(mode='reduce-overhead')")
    p.add_argument("--merge-steps", action="store_true", help="lapgan: one G step over all levels")
    ours, script_argv = p.parse_known_args(argv[1:])
    if ours.steps < 1 or ours.warmup < 0:
        raise SystemExit("error: --steps must be at least 1 and --warmup at least 0")
    if ours.cuda_graphs:  # what mode="reduce-overhead" sets, for the scripts' own torch.compile calls
        import torch._inductor.config as inductor
        inductor.triton.cudagraphs = True
    rate, dt, peak = bench(argv[0], script_argv, ours.steps, ours.warmup, ours)
    args = __import__(argv[0]).get_args(script_argv)
    mem = f"{peak / 2**30:.2f} GiB" if peak is not None else "n/a"
    tried = [f.replace("_", "-") for f in ("channels_last", "fused_opt", "cuda_graphs", "merge_steps")
             if getattr(ours, f)]
    mode = "+".join([m for m in ("amp", "compile") if getattr(args, m)] + tried) or "fp32"
    device = "CUDA" if args.cuda else "CPU"
    print(f"{rate:.0f} img/s, {dt * 1000:.1f} ms/step, peak memory {mem}")
    # a row for README.md's Speed table: script | batch | mode | device | images/s | peak memory | command
    print(f"| {argv[0]}.py | {args.batch_size} | {mode} | {device} | {rate:.0f} | {mem} | "
          f"`python3 bench/bench.py {' '.join(argv)}` |")
    return rate


if __name__ == "__main__":
    main()
