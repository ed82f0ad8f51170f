"""lapgan.py: a Laplacian pyramid of adversarial networks (LAPGAN), the Eyescream model.

Paper: Denton, Chintala, Szlam & Fergus 2015, "Deep Generative Image Models using a Laplacian Pyramid of
Adversarial Networks" (NIPS), read beside its Torch code (Eyescream: cifar/, lsun/, generate.lua).

    python lapgan.py --dataset cifar10 --cuda                          # 8 -> 14 -> 28, all levels at once
    python lapgan.py --dataset cifar10 --cuda --level 2 --outf out/l2  # one level alone, on any GPU
    python lapgan.py --sample --ckpt out/lapgan-cifar10/ckpt.pt --resample 8 --upscale 3 --eval

A Laplacian pyramid stores an image as a small base image plus one residual per finer level. LAPGAN learns
one conditional GAN per level: G_0 draws the base image from noise, G_k the residual h_k given the upsampled
coarser image; sampling runs the chain from coarse to fine (Sec. 2.3).

Deviations: D outputs a logit and the loss is BCE-with-logits (= sigmoid + BCE); images are normalised per
channel with the training split's mean/std (the CIFAR code: per pixel), which commutes with the pyramid ops;
momentum is capped at 0.8 as in the paper (the code: 0.7); D_k pads its convs where the code's unpadded ones
would leave no pixels (below 14 px); the large model's L2 pooling adds 1e-6 under the root. `--optim adam`
is an addition for short runs; the defaults are the paper's SGD setting.
"""
import argparse, csv, errno, gzip, hashlib, io, math, os, pickle, tarfile, time, urllib.request, zlib
from concurrent.futures import ThreadPoolExecutor
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

SCRIPT = "lapgan"
LEVELS = {"cifar10": [8, 14, 28], "mnist": [7, 14, 28], "fashion-mnist": [7, 14, 28], "shapes": [8, 16, 32]}

def make_parser():
    p = argparse.ArgumentParser(description="LAPGAN: a Laplacian pyramid of GANs")
    a = p.add_argument
    a("--dataset", choices=["cifar10", "mnist", "fashion-mnist", "folder", "shapes"])
    a("--dataroot", default="./data", help="where the data lives or is downloaded to")
    a("--image-size", type=int, default=None, help="native size unless given; 64 for folder")
    a("--channels", type=int, choices=[1, 3], default=None, help="force greyscale or RGB")
    a("--conditional", action="store_true", help="class-conditional levels")
    a("--limit", type=int, default=None, help="use only the first N training images")
    a("--levels", default=None, help="pyramid sizes coarse to fine, e.g. 8,14,28 (default: per dataset)")
    a("--level", type=int, default=None, help="train level K alone (0 = the base); default: all levels")
    a("--model", choices=["small", "large"], default="small", help="large: the paper's LSUN nets")
    a("--width-g", type=int, default=128, help="G_k feature maps: 128 (paper's models) or 64 (code)")
    a("--width-d", type=int, default=64, help="D_k feature maps")
    a("--nz", type=int, default=100, help="noise size at the base level")
    a("--epochs", type=int, default=25)
    a("--batch-size", type=int, default=128, help="D: half real, half generated; G: the whole batch")
    a("--lr", type=float, default=None, help="learning rate (default 0.02; --model large: 0.01)")
    a("--optim", choices=["sgd", "adam"], default="sgd", help="adam (beta1 0.5): quick runs, not the paper")
    a("--momentum", type=float, default=None, help="initial momentum, +0.0008 per epoch up to 0.8 (default 0.5; "
      "--model large: 0)")
    a("--balance", action="store_true", help="the LSUN code's rule: update D or G (or both)")
    a("--select", type=int, default=200, help="validation images for model selection (0: off)")
    a("--seed", type=int, default=1)
    a("--outf", default=None, help="output folder (default out/lapgan-DATASET)")
    a("--resume", action="store_true", help="continue from OUTF/ckpt.pt")
    a("--log-every", type=int, default=100, help="steps between progress lines / log rows")
    a("--cuda", action="store_true")
    a("--amp", action="store_true", help="bf16 autocast (CUDA)")
    a("--compile", action="store_true", help="torch.compile the networks")
    a("--workers", type=int, default=4, help="threads decoding a folder of images")
    a("--bench", type=int, default=0, help="time N training steps on random data and exit")
    a("--sample", action="store_true", help="sample from --ckpt instead of training")
    a("--ckpt", nargs="+", default=None, help="checkpoint(s); several merge levels trained apart")
    a("--n", type=int, default=64, help="number of samples")
    a("--label", type=int, default=None, help="class to sample (conditional models)")
    a("--npz", default=None, help="also write the samples to this .npz")
    a("--out", default=None, help="grid PNG (default: beside the checkpoint)")
    a("--resample", type=int, default=0, help="N samples from each of 8 real coarse images")
    a("--upscale", type=int, default=0, help="run the finest G N more times past its size")
    a("--chain", nargs=2, default=None, metavar=("A", "B"), help="levels below --switch from A, the rest B")
    a("--switch", type=int, default=1, help="first level taken from B with --chain")
    a("--eval", action="store_true", help="Parzen log-likelihood and a nearest-neighbour sheet")
    a("--eval-images", type=int, default=1000, help="held-out test images to score")
    a("--eval-samples", type=int, default=10000, help="samples for the base level's Parzen window")
    a("--eval-cond", type=int, default=100, help="samples per test image at each residual level")
    return p

def typed_flags(argv=None):
    """The flags the user typed: argv parsed again with every default replaced by SUPPRESS."""
    p = make_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))

def get_args(argv=None):
    p = make_parser()
    args = p.parse_args(argv)
    large = args.model == "large"  # lsun/train.lua's setting for the large model
    args.lr = args.lr if args.lr is not None else (0.01 if large else 0.02)
    args.momentum = args.momentum if args.momentum is not None else (0.0 if large else 0.5)
    if not args.sample and not args.dataset:
        p.error("--dataset is required for training (or give --sample --ckpt FILE)")
    if args.sample and not (args.ckpt or args.chain):
        p.error("--sample needs --ckpt DIR/ckpt.pt (or --chain A.pt B.pt)")
    if args.image_size is not None and not 0 < args.image_size <= 1024:
        fail(f"--image-size {args.image_size} must be between 1 and 1024")
    for flag, least in (("epochs", 1), ("batch_size", 2), ("log_every", 1), ("n", 1)):
        if getattr(args, flag) < least:
            fail(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be at least {least}")
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        fail(f"the folder of --out {args.out} does not exist; create it or choose another path")
    if args.outf and os.path.isfile(args.outf):
        fail(f"--outf {args.outf} is a file; give a folder")
    return args

def fail(msg):
    raise SystemExit(f"error: {msg}")

def pick_device(args, local_rank=0):
    if args.cuda and not torch.cuda.is_available():
        fail("--cuda was given but PyTorch sees no CUDA GPU; drop --cuda to run on the CPU")
    if not args.cuda:
        if args.amp:
            print("note: --amp (bf16 autocast) applies on CUDA only; the CPU trains in fp32")
        return torch.device("cpu")
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels
    return torch.device("cuda", local_rank)

# ----------------------------------------------------------------------------- data
# Every loader returns the whole split as one uint8 tensor N x C x H x W: decoded once, then batches
# are gathered by index on the device, with no per-image Python in the training loop.
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",
             "data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
             "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
             "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e"}
IDX_URLS = {"mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"}
IDX_MD5 = {"mnist": ["f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                     "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"],
           "fashion-mnist": ["8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                             "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"]}
IDX_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
CLASSES = {"mnist": [str(i) for i in range(10)],
           "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                             "Shirt", "Sneaker", "Bag", "Ankle boot"],
           "shapes": ["circle", "square", "triangle", "diamond", "cross", "ring"]}
SYSTEM_DATA = "/usr/share/datasets"  # where Debian's dataset-fashion-mnist package puts its files
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")

def download(url, path, md5):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    print(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(path + ".part", "wb") as f:
            f.write(r.read())
    except OSError as e:
        fail(f"could not download {url} ({e}); put {os.path.basename(path)} in {os.path.dirname(path)}")
    with open(path + ".part", "rb") as f:
        if hashlib.md5(f.read()).hexdigest() != md5:
            fail(f"checksum mismatch for {url}; delete {path}.part and try again")
    os.replace(path + ".part", path)

class BatchUnpickler(pickle.Unpickler):
    """The official batches hold dicts, lists, bytes and numpy arrays only: anything else is refused, so a
    crafted file cannot run code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)

def md5_of(path):
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

def read_cifar10(root, split):
    """The official python tarball (or its extracted folder): pickled dicts of 10000 x 3072 uint8, checked
    against the official checksums before anything is unpickled."""
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    folder, tar = os.path.join(root, "cifar-10-batches-py"), os.path.join(root, "cifar-10-python.tar.gz")
    if not os.path.isdir(folder) and not os.path.exists(tar):
        download(CIFAR_URL, tar, CIFAR_MD5["cifar-10-python.tar.gz"])
    checked = [os.path.join(folder, n) for n in names] if os.path.isdir(folder) else [tar]
    for path in checked:
        if not os.path.exists(path):
            fail(f"{path} is missing; delete {folder} to download CIFAR-10 again, or replace the file")
        if md5_of(path) != CIFAR_MD5[os.path.basename(path)]:
            fail(f"{path} does not match the official CIFAR-10 checksum; delete it to download it again")
    try:
        if os.path.isdir(folder):
            read = {n: open(os.path.join(folder, n), "rb").read() for n in names + ["batches.meta"]}
        else:
            with tarfile.open(tar) as t:
                read = {os.path.basename(m.name): t.extractfile(m).read() for m in t.getmembers() if m.isfile()}
        batches = [BatchUnpickler(io.BytesIO(read[n]), encoding="bytes").load() for n in names + ["batches.meta"]]
        x = np.concatenate([b[b"data"] for b in batches[:-1]]).reshape(-1, 3, 32, 32)
        y = np.concatenate([b[b"labels"] for b in batches[:-1]])
        classes = [c.decode() for c in batches[-1][b"label_names"]]
    except (OSError, EOFError, KeyError, ValueError, tarfile.TarError, pickle.UnpicklingError, zlib.error) as e:
        fail(f"{checked[0] if len(checked) == 1 else folder} is damaged ({type(e).__name__}: {e}); "
             f"delete it to download it again, or replace it")
    return torch.from_numpy(x), torch.from_numpy(y).long(), classes

def read_idx(path):
    """IDX format (LeCun): 2 zero bytes, a type byte (0x08 = uint8), a rank byte, big-endian int32 sizes."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        fail(f"{path} is damaged ({type(e).__name__}: {e}); delete it to download it again, or replace it")
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 8:
        fail(f"{path} is not a uint8 IDX file")
    dims, start = np.frombuffer(data, ">i4", data[3], 4), 4 + 4 * data[3]
    if len(data) != start + int(np.prod(dims)):
        fail(f"{path} is damaged ({len(data) - start} bytes of data, its header says {int(np.prod(dims))}); "
             f"delete it to download it again, or replace it")
    return np.frombuffer(data, np.uint8, offset=start).reshape(dims)

def load_mnist(root, name, split):
    """MNIST and Fashion-MNIST: files in DATAROOT, DATAROOT/NAME or an installed Debian dataset package,
    else downloaded to DATAROOT/NAME."""
    pick = [0, 1] if split == "train" else [2, 3]
    paths = []
    for i in pick:
        cands = [os.path.join(d, f) for d in (root, os.path.join(root, name), os.path.join(SYSTEM_DATA, name))
                 for f in (IDX_FILES[i], IDX_FILES[i][:-3])]
        found = [c for c in cands if os.path.exists(c)]
        if not found:
            download(IDX_URLS[name] + IDX_FILES[i], os.path.join(root, name, IDX_FILES[i]), IDX_MD5[name][i])
        paths.append(found[0] if found else os.path.join(root, name, IDX_FILES[i]))
    x, y = read_idx(paths[0]), read_idx(paths[1])
    return torch.from_numpy(x.copy())[:, None], torch.from_numpy(y.astype(np.int64)), CLASSES[name]

def decode_image(path, size, mode):
    """Resize the shorter side to `size`, then centre-crop, as DCGAN's LSUN/CelebA preprocessing."""
    try:
        im = Image.open(path)
        if im.mode.startswith("I"):  # 16-bit greyscale: keep the top 8 bits (Pillow's convert would clip)
            im = Image.fromarray((np.asarray(im).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8))
        im = im.convert(mode or ("L" if im.mode in ("L", "LA", "1") else "RGB"))
    except Exception as e:
        fail(f"cannot read image {path} ({type(e).__name__}); remove or replace the file")
    s = size / min(im.size)
    im = im.resize((max(size, round(im.size[0] * s)), max(size, round(im.size[1] * s))), Image.BICUBIC)
    l, t = (im.size[0] - size) // 2, (im.size[1] - size) // 2
    return np.asarray(im.crop((l, t, l + size, t + size)))

def load_folder(root, size, channels, workers):
    """A folder of images, class labels from sub-folders; decoded once and cached beside the data."""
    if not os.path.isdir(root):
        fail(f"--dataroot {root} is not a folder; point it at a folder of images")
    def unreadable(e):
        fail(f"cannot read {e.filename} ({e.strerror}); fix its permissions or move it out of --dataroot")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root, onerror=unreadable)
                   for f in fs if f.lower().endswith(IMAGE_EXT))
    if not files:
        fail(f"no images ({', '.join(IMAGE_EXT)}) found under {root}")
    classes = sorted({os.path.relpath(os.path.dirname(f), root) for f in files})
    stamp = hashlib.md5(repr([(f, os.path.getmtime(f)) for f in files]).encode()).hexdigest()[:12]
    cache = os.path.join(root, f".cache-{size}px-{channels or 'auto'}ch-{stamp}.npz")
    try:
        with np.load(cache) as z:
            return torch.from_numpy(z["x"]), torch.from_numpy(z["y"]), classes
    except Exception:  # absent, truncated or unreadable: decode the images again
        pass
    mode = {1: "L", 3: "RGB"}.get(channels)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        ims = list(pool.map(lambda f: decode_image(f, size, mode), files))
    if mode is None and any(im.ndim == 3 for im in ims):  # colour kept as found; greys join as RGB
        ims = [np.repeat(im[..., None], 3, 2) if im.ndim == 2 else im for im in ims]
    x = np.stack([im if im.ndim == 3 else im[..., None] for im in ims]).transpose(0, 3, 1, 2).copy()
    y = np.array([classes.index(os.path.relpath(os.path.dirname(f), root)) for f in files], np.int64)
    try:  # atomic: a crash or a full disk never leaves a truncated cache behind
        with open(cache + ".tmp", "wb") as f:
            np.savez(f, x=x, y=y)
            f.flush()
            os.fsync(f.fileno())
        os.replace(cache + ".tmp", cache)
    except OSError:  # a read-only dataset still works, it is just decoded again next time
        if os.path.exists(cache + ".tmp"):
            os.remove(cache + ".tmp")
    return torch.from_numpy(x), torch.from_numpy(y), classes

def make_shapes(n, size, seed):
    """The built-in synthetic set: one coloured shape per image on a dark background, one class each.
    Made in chunks of 1000 with their own seeds, so `--limit` takes a prefix of the same images."""
    # whole chunks, then cut: a chunk's random draws depend on its length
    parts = [shape_chunk(1000, size, np.random.default_rng([seed, i])) for i in range(0, n, 1000)]
    return torch.cat([p[0] for p in parts])[:n], torch.cat([p[1] for p in parts])[:n], CLASSES["shapes"]

def shape_chunk(n, size, rng):
    y = rng.integers(0, 6, n)
    c = (np.arange(size) + 0.5) / size * 2 - 1
    cx, cy, r = rng.uniform(-0.35, 0.35, n), rng.uniform(-0.35, 0.35, n), rng.uniform(0.35, 0.6, n)
    dx = (c[None, None, :] - cx[:, None, None]) / r[:, None, None]
    dy = (c[None, :, None] - cy[:, None, None]) / r[:, None, None]
    ax, ay, rr = np.abs(dx), np.abs(dy), dx ** 2 + dy ** 2
    masks = [rr <= 1, np.maximum(ax, ay) <= 0.8, (dy <= 0.7) & (ax <= 0.56 * (dy + 0.9)), ax + ay <= 1,
             ((ax <= 0.3) & (ay <= 0.9)) | ((ay <= 0.3) & (ax <= 0.9)), (rr <= 1) & (rr >= 0.45)]
    mask = np.choose(y[:, None, None], masks)[:, None]
    fg, bg = rng.uniform(0.45, 1, (n, 3, 1, 1)), rng.uniform(0, 0.2, (n, 3, 1, 1))
    x = (np.where(mask, fg, bg) * 255).round().astype(np.uint8)
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))

def resize_images(x, size):
    """Resize a uint8 N x C x H x W tensor (antialiased bilinear) when --image-size asks for it."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    out = [F.interpolate(c.float(), (size, size), mode="bilinear", antialias=True) for c in x.split(4096)]
    return torch.cat(out).round().clamp(0, 255).to(torch.uint8)

def load_dataset(args, split):
    """-> (uint8 images N x C x H x W, int64 labels, class names). folder/shapes hold out every 10th image."""
    if args.dataset == "cifar10":
        x, y, classes = read_cifar10(args.dataroot, split)
    elif args.dataset in ("mnist", "fashion-mnist"):
        x, y, classes = load_mnist(args.dataroot, args.dataset, split)
    elif args.dataset == "shapes":
        n = min(10000, args.limit or 10000) if split == "train" else 2000
        x, y, classes = make_shapes(n, args.image_size or 32, 0 if split == "train" else 1)
    else:
        x, y, classes = load_folder(args.dataroot, args.image_size or 64, args.channels, args.workers)
        keep = (torch.arange(len(x)) % 10 == 9) == (split == "test")
        x, y = x[keep], y[keep]
    if args.channels == 1 and x.shape[1] == 3:  # ITU-R 601 luma
        x = (x.float() * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True).round().byte()
    elif args.channels == 3 and x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    if split == "train" and args.limit:
        x, y = x[:args.limit], y[:args.limit]
    if len(x) == 0:
        fail(f"the {split} split of {args.dataset} under {args.dataroot} holds no images")
    return resize_images(x, args.image_size or x.shape[-1]), y, classes

# ----------------------------------------------------------------------------- the Laplacian pyramid (Sec. 2.2)
def area_matrix(n_in, n_out, device=None):
    """Torch's image.scale when shrinking: output pixel i averages the source interval [i r, (i+1) r),
    r = n_in / n_out, a pixel cut by an end of it counted by the fraction covered. Rows sum to 1."""
    r = n_in / n_out
    start, j = torch.arange(n_out, dtype=torch.float64)[:, None] * r, torch.arange(n_in, dtype=torch.float64)
    return ((torch.minimum(start + r, j + 1) - torch.maximum(start, j)).clamp(min=0) / r).float().to(device)

def down(x, size):
    """d(.): area resampling of square N x C x n x n images, rows then columns (2:1 = 2x2 average pooling)."""
    A = area_matrix(x.shape[-1], size, x.device).to(x.dtype)
    return x if x.shape[-1] == size else A @ x @ A.T

def up(x, size):
    """u(.): bilinear with the corner pixels aligned (Torch's image.scale when enlarging)."""
    return x if x.shape[-1] == size else F.interpolate(x, (size, size), mode="bilinear", align_corners=True)

def laplacian_pyramid(x, sizes):
    """-> (base I_0, [h_1 .. h_K]), h_k = I_k - u(I_{k-1}); every I_k = d(x) is cut from the finest image."""
    gauss = [down(x, s) for s in sizes]
    return gauss[0], [f - up(c, f.shape[-1]) for c, f in zip(gauss, gauss[1:])]

def reconstruct(base, residuals):
    """The exact inverse: I_k = u(I_{k-1}) + h_k, from the base up."""
    for h in residuals:
        base = up(base, h.shape[-1]) + h
    return base

def level_view(x, sizes, k):
    """What level k sees of real images x: (I_k, u(I_{k-1}), or None at the base)."""
    return down(x, sizes[k]), (up(down(x, sizes[k - 1]), sizes[k]) if k else None)

def noise(k, n, size, nz, device, gen=None):
    """Sec. 3: uniform on [-1, 1]; a 100-d vector at the base, one extra input plane at level k."""
    return torch.rand((n, nz) if k == 0 else (n, 1, size, size), device=device, generator=gen) * 2 - 1

# ----------------------------------------------------------------------------- models (Sec. 3)
class Conditioned(nn.Module):
    """Feeds inputs and class to `body` (Eyescream's class-conditional CIFAR). Base: inputs flattened, one-hot
    appended. Level k: a class plane, Linear(classes -> f*f) -> ReLU, after the first input plane: G_k sees
    [noise, class, coarse], D_k [image, class]."""

    def __init__(self, body, ncls, size, flat):
        super().__init__()
        self.body, self.ncls, self.size, self.flat = body, ncls, size, flat
        self.embed = nn.Linear(ncls, size * size) if ncls and not flat else None

    def forward(self, xs, y=None):
        onehot = F.one_hot(y, self.ncls).to(xs[0].dtype) if self.ncls else None
        if self.flat:
            return self.body(torch.cat([x.flatten(1) for x in xs] + ([onehot] if self.ncls else []), 1))
        if self.ncls:
            plane = F.relu(self.embed(onehot)).view(-1, 1, self.size, self.size)
            xs = [xs[0], up(plane, xs[0].shape[-1]), *xs[1:]]  # resized only by --upscale
        return self.body(torch.cat(xs, 1))

def mlp_nets(nz, nc, s, ncls):
    """Base level: G_0 two ReLU layers of 1200 units, linear output; D_0 two of 600 with dropout 0.5."""
    g = nn.Sequential(nn.Linear(nz + ncls, 1200), nn.ReLU(), nn.Linear(1200, 1200), nn.ReLU(),
                      nn.Linear(1200, nc * s * s), nn.Unflatten(1, (nc, s, s)))
    d = nn.Sequential(nn.Linear(nc * s * s + ncls, 600), nn.ReLU(), nn.Dropout(0.5), nn.Linear(600, 600),
                      nn.ReLU(), nn.Dropout(0.5), nn.Linear(600, 1), nn.Flatten(0))
    return g, d

def pads(f, kernels, strides):
    """The code's D convs are unpadded; where that leaves under 3 px, pad 'same'. -> (paddings, out size)."""
    s, same = f, f
    for k, st in zip(kernels, strides):
        s, same = (s - k) // st + 1, (same - 1) // st + 1
    return ([0] * len(kernels), s) if s >= 3 else ([k // 2 for k in kernels], same)

def conv_nets(cin, nc, f, wg, wd, ncls):
    """Level k: G_k = conv7 wg, ReLU, conv7 wg, ReLU, conv5 C, linear output = the residual; D_k = conv5 wd,
    ReLU, conv5 stride 2 wd, ReLU, dropout 0.5, linear -> logit. No batch norm."""
    g = nn.Sequential(nn.Conv2d(cin, wg, 7, padding=3), nn.ReLU(), nn.Conv2d(wg, wg, 7, padding=3), nn.ReLU(),
                      nn.Conv2d(wg, nc, 5, padding=2))
    (p1, p2), s = pads(f, [5, 5], [1, 2])
    d = nn.Sequential(nn.Conv2d(nc + (ncls > 0), wd, 5, padding=p1), nn.ReLU(), nn.Conv2d(wd, wd, 5, 2, p2),
                      nn.ReLU(), nn.Dropout(0.5), nn.Flatten(), nn.Linear(wd * s * s, 1), nn.Flatten(0))
    return g, d

class PairL2Pool(nn.Module):
    """fbcunn's FeatureLPPooling(2, 2, 2): sqrt(a^2 + b^2) over channel pairs, halving the channels."""

    def forward(self, x):
        return (x.unflatten(1, (-1, 2)).pow(2).sum(2) + 1e-6).sqrt()

def large_nets(cin, nc, f, ncls):
    """lsun/model.lua 'large': G with {64, 368, 128, 224} maps, 7x7 grouped convs, each ReLU then BN, spatial
    dropout, L2 pooling of channel pairs; D with {48, 448, 416} maps, grouped, no BN."""
    bn = lambda n: nn.BatchNorm2d(n, affine=False)
    g = nn.Sequential(nn.Conv2d(cin, 64, 7, padding=3), nn.ReLU(), bn(64),
                      nn.Conv2d(64, 368, 7, padding=3, groups=4), nn.ReLU(), bn(368), nn.Dropout2d(0.5),
                      nn.Conv2d(368, 128, 7, padding=3, groups=4), nn.ReLU(), bn(128), PairL2Pool(),
                      nn.Conv2d(64, 224, 5, padding=2, groups=2), nn.ReLU(), bn(224), nn.Dropout2d(0.5),
                      nn.Conv2d(224, nc, 7, padding=3), bn(nc))
    (p1, p2, p3), s = pads(f, [3, 5, 7], [1, 1, 1])
    d = nn.Sequential(nn.Conv2d(nc + (ncls > 0), 48, 3, padding=p1), nn.ReLU(),
                      nn.Conv2d(48, 448, 5, padding=p2, groups=4), nn.ReLU(),
                      nn.Conv2d(448, 416, 7, padding=p3, groups=16), nn.ReLU(), nn.Flatten(),
                      nn.Linear(416 * s * s, 1), nn.Flatten(0))
    return g, d

def build_level(targs, k, sizes, nc, ncls):
    """-> (G_k, D_k) for level k of the pyramid `sizes` (targs: the training arguments as a dict)."""
    cin = 1 + (ncls > 0) + nc
    if k == 0:
        g, d = mlp_nets(targs["nz"], nc, sizes[0], ncls)
    elif targs["model"] == "large":
        g, d = large_nets(cin, nc, sizes[k], ncls)
    else:
        g, d = conv_nets(cin, nc, sizes[k], targs["width_g"], targs["width_d"], ncls)
    return Conditioned(g, ncls, sizes[k], k == 0), Conditioned(d, ncls, sizes[k], k == 0)

# ----------------------------------------------------------------------------- SGD schedule, balancing rule
def sgd_schedule(epoch, lr0, m0, m_max=0.8, m_step=0.0008, decay=4e-5):
    """Sec. 3: after every epoch lr /= 1 + 4e-5 and momentum += 0.0008, up to 0.8. -> (lr, momentum)."""
    return lr0 / (1 + decay) ** (epoch - 1), min(m0 + m_step * (epoch - 1), m_max)

def set_sgd(opt, lr, momentum):
    # Torch's optim.sgd damps the new gradient by the momentum (buf = m buf + (1 - m) grad); PyTorch's
    # default dampening is 0, so it is set alongside
    for g in opt.param_groups:
        g.update(lr=lr, momentum=momentum, dampening=momentum)

def balance_rule(err_real, err_fake, margin=0.3, real_max=0.7):
    """lsun/train.lua: if D's error on fakes exceeds its error on reals by more than the margin, update D
    only, else G only; and update D whenever its real error exceeds 0.7. -> (update_d, update_g)."""
    d_only = err_fake > err_real + margin
    return d_only or err_real > real_max, not d_only

def global_mean(*values):
    """Average scalars over data-parallel ranks so every rank's balancing rule takes the same branch."""
    t = torch.stack([v.detach().float() for v in values])
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()

# ----------------------------------------------------------------------------- training (Sec. 2.3)
def bce(logits, target):
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))

def level_step(run, k, x, y):
    """One round at level k (cifar/train/double_conditional_adversarial.lua). x: 2B normalised real images:
    [0, B/2) real examples, [B/2, B) the coarse images of the D step's fakes, [B, 2B) fresh conditions for
    the G step. Levels train on real coarse images only, never on a coarser G's samples."""
    args, lv, ncls = run["args"], run["levels"][k], run["ncls"]
    h, B = args.batch_size // 2, args.batch_size
    fine, coarse = level_view(x, run["sizes"], k)
    z = noise(k, B + h, run["sizes"][k], args.nz, x.device)
    ac = lambda: torch.autocast(x.device.type, torch.bfloat16, enabled=args.amp and x.device.type == "cuda")
    with ac():
        made = lv["Gt"]([z, coarse[h:]] if k else [z], y[h:] if ncls else None)
        made = made + coarse[h:] if k else made  # D_k judges coarse + residual: the whole fine image
        logits = lv["Dt"]([torch.cat([fine[:h], made[:h].detach()])], y[:B] if ncls else None).float()
    err_real, err_fake = bce(logits[:h], 1.0), bce(logits[h:], 0.0)
    upd_d, upd_g = balance_rule(*global_mean(err_real, err_fake)) if args.balance else (True, True)
    if upd_d:
        lv["optD"].zero_grad(set_to_none=True)
        ((err_real + err_fake) / 2).backward()  # BCE averaged over the mixed batch, as the code
        lv["optD"].step()
    with ac():
        err_g = bce(lv["Dg"]([made[h:]], y[B:] if ncls else None).float(), 1.0)  # non-saturating loss
    if upd_g:
        lv["optG"].zero_grad(set_to_none=True)
        err_g.backward(inputs=list(lv["G"].parameters()))  # D's weights are not G's to change
        lv["optG"].step()
    p = torch.sigmoid(logits.detach())
    return {f"err_d{k}": (err_real + err_fake) / 2, f"err_g{k}": err_g, f"d_x{k}": p[:h].mean(),
            f"d_gz{k}": p[h:].mean(), f"upd_d{k}": float(upd_d), f"upd_g{k}": float(upd_g)}

def get_batch(run, idx, train=True):
    """Gather uint8 images on the device, crop to the finest level (random crops in training, Sec. 3.1: 28x28
    crops of CIFAR's 32x32; centred otherwise), normalise per channel."""
    x, s, dev = run["images"][idx], run["sizes"][-1], run["images"].device
    if x.shape[-1] > s:
        m, n = x.shape[-1] - s, len(idx)
        o = torch.randint(m + 1, (2, n, 1), device=dev) if train else torch.full((2, n, 1), m // 2, device=dev)
        r = torch.arange(s, device=dev)
        x = x[torch.arange(n, device=dev)[:, None, None, None], torch.arange(x.shape[1], device=dev)[:, None, None],
              (o[0] + r)[:, None, :, None], (o[1] + r)[:, None, None, :]]
    return (x.float() / 255 - run["mean"]) / run["std"], (run["labels"][idx] if run["ncls"] else None)

def batches(run, epoch):
    """This rank's share of one shuffled pass, B/2 real images per step (reproducible per epoch)."""
    n, h = len(run["images"]), run["args"].batch_size // 2
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(run["args"].seed * 100003 + epoch))
    perm = perm[run["rank"]::run["world"]].to(run["images"].device)
    return perm[: len(perm) // h * h].view(-1, h)

def log_row(run, epoch, acc, count):
    """Turn accumulated step tensors into one log.csv row (one host sync per logging interval)."""
    s, per = run["state"], {k: float(v) / count for k, v in acc.items()}
    row = {"step": s["step"], "epoch": epoch, "lr": s["lr"], "momentum": s["momentum"]}
    for m in ("err_d", "err_g", "d_x", "d_gz"):  # the mean over levels, for the progress line
        row[m] = sum(per[f"{m}{k}"] for k in run["train"]) / len(run["train"])
    row.update(per)
    if not all(math.isfinite(v) for v in row.values()):
        fail(f"the losses became NaN/inf at step {row['step']}; training stopped and the last good "
             f"checkpoint in {run['args'].outf} is kept (try a lower --lr or --balance)")
    return row

def run_epoch(run, epoch, t0):
    args, s, n = run["args"], run["state"], len(run["images"])
    s["lr"], s["momentum"] = sgd_schedule(epoch, args.lr, args.momentum)
    for opt in [run["levels"][k][o] for k in run["train"] for o in ("optD", "optG")] if args.optim == "sgd" else []:
        set_sgd(opt, s["lr"], s["momentum"])
    idx, acc, count = batches(run, epoch), {}, 0
    for i, b in enumerate(idx):
        # the fakes' and the G step's conditions: other real images drawn at random, as the code does
        x, y = get_batch(run, torch.cat([b, torch.randint(n, (args.batch_size * 3 // 2,), device=b.device)]))
        for k in run["train"]:
            for name, v in level_step(run, k, x, y).items():
                acc[name] = acc.get(name, 0) + (v.detach() if torch.is_tensor(v) else v)
        s["step"], count = s["step"] + 1, count + 1
        if s["step"] % args.log_every == 0 or i == len(idx) - 1:
            row, acc, count = log_row(run, epoch, acc, count), {}, 0
            if run["rank"] == 0:
                append_log(os.path.join(args.outf, "log.csv"), row)
                rate = (s["step"] - run["start_step"]) * args.batch_size * run["world"] / (time.time() - t0)
                left = ((args.epochs - epoch) * len(idx) + len(idx) - i - 1) * args.batch_size * run["world"]
                print(progress_line(epoch, args.epochs, i + 1, len(idx), row, rate, left / rate))

def pyramid_sizes(args, size):
    """--levels, or the paper's pyramid for the dataset (otherwise size/16 ... size, from 4 px)."""
    default = LEVELS.get(args.dataset) or [s for s in (size // 16, size // 8, size // 4, size // 2, size) if s >= 4]
    try:
        sizes = [int(v) for v in args.levels.split(",")] if args.levels else default
    except ValueError:
        fail(f"--levels {args.levels!r} is not a comma-separated list of sizes; use e.g. --levels 8,14,28")
    if len(sizes) < 2 or sizes[0] < 2 or any(b <= a for a, b in zip(sizes, sizes[1:])) or sizes[-1] > size:
        fits = default if default[-1] <= size else sorted({size >> i for i in range(5) if size >> i >= 4})
        fits = fits if len(fits) > 1 else [max(2, size // 2), size]
        if size < 3:
            fail(f"{size} px images are too small for a pyramid; use --image-size 8 or more")
        what = f"--levels {','.join(map(str, sizes))}" if args.levels else f"the {args.dataset} pyramid {sizes}"
        fail(f"{what} must be 2 or more increasing sizes from 2 px up to the "
             f"image size {size}; use e.g. --levels {','.join(map(str, fits))}")
    return sizes

def channel_stats(images):
    """Per-channel mean and std of the training split, [0, 1] pixel units, shaped 1 x C x 1 x 1."""
    s = torch.zeros(2, images.shape[1], dtype=torch.float64)
    for c in images.split(4096):
        s += torch.stack([(c.double() / 255).sum((0, 2, 3)), (c.double() / 255).pow(2).sum((0, 2, 3))])
    m = s / (images.numel() / images.shape[1])
    return m[0].float().view(1, -1, 1, 1), (m[1] - m[0] ** 2).clamp(min=1e-8).sqrt().float().view(1, -1, 1, 1)

def setup_training(args, device, rank, world, data=None):
    images, labels, classes = data or load_dataset(args, "train")
    args.image_size, args.nc = images.shape[-1], images.shape[1]
    sizes, ncls = pyramid_sizes(args, args.image_size), len(classes) if args.conditional else 0
    if args.level is not None and not 0 <= args.level < len(sizes):
        fail(f"--level {args.level} is out of range; this pyramid has levels 0..{len(sizes) - 1}")
    if args.batch_size % 2:
        fail(f"--batch-size {args.batch_size} must be even: D's batch is half real, half generated")
    if len(images) < args.batch_size * world:
        fail(f"only {len(images)} training images, fewer than one batch of --batch-size {args.batch_size}"
             f"{f' on each of {world} ranks' if world > 1 else ''}; lower --batch-size or add images")
    levels, train = {}, [args.level] if args.level is not None else list(range(len(sizes)))
    for k in train:
        torch.manual_seed(args.seed + 1000 * k)  # level k starts from the same weights, alone or not
        G, D = (m.to(device) for m in build_level(vars(args), k, sizes, args.nc, ncls))
        make_opt = lambda m: (torch.optim.SGD(m.parameters(), args.lr, momentum=args.momentum, dampening=args.momentum)
                              if args.optim == "sgd" else torch.optim.Adam(m.parameters(), args.lr, betas=(0.5, 0.999)))
        levels[k] = {"G": G, "D": D, "optG": make_opt(G), "optD": make_opt(D)}
        if rank == 0:  # the Eyescream rule of thumb: D with about 0.5 (or 0.125) of G's parameters
            ng, nd = (sum(p.numel() for p in m.parameters()) for m in (G, D))
            print(f"level {k}: G {ng:,} parameters, D {nd:,}, D/G = {nd / ng:.3f}")
    torch.manual_seed(args.seed + rank)
    mean, std = channel_stats(images)
    return {"args": args, "images": images.to(device), "labels": labels.to(device), "classes": classes,
            "ncls": ncls, "sizes": sizes, "levels": levels, "train": train, "rank": rank, "world": world,
            "mean": mean.to(device), "std": std.to(device),
            "state": {"epoch": 0, "step": 0, "lr": args.lr, "momentum": args.momentum, "best": {}}}

def wrap_nets(run, device):
    """DDP for data parallelism, torch.compile for speed; the G step's D forward uses D itself so that only
    G's gradients are computed and all-reduced there."""
    for lv in run["levels"].values():
        Gt, Dt = lv["G"], lv["D"]
        if run["world"] > 1:
            ids = [device.index] if device.type == "cuda" else None
            Gt, Dt = (nn.parallel.DistributedDataParallel(m, device_ids=ids) for m in (Gt, Dt))
        lv["Dg"] = lv["D"]
        if run["args"].compile:
            Gt, Dt, lv["Dg"] = torch.compile(Gt), torch.compile(Dt), torch.compile(lv["D"])
        lv["Gt"], lv["Dt"] = Gt, Dt

MAY_CHANGE = ["dataroot", "epochs", "outf", "cuda", "amp", "compile", "workers", "log_every"]
SAMPLING_ONLY = ["sample", "ckpt", "n", "label", "npz", "out", "resample", "upscale", "chain", "switch", "eval",
                 "eval_images", "eval_samples", "eval_cond", "resume"]  # not used in training

def resume_args(args, typed):
    """--resume: the checkpoint's training flags, with those a resume may change taken from the command line."""
    ckpt = load_checkpoint(os.path.join(args.outf, "ckpt.pt"), SCRIPT)
    differ = [k for k in sorted(typed) if k not in MAY_CHANGE + SAMPLING_ONLY and getattr(args, k) != ckpt["args"].get(k)]
    if differ:
        fail(f"--resume keeps the checkpoint's training flags; {', '.join('--' + k.replace('_', '-') for k in differ)} "
             f"differ from it (only {', '.join('--' + k.replace('_', '-') for k in MAY_CHANGE)} may change): "
             f"drop them, or start a new run with another --outf")
    if ckpt["epoch"] >= args.epochs:
        fail(f"the checkpoint has already trained {ckpt['epoch']} epochs; give --epochs larger than {ckpt['epoch']} "
             f"to train more")
    return argparse.Namespace(**{**ckpt["args"], **{k: getattr(args, k) for k in MAY_CHANGE}, "resume": True}), ckpt

def train(args, device, rank=0, world=1, typed=()):
    args.outf = args.outf or os.path.join("out", f"{SCRIPT}-{args.dataset}")
    if args.resume:
        args, ckpt = resume_args(args, typed)
    elif any(os.path.exists(os.path.join(args.outf, f)) for f in ("ckpt.pt", "log.csv")):
        fail(f"{args.outf} already holds a run; add --resume to continue it, or choose another --outf")
    run = setup_training(args, device, rank, world)
    if args.resume:
        restore(run, ckpt)
    wrap_nets(run, device)
    os.makedirs(args.outf, exist_ok=True)
    val = load_dataset(args, "test") if rank == 0 and args.select else None
    run["start_step"], t0 = run["state"]["step"], time.time()
    for epoch in range(run["state"]["epoch"] + 1, args.epochs + 1):
        run_epoch(run, epoch, t0)
        run["state"]["epoch"] = epoch
        if rank == 0:
            end_of_epoch_files(run, epoch, val)
    return run

# ----------------------------------------------------------------------------- model selection, run files
@torch.no_grad()
def selection_score(G, k, x, y, sizes, nz, gen, n=128):
    """cifar/train/conditional_adversarial.lua approxParzen: per validation image, 128 samples from its own
    coarse image; the smallest L2 distance to the true fine image, averaged over images (lower is better)."""
    dists = []
    for i in range(len(x)):
        fine, coarse = level_view(x[i:i + 1], sizes, k)
        made = G([noise(k, n, sizes[k], nz, x.device, gen), coarse.expand(n, -1, -1, -1)] if k else
                 [noise(k, n, sizes[k], nz, x.device, gen)], None if y is None else y[i:i + 1].expand(n))
        dists.append(((made + coarse if k else made) - fine).flatten(1).norm(dim=1).min())
    return torch.stack(dists).mean().item()

def level_states(run, ks, opt=False):
    names = ("G", "D", "optG", "optD") if opt else ("G", "D")
    return {k: {m: run["levels"][k][m].state_dict() for m in names} for k in ks}

def end_of_epoch_files(run, epoch, val):
    """Model selection (best.pt), the sample sheet, ckpt.pt and curves.png, on rank 0."""
    args, s, dev = run["args"], run["state"], run["images"].device
    gen = torch.Generator(dev).manual_seed(args.seed)  # the same noise every epoch; training RNG untouched
    if not all(torch.isfinite(p).all() for lv in run["levels"].values() for p in lv["G"].parameters()):
        fail(f"G's weights became NaN/inf in epoch {epoch}; the last good checkpoint in {args.outf} is kept")
    for lv in run["levels"].values():
        lv["G"].eval()
    meta = {"script": SCRIPT, "args": vars(args), "classes": run["classes"], "sizes": run["sizes"],
            "mean": run["mean"].cpu(), "std": run["std"].cpu(), "epoch": epoch}
    if val is not None:  # the last test images; --eval scores the first ones
        v = {**run, "images": val[0][-args.select:].to(dev), "labels": val[1][-args.select:].to(dev)}
        x, y = get_batch(v, torch.arange(len(v["images"]), device=dev), False)
        score = {k: selection_score(run["levels"][k]["G"], k, x, y, run["sizes"], args.nz, gen) for k in run["train"]}
        append_log(os.path.join(args.outf, "select.csv"), {"epoch": epoch, **{f"dist{k}": d for k, d in score.items()}})
        better, path = [k for k, d in score.items() if d < s["best"].get(k, math.inf)], f"{args.outf}/best.pt"
        if better:
            old = load_checkpoint(path, SCRIPT)["levels"] if os.path.exists(path) else {}
            s["best"].update({k: score[k] for k in better})
            save_checkpoint({**meta, "levels": {**old, **level_states(run, better)}}, path)
    if len(run["train"]) == len(run["sizes"]):  # conditional: one row per class
        n, yl = (3 * run["ncls"], torch.arange(3 * run["ncls"], device=dev) // 3) if run["ncls"] else (24, None)
        chain = sample_chain([run["levels"][k]["G"] for k in run["train"]], run["sizes"], n, args.nz, yl, dev, gen)
        save_grid(level_sheet(chain, run), os.path.join(args.outf, f"samples_e{epoch:03d}.png"), 3 * len(chain))
    else:
        k = run["train"][0]  # one level alone: samples from real coarse images
        resample_sheet(run["levels"][k]["G"], k, run, 6, args.nz, f"{args.outf}/samples_e{epoch:03d}.png", gen)
    for lv in run["levels"].values():
        lv["G"].train()
    save_checkpoint({**meta, "levels": level_states(run, run["train"], True), "step": s["step"],
                     "balance": {"best": s["best"]}, "rng": rng_state()}, os.path.join(args.outf, "ckpt.pt"))
    plot_curves(os.path.join(args.outf, "log.csv"), os.path.join(args.outf, "curves.png"),
                [(f"level {k}", [f"err_d{k}", f"err_g{k}", f"d_x{k}", f"d_gz{k}"]) for k in run["train"]])

def restore(run, ckpt):
    for k, lv in run["levels"].items():
        if k not in ckpt["levels"]:
            fail(f"the checkpoint does not hold level {k}; resume with the same --level")
        for m in ("G", "D", "optG", "optD"):
            lv[m].load_state_dict(ckpt["levels"][k][m])
    run["state"].update(epoch=ckpt["epoch"], step=ckpt["step"], best=dict(ckpt["balance"]["best"]))
    set_rng_state(ckpt["rng"])
    if run["rank"] == 0:
        trim_log(os.path.join(run["args"].outf, "log.csv"), "step", ckpt["step"])
        trim_log(os.path.join(run["args"].outf, "select.csv"), "epoch", ckpt["epoch"])
    else:  # the checkpoint holds rank 0's RNG; the other ranks need noise of their own
        torch.manual_seed(run["args"].seed + run["rank"] + 7919 * ckpt["epoch"])
    print(f"resumed from epoch {ckpt['epoch']}, step {ckpt['step']}")

# ----------------------------------------------------------------------------- checkpoints, logs, pictures
def save_checkpoint(obj, path):
    """Atomic: written to PATH.tmp, synced to the disk, then renamed, so a crash, a power cut or a full disk
    leaves the previous checkpoint intact."""
    try:
        with open(path + ".tmp", "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    except OSError as e:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        if e.errno == errno.ENOSPC:
            fail(f"no space left on {os.path.dirname(os.path.abspath(path))} writing {path}; the last checkpoint is kept")
        fail(f"could not write {path} ({e.strerror}); the last checkpoint is kept")

def load_checkpoint(path, script):
    if not os.path.exists(path):
        fail(f"no checkpoint at {path}; train first or point --ckpt/--outf at a run folder")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{path} is not a readable checkpoint ({type(e).__name__}); delete or replace it")
    if not isinstance(ckpt, dict) or ckpt.get("script") != script:
        other = ckpt.get("script") if isinstance(ckpt, dict) else None
        fail(f"{path} was written by {other or 'another program'}.py, not {script}.py; use that script")
    return ckpt

def rng_state():
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}

def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])

def append_log(path, row):
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

def trim_log(path, key, last):
    """After a crash, drop the rows past the checkpoint (column `key` above `last`): the resumed run writes
    them again."""
    if os.path.exists(path):
        with open(path) as f:
            rows = list(csv.DictReader(f))
        os.remove(path)
        for r in rows:
            if int(r[key]) <= last:
                append_log(path, r)

def progress_line(epoch, epochs, it, iters, row, rate, eta_s):
    eta = f"{eta_s / 60:.0f}m" if eta_s >= 60 else f"{eta_s:.0f}s"
    return (f"[e {epoch}/{epochs} it {it}/{iters}] D {row['err_d']:.2f} G {row['err_g']:.2f} "
            f"D(x) {row['d_x']:.2f} D(G(z)) {row['d_gz']:.2f} | {rate:.0f} img/s | ETA {eta}")

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]

def plot_curves(csv_path, png_path, panels, w=640, h=200):
    """Line plots of log.csv columns, one panel per group, drawn with Pillow (no plotting library)."""
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    if len(rows) < 2:
        return
    img = Image.new("RGB", (w, h * len(panels)), "white")
    draw = ImageDraw.Draw(img)
    steps = [float(r["step"]) for r in rows]
    for p, (title, keys) in enumerate(panels):
        top, keys = p * h, [k for k in keys if k in rows[0]]
        vals = [[float(r[k]) for r in rows] for k in keys]
        lo, hi = min(map(min, vals)), max(map(max, vals))
        hi = hi if hi > lo else lo + 1
        px = lambda s: 50 + (s - steps[0]) / max(steps[-1] - steps[0], 1) * (w - 60)
        py = lambda v: top + h - 20 - (v - lo) / (hi - lo) * (h - 40)
        draw.rectangle([50, top + 20, w - 10, top + h - 20], outline="grey")
        draw.text((52, top + 4), title, fill="black")
        draw.text((2, top + 18), f"{hi:.3g}", fill="black"), draw.text((2, top + h - 30), f"{lo:.3g}", fill="black")
        for j, (k, v) in enumerate(zip(keys, vals)):
            c = COLOURS[j % len(COLOURS)]
            draw.line([(px(s), py(x)) for s, x in zip(steps, v)], fill=c, width=1)
            draw.text((150 + 110 * j, top + 4), k, fill=c)
    img.save(png_path)

def to_uint8(x):
    """[-1, 1] float N x C x H x W -> uint8 N x H x W x C."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()

def grid_image(images, nrow=8, pad=2):
    x = to_uint8(images) if torch.is_tensor(images) else images
    n, h, w, c = x.shape
    ncol = -(-n // nrow)
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = x[i]
    return Image.fromarray(grid.squeeze(-1) if c == 1 else grid)

def save_grid(images, path, nrow=8):
    grid_image(images, nrow).save(path)

def save_npz(path, images, labels=None):
    extra = {"labels": np.asarray(labels, np.int64)} if labels is not None else {}
    np.savez(path, images=to_uint8(images), **extra)

# ----------------------------------------------------------------------------- sampling (Sec. 2.3)
@torch.no_grad()
def sample_chain(Gs, sizes, n, nz, y, device, gen=None, upscale=0, images=()):
    """generate.lua: G_0 draws the base image from noise; each later level upsamples the image so far and
    adds G_k's residual. --upscale runs the finest G again past its training size (the blog's 'recursive'
    images). `images`: the coarse levels already drawn (--chain). -> the image at every level, coarse to fine."""
    out = list(images)
    for k in range(len(out), len(Gs) + upscale):
        G, f = Gs[min(k, len(Gs) - 1)], sizes[k] if k < len(sizes) else round(out[-1].shape[-1] * sizes[-1] / sizes[-2])
        if k == 0:
            x = G([noise(0, n, f, nz, device, gen)], y)
        else:
            c = up(out[-1], f)
            x = c + G([noise(k, n, f, nz, device, gen), c], y)
        out.append(x.float())
    return out

def renormalise(x, mean_a, std_a, mean_b, std_b):
    """A's normalised images in B's normalisation: exact at any level, as `down` and `up` commute with it."""
    return (x * std_a + mean_a - mean_b) / std_b

def to_display(x, mean, std):
    """Normalised images -> [-1, 1] in true colours (save_grid's and save_npz's convention)."""
    return (x * std.to(x.device) + mean.to(x.device)) * 2 - 1

def level_sheet(chain, run):
    """Every level of each sample side by side, enlarged (nearest) to the finest size."""
    big = [F.interpolate(x, chain[-1].shape[-2:], mode="nearest") for x in chain]
    return to_display(torch.stack(big, 1).flatten(0, 1), run["mean"], run["std"])

def resample_sheet(G, k, run, n, nz, path, gen=None):
    """The paper's check that G does not copy: per row a real image, its coarse image, then n samples of
    level k drawn from that same coarse image (and class)."""
    dev, f = run["images"].device, run["sizes"][k]
    x, y = get_batch(run, torch.arange(8, device=dev) % len(run["images"]), False)
    fine, coarse = level_view(x, run["sizes"], k)
    c = coarse if k else torch.zeros_like(fine)
    cc = c.repeat_interleave(n, 0)
    with torch.no_grad():
        made = G([noise(k, 8 * n, f, nz, dev, gen), cc][:1 + (k > 0)], None if y is None else y.repeat_interleave(n))
    rows = torch.cat([fine[:, None], c[:, None], (made.float() + cc).view(8, n, *fine.shape[1:])], 1)
    save_grid(to_display(rows.flatten(0, 1), run["mean"], run["std"]), path, n + 2)

def load_levels(paths, need=None):
    """Generators {level: G} of one pyramid from one or more checkpoints (levels trained apart with
    --level K); `need`: the levels that must be there (default: all)."""
    Gs, first = {}, None
    for path in paths:
        ck = load_checkpoint(path, SCRIPT)
        ncls = len(ck["classes"]) if ck["args"]["conditional"] else 0
        if first and (ck["sizes"], ck["args"]["nc"], ncls) != first[1]:
            fail(f"{path} holds another pyramid (sizes, channels, classes) than {paths[0]}; use matching runs")
        first = first or (ck, (ck["sizes"], ck["args"]["nc"], ncls))
        for k, st in ck["levels"].items():
            Gs[k] = build_level(ck["args"], k, ck["sizes"], ck["args"]["nc"], ncls)[0]
            Gs[k].load_state_dict(st["G"])
    missing = [k for k in (range(len(first[0]["sizes"])) if need is None else need) if k not in Gs]
    if missing:
        fail(f"level {missing[0]} is in none of {' '.join(paths)}; add the checkpoint of the run that trained it")
    return {k: G.eval() for k, G in Gs.items()}, first[0]

def chain_levels(a, b, switch):
    """--chain A B: start with one model's coarse levels (the blog's cats) and finish with another's (horses).
    -> (A's generators below the switch, B's pyramid, B's checkpoint)."""
    ca, cb = (load_checkpoint(p, SCRIPT) for p in (a, b))
    if not 1 <= switch < len(cb["sizes"]):
        fail(f"--switch {switch} is out of range; {b} has levels 0..{len(cb['sizes']) - 1}")
    sa, sb = ca["sizes"], cb["sizes"]
    ncls = [len(c["classes"]) if c["args"]["conditional"] else 0 for c in (ca, cb)]
    fits = switch <= len(sa) and sa[switch - 1] == sb[switch - 1] and ca["args"]["nc"] == cb["args"]["nc"]
    if not fits or ncls[0] != ncls[1]:
        fail(f"{a} and {b} do not fit at level {switch}: B's level {switch} takes {sb[switch - 1]} px images with "
             f"{cb['args']['nc']} channels ({ncls[1]} classes) from A; pick another --switch or checkpoints")
    ga, gb = load_levels([a], range(switch))[0], load_levels([b], range(switch, len(sb)))[0]
    return [ga[k] for k in range(switch)], ca, [gb[k] for k in range(switch, len(sb))], cb

def sample(args):
    if args.chain:
        Ga, ca, Gb, ck = chain_levels(*args.chain, args.switch)
    else:
        Gs, ck = load_levels(args.ckpt)
        Ga, ca, Gb = [], None, [Gs[k] for k in range(len(ck["sizes"]))]
    dev = pick_device(args)
    Ga, Gb, sizes, nz = [G.to(dev) for G in Ga], [G.to(dev) for G in Gb], ck["sizes"], ck["args"]["nz"]
    ncls = len(ck["classes"]) if ck["args"]["conditional"] else 0
    run = {"mean": ck["mean"].to(dev), "std": ck["std"].to(dev), "sizes": sizes, "ncls": ncls}
    torch.manual_seed(args.seed)
    stem = os.path.splitext(args.out or os.path.join(os.path.dirname((args.chain or args.ckpt)[-1]), "samples.png"))[0]
    if args.label is not None and not ncls:
        fail(f"{(args.chain or args.ckpt)[-1]} was trained without --conditional; drop --label")
    if ncls and args.label is not None and not 0 <= args.label < ncls:
        fail(f"--label {args.label} is out of range; this model has classes 0..{ncls - 1}")
    labels = lambda n: (torch.full((n,), args.label) if args.label is not None else torch.randint(ncls, (n,))
                        ).to(dev) if ncls else None

    def chain(n, y, upscale=0):
        """A's levels (with A's noise size), mapped into B's normalisation, then B's levels."""
        first = sample_chain(Ga, ca["sizes"], n, ca["args"]["nz"], y, dev) if Ga else []
        stats = [ca[m].to(dev) for m in ("mean", "std")] if Ga else []
        first = [renormalise(x, *stats, run["mean"], run["std"]) for x in first]
        return sample_chain(Ga + Gb, sizes, n, nz, y, dev, upscale=upscale, images=first)
    y = labels(args.n)
    chain_imgs = chain(args.n, y)
    save_grid(level_sheet(chain_imgs, run), stem + ".png", len(chain_imgs) * 4)
    if args.npz:
        save_npz(args.npz, to_display(chain_imgs[-1], run["mean"], run["std"]), None if y is None else y.cpu())
    if args.upscale:
        big = chain(8, labels(8), args.upscale)[-1]
        save_grid(to_display(big, run["mean"], run["std"]), stem + "_upscale.png", 4)
    if args.resample or args.eval:
        test = load_dataset(argparse.Namespace(**{**ck["args"], "limit": None}), "test")
        run.update(images=test[0].to(dev), labels=test[1].to(dev))
    if args.resample:
        resample_sheet(Gb[-1], len(sizes) - 1, run, args.resample, nz, stem + "_resample.png")
    if args.eval and Ga:
        fail("--eval scores one model's pyramid; drop --chain (or --eval)")
    if args.eval:
        evaluate(args, Gb, run, ck, nz, stem)
    print(f"wrote {stem}*.png" + (f" and {args.npz}" if args.npz else ""))

# ----------------------------------------------------------------------------- evaluation (Sec. 4.1)
def parzen_ll(d2, dim, sigma):
    """Gaussian Parzen window (Goodfellow et al. 2014): log mean_j N(x_i; s_j, sigma^2 I) from the squared
    distances d2 (images x samples). -> (images,), in nats."""
    log_norm = math.log(d2.shape[1]) + dim / 2 * math.log(2 * math.pi * sigma ** 2)
    return torch.logsumexp(-d2 / (2 * sigma ** 2), 1) - log_norm

def val_test_ll(d2, n_val, dim):
    """sigma chosen on the first n_val (validation) images, then applied to the rest (test)."""
    sigma = max(torch.logspace(-2.5, 0, 26).tolist(), key=lambda s: parzen_ll(d2[:n_val], dim, s).mean().item())
    return parzen_ll(d2[n_val:], dim, sigma), sigma

@torch.no_grad()
def base_d2(G, base, y, nz, m, pix):
    """Squared distances (pixel units) of each true base image to m samples of G_0; with classes, the samples
    of each image's own class, so the base is scored as log q_0(I_0 | y) like the residual levels."""
    d2 = torch.empty(len(base), m, dtype=torch.float64, device=base.device)
    for c in (y.unique().tolist() if y is not None else [None]):
        rows = torch.ones(len(base), dtype=torch.bool, device=base.device) if c is None else y == c
        yc = None if c is None else torch.full((m,), c, device=base.device)
        made = torch.cat([G([noise(0, len(i), base.shape[-1], nz, base.device)], None if yc is None else yc[i])
                          for i in torch.arange(m, device=base.device).split(1000)])
        d2[rows] = torch.cdist(pix(base[rows]), pix(made)).pow(2)
    return d2

@torch.no_grad()
def residual_d2(G, coarse, h, y, run, nz, m):
    """Squared distances (pixel units) of each image's true residual h to m residuals drawn from its own
    coarse image (and class)."""
    rows = []
    for i in range(len(h)):
        c, yi = coarse[i:i + 1].expand(m, -1, -1, -1), None if y is None else y[i:i + 1].expand(m)
        made = G([noise(1, m, h.shape[-1], nz, h.device), c], yi).float()
        rows.append(((made - h[i:i + 1]) * run["std"]).flatten(1).pow(2).sum(1))
    return torch.stack(rows).double()

@torch.no_grad()
def evaluate(args, Gs, run, ck, nz, stem):
    """Sec. 4.1: log p(I) = log q_0(I_0) + sum_k log q_k(h_k | u(I_{k-1})), a Parzen window per level on
    pixels in [0, 1]: the base from --eval-samples samples, each residual from --eval-cond samples drawn from
    the test image's own coarse image. A conditional model is scored as log p(I | y): every level, the base
    included, conditioned on the test image's true label. The pyramid's coefficients are scored as the
    paper does."""
    dev, sizes = run["images"].device, run["sizes"]
    n_val = min(1000, len(run["images"]) // 2)  # as gan.py: sigma on test[:1000], scores on test[1000:2000]
    x, y = get_batch(run, torch.arange(min(len(run["images"]), n_val + args.eval_images), device=dev), False)
    pix = lambda t: (t.float() * run["std"] + run["mean"]).flatten(1).double()
    base_x, res = laplacian_pyramid(x, sizes)  # the coefficients that are scored
    d2 = base_d2(Gs[0], base_x, y, nz, args.eval_samples, pix)
    total, sigma = val_test_ll(d2, n_val, x.shape[1] * sizes[0] ** 2)
    report = [f"level 0 {total.mean().item():.1f} (sigma {sigma:.3f})"]
    for k in range(1, len(Gs)):
        coarse = up(reconstruct(base_x, res[:k - 1]), sizes[k])
        d2 = residual_d2(Gs[k], coarse, res[k - 1], y, run, nz, args.eval_cond)
        ll, sigma = val_test_ll(d2, n_val, x.shape[1] * sizes[k] ** 2)
        total, report = total + ll, report + [f"level {k} {ll.mean().item():.1f} (sigma {sigma:.3f})"]
    print(f"Parzen log-likelihood: {total.mean().item():.1f} +- {(total.std() / math.sqrt(len(total))).item():.1f} "
          f"nats on {len(total)} test images ({'; '.join(report)})")
    fake = sample_chain(Gs, sizes, 32, nz, None if y is None else y[torch.arange(32, device=dev) % len(y)], dev)[-1]
    fake = to_display(fake, run["mean"], run["std"]).cpu()
    train = load_dataset(argparse.Namespace(**{**ck["args"], "limit": None}), "train")[0]
    m = (train.shape[-1] - sizes[-1]) // 2  # centre crops, the samples' size
    train = train[..., m:m + sizes[-1], m:m + sizes[-1]]
    d = [torch.cdist((fake.flatten(1) + 1) * 127.5, c.flatten(1).float()) for c in train.split(4096)]
    near = torch.cat(d, 1).argmin(1)
    pairs = np.stack([to_uint8(fake), train[near].permute(0, 2, 3, 1).numpy()], 1)  # sample beside its nearest
    save_grid(pairs.reshape(-1, *pairs.shape[2:]), stem + "_nn.png", 8)

# ----------------------------------------------------------------------------- benchmark and main
def bench(args, device):
    """Time --bench N training steps on random data of the configured size, after a warm-up."""
    size = args.image_size or {"mnist": 28, "fashion-mnist": 28, "folder": 64}.get(args.dataset, 32)
    nc = args.channels or (1 if args.dataset in ("mnist", "fashion-mnist") else 3)
    data = (torch.randint(0, 256, (4096, nc, size, size), dtype=torch.uint8), torch.randint(0, 10, (4096,)),
            [str(i) for i in range(10)])
    run = setup_training(args, device, 0, 1, data)
    wrap_nets(run, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    idx = torch.randint(4096, (args.bench + 3, 2 * args.batch_size), device=device)
    for i in range(args.bench + 3):
        if i == 3:  # after the warm-up (cuDNN autotuning, compilation)
            sync()
            t = time.perf_counter()
        x, y = get_batch(run, idx[i])
        for k in run["train"]:
            level_step(run, k, x, y)
    sync()
    dt = (time.perf_counter() - t) / args.bench
    mem = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if device.type == "cuda" else "n/a"
    mode = "+".join([m for m in ("amp", "compile") if getattr(args, m)]) or "fp32"
    levels = "-".join(map(str, run["sizes"])) + (f" level {args.level}" if args.level is not None else "")
    print(f"{args.batch_size / dt:.0f} img/s, {dt * 1000:.1f} ms/iter, peak memory {mem}")
    print(f"| lapgan.py {levels} | batch {args.batch_size} | {mode} | {device.type} | "
          f"{args.batch_size / dt:.0f} img/s |")

def main(argv=None):
    args = get_args(argv)
    if args.sample:
        return sample(args)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = pick_device(args, int(os.environ.get("LOCAL_RANK", 0)))
    if args.bench:
        return bench(args, device)
    if world > 1:  # launched by torchrun: one process per GPU (or CPU worker)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return train(args, device, rank, world, typed_flags(argv))
    finally:
        if world > 1:
            dist.destroy_process_group()

if __name__ == "__main__":
    main()
