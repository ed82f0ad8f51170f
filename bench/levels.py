"""Which level holds a LAPGAN back: per level, its share of a training step, its D over training and the
quality of what it draws.

    python3 bench/levels.py out/lapgan-fashion-mnist/ckpt.pt --out out/levels [--n 10000] [--dataroot DIR]
    python3 bench/levels.py out/lapgan-fashion-mnist/ckpt.pt --out out/levels --score [--dataset NAME]

Levels are numbered as in the paper: I_0 is the full image, I_K the base. For k = K, ..., 1 the chain of
Fig. 1 starts from the real test images' I_k = d(x) (k = K: the real base) and the trained G_{k-1}, ..., G_0
draw the finer levels; `full` is the whole chain from noise (what `--sample` draws) and `real` the test
images themselves. Each is written as OUT/from_k.npz (OUT/full.npz, OUT/real.npz), uint8 images with the
test images' own labels (a conditional model is asked for them), for bench/quality.py.

Then one markdown table, a row per level k, the base first:
- updates: level k's updates per training step (the run's `level_steps`, a comma list, position k for
  level k; 1 each without it).
- step time: level k's share of one training step. Each level is built as lapgan.py sets up a run (the
  checkpoint's flags and sizes, its weights loaded, on this machine's CPU) and `lapgan.level_step` is timed
  on random data of the checkpoint's batch (2 warm-up steps of every level first, then 3 timed steps, the
  median kept); both D_k and G_k update (no --balance). The share is that time times the level's updates, over the same summed over the levels: a
  weak level with a small share can be given more updates cheaply.
- D/G params: D_k's parameters over G_k's (the Eyescream blog's rule of thumb: 0.5 or 0.125).
- D(x), D(G(z)): level k's columns d_x{k}, d_gz{k} in the run's log.csv (beside the checkpoint): the first,
  middle and last rows, and the mean over the last quarter of the rows. Both near 0.5 all along: D_k never
  learned to tell real from drawn, so G_k got little signal. D(x) near 1 and D(G(z)) near 0: D_k won.
- with --score (bench/quality.py's evaluate on each file; --dataset: default the checkpoint's): the chain
  whose coarsest drawn level is k (from real I_{k+1}; for the base, `full`), its feature FID and asked
  class, and the FID it adds over the row below (for level 0, over the real test images, the last row).
  That difference is what G_k costs: the level that adds most is the one that holds samples back.
This file imports lapgan.py and bench/quality.py; it imports nothing of this.
"""
import argparse, csv, importlib.util, os, sys, time
from dataclasses import dataclass
import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import lapgan  # noqa: E402
SPEC = importlib.util.spec_from_file_location("quality", os.path.join(HERE, "quality.py"))
quality = importlib.util.module_from_spec(SPEC)  # bench/quality.py by path; it imports nothing of the scripts
SPEC.loader.exec_module(quality)


@dataclass
class LevelView:
    """What the table shows of level k."""
    k: int                    # the paper's index: 0 the full image, K the base
    size: int                 # I_k's size in pixels
    seconds: float            # one lapgan.level_step (D_k's and G_k's updates) here
    d_over_g: float           # D_k's parameters over G_k's
    updates: int = 1          # level k's updates per training step (the run's level_steps)
    share: float = 0.0        # seconds x updates over the same summed over all levels
    d_x: list = None          # D(x): first, middle, last log row, mean of the last quarter; None: no column
    d_gz: list = None         # D(G(z)), the same
    chain: str = ""           # the chain whose coarsest drawn level is k: "full" or "from_{k+1}"
    fid: float = None         # its feature FID and asked class (with --score)
    asked: float = None
    fid_added: float = None   # its FID less the row below's (level 0: less the real images'): G_k's cost


def chains_from_real(ckpt_path, n, seed=1, dataroot=None):
    """-> {name: (uint8 N x H x W x C images, int64 labels)}: `full`, `from_K` .. `from_1`, `real`."""
    Gs, ck = lapgan.load_levels([ckpt_path])
    where = {"dataroot": dataroot} if dataroot else {}
    test = lapgan.load_dataset(argparse.Namespace(**{**ck["args"], "limit": None, **where}), "test")
    sizes, nz = ck["sizes"], ck["args"]["nz"]  # sizes[k]: the size of I_k, finest first
    n = min(n, len(test[0]))
    m = (test[0].shape[-1] - sizes[0]) // 2  # centre crops of the finest size, as evaluation takes them
    x = test[0][:n, :, m:m + sizes[0], m:m + sizes[0]].float() / 255
    x, labels = (x - ck["mean"]) / ck["std"], test[1][:n]
    y = labels if ck["args"]["conditional"] else None
    torch.manual_seed(seed)
    truncate = ck["args"]["truncate"] or 1.0  # the base's noise range, as --sample draws it
    chains = {"full": lapgan.sample_chain(Gs, sizes, n, nz, y, "cpu", truncate=truncate)[0]}
    for k in reversed(range(1, len(sizes))):
        torch.manual_seed(seed)  # the same noise for every start
        image = lapgan.down(x, sizes[k])  # the real I_k of the test images
        for j in reversed(range(k)):  # G_{k-1}, ..., G_0
            image = lapgan.sample_level(Gs[j], image, sizes[j], y)
        chains[f"from_{k}"] = image
    chains["real"] = x
    out = {}
    for name, made in chains.items():
        images = lapgan.to_uint8(lapgan.to_display(made, ck["mean"], ck["std"]))
        out[name] = (images, labels.numpy())
    return out


# ----------------------------------------------------------------------------- each level's share of a step
def training_args(ck):
    """The checkpoint's training flags on this CPU; lapgan.py's defaults for any it lacks (older runs)."""
    args = {**vars(lapgan.make_parser().parse_args([])), **ck["args"]}
    args.update(cuda=False, amp=False, compile=False)
    if args["lr"] is None:  # get_args fills these two; an older checkpoint may lack them
        args["lr"] = 0.02
    if args["momentum"] is None:
        args["momentum"] = 0.5
    return argparse.Namespace(**args)


def level_counts(targs, K):
    """Each level's updates per training step, [level 0, ..., level K]: the run's level_steps ("1,2,4": level
    0 once, level 2 four times), 1 each without it."""
    given = targs.get("level_steps")
    if given is None:
        return [1] * (K + 1)
    parts = given.split(",") if isinstance(given, str) else given
    if not isinstance(parts, list):  # one number for every level (lapgan.py's default, 1)
        parts = [parts] * (K + 1)
    if len(parts) == 1:  # one value in a list: every level's
        parts = parts * (K + 1)
    try:
        counts = [int(c) for c in parts]
    except (TypeError, ValueError):
        counts = []
    if len(counts) != K + 1 or min(counts) < 1:
        lapgan.fail(f"the checkpoint's level_steps {given!r} is not one count >= 1 for each of its {K + 1} "
                    f"levels")
    return counts


def seconds_per_step(lv, x, y, sizes, nz, timed=3):
    """Median wall time of one lapgan.level_step (D_k's update, then G_k's): one slow step of a busy
    machine does not move it."""
    times = []
    for _ in range(timed):
        start = time.perf_counter()
        lapgan.level_step(lv, x, y, sizes, nz)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def level_times(ck, warmup=2):
    """[LevelView of k = K, ..., 0] with each level's step time, its nets built as a run sets them up.
    Every level takes its warm-up steps before any is timed: the process's first steps pay for memory
    and kernels once, and would otherwise be charged to whichever level was timed first."""
    args, sizes = training_args(ck), ck["sizes"]
    nc, ncls = args.nc, lapgan.n_classes(ck)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2 * args.batch_size, nc, sizes[0], sizes[0], generator=gen)  # B/2 real, 3B/2 conditions
    y = torch.randint(max(ncls, 1), (len(x),), generator=gen)
    K = len(sizes) - 1
    built = []
    for k in reversed(range(K + 1)):
        lv = lapgan.prepare_level(args, k, sizes, nc, ncls, torch.device("cpu"), 0, 1)
        if k in ck["levels"]:  # the trained nets: a checkpoint whose flags build other nets fails here
            lv.G.load_state_dict(ck["levels"][k]["G"])
            lv.D.load_state_dict(ck["levels"][k]["D"])
        for _ in range(warmup):
            lapgan.level_step(lv, x, y, sizes, args.nz)
        built.append(lv)
    views = []
    for lv in built:
        ng, nd = (sum(p.numel() for p in m.parameters()) for m in (lv.G, lv.D))
        view = LevelView(lv.k, sizes[lv.k], seconds_per_step(lv, x, y, sizes, args.nz), nd / ng)
        view.chain = "full" if lv.k == K else f"from_{lv.k + 1}"
        views.append(view)
    return views


def set_shares(views, counts):
    """Each level's share of a training step: its step time times its updates (counts[k]), over the sum."""
    for v in views:
        v.updates = counts[v.k]
    total = sum(v.seconds * v.updates for v in views)
    for v in views:
        v.share = v.seconds * v.updates / total


# ----------------------------------------------------------------------------- each D over training
def read_log(ckpt_path):
    """The rows of log.csv beside the checkpoint ([] with a note when there is none)."""
    path = os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), "log.csv")
    if not os.path.exists(path):
        print(f"note: no {path}; the D columns stay empty")
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def d_summary(rows, column):
    """[first, middle, last, mean of the last quarter] of a log column; None where no row holds it."""
    values = [float(r[column]) for r in rows if r.get(column) not in (None, "")]
    if not values:
        return None
    quarter = values[-max(1, len(values) // 4):]
    return [values[0], values[len(values) // 2], values[-1], sum(quarter) / len(quarter)]


def add_d_columns(views, rows, flip=None):
    """Each level's D(x) and D(G(z)) from the log rows (flip=K: a log from before the paper's numbering)."""
    for v in views:
        v.d_x = d_summary(rows, lapgan.renumber(f"d_x{v.k}", flip))
        v.d_gz = d_summary(rows, lapgan.renumber(f"d_gz{v.k}", flip))


# ---------------------------------------------------------------------- each level's own output (--score)
def score_dataset(args, ck):
    """--score's dataset: --dataset, else the checkpoint's; one that bench/quality.py's classifier knows."""
    dataset = args.dataset or ck["args"]["dataset"]
    if dataset not in quality.DATASETS:
        lapgan.fail(f"--score needs a dataset bench/quality.py knows ({', '.join(quality.DATASETS)}), not "
                    f"{dataset}; score a model of one of those")
    return dataset


def add_scores(views, out, dataset, root, cache):
    """Feature FID and asked class of each level's chain (bench/quality.py). -> the real images' scores."""
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    folder = quality.cache_folder(cache, log)
    for v in views:
        r = quality.evaluate(os.path.join(out, v.chain + ".npz"), dataset, root, folder, log=log)
        v.fid, v.asked = r["fid"], r.get("class_acc")
    real = quality.evaluate(os.path.join(out, "real.npz"), dataset, root, folder, log=log)
    fids = [v.fid for v in views] + [real["fid"]]  # views run K, ..., 0; then the real images
    for v, fid_below in zip(views, fids[1:]):
        v.fid_added = v.fid - fid_below
    return real


# ----------------------------------------------------------------------------- the table
def numbers(values):
    """A cell: the numbers comma-separated, "n/a" for None."""
    if values is None:
        return "n/a"
    return ", ".join(f"{v:.2f}" for v in values)


def percent(value):
    """A cell: the share in percent, "n/a" for None (an unconditional model is asked no class)."""
    if value is None:
        return "n/a"
    return f"{value:.1%}"


def table(views, real=None):
    """The markdown table: time and D columns, and with scores (real: the real images') the chain's."""
    head = ["level k", "size", "updates", "step time", "D/G params", "D(x) first, mid, last, last 1/4",
            "D(G(z)) first, mid, last, last 1/4"]
    if real:
        head += ["chain", "feature FID", "FID added by G_k", "asked class"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for v in views:
        cells = [str(v.k), f"{v.size} px", str(v.updates), f"{v.share:.1%}", f"{v.d_over_g:.2f}"]
        cells += [numbers(v.d_x), numbers(v.d_gz)]
        if real:
            cells += [v.chain + ".npz", f"{v.fid:.1f}", f"{v.fid_added:+.1f}", percent(v.asked)]
        lines.append("| " + " | ".join(cells) + " |")
    if real:
        cells = ["real", "", "", "", "", "", "", "real.npz", f"{real['fid']:.1f}", ""]
        cells.append(percent(real.get("class_acc")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt")
    p.add_argument("--out", required=True, help="folder for the .npz files")
    p.add_argument("--n", type=int, default=10000, help="test images (and samples) per chain")
    p.add_argument("--dataroot", help="where the test images are (default: the checkpoint's --dataroot)")
    p.add_argument("--score", action="store_true", help="score each chain with bench/quality.py")
    p.add_argument("--dataset", help="bench/quality.py's dataset for --score (default: the checkpoint's)")
    p.add_argument("--cache", help="bench/quality.py's classifier cache (its default unless given)")
    args = p.parse_args(argv)
    if args.n < 1:
        lapgan.fail(f"--n {args.n} is out of range; it must be at least 1")
    ck = lapgan.load_checkpoint(args.ckpt)
    counts = level_counts(ck["args"], len(ck["sizes"]) - 1)
    dataset = score_dataset(args, ck) if args.score else None
    os.makedirs(args.out, exist_ok=True)
    for name, (images, labels) in chains_from_real(args.ckpt, args.n, dataroot=args.dataroot).items():
        np.savez(os.path.join(args.out, name + ".npz"), images=images, labels=labels)
        print(f"wrote {os.path.join(args.out, name + '.npz')} ({len(images)} images)")
    views = level_times(ck)
    set_shares(views, counts)
    add_d_columns(views, read_log(args.ckpt), ck.get("flipped"))
    real = None
    if args.score:
        root = args.dataroot or ck["args"]["dataroot"]
        real = add_scores(views, args.out, dataset, root, args.cache)
    print(table(views, real))
    return views, real


if __name__ == "__main__":
    main()
