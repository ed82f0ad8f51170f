"""lapgan.py: a Laplacian pyramid of adversarial networks (LAPGAN), the Eyescream model.

Paper: Denton, Chintala, Szlam & Fergus 2015, "Deep Generative Image Models using a Laplacian Pyramid of
Adversarial Networks" (NIPS), read beside its Torch code (Eyescream: cifar/, lsun/, generate.lua).

Levels are numbered as in the paper (Sec. 2-3): I_0 is the full image and I_{k+1} = d(I_k), d(.) shrinking
and u(.) enlarging an image. The Laplacian pyramid L(I) = [h_0, ..., h_{K-1}, I_K] stores the small base
image I_K and one residual h_k = I_k - u(I_{k+1}) per finer level. LAPGAN learns one conditional GAN per
level: G_K draws the base I_K from noise z_K; G_k (k < K) draws the residual h_k from noise z_k and the
upsampled coarser image l_k = u(I_{k+1}); D_k tells real images I_k from l_k + G_k(z_k, l_k). Each level
trains alone, on real coarse images; sampling runs the chain from the base to the full image,
I_k = u(I_{k+1}) + G_k(z_k, u(I_{k+1})) for k = K-1, ..., 0 (Sec. 2.3, Fig. 1). In the code `sizes[k]`
is the size of I_k (finest first) and Gs[k] is G_k; `--levels` takes the sizes coarse to fine, as the
paper writes them (CIFAR-10: 8 -> 14 -> 28).

Paper to code:
    Sec. 2.2  d(.), u(.), the pyramid and its inverse       area_matrix, down, up, gaussian_pyramid,
                                                            laplacian_pyramid, reconstruct, condition
    Sec. 2.3  Fig. 1, the sampling chain; blog: --upscale   noise, generate, sample_level, sample_chain,
                                                            upscale_chain
    Sec. 2.3  one level's training step (Fig. 2)            Level, level_step, train_step
    Sec. 3    the networks (CIFAR-10, LSUN), conditioning   mlp_nets, conv_g, conv_d, large_nets, Conditioned
    Sec. 3    SGD schedule; lsun/train.lua's balance rule   sgd_schedule, set_sgd, balance_rule
    Sec. 4.1  Parzen log-likelihood; cifar/ model selection parzen_levels, parzen_ll, base_d2, residual_d2,
                                                            selection_score, select_models
    Sec. 4.2  samples drawn from one real coarse image      resample_sheet (--resample)
    additions for short runs (below)                        average_weights, conv_base_g, ToData,
                                                            Level.steps, sample_chain's truncate

Deviations: D outputs a logit and the loss is BCE-with-logits (= sigmoid + BCE); images are normalised per
channel with the training split's mean/std (the CIFAR code: per pixel), which commutes with d and u (--chain
maps one model's normalisation into another's); momentum is capped at 0.8 as in the paper (the code: 0.7); D_k
pads its convs where the code's unpadded ones would leave no pixels (below 14 px); the large model's L2
pooling adds 1e-6 under the root; each step's D and G updates share one G forward pass, D judges the real and
the drawn images in two passes (the code: one mixed batch; the same sums unless D has batch norm), and all
levels train on the same real images (the code: separate jobs); model selection uses the last --select test
images and --eval the first ones. --model large takes the LSUN code's lr 0.01 and momentum from 0 but not its
1.5x-scaled crops, horizontal flips or one model per class. --eval on a class-conditional model scores log
p(I|y): every level, the base included, conditioned on the test image's true label. `--optim adam` is an
addition for short runs; the defaults are the paper's SGD setting. `--lr-d` (D's own learning rate, the two
time-scale rule of Heusel et al. 2017), `--lr-g` (G's) and `--dropout-d` are additions too: at a CPU run's
widths D_k's rate is raised, or D_k stays at chance (README: quality), and the small base's G_K and D_K learn
faster than the finer levels. For short runs, also additions, all off by default: `--level-steps` (level k's
updates per step, as the code's separate jobs gave each level its own length), `--width-g`, `--width-d`,
`--dropout-d`, `--lr-g`, `--lr-d`, `--ema` and `--bn-d` (comma lists, level 0 first), `--ema` (samples and
selection from an average of G_k's weights, Yazici et al. 2019), `--base conv` (a DCGAN-like G_K and a conv
D_K in place of the MLPs), `--tanh-base` (G_K ends in tanh to the pixel range, as DCGAN's G), `--bn-g` (batch
norm in G_k, as the LSUN large model), `--bn-d 1` (batch norm in the conv D_k, as DCGAN's D; it broke training
in the Eyescream blog), `--proj-d` (a class projection term in D_k, Miyato & Koyama 2018), `--gen-coarse` (a
share of G_k's fakes grown from the coarser levels' samples, not real coarse images), `--truncate` (samples'
z_K from U[-t, t], Brock et al. 2019's truncation) and `--recipe cpu`, README's set-up flags by name.

    python lapgan.py --dataset cifar10 --cuda                          # 8 -> 14 -> 28, all levels at once
    python lapgan.py --dataset cifar10 --cuda --level 0 --outf out/l0  # one level alone (0: the finest)
    python lapgan.py --sample --ckpt out/lapgan-cifar10/ckpt.pt --resample 8 --upscale 3 --eval
"""
import argparse, copy, csv, errno, gzip, hashlib, io, math, os, pickle, shlex, shutil, sys, tarfile, time
import zlib
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps

SCRIPT = "lapgan"
# Sec. 3.1: CIFAR-10 8 -> 14 -> 28 on 28 x 28 crops; the others: the same ratios on their own sizes.
# Written coarse to fine, as the paper (and --levels) write them; pyramid_sizes turns them finest first.
LEVELS = {"cifar10": [8, 14, 28],
          "mnist": [7, 14, 28],
          "fashion-mnist": [7, 14, 28],
          "shapes": [8, 16, 32]}

# ------------------------------------------------------------------------ Sec. 2.2: the Laplacian pyramid
def area_matrix(n_in, n_out, device=None):
    """Torch's image.scale when shrinking: output pixel i averages [i r, (i+1) r), r = n_in / n_out, a cut
    pixel by the fraction covered. Average pooling fits whole ratios only; at CIFAR-10's 14 -> 8 (r = 1.75)
    pixels are cut between two outputs, and adaptive pooling would count them whole in both."""
    r = n_in / n_out  # source pixels per output pixel
    start = torch.arange(n_out, dtype=torch.float64)[:, None] * r  # output pixel i: [start, end)
    end = start + r
    j = torch.arange(n_in, dtype=torch.float64)  # source pixel j: [j, j + 1)
    covered = torch.minimum(end, j + 1) - torch.maximum(start, j)
    A = covered.clamp(min=0) / r
    return A.float().to(device)

def down(x, size):
    """d(.): area resampling of square N x C x n x n images, rows then columns (2:1 = 2x2 average pooling)."""
    if x.shape[-1] == size:
        return x
    A = area_matrix(x.shape[-1], size, x.device).to(x.dtype)  # size x n
    return A @ x @ A.T  # N x C x size x size

def up(x, size):
    """u(.): bilinear with the corner pixels aligned (Torch's image.scale when enlarging)."""
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, (size, size), mode="bilinear", align_corners=True)

def gaussian_pyramid(x, sizes):
    """[I_0, ..., I_K], I_k of size sizes[k], each cut from x (the code's pyramid), not from I_{k-1}."""
    return [down(x, size) for size in sizes]

def laplacian_pyramid(x, sizes):
    """Sec. 2.2: L(I) = [h_0, ..., h_{K-1}, I_K], h_k = I_k - u(I_{k+1})."""
    I = gaussian_pyramid(x, sizes)
    K = len(sizes) - 1
    L = []
    for k in range(K):
        L.append(I[k] - up(I[k + 1], sizes[k]))  # h_k
    return L + [I[K]]

def reconstruct(L):
    """The exact inverse: I_K = L[K], then I_k = u(I_{k+1}) + h_k down to I_0. reconstruct(L[k:]) is I_k."""
    image = L[-1]
    for h in reversed(L[:-1]):
        image = up(image, h.shape[-1]) + h
    return image

def condition(x, sizes, k):
    """l_k = u(I_{k+1}) of real images x: what G_k and D_k are conditioned on; None at the base (k = K)."""
    if k == len(sizes) - 1:
        return None
    coarser = down(x, sizes[k + 1])  # I_{k+1}
    return up(coarser, sizes[k])

# ------------------------------------------------------------------------ Sec. 2.3, Fig. 1: sampling
def noise_shape(k, sizes, n, nz):
    """Sec. 3: z_K at the base is a vector of nz numbers; z_k at a finer level one extra input plane."""
    if k == len(sizes) - 1:
        return (n, nz)
    return (n, 1, sizes[k], sizes[k])

def noise(shape, device, gen=None):
    """Sec. 3: uniform on [-1, 1]."""
    return torch.rand(shape, device=device, generator=gen) * 2 - 1

def generate(G, z, coarse, y=None):
    """I~_K = G_K(z_K) at the base (coarse None), else I~_k = l_k + G_k(z_k, l_k): D_k judges whole images."""
    if coarse is None:
        return G([z], y)
    h = G([z, coarse], y)  # h~_k, the residual
    return coarse + h

@torch.no_grad()
def sample_level(G, coarser, size, y=None, gen=None):
    """One link of Fig. 1's chain: I_k = u(I_{k+1}) + G_k(z_k, u(I_{k+1})), I_k of `size`."""
    coarse = up(coarser, size)  # l_k = u(I_{k+1})
    z = noise((len(coarse), 1, size, size), coarse.device, gen)  # one noise plane
    return generate(G, z, coarse, y)

@torch.no_grad()
def sample_chain(Gs, sizes, n, nz, y, device, gen=None, truncate=1.0):
    """Fig. 1 (generate.lua): I_K = G_K(z_K), then sample_level for k = K-1 .. 0. -> [I_0, ..., I_K].
    truncate t < 1 (--truncate, a deviation): z_K from U[-1, 1] truncated to [-t, t], which is t U[-1, 1]."""
    K = len(sizes) - 1
    z = noise((n, nz), device, gen) * truncate
    images = [generate(Gs[K], z, None, y)]  # I_K
    for k in reversed(range(K)):
        I_k = sample_level(Gs[k], images[0], sizes[k], y, gen)
        images.insert(0, I_k)
    return images

@torch.no_grad()
def upscale_chain(chain, G, ratio, steps, y, gen=None):
    """--upscale (the Eyescream blog's 'recursive' images): G_0 run `steps` more times past its size."""
    for _ in range(steps):
        size = round(chain[0].shape[-1] * ratio)
        finer = sample_level(G, chain[0], size, y, gen)
        chain = [finer] + chain
    return chain

def renormalise(x, mean_a, std_a, mean_b, std_b):
    """--chain A B: A's normalised images in B's; exact at every level (d and u commute with it)."""
    return (x * std_a + mean_a - mean_b) / std_b

# ------------------------------------------------------------------------ Sec. 2.3: one level's training step
@dataclass
class Level:
    """Level k: its nets, the forward passes its step calls (prepare_level's wrappers), the optimisers."""
    k: int                         # the paper's index: 0 the full image, K the base
    G: nn.Module                   # G_k, the module that is saved
    D: nn.Module                   # D_k
    G_fwd: Callable                # G_k's forward pass
    D_fwd: Callable                # D_k's forward pass in D_k's step
    D_fwd_for_G: Callable          # D_k's in G_k's step: never data-parallel, only G_k's gradients are wanted
    opt_G: torch.optim.Optimizer   # G_k's optimiser (SGD as the paper, or Adam)
    opt_D: torch.optim.Optimizer   # D_k's optimiser
    steps: int = 1                 # --level-steps: the level's updates per training step (the paper: 1)
    G_avg: nn.Module = None        # --ema: the running average of G_k's weights; None: off (the paper)
    beta: float = 0.0              # --ema: its decay
    gen_coarse: float = 0.0        # --gen-coarse: the share of fakes grown from coarser levels' samples

    @property
    def sampler(self):
        """The G_k that draws samples and is selected: the average with --ema, else G_k itself."""
        if self.G_avg is None:
            return self.G
        return self.G_avg

@dataclass
class Run:
    """One training run (or, for the sampling commands, a model's data view with no levels)."""
    sizes: list                        # sizes[k]: the size of I_k, finest first (the paper's k)
    ncls: int                          # classes fed to G and D; 0: unconditional
    mean: torch.Tensor                 # per-channel mean and std of the training split, 1 x C x 1 x 1
    std: torch.Tensor
    classes: list = None               # class names
    images: torch.Tensor = None        # uint8 N x C x H x W images on the device
    labels: torch.Tensor = None        # int64 N class labels on the device
    args: argparse.Namespace = None    # the user's flags (the checkpoint's, on --resume)
    levels: dict = field(default_factory=dict)  # k -> Level: the levels this run trains
    balance: Callable = None           # --balance: the rule deciding which nets step; None: both step
    rank: int = 0                      # data-parallel rank and number of ranks
    world: int = 1
    epoch: int = 0                     # epochs and steps done
    step: int = 0
    lr: float = 0.0                    # this epoch's learning rate and momentum (Sec. 3)
    momentum: float = 0.0
    best: dict = field(default_factory=dict)  # k -> the lowest model-selection distance so far

    @property
    def nets(self):
        """Every saved module: "G0", "D0", "G1", ... (0: the finest level)."""
        nets = {}
        for k, lv in self.levels.items():
            nets.update({f"G{k}": lv.G, f"D{k}": lv.D})
        return nets

def bce(logits, target):
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))

def update(opt, loss, params=None):
    """One step of `opt` down the gradient of `loss` (with `params`: the gradient of those alone)."""
    opt.zero_grad(set_to_none=True)
    loss.backward(inputs=params)
    opt.step()

def level_step(lv, x, y, sizes, nz, balance=None, drawn=None):
    """One round at level k (cifar/train/double_conditional_adversarial.lua) on 2B real images x. balance:
    None, or (err_real, err_fake) -> (update D_k, update G_k). drawn: --gen-coarse's I~_{k+1}, or None."""
    k = lv.k
    half = len(x) // 4  # B/2
    B = 2 * half
    # the batch's three roles: x[:B/2] the real examples D_k sees; x[B/2:] the 3B/2 images whose l_k
    # condition the fakes, B/2 of them for D_k's step (x[B/2:B]) and B for G_k's (x[B:])
    real = down(x[:half], sizes[k])  # I_k
    coarse = condition(x[half:], sizes, k)  # l_k = u(I_{k+1}); None at the base
    coarse = mixed_condition(coarse, drawn, lv.gen_coarse)  # the paper: drawn None, l_k unchanged
    z = noise(noise_shape(k, sizes, len(x) - half, nz), x.device)
    made = generate(lv.G_fwd, z, coarse, y[half:])  # I~_k, one forward pass of G_k for both steps
    fake_for_D = made[:half].detach()  # D_k's step leaves G_k alone
    fake_for_G = made[half:]

    # D_k judges the B/2 real and the B/2 generated images in two passes (the code: one mixed batch; the
    # same sums without batch norm). With --bn-d each batch is then normalised on its own, as G_k's batch
    # is in G_k's step; on a mixed batch D_k learns a rule that G_k never faces and wins at once.
    logit_real = lv.D_fwd([real], y[:half])
    logit_fake = lv.D_fwd([fake_for_D], y[half:B])
    err_real = bce(logit_real, 1.0)  # -log D_k(I_k)
    err_fake = bce(logit_fake, 0.0)  # -log(1 - D_k(I~_k))
    err_d = (err_real + err_fake) / 2  # BCE averaged over the two halves, as the code's mixed batch
    upd_d, upd_g = True, True
    if balance is not None:
        upd_d, upd_g = balance(err_real, err_fake)
    if upd_d:
        update(lv.opt_D, err_d)

    judged = lv.D_fwd_for_G([fake_for_G], y[B:])  # through the D_k just updated
    err_g = bce(judged, 1.0)  # non-saturating: push log D_k(I~_k) up
    if upd_g:
        update(lv.opt_G, err_g, list(lv.G.parameters()))  # D's weights are not G's to change
    return {"err_d": err_d.detach(),
            "err_g": err_g.detach(),
            "d_x": torch.sigmoid(logit_real.detach()).mean(),
            "d_gz": torch.sigmoid(logit_fake.detach()).mean(),
            "upd_d": float(upd_d),
            "upd_g": float(upd_g)}

def mixed_condition(coarse, drawn, share):
    """--gen-coarse (a deviation): each fake's l_k = u(I_{k+1}) is, with probability `share`, swapped for
    u(I~_{k+1}), a sample of the coarser levels for the same class. G_k then also learns on the coarse images
    that sampling gives it, flaws included; D_k still sees only whole images, so the pairs need no match."""
    if drawn is None:
        return coarse
    swap = torch.rand(len(coarse), device=coarse.device) < share  # N
    l_drawn = up(drawn, coarse.shape[-1])  # u(I~_{k+1})
    return torch.where(swap[:, None, None, None], l_drawn, coarse)

@torch.no_grad()
def coarser_samples(run, k, y):
    """--gen-coarse: I~_{k+1} for the labels y, Fig. 1's chain run by the samplers of levels K .. k+1 in
    eval mode, as --sample runs them."""
    K = len(run.sizes) - 1
    Gs = [run.levels[j].sampler for j in range(k + 1, K + 1)]  # Gs[0] = G_{k+1}
    modes = [G.training for G in Gs]
    for G in Gs:
        G.eval()
    sizes = run.sizes[k + 1:]  # sizes[0]: I_{k+1}'s
    chain = sample_chain(Gs, sizes, len(y), run.args.nz, y, y.device)
    for G, mode in zip(Gs, modes):
        G.train(mode)
    return chain[0]

@torch.no_grad()
def average_weights(G_avg, G, beta):
    """--ema (Yazici et al. 2019, a deviation): after each step G_avg <- beta G_avg + (1 - beta) G. The
    average smooths the step-to-step noise of the weights; batch-norm statistics are copied, not averaged."""
    for avg, p in zip(G_avg.parameters(), G.parameters()):
        avg.lerp_(p, 1 - beta)
    for avg, b in zip(G_avg.buffers(), G.buffers()):
        avg.copy_(b)

def train_step(run, idx):
    """Every level's step on the images idx (2B indices); with --level-steps, level k takes lv.steps steps,
    each extra one on 2B images drawn at random. -> {statistic name + level k: value}."""
    batch = get_batch(run, idx)
    stats = {}
    for k, lv in run.levels.items():
        x, y = batch
        for t in range(lv.steps):
            if t > 0:  # a batch of its own
                x, y = get_batch(run, torch.randint(len(run.images), idx.shape, device=idx.device))
            drawn = None
            if lv.gen_coarse:  # for the 3B/2 fakes' labels
                drawn = coarser_samples(run, k, y[len(y) // 4:])
            out = level_step(lv, x, y, run.sizes, run.args.nz, run.balance, drawn)
            if lv.G_avg is not None:
                average_weights(lv.G_avg, lv.G, lv.beta)
        stats.update({f"{name}{k}": v for name, v in out.items()})
    return stats

# ------------------------------------------------------------------------ Sec. 3: the networks
class Conditioned(nn.Module):
    """Eyescream's classes: one-hot after the base's flat inputs; above, a plane ReLU(Linear(one-hot)) after
    the first input: G_k sees [noise, class, l_k], D_k [image, class]."""

    def __init__(self, body, ncls, size, flat, project=False):
        super().__init__()
        self.body = body
        self.ncls = ncls  # 0: unconditional
        self.size = size  # s_k, the level's size
        self.flat = flat  # the base's MLPs take flat vectors
        self.embed = None
        if ncls and not flat:
            self.embed = nn.Linear(ncls, size * size)
        self.project = None  # --proj-d: a class embedding for D's projection term
        if ncls and project:
            self.project = nn.Embedding(ncls, body[-2].in_features)

    def forward(self, xs, y=None):
        if self.flat:
            xs = [x.flatten(1) for x in xs]
        if self.ncls:
            onehot = F.one_hot(y, self.ncls).to(xs[0].dtype)  # N x classes
            if self.flat:
                xs = xs + [onehot]
            else:  # after the first input plane
                xs = [xs[0], self.plane(onehot, xs[0]), *xs[1:]]
        if self.project is None:
            return self.body(torch.cat(xs, 1))
        return self.projected(torch.cat(xs, 1), y)

    def projected(self, x, y):
        """--proj-d (Miyato & Koyama 2018, a deviation): D's logit plus <embed(y), phi(x)>, phi(x) the input
        of D's last linear layer, so that D must judge each image against its own class."""
        phi = self.body[:-2](x)  # N x features
        logit = self.body[-2:](phi)  # N
        return logit + (self.project(y) * phi).sum(1)

    def plane(self, onehot, first):
        """The class as one plane, N x 1 x s x s, at the inputs' size (larger only past the training size)."""
        plane = F.relu(self.embed(onehot))
        plane = plane.view(-1, 1, self.size, self.size)
        return up(plane, first.shape[-1])

def mlp_nets(nz, nc, size, ncls, drop=0.5):
    """Sec. 3.1, the base: G_K two ReLU layers of 1200 units, linear output; D_K two of 600, dropout."""
    pixels = nc * size * size
    g = nn.Sequential(
        nn.Linear(nz + ncls, 1200),
        nn.ReLU(),
        nn.Linear(1200, 1200),
        nn.ReLU(),
        nn.Linear(1200, pixels),
        nn.Unflatten(1, (nc, size, size)))
    d = nn.Sequential(
        nn.Linear(pixels + ncls, 600),
        nn.ReLU(),
        nn.Dropout(drop),
        nn.Linear(600, 600),
        nn.ReLU(),
        nn.Dropout(drop),
        nn.Linear(600, 1),
        nn.Flatten(0))
    return g, d

def pads(size, kernels, strides):
    """The code's D convs are unpadded; where that leaves under 3 px, pad 'same'. -> (paddings, out size)."""
    valid = size  # the size left by unpadded convs
    same = size   # by 'same' padding
    for kern, stride in zip(kernels, strides):
        valid = (valid - kern) // stride + 1
        same = (same - 1) // stride + 1
    if valid >= 3:
        return [0] * len(kernels), valid
    return [kern // 2 for kern in kernels], same

def conv_g(g_in, nc, wg, bn=False):
    """Sec. 3.1, G_k at a level k < K: three convs (7, 7, 5) output h~_k from g_in input planes. No batch
    norm in the paper's small model; --bn-g adds it after each ReLU, as the LSUN large model."""
    layers = [nn.Conv2d(g_in, wg, 7, padding=3), nn.ReLU()]
    if bn:
        layers.append(nn.BatchNorm2d(wg, affine=False))
    layers += [nn.Conv2d(wg, wg, 7, padding=3), nn.ReLU()]
    if bn:
        layers.append(nn.BatchNorm2d(wg, affine=False))
    layers.append(nn.Conv2d(wg, nc, 5, padding=2))
    return nn.Sequential(*layers)

def conv_d(d_in, size, wd, drop=0.5, bn=False):
    """Sec. 3.1, D_k: two convs (5, 5 stride 2), dropout, a linear logit, from d_in input planes. --bn-d
    adds batch norm after the strided conv, as DCGAN's D has it after its second (a deviation)."""
    (p1, p2), n = pads(size, [5, 5], [1, 2])
    layers = [nn.Conv2d(d_in, wd, 5, padding=p1),
              nn.ReLU(),
              nn.Conv2d(wd, wd, 5, 2, p2)]
    if bn:  # D only ever judges whole batches, so it keeps no running statistics
        layers.append(nn.BatchNorm2d(wd, track_running_stats=False))
    return nn.Sequential(
        *layers,
        nn.ReLU(),
        nn.Dropout(drop),
        nn.Flatten(),
        nn.Linear(wd * n * n, 1),
        nn.Flatten(0))

def conv_base_g(nz, ncls, nc, size, wg):
    """--base conv (a deviation): G_K as a small DCGAN generator (Radford et al. 2015) in place of Sec. 3.1's
    MLP, whose D_K hardly learns at a CPU's widths. z and the one-hot class are projected to 2w maps of
    ceil(s/2) px, then one stride-2 transposed conv to s px and a 5x5 conv to the image, batch norm in G."""
    h = (size + 1) // 2
    kernel = 4 - size % 2  # the transposed conv makes 2h px (s even) or 2h - 1 (s odd)
    return nn.Sequential(
        nn.Linear(nz + ncls, 2 * wg * h * h),
        nn.Unflatten(1, (2 * wg, h, h)),  # N x 2w x h x h
        nn.BatchNorm2d(2 * wg),
        nn.ReLU(),
        nn.ConvTranspose2d(2 * wg, wg, kernel, 2, 1),  # N x w x s x s
        nn.BatchNorm2d(wg),
        nn.ReLU(),
        nn.Conv2d(wg, nc, 5, padding=2))

class ToData(nn.Module):
    """--tanh-base (a deviation): G_K's output through tanh into the pixel range [0, 1], as DCGAN's G ends,
    then normalised as the data are. A linear output must hit the background's black exactly in every pixel
    and leaves it speckled; tanh reaches it by saturating."""

    def __init__(self, nc):
        super().__init__()
        self.register_buffer("mean", torch.zeros(nc, 1, 1))  # the training split's, per channel (the
        self.register_buffer("std", torch.ones(nc, 1, 1))    # Appendix sets them; checkpoints keep them)

    def forward(self, a):
        pixels = (torch.tanh(a) + 1) / 2  # in [0, 1]
        return (pixels - self.mean) / self.std

class PairL2Pool(nn.Module):
    """fbcunn's FeatureLPPooling(2, 2, 2): sqrt(a^2 + b^2) over channel pairs, halving the channels."""

    def forward(self, x):
        pairs = x.unflatten(1, (-1, 2))  # N x C/2 x 2 x H x W
        return (pairs.pow(2).sum(2) + 1e-6).sqrt()

def large_nets(g_in, d_in, nc, size):
    """Sec. 3.2, lsun/model.lua 'large': grouped convs; G with ReLU then BN, spatial dropout, L2 pooling."""
    def bn(n):
        return nn.BatchNorm2d(n, affine=False)
    g = nn.Sequential(
        nn.Conv2d(g_in, 64, 7, padding=3),
        nn.ReLU(),
        bn(64),
        nn.Conv2d(64, 368, 7, padding=3, groups=4),
        nn.ReLU(),
        bn(368),
        nn.Dropout2d(0.5),
        nn.Conv2d(368, 128, 7, padding=3, groups=4),
        nn.ReLU(),
        bn(128),
        PairL2Pool(),
        nn.Conv2d(64, 224, 5, padding=2, groups=2),
        nn.ReLU(),
        bn(224),
        nn.Dropout2d(0.5),
        nn.Conv2d(224, nc, 7, padding=3),
        bn(nc))
    pad, n = pads(size, [3, 5, 7], [1, 1, 1])
    d = nn.Sequential(
        nn.Conv2d(d_in, 48, 3, padding=pad[0]),
        nn.ReLU(),
        nn.Conv2d(48, 448, 5, padding=pad[1], groups=4),
        nn.ReLU(),
        nn.Conv2d(448, 416, 7, padding=pad[2], groups=16),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(416 * n * n, 1),
        nn.Flatten(0))
    return g, d

def build_level(targs, k, sizes, nc, ncls):
    """-> (G_k, D_k) of the pyramid `sizes` (targs: the training flags, a dict): MLPs at the base (or,
    --base conv, a DCGAN-like G_K and a conv D_K). Widths and D's dropout may differ per level."""
    size = sizes[k]
    base = k == len(sizes) - 1
    class_planes = 1 if ncls else 0
    g_in = 1 + class_planes + nc  # noise plane, class plane, l_k
    d_in = nc + class_planes
    wg = at_level(targs["width_g"], k)
    wd = at_level(targs["width_d"], k)
    drop = at_level(targs["dropout_d"], k)
    proj = targs["proj_d"]
    if base and targs["base"] == "mlp":
        g, d = mlp_nets(targs["nz"], nc, size, ncls, drop)
        bounded(g, targs, nc)
        return Conditioned(g, ncls, size, True), Conditioned(d, ncls, size, True, proj)
    if targs["model"] == "large" and not base:
        g, d = large_nets(g_in, d_in, nc, size)
        return Conditioned(g, ncls, size, False), Conditioned(d, ncls, size, False, proj)
    if base:  # --base conv: G_K takes the flat noise vector and one-hot class, D_K a class plane
        g = conv_base_g(targs["nz"], ncls, nc, size, wg)
        bounded(g, targs, nc)
    else:
        g = conv_g(g_in, nc, wg, targs["bn_g"])
    bn = at_level(targs["bn_d"], k)
    d = conv_d(d_in, size, wd, drop, bn)  # made after G: one seed gives the same weights as ever
    return Conditioned(g, ncls, size, base), Conditioned(d, ncls, size, False, proj)

def bounded(g, targs, nc):
    """--tanh-base: G_K's body ends in ToData (no parameters, so the initial weights stay the same)."""
    if targs["tanh_base"]:
        g.append(ToData(nc))

# ------------------------------------------------------------------------ Sec. 3: the optimisation schedule
def sgd_schedule(epoch, lr0, m0, m_max=0.8, m_step=0.0008, decay=4e-5):
    """Sec. 3: after every epoch lr /= 1 + 4e-5 and momentum += 0.0008, up to 0.8. -> (lr, momentum)."""
    lr = lr0 / (1 + decay) ** (epoch - 1)
    momentum = min(m0 + m_step * (epoch - 1), m_max)
    return lr, momentum

def set_sgd(opt, lr, momentum):
    # Torch's optim.sgd damps the gradient by the momentum (buf = m buf + (1 - m) grad); PyTorch's does not
    for group in opt.param_groups:
        group.update(lr=lr, momentum=momentum, dampening=momentum)

def set_schedule(run, epoch):
    """This epoch's lr and momentum (Sec. 3) into every SGD optimiser; --lr-g, --lr-d on the same schedule."""
    args = run.args
    run.lr, run.momentum = sgd_schedule(epoch, args.lr, args.momentum)
    if args.optim != "sgd":
        return
    for k, lv in run.levels.items():
        lr_g = run.lr * level_lr(args.lr_g, k, args.lr) / args.lr
        lr_d = run.lr * level_lr(args.lr_d, k, args.lr) / args.lr
        set_sgd(lv.opt_G, lr_g, run.momentum)
        set_sgd(lv.opt_D, lr_d, run.momentum)

def balance_rule(err_real, err_fake, margin=0.3, real_max=0.7):
    """lsun/train.lua (--balance): D alone if its fake error exceeds its real error by the margin, else G
    alone; D too whenever its real error exceeds 0.7. -> (update_d, update_g)."""
    d_only = err_fake > err_real + margin
    return d_only or err_real > real_max, not d_only

# ------------------------------------------------------------------------ Sec. 4: evaluation
def row_of(t, i, n):
    """Row i of t, n times over (None stays None)."""
    if t is None:
        return None
    return t[i:i + 1].expand(n, *t.shape[1:])

@torch.no_grad()
def selection_score(G, k, x, y, sizes, nz, gen, n=128):
    """cifar/train/conditional_adversarial.lua approxParzen: per validation image, n samples drawn from its
    own l_k = u(I_{k+1}); the smallest L2 distance to its true I_k, averaged over images (lower is better)."""
    fine = down(x, sizes[k])  # I_k
    coarse = condition(x, sizes, k)  # l_k = u(I_{k+1})
    dists = []
    for i in range(len(x)):
        z = noise(noise_shape(k, sizes, n, nz), x.device, gen)
        made = generate(G, z, row_of(coarse, i, n), row_of(y, i, n))  # n x C x s_k x s_k
        dist = (made - fine[i:i + 1]).flatten(1).norm(dim=1)  # n L2 distances to I_k
        dists.append(dist.min())
    return torch.stack(dists).mean().item()

def select_models(run, val, gen):
    """Model selection (the cifar/ code) on `val`: -> ({k: score}, [the levels that beat their best])."""
    x, y = val
    scores, better = {}, []
    for k, lv in run.levels.items():
        scores[k] = selection_score(lv.sampler, k, x, y, run.sizes, run.args.nz, gen)
        if scores[k] < run.best.get(k, math.inf):
            better.append(k)
            run.best[k] = scores[k]
    return scores, better

def parzen_ll(d2, dim, sigma):
    """Gaussian Parzen window: log (1/N) sum_j N(x_i; s_j, sigma^2 I) from d2 (images x N), in nats."""
    log_n = math.log(d2.shape[1])
    log_gauss = dim / 2 * math.log(2 * math.pi * sigma ** 2)  # the normaliser of N(.; s, sigma^2 I)
    return torch.logsumexp(-d2 / (2 * sigma ** 2), 1) - log_n - log_gauss

def val_test_ll(d2, n_val, dim):
    """sigma chosen on the first n_val (validation) images, then applied to the rest (test)."""
    sigmas = torch.logspace(-2.5, 0, 26).tolist()
    val, test = d2[:n_val], d2[n_val:]
    sigma = max(sigmas, key=lambda s: parzen_ll(val, dim, s).mean().item())
    return parzen_ll(test, dim, sigma), sigma

@torch.no_grad()
def base_d2(G, base, y, nz, m, pix):
    """Squared distances (pixel units) of each true I_K to m samples of G_K (of its own class, if any)."""
    dev = base.device
    d2 = torch.empty(len(base), m, dtype=torch.float64, device=dev)
    classes = [None] if y is None else y.unique().tolist()
    for c in classes:
        rows = torch.ones(len(base), dtype=torch.bool, device=dev)  # the images of class c
        if c is not None:
            rows = y == c
        made = []
        for part in torch.arange(m).split(1000):  # m samples, 1000 at a time
            yc = None if c is None else torch.full((len(part),), c, device=dev)
            made.append(G([noise((len(part), nz), dev)], yc))
        made = torch.cat(made)
        d2[rows] = torch.cdist(pix(base[rows]), pix(made)).pow(2)
    return d2

@torch.no_grad()
def residual_d2(G, coarse, h, y, std, m):
    """Squared distances (pixel units) of each true h_k to m residuals drawn from its own l_k and class."""
    rows = []
    for i in range(len(h)):
        s = h.shape[-1]
        z = noise((m, 1, s, s), h.device)
        made = G([z, row_of(coarse, i, m)], row_of(y, i, m))  # m residuals h~_k
        diff = (made - h[i:i + 1]) * std  # normalised -> pixel units
        rows.append(diff.flatten(1).pow(2).sum(1))
    return torch.stack(rows).double()

@torch.no_grad()
def parzen_levels(args, Gs, x, y, run, n_val):
    """Sec. 4.1: log p(I) = log q_K(I_K) + sum_{k<K} log q_k(h_k | l_k), a Parzen window per level on pixels
    in [0, 1]: the base from --eval-samples samples, each h_k from --eval-cond samples drawn from the test
    image's own l_k = u(I_{k+1}); sigma chosen on x[:n_val]. -> {k: log q_k per test image}, {k: sigma}."""
    sizes, nz = run.sizes, run.args.nz
    K = len(sizes) - 1
    L = laplacian_pyramid(x, sizes)  # the coefficients that are scored
    ys = y if run.ncls else None  # the base of an unconditional model: all images against one sample set
    pix = lambda t: (t.float() * run.std + run.mean).flatten(1).double()  # normalised -> [0, 1]
    d2 = base_d2(Gs[K], L[K], ys, nz, args.eval_samples, pix)
    ll, sigmas = {}, {}
    dims = [x.shape[1] * size ** 2 for size in sizes]  # numbers per image at each level
    ll[K], sigmas[K] = val_test_ll(d2, n_val, dims[K])
    for k in reversed(range(K)):
        coarse = up(reconstruct(L[k + 1:]), sizes[k])  # l_k = u(I_{k+1})
        d2 = residual_d2(Gs[k], coarse, L[k], y, run.std, args.eval_cond)
        ll[k], sigmas[k] = val_test_ll(d2, n_val, dims[k])
    return ll, sigmas

@torch.no_grad()
def evaluate(args, Gs, run, stem):
    """--eval on the first test images: Sec. 4.1's Parzen log-likelihood, per level and in total (for a
    conditional model log p(I | y), every level given the true label)."""
    dev = run.images.device
    n_val = min(1000, len(run.images) // 2)  # as gan.py: sigma on test[:1000], scores on test[1000:2000]
    n = min(len(run.images), n_val + args.eval_images)
    x, y = get_batch(run, torch.arange(n, device=dev), False)
    ll, sigmas = parzen_levels(args, Gs, x, y, run, n_val)
    total = sum(ll.values())
    se = (total.std() / math.sqrt(len(total))).item()  # the standard error of the mean
    report = []
    for k, sigma in sigmas.items():
        ll_k = ll[k].mean().item()
        line = f"level {k} {ll_k:.1f} (sigma {sigma:.3f})"
        report.append(line)
    nats = f"{total.mean().item():.1f} +- {se:.1f} nats"
    levels = "; ".join(report)
    print(f"Parzen log-likelihood: {nats} on {len(total)} test images ({levels})")
    nearest_sheet(Gs, run, y, stem + "_nn.png")

def resample_sheet(G, k, run, n, path, gen=None):
    """Sec. 4.2: per row a real image, its l_k (blank at the base), then n samples drawn from that l_k."""
    dev = run.images.device
    idx = torch.arange(8, device=dev) % len(run.images)
    x, y = get_batch(run, idx, False)
    fine = down(x, run.sizes[k])  # I_k
    coarse = condition(x, run.sizes, k)  # l_k; None at the base, shown blank
    shown = torch.zeros_like(fine) if coarse is None else coarse
    if coarse is not None:
        coarse = coarse.repeat_interleave(n, 0)  # each l_k n times
    shape = noise_shape(k, run.sizes, 8 * n, run.args.nz)
    z = noise(shape, dev, gen)
    with torch.no_grad():
        made = generate(G, z, coarse, y.repeat_interleave(n))
    samples = made.float().view(8, n, *fine.shape[1:])
    rows = torch.cat([fine[:, None], shown[:, None], samples], 1)
    sheet = to_display(rows.flatten(0, 1), run.mean, run.std)
    save_grid(sheet, path, n + 2)

# ------------------------------------------------------------------------ the training loop, sampling
def train(run):
    """Epochs of shuffled steps; after each, rank 0 selects models and writes pictures and the checkpoint."""
    val = None  # model selection's images, on rank 0
    if run.rank == 0 and run.args.select:
        val = selection_images(run)
    log = Log(run.step, time.time())
    for epoch in range(run.epoch + 1, run.args.epochs + 1):
        set_schedule(run, epoch)
        train_epoch(run, epoch, log)
        run.epoch = epoch
        if run.rank == 0:
            end_of_epoch(run, val)
    return run

def train_epoch(run, epoch, log):
    """One shuffled pass: B/2 real images a step, 3B/2 drawn at random to condition the fakes (the code)."""
    idx = batches(run, epoch)
    n_cond = run.args.batch_size * 3 // 2
    for i, real in enumerate(idx):
        cond = torch.randint(len(run.images), (n_cond,), device=real.device)
        stats = train_step(run, torch.cat([real, cond]))
        run.step += 1
        log_step(run, log, stats, epoch, i, len(idx))

@dataclass
class Source:
    """What --sample draws from (the Appendix's sampling_source loads it)."""
    Gs: list                # Gs[k] = G_k, finest first (with --chain: B's levels from the switch down)
    run: Run                # the model's flags, sizes, classes, normalisation (and --resample's test images)
    stem: str = ""          # output path without ".png"
    before: "Source" = None  # --chain A B: A, drawing the levels coarser than B's switch
    truncate: float = 1.0   # --truncate: z_K's range [-t, t] if this source draws the base (1: the paper's)

def draw(src, n, y):
    """Fig. 1's chain, finest first. --chain A B: A's last image, in B's normalisation, is I_{S+1} of B's."""
    run = src.run
    if src.before is None:
        return sample_chain(src.Gs, run.sizes, n, run.args.nz, y, run.mean.device, truncate=src.truncate)
    a = src.before.run
    images = []
    for I in draw(src.before, n, y):
        images.append(renormalise(I, a.mean, a.std, run.mean, run.std))
    for k in reversed(range(len(src.Gs))):
        I_k = sample_level(src.Gs[k], images[0], run.sizes[k], y)
        images.insert(0, I_k)
    return images

def sample(args):
    """--sample: the level sheet and --npz of Fig. 1's chain, and the --upscale, --resample, --eval ones."""
    src = sampling_source(args, pick_device(args))
    run, stem = src.run, src.stem
    torch.manual_seed(args.seed)
    y = asked_labels(src, args.n, args.label)
    sheet, finest, levels = draw_chunks(src, args.n, y)
    save_grid(sheet, stem + ".png", levels * 4)
    if args.npz:
        save_npz(args.npz, finest, y)
    if args.upscale:
        y = asked_labels(src, 8, args.label)
        ratio = run.sizes[0] / run.sizes[1]  # the finest level's
        chain = draw(src, 8, y)
        big = upscale_chain(chain, src.Gs[0], ratio, args.upscale, y)[0]
        save_grid(to_display(big, run.mean, run.std), stem + "_upscale.png", 4)
    if args.resample or args.eval:
        use_test_images(run)
    if args.resample:
        resample_sheet(src.Gs[0], 0, run, args.resample, stem + "_resample.png")
    if args.eval:
        evaluate(args, src.Gs, run, stem)
    print(f"wrote {stem}*.png {args.npz or ''}")

# ------------------------------------------------------------------------ Appendix: plumbing, not the paper
def fail(msg):
    raise SystemExit(f"error: {msg}")

# Files: each one written whole or not at all, into a folder proven writable, by one run at a time
def write_atomic(path, write):
    """write(f) into PATH.tmp, fsync, rename; on any exception the .tmp goes, a disk error is one line."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        failed = isinstance(e, (OSError, RuntimeError))  # torch.save on a full disk: RuntimeError, no errno
        folder = os.path.dirname(os.path.abspath(path))  # asked while the .tmp still fills the disk
        low = failed and os.path.isdir(folder) and shutil.disk_usage(folder).free < 1 << 16
        full = getattr(e, "errno", None) == errno.ENOSPC or low
        if os.path.exists(tmp):
            os.remove(tmp)
        if full:
            fail(f"no space left on device writing {path}; the previous file is kept: free some space")
        if failed:
            why = getattr(e, "strerror", None) or str(e).split("\n")[0]
            fail(f"could not write {path} ({why}); the previous file is kept")
        raise

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
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            text = lock_holder(path)
        if text is None:  # the lock went between the two calls: try again
            continue
        if not text.isdigit() or pid_alive(int(text)):  # no id yet: its run has just taken it
            fail(f"{outf} is in use by another run (process {text or 'starting'}); wait for it to end, "
                 "or choose another --outf")
        os.remove(path)  # its process is gone: a stale lock
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return path

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
    except (ProcessLookupError, OverflowError):  # no such process; no process has so large an id
        return False
    except PermissionError:  # alive, another user's
        pass
    return True

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
DECODER = 2  # decode_image's version, in the folder cache's key: a cache an older one wrote is not reused

def damaged(path, e):
    fail(f"{path} is damaged ({type(e).__name__}: {e}); delete it to download it again, or replace it")

def md5_of(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()

def find_or_download(candidates, url, md5):
    """The first of the candidate paths that exists, else the file downloaded to candidates[0], checked."""
    found = [c for c in candidates if os.path.exists(c)]
    if found:
        return found[0]
    path, folder = candidates[0], os.path.dirname(candidates[0]) or "."
    print(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            data = r.read()
    except OSError as e:
        fail(f"could not download {url} ({e}); put {os.path.basename(path)} in {folder}")
    if hashlib.md5(data).hexdigest() != md5:
        fail(f"the download of {url} does not match its checksum; try again")
    prepare_output(folder)
    write_atomic(path, lambda f: f.write(data))
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
    where = files[0] if len(files) == 1 else folder  # the file (or folder) named in errors
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
        damaged(where, e)
    x, y = torch.from_numpy(x), torch.from_numpy(y).long()
    return check_split(x, y, [c.decode() for c in b[-1][b"label_names"]], where)

def read_idx(path):
    """IDX format (LeCun): 2 zero bytes, a type byte (0x08 = uint8), a rank byte, big-endian int32 sizes."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as e:
        damaged(path, e)
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 8 or len(data) < 4 + 4 * data[3]:
        fail(f"{path} is not a uint8 IDX file")
    dims, start = np.frombuffer(data, ">i4", data[3], 4), 4 + 4 * data[3]
    if len(data) != start + int(np.prod(dims)):
        damaged(path, ValueError(f"{len(data) - start} bytes of data, its header says {int(np.prod(dims))}"))
    return np.frombuffer(data, np.uint8, offset=start).reshape(dims)

def load_mnist(root, name, split):
    """MNIST and Fashion-MNIST: DATAROOT/NAME, DATAROOT or a Debian dataset package, else downloaded."""
    paths = []
    dirs = (os.path.join(root, name), root, os.path.join(SYSTEM_DATA, name))
    for i in [0, 1] if split == "train" else [2, 3]:
        found = [os.path.join(d, f) for d in dirs for f in (IDX_FILES[i], IDX_FILES[i][:-3])]
        paths.append(find_or_download(found, IDX_URLS[name] + IDX_FILES[i], IDX_MD5[name][i]))
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

# Every Pillow mode to 8 bits: greys to L, colour to RGB, transparency over black; integer and float greys
# (I;16*, I, F) are scaled from their range: 0..65535 (I) or 0..1 (F) if they lie in it, else their min..max.
TO_8BIT = {"1": "L", "L": "L", "LA": "L", "La": "L", "P": "RGB", "PA": "RGB", "RGB": "RGB",
           "RGBA": "RGB", "RGBa": "RGB", "RGBX": "RGB", "CMYK": "RGB", "YCbCr": "RGB", "HSV": "RGB"}

def decode_image(path, size, mode):
    """EXIF orientation applied, 8 bits, the shorter side resized to `size`, then a centre crop (DCGAN)."""
    try:
        im = ImageOps.exif_transpose(Image.open(path))
        if im.mode.startswith("I") or im.mode == "F":
            v = np.nan_to_num(np.asarray(im, np.float64))
            top = 1.0 if im.mode == "F" else 65535.0
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
    tops = [os.path.dirname(os.path.relpath(f, root)).split(os.sep)[0] or "." for f in files]
    classes = sorted(set(tops))  # an image in a nested folder belongs to its top-level folder's class
    print(f"{len(files)} images in {root}; classes (its top-level folders): {', '.join(classes)}")
    seen = [(f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    stamp = hashlib.md5(repr([DECODER, seen]).encode())
    cache = os.path.join(root, f".cache-{size}px-{channels or 'auto'}ch-{stamp.hexdigest()[:12]}.npz")
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
    y = np.array([classes.index(t) for t in tops], np.int64)
    if os.access(root, os.W_OK):  # a read-only dataset still works, it is just decoded again next time
        write_atomic(cache, lambda f: np.savez(f, x=x, y=y))
    return check_split(torch.from_numpy(x), torch.from_numpy(y), classes, root)

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
        size = args.image_size or 64
        x, y, classes = load_folder(args.dataroot, size, args.channels, args.workers, args.outf)
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
    """--levels, or the dataset's pyramid (else size/16 .. size), coarse to fine. -> sizes[k], I_k's size."""
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
    return sizes[::-1]

def get_batch(run, idx, train=True):
    """Images idx cropped to the finest size (random in training, Sec. 3.1), normalised. -> (x, labels)."""
    x, size, dev = run.images[idx], run.sizes[0], run.images.device
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
def load_checkpoint(path, training=False):
    """A lapgan.py checkpoint (a training one, with optimisers, for --resume), older ones in today's layout"""
    if not os.path.isfile(path):
        fail(f"no checkpoint at {path}; train first or point --ckpt/--outf at a run folder")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{path} is not a readable checkpoint ({type(e).__name__}); delete or replace it")
    other = ckpt.get("script") if isinstance(ckpt, dict) else None
    if other != SCRIPT:
        fail(f"{path} was written by {other or 'another program'}.py, not {SCRIPT}.py; use that script")
    keys = [k for k in KEYS + TRAINING_KEYS * training if k not in ckpt]
    levels = ckpt.get("levels", {}).values()
    keys += [k for k in ("optG", "optD") if training and any(k not in nets for nets in levels)]
    if keys:
        fail(f"{path} is not a {SCRIPT}.py training checkpoint (it lacks {', '.join(keys)}); use DIR/ckpt.pt "
             "of a run folder")
    if "paper_levels" not in ckpt:
        ckpt = paper_levels(ckpt)
    ckpt["args"] = {**ADDED, **ckpt["args"]}
    return ckpt

def paper_levels(ck):
    """A checkpoint from before the paper's numbering (level 0 the base) in today's: level j is K - j."""
    K = len(ck["sizes"]) - 1
    args = dict(ck["args"])
    if args.get("level") is not None:
        args["level"] = K - args["level"]
    levels = {K - j: nets for j, nets in ck["levels"].items()}
    best = {K - j: dist for j, dist in ck["balance"]["best"].items()}
    return {**ck, "args": args, "sizes": ck["sizes"][::-1], "levels": levels, "balance": {"best": best},
            "paper_levels": True, "flipped": K}

def checkpoint(run, ks=None, opts=True):
    """ckpt.pt (or best.pt: levels ks, no optimisers): the flags, pyramid, normalisation and weights."""
    args = {**vars(run.args), "image_size": run.images.shape[-1], "nc": run.images.shape[1]}
    levels = {}
    for k in run.levels if ks is None else ks:
        kept = saved_parts(run.levels[k]).items()
        levels[k] = {name: m.state_dict() for name, m in kept if opts or not name.startswith("opt")}
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"script": SCRIPT, "args": args, "classes": run.classes, "sizes": run.sizes,
            "mean": run.mean.cpu(), "std": run.std.cpu(), "epoch": run.epoch, "step": run.step,
            "balance": {"best": dict(run.best)}, "rng": {"torch": torch.get_rng_state(), "cuda": cuda},
            "levels": levels, "world": run.world,
            "paper_levels": True}  # level k, sizes[k]: the paper's I_k, 0 the full image

def saved_parts(lv):
    """Level lv's checkpoint entries: nets, the --ema average (sampling loads it) if any, optimisers."""
    parts = {"G": lv.G, "D": lv.D, "G_avg": lv.G_avg, "optG": lv.opt_G, "optD": lv.opt_D}
    return {name: m for name, m in parts.items() if m is not None}

def restore(run, ckpt):
    for k, lv in run.levels.items():
        if k not in ckpt["levels"]:
            fail(f"the checkpoint does not hold level {k}; resume with the same --level")
        for name, m in saved_parts(lv).items():
            m.load_state_dict(ckpt["levels"][k][name])
    run.epoch, run.step, run.best = ckpt["epoch"], ckpt["step"], dict(ckpt["balance"]["best"])
    torch.set_rng_state(ckpt["rng"]["torch"])
    if ckpt["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    if ckpt.get("world", 1) != run.world and run.rank == 0:
        print(f"note: trained on {ckpt.get('world', 1)} processes, resumed on {run.world}: each one's share "
              "of the data changes, so the run does not continue bit for bit")
    if run.rank == 0:  # rows written after the checkpoint, before a crash, are written again
        flip = ckpt.get("flipped")  # a run from before the paper's numbering: its logs are renumbered too
        trim_log(os.path.join(run.args.outf, "log.csv"), "step", ckpt["step"], flip)
        trim_log(os.path.join(run.args.outf, "select.csv"), "epoch", ckpt["epoch"], flip)
    else:  # the checkpoint holds rank 0's RNG; the other ranks need noise of their own
        torch.manual_seed(run.args.seed + run.rank + 7919 * ckpt["epoch"])
    print(f"resumed from epoch {ckpt['epoch']}, step {ckpt['step']}")

# flags added after checkpoints were written: an older checkpoint gets their defaults, the paper's
ADDED = {"dropout_d": 0.5, "lr_d": None, "lr_g": None, "base": "mlp", "bn_g": False, "ema": 0.0,
         "level_steps": 1, "proj_d": False, "recipe": None, "tanh_base": False, "bn_d": 0, "gen_coarse": 0.0,
         "truncate": None}
KEYS = ["args", "classes", "sizes", "mean", "std", "levels"]  # every checkpoint's, best.pt's too
TRAINING_KEYS = ["epoch", "step", "balance", "rng"]  # and a training one's (with optG, optD per level)
MACHINE = ["cuda", "amp", "compile", "workers", "log_every"]  # this session's, as typed or by default
MAY_CHANGE = ["dataroot", "epochs", "outf"] + MACHINE
SAMPLING_ONLY = ["sample", "ckpt", "n", "label", "npz", "out", "resample", "upscale", "chain", "switch",
                 "eval", "eval_images", "eval_samples", "eval_cond", "resume", "truncate"]  # not by training

def resume_args(args, typed):
    """--resume: the checkpoint's flags, --dataroot and --epochs where typed, MACHINE's from this command."""
    ckpt = load_checkpoint(os.path.join(args.outf, "ckpt.pt"), training=True)
    differ = [k for k in sorted(typed) if k not in MAY_CHANGE + SAMPLING_ONLY
              and getattr(args, k) != ckpt["args"].get(k)]
    if differ:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in differ)
        may = ", ".join(f"--{k.replace('_', '-')}" for k in MAY_CHANGE)
        fail(f"--resume keeps the checkpoint's training flags; {flags} differ from it (only {may} may "
             "change): drop them, or start a new run with another --outf")
    typed_values = {k: getattr(args, k) for k in MAY_CHANGE if k in typed or k in MACHINE}
    args = argparse.Namespace(**{**ckpt["args"], **typed_values, "outf": args.outf, "resume": True})
    if ckpt["epoch"] >= args.epochs:
        fail(f"the checkpoint has already trained {ckpt['epoch']} epochs; give --epochs larger than "
             f"{ckpt['epoch']} to train more")
    return args, ckpt

def start_run(args, typed, device, rank, world):
    """The Run that `train` continues: a fresh one, or OUTF/ckpt.pt's; a folder with no ckpt.pt is no run."""
    path = os.path.join(args.outf, "ckpt.pt")
    if args.resume and not os.path.exists(path):
        fail(f"nothing to resume: {args.outf} holds no checkpoint (ckpt.pt); run without --resume to start")
    if not args.resume and os.path.exists(path):
        fail(f"{args.outf} already holds a run; add --resume to continue it, or choose another --outf")
    left = run_files(args.outf)  # a run that stopped before its first checkpoint
    if not args.resume and left:
        fail(f"{args.outf} already holds a run's {', '.join(left)} but no checkpoint to resume; delete them "
             "to start there again, or choose another --outf")
    if args.resume:  # the checkpoint's flags, less this machine's
        args, ckpt = resume_args(args, typed)
    run = setup_run(args, device, load_dataset(args, "train"), rank, world)
    if args.resume:
        restore(run, ckpt)
    return run

def run_files(outf):
    """The files a run writes beside its ckpt.pt that are in OUTF."""
    return [name for name in ("log.csv", "select.csv", "best.pt") if os.path.exists(os.path.join(outf, name))]

def diverged(run, what):
    """A NaN stops training: the last good checkpoint is kept; with none yet, the run's files go."""
    path = os.path.join(run.args.outf, "ckpt.pt")
    kept = f"the last good checkpoint {path} is kept"
    if not os.path.exists(path):
        forget_run_files(run)
        kept = "no checkpoint was written yet; start again"
    fail(f"{what}; training stopped: {kept} (try a lower --lr or --balance)")

def forget_run_files(run):
    """No checkpoint yet: the run's files go (nothing to resume; they would refuse a restart)."""
    if run.rank == 0:
        for name in run_files(run.args.outf):
            os.remove(os.path.join(run.args.outf, name))

def n_classes(ck):
    return len(ck["classes"]) if ck["args"]["conditional"] else 0

def load_levels(paths, need=None):
    """[G_k for k in need] (default: all) from checkpoints of one pyramid; later files replace levels."""
    Gs, first = {}, None
    for path in paths:
        ck = load_checkpoint(path)
        pyramid = (ck["sizes"], ck["args"]["nc"], n_classes(ck))  # build_level's sizes, nc, ncls
        first = first or (ck, pyramid)
        if pyramid != first[1]:
            fail(f"{path} holds another pyramid (sizes, channels, classes) than {paths[0]}; use matching "
                 f"checkpoints")
        for k, st in ck["levels"].items():
            Gs[k] = build_level(ck["args"], k, *pyramid)[0]
            Gs[k].load_state_dict(st.get("G_avg", st["G"]))  # --ema: the average draws
    need = range(len(first[0]["sizes"])) if need is None else need
    if any(k not in Gs for k in need):
        fail(f"level {min(set(need) - set(Gs))} is in none of {' '.join(paths)}; add the checkpoint of the "
             f"run that trained it")
    return [Gs[k].eval() for k in need], first[0]

def source(ck, Gs, dev, first=0):
    """--sample's Source: the generators Gs (G_first, ...) of checkpoint ck on the device."""
    run = Run(ck["sizes"][first:], n_classes(ck), ck["mean"].to(dev), ck["std"].to(dev), ck["classes"],
              args=argparse.Namespace(**ck["args"]))
    return Source([G.to(dev) for G in Gs], run)

def chain_source(a, b, switch, dev):
    """--chain A B (the blog's cats made horses): B's G_S .. G_0 finish A's images of B's size s_{S+1}."""
    ca, cb = load_checkpoint(a), load_checkpoint(b)
    K = len(cb["sizes"]) - 1
    S = K - 1 if switch is None else switch
    if not 0 <= S < K:
        fail(f"--switch {S} is out of range; {b}'s levels 0..{K - 1} can follow A's images (K = {K}: A's)")
    size, nc = cb["sizes"][S + 1], cb["args"]["nc"]
    if size not in ca["sizes"] or (ca["args"]["nc"], n_classes(ca)) != (nc, n_classes(cb)):
        fail(f"{a} and {b} do not fit at level {S}: B's level {S} takes {size} px images with {nc} channels "
             f"({n_classes(cb)} classes) from A; pick another --switch or checkpoints")
    j = ca["sizes"].index(size)  # A's level of that size: A draws its levels K_A .. j
    before = source(ca, load_levels([a], range(j, len(ca["sizes"])))[0], dev, j)
    src = source(cb, load_levels([b], range(S + 1))[0], dev)
    src.before = before
    return src

def sampling_source(args, dev):
    """--sample's model: --ckpt (several join levels trained apart) or --chain A B; --label checked."""
    if args.chain:
        src = chain_source(*args.chain, args.switch, dev)
    else:
        Gs, ck = load_levels(args.ckpt)
        src = source(ck, Gs, dev)
    base = src.before or src  # the source that draws z_K: --truncate as typed, else its run's, else 1
    base.truncate = args.truncate or base.run.args.truncate or 1.0
    last = (args.chain or args.ckpt)[-1]
    src.stem = os.path.splitext(args.out or os.path.join(os.path.dirname(last), "samples"))[0]
    ncls = src.run.ncls
    if args.label is not None and not ncls:
        fail(f"{last} was trained without --conditional; drop --label")
    if args.label is not None and args.label >= ncls:  # get_args has checked it is >= 0
        fail(f"--label {args.label} is out of range; this model has classes 0..{ncls - 1}")
    check_room(args, src)
    return src

def asked_labels(src, n, label):
    """The class asked for each sample: --label, or drawn uniformly; None for an unconditional model."""
    if not src.run.ncls:
        return None
    if label is not None:
        return torch.full((n,), label, device=src.run.mean.device)
    return torch.randint(src.run.ncls, (n,)).to(src.run.mean.device)

def check_room(args, src):
    """--sample's folders prepared, its bytes checked against free disk and memory before drawing."""
    run = src.run
    levels = len(run.sizes) + (len(src.before.run.sizes) if src.before else 0)
    need = args.n * run.mean.shape[1] * run.sizes[0] ** 2 * (levels + 1)  # uint8 images, the npz's too
    for path in [src.stem] + ([args.npz] if args.npz else []):
        folder = os.path.dirname(os.path.abspath(path))
        prepare_output(folder)
        if shutil.disk_usage(folder).free < need:
            fail(f"--n {args.n} needs about {need / 1e9:.2f} GB on {folder}, more than is free; lower --n")
    if 2 * need > os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"):
        fail(f"--n {args.n} needs about {2 * need / 1e9:.2f} GB of memory, more than is free; lower --n")

def draw_chunks(src, n, y, chunk=500):
    """--sample's chains, `chunk` at a time: -> uint8 (level sheet images, finest images), levels."""
    sheet, finest = [], []
    for i in range(0, n, chunk):
        asked = None if y is None else y[i:i + chunk]
        images = draw(src, min(chunk, n - i), asked)
        sheet.append(to_uint8(level_sheet(images, src.run)))
        finest.append(to_uint8(to_display(images[0], src.run.mean, src.run.std)))
    return np.concatenate(sheet), np.concatenate(finest), len(images)

def use_test_images(run):
    """--resample and --eval: the model's test split, on the device, in place of its training images."""
    x, y, _ = load_dataset(run.args, "test")  # --limit cuts the training split only
    run.images, run.labels = x.to(run.mean.device), y.to(run.mean.device)

def selection_images(run):
    """Model selection's images: the LAST --select test images (--eval scores the first). -> (x, y)."""
    x, y, _ = load_dataset(run.args, "test")
    dev, n = run.images.device, run.args.select
    if n > len(x):
        fail(f"--select {n} is more than the {len(x)} test images of {run.args.dataset}; lower --select")
    held = Run(run.sizes, 0, run.mean, run.std, images=x[-n:].to(dev), labels=y[-n:].to(dev))
    return get_batch(held, torch.arange(len(held.images), device=dev), False)

def sample_sheet(run, gen):
    """samples_eNNN.png: Fig. 1's chain at every level (3 per class); a level alone: resample_sheet."""
    path, dev = f"{run.args.outf}/samples_e{run.epoch:03d}.png", run.images.device
    if len(run.levels) < len(run.sizes):
        k, lv = next(iter(run.levels.items()))
        return resample_sheet(lv.sampler, k, run, 6, path, gen)
    n = 3 * run.ncls or 24
    Gs = [run.levels[k].sampler for k in range(len(run.sizes))]
    y = torch.arange(n, device=dev) // 3
    chain = sample_chain(Gs, run.sizes, n, run.args.nz, y, dev, gen, run.args.truncate or 1.0)
    save_grid(level_sheet(chain, run), path, 3 * len(chain))

# Logs and pictures
def end_of_epoch(run, val):
    """Rank 0: model selection (noise of its own, the same every epoch), samples, ckpt.pt, curves.png."""
    args, dev = run.args, run.images.device
    gen = torch.Generator(dev).manual_seed(args.seed)  # the same noise every epoch
    if not all(torch.isfinite(p).all() for lv in run.levels.values() for p in lv.sampler.parameters()):
        diverged(run, f"G's weights became NaN/inf in epoch {run.epoch}")
    for lv in run.levels.values():
        lv.G.eval()
    if val is not None:
        scores, better = select_models(run, val, gen)
        row = {"epoch": run.epoch, **{f"dist{k}": d for k, d in scores.items()}}
        append_log(f"{args.outf}/select.csv", row)
        if better:  # best.pt: every level's best weights so far, the levels `better` replaced
            path = f"{args.outf}/best.pt"
            old = load_checkpoint(path)["levels"] if os.path.exists(path) else {}
            best = checkpoint(run, better, opts=False)
            best["levels"] = {**old, **best["levels"]}
            write_atomic(path, lambda f: torch.save(best, f))
    sample_sheet(run, gen)
    for lv in run.levels.values():
        lv.G.train()
    ckpt = checkpoint(run)
    write_atomic(f"{args.outf}/ckpt.pt", lambda f: torch.save(ckpt, f))
    plot_curves(f"{args.outf}/log.csv", f"{args.outf}/curves.png")

@torch.no_grad()
def nearest_sheet(Gs, run, y, path):
    """Fig. 3's check that samples are not copies: 32 samples, each beside its L2-nearest training image."""
    dev, s = run.images.device, run.sizes[0]
    asked = y[torch.arange(32, device=dev) % len(y)]
    made = sample_chain(Gs, run.sizes, 32, run.args.nz, asked, dev)[0]
    fake = to_display(made, run.mean, run.std).cpu()  # in [-1, 1]
    train = load_dataset(argparse.Namespace(**{**vars(run.args), "limit": None}), "train")[0]  # all of it
    m = (train.shape[-1] - s) // 2
    train = train[..., m:m + s, m:m + s]
    fake_pixels = (fake.flatten(1) + 1) * 127.5  # uint8 units, as the training images
    d = [torch.cdist(fake_pixels, part.flatten(1).float()) for part in train.split(4096)]
    nearest = train[torch.cat(d, 1).argmin(1)].permute(0, 2, 3, 1).numpy()
    pairs = np.stack([to_uint8(fake), nearest], 1)  # each sample beside its nearest
    save_grid(pairs.reshape(-1, *pairs.shape[2:]), path, 8)

def append_log(path, row):
    """A row of a csv log, under the header the file already has (or the row's own)."""
    fields = list(row)
    if os.path.exists(path):
        with open(path) as f:
            fields = next(csv.reader(f), None) or fields  # an empty file takes the row's
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if f.tell() == 0:
            w.writeheader()
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})

def trim_log(path, key, last, flip=None):
    """A csv log rewritten (never deleted first) to its whole rows with `key` <= last; flip=K: renumber."""
    if not os.path.exists(path):
        return
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if None not in r.values() and int(r[key]) <= last]  # none torn
        header = reader.fieldnames  # None: the file is empty (its run stopped while creating it)
    text = io.StringIO()
    if header:
        out = csv.writer(text)
        out.writerow([renumber(c, flip) for c in header])
        out.writerows(r.values() for r in rows)
    write_atomic(path, lambda f: f.write(text.getvalue().encode()))

def renumber(column, flip):
    """err_d0 -> err_dK for flip=K (a log from before the paper's numbering); other columns as they are."""
    name = column.rstrip("0123456789")
    return column if flip is None or name == column else f"{name}{flip - int(column[len(name):])}"

@dataclass
class Log:
    step: int      # where the progress line's rate counts from: a step and the time it was done
    time: float
    sums: dict = field(default_factory=dict)  # each statistic summed over the steps since the last row
    count: int = 0

def log_step(run, log, stats, epoch, i, n_steps):
    """Every --log-every steps and at the epoch's end, the averages since the last row into log.csv (rank 0)
    and the progress line. A NaN stops training and keeps the last good checkpoint."""
    for name, v in stats.items():
        log.sums[name] = log.sums.get(name, 0) + v
    log.count += 1
    if run.step % run.args.log_every and i < n_steps - 1:
        return
    args = run.args
    row = {"step": run.step, "epoch": epoch, "lr": run.lr, "momentum": run.momentum}
    per = {name: float(v) / log.count for name, v in log.sums.items()}  # one host sync per log row
    log.sums, log.count = {}, 0
    for m in ("err_d", "err_g", "d_x", "d_gz"):  # the mean over levels, for the progress line
        row[m] = sum(per[f"{m}{k}"] for k in run.levels) / len(run.levels)
    row.update(per)
    if not all(math.isfinite(v) for v in row.values()):
        diverged(run, f"the losses became NaN/inf at step {run.step}")
    if run.rank == 0:
        append_log(os.path.join(args.outf, "log.csv"), row)
        rate = (run.step - log.step) * args.batch_size * run.world / (time.time() - log.time)
        eta = ((args.epochs - epoch) * n_steps + n_steps - i - 1) * args.batch_size * run.world / rate
        eta = f"{eta / 60:.0f}m" if eta >= 60 else f"{eta:.0f}s"
        print(f"[e {epoch}/{args.epochs} it {i + 1}/{n_steps}] D {row['err_d']:.2f} G {row['err_g']:.2f} "
              f"D(x) {row['d_x']:.2f} D(G(z)) {row['d_gz']:.2f} | {rate:.0f} img/s | ETA {eta}")

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
    write_atomic(png_path, lambda f: img.save(f, "PNG"))

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
    img = Image.fromarray(grid.squeeze(-1) if c == 1 else grid)
    write_atomic(path, lambda f: img.save(f, "PNG"))

def save_npz(path, images, y):
    """--npz: uint8 N x H x W x C images, and the class asked for each (conditional models)."""
    asked = {} if y is None else {"labels": y.cpu().numpy()}
    write_atomic(path, lambda f: np.savez(f, images=images, **asked))

def level_sheet(chain, run):
    """Each sample's levels side by side, coarse to fine, enlarged (nearest). chain: [I_0, ..., I_K]."""
    big = [F.interpolate(x, chain[0].shape[-2:], mode="nearest") for x in reversed(chain)]
    return to_display(torch.stack(big, 1).flatten(0, 1), run.mean, run.std)

# Setting up a run: the networks on the device, their optimisers, data parallelism
def setup_run(args, device, data, rank=0, world=1):
    """-> a Run for in-memory data (uint8 images N x C x H x W, int64 labels N or None, class names)."""
    images, labels, classes = data
    sizes, ncls = pyramid_sizes(args, images.shape[-1]), len(classes) if args.conditional else 0
    K = len(sizes) - 1
    for name in PER_LEVEL:  # each holds one value or one per level (K + 1)
        value = getattr(args, name)
        if isinstance(value, list) and len(value) not in (1, K + 1):
            flag = "--" + name.replace("_", "-")
            fail(f"{flag} gives {len(value)} values for {K + 1} levels; give one, or one per level, level 0 "
                 f"(the finest) first, e.g. {flag} {','.join(['1'] * (K + 1))}")
    if args.level is not None and not 0 <= args.level <= K:
        fail(f"--level {args.level} is out of range; this pyramid has levels 0..{K} (0 the full image, {K} "
             f"the base)")
    if args.level is not None and args.level < K and at_level(args.gen_coarse, args.level):
        fail(f"--gen-coarse draws level {args.level}'s coarse images with the coarser levels, which --level "
             f"{args.level} leaves out; drop --level (train all levels at once) or give --gen-coarse 0")
    if len(images) < args.batch_size * world:
        fail(f"only {len(images)} training images, fewer than one batch of --batch-size {args.batch_size}"
             f"{f' on each of {world} ranks' if world > 1 else ''}; lower --batch-size or add images")
    ks = range(K, -1, -1) if args.level is None else [args.level]  # the base first, as sampling runs
    mean, std = channel_stats(images)
    nc = images.shape[1]
    levels = {k: prepare_level(args, k, sizes, nc, ncls, device, rank, world, (mean, std)) for k in ks}
    torch.manual_seed(args.seed + rank)
    labels = torch.zeros(len(images), dtype=torch.long) if labels is None else labels
    balance = balance_over_ranks if args.balance else None
    return Run(sizes, ncls, mean.to(device), std.to(device), classes, images.to(device), labels.to(device),
               args, levels, balance, rank, world, lr=args.lr, momentum=args.momentum)

def prepare_level(args, k, sizes, nc, ncls, device, rank, world, stats=None):
    """Level k's nets on the device, their optimisers, and the one place that wraps the forward passes the
    step calls: DistributedDataParallel under torchrun, torch.compile (--compile), bf16 (--amp on CUDA).
    G's step calls D itself: only G's gradients are wanted there, so only they are computed and reduced.
    stats: the training split's (mean, std) for --tanh-base's ToData; None leaves 0 and 1 (to be loaded)."""
    K = len(sizes) - 1  # level k starts from the same weights, alone or not; seeded from the base up
    torch.manual_seed(args.seed + 1000 * (K - k))
    G, D = build_level(vars(args), k, sizes, nc, ncls)
    for m in G.modules():
        if isinstance(m, ToData) and stats is not None:
            m.mean.copy_(stats[0].view(-1, 1, 1))
            m.std.copy_(stats[1].view(-1, 1, 1))
    G, D = G.to(device), D.to(device)
    fwd = [G, D, D]  # Level's G_fwd, D_fwd, D_fwd_for_G
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        fwd[:2] = [nn.parallel.DistributedDataParallel(m, device_ids=ids) for m in (G, D)]
    if args.compile:
        fwd = [torch.compile(f) for f in fwd]
    if args.amp and device.type == "cuda":
        fwd = [in_bf16(f) for f in fwd]
    if rank == 0:  # the Eyescream rule of thumb: D with about 0.5 (or 0.125) of G's parameters
        ng, nd = (sum(p.numel() for p in m.parameters()) for m in (G, D))
        print(f"level {k}: G {ng:,} parameters, D {nd:,}, D/G = {nd / ng:.3f}")
    G_avg, beta = None, at_level(args.ema, k)
    if beta:  # --ema: a copy of G_k whose weights follow G_k's average (average_weights)
        G_avg = copy.deepcopy(G).eval().requires_grad_(False)
    opt_G = optimiser(G, args, level_lr(args.lr_g, k, args.lr))
    opt_D = optimiser(D, args, level_lr(args.lr_d, k, args.lr))
    share = at_level(args.gen_coarse, k) if k < K else 0.0  # --gen-coarse: the base has no coarser level
    steps = at_level(args.level_steps, k)
    return Level(k, G, D, *fwd, opt_G, opt_D, steps, G_avg, beta, share)

def in_bf16(f):
    """--amp on CUDA: f's forward pass under bf16 autocast, its output back in fp32 for the losses."""
    def forward(*inputs):
        with torch.autocast("cuda", torch.bfloat16):
            return f(*inputs).float()
    return forward

def balance_over_ranks(err_real, err_fake):
    """--balance on D's errors averaged over the ranks, so that every rank takes the same branch."""
    t = torch.stack([err_real.detach().float(), err_fake.detach().float()])
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return balance_rule(*t.tolist())

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

def level_lr(rates, k, lr):
    """Level k's learning rate from --lr-g or --lr-d (one number or one per level), else --lr."""
    return at_level(rates, k) or lr

def at_level(value, k):
    """Level k's value of a PER_LEVEL flag: one number (a default, an older checkpoint's) or a list."""
    if not isinstance(value, list):
        return value
    return value[0] if len(value) == 1 else value[k]

def level_values(kind):
    """The argparse type of a PER_LEVEL flag: '16' or '16,32,64' (level 0, the finest, first) -> a list."""
    def parse(text):
        return [kind(v) for v in text.split(",")]
    parse.__name__ = kind.__name__  # argparse's message: "invalid int value: ..."
    return parse

# Command line. Every numeric flag: its type, default, valid interval ("[" closed, "(" open, inf: none) and
# help; get_args checks them all in one loop before anything is allocated (NaN and inf fail too).
NUMBERS = {
    "image_size": (int, None, "[1, 1024]", "native size unless given; 64 for folder"),
    "limit": (int, None, "[1, inf)", "use only the first N training images"),
    "level": (int, None, "[0, 16]", "train level K alone (0: the full image; the base: levels - 1)"),
    "width_g": (int, 128, "[1, 4096]", "G_k feature maps: 128 (paper's models) or 64 (code)"),
    "width_d": (int, 64, "[1, 4096]", "D_k feature maps"),
    "dropout_d": (float, 0.5, "[0, 1)", "D's dropout (the paper's 0.5)"),
    "level_steps": (int, 1, "[1, 64]", "updates of each level per training step (the paper: 1)"),
    "ema": (float, 0.0, "[0, 1)", "G's weights averaged with this decay for sampling (0: off)"),
    "bn_d": (int, 0, "[0, 1]", "batch norm in the conv D_k, as DCGAN's D: 1 on, 0 off (the paper)"),
    "gen_coarse": (float, 0.0, "[0, 1]", "share of G_k's coarse images drawn by the coarser G (0: real)"),
    "nz": (int, 100, "[1, 4096]", "noise size at the base"),
    "epochs": (int, 25, "[1, 100000]", "epochs to train"),
    "batch_size": (int, 128, "[2, 65536]", "even: half real for D"),
    "lr": (float, None, "(0, 10]", "learning rate (default 0.02; --model large: 0.01)"),
    "lr_g": (float, None, "(0, 10]", "G's learning rate (default: --lr)"),
    "lr_d": (float, None, "(0, 10]", "D's learning rate (default: --lr)"),
    "momentum": (float, None, "[0, 1)", "initial momentum (0.5; --model large: 0), +0.0008/epoch"),
    "select": (int, 200, "[0, inf)", "validation images for model selection (0: off)"),
    "seed": (int, 1, "[0, 4294967295]", "everything is seeded from it"),
    "log_every": (int, 100, "[1, inf)", "steps between log rows and progress lines"),
    "workers": (int, 4, "[0, 256]", "threads decoding a folder of images"),
    "n": (int, 64, "[1, inf)", "samples (checked against free memory and disk)"),
    "label": (int, None, "[0, inf)", "the class to sample"),
    "resample": (int, 0, "[0, 64]", "N samples from each of 8 real coarse images"),
    "upscale": (int, 0, "[0, 5]", "run the finest G N more times past its size"),
    "truncate": (float, None, "(0, 1]", "samples' z_K from U[-T, T] (default: the run's, else 1: U[-1, 1])"),
    "switch": (int, None, "[0, 16]", "the coarsest level B draws (default K - 1: A draws the base)"),
    "eval_images": (int, 1000, "[1, inf)", "held-out test images to score"),
    "eval_samples": (int, 10000, "[1, inf)", "samples for the base level's Parzen window"),
    "eval_cond": (int, 100, "[1, inf)", "samples per test image at each residual level")}
# the flags that take one value or one per level
PER_LEVEL = ["width_g", "width_d", "dropout_d", "lr_g", "lr_d", "level_steps", "ema", "bn_d", "gen_coarse"]
TEST_SPLIT = {"cifar10": 10000, "mnist": 10000, "fashion-mnist": 10000, "shapes": 2000}  # images
# --recipe cpu: the set-up command's flags (README: "LAPGAN against the DCGAN"), level 0 first in lists
RECIPES = {"cpu": {"conditional": True, "levels": "14,28", "base": "conv", "tanh_base": True, "bn_g": True,
                   "bn_d": [0, 1], "width_g": [16, 32], "width_d": [32, 64], "dropout_d": [0.5, 0.0],
                   "ema": [0.995, 0.99], "gen_coarse": [0.5, 0], "level_steps": [1, 4], "optim": "adam",
                   "lr": 0.0002, "lr_g": [0.0002, 0.0008], "lr_d": [0.001, 0.0008], "batch_size": 32,
                   "limit": 16000, "epochs": 2, "select": 20, "truncate": 0.85}}
SHAPES_MAX = 128  # --image-size for shapes: 10,000 images are drawn in float64 chunks of 1,000

def make_parser():
    p = argparse.ArgumentParser(description="LAPGAN: a Laplacian pyramid of GANs (README.md lists the flags)")
    add = p.add_argument
    add("--dataset", choices=["cifar10", "mnist", "fashion-mnist", "folder", "shapes"])
    add("--dataroot", default="./data", help="where the data lives or is downloaded to")
    add("--channels", type=int, choices=[1, 3])
    add("--levels", help="pyramid sizes coarse to fine, as the paper writes them, e.g. 8,14,28")
    add("--model", choices=["small", "large"], default="small", help="large: the paper's LSUN nets")
    add("--optim", choices=["sgd", "adam"], default="sgd", help="adam (beta1 0.5): quick runs, not the paper")
    add("--balance", action="store_true", help="the LSUN code's rule: update D or G (or both)")
    add("--outf", help="output folder (out/lapgan-DATASET)")
    for switch in ("--conditional", "--resume", "--cuda", "--amp", "--compile", "--sample", "--eval"):
        add(switch, action="store_true")
    add("--ckpt", nargs="+", help="several join levels trained apart")
    add("--npz")
    add("--out", help="grid PNG (default: beside the checkpoint)")
    add("--chain", nargs=2, metavar=("A", "B"), help="coarse levels from A, --switch S and finer from B")
    add("--base", choices=["mlp", "conv"], default="mlp", help="G_K, D_K: the paper's MLPs or conv nets")
    add("--bn-g", action="store_true", help="batch norm in G_k above the base (the LSUN large model's)")
    add("--tanh-base", action="store_true", help="G_K ends in tanh to the pixel range, as DCGAN's G")
    add("--proj-d", action="store_true", help="D_k's projection term for the class (Miyato & Koyama 2018)")
    add("--recipe", choices=sorted(RECIPES), help="a named set of flags (typed flags win); cpu: README's")
    for name, (kind, default, _, text) in NUMBERS.items():
        if name in PER_LEVEL:  # a comma list, level 0 (the finest) first
            kind = level_values(kind)
        add("--" + name.replace("_", "-"), type=kind, default=default, help=text)
    return p

def typed_flags(argv=None):
    """The flags the user typed: argv parsed again with every default replaced by SUPPRESS."""
    p = make_parser()
    for action in p._actions:
        action.default = argparse.SUPPRESS
    return set(vars(p.parse_args(argv)))

def get_args(argv=None):
    """The user's flags; every number checked against NUMBERS before anything is allocated."""
    p = make_parser()
    args = p.parse_args(argv)
    if not (args.dataset or args.sample or (args.resume and args.outf)):
        p.error("--dataset is required for training (or give --resume --outf DIR, or --sample --ckpt FILE)")
    if args.sample and not (args.ckpt or args.chain):
        p.error("--sample needs --ckpt DIR/ckpt.pt (or --chain A.pt B.pt)")
    if args.recipe:
        apply_recipe(args, typed_flags(argv))
    for name, (_, _, interval, _) in NUMBERS.items():
        values = getattr(args, name)
        for v in values if isinstance(values, list) else [values]:  # PER_LEVEL flags hold lists
            check_number(name, v, interval)
    if args.batch_size % 2:
        fail(f"--batch-size {args.batch_size} must be even: D's batch is half real, half generated")
    if args.dataset == "shapes" and (args.image_size or 32) > SHAPES_MAX:
        fail(f"--image-size {args.image_size} is too large for shapes; at most {SHAPES_MAX}")
    test = TEST_SPLIT.get(args.dataset, math.inf)  # selection takes the last test images, --eval the first
    if args.select > test - args.eval_images:
        fail(f"--select {args.select} is more than the {test} test images of {args.dataset} less the "
             f"--eval-images {args.eval_images} that --eval scores; lower --select")
    if args.eval and args.chain:
        fail("--eval scores one model's pyramid; drop --chain (or --eval)")
    if max(np.atleast_1d(args.bn_d)) and args.model == "large" and args.base == "mlp":
        fail("--bn-d puts batch norm in the small model's conv D_k and --base conv's D_K; this pyramid has "
             "neither (--model large, the MLP base): drop --bn-d or add --base conv")
    large = args.model == "large"  # lsun/train.lua's lr and momentum for the large model
    if args.lr is None:
        args.lr = 0.01 if large else 0.02
    if args.momentum is None:
        args.momentum = 0.0 if large else 0.5
    args.outf = args.outf or os.path.join("out", f"{SCRIPT}-{args.dataset}")
    return args

def check_number(name, v, interval):
    if v is None:  # optional, not given
        return
    lo, hi = (float(s) for s in interval[1:-1].split(","))
    inside = lo < v < hi or (v == lo and interval[0] == "[") or (v == hi and interval[-1] == "]")
    if not (math.isfinite(v) and inside):  # NaN compares false with everything, so fails here too
        fail(f"--{name.replace('_', '-')} {v} is out of range; it must lie in {interval}")

def apply_recipe(args, typed):
    """--recipe NAME: its flags where not typed, printed; the run's checkpoint keeps them as flags."""
    chosen = {k: v for k, v in RECIPES[args.recipe].items() if k not in typed}
    vars(args).update(chosen)
    shown = " ".join(flag_text(k, v) for k, v in chosen.items())
    print(f"--recipe {args.recipe} sets: {shown}")

def flag_text(name, value):
    """A flag as it would be typed: --name, --name VALUE or --name 1,2,3."""
    flag = "--" + name.replace("_", "-")
    if isinstance(value, list):
        value = ",".join(map(str, value))
    return flag if value is True else f"{flag} {value}"

def main(argv=None):
    """Train (data-parallel under torchrun) or sample. Ctrl-C ends in one line: what is kept, how to go on."""
    args, run, lock = get_args(argv), None, None
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    try:
        if args.sample:
            return sample(args)
        device = pick_device(args, int(os.environ.get("LOCAL_RANK", 0)))
        if world > 1:  # launched by torchrun: one process per GPU (or CPU worker)
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if rank == 0:
            prepare_output(args.outf)
            lock = lock_run(args.outf)
        run = start_run(args, typed_flags(argv), device, rank, world)
        return train(run)
    except KeyboardInterrupt:
        print(interrupted(args, run, argv), file=sys.stderr)
        raise SystemExit(130)
    finally:
        if lock:
            os.remove(lock)
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()

def interrupted(args, run, argv):
    """Ctrl-C's one line: where it stopped, which checkpoint is kept, the command that goes on."""
    argv = sys.argv[1:] if argv is None else argv
    again = shlex.join(["python3", "lapgan.py", *argv])
    if args.sample:
        return f"interrupted; files already written are whole; to sample again: {again}"
    where = f"at step {run.step} in epoch {run.epoch + 1}" if run else "before training began"
    path = os.path.join(args.outf, "ckpt.pt")
    if not os.path.exists(path):
        if run:
            forget_run_files(run)
        return f"interrupted {where}; no checkpoint was written yet; to start again: {again}"
    epoch = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"]
    flags = [shlex.join(["--resume", "--outf", args.outf])]  # and this machine's flags as typed
    flags += [flag_text(k, getattr(args, k)) for k in sorted(set(MACHINE) & typed_flags(argv))]
    go_on = " ".join(flags)
    return f"interrupted {where}; {path} (epoch {epoch}) is kept; to continue: python3 lapgan.py {go_on}"

if __name__ == "__main__":
    main()
