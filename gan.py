"""gan.py: the plain GAN / DCGAN baseline, with the balancing heuristics that make it train.

Papers: Goodfellow et al. 2014 "Generative Adversarial Nets"; Radford et al. 2015, DCGAN (`--arch dcgan`);
the post "Generating Faces with Torch" and its code, skaae/torch-gan (`--arch upsample`, the margin and L2
rules); Mirza & Osindero 2014 (`--conditional`); White 2016 "Sampling Generative Networks" (slerp).

The method: G maps noise z ~ N(0, I) to an image, D an image to the probability that it is real; they play
min_G max_D E_x[log D(x)] + E_z[log(1 - D(G(z)))]. Each step D takes one gradient step on reals and on G's
samples, then G one step against the new D, minimising -log D(G(z)): the same fixed point, with gradients
that do not vanish while D wins. Training is fragile, so the faces post pauses whichever network is ahead
(margin rule) or penalises D's weights while G loses (L2 rule); DCGAN made both networks convolutional.

Paper to code:
    Goodfellow Sec. 3, Eq. 1: D's loss, G's non-saturating loss    d_loss, g_loss, train_step
    faces post: margin rule, adaptive L2 on D, reals swapped for   margin_rule, l2_rule, l2_penalty,
      fakes, D pre-training, RMSProp warm-up and decay               swap_real, train, faces_lr
    Eyescream: D with about 0.125 to 0.5 of G's parameters         report_ratio
    DCGAN Sec. 3 (networks), Sec. 4 (N(0, 0.02) init, Adam)        dcgan_nets, dcgan_init, ARCH_DEFAULTS
    faces code (train_lfw.lua): upsampling G, max-pooling D        upsample_nets
    Mirza & Osindero Sec. 3: the label fed to G and D              Conditioned
    Goodfellow Sec. 5: Gaussian Parzen window                      parzen_log_likelihood, parzen_eval
    White 2016; DCGAN Sec. 6.1 (walks); the post's nearest images  slerp, lerp, sweep, walk,
                                                                   nearest_neighbours

Deviations: D outputs a logit and the loss is BCE-with-logits (sigmoid + BCE without its overflow).
`--arch upsample` keeps the Torch code's linear output layer (no tanh; images are clamped to [-1, 1] for
display only) and takes its nz, lr, RMSProp, margin rule and learning-rate schedule unless the flags are
given; its G step reuses the D step's B generated images where the Torch code drew 2B fresh ones.
`--balance l2` halves our D loss (a sum of two means) to the Torch code's BCE over the mixed batch. The
Parzen estimate uses 10,000 samples and 1,000 test images, sigma chosen on 1,000 other test images.

    python3 gan.py --dataset fashion-mnist --dataroot /usr/share/datasets/fashion-mnist --conditional
    python3 gan.py --dataset folder --dataroot ~/lfw --arch upsample --image-size 64 --cuda
    python3 gan.py --sample --ckpt out/gan-fashion-mnist/ckpt.pt --class-grid --interp slerp --nn --eval
"""
import argparse, csv, errno, gzip, hashlib, io, math, os, pickle, tarfile, time, urllib.request, zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
import numpy as np
import torch
from torch import distributed as dist, nn
import torch.nn.functional as F
from PIL import Image, ImageDraw

SCRIPT = "gan"

# ----------------------------------------------------------------------------- the game and its losses
def bce(logits, target):  # binary cross-entropy of D's logits against a constant target, a batch mean
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))

def d_loss(logit_real, logit_fake):
    """D ascends log D(x) + log(1 - D(G(z))) (Eq. 1): BCE with target 1 on reals, 0 on fakes."""
    return bce(logit_real, 1.0), bce(logit_fake, 0.0)  # (err_real, err_fake), each a batch mean

def g_loss(logit_fake):
    """Sec. 3: minimise -log D(G(z)), not log(1 - D(G(z))), which is flat while D rejects G's samples."""
    return bce(logit_fake, 1.0)

# ----------------------------------------------------------------------------- balancing heuristics
def margin_rule(err_real, err_fake, margin=0.3):  # -> (update_d, update_g)
    """Faces post: D rests when right on reals or fakes (error < margin), G when D is fooled (> 1 - margin)"""
    update_d = not (err_real < margin or err_fake < margin)
    update_g = not (err_real > 1 - margin or err_fake > 1 - margin)
    return (update_d, update_g) if update_d or update_g else (True, True)  # never both rest

def l2_rule(coef, err_g, step=1e-5, high=1.3, low=0.9):
    """Faces post: G failing (error > high) means D is too strong: raise D's L2 penalty; lower it below low"""
    if err_g > high:
        return coef + step
    if err_g < low:
        return max(coef - step, 0.0)
    return coef

def l2_penalty(net, coef):
    """coef/2 |theta|^2, whose gradient coef * theta is what the Torch code adds to D's gradient."""
    return 0.5 * coef * sum(p.pow(2).sum() for p in net.parameters()) if coef > 0 else 0.0

def swap_real(real, y_real, fake, y_fake, frac):
    """Replace a fraction of the reals with fakes still labelled real, to slow D while G finds its feet."""
    k = int(round(frac * real.shape[0]))  # the first k reals give way; the batch stays B x C x H x W
    if k == 0:
        return real, y_real
    x = torch.cat([fake[:k].detach(), real[k:]])
    return x, (torch.cat([y_fake[:k], y_real[k:]]) if y_real is not None else None)

def faces_lr(lr, step, epoch):  # lfw_adverserial.lua's warm-up, train_lfw.lua's decay
    """The faces code's schedule: lr/50 for 10 updates, lr/5 until 30, then lr; times 0.99 per past epoch"""
    return max(lr * 0.99 ** (epoch - 1), 1e-6) / (50 if step < 10 else 5 if step < 30 else 1)

def report_ratio(G, D):
    """Eyescream's rule of thumb: D with about 0.5 (or 0.125) of G's parameters trains well."""
    ng, nd = count_params(G), count_params(D)
    print(f"G {ng:,} parameters, D {nd:,} parameters, D/G = {nd / ng:.3f}")
    if not 0.0625 <= nd / ng <= 1.5:  # far outside, one network overpowers the other
        print("warning: D/G is far from the 0.125-0.5 rule of thumb; adjust --ngf/--ndf")

def count_params(net):
    return sum(p.numel() for p in net.parameters())

# ----------------------------------------------------------------------------- the networks
# DCGAN Sec. 4; the faces code (train_lfw.lua: noiseDim 512, lr 1e-3, rmsprop; margin rule always on)
ARCH_DEFAULTS = {"dcgan": {"nz": 100, "lr": 2e-4, "optimizer": "adam", "balance": "none"},
                 "upsample": {"nz": 512, "lr": 1e-3, "optimizer": "rmsprop", "balance": "margin"}}

class Conditioned(nn.Module):
    """`body` on its input with the class appended (Mirza & Osindero 2014): as inputs of G, planes of D"""

    def __init__(self, body, ncls):
        super().__init__()
        self.body, self.ncls = body, ncls

    def forward(self, x, y=None):
        if self.ncls:
            onehot = F.one_hot(y, self.ncls).to(x.dtype)  # B x ncls
            if x.dim() == 4:  # an image: B x ncls x H x W planes
                onehot = onehot[:, :, None, None].expand(-1, -1, x.shape[2], x.shape[3])
            x = torch.cat([x, onehot], 1)  # B x (nz + ncls), or B x (C + ncls) x H x W
        return self.body(x)

def depth(size, largest, fewest, arch):  # size = s0 * 2^n: n doublings from s0 x s0, s0 in 4..largest
    s0, n = size, 0
    while s0 % 2 == 0 and s0 > largest:
        s0, n = s0 // 2, n + 1
    if not (4 <= s0 <= largest and n >= fewest):
        fail(f"--image-size {size} does not fit --arch {arch}; use s*2^n with s in 4..{largest}, e.g. 32")
    return s0, n

def dcgan_nets(nz, ngf, ndf, nc, size, ncls, dropout):
    """DCGAN Sec. 3: strided (transposed) convs, BN, ReLU in G / LeakyReLU 0.2 in D, no BN on D's input."""
    s0, n = depth(size, 7, 2, "dcgan")  # 28 = 7 * 2^2, 32 = 4 * 2^3, 64 = 4 * 2^4
    gw = [ngf * 2 ** i for i in reversed(range(n))]  # 64x64: 512, 256, 128, 64 channels
    g = [nn.Unflatten(1, (nz + ncls, 1, 1)), nn.ConvTranspose2d(nz + ncls, gw[0], s0, 1, 0, bias=False),
         nn.BatchNorm2d(gw[0]), nn.ReLU(True)]  # z as a 1 x 1 image -> s0 x s0
    for a, b in zip(gw, gw[1:]):  # each doubles H and W
        g += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.ReLU(True)]
    g += [nn.ConvTranspose2d(gw[-1], nc, 4, 2, 1, bias=False), nn.Tanh()]  # -> nc x size x size in [-1, 1]
    dw = [ndf * 2 ** i for i in range(n)]  # 64x64: 64, 128, 256, 512 channels, halving H and W each
    extra = [nn.Dropout(dropout)] if dropout else []
    d = [nn.Conv2d(nc + ncls, dw[0], 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)] + extra
    for a, b in zip(dw, dw[1:]):
        d += [nn.Conv2d(a, b, 4, 2, 1, bias=False), nn.BatchNorm2d(b), nn.LeakyReLU(0.2, True)] + extra
    d += [nn.Conv2d(dw[-1], 1, s0, 1, 0, bias=False), nn.Flatten(0)]  # s0 x s0 -> one logit per image
    return nn.Sequential(*g), nn.Sequential(*d)

def upsample_nets(nz, ngf, ndf, nc, size, ncls, dropout, bn_d=False, dropout_g=0.0):
    """The Torch faces model: G = linear -> (nearest x2, conv5, BN, ReLU) blocks -> conv3; D = (conv5,
    max-pool, ReLU, spatial dropout) blocks, no BN -> linear 1024 -> dropout -> logit. bn_d puts BN after D's
    convs but the first (the post's panel A: D then wins); dropout_g: dropout after G's ReLUs, tried too."""
    s0, n = depth(size, 8, 1, "upsample")  # the faces code: 64 = 8 * 2^3
    gw = [ngf * 2] + [ngf * 4] * (n - 1) + [ngf * 2]  # 64x64: 128 -> 256 -> 256 -> 128 channels
    g = [nn.Linear(nz + ncls, gw[0] * s0 * s0), nn.Unflatten(1, (gw[0], s0, s0)), nn.ReLU(True)]
    for a, b in zip(gw, gw[1:]):  # each block doubles H and W
        g += [nn.Upsample(scale_factor=2), nn.Conv2d(a, b, 5, 1, 2), nn.BatchNorm2d(b), nn.ReLU(True)]
        g += [nn.Dropout(dropout_g)] if dropout_g else []
    g += [nn.Conv2d(gw[-1], nc, 3, 1, 1)]  # linear output, as in the Torch code
    dw = [nc + ncls] + [ndf // 2 * (i + 1) for i in range(n)]  # 64x64: 32, 64, 96 channels
    d = []
    for i, (a, b) in enumerate(zip(dw, dw[1:])):  # each block halves H and W
        d += [nn.Conv2d(a, b, 5, 1, 2)] + ([nn.BatchNorm2d(b)] if bn_d and i else [])
        d += [nn.MaxPool2d(2), nn.ReLU(True), nn.Dropout2d(0.2 if dropout is None else dropout)]
    d += [nn.Flatten(), nn.Linear(dw[-1] * s0 * s0, 1024), nn.ReLU(True), nn.Dropout(0.5),
          nn.Linear(1024, 1), nn.Flatten(0)]  # -> one logit per image
    return nn.Sequential(*g), nn.Sequential(*d)

def dcgan_init(m):
    """DCGAN Sec. 4: all weights from N(0, 0.02); BN scales from N(1, 0.02)."""
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)

def build_nets(args, nc, ncls, size=None):
    """G and D for args.arch, images of nc channels and size x size, ncls classes (0: unconditional)."""
    size = size or args.image_size
    if args.arch == "dcgan":
        g, d = dcgan_nets(args.nz, args.ngf, args.ndf, nc, size, ncls, args.dropout_d)
    else:  # checkpoints from before --bn-d / --dropout-g lack them
        g, d = upsample_nets(args.nz, args.ngf, args.ndf, nc, size, ncls, args.dropout_d,
                             getattr(args, "bn_d", False), getattr(args, "dropout_g", 0.0))
    G, D = Conditioned(g, ncls), Conditioned(d, ncls)
    if args.arch == "dcgan":
        G.apply(dcgan_init), D.apply(dcgan_init)
    return G, D

# ----------------------------------------------------------------------------- evaluation and latent tools
def parzen_log_likelihood(samples, x, sigma):  # -> (len(x),) in nats
    """Goodfellow Sec. 5: log density at each row of x (pixels in [0, 1]) of N Gaussians of width sigma"""
    d2 = torch.cdist(x.double(), samples.double()).pow(2)  # len(x) x N squared distances
    return (torch.logsumexp(-d2 / (2 * sigma ** 2), 1) - math.log(len(samples))  # log of the mean kernel
            - 0.5 * x.shape[1] * math.log(2 * math.pi * sigma ** 2))  # the Gaussian's normaliser in k dims

def parzen_eval(samples, val, test, sigmas=None):
    """Choose sigma on a validation split, then report the test mean and its standard error."""
    sigmas = torch.logspace(-1, 0, 10).tolist() if sigmas is None else sigmas
    sigma = max(sigmas, key=lambda sd: parzen_log_likelihood(samples, val, sd).mean().item())
    ll = torch.cat([parzen_log_likelihood(samples, c, sigma) for c in test.split(500)])
    return sigma, ll.mean().item(), (ll.std() / math.sqrt(len(ll))).item()

def nearest_neighbours(samples, train, chunk=4096):
    """Index of each sample's L2-nearest training image (the faces post's check that G is not copying)."""
    flat = samples.flatten(1).float()  # N x (C H W)
    return torch.cat([torch.cdist(flat, c.flatten(1).float()) for c in train.split(chunk)], 1).argmin(1)

def lerp(a, b, t):
    return a + (b - a) * t[:, None]  # the straight line from a to b at times t: len(t) x nz

def slerp(a, b, t):  # Gaussian latents live near a sphere; a line between two cuts its unlikely interior
    """Spherical interpolation (White 2016) of the direction, linear in the norm: len(t) x nz"""
    na, nb = a.norm(), b.norm()
    ua, ub = a / na, b / nb
    cos_om = ua @ ub  # cos(omega), omega the angle between them
    v = ub - cos_om * ua  # the direction from a towards b on the sphere; |v| = sin(omega)
    sin_om = v.norm()
    omega = torch.atan2(sin_om, cos_om)  # not acos: acos of a float32 cosine rounded to 0.99999994 is 3e-4
    if sin_om < 1e-5 and cos_om > 0:  # parallel: the arc is a point; the path is the line between the norms
        return lerp(a, b, t)
    if sin_om < 1e-5:  # antipodal: every great circle joins them; take one through a basis vector, angle pi
        e = torch.zeros_like(a)
        e[ua.abs().argmin()] = 1
        v, omega = e - (ua @ e) * ua, torch.tensor(math.pi, dtype=a.dtype, device=a.device)
    v = v / v.norm()
    path = ua * torch.cos(omega * t)[:, None] + v * torch.sin(omega * t)[:, None]  # len(t) x nz, unit
    return path * (na + (nb - na) * t)[:, None]

def sweep(z, dim, r, k):
    """Each latent with one dimension swept from -r to r, the rest fixed: what that axis controls."""
    if not 0 <= dim < z.shape[1]:
        fail(f"--sweep-dim {dim} is out of range; the latent has {z.shape[1]} dimensions")
    z = z[:, None].repeat(1, k, 1)  # B x k x nz
    z[:, :, dim] = torch.linspace(-r, r, k, device=z.device)
    return z.flatten(0, 1)  # (B k) x nz

def walk(keys, frames, per_key=16):
    """A slow tour of latent space: slerp between successive key points. keys: K x 16 x nz."""
    t = torch.linspace(0, 1, per_key + 1, device=keys.device)[:-1]
    path = [torch.stack([slerp(a, b, t) for a, b in zip(k0, k1)], 1) for k0, k1 in zip(keys, keys[1:])]
    return torch.cat(path)[:frames]  # frames x 16 x nz

# ----------------------------------------------------------------------------- one training step
@dataclass
class Run:
    """A training run: the networks, their optimisers, the data on the device and the counters."""
    args: argparse.Namespace  # the user's flags (the checkpoint's on --resume); never written to
    nets: dict  # "G", "D": the nn.Modules that are saved
    # "G", "D": what forward passes call (DDP or compiled wrappers, or the modules); "D_for_G": D itself for
    # the G step, which needs only G's gradients: a backward through DDP's D would all-reduce D's for nothing
    fwd: dict
    opts: dict  # "G", "D": their optimisers
    images: torch.Tensor  # the training set, uint8 N x C x H x W, on the device
    labels: torch.Tensor  # its classes, int64 N (None when it has none)
    classes: list  # class names
    ncls: int  # classes fed to G and D; 0 when unconditional
    rank: int = 0  # this process in data-parallel training
    world: int = 1  # the number of processes
    epoch: int = 0  # epochs finished
    step: int = 0  # training steps taken
    l2: float = 0.0  # the L2 rule's coefficient on D's weights
    hist: torch.Tensor = None  # this epoch's histogram of D's outputs, 2 x 20 (real, generated)
    dhist: list = field(default_factory=list)  # one such histogram per finished epoch

def setup_run(args, device, data, rank=0, world=1):
    """A Run for in-memory data (uint8 images N x C x H x W, int64 labels N or None, class names)."""
    images, labels, classes = data
    if len(images) // world < args.batch_size:  # with several ranks: each rank's share
        fail(f"only {len(images) // world} training images, fewer than one batch of --batch-size "
             f"{args.batch_size}; lower --batch-size or add images")
    if args.conditional and labels is None:
        fail("--conditional needs class labels; this dataset has none")
    ncls = len(classes) if args.conditional else 0
    G, D = (m.to(device) for m in build_nets(args, images.shape[1], ncls, images.shape[-1]))
    if args.optimizer == "adam":  # DCGAN Sec. 4: Adam, beta1 0.5
        opts = {k: torch.optim.Adam(m.parameters(), args.lr, betas=(args.beta1, 0.999),
                                    fused=device.type == "cuda") for k, m in (("G", G), ("D", D))}
    else:  # the faces code's rmsprop: decay 0.9, epsilon 1e-8 added to the root
        opts = {k: torch.optim.RMSprop(m.parameters(), args.lr, alpha=0.9, eps=1e-8)
                for k, m in (("G", G), ("D", D))}
    fwd = {"G": G, "D": D}
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        fwd = {k: nn.parallel.DistributedDataParallel(m, device_ids=ids) for k, m in fwd.items()}
    fwd["D_for_G"] = D
    if args.compile:
        fwd = {k: torch.compile(m, dynamic=False) for k, m in fwd.items()}
    if rank == 0:
        report_ratio(G, D)
    labels = None if labels is None else labels.to(device)
    return Run(args, {"G": G, "D": D}, fwd, opts, images.to(device), labels, classes, ncls, rank, world,
               hist=torch.zeros(2, 20, device=device))

def train_step(run, real, y, swap_frac=0.0, d_only=False):
    """One round of the game: a D step on reals and detached fakes, then a G step. Takes the Run, a real
    batch (float B x C x H x W in [-1, 1] on the device), its labels y (int64 B, or None) and the fraction of
    reals to swap for fakes (d_only: D steps alone). Returns scalar tensors, no host sync unless rules act"""
    args, B, dev = run.args, real.shape[0], real.device
    z = torch.randn(B, args.nz, device=dev)
    y_fake = torch.randint(run.ncls, (B,), device=dev) if run.ncls else None
    with autocast(args, dev):
        fake = run.fwd["G"](z, y_fake)  # B x C x H x W
        x_real, y_real = swap_real(real, y, fake, y_fake, swap_frac)
        logit_real = run.fwd["D"](x_real, y_real).float()  # B logits
        logit_fake = run.fwd["D"](fake.detach(), y_fake).float()  # detached: D's loss is not G's to follow
    err_real, err_fake = d_loss(logit_real, logit_fake)
    if args.arch == "upsample":  # the faces code's warm-up and decay
        for group in [g for opt in run.opts.values() for g in opt.param_groups]:
            group["lr"] = faces_lr(args.lr, run.step, run.epoch + 1)
    upd_d, upd_g = True, True
    if args.balance == "margin":
        upd_d, upd_g = margin_rule(*global_mean(err_real, err_fake), args.margin)
    if upd_d:
        run.opts["D"].zero_grad(set_to_none=True)
        # the L2 rule's steps are tuned to the faces code's BCE over a mixed half-real batch: half our sum
        half = 0.5 if args.balance == "l2" else 1.0
        (half * (err_real + err_fake) + l2_penalty(run.nets["D"], run.l2)).backward()
        run.opts["D"].step()
    with autocast(args, dev):
        err_g = g_loss(run.fwd["D_for_G"](fake, y_fake).float())
    if upd_g and not d_only:
        run.opts["G"].zero_grad(set_to_none=True)
        err_g.backward(inputs=list(run.nets["G"].parameters()))  # D's weights are not G's to change
        run.opts["G"].step()
    if args.balance == "l2":
        run.l2 = l2_rule(run.l2, global_mean(err_g)[0])
    p_real, p_fake = torch.sigmoid(logit_real.detach()), torch.sigmoid(logit_fake.detach())  # D(x), D(G(z))
    run.hist += torch.stack([torch.histc(p_real, 20, 0, 1), torch.histc(p_fake, 20, 0, 1)])
    return {"err_d": err_real + err_fake, "err_g": err_g, "err_d_real": err_real, "err_d_fake": err_fake,
            "d_x": p_real.mean(), "d_gz": p_fake.mean(), "upd_d": float(upd_d), "upd_g": float(upd_g)}

# ----------------------------------------------------------------------------- training and sampling
def train(args, device, rank=0, world=1):
    """Train for --epochs (continuing a checkpoint with --resume); rank 0 writes the run's files."""
    if args.resume:
        ckpt = load_checkpoint(os.path.join(args.outf, "ckpt.pt"))
        args = resume_args(args, ckpt)
    elif any(os.path.exists(os.path.join(args.outf, f)) for f in ("ckpt.pt", "log.csv")):
        fail(f"{args.outf} already holds a run; add --resume to continue it, or choose another --outf")
    run = setup_run(args, device, load_dataset(args, "train"), rank, world)
    if args.resume:
        restore(run, ckpt)
    os.makedirs(args.outf, exist_ok=True)
    n = 100 if run.ncls else 64  # conditional: 10 columns, one class each
    fixed_z = torch.randn(n, args.nz, generator=torch.Generator().manual_seed(args.seed)).to(device)
    fixed_y = torch.arange(n, device=device) % run.ncls if run.ncls else None
    start_step, t0 = run.step, time.time()
    pretrain = args.d_pretrain if run.step == 0 else 0  # D alone first, so G then gets a signal; once only
    for b in batches(run, 0)[:pretrain]:
        train_step(run, *get_batch(run, b), d_only=True)
    for epoch in range(run.epoch + 1, args.epochs + 1):
        idx = batches(run, epoch)
        swap = args.swap_real if epoch <= args.swap_epochs else 0.0
        acc, count = {}, 0  # sums of the step outputs since the last log row
        for i, b in enumerate(idx):
            out = train_step(run, *get_batch(run, b), swap)
            run.step, count = run.step + 1, count + 1
            acc = {k: acc.get(k, 0) + (v.detach() if torch.is_tensor(v) else v) for k, v in out.items()}
            if run.step % args.log_every and i < len(idx) - 1:
                continue
            # one host sync per logging interval: the steps' tensors become one log.csv row
            row = {"step": run.step, "epoch": epoch, **{k: float(v) / count for k, v in acc.items()}}
            row["l2"], acc, count = run.l2, {}, 0
            if not all(math.isfinite(v) for v in row.values()):
                fail(f"the losses became NaN/inf at step {run.step}; training stopped and the last good "
                     f"checkpoint in {args.outf} is kept (try a lower --lr or a --balance rule)")
            if rank == 0:
                append_log(os.path.join(args.outf, "log.csv"), row)
                rate = (run.step - start_step) * args.batch_size * world / (time.time() - t0)
                eta = ((args.epochs - epoch) * len(idx) + len(idx) - i - 1) * args.batch_size * world / rate
                eta = f"{eta / 60:.0f}m" if eta >= 60 else f"{eta:.0f}s"
                print(f"[e {epoch}/{args.epochs} it {i + 1}/{len(idx)}] D {row['err_d']:.2f} "
                      f"G {row['err_g']:.2f} D(x) {row['d_x']:.2f} D(G(z)) {row['d_gz']:.2f} | "
                      f"{rate:.0f} img/s | ETA {eta}")
        end_epoch(run, epoch, fixed_z, fixed_y)
    return run.nets["G"], run.nets["D"]

def sample(args):
    """--sample: a grid (and --npz) from a checkpoint, plus the latent pictures and analyses asked for."""
    ckpt = load_checkpoint(args.ckpt)
    targs, device = argparse.Namespace(**ckpt["args"]), pick_device(args)
    nc, size = ckpt.get("shape") or (targs.nc, targs.image_size)  # older checkpoints kept them in args
    ncls = len(ckpt["classes"]) if targs.conditional else 0
    if args.label is not None and not ncls:
        fail(f"{args.ckpt} was trained without --conditional; drop --label")
    if ncls and args.label is not None and not 0 <= args.label < ncls:
        fail(f"--label {args.label} is out of range; this model has classes 0..{ncls - 1}")
    G = build_nets(targs, nc, ncls, size)[0].to(device).eval()
    G.load_state_dict(ckpt["G"])
    torch.manual_seed(args.seed)
    stem = os.path.splitext(args.out or os.path.join(os.path.dirname(args.ckpt), "samples.png"))[0]

    def z(n):  # n latents from the prior
        return torch.randn(n, targs.nz, device=device)

    def labels(n, repeat=1):  # the asked class, or uniform classes; each repeated for a row of images
        if not ncls:
            return None
        y = torch.full((n,), args.label) if args.label is not None else torch.randint(ncls, (n,))
        return y.to(device).repeat_interleave(repeat)
    y = labels(args.n)
    x = generate(G, z(args.n), y)
    save_grid(x, stem + ".png")
    if args.npz:
        np.savez(args.npz, images=to_uint8(x), **({} if y is None else {"labels": y.cpu().numpy()}))
    if args.interp:
        t, path = torch.linspace(0, 1, args.steps, device=device), slerp if args.interp == "slerp" else lerp
        zs = torch.cat([path(a, b, t) for a, b in z(16).view(8, 2, -1)])  # 8 pairs -> 8 rows of steps
        save_grid(generate(G, zs, labels(8, args.steps)), stem + f"_{args.interp}.png", args.steps)
    if args.sweep_dim is not None:
        zs = sweep(z(8), args.sweep_dim, args.range, args.steps)
        save_grid(generate(G, zs, labels(8, args.steps)), stem + "_sweep.png", args.steps)
    if args.walk:
        keys = z(16 * (args.walk // 16 + 2)).view(-1, 16, targs.nz)
        frames = [grid_image(generate(G, f, labels(16)), 4) for f in walk(keys, args.walk)]
        frames[0].save(stem + "_walk.gif", save_all=True, append_images=frames[1:], duration=80, loop=0)
    if args.class_grid and ncls:
        y = torch.arange(ncls, device=device).repeat_interleave(10)
        save_grid(generate(G, z(len(y)), y), stem + "_classes.png", 10)
    n = args.eval_samples if args.eval else 32
    fake = generate(G, z(n), labels(n)).cpu() if args.nn or args.eval else None
    if args.nn:  # samples beside their nearest training images
        train_x = load_dataset(targs, "train")[0]
        near = train_x[nearest_neighbours((fake[:32] + 1) * 127.5, train_x)].permute(0, 2, 3, 1).numpy()
        save_grid(np.stack([to_uint8(fake[:32]), near], 1).reshape(-1, *near.shape[1:]), stem + "_nn.png", 8)
    if args.eval:  # sigma is chosen on 1,000 held-out images the evaluation does not use
        test = load_dataset(targs, "test")[0].flatten(1).double() / 255
        k = min(1000, len(test) // 2)
        sigma, mean, se = parzen_eval((fake.flatten(1).double() + 1) / 2, test[:k], test[k:k + 1000])
        print(f"Parzen log-likelihood: {mean:.1f} +- {se:.1f} nats (sigma {sigma:.3f}, {n} samples)")
    print(f"wrote {stem}*.png" + (f" and {args.npz}" if args.npz else ""))

# ------------------------------------------------------------------------ Appendix: plumbing, not the paper
# Data: a split is one uint8 tensor N x C x H x W on the device, batches gathered by index (no loader).
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",  # the official files' checksums
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb"}
IDX_URLS = {"mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"}
IDX_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
             "t10k-labels-idx1-ubyte.gz"]
IDX_MD5 = {"mnist": ["f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                     "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"],
           "fashion-mnist": ["8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                             "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"]}
CLASSES = {"mnist": list("0123456789"), "shapes": "circle square triangle diamond cross ring".split(),
           "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                             "Sneaker", "Bag", "Ankle boot"]}
SYSTEM_DATA = "/usr/share/datasets"  # where Debian's dataset-fashion-mnist package puts its files
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")

def find_or_download(names, dirs, url, md5):
    """The first of `names` found in `dirs`, else names[0] downloaded into dirs[0] and checked."""
    found = [os.path.join(d, n) for d in dirs for n in names if os.path.exists(os.path.join(d, n))]
    if found:
        return found[0]
    print(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            data = r.read()
    except OSError as e:
        fail(f"could not download {url} ({e}); put {names[0]} in {dirs[0]}")
    if md5_of(data) != md5:
        fail(f"the download of {url} does not match its checksum; try again")
    os.makedirs(dirs[0], exist_ok=True)
    atomic_write(os.path.join(dirs[0], names[0]), lambda f: f.write(data))
    return os.path.join(dirs[0], names[0])

def atomic_write(path, write):
    """write(f) into PATH.tmp, fsync, rename: a crash or a full disk leaves the old PATH as it was."""
    try:
        with open(path + ".tmp", "wb") as f:
            write(f)
            f.flush(), os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    except OSError:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        raise

def md5_of(data):
    return hashlib.md5(data).hexdigest()

def damaged(path, what):
    fail(f"{path} is damaged ({what}); delete it to download it again, or replace it")

class BatchUnpickler(pickle.Unpickler):
    """Unpickles only what official CIFAR-10 batches hold (numpy arrays): a crafted file cannot run code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not in an official batch")
        return {"ndarray": np.ndarray, "dtype": np.dtype}.get(name) or np.zeros(1).__reduce__()[0]

def read_cifar10(root, split):
    """The official tarball (or its extracted folder): pickled 10000 x 3072 uint8 batches, checksums first"""
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    src, tar = os.path.join(root, "cifar-10-batches-py"), "cifar-10-python.tar.gz"
    if os.path.isdir(src):
        files = {n: open(os.path.join(src, n), "rb").read() for n in names + ["batches.meta"]
                 if os.path.isfile(os.path.join(src, n))}
    else:
        src = find_or_download([tar], [root], CIFAR_URL, CIFAR_MD5[tar])
        files = {tar: open(src, "rb").read()}
    for n, data in files.items():
        if n in CIFAR_MD5 and md5_of(data) != CIFAR_MD5[n]:
            where = src if n == tar else os.path.join(src, n)
            fail(f"{where} does not match the official CIFAR-10 checksum; delete it to download it again")
    try:
        if tar in files:
            with tarfile.open(fileobj=io.BytesIO(files[tar])) as t:
                files = {os.path.basename(m.name): t.extractfile(m).read() for m in t if m.isfile()}
        *parts, meta = [BatchUnpickler(io.BytesIO(files[n]), encoding="bytes").load()
                        for n in names + ["batches.meta"]]
        x = np.concatenate([b[b"data"] for b in parts]).reshape(-1, 3, 32, 32)
        y, classes = np.concatenate([b[b"labels"] for b in parts]), [c.decode() for c in meta[b"label_names"]]
    except pickle.UnpicklingError as e:
        fail(f"{src} holds data that is not an official CIFAR-10 batch ({e}); delete it to download it again")
    except Exception as e:  # a truncated tarball or pickle, a missing batch, another layout
        damaged(src, f"{type(e).__name__}: {e}")
    return torch.from_numpy(x), torch.from_numpy(y).long(), classes

def read_idx(path):
    """IDX (LeCun): 2 zero bytes, a type byte (0x08 = uint8), a rank byte, big-endian int32 sizes, data."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except (EOFError, zlib.error, OSError) as e:
        damaged(path, f"{type(e).__name__}: {e}")
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 8 or len(data) < 4 + 4 * data[3]:
        fail(f"{path} is not a uint8 IDX file")
    dims, start = np.frombuffer(data, ">i4", data[3], 4), 4 + 4 * data[3]
    if len(data) - start < np.prod(dims):
        damaged(path, f"it holds fewer items than its header's {dims[0]}")
    return np.frombuffer(data, np.uint8, np.prod(dims), start).reshape(dims)

def load_mnist(root, name, split):
    """MNIST or Fashion-MNIST, gzipped or not, from DATAROOT/NAME, DATAROOT or a Debian dataset package."""
    dirs = [os.path.join(root, name), root, os.path.join(SYSTEM_DATA, name)]
    x, y = (read_idx(find_or_download([IDX_FILES[i], IDX_FILES[i][:-3]], dirs, IDX_URLS[name] + IDX_FILES[i],
                                      IDX_MD5[name][i])) for i in ([0, 1] if split == "train" else [2, 3]))
    return torch.from_numpy(x.copy())[:, None], torch.from_numpy(y.astype(np.int64)), CLASSES[name]

def decode_image(path, size, mode):
    """Resize the shorter side to `size`, then centre-crop, as DCGAN's LSUN/CelebA preprocessing."""
    try:
        im = Image.open(path)
        if im.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grey: keep the top 8 bits (convert clips)
            im = Image.fromarray((np.asarray(im, np.int64).clip(0, 65535) >> 8).astype(np.uint8))
        im = im.convert(mode or ("L" if im.mode in ("L", "LA", "1") else "RGB"))
    except Exception as e:
        fail(f"cannot read image {path} ({type(e).__name__}); remove or replace the file")
    scale = size / min(im.size)
    im = im.resize([max(size, round(side * scale)) for side in im.size], Image.BICUBIC)
    left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))

def load_folder(root, size, channels, workers):
    """A folder of images, class labels from sub-folders; decoded once and cached beside the data."""
    if not os.path.isdir(root):
        fail(f"--dataroot {root} is not a folder; point it at a folder of images")
    walk = os.walk(root, onerror=lambda e: fail(f"cannot read {e.filename} ({e.strerror}); fix its "
                                                   "permissions or move it out of --dataroot"))
    files = sorted(os.path.join(d, f) for d, _, fs in walk for f in fs if f.lower().endswith(IMAGE_EXT))
    if not files:
        fail(f"no images ({', '.join(IMAGE_EXT)}) found under {root}")
    classes = sorted({os.path.relpath(os.path.dirname(f), root) for f in files})
    stamp = md5_of(repr([(f, os.path.getmtime(f)) for f in files]).encode())[:12]
    cache = os.path.join(root, f".cache-{size}px-{channels or 'auto'}ch-{stamp}.npz")
    try:  # a cache cut short by a crash or a full disk counts as absent
        with np.load(cache) as z:
            return torch.from_numpy(z["x"]), torch.from_numpy(z["y"]), classes
    except Exception:
        pass
    mode = {1: "L", 3: "RGB"}.get(channels)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        ims = list(pool.map(lambda f: decode_image(f, size, mode), files))
    if mode is None and any(im.ndim == 3 for im in ims):  # colour kept as found; greys join as RGB
        ims = [np.repeat(im[..., None], 3, 2) if im.ndim == 2 else im for im in ims]
    x = np.stack([im if im.ndim == 3 else im[..., None] for im in ims]).transpose(0, 3, 1, 2).copy()
    y = np.array([classes.index(os.path.relpath(os.path.dirname(f), root)) for f in files], np.int64)
    try:
        atomic_write(cache, lambda f: np.savez(f, x=x, y=y))
    except OSError:  # a read-only dataset still works, it is just decoded again next time
        pass
    return torch.from_numpy(x), torch.from_numpy(y), classes

def make_shapes(n, size, seed):
    """Coloured shapes (a class each) on dark ground, in seeded chunks of 1000: `--limit` takes a prefix."""
    xs, ys, c = [], [], (np.arange(size) + 0.5) / size * 2 - 1
    for rng in (np.random.default_rng([seed, i]) for i in range(0, n, 1000)):
        y = rng.integers(0, 6, 1000)
        cx, cy, r = rng.uniform(-0.35, 0.35, 1000), rng.uniform(-0.35, 0.35, 1000), rng.uniform(.35, .6, 1000)
        dx = (c[None, None, :] - cx[:, None, None]) / r[:, None, None]  # 1000 x size x size
        dy = (c[None, :, None] - cy[:, None, None]) / r[:, None, None]
        ax, ay, rr = np.abs(dx), np.abs(dy), dx ** 2 + dy ** 2
        masks = [rr <= 1, np.maximum(ax, ay) <= 0.8, (dy <= 0.7) & (ax <= 0.56 * (dy + 0.9)), ax + ay <= 1,
                 ((ax <= 0.3) & (ay <= 0.9)) | ((ay <= 0.3) & (ax <= 0.9)), (rr <= 1) & (rr >= 0.45)]
        fg, bg = rng.uniform(0.45, 1, (1000, 3, 1, 1)), rng.uniform(0, 0.2, (1000, 3, 1, 1))
        x = np.where(np.choose(y[:, None, None], masks)[:, None], fg, bg)  # 1000 x 3 x size x size
        xs.append(torch.from_numpy((x * 255).round().astype(np.uint8))), ys.append(torch.from_numpy(y))
    return torch.cat(xs)[:n], torch.cat(ys)[:n], CLASSES["shapes"]

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
        x = (x.float() * torch.tensor([.299, .587, .114])[:, None, None]).sum(1, keepdim=True).round().byte()
    elif args.channels == 3 and x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    if split == "train" and args.limit:
        x, y = x[:args.limit], y[:args.limit]
    if len(x) == 0:
        fail(f"the {split} split of {args.dataset} under {args.dataroot} holds no images")
    size = args.image_size or x.shape[-1]
    if x.shape[-2:] != (size, size):  # antialiased bilinear, in chunks to bound the float copy
        x = [F.interpolate(c.float(), (size, size), mode="bilinear", antialias=True) for c in x.split(4096)]
        x = torch.cat(x).round().clamp(0, 255).to(torch.uint8)
    return x, y, classes

def batches(run, epoch):
    """This rank's share of one shuffled pass, as index tensors on the device (reproducible per epoch)."""
    gen = torch.Generator().manual_seed(run.args.seed * 100003 + epoch)
    perm = torch.randperm(len(run.images), generator=gen)[run.rank::run.world].to(run.images.device)
    return perm[: len(perm) // run.args.batch_size * run.args.batch_size].view(-1, run.args.batch_size)

def get_batch(run, idx):
    """Images idx as floats in [-1, 1] on the device (from uint8), with their labels when conditional."""
    return run.images[idx].float().div_(127.5).sub_(1), (run.labels[idx] if run.ncls else None)

# Checkpoints and resume: `checkpoint` and `restore` are mirror images
RESUME_MAY_CHANGE = ["dataroot", "epochs", "outf", "cuda", "amp", "compile", "workers", "log_every"]
OUTPUT_ONLY = ["sample", "ckpt", "n", "label", "npz", "out", "interp", "steps", "sweep_dim", "range", "walk",
               "class_grid", "nn", "eval", "eval_samples", "resume", "typed"]  # never read by training

def checkpoint(run):
    return {"script": SCRIPT, "args": vars(run.args), "shape": [run.images.shape[1], run.images.shape[-1]],
            "classes": run.classes, "G": run.nets["G"].state_dict(), "D": run.nets["D"].state_dict(),
            "optG": run.opts["G"].state_dict(), "optD": run.opts["D"].state_dict(), "epoch": run.epoch,
            "step": run.step, "balance": {"l2": run.l2}, "dhist": torch.stack(run.dhist),
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()}}

def restore(run, ckpt):
    for k in ("G", "D"):
        run.nets[k].load_state_dict(ckpt[k])
        run.opts[k].load_state_dict(ckpt["opt" + k])
    run.epoch, run.step, run.l2 = ckpt["epoch"], ckpt["step"], ckpt["balance"]["l2"]
    run.dhist = list(ckpt["dhist"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if ckpt["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    if run.rank:  # the checkpoint holds rank 0's RNG; the other ranks need noise of their own
        torch.manual_seed(run.args.seed + run.rank + 7919 * ckpt["epoch"])
    elif os.path.exists(log := os.path.join(run.args.outf, "log.csv")):
        with open(log) as f:  # rows past the checkpoint (a crash mid-epoch) are written again
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= ckpt["step"]]
        os.remove(log)
        for r in rows:
            append_log(log, r)
    print(f"resumed from epoch {ckpt['epoch']}, step {ckpt['step']}")

def resume_args(args, ckpt):
    """The checkpoint's flags, but --dataroot and --epochs where typed, and this machine's flags (--cuda,
    --amp, --compile, --workers, --log-every) from the command line, typed or not."""
    saved, names = ckpt["args"], lambda keys: ", ".join("--" + k.replace("_", "-") for k in keys)
    free = RESUME_MAY_CHANGE + OUTPUT_ONLY
    differ = [k for k in args.typed if k not in free and saved.get(k) != vars(args)[k]]
    if differ:
        fail(f"--resume keeps the checkpoint's training flags; {names(differ)} differ from it (only "
             f"{names(RESUME_MAY_CHANGE)} may change): drop them, or start a new run with another --outf")
    typed_only = ("dataroot", "epochs")  # else the checkpoint's: data where it was, the run's own length
    keep = {k: getattr(args, k) for k in RESUME_MAY_CHANGE if k not in typed_only or k in args.typed}
    args = argparse.Namespace(**{**saved, **keep, "resume": True, "typed": args.typed})
    if ckpt["epoch"] >= args.epochs:
        fail(f"the checkpoint has already trained {ckpt['epoch']} epochs; give --epochs larger than "
             f"{ckpt['epoch']} to train more")
    return args

def save_checkpoint(obj, path):
    try:
        atomic_write(path, lambda f: torch.save(obj, f))
    except OSError as e:
        if e.errno == errno.ENOSPC:
            fail(f"no space left on {os.path.dirname(os.path.abspath(path))} writing {path}; "
                 "the last checkpoint is kept")
        fail(f"could not write {path} ({e.strerror}); the last checkpoint is kept")

def load_checkpoint(path):
    if not os.path.exists(path):
        fail(f"no checkpoint at {path}; train first or point --ckpt/--outf at a run folder")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{path} is not a readable checkpoint ({type(e).__name__})")
    if not isinstance(ckpt, dict) or ckpt.get("script") != SCRIPT:
        other = ckpt.get("script") if isinstance(ckpt, dict) else None
        fail(f"{path} was written by {other or 'another program'}.py, not {SCRIPT}.py; use that script")
    return ckpt

# Logs and pictures
def end_epoch(run, epoch, fixed_z, fixed_y):
    """After each epoch every rank takes rank 0's BN statistics; rank 0 writes samples, checkpoint, curves."""
    run.epoch, run.dhist = epoch, run.dhist + [run.hist.cpu().clone()]
    run.hist.zero_()
    if run.world > 1:  # BN running statistics are per rank
        for b in list(run.nets["G"].buffers()) + list(run.nets["D"].buffers()):
            dist.broadcast(b, 0)
    if run.rank == 0:
        G, outf = run.nets["G"], run.args.outf
        if not all(torch.isfinite(p).all() for p in G.parameters()):
            fail(f"G's weights became NaN/inf in epoch {epoch}; the last good checkpoint in {outf} is kept")
        grid = generate(G.eval(), fixed_z, fixed_y)
        save_grid(grid, os.path.join(outf, f"samples_e{epoch:03d}.png"), 10 if run.ncls else 8), G.train()
        save_checkpoint(checkpoint(run), os.path.join(outf, "ckpt.pt"))
        plot_curves(os.path.join(outf, "log.csv"), os.path.join(outf, "curves.png"))
        draw_dhist(torch.stack(run.dhist), os.path.join(outf, "dhist.png"))

def append_log(path, row):
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

def plot_curves(csv_path, png_path, w=480, h=80):
    """curves.png: every numeric column of log.csv against the row, one panel each, drawn with Pillow."""
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    if len(rows) < 2:
        return
    keys = [k for k in rows[0] if k != "step"]
    img = Image.new("RGB", (w, h * len(keys)), "white")
    draw = ImageDraw.Draw(img)
    for i, k in enumerate(keys):
        vals = [float(r[k]) for r in rows]
        lo, hi = min(vals), max(vals)
        top = (i + 1) * h - 5  # each panel's baseline
        draw.line([(5 + j * (w - 10) / (len(rows) - 1), top - (v - lo) / (hi - lo or 1) * (h - 25))
                   for j, v in enumerate(vals)], fill=(31, 119, 180))
        draw.text((5, i * h + 3), f"{k}: {lo:.3g} .. {hi:.3g}", fill="black")
    img.save(png_path)

def draw_dhist(hist, path, cell=12):
    """dhist.png: per epoch (rows) the histograms of D's outputs (0 to 1) on real (left) and fake images"""
    frac = hist / hist.sum(-1, keepdim=True).clamp(min=1)
    shade = 255 - (frac / frac.amax().clamp(min=1e-8) * 255).byte()  # E x 2 x 20, dark = many outputs
    rows = torch.cat([shade[:, 0], torch.full((len(shade), 1), 255, dtype=torch.uint8), shade[:, 1]], 1)
    img = Image.new("L", (rows.shape[1] * cell, len(rows) * cell + 14), 255)
    img.paste(Image.fromarray(rows.numpy()).resize((rows.shape[1] * cell, len(rows) * cell), Image.NEAREST),
              (0, 14))
    ImageDraw.Draw(img).text((2, 1), "D(x) on real: 0 .. 1", fill=0)
    ImageDraw.Draw(img).text((21 * cell + 2, 1), "D(G(z)) on generated: 0 .. 1", fill=0)
    img.save(path)

def generate(G, z, y=None, batch=500):
    """G's images for latents z (and labels y) in batches, as floats in [-1, 1]."""
    with torch.no_grad():
        parts = [G(z[i:i + batch], None if y is None else y[i:i + batch]) for i in range(0, len(z), batch)]
    return torch.cat(parts).float().clamp(-1, 1)

def to_uint8(x):  # [-1, 1] float N x C x H x W -> uint8 N x H x W x C
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()

def save_grid(images, path, nrow=8):
    grid_image(images, nrow).save(path)

def grid_image(images, nrow=8, pad=2):
    x = to_uint8(images) if torch.is_tensor(images) else images
    n, h, w, c = x.shape
    grid = np.full((-(-n // nrow) * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        top, left = pad + i // nrow * (h + pad), pad + i % nrow * (w + pad)
        grid[top:top + h, left:left + w] = x[i]
    return Image.fromarray(grid.squeeze(-1) if c == 1 else grid)

# Device and data-parallel helpers
def pick_device(args, local_rank=0):
    if args.cuda and not torch.cuda.is_available():
        fail("--cuda was given but PyTorch sees no CUDA GPU; drop --cuda to run on the CPU")
    if args.amp and not args.cuda:
        print("note: --amp (bf16 autocast) applies on CUDA only; the CPU trains in fp32")
    torch.backends.cudnn.benchmark = args.cuda  # fixed shapes: let cuDNN pick the fastest kernels
    return torch.device("cuda", local_rank) if args.cuda else torch.device("cpu")

def autocast(args, device):
    return torch.autocast(device.type, torch.bfloat16, enabled=args.amp and device.type == "cuda")

def fail(msg):
    raise SystemExit(f"error: {msg}")

def global_mean(*values):
    """Average scalars over data-parallel ranks so every rank's balancing rule takes the same branch."""
    t = torch.stack([v.detach().float() for v in values])
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()

# Command line
def make_parser():
    p = argparse.ArgumentParser(description="GAN / DCGAN with balancing heuristics; see the module docstring")
    a, num, flag = p.add_argument, {"type": int, "default": None}, {"action": "store_true"}
    a("--dataset", choices=["cifar10", "mnist", "fashion-mnist", "folder", "shapes"])
    a("--dataroot", default="./data", help="where the data lives or is downloaded to")
    a("--image-size", **num, help="native size unless given; 64 for folder")
    a("--channels", type=int, choices=[1, 3], help="force greyscale or RGB")
    a("--conditional", **flag, help="class-conditional G and D")
    a("--limit", **num, help="use only the first N training images")
    a("--arch", choices=["dcgan", "upsample"], default="dcgan")
    a("--nz", **num, help="dcgan 100, upsample 512")
    a("--ngf", type=int, default=64)
    a("--ndf", type=int, default=64)
    a("--epochs", type=int, default=25)
    a("--batch-size", type=int, default=64)
    a("--lr", type=float, help="dcgan 2e-4, upsample 1e-3")
    a("--beta1", type=float, default=0.5)
    a("--optimizer", choices=["adam", "rmsprop"], help="dcgan adam, upsample rmsprop")
    a("--balance", choices=["none", "margin", "l2"], help="dcgan none, upsample margin")
    a("--margin", type=float, default=0.3)
    a("--d-pretrain", type=int, default=0, help="D-only steps first")
    a("--swap-real", type=float, default=0.0)
    a("--swap-epochs", type=int, default=0)
    a("--dropout-d", type=float)
    a("--bn-d", **flag)
    a("--dropout-g", type=float, default=0.0)
    a("--seed", type=int, default=1)
    a("--outf")
    a("--resume", **flag)
    a("--log-every", type=int, default=100)
    a("--cuda", **flag)
    a("--amp", **flag)
    a("--compile", **flag)
    a("--workers", type=int, default=4)
    a("--sample", **flag)
    a("--ckpt")
    a("--n", type=int, default=64)
    a("--label", **num)
    a("--npz")
    a("--out")
    a("--interp", choices=["lerp", "slerp"])
    a("--steps", type=int, default=10)
    a("--sweep-dim", **num)
    a("--range", type=float, default=3.0)
    a("--walk", type=int, default=0)
    a("--class-grid", **flag)
    a("--nn", **flag)
    a("--eval", **flag)
    a("--eval-samples", type=int, default=10000)
    return p

def get_args(argv=None):
    """The user's flags, checked; `typed` lists those typed, for --resume's check."""
    p = make_parser()
    args = p.parse_args(argv)
    for action in p._actions:  # parse again with no defaults: what is left is what the user typed
        action.default = argparse.SUPPRESS
    args.typed = list(vars(p.parse_args(argv)))  # in the order typed, for --resume's check
    for name, ok, need in NUMBER_CHECKS:
        if not ok(getattr(args, name)):
            fail(f"--{name.replace('_', '-')} {getattr(args, name)} is out of range; it must be {need}")
    for name, folder in (("out", os.path.dirname(os.path.abspath(args.out or "."))),
                         ("npz", os.path.dirname(os.path.abspath(args.npz or ".")))):
        if not os.path.isdir(folder):
            fail(f"--{name} {getattr(args, name)}: the folder {folder} does not exist; create it first")
    if args.outf and os.path.isfile(args.outf):
        fail(f"--outf {args.outf} is a file; give a folder for the run's files")
    if not (args.sample and args.ckpt or args.dataset or args.resume and args.outf):
        fail("give --dataset NAME to train, --resume --outf DIR to continue, or --sample --ckpt FILE")
    if args.arch != "upsample" and (args.bn_d or args.dropout_g):
        fail("--bn-d and --dropout-g belong to --arch upsample; add --arch upsample or drop them")
    for k, v in ARCH_DEFAULTS[args.arch].items():  # the flags the user left out take the arch's defaults
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.outf = args.outf or os.path.join("out", f"{SCRIPT}-{args.dataset}")
    return args

NUMBER_CHECKS = [("image_size", lambda v: v is None or 1 <= v <= 1024, "between 1 and 1024"),
                 ("epochs", lambda v: v >= 1, "at least 1"), ("log_every", lambda v: v >= 1, "at least 1"),
                 ("batch_size", lambda v: v >= 2, "at least 2 (batch norm needs two)"),
                 ("n", lambda v: v >= 1, "at least 1")]

def main(argv=None):
    args = get_args(argv)
    if args.sample:
        return sample(args)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    device = pick_device(args, int(os.environ.get("LOCAL_RANK", 0)))
    torch.manual_seed(args.seed + rank)
    if world == 1:
        return train(args, device)
    if device.type == "cuda":  # launched by torchrun: one process per GPU (or CPU worker)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        nets = train(args, device, rank, world)
        dist.barrier()  # no rank tears Gloo/NCCL down while another still talks to it
        return nets
    finally:
        dist.destroy_process_group()

if __name__ == "__main__":
    main()
