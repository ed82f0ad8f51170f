"""lapgan.py: a Laplacian pyramid of adversarial networks (LAPGAN), the Eyescream model.

Paper: Denton, Chintala, Szlam & Fergus 2015, "Deep Generative Image Models using a Laplacian Pyramid of
Adversarial Networks" (NIPS), read beside its Torch code (Eyescream: cifar/, lsun/, generate.lua).

A Laplacian pyramid stores an image as a small base image plus one residual h_k = I_k - u(I_{k-1}) per finer
level, d(.) shrinking and u(.) enlarging an image. LAPGAN learns one conditional GAN per level: G_0 draws the
base image from noise; G_k draws the residual h_k from noise z_k and the upsampled coarser image u(I_{k-1});
D_k tells real fine images from u(I_{k-1}) + G_k(z_k, u(I_{k-1})). Each level trains alone, on real coarse
images; sampling runs the chain I_k = u(I_{k-1}) + G_k(z_k, u(I_{k-1})) from the base up (Sec. 2.3, Fig. 1).
Levels are numbered here from the base up (level 0 = the coarsest, the order of sampling), while the paper's
I_0 is the full image and its index grows towards the base.

Paper to code:
    Sec. 2.2  d(.), u(.), the pyramid and its inverse       down, up, laplacian_pyramid, reconstruct,
                                                            level_view
    Sec. 2.3  Fig. 1, the sampling chain; blog: --upscale   noise, sample_chain, upscale_chain, renormalise
    Sec. 2.3  one level's training step (Fig. 2)            Level, level_step, train_step
    Sec. 3    the networks (CIFAR-10, LSUN), conditioning   mlp_nets, conv_nets, large_nets, Conditioned
    Sec. 3    SGD schedule; lsun/train.lua's balance rule   sgd_schedule, set_sgd, balance_rule
    Sec. 4.1  Parzen log-likelihood; cifar/ model selection evaluate, parzen_ll, base_d2, selection_score
    Sec. 4.2  samples drawn from one real coarse image      resample_sheet (--resample)

Deviations: D outputs a logit and the loss is BCE-with-logits (= sigmoid + BCE); images are normalised per
channel with the training split's mean/std (the CIFAR code: per pixel), which commutes with d and u (--chain
maps one model's normalisation into another's); momentum is capped at 0.8 as in the paper (the code: 0.7);
D_k pads its convs where the code's unpadded ones would leave no pixels (below 14 px); the large model's L2
pooling adds 1e-6 under the root; each step's D and G updates share one G forward pass and all levels train
on the same real images (the code: separate jobs); model selection uses the last --select test images and
--eval the first ones. --model large takes the LSUN code's lr 0.01 and momentum from 0 but not its 1.5x-scaled
crops, horizontal flips or one model per class. --eval on a class-conditional model scores log p(I | y): every
level, the base included, conditioned on the test image's true label. `--optim adam` is an addition for short
runs; the defaults are the paper's SGD setting. `--lr-d` (D's own learning rate, the two time-scale rule of
Heusel et al. 2017) and `--dropout-d` are additions too: at the narrow widths of a CPU run D_k's learning
rate is raised, or D_k stays at chance and G_k's residuals stay noise (README: quality).

    python lapgan.py --dataset cifar10 --cuda                          # 8 -> 14 -> 28, all levels at once
    python lapgan.py --dataset cifar10 --cuda --level 2 --outf out/l2  # one level alone, on any GPU
    python lapgan.py --sample --ckpt out/lapgan-cifar10/ckpt.pt --resample 8 --upscale 3 --eval
"""
import argparse, csv, errno, gzip, hashlib, io, math, os, pickle, tarfile, time, urllib.request, zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

SCRIPT = "lapgan"
# Sec. 3.1: CIFAR-10 8 -> 14 -> 28 on 28 x 28 crops; the others: the same ratios on their own sizes
LEVELS = {"cifar10": [8, 14, 28], "mnist": [7, 14, 28], "fashion-mnist": [7, 14, 28], "shapes": [8, 16, 32]}

# ------------------------------------------------------------------------ Sec. 2.2: the Laplacian pyramid
def area_matrix(n_in, n_out, device=None):
    """Torch's image.scale when shrinking: output pixel i averages the source interval [i r, (i+1) r),
    r = n_in / n_out, a pixel cut by an end of it counted by the fraction covered. Rows sum to 1."""
    r = n_in / n_out
    start, j = torch.arange(n_out, dtype=torch.float64)[:, None] * r, torch.arange(n_in, dtype=torch.float64)
    return ((torch.minimum(start + r, j + 1) - torch.maximum(start, j)).clamp(min=0) / r).float().to(device)

def down(x, size):
    """d(.): area resampling of square N x C x n x n images, rows then columns (2:1 = 2x2 average pooling)."""
    A = area_matrix(x.shape[-1], size, x.device).to(x.dtype)  # size x n
    return x if x.shape[-1] == size else A @ x @ A.T  # N x C x size x size

def up(x, size):
    """u(.): bilinear with the corner pixels aligned (Torch's image.scale when enlarging)."""
    return x if x.shape[-1] == size else F.interpolate(x, (size, size), mode="bilinear", align_corners=True)

def laplacian_pyramid(x, sizes):
    """-> (base I_0, [h_1 .. h_K]), h_k = I_k - u(I_{k-1}); every I_k = d(x) is cut from the finest image
    (the code's pyramid), not from the level above."""
    gauss = [down(x, n) for n in sizes]
    return gauss[0], [fine - up(coarse, fine.shape[-1]) for coarse, fine in zip(gauss, gauss[1:])]

def reconstruct(base, residuals):
    """The exact inverse: I_k = u(I_{k-1}) + h_k, from the base up."""
    for h in residuals:
        base = up(base, h.shape[-1]) + h
    return base

def level_view(x, sizes, k):
    """What level k sees of real images x: (I_k, u(I_{k-1}), or None at the base)."""
    return down(x, sizes[k]), (up(down(x, sizes[k - 1]), sizes[k]) if k else None)

# ------------------------------------------------------------------------ Sec. 2.3, Fig. 1: sampling
def noise(k, n, size, nz, device, gen=None):
    """Sec. 3: uniform on [-1, 1]; a 100-d vector at the base (n x nz), one extra input plane at level k
    (n x 1 x size x size)."""
    shape = (n, nz) if k == 0 else (n, 1, size, size)
    return torch.rand(shape, device=device, generator=gen) * 2 - 1

@torch.no_grad()
def sample_chain(Gs, sizes, n, nz, y, device, gen=None, images=()):
    """Fig. 1 (generate.lua): I_0 = G_0(z_0), then I_k = u(I_{k-1}) + G_k(z_k, u(I_{k-1})) up to the finest
    level. `images`: coarse levels already drawn (--chain). -> [I_0, ..., I_K], each N x C x s_k x s_k."""
    out = list(images)
    for k in range(len(out), len(Gs)):
        if k == 0:
            out.append(Gs[0]([noise(0, n, sizes[0], nz, device, gen)], y).float())
        else:
            coarse = up(out[-1], sizes[k])  # u(I_{k-1})
            out.append((coarse + Gs[k]([noise(k, n, sizes[k], nz, device, gen), coarse], y)).float())
    return out

@torch.no_grad()
def upscale_chain(chain, G, ratio, steps, y, gen=None):
    """--upscale (the Eyescream blog's 'recursive' images): the finest G run `steps` more times past its
    training size, each time enlarging by the pyramid's last ratio. -> the chain, `steps` levels longer."""
    for _ in range(steps):
        coarse = up(chain[-1], round(chain[-1].shape[-1] * ratio))
        made = G([noise(1, len(coarse), coarse.shape[-1], 0, coarse.device, gen), coarse], y)
        chain = chain + [(coarse + made).float()]
    return chain

def renormalise(x, mean_a, std_a, mean_b, std_b):
    """--chain A B: A's normalised images in B's normalisation. Exact at every level, because `down` and
    `up` commute with a per-channel affine map (the pyramid's residuals only scale)."""
    return (x * std_a + mean_a - mean_b) / std_b

# ------------------------------------------------------------------------ Sec. 2.3: one level's training step
@dataclass
class Level:
    """Level k of the pyramid. The G step's forward through D uses D itself (fwd["DG"]), not its
    data-parallel wrapper: only G's gradients are wanted there, so only they are computed and all-reduced."""
    nets: dict  # {"G": G_k, "D": D_k}: the modules that are saved
    opts: dict  # {"G": ..., "D": ...}: their optimisers (SGD as the paper, or Adam)
    fwd: dict   # {"G", "D", "DG"}: the callables of the forward passes (DDP/compiled wrappers, or the nets)

@dataclass
class Run:
    """One training run (or, for the sampling commands, a model's data view with no levels)."""
    sizes: list                        # pyramid sizes, base to finest (s_0 < ... < s_K)
    ncls: int                          # classes fed to G and D; 0: unconditional
    mean: torch.Tensor                 # per-channel mean and std of the training split, 1 x C x 1 x 1
    std: torch.Tensor
    classes: list = None               # class names
    images: torch.Tensor = None        # uint8 N x C x H x W images on the device
    labels: torch.Tensor = None        # int64 N class labels on the device
    args: argparse.Namespace = None    # the user's flags (the checkpoint's, on --resume)
    levels: dict = field(default_factory=dict)  # k -> Level: the levels this run trains
    rank: int = 0                      # data-parallel rank and number of ranks
    world: int = 1
    epoch: int = 0                     # epochs and steps done
    step: int = 0
    lr: float = 0.0                    # this epoch's learning rate and momentum (Sec. 3)
    momentum: float = 0.0
    best: dict = field(default_factory=dict)  # k -> the lowest model-selection distance so far

    @property
    def nets(self):
        """Every saved module: "G0", "D0", "G1", ..."""
        return {f"{m}{k}": net for k, lv in self.levels.items() for m, net in lv.nets.items()}

def bce(logits, target):
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))

def level_step(run, k, x, y):
    """One round at level k (cifar/train/double_conditional_adversarial.lua). x holds 2B normalised real
    images (B = --batch-size) in three roles: x[:B/2] the real examples D_k sees; x[B/2:B] the images whose
    coarse versions u(I_{k-1}) condition the B/2 fakes D_k sees; x[B:] those conditioning G_k's step (B
    fakes). Levels train on real coarse images only, never on a coarser G's samples. -> statistics."""
    args, lv, half, B = run.args, run.levels[k], run.args.batch_size // 2, run.args.batch_size
    fine, coarse = level_view(x, run.sizes, k)  # I_k, u(I_{k-1}): 2B x C x s_k x s_k
    z = noise(k, B + half, run.sizes[k], args.nz, x.device)
    amp = dict(device_type=x.device.type, dtype=torch.bfloat16, enabled=args.amp and x.device.type == "cuda")
    with torch.autocast(**amp):
        made = lv.fwd["G"]([z, coarse[half:]] if k else [z], y[half:])  # 3B/2 residuals (base images at 0)
        if k:
            made = made + coarse[half:]  # D_k judges u(I_{k-1}) + h~_k: the whole fine image
        logits = lv.fwd["D"]([torch.cat([fine[:half], made[:half].detach()])], y[:B]).float()  # B
    err_real, err_fake = bce(logits[:half], 1.0), bce(logits[half:], 0.0)
    upd_d, upd_g = balance_rule(*global_mean(err_real, err_fake)) if args.balance else (True, True)
    if upd_d:
        lv.opts["D"].zero_grad(set_to_none=True)
        ((err_real + err_fake) / 2).backward()  # BCE averaged over the mixed batch, as the code
        lv.opts["D"].step()
    with torch.autocast(**amp):
        err_g = bce(lv.fwd["DG"]([made[half:]], y[B:]).float(), 1.0)  # non-saturating: log D(G(z)) up
    if upd_g:
        lv.opts["G"].zero_grad(set_to_none=True)
        err_g.backward(inputs=list(lv.nets["G"].parameters()))  # D's weights are not G's to change
        lv.opts["G"].step()
    p = torch.sigmoid(logits.detach())
    return {f"err_d{k}": ((err_real + err_fake) / 2).detach(), f"err_g{k}": err_g.detach(),
            f"d_x{k}": p[:half].mean(), f"d_gz{k}": p[half:].mean(), f"upd_d{k}": float(upd_d),
            f"upd_g{k}": float(upd_g)}

def train_step(run, idx):
    """One real training step of every level in the run. Takes a Run (from setup_run) and idx: 2B indices
    into run.images (B/2 real examples, then 3B/2 images whose coarse versions condition the fakes).
    -> {name: statistic} over the levels."""
    x, y = get_batch(run, idx)
    return {name: v for k in run.levels for name, v in level_step(run, k, x, y).items()}

# ------------------------------------------------------------------------ Sec. 3: the networks
class Conditioned(nn.Module):
    """Feeds inputs and class to `body` (Eyescream's class-conditional CIFAR). Base: inputs flattened, one-hot
    appended. Level k: a class plane, Linear(classes -> s*s) -> ReLU, after the first input plane: G_k sees
    [noise, class, coarse], D_k [image, class]. Without classes y is ignored."""

    def __init__(self, body, ncls, size, flat):
        super().__init__()
        self.body, self.ncls, self.size, self.flat = body, ncls, size, flat
        self.embed = nn.Linear(ncls, size * size) if ncls and not flat else None

    def forward(self, xs, y=None):
        extra = [F.one_hot(y, self.ncls).to(xs[0].dtype)] if self.ncls else []  # N x classes
        if self.flat:
            return self.body(torch.cat([x.flatten(1) for x in xs] + extra, 1))
        if self.ncls:
            plane = F.relu(self.embed(extra[0])).view(-1, 1, self.size, self.size)  # N x 1 x s x s
            xs = [xs[0], up(plane, xs[0].shape[-1]), *xs[1:]]  # resized only by --upscale
        return self.body(torch.cat(xs, 1))

def mlp_nets(nz, nc, size, ncls, drop=0.5):
    """Sec. 3.1, base level: G_0 two ReLU layers of 1200 units, linear output; D_0 two of 600 with
    dropout 0.5."""
    g = nn.Sequential(nn.Linear(nz + ncls, 1200), nn.ReLU(), nn.Linear(1200, 1200), nn.ReLU(),
                      nn.Linear(1200, nc * size * size), nn.Unflatten(1, (nc, size, size)))
    d = nn.Sequential(nn.Linear(nc * size * size + ncls, 600), nn.ReLU(), nn.Dropout(drop),
                      nn.Linear(600, 600), nn.ReLU(), nn.Dropout(drop), nn.Linear(600, 1), nn.Flatten(0))
    return g, d

def pads(size, kernels, strides):
    """The code's D convs are unpadded; where that leaves under 3 px, pad 'same'. -> (paddings, out size)."""
    valid, same = size, size
    for kern, stride in zip(kernels, strides):
        valid, same = (valid - kern) // stride + 1, (same - 1) // stride + 1
    return ([0] * len(kernels), valid) if valid >= 3 else ([kern // 2 for kern in kernels], same)

def conv_nets(cin, nc, size, wg, wd, ncls, drop=0.5):
    """Sec. 3.1, level k: G_k = conv7 wg, ReLU, conv7 wg, ReLU, conv5 C, linear output = the residual;
    D_k = conv5 wd, ReLU, conv5 stride 2 wd, ReLU, dropout 0.5, linear -> logit. No batch norm."""
    g = nn.Sequential(nn.Conv2d(cin, wg, 7, padding=3), nn.ReLU(), nn.Conv2d(wg, wg, 7, padding=3), nn.ReLU(),
                      nn.Conv2d(wg, nc, 5, padding=2))
    (p1, p2), n = pads(size, [5, 5], [1, 2])
    d = nn.Sequential(nn.Conv2d(nc + (ncls > 0), wd, 5, padding=p1), nn.ReLU(), nn.Conv2d(wd, wd, 5, 2, p2),
                      nn.ReLU(), nn.Dropout(drop), nn.Flatten(), nn.Linear(wd * n * n, 1), nn.Flatten(0))
    return g, d

class PairL2Pool(nn.Module):
    """fbcunn's FeatureLPPooling(2, 2, 2): sqrt(a^2 + b^2) over channel pairs, halving the channels."""

    def forward(self, x):
        return (x.unflatten(1, (-1, 2)).pow(2).sum(2) + 1e-6).sqrt()

def large_nets(cin, nc, size, ncls):
    """Sec. 3.2, lsun/model.lua 'large': G with {64, 368, 128, 224} maps, 7x7 grouped convs, each ReLU then
    BN, spatial dropout, L2 pooling of channel pairs; D with {48, 448, 416} maps, grouped, no BN."""
    def bn(n):
        return nn.BatchNorm2d(n, affine=False)
    g = nn.Sequential(nn.Conv2d(cin, 64, 7, padding=3), nn.ReLU(), bn(64),
                      nn.Conv2d(64, 368, 7, padding=3, groups=4), nn.ReLU(), bn(368), nn.Dropout2d(0.5),
                      nn.Conv2d(368, 128, 7, padding=3, groups=4), nn.ReLU(), bn(128), PairL2Pool(),
                      nn.Conv2d(64, 224, 5, padding=2, groups=2), nn.ReLU(), bn(224), nn.Dropout2d(0.5),
                      nn.Conv2d(224, nc, 7, padding=3), bn(nc))
    (p1, p2, p3), n = pads(size, [3, 5, 7], [1, 1, 1])
    d = nn.Sequential(nn.Conv2d(nc + (ncls > 0), 48, 3, padding=p1), nn.ReLU(),
                      nn.Conv2d(48, 448, 5, padding=p2, groups=4), nn.ReLU(),
                      nn.Conv2d(448, 416, 7, padding=p3, groups=16), nn.ReLU(), nn.Flatten(),
                      nn.Linear(416 * n * n, 1), nn.Flatten(0))
    return g, d

def build_level(targs, k, sizes, nc, ncls):
    """-> (G_k, D_k) for level k of the pyramid `sizes` (targs: the training flags as a dict). G_k's input
    planes: noise, the class plane if any, the C channels of u(I_{k-1})."""
    cin, drop = 1 + (ncls > 0) + nc, targs.get("dropout_d", 0.5)  # 0.5: checkpoints from before the flag
    if k == 0:
        g, d = mlp_nets(targs["nz"], nc, sizes[0], ncls, drop)
    elif targs["model"] == "large":
        g, d = large_nets(cin, nc, sizes[k], ncls)
    else:
        g, d = conv_nets(cin, nc, sizes[k], targs["width_g"], targs["width_d"], ncls, drop)
    return Conditioned(g, ncls, sizes[k], k == 0), Conditioned(d, ncls, sizes[k], k == 0)

# ------------------------------------------------------------------------ Sec. 3: the optimisation schedule
def sgd_schedule(epoch, lr0, m0, m_max=0.8, m_step=0.0008, decay=4e-5):
    """Sec. 3: after every epoch lr /= 1 + 4e-5 and momentum += 0.0008, up to 0.8. -> (lr, momentum)."""
    return lr0 / (1 + decay) ** (epoch - 1), min(m0 + m_step * (epoch - 1), m_max)

def set_sgd(opt, lr, momentum):
    # Torch's optim.sgd damps the new gradient by the momentum (buf = m buf + (1 - m) grad); PyTorch's
    # default dampening is 0, so it is set alongside
    for group in opt.param_groups:
        group.update(lr=lr, momentum=momentum, dampening=momentum)

def balance_rule(err_real, err_fake, margin=0.3, real_max=0.7):
    """lsun/train.lua (--balance): if D's error on fakes exceeds its error on reals by more than the margin,
    update D only, else G only; and update D whenever its real error exceeds 0.7. -> (update_d, update_g)."""
    d_only = err_fake > err_real + margin
    return d_only or err_real > real_max, not d_only

def global_mean(*values):
    """Average scalars over data-parallel ranks so every rank's balancing rule takes the same branch."""
    t = torch.stack([v.detach().float() for v in values])
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()

# ------------------------------------------------------------------------ Sec. 4: evaluation
@torch.no_grad()
def selection_score(G, k, x, y, sizes, nz, gen, n=128):
    """cifar/train/conditional_adversarial.lua approxParzen: per validation image, n samples from its own
    coarse image; the smallest L2 distance to the true fine image, averaged over images (lower is better)."""
    dists = []
    for i in range(len(x)):
        fine, coarse = level_view(x[i:i + 1], sizes, k)
        z = noise(k, n, sizes[k], nz, x.device, gen)
        yi = None if y is None else y[i:i + 1].expand(n)
        made = G([z, coarse.expand(n, -1, -1, -1)], yi) + coarse if k else G([z], yi)  # n x C x s_k x s_k
        dists.append((made - fine).flatten(1).norm(dim=1).min())
    return torch.stack(dists).mean().item()

def parzen_ll(d2, dim, sigma):
    """Gaussian Parzen window (Goodfellow et al. 2014): log (1/N) sum_j N(x_i; s_j, sigma^2 I) from the
    squared distances d2 (images x N samples). -> (images,), in nats."""
    log_norm = math.log(d2.shape[1]) + dim / 2 * math.log(2 * math.pi * sigma ** 2)
    return torch.logsumexp(-d2 / (2 * sigma ** 2), 1) - log_norm

def val_test_ll(d2, n_val, dim):
    """sigma chosen on the first n_val (validation) images, then applied to the rest (test)."""
    sigmas = torch.logspace(-2.5, 0, 26).tolist()
    sigma = max(sigmas, key=lambda s: parzen_ll(d2[:n_val], dim, s).mean().item())
    return parzen_ll(d2[n_val:], dim, sigma), sigma

@torch.no_grad()
def base_d2(G, base, y, nz, m, pix):
    """Squared distances (pixel units) of each true base image to m samples of G_0 (images x m); with
    classes, the samples of each image's own class, so the base is scored as log q_0(I_0 | y) too."""
    d2 = torch.empty(len(base), m, dtype=torch.float64, device=base.device)
    for c in (y.unique().tolist() if y is not None else [None]):
        rows = torch.ones(len(base), dtype=torch.bool, device=base.device) if c is None else y == c
        yc = None if c is None else torch.full((m,), c, device=base.device)
        made = torch.cat([G([noise(0, len(i), base.shape[-1], nz, base.device)], None if c is None else yc[i])
                          for i in torch.arange(m, device=base.device).split(1000)])
        d2[rows] = torch.cdist(pix(base[rows]), pix(made)).pow(2)
    return d2

@torch.no_grad()
def residual_d2(G, coarse, h, y, std, nz, m):
    """Squared distances (pixel units) of each image's true residual h_k to m residuals drawn from its own
    coarse image (and class). -> images x m."""
    rows = []
    for i in range(len(h)):
        c, yi = coarse[i:i + 1].expand(m, -1, -1, -1), None if y is None else y[i:i + 1].expand(m)
        made = G([noise(1, m, h.shape[-1], nz, h.device), c], yi).float()
        rows.append(((made - h[i:i + 1]) * std).flatten(1).pow(2).sum(1))
    return torch.stack(rows).double()

@torch.no_grad()
def evaluate(args, Gs, run, ck, nz, stem):
    """Sec. 4.1: log p(I) = log q_0(I_0) + sum_k log q_k(h_k | u(I_{k-1})), a Parzen window per level on
    pixels in [0, 1]: the base from --eval-samples samples, each residual from --eval-cond samples drawn from
    the test image's own coarse image. A conditional model scores log p(I | y): every level, the base
    included, conditioned on the test image's true label. Also writes samples beside their nearest
    training images (STEM_nn.png)."""
    dev, sizes = run.images.device, run.sizes
    n_val = min(1000, len(run.images) // 2)  # as gan.py: sigma on test[:1000], scores on test[1000:2000]
    x, y = get_batch(run, torch.arange(min(len(run.images), n_val + args.eval_images), device=dev), False)
    y = y if run.ncls else None
    pix = lambda t: (t.float() * run.std + run.mean).flatten(1).double()  # normalised -> [0, 1]
    base_x, res = laplacian_pyramid(x, sizes)  # the coefficients that are scored
    total, sigma = val_test_ll(base_d2(Gs[0], base_x, y, nz, args.eval_samples, pix), n_val,
                               x.shape[1] * sizes[0] ** 2)
    report = [f"level 0 {total.mean().item():.1f} (sigma {sigma:.3f})"]
    for k in range(1, len(Gs)):
        coarse = up(reconstruct(base_x, res[:k - 1]), sizes[k])
        d2 = residual_d2(Gs[k], coarse, res[k - 1], y, run.std, nz, args.eval_cond)
        ll, sigma = val_test_ll(d2, n_val, x.shape[1] * sizes[k] ** 2)
        total, report = total + ll, report + [f"level {k} {ll.mean().item():.1f} (sigma {sigma:.3f})"]
    se = (total.std() / math.sqrt(len(total))).item()  # the standard error of the mean
    print(f"Parzen log-likelihood: {total.mean().item():.1f} +- {se:.1f} nats on {len(total)} test images "
          f"({'; '.join(report)})")
    yn = None if y is None else y[torch.arange(32, device=dev) % len(y)]
    fake = to_display(sample_chain(Gs, sizes, 32, nz, yn, dev)[-1], run.mean, run.std).cpu()
    train = load_dataset(argparse.Namespace(**{**ck["args"], "limit": None}), "train")[0]
    m = (train.shape[-1] - sizes[-1]) // 2  # centre crops, the samples' size
    train = train[..., m:m + sizes[-1], m:m + sizes[-1]]
    d = [torch.cdist((fake.flatten(1) + 1) * 127.5, c.flatten(1).float()) for c in train.split(4096)]
    pairs = np.stack([to_uint8(fake), train[torch.cat(d, 1).argmin(1)].permute(0, 2, 3, 1).numpy()], 1)
    save_grid(pairs.reshape(-1, *pairs.shape[2:]), stem + "_nn.png", 8)  # each sample beside its nearest

# ------------------------------------------------------------------------ the training loop, sampling
def train(args, device, rank=0, world=1, ckpt=None):
    """Epochs of shuffled steps; a log row and a progress line every --log-every steps; model selection,
    pictures and the checkpoint after each epoch (rank 0). ckpt: the checkpoint a --resume continues."""
    run = setup_run(args, device, load_dataset(args, "train"), rank, world)
    if ckpt:
        restore(run, ckpt)
    os.makedirs(args.outf, exist_ok=True)
    val = load_dataset(args, "test") if rank == 0 and args.select else None
    start, t0, n, B = run.step, time.time(), len(run.images), args.batch_size
    for epoch in range(run.epoch + 1, args.epochs + 1):
        run.lr, run.momentum = sgd_schedule(epoch, args.lr, args.momentum)
        for lv in run.levels.values() if args.optim == "sgd" else []:
            set_sgd(lv.opts["G"], run.lr, run.momentum)
            set_sgd(lv.opts["D"], run.lr * d_lr(args) / args.lr, run.momentum)  # --lr-d, the same schedule
        idx, acc, count = batches(run, epoch), {}, 0
        for i, b in enumerate(idx):
            # the fakes' and the G step's conditions: other real images drawn at random, as the code does
            stats = train_step(run, torch.cat([b, torch.randint(n, (B * 3 // 2,), device=b.device)]))
            acc = {name: acc.get(name, 0) + v for name, v in stats.items()}
            run.step, count = run.step + 1, count + 1
            if run.step % args.log_every and i < len(idx) - 1:
                continue
            per = {name: float(v) / count for name, v in acc.items()}  # one host sync per log row
            row = {"step": run.step, "epoch": epoch, "lr": run.lr, "momentum": run.momentum}
            for m in ("err_d", "err_g", "d_x", "d_gz"):  # the mean over levels, for the progress line
                row[m] = sum(per[f"{m}{k}"] for k in run.levels) / len(run.levels)
            row, acc, count = {**row, **per}, {}, 0
            if not all(math.isfinite(v) for v in row.values()):
                fail(f"the losses became NaN/inf at step {run.step}; training stopped and the last good "
                     f"checkpoint in {args.outf} is kept (try a lower --lr or --balance)")
            if rank == 0:
                append_log(os.path.join(args.outf, "log.csv"), row)
                rate = (run.step - start) * B * world / (time.time() - t0)
                eta = ((args.epochs - epoch) * len(idx) + len(idx) - i - 1) * B * world / rate
                eta = f"{eta / 60:.0f}m" if eta >= 60 else f"{eta:.0f}s"
                print(f"[e {epoch}/{args.epochs} it {i + 1}/{len(idx)}] D {row['err_d']:.2f} "
                      f"G {row['err_g']:.2f} D(x) {row['d_x']:.2f} D(G(z)) {row['d_gz']:.2f} | "
                      f"{rate:.0f} img/s | ETA {eta}")
        run.epoch = epoch
        if rank == 0:
            end_of_epoch_files(run, val)
    return run

def sample(args):
    """--sample: the chain of Fig. 1 from --ckpt (several checkpoints join levels trained apart) or from
    --chain A B; writes every level of each sample side by side, --npz, and the --upscale, --resample and
    --eval pictures."""
    if args.chain:
        Ga, ca, Gb, ck = chain_levels(*args.chain, args.switch)
    else:
        (Gb, ck), Ga, ca = load_levels(args.ckpt), [], None
    dev, sizes, nz = pick_device(args), ck["sizes"], ck["args"]["nz"]
    ncls = len(ck["classes"]) if ck["args"]["conditional"] else 0
    run = Run(sizes, ncls, ck["mean"].to(dev), ck["std"].to(dev))
    Ga, Gb = [G.to(dev) for G in Ga], [G.to(dev) for G in Gb]
    torch.manual_seed(args.seed)
    last = (args.chain or args.ckpt)[-1]
    stem = os.path.splitext(args.out or os.path.join(os.path.dirname(last), "samples"))[0]
    if args.label is not None and not ncls:
        fail(f"{last} was trained without --conditional; drop --label")
    if ncls and args.label is not None and not 0 <= args.label < ncls:
        fail(f"--label {args.label} is out of range; this model has classes 0..{ncls - 1}")

    def labels(n):  # the class asked for each sample: --label, or drawn uniformly
        if not ncls:
            return None
        return (torch.randint(ncls, (n,)) if args.label is None else torch.full((n,), args.label)).to(dev)

    def chain(n, y):  # --chain: A's levels, mapped into B's normalisation, then B's levels
        first = sample_chain(Ga, ca["sizes"], n, ca["args"]["nz"], y, dev) if Ga else []
        first = [renormalise(x, ca["mean"].to(dev), ca["std"].to(dev), run.mean, run.std) for x in first]
        return sample_chain(Ga + Gb, sizes, n, nz, y, dev, images=first)
    y = labels(args.n)
    images = chain(args.n, y)
    save_grid(level_sheet(images, run), stem + ".png", len(images) * 4)
    if args.npz:  # uint8 N x H x W x C, and the class asked for each sample
        asked = {} if y is None else {"labels": y.cpu().numpy()}
        np.savez(args.npz, images=to_uint8(to_display(images[-1], run.mean, run.std)), **asked)
    if args.upscale:
        y = labels(8)
        big = upscale_chain(chain(8, y), Gb[-1], sizes[-1] / sizes[-2], args.upscale, y)[-1]
        save_grid(to_display(big, run.mean, run.std), stem + "_upscale.png", 4)
    if args.resample or args.eval:
        test = load_dataset(argparse.Namespace(**{**ck["args"], "limit": None}), "test")
        run.images, run.labels = test[0].to(dev), test[1].to(dev)
    if args.resample:
        resample_sheet(Gb[-1], len(sizes) - 1, run, args.resample, nz, stem + "_resample.png")
    if args.eval:
        evaluate(args, Gb, run, ck, nz, stem)
    print(f"wrote {stem}*.png" + (f" and {args.npz}" if args.npz else ""))

# ------------------------------------------------------------------------ Appendix: plumbing, not the paper
def fail(msg):
    raise SystemExit(f"error: {msg}")

# Data: each split as one uint8 tensor N x C x H x W, decoded once; batches are gathered by index on device
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = dict(zip(["cifar-10-python.tar.gz", "test_batch"] + [f"data_batch_{i}" for i in range(1, 6)],
                     ["c58f30108f718f92721af3b95e74349a", "40351d587109b95175f43aff81a1287e",
                      "c99cafc152244af753f735de768cd75f", "d4bba439e000b95fd0a9bffe97cbabec",
                      "54ebc095f3ab1f0389bbae665268c751", "634d18415352ddfa80567beed471001a",
                      "482c414d41f54cd18b22e5b47cb7c3cb"]))
IDX_URLS = {"mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"}
IDX_MD5 = {"mnist": ["f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                     "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"],
           "fashion-mnist": ["8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                             "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"]}
IDX_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
CLASSES = {"mnist": list("0123456789"), "shapes": "circle square triangle diamond cross ring".split(),
           "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                             "Sneaker", "Bag", "Ankle boot"]}
SYSTEM_DATA = "/usr/share/datasets"  # where Debian's dataset-fashion-mnist package puts its files
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")

def damaged(path, e):
    fail(f"{path} is damaged ({type(e).__name__}: {e}); delete it to download it again, or replace it")

def md5_of(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()

def find_or_download(candidates, url, md5):
    """The first of the candidate paths that exists, else the file downloaded to candidates[0]."""
    path = next((c for c in candidates if os.path.exists(c)), None) or candidates[0]
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        print(f"downloading {url}")
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(path + ".part", "wb") as f:
                f.write(r.read())
        except OSError as e:
            fail(f"could not download {url} ({e}); put {os.path.basename(path)} in {os.path.dirname(path)}")
        if md5_of(path + ".part") != md5:
            fail(f"checksum mismatch for {url}; delete {path}.part and try again")
        os.replace(path + ".part", path)
    return path

class BatchUnpickler(pickle.Unpickler):
    """Only what the official CIFAR-10 batches hold (numpy arrays): a crafted file cannot run code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)

def read_cifar10(root, split):
    """The official python tarball (or its extracted folder): pickled dicts of 10000 x 3072 uint8."""
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    folder, tar = os.path.join(root, "cifar-10-batches-py"), os.path.join(root, "cifar-10-python.tar.gz")
    files = [os.path.join(folder, n) for n in names] if os.path.isdir(folder) else \
        [find_or_download([tar], CIFAR_URL, CIFAR_MD5["cifar-10-python.tar.gz"])]
    try:
        for path in files:  # checked before anything is unpickled
            if md5_of(path) != CIFAR_MD5[os.path.basename(path)]:
                fail(f"{path} does not match the official CIFAR-10 checksum; delete it to download it again")
        if os.path.isdir(folder):
            read = {n: open(os.path.join(folder, n), "rb").read() for n in names + ["batches.meta"]}
        else:
            with tarfile.open(tar) as t:
                read = {os.path.basename(m.name): t.extractfile(m).read() for m in t if m.isfile()}
        b = [BatchUnpickler(io.BytesIO(read[n]), encoding="bytes").load() for n in names + ["batches.meta"]]
        x = np.concatenate([d[b"data"] for d in b[:-1]]).reshape(-1, 3, 32, 32)
        y = np.concatenate([d[b"labels"] for d in b[:-1]])
    except (OSError, EOFError, KeyError, ValueError, tarfile.TarError, pickle.PickleError, zlib.error) as e:
        damaged(files[0] if len(files) == 1 else folder, e)
    return torch.from_numpy(x), torch.from_numpy(y).long(), [c.decode() for c in b[-1][b"label_names"]]

def read_idx(path):
    """IDX format (LeCun): 2 zero bytes, a type byte (0x08 = uint8), a rank byte, big-endian int32 sizes."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        damaged(path, e)
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 8:
        fail(f"{path} is not a uint8 IDX file")
    dims, start = np.frombuffer(data, ">i4", data[3], 4), 4 + 4 * data[3]
    if len(data) != start + int(np.prod(dims)):
        damaged(path, ValueError(f"{len(data) - start} bytes of data, its header says {int(np.prod(dims))}"))
    return np.frombuffer(data, np.uint8, offset=start).reshape(dims)

def load_mnist(root, name, split):
    """MNIST and Fashion-MNIST: DATAROOT/NAME, DATAROOT or a Debian dataset package, else downloaded."""
    paths = []
    for i in [0, 1] if split == "train" else [2, 3]:
        dirs = (os.path.join(root, name), root, os.path.join(SYSTEM_DATA, name))
        found = [os.path.join(d, f) for d in dirs for f in (IDX_FILES[i], IDX_FILES[i][:-3])]
        paths.append(find_or_download(found, IDX_URLS[name] + IDX_FILES[i], IDX_MD5[name][i]))
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
    scale = size / min(im.size)
    im = im.resize([max(size, round(n * scale)) for n in im.size], Image.BICUBIC)
    left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))

def walk_error(e):
    fail(f"cannot read {e.filename} ({e.strerror}); fix its permissions or move it out of --dataroot")

def load_folder(root, size, channels, workers):
    """A folder of images, class labels from sub-folders; decoded once and cached beside the data."""
    if not os.path.isdir(root):
        fail(f"--dataroot {root} is not a folder; point it at a folder of images")
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root, onerror=walk_error) for f in fs
                   if f.lower().endswith(IMAGE_EXT))
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
    try:  # atomic, so a crash or a full disk never leaves a truncated cache; a read-only folder skips it
        with open(cache + ".tmp", "wb") as f:
            np.savez(f, x=x, y=y)
            f.flush()
            os.fsync(f.fileno())
        os.replace(cache + ".tmp", cache)
    except OSError:
        if os.path.exists(cache + ".tmp"):
            os.remove(cache + ".tmp")
    return torch.from_numpy(x), torch.from_numpy(y), classes

def make_shapes(n, size, seed):
    """The built-in synthetic set, in seeded chunks of 1000, so `--limit` takes a prefix of the same set."""
    parts = [shape_chunk(1000, size, np.random.default_rng([seed, i])) for i in range(0, n, 1000)]
    return torch.cat([p[0] for p in parts])[:n], torch.cat([p[1] for p in parts])[:n], CLASSES["shapes"]

def shape_chunk(n, size, rng):
    """n images, each one coloured shape on a dark background; the shape is the class."""
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
    return torch.from_numpy((np.where(mask, fg, bg) * 255).round().astype(np.uint8)), torch.from_numpy(y)

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
        luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        x = (x.float() * luma).sum(1, keepdim=True).round().byte()
    elif args.channels == 3 and x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    if split == "train" and args.limit:
        x, y = x[:args.limit], y[:args.limit]
    if len(x) == 0:
        fail(f"the {split} split of {args.dataset} under {args.dataroot} holds no images")
    size = args.image_size or x.shape[-1]
    if x.shape[-1] != size or x.shape[-2] != size:  # antialiased bilinear, in chunks
        x = torch.cat([F.interpolate(c.float(), (size, size), mode="bilinear", antialias=True).round()
                       .clamp(0, 255).byte() for c in x.split(4096)])
    return x, y.long(), classes

def channel_stats(images):
    """Per-channel mean and std of the training split, [0, 1] pixel units, shaped 1 x C x 1 x 1."""
    s = torch.zeros(2, images.shape[1], dtype=torch.float64)
    for c in images.split(4096):
        s += torch.stack([(c.double() / 255).sum((0, 2, 3)), (c.double() / 255).pow(2).sum((0, 2, 3))])
    m = s / (images.numel() / images.shape[1])
    return m[0].float().view(1, -1, 1, 1), (m[1] - m[0] ** 2).clamp(min=1e-8).sqrt().float().view(1, -1, 1, 1)

def pyramid_sizes(args, size):
    """--levels, or the paper's pyramid for the dataset (otherwise size/16 ... size, from 4 px)."""
    halvings = sorted({size >> i for i in range(5) if size >> i >= 4})
    default = LEVELS.get(args.dataset) or halvings
    try:
        sizes = [int(v) for v in args.levels.split(",")] if args.levels else default
    except ValueError:
        fail(f"--levels {args.levels!r} is not a comma-separated list of sizes; use e.g. --levels 8,14,28")
    if len(sizes) < 2 or sizes[0] < 2 or any(b <= a for a, b in zip(sizes, sizes[1:])) or sizes[-1] > size:
        if size < 4:
            fail(f"{size} px images are too small for a pyramid; use --image-size 8 or more")
        fits = default if default[-1] <= size else halvings
        fits = fits if len(fits) > 1 else [size // 2, size]
        what = f"the {args.dataset} pyramid {sizes}"
        what = f"--levels {','.join(map(str, sizes))}" if args.levels else what
        fail(f"{what} must be 2 or more increasing sizes from 2 px up to the image size {size}; "
             f"use e.g. --levels {','.join(map(str, fits))}")
    return sizes

def get_batch(run, idx, train=True):
    """Gather uint8 images on the device, crop to the finest level (random crops in training, Sec. 3.1: 28x28
    crops of CIFAR's 32x32; centred otherwise), normalise per channel. -> (x, labels)."""
    x, size, dev = run.images[idx], run.sizes[-1], run.images.device
    if x.shape[-1] > size:
        m, n = x.shape[-1] - size, len(idx)
        o = torch.randint(m + 1, (2, n, 1), device=dev) if train else torch.full((2, n, 1), m // 2,
                                                                                      device=dev)
        r, ar = torch.arange(size, device=dev), torch.arange(max(n, x.shape[1]), device=dev)
        x = x[ar[:n, None, None, None], ar[:x.shape[1], None, None], (o[0] + r)[:, None, :, None],
              (o[1] + r)[:, None, None, :]]
    return (x.float() / 255 - run.mean) / run.std, run.labels[idx]

def batches(run, epoch):
    """This rank's share of one shuffled pass, B/2 real images per step (reproducible per epoch)."""
    n, half = len(run.images), run.args.batch_size // 2
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(run.args.seed * 100003 + epoch))
    perm = perm[run.rank::run.world].to(run.images.device)
    return perm[: len(perm) // half * half].view(-1, half)

# Checkpoints and resume: checkpoint() and restore() mirror each other
def save_checkpoint(obj, path):
    """Atomic: PATH.tmp, synced, then renamed, so a crash, a power cut or a full disk keeps the last one."""
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
            fail(f"no space left on {os.path.dirname(os.path.abspath(path))} writing {path}; "
                 f"the last checkpoint is kept")
        fail(f"could not write {path} ({e.strerror}); the last checkpoint is kept")

def load_checkpoint(path, script=SCRIPT):
    if not os.path.exists(path):
        fail(f"no checkpoint at {path}; train first or point --ckpt/--outf at a run folder")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{path} is not a readable checkpoint ({type(e).__name__}); delete or replace it")
    other = ckpt.get("script") if isinstance(ckpt, dict) else None
    if other != script:
        fail(f"{path} was written by {other or 'another program'}.py, not {script}.py; use that script")
    return ckpt

def checkpoint(run, ks=None, opts=True):
    """ckpt.pt (or best.pt: levels ks, no optimisers): the flags, pyramid, normalisation and weights."""
    args, levels = {**vars(run.args), "image_size": run.images.shape[-1], "nc": run.images.shape[1]}, {}
    for k in run.levels if ks is None else ks:
        levels[k] = {m: run.levels[k].nets[m].state_dict() for m in "GD"}
        if opts:
            levels[k].update({f"opt{m}": run.levels[k].opts[m].state_dict() for m in "GD"})
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"script": SCRIPT, "args": args, "classes": run.classes, "sizes": run.sizes,
            "mean": run.mean.cpu(), "std": run.std.cpu(), "epoch": run.epoch, "step": run.step,
            "balance": {"best": dict(run.best)}, "rng": {"torch": torch.get_rng_state(), "cuda": cuda},
            "levels": levels}

def restore(run, ckpt):
    for k, lv in run.levels.items():
        if k not in ckpt["levels"]:
            fail(f"the checkpoint does not hold level {k}; resume with the same --level")
        for m in "GD":
            lv.nets[m].load_state_dict(ckpt["levels"][k][m])
            lv.opts[m].load_state_dict(ckpt["levels"][k][f"opt{m}"])
    run.epoch, run.step, run.best = ckpt["epoch"], ckpt["step"], dict(ckpt["balance"]["best"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if ckpt["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    if run.rank == 0:  # rows written after the checkpoint, before a crash, are written again
        trim_log(os.path.join(run.args.outf, "log.csv"), "step", ckpt["step"])
        trim_log(os.path.join(run.args.outf, "select.csv"), "epoch", ckpt["epoch"])
    else:  # the checkpoint holds rank 0's RNG; the other ranks need noise of their own
        torch.manual_seed(run.args.seed + run.rank + 7919 * ckpt["epoch"])
    print(f"resumed from epoch {ckpt['epoch']}, step {ckpt['step']}")

MAY_CHANGE = ["dataroot", "epochs", "outf", "cuda", "amp", "compile", "workers", "log_every"]
MACHINE = ["cuda", "amp", "compile", "workers", "log_every"]  # this session's, as typed or by default
SAMPLING_ONLY = ["sample", "ckpt", "n", "label", "npz", "out", "resample", "upscale", "chain", "switch",
                 "eval", "eval_images", "eval_samples", "eval_cond", "resume"]  # not used by training

def resume_args(args, typed):
    """--resume: the checkpoint's flags, but --dataroot and --epochs as typed, the machine's flags (MACHINE)
    from this command line, typed or not (a GPU run resumes on a CPU), and the run stays in --outf."""
    ckpt = load_checkpoint(os.path.join(args.outf, "ckpt.pt"))
    differ = [k for k in sorted(typed) if k not in MAY_CHANGE + SAMPLING_ONLY
              and getattr(args, k) != ckpt["args"].get(k)]
    if differ:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in differ)
        fail(f"--resume keeps the checkpoint's training flags; {flags} differ from it (only --dataroot, "
             f"--epochs, --outf, --cuda, --amp, --compile, --workers, --log-every may change): drop them, or "
             f"start a new run with another --outf")
    typed_values = {k: getattr(args, k) for k in MAY_CHANGE if k in typed or k in MACHINE}
    args = argparse.Namespace(**{**ckpt["args"], **typed_values, "outf": args.outf, "resume": True})
    if ckpt["epoch"] >= args.epochs:
        fail(f"the checkpoint has already trained {ckpt['epoch']} epochs; give --epochs larger than "
             f"{ckpt['epoch']} to train more")
    return args, ckpt

def load_levels(paths, need=None):
    """[G_k for k in need] (default: all) from checkpoints of one pyramid; later files replace levels."""
    Gs, first = {}, None
    for path in paths:
        ck = load_checkpoint(path)
        ncls = len(ck["classes"]) if ck["args"]["conditional"] else 0
        if first and (ck["sizes"], ck["args"]["nc"], ncls) != first[1]:
            fail(f"{path} holds another pyramid (sizes, channels, classes) than {paths[0]}; use matching "
                 f"checkpoints")
        first = first or (ck, (ck["sizes"], ck["args"]["nc"], ncls))
        for k, st in ck["levels"].items():
            Gs[k] = build_level(ck["args"], k, ck["sizes"], ck["args"]["nc"], ncls)[0]
            Gs[k].load_state_dict(st["G"])
    need = range(len(first[0]["sizes"])) if need is None else need
    if any(k not in Gs for k in need):
        fail(f"level {min(set(need) - set(Gs))} is in none of {' '.join(paths)}; add the checkpoint of the "
             f"run that trained it")
    return [Gs[k].eval() for k in need], first[0]

def chain_levels(a, b, switch):
    """--chain A B (the blog's cats made horses): -> (A's Gs below the switch, A's ckpt, B's, B's ckpt)."""
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    if not 1 <= switch < len(cb["sizes"]):
        fail(f"--switch {switch} is out of range; {b} has levels 0..{len(cb['sizes']) - 1}")
    sa, sb = ca["sizes"], cb["sizes"]
    nca, ncb = (len(c["classes"]) if c["args"]["conditional"] else 0 for c in (ca, cb))
    if switch > len(sa) or (sa[switch - 1], ca["args"]["nc"], nca) != (sb[switch - 1], cb["args"]["nc"], ncb):
        fail(f"{a} and {b} do not fit at level {switch}: B's level {switch} takes {sb[switch - 1]} px images "
             f"with {cb['args']['nc']} channels ({ncb} classes) from A; pick another --switch or checkpoints")
    return load_levels([a], range(switch))[0], ca, load_levels([b], range(switch, len(sb)))[0], cb

def end_of_epoch_files(run, val):
    """Model selection (select.csv, best.pt), the sample sheet, ckpt.pt and curves.png, on rank 0."""
    args, dev, gens = run.args, run.images.device, [lv.nets["G"] for lv in run.levels.values()]
    gen = torch.Generator(dev).manual_seed(args.seed)  # the same noise every epoch; training RNG untouched
    if not all(torch.isfinite(p).all() for G in gens for p in G.parameters()):
        fail(f"G's weights became NaN/inf in epoch {run.epoch}; the last good checkpoint in {args.outf} is "
             f"kept")
    for G in gens:
        G.eval()
    if val is not None:  # the last test images; --eval scores the first ones
        v = Run(run.sizes, 0, run.mean, run.std, images=val[0][-args.select:].to(dev),
                labels=val[1][-args.select:].to(dev))
        x, y = get_batch(v, torch.arange(len(v.images), device=dev), False)
        score = {k: selection_score(G, k, x, y, run.sizes, args.nz, gen) for k, G in zip(run.levels, gens)}
        append_log(f"{args.outf}/select.csv", {"epoch": run.epoch, **{f"dist{k}": score[k] for k in score}})
        better, path = [k for k, d in score.items() if d < run.best.get(k, math.inf)], f"{args.outf}/best.pt"
        if better:
            old = load_checkpoint(path)["levels"] if os.path.exists(path) else {}
            run.best.update({k: score[k] for k in better})
            best = checkpoint(run, better, opts=False)
            save_checkpoint({**best, "levels": {**old, **best["levels"]}}, path)
    sheet = f"{args.outf}/samples_e{run.epoch:03d}.png"
    if len(run.levels) == len(run.sizes):  # conditional: one row per class
        n = 3 * run.ncls or 24
        chain = sample_chain(gens, run.sizes, n, args.nz, torch.arange(n, device=dev) // 3, dev, gen)
        save_grid(level_sheet(chain, run), sheet, 3 * len(chain))
    else:  # one level alone: samples from real coarse images
        resample_sheet(gens[0], next(iter(run.levels)), run, 6, args.nz, sheet, gen)
    for G in gens:
        G.train()
    save_checkpoint(checkpoint(run), f"{args.outf}/ckpt.pt")
    plot_curves(f"{args.outf}/log.csv", f"{args.outf}/curves.png")

# Logs and pictures
def append_log(path, row):
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

def trim_log(path, key, last):
    """Keep the rows whose column `key` is at most `last`."""
    if os.path.exists(path):
        with open(path) as f:
            rows = [r for r in csv.DictReader(f) if int(r[key]) <= last]
        os.remove(path)
        for r in rows:
            append_log(path, r)

def plot_curves(csv_path, png_path, width=640, panel=80):
    """Every numeric column of log.csv against the step, one panel each, drawn with Pillow."""
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    if len(rows) < 2:
        return
    cols, steps = [c for c in rows[0] if c not in ("step", "epoch")], [float(r["step"]) for r in rows]
    img = Image.new("RGB", (width, panel * len(cols)), "white")
    draw = ImageDraw.Draw(img)
    for i, col in enumerate(cols):
        v = [float(r[col]) for r in rows]
        lo, span = min(v), (max(v) - min(v)) or 1.0
        xy = [(60 + (s - steps[0]) / ((steps[-1] - steps[0]) or 1) * (width - 70),
               (i + 1) * panel - 8 - (x - lo) / span * (panel - 24)) for s, x in zip(steps, v)]
        draw.line(xy, fill="navy")
        draw.text((4, i * panel + 2), f"{col}: {lo:.3g} to {lo + span:.3g}", fill="black")
    img.save(png_path)

def to_display(x, mean, std):
    """Normalised images -> [-1, 1] in true colours (save_grid's and save_npz's convention)."""
    return (x * std.to(x.device) + mean.to(x.device)) * 2 - 1

def to_uint8(x):
    """[-1, 1] float N x C x H x W -> uint8 N x H x W x C."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()

def save_grid(images, path, nrow=8, pad=2):
    x = to_uint8(images) if torch.is_tensor(images) else images
    n, h, w, c = x.shape
    grid = np.full((-(-n // nrow) * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = x[i]
    Image.fromarray(grid.squeeze(-1) if c == 1 else grid).save(path)

def level_sheet(chain, run):
    """Every level of each sample side by side, enlarged (nearest) to the finest size."""
    big = [F.interpolate(x, chain[-1].shape[-2:], mode="nearest") for x in chain]
    return to_display(torch.stack(big, 1).flatten(0, 1), run.mean, run.std)

def resample_sheet(G, k, run, n, nz, path, gen=None):
    """Sec. 4.2: per row a real image, its coarse image, then n samples of level k drawn from the latter."""
    dev = run.images.device
    x, y = get_batch(run, torch.arange(8, device=dev) % len(run.images), False)
    fine, coarse = level_view(x, run.sizes, k)
    c = coarse if k else torch.zeros_like(fine)
    cc = c.repeat_interleave(n, 0)
    with torch.no_grad():
        made = G([noise(k, 8 * n, run.sizes[k], nz, dev, gen), cc][:1 + (k > 0)], y.repeat_interleave(n))
    rows = torch.cat([fine[:, None], c[:, None], (made.float() + cc).view(8, n, *fine.shape[1:])], 1)
    save_grid(to_display(rows.flatten(0, 1), run.mean, run.std), path, n + 2)

# Setting up a run: the networks on the device, their optimisers, data parallelism
def setup_run(args, device, data, rank=0, world=1):
    """-> a Run for in-memory data (uint8 images N x C x H x W, int64 labels N or None, class names)."""
    images, labels, classes = data
    sizes, ncls = pyramid_sizes(args, images.shape[-1]), len(classes) if args.conditional else 0
    if args.level is not None and not 0 <= args.level < len(sizes):
        fail(f"--level {args.level} is out of range; this pyramid has levels 0..{len(sizes) - 1}")
    if args.batch_size % 2:
        fail(f"--batch-size {args.batch_size} must be even: D's batch is half real, half generated")
    if len(images) < args.batch_size * world:
        fail(f"only {len(images)} training images, fewer than one batch of --batch-size {args.batch_size}"
             f"{f' on each of {world} ranks' if world > 1 else ''}; lower --batch-size or add images")
    levels = {}
    for k in [args.level] if args.level is not None else range(len(sizes)):
        torch.manual_seed(args.seed + 1000 * k)  # level k starts from the same weights, alone or not
        G, D = (m.to(device) for m in build_level(vars(args), k, sizes, images.shape[1], ncls))
        fwd = {"G": G, "D": D, "DG": D}  # "DG": D itself, see Level
        if world > 1:
            ids = [device.index] if device.type == "cuda" else None
            fwd.update(G=nn.parallel.DistributedDataParallel(G, device_ids=ids),
                       D=nn.parallel.DistributedDataParallel(D, device_ids=ids))
        fwd = {m: torch.compile(f) for m, f in fwd.items()} if args.compile else fwd
        opts = {"G": optimiser(G, args, args.lr), "D": optimiser(D, args, d_lr(args))}
        levels[k] = Level({"G": G, "D": D}, opts, fwd)
        if rank == 0:  # the Eyescream rule of thumb: D with about 0.5 (or 0.125) of G's parameters
            ng, nd = (sum(p.numel() for p in m.parameters()) for m in (G, D))
            print(f"level {k}: G {ng:,} parameters, D {nd:,}, D/G = {nd / ng:.3f}")
    torch.manual_seed(args.seed + rank)
    mean, std = channel_stats(images)
    labels = torch.zeros(len(images), dtype=torch.long) if labels is None else labels
    return Run(sizes, ncls, mean.to(device), std.to(device), classes, images.to(device), labels.to(device),
               args, levels, rank, world, lr=args.lr, momentum=args.momentum)

def pick_device(args, local_rank=0):
    if args.cuda and not torch.cuda.is_available():
        fail("--cuda was given but PyTorch sees no CUDA GPU; drop --cuda to run on the CPU")
    if args.amp and not args.cuda:
        print("note: --amp (bf16 autocast) applies on CUDA only; the CPU trains in fp32")
    torch.backends.cudnn.benchmark = args.cuda  # fixed shapes: let cuDNN pick the fastest kernels
    return torch.device("cuda", local_rank) if args.cuda else torch.device("cpu")

def optimiser(net, args, lr):
    if args.optim == "adam":
        return torch.optim.Adam(net.parameters(), lr, betas=(0.5, 0.999))
    return torch.optim.SGD(net.parameters(), lr, momentum=args.momentum, dampening=args.momentum)

def d_lr(args):
    """D's learning rate: --lr-d, else --lr (checkpoints from before --lr-d have neither key)."""
    return getattr(args, "lr_d", None) or args.lr

# Command line
def make_parser():
    p = argparse.ArgumentParser(description="LAPGAN: a Laplacian pyramid of GANs (README.md lists the flags)")
    add = p.add_argument
    add("--dataset", choices=["cifar10", "mnist", "fashion-mnist", "folder", "shapes"])
    add("--dataroot", default="./data", help="where the data lives or is downloaded to")
    add("--image-size", type=int, help="native size unless given; 64 for folder")
    add("--channels", type=int, choices=[1, 3])
    add("--conditional", action="store_true")
    add("--limit", type=int, help="use only the first N training images")
    add("--levels", help="pyramid sizes coarse to fine, e.g. 8,14,28 (default: per dataset)")
    add("--level", type=int, help="train level K alone (0 = the base); default: all levels")
    add("--model", choices=["small", "large"], default="small", help="large: the paper's LSUN nets")
    add("--width-g", type=int, default=128, help="G_k feature maps: 128 (paper's models) or 64 (code)")
    add("--width-d", type=int, default=64)
    add("--dropout-d", type=float, default=0.5, help="D's dropout (the paper's 0.5)")
    add("--nz", type=int, default=100, help="noise size at the base")
    add("--epochs", type=int, default=25)
    add("--batch-size", type=int, default=128, help="half real for D")
    add("--lr", type=float, help="learning rate (default 0.02; --model large: 0.01)")
    add("--lr-d", type=float, help="D's learning rate (default: --lr), e.g. faster than G's at small widths")
    add("--momentum", type=float, help="initial momentum (0.5; --model large: 0), +0.0008/epoch")
    add("--optim", choices=["sgd", "adam"], default="sgd", help="adam (beta1 0.5): quick runs, not the paper")
    add("--balance", action="store_true", help="the LSUN code's rule: update D or G (or both)")
    add("--select", type=int, default=200, help="validation images for model selection (0: off)")
    add("--seed", type=int, default=1)
    add("--outf", help="output folder (out/lapgan-DATASET)")
    add("--log-every", type=int, default=100)
    add("--workers", type=int, default=4)
    for switch in ("--resume", "--cuda", "--amp", "--compile", "--sample"):
        add(switch, action="store_true")
    add("--ckpt", nargs="+", help="several join levels trained apart")
    add("--n", type=int, default=64)
    add("--label", type=int)
    add("--npz")
    add("--out", help="grid PNG (default: beside the checkpoint)")
    add("--resample", type=int, default=0, help="N samples from each of 8 real coarse images")
    add("--upscale", type=int, default=0, help="run the finest G N more times past its size")
    add("--chain", nargs=2, metavar=("A", "B"), help="levels below --switch from A, the rest B")
    add("--switch", type=int, default=1)
    add("--eval", action="store_true", help="Parzen log-likelihood, neighbours")
    add("--eval-images", type=int, default=1000, help="held-out test images to score")
    add("--eval-samples", type=int, default=10000, help="samples for the base level's Parzen window")
    add("--eval-cond", type=int, default=100, help="samples per test image at each residual level")
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
    if not (args.dataset or args.sample or (args.resume and args.outf)):
        p.error("--dataset is required for training (or give --resume --outf DIR, or --sample --ckpt FILE)")
    if args.sample and not (args.ckpt or args.chain):
        p.error("--sample needs --ckpt DIR/ckpt.pt (or --chain A.pt B.pt)")
    if args.eval and args.chain:
        fail("--eval scores one model's pyramid; drop --chain (or --eval)")
    large = args.model == "large"  # lsun/train.lua's lr and momentum for the large model
    if args.lr is None:
        args.lr = 0.01 if large else 0.02
    if args.momentum is None:
        args.momentum = 0.0 if large else 0.5
    args.outf = args.outf or os.path.join("out", f"{SCRIPT}-{args.dataset}")
    if args.image_size is not None and not 0 < args.image_size <= 1024:
        fail(f"--image-size {args.image_size} must be between 1 and 1024")
    for flag, least in (("epochs", 1), ("batch_size", 2), ("log_every", 1), ("n", 1)):
        if getattr(args, flag) < least:
            fail(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be at least {least}")
    if args.lr <= 0 or (args.lr_d is not None and args.lr_d <= 0):
        fail(f"--lr {args.lr} and --lr-d {args.lr_d} must be positive (--lr-d: default --lr)")
    if not 0 <= args.dropout_d < 1:
        fail(f"--dropout-d {args.dropout_d} must be at least 0 and below 1")
    if args.out and not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        fail(f"the folder of --out {args.out} does not exist; create it or choose another path")
    if os.path.isfile(args.outf):
        fail(f"--outf {args.outf} is a file; give a folder")
    return args

def main(argv=None):
    args, ckpt = get_args(argv), None
    if args.sample:
        return sample(args)
    if args.resume:  # before the device is picked: the checkpoint's flags, less this machine's
        args, ckpt = resume_args(args, typed_flags(argv))
    elif any(os.path.exists(os.path.join(args.outf, f)) for f in ("ckpt.pt", "log.csv")):
        fail(f"{args.outf} already holds a run; add --resume to continue it, or choose another --outf")
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = pick_device(args, int(os.environ.get("LOCAL_RANK", 0)))
    if world > 1:  # launched by torchrun: one process per GPU (or CPU worker)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return train(args, device, rank, world, ckpt)
    finally:
        if world > 1:
            dist.destroy_process_group()

if __name__ == "__main__":
    main()
