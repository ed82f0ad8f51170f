"""Sample quality for any script's `--sample --npz` output, judged by a classifier trained on the real data.

    python3 bench/quality.py SAMPLES.npz --dataset fashion-mnist [--dataroot DIR] [--nn-sheet PNG]

A small CNN is trained once on the dataset's train split (3 epochs, 92.5 to 92.6% test accuracy on
Fashion-MNIST as the machine's arithmetic goes, 3 to 14 minutes on two cores; its weights are then cached
under ~/.cache/gans-quality, keyed by the data files, so FIDs compare within one machine's cache) and then
reports (in under a minute for 10,000 samples, plus a pass over the training images for the last one):

- fid: the Frechet distance between Gaussians fitted to the classifier's penultimate features (256 numbers
  per image) of the samples and of the test split. Heusel et al.'s FID with a dataset-specific network in
  place of Inception: the numbers rank models on one dataset and are not comparable with published FIDs.
- class_acc: for conditional samples (the npz holds `labels`), how often the classifier puts a sample in the
  class that was asked for.
- coverage: how many classes receive at least 5% of the samples (10 for a model that covers the data).
- copy_ratio: the median L2 distance from a sample to its nearest training image, over the same for test
  images (which are new by construction). About 1 for new images; near 0 when G copies training images.
- feature_copy_ratio: the same ratio in the classifier's feature space (the 256 penultimate features), the
  Eyescream blog's second check: a training image drawn again a pixel or two off is far from it in pixels
  but near in features. It needs the features of every training image (one more pass of the classifier).

`--nn-sheet PNG` writes the first 32 samples, each beside its nearest training image in feature space, 4 such
pairs a row, enlarged 3 times (nearest-neighbour): a sheet where every pair is twice the same image is a G
that copies. The last line printed is one JSON object with these keys (and n, the sample count, and
classifier_acc, the classifier's accuracy on the test split). Standard library, torch, numpy and Pillow
(for the sheet) only; nothing of the three scripts is imported, so the measure stays independent of what
it measures.
"""
import argparse, gzip, hashlib, io, json, os, pickle, sys, tarfile, tempfile
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

IDX_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
SYSTEM_DATA = "/usr/share/datasets"  # where Debian's dataset packages install, as the scripts look
DATASETS = ("mnist", "fashion-mnist", "cifar10")
DEFAULT_CACHE = "~/.cache/gans-quality"
SHEET_PAIRS = 32  # --nn-sheet: the first 32 samples, each beside its nearest training image
SHEET_SCALE = 3  # enlarged 3 times (nearest neighbour), so that 28 px images can be seen
SHEET_PER_ROW = 4  # pairs a row
SHEET_PAD = 2  # white pixels between pairs
NUMBER_CHECKS = [("epochs", lambda v: v >= 1, "at least 1")]  # every numeric flag: name, valid (NaN: no), why


def fail(msg):
    raise SystemExit(f"error: {msg}")


# ------------------------------------------------------------------------- the data, found as the scripts do
def idx_paths(root, name):
    """The four IDX files in DATAROOT, DATAROOT/NAME or /usr/share/datasets/NAME (gzipped or not)."""
    paths = []
    for f in IDX_FILES:
        cands = [os.path.join(d, g) for d in (root, os.path.join(root, name), os.path.join(SYSTEM_DATA, name))
                 for g in (f, f[:-3])]
        found = [c for c in cands if os.path.exists(c)]
        if not found:
            fail(f"no {f} for {name} in {root}, {root}/{name} or {SYSTEM_DATA}/{name}; train a script on "
                 f"--dataset {name} once (it downloads the files) or point --dataroot at them")
        paths.append(found[0])
    return paths


def read_idx(path):
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
        dims = np.frombuffer(data, ">i4", data[3], 4)
        return np.frombuffer(data, np.uint8, int(np.prod(dims)), 4 + 4 * data[3]).reshape(dims)
    except (OSError, EOFError, ValueError, IndexError) as e:
        fail(f"{path} is damaged ({type(e).__name__}); delete it and let a script download it again")


class CifarUnpickler(pickle.Unpickler):
    """The official batches hold dicts, lists, bytes and numpy arrays; anything else could run code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a CIFAR-10 batch")
        return super().find_class(module, name)


def read_cifar10(root, split):
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    folder, tar = os.path.join(root, "cifar-10-batches-py"), os.path.join(root, "cifar-10-python.tar.gz")
    try:
        if os.path.isdir(folder):
            blobs = [open(os.path.join(folder, n), "rb").read() for n in names]
        elif os.path.exists(tar):
            with tarfile.open(tar) as t:
                members = {os.path.basename(m.name): m for m in t.getmembers()}
                blobs = [t.extractfile(members[n]).read() for n in names]
        else:
            fail(f"no CIFAR-10 in {root}; train a script on --dataset cifar10 once or point --dataroot at it")
        batches = [CifarUnpickler(io.BytesIO(b), encoding="bytes").load() for b in blobs]
    except (OSError, EOFError, KeyError, tarfile.TarError, pickle.UnpicklingError) as e:
        fail(f"CIFAR-10 in {root} is damaged or not the official files ({e}); delete it and download it "
             f"again")
    x = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
    return x, np.concatenate([b[b"labels"] for b in batches]).astype(np.int64)


def load_split(name, root, split):
    """uint8 images N x C x H x W and int64 labels N."""
    if name == "cifar10":
        return read_cifar10(root, split)
    paths = idx_paths(root, name)
    x, y = (read_idx(p) for p in (paths[:2] if split == "train" else paths[2:]))
    if len(x) != len(y):
        fail(f"{paths[0]} and {paths[1]} hold different numbers of items; replace the damaged one")
    return x[:, None].copy(), y.astype(np.int64)  # copy: frombuffer's arrays are read-only


def data_key(name, root):
    """A cache key that changes when the training files do (path, size and modification time)."""
    files = [os.path.join(root, "cifar-10-batches-py"), os.path.join(root, "cifar-10-python.tar.gz")] \
        if name == "cifar10" else idx_paths(root, name)[:2]
    stats = [f"{os.path.abspath(f)}:{os.path.getsize(f)}:{os.path.getmtime(f)}"
             for f in files if os.path.exists(f)]
    return hashlib.md5("|".join([name] + stats).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- the classifier
class Classifier(nn.Module):
    """Three conv blocks and a 256-unit penultimate layer whose activations are the features."""

    def __init__(self, nc, ncls=10):
        super().__init__()
        def block(i, o):
            return [nn.Conv2d(i, o, 3, 1, 1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2)]
        self.body = nn.Sequential(*block(nc, 32), *block(32, 64), *block(64, 128), nn.AdaptiveAvgPool2d(3),
                                  nn.Flatten(), nn.Linear(128 * 9, 256), nn.ReLU())
        self.head = nn.Linear(256, ncls)

    def forward(self, x):
        return self.head(self.body(x))


def to_input(x, size, nc, mean, std):
    """uint8 N x C x H x W -> float, the classifier's size and channels, normalised as in training."""
    x = torch.as_tensor(x).float() / 255
    if x.shape[1] != nc:  # a colour sample against greyscale data, or the other way round
        x = x.mean(1, keepdim=True) if nc == 1 else x.expand(-1, nc, -1, -1)
    if x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return (x - mean) / std


def train_classifier(x, y, epochs=3, batch=128, seed=0, log=print):
    """Adam on the train split; seeded, so the same data gives the same classifier."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    nc, size = x.shape[1], x.shape[-1]
    xf = torch.as_tensor(x).float() / 255
    mean, std = xf.mean((0, 2, 3)).view(1, -1, 1, 1), xf.std((0, 2, 3)).view(1, -1, 1, 1) + 1e-6
    net, y = Classifier(nc, int(y.max()) + 1 if len(y) else 10), torch.as_tensor(y)
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    steps = epochs * max(1, len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 3e-3, total_steps=steps)
    net.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(max(1, len(x) // batch)):
            b = perm[i * batch:(i + 1) * batch]
            loss = F.cross_entropy(net((xf[b] - mean) / std), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        log(f"classifier epoch {epoch + 1}/{epochs}: loss {loss.item():.3f}")
    net.eval()
    return {"net": net.state_dict(), "mean": mean, "std": std, "nc": nc, "size": size,
            "ncls": net.head.out_features}


def get_classifier(name, root, cache, epochs=3, log=print):
    """The cached classifier for this dataset's files, trained once if there is none (written atomically)."""
    path = os.path.join(os.path.expanduser(cache), f"{name}-{data_key(name, root)}.pt")
    state = None
    if os.path.exists(path):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            log(f"{path} is unreadable; training the classifier again")
    if state is None:
        log(f"training a {name} classifier once (cached in {path})")
        state = train_classifier(*load_split(name, root, "train"), epochs=epochs, log=log)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(state, path + ".tmp")
            os.replace(path + ".tmp", path)
        except (OSError, RuntimeError) as e:  # a full disk makes torch.save raise RuntimeError
            log(f"note: could not keep the classifier in {path} ({e}); it is used this time only")
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")
    net = Classifier(state["nc"], state["ncls"])
    net.load_state_dict(state["net"])
    return net.eval(), state


@torch.no_grad()
def features_and_logits(net, state, x, chunk=1000):
    feats, logits = [], []
    for c in torch.as_tensor(x).split(chunk):
        h = net.body(to_input(c, state["size"], state["nc"], state["mean"], state["std"]))
        feats.append(h.double())
        logits.append(net.head(h))
    return torch.cat(feats).numpy(), torch.cat(logits)


# ----------------------------------------------------------------------------- the measures
def frechet_distance(mu1, cov1, mu2, cov2):
    """|mu1 - mu2|^2 + Tr(C1 + C2 - 2 (C1 C2)^(1/2)), the 2-Wasserstein distance squared between Gaussians.

    Tr (C1 C2)^(1/2) = Tr (C1^(1/2) C2 C1^(1/2))^(1/2): the inner matrix is symmetric positive semi-definite,
    so both roots come from eigh and no complex square root (scipy's sqrtm) is needed."""
    w, v = np.linalg.eigh(cov1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ cov2 @ root1)
    cross = np.sqrt(np.clip(inner, 0, None)).sum()
    fid = float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * cross)
    return max(0.0, fid)  # rounding can leave -1e-6 for identical sets


def fid_from_features(f1, f2):
    return frechet_distance(f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))


def nearest(x, ref, chunk=1024):
    """Each row of x (float): the L2 distance to its nearest row of ref, and that row's index."""
    found = [torch.cdist(c, ref).min(1) for c in x.split(chunk)]
    return torch.cat([f.values for f in found]), torch.cat([f.indices for f in found])


def nearest_distance(x, ref):
    """Each image of x's L2 distance to its nearest image of ref (pixels in [0, 1])."""
    x, ref = torch.as_tensor(x).flatten(1).float() / 255, torch.as_tensor(ref).flatten(1).float() / 255
    return nearest(x, ref)[0]


def nearest_feature_distance(f, ref):
    """Each feature row of f's L2 distance to its nearest row of ref (the classifier's 256 features)."""
    return nearest(torch.as_tensor(f).float(), torch.as_tensor(ref).float())[0]


def copy_ratio(samples, train, test, n=2000, seed=0, distance=nearest_distance):
    """Median nearest-training-image distance of samples over that of test images (new by construction).
    At most n of each, drawn with a fixed seed, keep it to seconds on a CPU. distance: in pixels, or
    nearest_feature_distance on the features of the three sets."""
    g = torch.Generator().manual_seed(seed)
    pick = lambda a: torch.as_tensor(a)[torch.randperm(len(a), generator=g)[:n]]  # noqa: E731
    new = distance(pick(test), train).median()
    return float(distance(pick(samples), train).median() / new)


def nn_sheet(samples, train, f_s, f_train, path):
    """--nn-sheet: the first samples (uint8 N x C x H x W), each with its nearest training image in feature
    space on its right, enlarged SHEET_SCALE times, SHEET_PER_ROW pairs a row on a white ground."""
    f_s = torch.as_tensor(f_s[:SHEET_PAIRS]).float()
    _, idx = nearest(f_s, torch.as_tensor(f_train).float())
    pairs = torch.cat([samples[:len(idx)], torch.as_tensor(train)[idx]], -1)  # sample | its nearest
    pairs = pairs.repeat_interleave(SHEET_SCALE, -2).repeat_interleave(SHEET_SCALE, -1)
    n, c, h, w = pairs.shape
    rows = -(-n // SHEET_PER_ROW)
    pad = SHEET_PAD
    sheet = torch.full((c, pad + rows * (h + pad), pad + SHEET_PER_ROW * (w + pad)), 255, dtype=torch.uint8)
    for i, pair in enumerate(pairs):
        top = pad + i // SHEET_PER_ROW * (h + pad)
        left = pad + i % SHEET_PER_ROW * (w + pad)
        sheet[:, top:top + h, left:left + w] = pair
    image = sheet.permute(1, 2, 0).numpy()
    if c == 1:
        image = image[..., 0]  # Pillow's greyscale is H x W
    try:
        Image.fromarray(image).save(path, "PNG")
    except OSError as e:
        fail(f"cannot write --nn-sheet {path} ({e.strerror or e}); give a path in a folder you can write")


def checked_samples(images, labels, path):
    """The npz's arrays, checked before any data is read or classifier trained. -> (uint8 N x H x W x C
    images, int64 labels or None)."""
    x = np.asarray(images)
    if x.dtype != np.uint8:
        fail(f"`images` in {path} are {x.dtype}; they must be uint8 (0..255), as a script's --sample --npz "
             f"writes them")
    x = x[..., None] if x.ndim == 3 else x  # N x H x W: greyscale
    if x.ndim != 4 or x.shape[-1] not in (1, 3) or len(x) < 2:
        nchw = x.ndim == 4 and x.shape[1] in (1, 3)
        hint = "; N x C x H x W becomes N x H x W x C with np.transpose(images, (0, 2, 3, 1))" if nchw else ""
        fail(f"`images` in {path} has shape {np.asarray(images).shape}; it must be N x H x W x C "
             f"(C = 1 or 3) or N x H x W, with N >= 2{hint}")
    if labels is None:
        return x, None
    y = np.asarray(labels)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        fail(f"`labels` in {path} must be one class index (an integer >= 0) per image, got {y.dtype} "
             f"{y.shape}")
    if len(y) != len(x):
        fail(f"{path} holds {len(x)} images but {len(y)} labels; write one label per image (or no labels)")
    return x, y.astype(np.int64)


def as_nchw(x, nc, size):
    """Checked uint8 N x H x W x C images as N x C x H x W, in the data's channel count and size."""
    x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    if x.shape[1] != nc:
        x = x.float().mean(1, keepdim=True).round().to(torch.uint8) if nc == 1 else x.expand(-1, nc, -1, -1)
    if x.shape[-1] != size:  # e.g. 32 px samples of a 28 px dataset: compare at the data's size
        x = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True).round().clamp(0, 255)
        x = x.to(torch.uint8)
    return x


def evaluate(npz_path, name, root, cache, epochs=3, log=print, sheet=None):
    """All measures for one npz, as a dict (sheet: a PNG path for --nn-sheet)."""
    try:
        z = np.load(npz_path)
        images, labels = z["images"], (z["labels"] if "labels" in z.files else None)
    except (OSError, ValueError, KeyError, EOFError) as e:
        fail(f"cannot read `images` from {npz_path} ({e}); write it with a script's --sample --npz")
    images, labels = checked_samples(images, labels, npz_path)
    net, state = get_classifier(name, root, cache, epochs, log)
    if labels is not None and len(labels) and labels.max() >= state["ncls"]:
        fail(f"`labels` in {npz_path} go up to {labels.max()}, but {name} has classes 0..{state['ncls'] - 1}")
    train_x, _ = load_split(name, root, "train")
    test_x, test_y = load_split(name, root, "test")
    samples = as_nchw(images, state["nc"], state["size"])
    f_s, logits = features_and_logits(net, state, samples)
    f_t, logits_t = features_and_logits(net, state, test_x)
    f_train, _ = features_and_logits(net, state, train_x)
    pred = logits.argmax(1)
    share = torch.bincount(pred, minlength=state["ncls"]).double() / len(pred)
    out = {"n": len(samples), "fid": fid_from_features(f_s, f_t), "coverage": int((share >= 0.05).sum()),
           "copy_ratio": copy_ratio(samples, train_x, test_x),
           "feature_copy_ratio": copy_ratio(f_s, f_train, f_t, distance=nearest_feature_distance),
           "classifier_acc": float((logits_t.argmax(1) == torch.as_tensor(test_y)).double().mean())}
    if labels is not None:
        out["class_acc"] = float((pred == torch.as_tensor(labels)).double().mean())
    if sheet:
        nn_sheet(samples, train_x, f_s, f_train, sheet)
        log(f"wrote {sheet}: each sample beside its nearest training image in feature space")
    return out


def cache_folder(typed, log=print):
    """--cache, made if need be; without it ~/.cache/gans-quality, or (HOME unusable: not a folder, read-only)
    a folder in the temporary directory, with a note."""
    candidates = [typed] if typed else [DEFAULT_CACHE, os.path.join(tempfile.gettempdir(), "gans-quality")]
    for path in map(os.path.expanduser, candidates):
        try:
            os.makedirs(path, exist_ok=True)
        except OSError as e:
            why = e.strerror or type(e).__name__
            if typed:
                fail(f"--cache {typed} cannot be made ({why}); give a folder you can write")
            log(f"note: cannot use {path} ({why}); the classifier is cached elsewhere")
            continue
        if os.access(path, os.W_OK):
            return path
        if typed:
            fail(f"--cache {typed} is not writable; give a folder you can write")
        log(f"note: {path} is not writable; the classifier is cached elsewhere")
    fail("no folder for the classifier's cache can be made (HOME and the temporary directory); give --cache")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("npz", help="samples written by SCRIPT.py --sample --npz FILE")
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--dataroot", default="./data", help="where the dataset's files are (as for the scripts)")
    p.add_argument("--cache", help=f"where the classifier's weights are kept (default {DEFAULT_CACHE})")
    p.add_argument("--epochs", type=int, default=3, help="classifier training epochs (when not cached)")
    p.add_argument("--nn-sheet", metavar="PNG", help="write samples beside their nearest training images")
    args = p.parse_args(argv)
    for name, ok, need in NUMBER_CHECKS:
        if not ok(getattr(args, name)):
            fail(f"--{name} {getattr(args, name)} is out of range; it must be {need}")
    if args.nn_sheet and not os.path.isdir(os.path.dirname(os.path.abspath(args.nn_sheet))):
        fail(f"--nn-sheet {args.nn_sheet} is in no existing folder; make the folder or give another path")
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    cache = cache_folder(args.cache, log)
    r = evaluate(args.npz, args.dataset, args.dataroot, cache, args.epochs, log=log, sheet=args.nn_sheet)
    asked = f"{r['class_acc']:.1%}" if "class_acc" in r else "n/a"
    print("| samples | feature FID | asked class | classes >= 5% | copy ratio | feature copy ratio "
          "| classifier on test |")
    print(f"| {r['n']} | {r['fid']:.1f} | {asked} | {r['coverage']} | {r['copy_ratio']:.2f} | "
          f"{r['feature_copy_ratio']:.2f} | {r['classifier_acc']:.1%} |")
    print(json.dumps(r))
    return r


if __name__ == "__main__":
    main()
