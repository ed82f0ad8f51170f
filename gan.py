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
    Goodfellow Sec. 3, Eq. 1: D's loss, G's non-saturating loss    d_loss, g_loss
    Goodfellow Alg. 1 (k = 1): a D step, then a G step, D fixed    train_step, d_step, g_step
    faces post: margin rule, adaptive L2 on D, reals swapped for   margin_rule, l2_rule, l2_penalty,
      fakes early on, D pre-training, RMSProp warm-up and decay      swap_real, swap_fraction, pretrain_d,
                                                                     faces_lr
    Eyescream: D with about 0.125 to 0.5 of G's parameters         report_ratio
    DCGAN Sec. 3 (networks), Sec. 4 (N(0, 0.02) init, Adam)        dcgan_nets, dcgan_init, make_optimizer
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
import argparse
import contextlib
import csv
import errno
import gzip
import hashlib
import io
import math
import os
import pickle
import shlex
import shutil
import sys
import tarfile
import time
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
import numpy as np
import torch
from torch import distributed as dist, nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps

SCRIPT = "gan"

# ----------------------------------------------------------------------------- the game and its losses
def bce(logits, target):  # binary cross-entropy of D's logits against a constant target, a batch mean
    targets = torch.full_like(logits, target)
    return F.binary_cross_entropy_with_logits(logits, targets)

def d_loss(logit_real, logit_fake):
    """D ascends log D(x) + log(1 - D(G(z))) (Eq. 1): BCE with target 1 on reals, 0 on fakes."""
    err_real = bce(logit_real, 1.0)  # -log D(x), a batch mean
    err_fake = bce(logit_fake, 0.0)  # -log(1 - D(G(z)))
    return err_real, err_fake

def g_loss(logit_fake):
    """Sec. 3: minimise -log D(G(z)), not log(1 - D(G(z))), which is flat while D rejects G's samples."""
    return bce(logit_fake, 1.0)

# ----------------------------------------------------------------------------- balancing heuristics
def margin_rule(err_real, err_fake, margin=0.3):  # -> (update_d, update_g)
    """Faces post: D rests when right on reals or fakes (error < margin), G when D is fooled (> 1 - margin)"""
    d_is_right = err_real < margin or err_fake < margin
    d_is_fooled = err_real > 1 - margin or err_fake > 1 - margin
    update_d = not d_is_right
    update_g = not d_is_fooled
    if not update_d and not update_g:  # never both rest
        return True, True
    return update_d, update_g

def l2_rule(coef, err_g, step=1e-5, high=1.3, low=0.9):
    """Faces post: G failing (error > high) means D is too strong: raise D's L2 penalty; lower it below low"""
    if err_g > high:
        return coef + step
    if err_g < low:
        return max(coef - step, 0.0)
    return coef

def l2_penalty(net, coef):
    """coef/2 |theta|^2, whose gradient coef * theta is what the Torch code adds to D's gradient."""
    if coef == 0:
        return 0.0
    squares = sum(p.pow(2).sum() for p in net.parameters())
    return 0.5 * coef * squares

def swap_real(real, y_real, fake, y_fake, frac):
    """Replace a fraction of the reals with fakes still labelled real, to slow D while G finds its feet."""
    k = int(round(frac * real.shape[0]))  # the first k reals give way; the batch stays B x C x H x W
    if k == 0:
        return real, y_real
    x = torch.cat([fake[:k].detach(), real[k:]])
    if y_real is None:
        return x, None
    y = torch.cat([y_fake[:k], y_real[k:]])  # a swapped fake keeps the class G drew it for
    return x, y

def swap_fraction(args, epoch):
    """The faces post swaps reals for fakes early on only: in epochs 1 to --swap-epochs (counted from 1)."""
    if epoch <= args.swap_epochs:
        return args.swap_real
    return 0.0

def faces_lr(lr, step, epoch):  # lfw_adverserial.lua's warm-up, train_lfw.lua's decay
    """The faces code's schedule: lr/50 for 10 updates, lr/5 until 30, then lr; times 0.99 per past epoch"""
    decayed = max(lr * 0.99 ** (epoch - 1), 1e-6)
    if step < 10:
        return decayed / 50
    if step < 30:
        return decayed / 5
    return decayed

def report_ratio(G, D):
    """Eyescream's rule of thumb: D with about 0.5 (or 0.125) of G's parameters trains well."""
    ng = count_params(G)
    nd = count_params(D)
    ratio = nd / ng
    print(f"G {ng:,} parameters, D {nd:,} parameters, D/G = {ratio:.3f}")
    if not 0.0625 <= ratio <= 1.5:  # far outside, one network overpowers the other
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
        self.body = body
        self.ncls = ncls

    def forward(self, x, y=None):
        if self.ncls:
            onehot = F.one_hot(y, self.ncls).to(x.dtype)  # B x ncls
            if x.dim() == 4:  # an image: B x ncls x H x W planes
                onehot = onehot[:, :, None, None]
                onehot = onehot.expand(-1, -1, x.shape[2], x.shape[3])
            x = torch.cat([x, onehot], 1)  # B x (nz + ncls), or B x (C + ncls) x H x W
        return self.body(x)

def depth(size, largest, fewest, arch):  # size = s0 * 2^n: n doublings from s0 x s0, s0 in 4..largest
    s0, n = size, 0
    while s0 % 2 == 0 and s0 > largest:
        s0 = s0 // 2
        n = n + 1
    if not (4 <= s0 <= largest and n >= fewest):
        fail(f"--image-size {size} does not fit --arch {arch}; use s*2^n with s in 4..{largest}, e.g. 32")
    return s0, n

def dcgan_nets(nz, ngf, ndf, nc, size, ncls, dropout):
    """DCGAN Sec. 3: strided (transposed) convs, BN, ReLU in G / LeakyReLU 0.2 in D, no BN on D's input."""
    s0, n = depth(size, 7, 2, "dcgan")  # 28 = 7 * 2^2, 32 = 4 * 2^3, 64 = 4 * 2^4
    gw = [ngf * 2 ** i for i in reversed(range(n))]  # 64x64: 512, 256, 128, 64 channels
    g = [nn.Unflatten(1, (nz + ncls, 1, 1))]  # z as a 1 x 1 image
    g += [nn.ConvTranspose2d(nz + ncls, gw[0], s0, 1, 0, bias=False)]  # -> s0 x s0
    g += [nn.BatchNorm2d(gw[0]), nn.ReLU(True)]
    for a, b in zip(gw, gw[1:]):  # each doubles H and W
        g += [nn.ConvTranspose2d(a, b, 4, 2, 1, bias=False)]
        g += [nn.BatchNorm2d(b), nn.ReLU(True)]
    g += [nn.ConvTranspose2d(gw[-1], nc, 4, 2, 1, bias=False)]
    g += [nn.Tanh()]  # -> nc x size x size in [-1, 1]
    dw = [ndf * 2 ** i for i in range(n)]  # 64x64: 64, 128, 256, 512 channels, halving H and W each
    extra = [nn.Dropout(dropout)] if dropout else []
    d = [nn.Conv2d(nc + ncls, dw[0], 4, 2, 1, bias=False)]  # no BN on D's input
    d += [nn.LeakyReLU(0.2, True)] + extra
    for a, b in zip(dw, dw[1:]):
        d += [nn.Conv2d(a, b, 4, 2, 1, bias=False)]
        d += [nn.BatchNorm2d(b), nn.LeakyReLU(0.2, True)] + extra
    d += [nn.Conv2d(dw[-1], 1, s0, 1, 0, bias=False)]  # s0 x s0 -> one logit
    d += [nn.Flatten(0)]  # B logits
    return nn.Sequential(*g), nn.Sequential(*d)

def upsample_nets(nz, ngf, ndf, nc, size, ncls, dropout, bn_d=False, dropout_g=0.0):
    """The Torch faces model: G = linear -> (nearest x2, conv5, BN, ReLU) blocks -> conv3; D = (conv5,
    max-pool, ReLU, spatial dropout) blocks, no BN -> linear 1024 -> dropout -> logit. bn_d puts BN after D's
    convs but the first (the post's panel A: D then wins); dropout_g: dropout after G's ReLUs, tried too."""
    s0, n = depth(size, 8, 1, "upsample")  # the faces code: 64 = 8 * 2^3
    gw = [ngf * 2] + [ngf * 4] * (n - 1) + [ngf * 2]  # 64x64: 128 -> 256 -> 256 -> 128 channels
    g = [nn.Linear(nz + ncls, gw[0] * s0 * s0)]
    g += [nn.Unflatten(1, (gw[0], s0, s0)), nn.ReLU(True)]
    for a, b in zip(gw, gw[1:]):  # each block doubles H and W
        g += [nn.Upsample(scale_factor=2), nn.Conv2d(a, b, 5, 1, 2)]
        g += [nn.BatchNorm2d(b), nn.ReLU(True)]
        g += [nn.Dropout(dropout_g)] if dropout_g else []
    g += [nn.Conv2d(gw[-1], nc, 3, 1, 1)]  # linear output, as in the Torch code
    dw = [nc + ncls] + [ndf // 2 * (i + 1) for i in range(n)]  # 64x64: 32, 64, 96 channels
    p = 0.2 if dropout is None else dropout  # the faces code's spatial dropout
    d = []
    for i, (a, b) in enumerate(zip(dw, dw[1:])):  # each block halves H and W
        d += [nn.Conv2d(a, b, 5, 1, 2)]
        d += [nn.BatchNorm2d(b)] if bn_d and i > 0 else []
        d += [nn.MaxPool2d(2), nn.ReLU(True), nn.Dropout2d(p)]
    d += [nn.Flatten(), nn.Linear(dw[-1] * s0 * s0, 1024)]
    d += [nn.ReLU(True), nn.Dropout(0.5)]
    d += [nn.Linear(1024, 1), nn.Flatten(0)]  # -> one logit per image
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
    widths = (args.nz, args.ngf, args.ndf, nc, size, ncls, args.dropout_d)
    if args.arch == "dcgan":
        g, d = dcgan_nets(*widths)
    else:
        g, d = upsample_nets(*widths, args.bn_d, args.dropout_g)
    G = Conditioned(g, ncls)
    D = Conditioned(d, ncls)
    if args.arch == "dcgan":
        G.apply(dcgan_init)
        D.apply(dcgan_init)
    return G, D

def make_optimizer(net, args):
    if args.optimizer == "adam":  # DCGAN Sec. 4: Adam, beta1 0.5
        fused = next(net.parameters()).is_cuda  # one kernel for every parameter on the GPU
        betas = (args.beta1, 0.999)
        return torch.optim.Adam(net.parameters(), args.lr, betas=betas, fused=fused)
    # the faces code's rmsprop: decay 0.9, epsilon 1e-8 added to the root
    return torch.optim.RMSprop(net.parameters(), args.lr, alpha=0.9, eps=1e-8)

# ----------------------------------------------------------------------------- evaluation and latent tools
def parzen_log_likelihood(samples, x, sigma):  # -> (len(x),) in nats
    """Goodfellow Sec. 5: log density at each row of x (pixels in [0, 1]) of N Gaussians of width sigma"""
    d2 = torch.cdist(x.double(), samples.double()).pow(2)  # len(x) x N squared distances
    log_kernels = -d2 / (2 * sigma ** 2)
    log_mean_kernel = torch.logsumexp(log_kernels, 1) - math.log(len(samples))
    log_normaliser = 0.5 * x.shape[1] * math.log(2 * math.pi * sigma ** 2)  # the Gaussian's, in k dims
    return log_mean_kernel - log_normaliser

def parzen_eval(samples, val, test, sigmas=None):
    """Choose sigma on a validation split, then report the test mean and its standard error."""
    if sigmas is None:
        sigmas = torch.logspace(-1, 0, 10).tolist()

    def val_score(sd):
        return parzen_log_likelihood(samples, val, sd).mean().item()
    sigma = max(sigmas, key=val_score)
    ll = torch.cat([parzen_log_likelihood(samples, c, sigma) for c in test.split(500)])
    se = ll.std() / math.sqrt(len(ll))
    return sigma, ll.mean().item(), se.item()

def nearest_neighbours(samples, train, chunk=4096):
    """Index of each sample's L2-nearest training image (the faces post's check that G is not copying)."""
    flat = samples.flatten(1).float()  # N x (C H W)
    dists = [torch.cdist(flat, c.flatten(1).float()) for c in train.split(chunk)]
    return torch.cat(dists, 1).argmin(1)

def lerp(a, b, t):
    return a + (b - a) * t[:, None]  # the straight line from a to b at times t: len(t) x nz

def slerp(a, b, t):  # Gaussian latents live near a sphere; a line between two cuts its unlikely interior
    """Spherical interpolation (White 2016) of the direction, linear in the norm: len(t) x nz"""
    na = a.norm()
    nb = b.norm()
    ua = a / na
    ub = b / nb
    cos_om = ua @ ub  # cos(omega), omega the angle between them
    v = ub - cos_om * ua  # the direction from a towards b on the sphere; |v| = sin(omega)
    sin_om = v.norm()
    omega = torch.atan2(sin_om, cos_om)  # not acos: acos of a float32 cosine rounded to 0.99999994 is 3e-4
    if sin_om < 1e-5 and cos_om > 0:  # parallel: the arc is a point; the path is the line between the norms
        return lerp(a, b, t)
    if sin_om < 1e-5:  # antipodal: every great circle joins them; take one through a basis vector, angle pi
        e = torch.zeros_like(a)
        e[ua.abs().argmin()] = 1
        v = e - (ua @ e) * ua
        omega = torch.tensor(math.pi, dtype=a.dtype, device=a.device)
    v = v / v.norm()
    along = torch.cos(omega * t)[:, None]
    across = torch.sin(omega * t)[:, None]
    path = ua * along + v * across  # len(t) x nz, unit vectors
    norms = na + (nb - na) * t
    return path * norms[:, None]

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
    legs = []
    for k0, k1 in zip(keys, keys[1:]):
        leg = [slerp(a, b, t) for a, b in zip(k0, k1)]  # 16 paths of per_key steps
        legs.append(torch.stack(leg, 1))
    return torch.cat(legs)[:frames]  # frames x 16 x nz

# ----------------------------------------------------------------------------- one training step
@dataclass
class Run:
    """A training run: the networks, their optimisers, the data on the device and the counters."""
    args: argparse.Namespace  # the user's flags (the checkpoint's on --resume); never written to
    G: nn.Module  # the generator, as saved
    D: nn.Module  # the discriminator, as saved
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer
    call: "Forward"  # how the step calls G and D on this machine (see Forward, below the method)
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
    share = len(images) // world  # with several ranks: each rank's share
    if share < args.batch_size:
        fail(f"only {share} training images, fewer than one batch of --batch-size "
             f"{args.batch_size}; lower --batch-size or add images")
    if args.conditional and labels is None:
        fail("--conditional needs class labels; this dataset has none")
    ncls = len(classes) if args.conditional else 0
    G, D = build_nets(args, images.shape[1], ncls, images.shape[-1])
    G = G.to(device)
    D = D.to(device)
    if rank == 0:
        report_ratio(G, D)
    if labels is not None:
        labels = labels.to(device)
    call = forward_calls(G, D, args, device, world)
    opt_G = make_optimizer(G, args)
    opt_D = make_optimizer(D, args)
    hist = torch.zeros(2, 20, device=device)
    return Run(args, G, D, opt_G, opt_D, call,
               images=images.to(device),
               labels=labels,
               classes=classes,
               ncls=ncls,
               rank=rank,
               world=world,
               hist=hist)

def train_step(run, real, y, swap_frac=0.0, d_only=False):
    """One round of the game (Alg. 1, k = 1): a D step on reals and detached fakes, then a G step against
    the new D. real: float B x C x H x W in [-1, 1] on the device; y: its int64 labels or None; swap_frac:
    reals swapped for fakes; d_only: D steps alone. Returns tensors: no host sync unless a rule acts."""
    args = run.args
    B = real.shape[0]
    z = torch.randn(B, args.nz, device=real.device)
    y_fake = None
    if run.ncls:  # Mirza & Osindero: each fake drawn for a class of its own, uniform over the classes
        y_fake = torch.randint(run.ncls, (B,), device=real.device)
    fake = run.call.G(z, y_fake)  # B x C x H x W
    x_real, y_real = swap_real(real, y, fake, y_fake, swap_frac)
    logit_real = run.call.D(x_real, y_real)  # B logits
    logit_fake = run.call.D(fake.detach(), y_fake)  # under the classes G drew for; detached: D's step only
    err_real, err_fake = d_loss(logit_real, logit_fake)
    if args.arch == "upsample":  # the faces code's warm-up and decay
        set_lr(run, faces_lr(args.lr, run.step, run.epoch + 1))
    update_d, update_g = balance(run, err_real, err_fake)
    if update_d:
        d_step(run, err_real, err_fake)
    err_g = g_loss(run.call.D_fixed(fake, y_fake))  # the new D, held fixed while G steps
    if update_g and not d_only:
        g_step(run, err_g)
    if args.balance == "l2":
        err_g_now = run.call.floats(err_g)[0]
        run.l2 = l2_rule(run.l2, err_g_now)
    p_real = torch.sigmoid(logit_real.detach())  # D(x), one per image
    p_fake = torch.sigmoid(logit_fake.detach())  # D(G(z))
    return {"err_d": err_real + err_fake, "err_g": err_g, "err_d_real": err_real, "err_d_fake": err_fake,
            "d_x": p_real, "d_gz": p_fake, "upd_d": float(update_d), "upd_g": float(update_g)}

def balance(run, err_real, err_fake):  # -> (update_d, update_g)
    """The margin rule decides who steps (every rank the same, from errors averaged over ranks)."""
    if run.args.balance != "margin":
        return True, True
    e_real, e_fake = run.call.floats(err_real, err_fake)
    return margin_rule(e_real, e_fake, run.args.margin)

def d_step(run, err_real, err_fake):
    """D descends its loss, plus the L2 rule's coef/2 |theta_D|^2 on D's weights."""
    # the L2 rule's steps are tuned to the faces code's BCE over a mixed half-real batch: half our sum
    half = 0.5 if run.args.balance == "l2" else 1.0
    loss = half * (err_real + err_fake) + l2_penalty(run.D, run.l2)
    run.opt_D.zero_grad(set_to_none=True)
    loss.backward()
    run.opt_D.step()

def g_step(run, err_g):
    """G descends -log D(G(z)); D's weights are not G's to change, so only G's gradients are formed."""
    run.opt_G.zero_grad(set_to_none=True)
    err_g.backward(inputs=list(run.G.parameters()))
    run.opt_G.step()

def set_lr(run, lr):
    for opt in (run.opt_G, run.opt_D):
        for group in opt.param_groups:
            group["lr"] = lr

# ----------------------------------------------------------------------------- training and sampling
def train(run):
    """Train for --epochs from where the run stands (a fresh run, or a checkpoint's); rank 0 writes files."""
    if run.step == 0:  # once per run, before the game
        pretrain_d(run)
    log = Log(run)
    for epoch in range(run.epoch + 1, run.args.epochs + 1):
        swap = swap_fraction(run.args, epoch)
        idx = batches(run, epoch)
        for i, b in enumerate(idx):
            real, y = get_batch(run, b)
            out = train_step(run, real, y, swap)
            run.step += 1
            log.add(out, epoch, i, len(idx))
        end_epoch(run, epoch)
    return run.G, run.D

def pretrain_d(run):
    """Faces post: D alone first (--d-pretrain steps, within one pass), so G then meets a D with a signal.
    These steps are not counted in run.step."""
    for b in batches(run, 0)[:run.args.d_pretrain]:
        real, y = get_batch(run, b)
        train_step(run, real, y, d_only=True)

@dataclass
class Sampler:
    """A trained G and what sampling draws for it: latents from the prior, classes when conditional."""
    G: nn.Module  # in eval mode, on the device
    nz: int  # latent size
    ncls: int  # classes; 0 for an unconditional model
    label: int  # the class asked for with --label; None: classes drawn uniformly
    device: torch.device

    def z(self, n):  # n latents from the prior N(0, I)
        return torch.randn(n, self.nz, device=self.device)

    def y(self, n, repeat=1):  # the asked class, or uniform classes; each repeated for a row of images
        if not self.ncls:
            return None
        if self.label is None:
            y = torch.randint(self.ncls, (n,))
        else:
            y = torch.full((n,), self.label)
        return y.to(self.device).repeat_interleave(repeat)

def sample(args):
    """--sample: a grid (and --npz) from a checkpoint, plus the latent pictures and analyses asked for."""
    s, targs, stem = load_sampler(args)
    torch.manual_seed(args.seed)
    images, labels = draw(s, args.n)
    save_grid(images, stem + ".png")
    if args.npz:
        save_npz(args.npz, images, labels)
    latent_pictures(s, args, stem)
    if args.nn or args.eval:
        compare_with_data(s, args, targs, stem)
    also = f" and {args.npz}" if args.npz else ""
    print(f"wrote {stem}*.png{also}")

def draw(s, n, chunk=500):
    """n samples as uint8 N x H x W x C, with their classes: drawn in chunks, so no N-sized float exists."""
    images, labels = [], []
    for start in range(0, n, chunk):
        k = min(chunk, n - start)
        y = s.y(k)
        images.append(to_uint8(generate(s.G, s.z(k), y)))
        labels.append(y)
    if not s.ncls:
        return np.concatenate(images), None
    return np.concatenate(images), torch.cat(labels).cpu().numpy()

def latent_pictures(s, args, stem):
    """What directions in z do: --interp (White 2016), --sweep-dim, --walk (DCGAN Sec. 6.1), --class-grid"""
    k = args.steps
    if args.interp:
        path = slerp if args.interp == "slerp" else lerp
        t = torch.linspace(0, 1, k, device=s.device)
        pairs = s.z(16).view(8, 2, -1)  # 8 pairs -> 8 rows of k steps
        zs = torch.cat([path(a, b, t) for a, b in pairs])
        images = generate(s.G, zs, s.y(8, k))
        save_grid(images, f"{stem}_{args.interp}.png", k)
    if args.sweep_dim is not None:
        zs = sweep(s.z(8), args.sweep_dim, args.range, k)
        images = generate(s.G, zs, s.y(8, k))
        save_grid(images, stem + "_sweep.png", k)
    if args.walk:
        n_keys = args.walk // 16 + 2  # enough key points for the frames, 16 between each two
        keys = s.z(16 * n_keys).view(-1, 16, s.nz)
        grids = [generate(s.G, f, s.y(16)) for f in walk(keys, args.walk)]  # 16 latents in each frame
        frames = [grid_image(g, 4) for g in grids]
        more = {"save_all": True, "append_images": frames[1:], "duration": 80, "loop": 0}  # an endless GIF
        save_image(frames[0], stem + "_walk.gif", **more)
    if args.class_grid and s.ncls:
        y = torch.arange(s.ncls, device=s.device).repeat_interleave(10)
        save_grid(generate(s.G, s.z(len(y)), y), stem + "_classes.png", 10)

def compare_with_data(s, args, targs, stem):
    """--nn: samples beside their nearest training images; --eval: the Parzen estimate of Sec. 5."""
    n = args.eval_samples if args.eval else 32
    fake = generate(s.G, s.z(n), s.y(n)).cpu()
    if args.nn:
        train_x = load_dataset(targs, "train")[0]
        first = fake[:32]
        near = train_x[nearest_neighbours((first + 1) * 127.5, train_x)]
        near = near.permute(0, 2, 3, 1).numpy()  # N x H x W x C, as to_uint8 gives
        pairs = np.stack([to_uint8(first), near], 1)  # each sample, then its nearest image
        save_grid(pairs.reshape(-1, *near.shape[1:]), stem + "_nn.png", 8)
    if args.eval:  # sigma is chosen on 1,000 held-out images the evaluation does not use
        test = load_dataset(targs, "test")[0].flatten(1).double() / 255
        k = min(1000, len(test) // 2)
        pixels = (fake.flatten(1).double() + 1) / 2  # in [0, 1], as the test images
        sigma, mean, se = parzen_eval(pixels, test[:k], test[k:k + 1000])
        print(f"Parzen log-likelihood: {mean:.1f} +- {se:.1f} nats", end=" ")
        print(f"(sigma {sigma:.3f}, {n} samples)")

# ------------------------------------------------------------------------ Appendix: plumbing, not the paper
# Data: a split is one uint8 tensor N x C x H x W on the device, batches gathered by index (no loader).
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",  # the official files' checksums
    "test_batch": "40351d587109b95175f43aff81a1287e", "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec", "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a", "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb"}
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
DECODER = 2  # decode_image's version, in the folder cache's key: a cache an older one wrote is not reused
SHAPES_MAX = 128  # --image-size for shapes: 10,000 images are drawn in float64 chunks of 1,000

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
    prepare_output(dirs[0])
    write_atomic(os.path.join(dirs[0], names[0]), lambda f: f.write(data))
    return os.path.join(dirs[0], names[0])

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
    return check_split(torch.from_numpy(x), torch.from_numpy(y).long(), classes, src)

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
    paths = [find_or_download([IDX_FILES[i], IDX_FILES[i][:-3]], dirs, IDX_URLS[name] + IDX_FILES[i],
                              IDX_MD5[name][i]) for i in ([0, 1] if split == "train" else [2, 3])]
    x, y = (torch.from_numpy(read_idx(p).copy()) for p in paths)
    return check_split(x[:, None], y.long(), CLASSES[name], " and ".join(paths))

def check_split(x, y, classes, path):
    """Every reader's output, checked once: uint8 N x C x H x W images and N labels in 0..len(classes)-1."""
    if x.dim() != 4 or y.dim() != 1:
        fail(f"{path} holds images of shape {tuple(x.shape)[1:]} and labels of shape {tuple(y.shape)}, "
             "not N x H x W images and N labels; replace the file")
    if len(x) != len(y):
        fail(f"{path} holds {len(x)} images but {len(y)} labels; replace the damaged file")
    if len(y) and not 0 <= int(y.min()) <= int(y.max()) < len(classes):
        fail(f"{path} holds labels {int(y.min())}..{int(y.max())}, outside the {len(classes)} classes "
             f"0..{len(classes) - 1}; replace the damaged file")
    return x, y, classes

# Every Pillow mode to 8 bits: greys to L, colour to RGB, transparency over black; I;16*, I and F scaled
TO_8BIT = {"1": "L", "L": "L", "LA": "L", "La": "L", "P": "RGB", "PA": "RGB", "RGB": "RGB",
           "RGBA": "RGB", "RGBa": "RGB", "RGBX": "RGB", "CMYK": "RGB", "YCbCr": "RGB", "HSV": "RGB"}

def decode_image(path, size, mode):
    """EXIF orientation applied, 8 bits, the shorter side resized to `size`, then a centre crop (DCGAN)."""
    try:
        im = ImageOps.exif_transpose(Image.open(path))
        if im.mode.startswith("I") or im.mode == "F":
            v = np.nan_to_num(np.asarray(im, np.float64))
            top = 1.0 if im.mode == "F" else 65535.0  # from 0..top when they lie in it, else their min..max
            lo, hi = (0.0, top) if 0 <= v.min() and v.max() <= top else (v.min(), v.max())
            im = Image.fromarray(np.round((v - lo) * (255 / (hi - lo or 1))).astype(np.uint8))
        if im.mode not in TO_8BIT:
            fail(f"{path} has the Pillow mode {im.mode}, which is not read; save it as 8-bit RGB or grey")
        im = over_black(im).convert(mode or TO_8BIT[im.mode])
    except Exception as e:
        fail(f"cannot read image {path} ({type(e).__name__}); remove or replace the file")
    scale = size / min(im.size)
    im = im.resize([max(size, round(side * scale)) for side in im.size], Image.BICUBIC)
    left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))

def over_black(im):
    """Transparency drawn over black: dropping alpha would keep whatever colour a transparent pixel stores."""
    if im.mode not in ("LA", "La", "PA", "RGBA", "RGBa") and "transparency" not in im.info:
        return im
    black = Image.new("RGBA", im.size, (0, 0, 0, 255))
    return Image.alpha_composite(black, im.convert("RGBA"))

def list_images(root, outf):
    """Image files under root: hidden entries, symlinked folders, dangling links and --outf skipped."""
    files, own = [], os.path.realpath(outf or os.devnull)
    for d, dirs, names in os.walk(root, onerror=lambda e: fail(f"cannot read {e.filename} ({e.strerror}); "
                                  "fix its permissions or move it out of --dataroot")):
        skip = [s for s in dirs if os.path.islink(os.path.join(d, s)) or os.path.realpath(os.path.join(d, s))
                == own]  # a symlinked folder may loop; the run's own pictures are no data
        for s in skip:
            print(f"note: skipping {os.path.join(d, s)} (a symlinked folder, or --outf)")
        dirs[:] = sorted(s for s in dirs if s not in skip and not s.startswith("."))
        for f in sorted(n for n in names if n.lower().endswith(IMAGE_EXT) and not n.startswith(".")):
            if not os.path.exists(os.path.join(d, f)):
                print(f"note: skipping {os.path.join(d, f)} (a link to nothing)")
            else:
                files.append(os.path.join(d, f))
    return files

def load_folder(root, size, channels, workers, outf=None):
    """A folder of images, classes from its top-level sub-folders; decoded once and cached beside the data."""
    if not os.path.isdir(root):
        fail(f"--dataroot {root} is not a folder; point it at a folder of images")
    files = list_images(root, outf)
    if not files:
        fail(f"no images ({', '.join(IMAGE_EXT)}) found under {root}")
    tops = [os.path.relpath(os.path.dirname(f), root).split(os.sep)[0] for f in files]  # a top-level class
    classes = sorted(set(tops))
    print(f"{len(files)} images in {root}; classes (its top-level folders): {', '.join(classes)}")
    seen = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    stamp = md5_of(repr([DECODER, seen]).encode())[:12]
    cache = os.path.join(root, f".cache-{size}px-{channels or 'auto'}ch-{stamp}.npz")
    with contextlib.suppress(Exception), np.load(cache) as z:  # absent, or cut short by a crash or full disk
        return torch.from_numpy(z["x"]), torch.from_numpy(z["y"]), classes
    mode = {1: "L", 3: "RGB"}.get(channels)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        ims = list(pool.map(lambda f: decode_image(f, size, mode), files))
    if mode is None and any(im.ndim == 3 for im in ims):  # colour kept as found; greys join as RGB
        ims = [np.repeat(im[..., None], 3, 2) if im.ndim == 2 else im for im in ims]
    x = np.stack([im if im.ndim == 3 else im[..., None] for im in ims]).transpose(0, 3, 1, 2).copy()
    y = np.array([classes.index(t) for t in tops], np.int64)
    if os.access(root, os.W_OK):  # a read-only dataset still works, it is just decoded again next time
        write_atomic(cache, lambda f: np.savez(f, x=x, y=y))
    return check_split(torch.from_numpy(x), torch.from_numpy(y), classes, root)

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
        size = args.image_size or 64
        x, y, classes = load_folder(args.dataroot, size, args.channels, args.workers, args.outf)
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
TRAINING_KEYS = ["D", "optG", "optD", "epoch", "step", "balance", "dhist", "rng"]  # besides args, G, classes

def start_run(args, device, rank, world):
    """The Run that `train` continues: a fresh one, or OUTF/ckpt.pt's with --resume."""
    path = os.path.join(args.outf, "ckpt.pt")
    if args.resume and not os.path.exists(path):
        fail(f"nothing to resume: {args.outf} holds no checkpoint (ckpt.pt); run without --resume to start")
    if not args.resume and os.path.exists(path):
        fail(f"{args.outf} already holds a run; add --resume to continue it, or choose another --outf")
    log = os.path.join(args.outf, "log.csv")
    if not args.resume and os.path.exists(log):  # a run that stopped before its first checkpoint
        fail(f"{args.outf} already holds a run's log.csv but no checkpoint to resume; delete {log} to start "
             "there again, or choose another --outf")
    ckpt = load_checkpoint(path, training=True) if args.resume else None
    args = resume_args(args, ckpt) if args.resume else args
    run = setup_run(args, device, load_dataset(args, "train"), rank, world)
    if args.resume:
        restore(run, ckpt)
    return run

def checkpoint(run):
    return {"script": SCRIPT, "args": vars(run.args), "shape": [run.images.shape[1], run.images.shape[-1]],
            "classes": run.classes, "G": run.G.state_dict(), "D": run.D.state_dict(),
            "optG": run.opt_G.state_dict(), "optD": run.opt_D.state_dict(), "epoch": run.epoch,
            "step": run.step, "balance": {"l2": run.l2}, "dhist": torch.stack(run.dhist), "world": run.world,
            "rng": {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all()}}

def restore(run, ckpt):
    run.G.load_state_dict(ckpt["G"]), run.D.load_state_dict(ckpt["D"])
    run.opt_G.load_state_dict(ckpt["optG"]), run.opt_D.load_state_dict(ckpt["optD"])
    run.epoch, run.step, run.l2 = ckpt["epoch"], ckpt["step"], ckpt["balance"]["l2"]
    run.dhist = list(ckpt["dhist"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if ckpt["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    if ckpt.get("world", 1) != run.world and run.rank == 0:
        print(f"note: trained on {ckpt.get('world', 1)} processes, resumed on {run.world}: each one's share "
              "of the data changes, so the run does not continue bit for bit")
    if run.rank:  # the checkpoint holds rank 0's RNG; the other ranks need noise of their own
        torch.manual_seed(run.args.seed + run.rank + 7919 * ckpt["epoch"])
    elif os.path.exists(log := os.path.join(run.args.outf, "log.csv")):  # rows past the checkpoint go
        with open(log, newline="") as f:
            lines = f.readlines()
        done = [r for r in lines[1:] if r.endswith("\n") and r.split(",")[0].isdigit()]  # not a torn last row
        keep = lines[:1] + [r for r in done if int(r.split(",")[0]) <= ckpt["step"]]
        write_atomic(log, lambda f: f.write("".join(keep).encode()))
    print(f"resumed from epoch {ckpt['epoch']}, step {ckpt['step']}")

def resume_args(args, ckpt):
    """The checkpoint's flags, but --dataroot and --epochs where typed and this machine's flags as given."""
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

def load_checkpoint(path, training=False):
    """A gan.py checkpoint (a training one, with optimisers, for --resume); older ones get today's flags."""
    if not os.path.isfile(path):
        fail(f"no checkpoint at {path}; train first or point --ckpt/--outf at a run folder")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{path} is not a readable checkpoint ({type(e).__name__})")
    if not isinstance(ckpt, dict) or ckpt.get("script") != SCRIPT:
        other = ckpt.get("script") if isinstance(ckpt, dict) else None
        fail(f"{path} was written by {other or 'another program'}.py, not {SCRIPT}.py; use that script")
    missing = [k for k in ["args", "G", "classes"] + TRAINING_KEYS * training if k not in ckpt]
    if missing:
        fail(f"{path} is not a {SCRIPT}.py training checkpoint (it lacks {', '.join(missing)}); use "
             "DIR/ckpt.pt of a run folder")
    ckpt["args"] = {**vars(make_parser().parse_args([])), **ckpt["args"]}  # flags added since it was saved
    if "shape" not in ckpt:  # older ones kept C and the size in args
        ckpt["shape"] = [ckpt["args"]["nc"], ckpt["args"]["image_size"]]
    return ckpt

# Files: each one written whole or not at all, into a folder proven writable, by one run at a time
def write_atomic(path, write):
    """write(f) into PATH.tmp, fsync, rename; on any exception the .tmp goes, a disk error as one line."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save on a full disk: RuntimeError("... unexpected pos ...")
        free = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free  # before the .tmp goes
        if getattr(e, "errno", None) == errno.ENOSPC or free < 1 << 16:
            fail(f"no space left on device writing {path}; the previous file is kept: free some space")
        fail(f"could not write {path} ({getattr(e, 'strerror', None) or e}); the previous file is kept")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)

def prepare_output(folder):
    """Create `folder` and prove it writable with a probe file, or fail with one line saying why not."""
    probe = os.path.join(folder, f".probe-{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        os.close(os.open(probe, os.O_CREAT | os.O_WRONLY))
        os.remove(probe)
    except OSError as e:
        why = {errno.EEXIST: "it is a file", errno.ENOTDIR: "a folder on its path is a file"}
        fail(f"cannot write into {folder} ({why.get(e.errno) or e.strerror}); give another folder")

def lock_run(outf):
    """OUTF/.lock holds this process's id for the run's life: a second run into OUTF is refused."""
    path = os.path.join(outf, ".lock")
    while True:
        with contextlib.suppress(FileExistsError), open(path, "x") as f:  # O_CREAT | O_EXCL: one process wins
            f.write(str(os.getpid()))
            return path
        text = lock_holder(path)
        if text is None:  # the lock went between the two calls: try again
            continue
        if not text.isdigit() or pid_alive(int(text)):  # no id yet: its run has just taken it
            fail(f"{outf} is in use by another run (process {text or 'starting'}); wait for it to end, "
                 "or choose another --outf")
        os.remove(path)  # its process is gone: a stale lock

def lock_holder(path, tries=20):
    """The process id written in a lock, given a second to appear in one just taken; None when the lock has
    gone since (its run ended) or points nowhere (a dangling link, removed here)."""
    for _ in range(tries):
        try:
            text = open(path).read().strip()
        except FileNotFoundError:
            if os.path.islink(path):
                os.remove(path)
            return None
        if text:
            break
        time.sleep(0.05)  # created, its id not yet written
    return text

def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except OverflowError:  # no process has so large an id
        return False
    except OSError as e:  # PermissionError: alive, another user's
        return not isinstance(e, ProcessLookupError)
    return True

def append_log(path, row):
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if f.tell() == 0:  # a new file
            w.writeheader()
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

def save_image(img, path, **kw):
    fmt = Image.registered_extensions()[os.path.splitext(path)[1].lower()]
    write_atomic(path, lambda f: img.save(f, fmt, **kw))

def save_npz(path, images, labels):
    extra = {} if labels is None else {"labels": labels}
    write_atomic(path, lambda f: np.savez(f, images=images, **extra))

# Logs and pictures
class Log:
    """log.csv rows and progress lines of step outputs summed over --log-every steps; a NaN stops training."""
    def __init__(self, run):
        self.run, self.sums, self.count, self.t0, self.step0 = run, {}, 0, time.time(), run.step

    def add(self, out, epoch, i, n):  # after step i of n in this epoch
        run, args = self.run, self.run.args
        run.hist += torch.stack([torch.histc(out["d_x"], 20, 0, 1), torch.histc(out["d_gz"], 20, 0, 1)])
        for k, v in out.items():
            self.sums[k] = self.sums.get(k, 0) + (v.detach().mean() if torch.is_tensor(v) else v)
        self.count += 1
        if run.step % args.log_every and i < n - 1:
            return
        row = {"step": run.step, "epoch": epoch, **{k: float(v) / self.count for k, v in self.sums.items()}}
        row["l2"], self.sums, self.count = run.l2, {}, 0
        if not all(math.isfinite(v) for v in row.values()):
            diverged(run, f"the losses became NaN/inf at step {run.step}")
        if run.rank == 0:
            append_log(os.path.join(args.outf, "log.csv"), row)
            rate = (run.step - self.step0) * args.batch_size * run.world / (time.time() - self.t0)
            left = ((args.epochs - epoch) * n + n - i - 1) * args.batch_size * run.world / rate
            eta = f"{left / 60:.0f}m" if left >= 60 else f"{left:.0f}s"
            print(f"[e {epoch}/{args.epochs} it {i + 1}/{n}] D {row['err_d']:.2f} G {row['err_g']:.2f} "
                  f"D(x) {row['d_x']:.2f} D(G(z)) {row['d_gz']:.2f} | {rate:.0f} img/s | ETA {eta}")

def diverged(run, what):
    """A NaN stops training: the last good checkpoint is kept; with none yet, the run's files go."""
    path = os.path.join(run.args.outf, "ckpt.pt")
    kept = f"the last good checkpoint {path} is kept"
    if not os.path.exists(path):
        forget_log(run)
        kept = "no checkpoint was written yet; start again"
    fail(f"{what}; training stopped: {kept} (try a lower --lr or a --balance rule)")

def forget_log(run):
    """A run with no checkpoint yet leaves no log.csv: nothing to resume, and it would refuse a restart."""
    log = os.path.join(run.args.outf, "log.csv")
    if run.rank == 0 and os.path.exists(log):
        os.remove(log)

def end_epoch(run, epoch):
    """After each epoch every rank takes rank 0's BN statistics; rank 0 writes samples, checkpoint, curves."""
    run.epoch, run.dhist = epoch, run.dhist + [run.hist.cpu().clone()]
    run.hist.zero_()
    if run.world > 1:  # BN running statistics are per rank
        for b in list(run.G.buffers()) + list(run.D.buffers()):
            dist.broadcast(b, 0)
    if run.rank:
        return
    outf, dev = run.args.outf, run.images.device
    n = 100 if run.ncls else 64  # conditional: a class a column
    if not all(torch.isfinite(p).all() for p in run.G.parameters()):
        diverged(run, f"G's weights became NaN/inf in epoch {epoch}")
    z = torch.randn(n, run.args.nz, generator=torch.Generator().manual_seed(run.args.seed)).to(dev)
    grid = generate(run.G.eval(), z, torch.arange(n, device=dev) % run.ncls if run.ncls else None)
    save_grid(grid, os.path.join(outf, f"samples_e{epoch:03d}.png"), 10 if run.ncls else 8), run.G.train()
    write_atomic(os.path.join(outf, "ckpt.pt"), lambda f: torch.save(checkpoint(run), f))
    plot_curves(os.path.join(outf, "log.csv"), os.path.join(outf, "curves.png"))
    draw_dhist(torch.stack(run.dhist), os.path.join(outf, "dhist.png"))

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
    save_image(img, png_path)

def draw_dhist(hist, path, cell=12):
    """dhist.png: per epoch (rows) the histograms of D's outputs (0 to 1) on real (left) and fake images"""
    frac = hist / hist.sum(-1, keepdim=True).clamp(min=1)
    shade = 255 - (frac / frac.amax().clamp(min=1e-8) * 255).byte()  # E x 2 x 20, dark = many outputs
    rows = torch.cat([shade[:, 0], torch.full((len(shade), 1), 255, dtype=torch.uint8), shade[:, 1]], 1)
    cells = Image.fromarray(rows.numpy()).resize((rows.shape[1] * cell, len(rows) * cell), Image.NEAREST)
    img = ImageOps.expand(cells, (0, 14, 0, 0), 255)  # a 14-pixel strip on top for the titles
    ImageDraw.Draw(img).text((2, 1), "D(x) on real: 0 .. 1", fill=0)
    ImageDraw.Draw(img).text((21 * cell + 2, 1), "D(G(z)) on generated: 0 .. 1", fill=0)
    save_image(img, path)

def generate(G, z, y=None, batch=500):
    """G's images for latents z (and labels y) in batches, as floats in [-1, 1]."""
    with torch.no_grad():
        parts = [G(z[i:i + batch], None if y is None else y[i:i + batch]) for i in range(0, len(z), batch)]
    return torch.cat(parts).float().clamp(-1, 1)

def to_uint8(x):  # [-1, 1] float N x C x H x W -> uint8 N x H x W x C
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()

def save_grid(images, path, nrow=8):
    save_image(grid_image(images, nrow), path)

def grid_image(images, nrow=8, pad=2):
    x = to_uint8(images) if torch.is_tensor(images) else images
    n, h, w, c = x.shape
    grid = np.full((-(-n // nrow) * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        top, left = pad + i // nrow * (h + pad), pad + i % nrow * (w + pad)
        grid[top:top + h, left:left + w] = x[i]
    return Image.fromarray(grid.squeeze(-1) if c == 1 else grid)

def load_sampler(args):
    """--sample's G from --ckpt, checked, and room for its output: -> (Sampler, training flags, file stem)"""
    ckpt = load_checkpoint(args.ckpt)
    targs, device = argparse.Namespace(**ckpt["args"]), pick_device(args)
    ncls = len(ckpt["classes"]) if targs.conditional else 0
    if args.label is not None and not ncls:
        fail(f"{args.ckpt} was trained without --conditional; drop --label")
    if args.label is not None and args.label >= ncls:
        fail(f"--label {args.label} is out of range; this model has classes 0..{ncls - 1}")
    stem = os.path.splitext(args.out or os.path.join(os.path.dirname(args.ckpt), "samples.png"))[0]
    nc, size = ckpt["shape"]
    need = args.n * (nc * size * size + 8 * (ncls > 0))  # bytes of the images (and labels) asked for
    for folder in [os.path.dirname(os.path.abspath(p)) for p in (stem, args.npz or stem)]:  # grid's, npz's
        prepare_output(folder)
        if shutil.disk_usage(folder).free < need:
            fail(f"--n {args.n} needs about {need / 1e9:.2f} GB on {folder}, more than is free; lower --n")
    if hasattr(os, "sysconf") and 3 * need > os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"):
        fail(f"--n {args.n} needs about {3 * need / 1e9:.2f} GB of memory, more than is free; lower --n")
    G = build_nets(targs, nc, ncls, size)[0].to(device).eval()
    G.load_state_dict(ckpt["G"])
    return Sampler(G, targs.nz, ncls, args.label, device), targs, stem

# Device and data-parallel helpers
@dataclass
class Forward:
    """How the training step calls G and D on this machine, prepared in one place by `forward_calls`."""
    G: object  # (z, y) -> float32 images, through DDP / torch.compile / bf16 autocast when asked
    D: object  # (x, y) -> float32 logits for D's step: wrapped the same, so D's gradients average over ranks
    D_fixed: object  # D for G's step: never DDP, since G's step wants G's gradients only (no D all-reduce)
    floats: object  # (*scalar tensors) -> floats, averaged over ranks so each rank's rule takes one branch

def forward_calls(G, D, args, device, world):
    ids = [device.index] if device.type == "cuda" else None
    nets = [nn.parallel.DistributedDataParallel(m, device_ids=ids) if world > 1 else m for m in (G, D)] + [D]
    nets = [torch.compile(m, dynamic=False) for m in nets] if args.compile else nets
    amp = args.amp and device.type == "cuda"
    return Forward(*[partial(in_precision, m, device.type, amp) for m in nets], floats=mean_over_ranks)

def in_precision(net, kind, amp, *inputs):  # float32 out, whatever precision the net ran in
    with torch.autocast(kind, torch.bfloat16, enabled=amp):
        return net(*inputs).float()

def mean_over_ranks(*values):
    t = torch.stack([v.detach().float() for v in values])
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()

def pick_device(args, local_rank=0):
    if args.cuda and not torch.cuda.is_available():
        fail("--cuda was given but PyTorch sees no CUDA GPU; drop --cuda to run on the CPU")
    if args.amp and not args.cuda:
        print("note: --amp (bf16 autocast) applies on CUDA only; the CPU trains in fp32")
    torch.backends.cudnn.benchmark = args.cuda  # fixed shapes: let cuDNN pick the fastest kernels
    return torch.device("cuda", local_rank) if args.cuda else torch.device("cpu")

def fail(msg):
    raise SystemExit(f"error: {msg}")

# Command line. Every numeric flag: type, default, valid interval ("[" closed, "(" open, inf: none), help;
# get_args checks them all in one loop before anything is allocated (NaN and inf fail too).
NUMBERS = {"image_size": (int, None, "[1, 1024]", "images resized to this; native unless given, folder 64"),
           "limit": (int, None, "[1, inf)", "use only the first N training images"),
           "nz": (int, None, "[1, 4096]", "latent size; dcgan 100, upsample 512"),
           "ngf": (int, 64, "[1, 1024]", "G's width"),
           "ndf": (int, 64, "[2, 1024]", "D's width"),
           "epochs": (int, 25, "[1, 100000]", "passes over the training images"),
           "batch_size": (int, 64, "[2, 65536]", "images per step"),
           "lr": (float, None, "(0, 10]", "learning rate; dcgan 2e-4, upsample 1e-3"),
           "beta1": (float, 0.5, "[0, 1)", "Adam's beta1"),
           "margin": (float, 0.3, "[0, 1]", "the margin rule's margin"),
           "d_pretrain": (int, 0, "[0, inf)", "D-only steps before the game"),
           "swap_real": (float, 0.0, "[0, 1]", "fraction of each real batch replaced by fakes labelled real"),
           "swap_epochs": (int, 0, "[0, inf)", "the first epochs in which --swap-real applies"),
           "dropout_d": (float, None, "[0, 1)", "dropout after D's activations; upsample 0.2"),
           "dropout_g": (float, 0.0, "[0, 1)", "upsample: dropout after G's block ReLUs"),
           "seed": (int, 1, "[0, 4294967295]", "seeds everything"),
           "log_every": (int, 100, "[1, inf)", "steps per progress line and log.csv row"),
           "workers": (int, 4, "[0, 256]", "threads decoding a folder of images"),
           "n": (int, 64, "[1, inf)", "how many samples"),
           "label": (int, None, "[0, inf)", "the class to sample (conditional models)"),
           "steps": (int, 10, "[1, 1000]", "images per row of --interp and --sweep-dim"),
           "sweep_dim": (int, None, "[0, inf)", "the latent dimension to sweep from -R to R"),
           "range": (float, 3.0, "(0, inf)", "R of --sweep-dim"),
           "walk": (int, 0, "[0, 100000]", "frames of a GIF walking the latent space"),
           "eval_samples": (int, 10000, "[1, inf)", "samples for --eval's Parzen window")}

def make_parser():
    p = argparse.ArgumentParser(description="GAN / DCGAN with balancing heuristics; see the module docstring")
    a = p.add_argument
    a("--dataset", choices=["cifar10", "mnist", "fashion-mnist", "folder", "shapes"])
    a("--dataroot", default="./data", help="where the data lives or is downloaded to")
    a("--channels", type=int, choices=[1, 3], help="force greyscale or RGB")
    a("--arch", choices=["dcgan", "upsample"], default="dcgan")
    a("--optimizer", choices=["adam", "rmsprop"], help="dcgan adam, upsample rmsprop")
    a("--balance", choices=["none", "margin", "l2"], help="dcgan none, upsample margin")
    a("--interp", choices=["lerp", "slerp"])
    for name in ("outf", "ckpt", "npz", "out"):
        a("--" + name)
    for name in "conditional bn-d resume cuda amp compile sample class-grid nn eval".split():
        a("--" + name, action="store_true")
    for name, (kind, default, _, text) in NUMBERS.items():
        a("--" + name.replace("_", "-"), type=kind, default=default, help=text)
    return p

def get_args(argv=None):
    p = make_parser()
    args = p.parse_args(argv)
    for action in p._actions:  # parse again with no defaults: what is left is what the user typed
        action.default = argparse.SUPPRESS
    args.typed = list(vars(p.parse_args(argv)))  # in the order typed, for --resume's check
    for name, (_, _, interval, _) in NUMBERS.items():
        v, (lo, hi) = getattr(args, name), (float(s) for s in interval[1:-1].split(","))
        if v is None:  # optional, not given
            continue
        inside = lo < v < hi or (v == lo and interval[0] == "[") or (v == hi and interval[-1] == "]")
        if not (math.isfinite(v) and inside):  # NaN compares false with everything, so fails here too
            fail(f"--{name.replace('_', '-')} {v} is out of range; it must lie in {interval}")
    if args.dataset == "shapes" and (args.image_size or 32) > SHAPES_MAX:
        fail(f"--image-size {args.image_size} is too large for shapes; at most {SHAPES_MAX}")
    if not (args.sample and args.ckpt or args.dataset or args.resume and args.outf):
        fail("give --dataset NAME to train, --resume --outf DIR to continue, or --sample --ckpt FILE")
    if args.arch != "upsample" and (args.bn_d or args.dropout_g):
        fail("--bn-d and --dropout-g belong to --arch upsample; add --arch upsample or drop them")
    for k, v in ARCH_DEFAULTS[args.arch].items():  # the flags the user left out take the arch's defaults
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.outf = args.outf or os.path.join("out", f"{SCRIPT}-{args.dataset}")
    return args

def main(argv=None):
    """Train (data-parallel under torchrun) or sample. Ctrl-C ends in one line: what is kept, how to go on."""
    args, run, lock = get_args(argv), None, None
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    try:
        if args.sample:
            return sample(args)
        device = pick_device(args, int(os.environ.get("LOCAL_RANK", 0)))
        torch.manual_seed(args.seed + rank)
        if world > 1:  # launched by torchrun: one process per GPU (or CPU worker)
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if rank == 0:
            prepare_output(args.outf)
            lock = lock_run(args.outf)
        run = start_run(args, device, rank, world)
        nets = train(run)
        if world > 1:
            dist.barrier()  # no rank tears Gloo/NCCL down while another still talks to it
        return nets
    except KeyboardInterrupt:
        print(interrupted(args, run, argv), file=sys.stderr)
        raise SystemExit(130)
    finally:
        if lock:
            os.remove(lock)
        if dist.is_initialized():
            dist.destroy_process_group()

def interrupted(args, run, argv):
    """Ctrl-C's one line: where it stopped, which checkpoint is kept, the command that goes on."""
    again = shlex.join(["python3", "gan.py", *(sys.argv[1:] if argv is None else argv)])
    if args.sample:
        return f"interrupted; files already written are whole; to sample again: {again}"
    where = f"at step {run.step} in epoch {run.epoch + 1}" if run else "before training began"
    path = os.path.join(args.outf, "ckpt.pt")
    if not os.path.exists(path):
        if run:
            forget_log(run)
        return f"interrupted {where}; no checkpoint was written yet; to start again: {again}"
    epoch = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"]
    flags = ["python3", "gan.py", "--resume", "--outf", args.outf]  # and this machine's flags as typed
    for k in [k for k in ("cuda", "amp", "compile", "workers", "log_every") if k in args.typed]:
        v = getattr(args, k)
        flags += ["--" + k.replace("_", "-")] + ([] if isinstance(v, bool) else [str(v)])
    return f"interrupted {where}; {path} (epoch {epoch}) is kept; to continue: {shlex.join(flags)}"

if __name__ == "__main__":
    main()
