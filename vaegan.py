"""vaegan.py: the VAE/GAN of Larsen, Sønderby, Larochelle & Winther 2016, "Autoencoding beyond pixels
using a learned similarity metric" (ICML), first shown in the "Generating Faces with Torch" post.

A VAE encodes x to q(z | x) = N(mu, sigma^2) and decodes a sample z to x~; the decoder is also a GAN's
generator. The VAE's pixel error is replaced by the error of D's hidden features Dis_l (Sec. 2.3), so
the decoder learns to "look the same to D", not to "match every pixel", and a plain VAE's blur goes
away. Each network learns from its own row of this table (Alg. 1), the heart of the method:

    | into          | KL prior | reconstruction (Dis_l or pixels) | GAN                  |
    | encoder       | yes      | yes                              | no                   |
    | decoder       | no       | weighted by gamma                | yes (generator side) |
    | discriminator | no       | no                               | yes                  |

Paper (and its code, andersbll/autoencoding_beyond_pixels) to code:
    Sec. 2.1  the VAE: q(z | x), z = mu + sigma eps, KL     posterior, reparameterise, kl_divergence
    Sec. 2.3  Dis_l, the learned similarity, weight gamma    recon_error, disl_depth, default_gamma
    Sec. 2.2-3 the GAN's losses on x, x~ and Dec(z)         forward_losses (--nonsat, --no-fake-recon)
    Alg. 1    which loss updates which network              network_losses, routed_grads, train_step
    code      the equilibrium rule (0.68 +- 0.35)            equilibrium_rule (--equilibrium, --margin)
    Sec. 4    the 64 px (CelebA) and 32 px (CIFAR) nets     make_encoder, make_decoder, make_discriminator
    code      RMSProp, annealed lr, weight decay             make_optimizer, annealed_lr
    Sec. 5    visual attribute vectors                       attribute_vector (--attribute K)

Deviations (also in README.md):
- Losses are summed over features and averaged over the batch (the code summed over the batch too). A
  common factor changes nothing under RMSProp but weight decay: deeppy adds 2 wd W to the gradient of
  the summed loss, so ours adds 2 wd W / B; the mu/log sigma^2 layer has no decay, as in the code.
- `--recon pixel` with the GAN: gamma 2e-4 by default, the faces code's 1e-4 in our units.
- D outputs a logit (BCE with logits, without the code's clip); the decoder's GAN term lacks the code's
  (1 - w) factor; reconstructions and prior samples share one decoder batch (one set of BN statistics).
- At 32 px D's 3rd conv and the decoder's first deconv have 256 filters (the code's CIFAR nets: 192).
- PyTorch's default init (deeppy's is sqrt(3) narrower); pictures decode the posterior mean; under
  torchrun the gradients are all-reduced by hand (autograd.grad does not fire DDP's hooks).
- No --conditional or --label: the paper's model is unconditional; labels serve attribute vectors.

    python vaegan.py --dataset fashion-mnist --dataroot /usr/share/datasets/fashion-mnist
    python vaegan.py --dataset fashion-mnist --recon pixel --no-gan --outf out/vae-fashion-mnist
    python vaegan.py --sample --ckpt out/vaegan-fashion-mnist/ckpt.pt --recon-grid --attribute 1
"""
import argparse, contextlib, csv, errno, functools, gzip, hashlib, io, math, os, pickle
import shlex, shutil, sys, tarfile, time, zlib
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageOps

SCRIPT = "vaegan"

# ----------------------------------------------------------------------------- the VAE (Sec. 2.1)
def posterior(E, x):
    """q(z | x) = N(mu, diag sigma^2). The encoder's last layer gives mu and log sigma^2 side by side
    (the code's two heads as one layer): x B x C x H x W -> mu, logvar, B x nz each."""
    return E(x).chunk(2, 1)

def reparameterise(mu, logvar, eps):
    """z = mu + sigma * eps (Kingma & Welling 2014): a sample that is differentiable in mu and sigma."""
    return mu + torch.exp(0.5 * logvar) * eps

def kl_divergence(mu, logvar):
    """The prior's term, KL(N(mu, sigma^2) || N(0, I)) = -1/2 sum(1 + log sigma^2 - mu^2 - sigma^2),
    per image (Kingma & Welling 2014, Appendix B)."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)

def recon_error(a, b):
    """Gaussian negative log-likelihood with sigma 1, up to a constant: 1/2 ||a - b||^2 per image. On
    pixels it is the VAE's error; on Dis_l features it is the learned similarity (Sec. 2.3, Eq. 5)."""
    return 0.5 * (a - b).pow(2).flatten(1).sum(1)

# ------------------------------------------------------------------------- Dis_l and the GAN (Sec. 2.2-2.3)
def disl_depth(size):
    """Which of D's convs gives Dis_l: the code's CelebA model (64 px) took the 4th, its CIFAR model
    (32 px) the 3rd, 8 x 8 features both; smaller images follow the CIFAR setting."""
    return 4 if size >= 64 else 3

def default_gamma(recon, no_gan, size):
    """The decoder's weight on the reconstruction error (the paper's gamma, the code's w), in our units.
    Dis_l: the code's 1e-6 at 64 px and 1e-5 at 32 px. Its losses were batch sums where both of our
    decoder's terms are batch means, 1/B of them, so w carries over unchanged.
    Pixels with the GAN: the faces code scaled the decoder's gradient of the batch-summed squared error
    sum_i ||x~_i - x_i||^2 by 1e-4. Ours, times B, is gamma sum_i 1/2 ||x~_i - x_i||^2: equal when
    gamma / 2 = 1e-4, so 2e-4. A plain VAE has no GAN term; its gamma is 1 / sigma^2 of a Gaussian on
    pixels in [-1, 1], and the code's sigma 1 by default."""
    if recon == "pixel" and no_gan:
        return 1.0
    if recon == "pixel":
        return 2e-4
    if size >= 64:
        return 1e-6
    return 1e-5

def bce(logits, target, reduction="mean"):
    """-log D(x) (target 1) or -log(1 - D(x)) (target 0), from D's logits."""
    targets = torch.full_like(logits, target)
    return F.binary_cross_entropy_with_logits(logits, targets, reduction=reduction)

def forward_losses(net, args, x):
    """The single forward pass of a step -> every loss term as a batch mean. net: the networks as the
    Appendix prepares them (`Forward`: E, Dec, D, and Dfeat, D up to Dis_l); x: B x C x H x W in [-1, 1]."""
    B = x.shape[0]
    mu, logvar = posterior(net.E, x)
    z = reparameterise(mu, logvar, torch.randn_like(mu))
    if not args.no_gan:  # Sec. 2.3: fakes also decoded from the prior, in the same decoder batch
        z_p = torch.randn_like(mu)
        z = torch.cat([z, z_p])  # 2B x nz
    x_all = net.Dec(z)  # one batch, so BN's running statistics (used for pictures) match training
    x_tilde = x_all[:B]
    x_p = x_all[B:]
    out = {"kl": kl_divergence(mu, logvar).mean()}
    if args.recon == "disl":  # Sec. 2.3: both through D's first layers; the real features a fixed target
        feats = net.Dfeat(torch.cat([x_tilde, x]))  # 2B x C' x H' x W'
        target = feats[B:].detach()
        out["recon"] = recon_error(feats[:B], target).mean()
    else:
        out["recon"] = recon_error(x_tilde, x).mean()
    if args.no_gan:
        return out
    return {**out, **gan_losses(net.D, args, x, x_tilde, x_p)}

def gan_losses(D, args, x, x_tilde, x_p):
    """Sec. 2.2 and Alg. 1: D's costs on the reals and the fakes, and the decoder's GAN term."""
    B = x.shape[0]
    fakes = x_p
    if args.fake_recon:  # Alg. 1, the code: the reconstructions x~ are fakes too, next to Dec(z)
        fakes = torch.cat([x_tilde, x_p])
    logits = D(torch.cat([x, fakes]))  # one D batch of reals and fakes, as the code
    real = logits[:B]
    fake = logits[B:]
    err_real = bce(real, 1.0)
    err_fake = bce(fake, 0.0)
    # Alg. 1: the decoder maximises L_GAN, i.e. minimises log(1 - D(Dec(z))) summed over its fakes;
    # --nonsat: -log D(Dec(z)) instead, whose gradient does not vanish while D wins.
    if args.nonsat:
        gan_g = bce(fake, 1.0, "sum") / B
    else:
        gan_g = -bce(fake, 0.0, "sum") / B
    return {"err_real": err_real,
            "err_fake": err_fake,
            "gan_d": 0.5 * (err_real + err_fake),  # the code weighs reals and fakes 1/2 each
            "gan_g": gan_g,
            "d_x": torch.sigmoid(real).mean(),
            "d_gz": torch.sigmoid(fake).mean()}

# --------------------------------------------------------------------- Alg. 1: which loss trains which net
def network_losses(out, args):
    """Each network's own row of the table in the module docstring."""
    kl = out["kl"]
    recon = out["recon"]
    if args.no_gan:  # gamma = 1 / sigma^2 of the pixel likelihood: the error's weight against the KL term
        return {"E": kl + args.gamma * recon, "Dec": args.gamma * recon}
    return {"E": kl + recon,
            "Dec": args.gamma * recon + out["gan_g"],
            "D": out["gan_d"]}

def routed_grads(run, x):
    """One forward pass, then each network's gradient of exactly its own loss: autograd.grad with that
    network's parameters as explicit inputs. A backward() of the sum would leak the GAN gradient into
    the encoder and the reconstruction gradient into D; the three share one graph, hence retain_graph."""
    out = forward_losses(run.fwd, run.args, x)
    losses = network_losses(out, run.args)
    last = list(losses)[-1]
    grads = {}
    for k, loss in losses.items():
        params = list(run.nets[k].parameters())
        grads[k] = torch.autograd.grad(loss, params, retain_graph=k != last)
    return out, grads

def equilibrium_rule(err_real, err_fake, equilibrium=0.68, margin=0.35):
    """The paper's code: D skips its step when too good (a cost below eq - margin), the decoder when too
    bad (a D cost above eq + margin); both step if both would skip. -> (update_d, update_dec). Candidly:
    D's cost on reals moves only with D's own steps (and BN's batch statistics), so once it is below eq -
    margin D seldom steps again (README's VAE/GAN run: 32 of 1,560 steps, log.csv's upd_d)."""
    if margin < 0:
        return True, True
    low = equilibrium - margin
    high = equilibrium + margin
    update_d = not (err_real < low or err_fake < low)
    update_dec = not (err_real > high or err_fake > high)
    if not (update_d or update_dec):
        return True, True
    return update_d, update_dec

def train_step(run, x):
    """One real training step. Takes the Run and a batch x (float B x C x H x W in [-1, 1], on the
    device); returns the step's loss terms as tensors and the rule's decisions. All gradients come
    first, then the rule decides, then the optimisers step: every gradient is of the same weights."""
    args = run.args
    out, grads = routed_grads(run, x)
    update = {"E": True, "Dec": True, "D": not args.no_gan}
    if not args.no_gan:  # the rule needs D's two costs over the whole batch, as numbers
        err_real, err_fake = run.fwd.batch_mean(out["err_real"], out["err_fake"])
        update["D"], update["Dec"] = equilibrium_rule(err_real, err_fake, args.equilibrium, args.margin)
    for k, gs in grads.items():
        if not update[k]:  # the encoder always steps
            continue
        for p, g in zip(run.nets[k].parameters(), gs):
            p.grad = g
        run.opts[k].step()
    terms = {k: v.detach() for k, v in out.items()}
    terms["upd_d"] = float(update["D"])
    terms["upd_dec"] = float(update["Dec"])
    return terms

# ----------------------------------------------------------------------------- the networks (the code's nets)
def conv_bn(a, b, transposed=False):
    """conv5 stride 2, no bias (BN follows); BN momentum 0.1 is deeppy's 0.9 in PyTorch's convention."""
    if transposed:
        conv = nn.ConvTranspose2d(a, b, 5, 2, 2, output_padding=1, bias=False)
    else:
        conv = nn.Conv2d(a, b, 5, 2, 2, bias=False)
    return [conv, nn.BatchNorm2d(b, eps=1e-6), nn.ReLU(True)]

def fc_bn(a, b):
    return [nn.Linear(a, b, bias=False),
            nn.BatchNorm1d(b, eps=1e-6),
            nn.ReLU(True)]

def make_encoder(nc, size, nz, w):
    """conv 64 -> 128 -> 256 (stride 2, BN, ReLU), FC 1024 (BN, ReLU), then mu and log sigma^2."""
    s = -(-size // 8)  # side after three stride-2 'same' convs: 64 -> 8, 32 -> 4, 28 -> 4
    return nn.Sequential(*conv_bn(nc, w),
                         *conv_bn(w, 2 * w),
                         *conv_bn(2 * w, 4 * w),
                         nn.Flatten(),
                         *fc_bn(4 * w * s * s, 16 * w),
                         nn.Linear(16 * w, 2 * nz))

def make_decoder(nc, size, nz, w):
    """FC to 256 x s0 x s0 (BN, ReLU), deconv5/2 to 256, 128, 32 (BN, ReLU), conv5 to C, tanh.
    Depth follows the size, s0 * 2^n with up to three doublings: 64 = 8 * 8, 32 = 4 * 8, 28 = 7 * 4."""
    s0, n = size, 0
    while n < 3 and s0 % 2 == 0 and s0 >= 8:
        s0, n = s0 // 2, n + 1
    if n < 2:
        fail(f"--image-size {size} does not fit; use s*2^n with n >= 2 and s >= 4, e.g. 28, 32 or 64")
    widths = [4 * w, 4 * w, 2 * w, w // 2]  # the code's 256, 256, 128, 32 at width 64
    widths = widths[:1] + widths[-n:]  # the fc's width, then one per deconv: the last n
    layers = [*fc_bn(nz, 4 * w * s0 * s0),
              nn.Unflatten(1, (4 * w, s0, s0))]  # B x nz -> B x 4w x s0 x s0
    for a, b in zip(widths, widths[1:]):
        layers += conv_bn(a, b, transposed=True)
    to_image = nn.Conv2d(widths[-1], nc, 5, 1, 2)
    return nn.Sequential(*layers, to_image, nn.Tanh())

def make_discriminator(nc, size, w):
    """conv5 32 + ReLU, conv5/2 128, 256 and 256 (BN, ReLU), FC 512 (BN, ReLU), FC 1 (a logit).
    D[0] ends at the raw output of the conv that gives Dis_l (`disl_depth`), D[1] is the rest."""
    s = -(-size // 8)
    convs = [[nn.Conv2d(nc, w // 2, 5, 1, 2), nn.ReLU(True)],
             conv_bn(w // 2, 2 * w),
             conv_bn(2 * w, 4 * w),
             conv_bn(4 * w, 4 * w)]
    k = disl_depth(size)
    first = [m for conv in convs[:k - 1] for m in conv]
    first.append(convs[k - 1][0])  # just after the k-th conv, before its BN: Dis_l
    rest = convs[k - 1][1:] + [m for conv in convs[k:] for m in conv]
    head = [nn.Flatten(),
            *fc_bn(4 * w * s * s, 8 * w),
            nn.Linear(8 * w, 1),
            nn.Flatten(0)]  # B logits
    return nn.Sequential(nn.Sequential(*first), nn.Sequential(*rest, *head))

def build_nets(args, nc, size):
    """{"E", "Dec", "D"} (no D for a plain VAE), seeded so that every data-parallel rank starts alike."""
    if args.no_gan and args.recon == "disl":
        fail("--recon disl needs the discriminator's features; drop --no-gan or add --recon pixel")
    torch.manual_seed(args.seed)
    nets = {"E": make_encoder(nc, size, args.nz, args.width),
            "Dec": make_decoder(nc, size, args.nz, args.width)}
    if not args.no_gan:
        nets["D"] = make_discriminator(nc, size, args.width)
    return nets

# ----------------------------------------------------------------------------- the schedule (the code's)
def make_optimizer(net, args, head=None):
    """RMSProp (decay 0.9) as the code. Weight decay as deeppy's: it adds 2 wd W to the gradient of a
    batch-summed loss; ours are batch means (1/B of it), so 2 wd / B. Only on conv/linear weights, and
    not on `head` (the encoder's mu/log sigma^2 layer), which the code built without a decay."""
    layers = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
    decays = [m for m in net.modules() if isinstance(m, layers) and m is not head]
    wd = {id(m.weight) for m in decays}
    decayed = [p for p in net.parameters() if id(p) in wd]
    others = [p for p in net.parameters() if id(p) not in wd]
    decay = 2 * args.weight_decay / args.batch_size
    groups = [{"params": decayed, "weight_decay": decay},
              {"params": others, "weight_decay": 0.0}]
    return torch.optim.RMSprop(groups, args.lr, alpha=0.9, eps=1e-8)

def annealed_lr(args, epoch):
    """The code's GammaAnnealer: lr0 - (e / E)^0.75 (lr0 - lr_end), set once per epoch (e from 0)."""
    progress = (epoch - 1) / args.epochs
    return args.lr - progress ** args.lr_power * (args.lr - args.lr_end)

# ----------------------------------------------------------------------------- attribute vectors (Sec. 5)
@torch.no_grad()
def encode(E, x, batch=500):
    """uint8 images -> posterior means mu (the code's embedding), in batches."""
    mus = []
    for i in range(0, len(x), batch):
        mu, _ = posterior(E, to_float(x[i:i + batch]))
        mus.append(mu)
    return torch.cat(mus)

@torch.no_grad()
def decode(Dec, z, batch=500):
    chunks = z.split(batch)
    return torch.cat([Dec(chunk) for chunk in chunks])

def attribute_vector(E, targs, k, device, n=10000):
    """The mean latent of the images with attribute (here: class) k minus the mean of those without;
    adding it to an image's latent adds the attribute."""
    x, y, classes = load_dataset(targs, "train")
    if not 0 <= k < len(classes):
        fail(f"--attribute {k} is out of range; this dataset has classes 0..{len(classes) - 1}")
    on = (y[:n] == k).to(device)
    z = encode(E, x[:n].to(device))  # N x nz
    if on.all() or not on.any():
        fail(f"--attribute {k}: the first {n} training images must hold class {k} and other classes")
    return z[on].mean(0) - z[~on].mean(0)

# --------------------------------------------------------------------- latent tools (interpolation, a walk)
def slerp(a, b, t):
    """Spherical interpolation (White 2016) of direction, linear in norm: Gaussian latents live near a
    sphere, and a straight line between two of them cuts through the unlikely low-norm interior."""
    na, nb = a.norm(), b.norm()
    ua, ub = a / na, b / nb
    c = ua @ ub  # cos(omega)
    v = ub - c * ua  # the direction from a towards b on the sphere; |v| = sin(omega)
    s = v.norm()
    omega = torch.atan2(s, c)  # not acos: acos of a float32 cosine rounded to 0.99999994 is 3e-4, not 0
    if s < 1e-5 and c > 0:  # parallel: the arc is a point, so the path is the line between the norms
        return a + (b - a) * t[:, None]
    if s < 1e-5:  # antipodal: every great circle joins them; take one through a basis vector, angle pi
        e = torch.zeros_like(a)
        e[ua.abs().argmin()] = 1
        v = e - (ua @ e) * ua
        omega = torch.tensor(math.pi, dtype=a.dtype, device=a.device)
    v = v / v.norm()
    angle = (omega * t)[:, None]
    path = ua * torch.cos(angle) + v * torch.sin(angle)  # unit vectors, a to b on the great circle
    norm = na + (nb - na) * t
    return path * norm[:, None]

def lerp(a, b, t):
    return a + (b - a) * t[:, None]

def walk(nz, frames, device, per_key=16):
    """A slow tour of latent space: 16 latents at a time, each slerping between random key points."""
    keys = torch.randn(frames // per_key + 2, 16, nz, device=device)
    t = torch.linspace(0, 1, per_key + 1, device=device)[:-1]
    path = []
    for k0, k1 in zip(keys, keys[1:]):
        paths = [slerp(a, b, t) for a, b in zip(k0, k1)]  # 16 of them, each per_key x nz
        path.append(torch.stack(paths, 1))
    return torch.cat(path)[:frames]  # frames x 16 x nz

# ----------------------------------------------------------------------------- the training loop
@dataclass
class Run:
    """A training run: what `train_step` reads and changes. The networks are called through `fwd`, which
    the Appendix prepares (compiled, in bf16, gradients shared between data-parallel ranks)."""
    args: argparse.Namespace  # the user's flags (the checkpoint's on --resume); never written to
    nets: dict  # "E", "Dec" and "D" (none for a plain VAE): the nn.Modules that are saved
    fwd: object  # the networks as the forward pass calls them (`Forward`, in the Appendix)
    opts: dict  # one RMSProp per network, so that each steps on its own gradient alone
    images: torch.Tensor  # the training set, uint8 N x C x H x W, on the device
    classes: list  # class names
    rank: int = 0  # this process in data-parallel training
    world: int = 1  # the number of processes
    epoch: int = 0  # epochs done
    step: int = 0  # training steps done
    logged_at: float = 0.0  # time.time() of the last log row, for the progress line's images/s

def setup_run(args, device, data, rank=0, world=1):
    """A Run for in-memory data (uint8 images N x C x H x W, int64 labels or None, class names)."""
    images, _, classes = data
    if len(images) < args.batch_size * world:
        fail(f"only {len(images)} training images, fewer than one batch of --batch-size {args.batch_size}; "
             "lower --batch-size or add images")
    nets = build_nets(args, images.shape[1], images.shape[-1])
    nets = {k: n.to(device) for k, n in nets.items()}
    torch.manual_seed(args.seed + rank)  # the same weights on every rank, but each rank its own noise
    opts = {}
    for k, n in nets.items():
        head = n[-1] if k == "E" else None  # the encoder's mu/log sigma^2 layer
        opts[k] = make_optimizer(n, args, head)
    fwd = prepare_forward(nets, opts, args, world)
    for k, n in nets.items():
        count = sum(p.numel() for p in n.parameters())
        print(f"{k}: {count:,} parameters")
    return Run(args, nets, fwd, opts, images.to(device), classes, rank, world)

def train(run):
    """--epochs epochs of `train_step` with the code's lr annealing; after each epoch, pictures from a
    fixed latent batch and a checkpoint (the Appendix's `end_of_epoch_files`)."""
    args = run.args
    gen = torch.Generator().manual_seed(args.seed)
    fixed_z = torch.randn(64, args.nz, generator=gen)
    fixed_z = fixed_z.to(run.images.device)
    run.logged_at = time.time()
    for epoch in range(run.epoch + 1, args.epochs + 1):
        for opt in run.opts.values():
            for group in opt.param_groups:
                group["lr"] = annealed_lr(args, epoch)
        train_epoch(run, epoch)
        run.epoch = epoch
        end_of_epoch_files(run, fixed_z)
    return run

def train_epoch(run, epoch):
    """One shuffled pass; the loss terms are summed on the device and logged every --log-every steps."""
    idx = batches(run, epoch)  # steps x batch indices
    sums, count = {}, 0
    for i, b in enumerate(idx):
        out = train_step(run, get_batch(run, b))
        run.step += 1
        count += 1
        sums = {k: sums.get(k, 0) + v for k, v in out.items()}  # no host sync per step
        if run.step % run.args.log_every == 0 or i == len(idx) - 1:
            means = {k: v / count for k, v in sums.items()}
            log_row(run, epoch, i + 1, len(idx), means)  # the Appendix: log.csv and a progress line
            sums, count = {}, 0

# ----------------------------------------------------------------------------- the sampling command
def sample(args):
    """Samples from the prior; with flags, reconstructions, interpolations, a walk, attribute vectors."""
    ckpt = load_checkpoint(args.ckpt)
    targs = argparse.Namespace(**ckpt["args"])
    device = pick_device(args)
    nets = build_nets(targs, *ckpt["image"])
    for k, n in nets.items():
        n.load_state_dict(ckpt[k])
        n.to(device).eval()  # BN with its running statistics
    E, Dec = nets["E"], nets["Dec"]
    out = args.out or os.path.join(os.path.dirname(args.ckpt), "samples.png")
    stem = os.path.splitext(out)[0]
    torch.manual_seed(args.seed)
    x = sample_prior(Dec, targs.nz, ckpt["image"], args.n, stem, device)
    save_grid(x, stem + ".png")
    if args.npz:
        write_atomic(args.npz, lambda f: np.savez(f, images=x))
    if args.recon_grid or args.interp or args.attribute is not None:
        real, y, _ = load_dataset(targs, "test")
        real = real.to(device)
        y = y.to(device)
    if args.recon_grid:
        sample_recon(E, Dec, real, y, args, stem)
    if args.interp:
        sample_interpolation(E, Dec, real, args, stem)
    if args.walk:
        latents = walk(targs.nz, args.walk, device)
        frames = [grid_image(decode(Dec, z), 4) for z in latents]
        save_gif(frames, stem + "_walk.gif")
    if args.attribute is not None:  # rows: test images of other classes, reconstructions, + the vector
        v = attribute_vector(E, targs, args.attribute, device)
        pick = real[y != args.attribute][:8]
        zp = encode(E, pick)
        recon = decode(Dec, zp)
        shifted = decode(Dec, zp + v)
        rows = torch.cat([to_float(pick), recon, shifted])
        save_grid(rows, stem + f"_attr{args.attribute}.png")
    print(f"wrote {stem}*" + (f" and {args.npz}" if args.npz else ""))

def sample_recon(E, Dec, real, y, args, stem):
    """Test images over their reconstructions; with --npz every test image's reconstruction, labelled
    with its class (for bench/quality.py)."""
    k = min(32, len(real)) // 8 * 8
    if k == 0:
        fail("--recon-grid needs 8 or more test images")
    x = to_float(real[:k])
    x_tilde = decode(Dec, encode(E, real[:k]))
    save_grid(pair_rows(x, x_tilde), stem + "_recon.png")
    if args.npz:
        images = to_uint8(decode(Dec, encode(E, real)))
        labels = y.cpu().numpy()
        rec = os.path.splitext(args.npz)[0] + "_recon.npz"
        write_atomic(rec, lambda f: np.savez(f, images=images, labels=labels))

def sample_interpolation(E, Dec, real, args, stem):
    """Rows: the latents of pairs of test images, with lerp or slerp between them."""
    t = torch.linspace(0, 1, args.steps, device=real.device)
    k = min(8, len(real) // 2)
    ends = encode(E, real[:2 * k]).view(k, 2, -1)
    between = slerp if args.interp == "slerp" else lerp
    zs = torch.cat([between(a, b, t) for a, b in ends])
    save_grid(decode(Dec, zs), stem + f"_{args.interp}.png", args.steps)

# ------------------------------------------------------------------------- Appendix: plumbing, not the paper
def fail(msg):
    raise SystemExit(f"error: {msg}")

# ----------------------------------------------------------------------------- output files and folders
def write_atomic(path, write):
    """Every file written: `write(f)` fills PATH.tmp, synced, renamed over PATH; a disk error: one line."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # a crash or a kill before this keeps the previous file
    except BaseException as e:
        with contextlib.suppress(OSError):  # on any exception
            os.remove(tmp)
        if not isinstance(e, (OSError, RuntimeError)):  # torch.save on a full disk: RuntimeError
            raise
        why = getattr(e, "strerror", None) or str(e).splitlines()[0]
        with contextlib.suppress(OSError):  # the free space tells a full disk from other errors
            full = shutil.disk_usage(os.path.dirname(tmp) or ".").free < 2 ** 20
            why = "no space left on device" if full or getattr(e, "errno", 0) == errno.ENOSPC else why
        fail(f"could not write {path} ({why}); any previous {os.path.basename(path)} is kept")

def prepare_output(folder):
    """Creates an output folder (--outf, or the folder of --npz or --out) and proves it writable."""
    probe = os.path.join(folder, f".probe-{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        os.close(os.open(probe, os.O_CREAT | os.O_WRONLY))
        os.remove(probe)
    except OSError as e:
        why = "a file is in the way" if isinstance(e, (FileExistsError, NotADirectoryError)) else e.strerror
        fail(f"cannot write into the folder {folder} ({why}); choose another")

def lock_run(outf):
    """OUTF/.lock holds this process's id for the run's life; a lock whose process is gone is taken over."""
    path = os.path.join(outf, ".lock")
    for _ in range(3):
        with contextlib.suppress(FileExistsError), open(path, "x") as f:  # O_CREAT | O_EXCL: one process wins
            f.write(str(os.getpid()))
            return path
        pid = lock_holder(path)
        if pid is None:  # the lock went between the two calls: try again
            continue
        if not pid.isdigit() or process_alive(int(pid)):
            fail(f"{outf} is in use by another run (process {pid or 'starting'}); wait for it to end, "
                 f"or choose another --outf (if no run uses it, delete {path})")
        with contextlib.suppress(FileNotFoundError):  # a stale lock: that process no longer exists
            os.remove(path)
    fail(f"could not take the lock {path}; try again")

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

def process_alive(pid):
    try:
        os.kill(pid, 0)
    except OverflowError:  # no process has so large an id
        return False
    except OSError as e:  # PermissionError: alive, another user's
        return not isinstance(e, ProcessLookupError)
    return True

def start_folder(args, ckpt):
    """The run folder, locked; a fresh run refuses a folder that holds a run (a ckpt.pt or a log.csv)."""
    prepare_output(args.outf)
    lock = lock_run(args.outf)
    log = os.path.join(args.outf, "log.csv")
    if not ckpt and os.path.exists(os.path.join(args.outf, "ckpt.pt")):
        os.remove(lock)
        fail(f"{args.outf} already holds a run; add --resume to continue it, or choose another --outf")
    if not ckpt and os.path.exists(log):  # a run that stopped before its first checkpoint
        os.remove(lock)
        fail(f"{args.outf} already holds a run's log.csv but no checkpoint to resume; delete {log} to start "
             "there again, or choose another --outf")
    return lock

# ----------------------------------------------------------------------------- data
# Each split is decoded once, whole: batches are then gathered by index on the device, no per-image Python.
NATIVE_SIZE = {"cifar10": 32, "mnist": 28, "fashion-mnist": 28, "folder": 64, "shapes": 32}
SHAPES_MAX_SIZE = 128  # shapes are drawn in float64 chunks of 1000 images: ~1 GB at 128 px
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a",  # the official files' checksums
    "data_batch_1": "c99cafc152244af753f735de768cd75f", "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751", "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb", "test_batch": "40351d587109b95175f43aff81a1287e"}
IDX_URLS = {"mnist": "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "fashion-mnist": "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"}
IDX_MD5 = {"mnist": ["f68b3c2dcbeaaa9fbdd348bbdeb94873", "d53e105ee54ea40749a09fcbcd1e9432",
                     "9fb629c4189551a2d022fa330f9573f3", "ec29112dd5afa0611ce80d1b7f02629c"],
           "fashion-mnist": ["8d4fb7e6c68d591d4c3dfef9ec88bf0d", "25c81989df183df01b3e8a0aad5dffbe",
                             "bef4ecab320f06d8554ea6380940ec79", "bb300cfdad3c16e7a12a480ee83cd310"]}
IDX_FILES = [f"{s}-{k}-ubyte.gz" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1")]
CLASSES = {"mnist": list("0123456789"), "shapes": "circle square triangle diamond cross ring".split(),
           "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                             "Sneaker", "Bag", "Ankle boot"],
           "cifar10": "airplane automobile bird cat deer dog frog horse ship truck".split()}
SYSTEM_DATA = "/usr/share/datasets"  # where Debian's dataset-fashion-mnist package puts its files
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".tif", ".tiff")
DECODER = 2  # decode_image's version, in the folder cache's key: a cache an older one wrote is not reused
DAMAGED = (OSError, EOFError, ValueError, KeyError, zlib.error, tarfile.TarError, pickle.UnpicklingError)
GREY_MODES = ("1", "L", "LA", "La")  # 1- and 8-bit grey; transparency drawn over black
COLOUR_MODES = ("P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")  # Pillow converts these to RGB
FULL_SCALE = (1.0, 255.0, 65535.0)  # the range of an integer or float image: [0, 1], 8 or 16 bits

def damaged(path, what):
    fail(f"{path} is damaged ({str(what).splitlines()[0]}); delete it to download it again, or replace it")

def check_split(x, y, ncls, path, rank=4):
    """After the CIFAR/IDX readers: images of `rank` (N x C x H x W), one label each, in 0..ncls-1."""
    if x.ndim != rank or y.ndim != 1:
        fail(f"{path} holds arrays of shapes {tuple(x.shape)} and {tuple(y.shape)}; images of rank {rank} "
             "and labels of rank 1 were expected: replace the file")
    if len(x) != len(y):
        fail(f"{path} holds {len(x)} images but {len(y)} labels; replace the shorter file")
    outside = y[(y < 0) | (y >= ncls)]
    if len(outside):
        fail(f"{path} holds the label {int(outside[0])}, outside the classes 0..{ncls - 1}; replace the file")

def find_or_download(candidates, target, url, md5):
    """The first of `candidates` that exists; else `url` downloaded to `target`, its md5 checked."""
    found = [c for c in candidates if os.path.exists(c)]
    if found:
        return found[0]
    prepare_output(os.path.dirname(target) or ".")
    print(f"downloading {url}")
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            data = r.read()
    except OSError as e:
        fail(f"could not download {url} ({e}); put {os.path.basename(target)} in {os.path.dirname(target)}")
    if hashlib.md5(data).hexdigest() != md5:
        fail(f"checksum mismatch for {url}; try again")
    write_atomic(target, lambda f: f.write(data))
    return target

def checked(path):
    """The bytes of a CIFAR-10 file whose md5 is the official one."""
    with open(path, "rb") as f:
        data = f.read()
    if hashlib.md5(data).hexdigest() != CIFAR_MD5[os.path.basename(path)]:
        fail(f"{path} does not match the official CIFAR-10 checksum; delete it to download it again")
    return data

class BatchUnpickler(pickle.Unpickler):
    """Only what the official batches hold: a crafted file's os.system (say) is refused, not run."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which no official batch holds")
        return super().find_class(module, name)

def read_cifar10(root, split):
    """The official tarball or its extracted folder, md5-checked before anything is unpickled."""
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    tar = os.path.join(root, "cifar-10-python.tar.gz")
    path = find_or_download([os.path.join(root, "cifar-10-batches-py"), tar], tar, CIFAR_URL,
                            CIFAR_MD5["cifar-10-python.tar.gz"])
    missing = [n for n in names if os.path.isdir(path) and not os.path.isfile(os.path.join(path, n))]
    if missing:
        fail(f"{path} lacks {', '.join(missing)}; put the whole extracted folder there, or the tarball")
    try:
        if os.path.isdir(path):
            blobs = [checked(os.path.join(path, n)) for n in names]
        else:
            with tarfile.open(fileobj=io.BytesIO(checked(path))) as t:
                blobs = [t.extractfile(f"cifar-10-batches-py/{n}").read() for n in names]
        batches = [BatchUnpickler(io.BytesIO(b), encoding="bytes").load() for b in blobs]
        x = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 32, 32)
        y = np.concatenate([b[b"labels"] for b in batches])
    except DAMAGED as e:
        damaged(path, f"no {e}" if isinstance(e, KeyError) else e)
    check_split(x, y, 10, path)
    return torch.from_numpy(x), torch.from_numpy(y).long(), CLASSES["cifar10"]

def read_idx(path):
    """IDX format (LeCun): 2 zero bytes, a type byte (0x08 = uint8), a rank byte, big-endian int32 sizes."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except DAMAGED as e:
        damaged(path, e)
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 8:
        fail(f"{path} is not a uint8 IDX file")
    start = 4 + 4 * data[3]
    dims = np.frombuffer(data[:start].ljust(start, b"\0"), ">i4", data[3], 4)
    if len(data) - start < np.prod(dims):
        damaged(path, f"{len(data) - start} bytes of data, its header gives {np.prod(dims)}")
    return np.frombuffer(data, np.uint8, np.prod(dims), start).reshape(dims)

def load_mnist(root, name, split):
    """MNIST and Fashion-MNIST: in DATAROOT, DATAROOT/NAME or a Debian dataset package, else downloaded."""
    dirs = (root, os.path.join(root, name), os.path.join(SYSTEM_DATA, name))
    found = [[os.path.join(d, f) for d in dirs for f in (IDX_FILES[i], IDX_FILES[i][:-3])] for i in range(4)]
    paths = [find_or_download(found[i], os.path.join(root, name, IDX_FILES[i]), IDX_URLS[name] + IDX_FILES[i],
                              IDX_MD5[name][i]) for i in ([0, 1] if split == "train" else [2, 3])]
    x, y = (read_idx(p) for p in paths)
    check_split(x, y, len(CLASSES[name]), " and ".join(paths), rank=3)
    return torch.from_numpy(x.copy())[:, None], torch.from_numpy(y.astype(np.int64)), CLASSES[name]

def decode_image(path, size, mode):
    """An image file -> uint8 H x W (grey) or H x W x 3: upright (EXIF), 8-bit, resized, cropped to `size`."""
    try:
        with Image.open(path) as im:
            im = eight_bit(ImageOps.exif_transpose(im), path)
            target = mode or ("L" if im.mode in GREY_MODES else "RGB")
            im = over_black(im).convert(target)
    except Exception as e:
        fail(f"cannot read image {path} ({type(e).__name__}); remove or replace the file")
    scale = size / min(im.size)  # the shorter side to `size`, the centre cropped: DCGAN's LSUN/CelebA steps
    im = im.resize([max(size, round(side * scale)) for side in im.size], Image.BICUBIC)
    left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))

def over_black(im):
    """Transparency drawn over black: dropping alpha would keep whatever colour a transparent pixel stores."""
    if im.mode not in ("LA", "La", "PA", "RGBA", "RGBa") and "transparency" not in im.info:
        return im
    black = Image.new("RGBA", im.size, (0, 0, 0, 255))
    return Image.alpha_composite(black, im.convert("RGBA"))

def eight_bit(im, path):
    """8-bit modes as they are; 16-bit, 32-bit and float grey scaled by their range; other modes refused."""
    if im.mode in GREY_MODES + COLOUR_MODES:
        return im
    if not (im.mode in ("I", "F") or im.mode.startswith("I;16")):
        fail(f"{path} has the image mode {im.mode}, which this reader does not map; save it as RGB or grey")
    a = np.nan_to_num(np.asarray(im, np.float64))  # Pillow's convert("L") would clip or truncate them
    full = [65535.0] if im.mode.startswith("I;16") else [s for s in FULL_SCALE if a.max() <= s]
    if full and a.min() >= 0:
        a = a / full[0] * 255
    else:  # negative, or beyond 16 bits: the image's own range
        a = (a - a.min()) / max(a.max() - a.min(), 1e-12) * 255
    return Image.fromarray(a.round().astype(np.uint8))

def image_files(root, outf=None):
    """The images under `root`, sorted; hidden entries, the run's own --outf and links to nothing skipped."""
    def unreadable(e):  # os.walk would skip the folder without a word
        fail(f"cannot read {e.filename} ({e.strerror}); fix its permissions or move it out of --dataroot")
    files = []
    for folder, dirs, names in os.walk(root, onerror=unreadable):  # folder links not followed: no loops
        if outf and os.path.realpath(folder) == os.path.realpath(outf):
            print(f"note: skipping {folder}: it is this run's --outf, not data")
            dirs.clear()
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # .thumbs/, .git/: not classes
        for name in sorted(n for n in names if n.lower().endswith(IMAGE_EXT) and not n.startswith(".")):
            path = os.path.join(folder, name)
            if os.path.islink(path) and not os.access(path, os.R_OK):
                print(f"note: skipping {path}: a link to nothing readable")
                continue
            files.append(path)
    return sorted(files)

def load_folder(root, size, channels, workers, outf=None):
    """A folder of images, classes from its top-level sub-folders; decoded once and cached beside the data."""
    if not os.path.isdir(root):
        fail(f"--dataroot {root} is not a folder; point it at a folder of images")
    files = image_files(root, outf)
    if not files:
        fail(f"no images ({', '.join(IMAGE_EXT)}) found under {root}")
    dirs = [os.path.relpath(os.path.dirname(f), root).split(os.sep)[0] for f in files]  # the top-level folder
    classes = sorted(set(dirs))
    print(f"{len(files)} images in {len(classes)} classes: {', '.join(classes)}")
    stats = [(os.path.relpath(f, root), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    stamp = hashlib.md5(repr([DECODER, stats]).encode()).hexdigest()[:12]
    cache = os.path.join(root, f".cache-{size}px-{channels or 'auto'}ch-{stamp}.npz")
    with contextlib.suppress(Exception), np.load(cache) as z:  # absent or damaged: decoded again
        return torch.from_numpy(z["x"]), torch.from_numpy(z["y"]), classes
    mode = {1: "L", 3: "RGB"}.get(channels)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        ims = list(pool.map(lambda f: decode_image(f, size, mode), files))
    c = 3 if any(im.ndim == 3 for im in ims) else 1  # colour kept as found; greys join as RGB
    ims = [np.broadcast_to(np.atleast_3d(im), (size, size, c)) for im in ims]
    x = np.stack(ims).transpose(0, 3, 1, 2).copy()
    y = np.array([classes.index(d) for d in dirs], np.int64)
    with contextlib.suppress(SystemExit):  # read-only data or a full disk: decoded again next time
        write_atomic(cache, lambda f: np.savez(f, x=x, y=y))
    return torch.from_numpy(x), torch.from_numpy(y), classes

def make_shapes(n, size, seed):
    """One coloured shape per image, one class each; chunks of 1000 seeded alone, so --limit is a prefix."""
    xs, ys = zip(*(shape_chunk(1000, size, np.random.default_rng([seed, i])) for i in range(0, n, 1000)))
    return torch.cat(xs)[:n], torch.cat(ys)[:n], CLASSES["shapes"]

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
    return torch.from_numpy((np.where(mask, fg, bg) * 255).round().astype(np.uint8)), torch.from_numpy(y)

def load_dataset(args, split):
    """-> (uint8 images N x C x H x W, int64 labels, class names). folder/shapes hold out every 10th image."""
    if args.dataset == "cifar10":
        x, y, classes = read_cifar10(args.dataroot, split)
    elif args.dataset in ("mnist", "fashion-mnist"):
        x, y, classes = load_mnist(args.dataroot, args.dataset, split)
    elif args.dataset == "shapes":
        n = min(10000, args.limit or 10000) if split == "train" else 2000
        x, y, classes = make_shapes(n, args.image_size, 0 if split == "train" else 1)
    else:
        x, y, classes = load_folder(args.dataroot, args.image_size, args.channels, args.workers, args.outf)
        keep = (torch.arange(len(x)) % 10 == 9) == (split == "test")
        x, y = x[keep], y[keep]
    if args.channels == 1 and x.shape[1] == 3:  # ITU-R 601 luma
        luma = torch.tensor([0.299, 0.587, 0.114])
        x = torch.einsum("nchw,c->nhw", x.float(), luma)[:, None].round().byte()
    x = x.expand(-1, args.channels or x.shape[1], -1, -1)  # grey to RGB when asked; every reader's y is int64
    if split == "train" and args.limit:
        x, y = x[:args.limit], y[:args.limit]
    if len(x) == 0:
        fail(f"the {split} split of {args.dataset} under {args.dataroot} holds no images")
    if x.shape[-1] != args.image_size:  # antialiased bilinear, in chunks
        x = torch.cat([F.interpolate(c.float(), args.image_size, mode="bilinear", antialias=True)
                       for c in x.split(4096)]).round().clamp(0, 255).byte()
    return x.contiguous(), y, classes

def batches(run, epoch):
    """This rank's share of one shuffled pass, as index tensors on the device (reproducible per epoch)."""
    gen, bs = torch.Generator().manual_seed(run.args.seed * 100003 + epoch), run.args.batch_size
    perm = torch.randperm(len(run.images), generator=gen)[run.rank::run.world].to(run.images.device)
    return perm[: len(perm) // bs * bs].view(-1, bs)

def get_batch(run, idx):
    return to_float(run.images[idx])

def to_float(x):
    return x.float().div_(127.5).sub_(1)  # uint8 -> [-1, 1]

# ----------------------------------------------------------------------------- checkpoints and resume
CHECKPOINT_KEYS = ("args", "image", "E", "Dec", "optE", "optDec", "epoch", "step", "rng")  # a training one's

def checkpoint(run):
    """Everything a resume needs; `restore` reads back exactly these."""
    return {"script": SCRIPT, "args": vars(run.args), "image": list(run.images.shape[1::2]),  # C, size
            **{k: n.state_dict() for k, n in run.nets.items()},
            **{"opt" + k: o.state_dict() for k, o in run.opts.items()},
            "epoch": run.epoch, "step": run.step, "classes": run.classes, "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "world": run.world, "balance": {"equilibrium": run.args.equilibrium, "margin": run.args.margin}}

def restore(run, ckpt):
    """The mirror of `checkpoint`, and log.csv cut back to the checkpoint's step."""
    for k, n in run.nets.items():
        n.load_state_dict(ckpt[k])
        run.opts[k].load_state_dict(ckpt["opt" + k])
    run.epoch, run.step = ckpt["epoch"], ckpt["step"]
    torch.set_rng_state(ckpt["rng"])
    if ckpt["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
    if ckpt.get("world", 1) != run.world:
        print(f"note: trained on {ckpt.get('world', 1)} processes, resumed on {run.world}: each process's "
              "share of the data changes, so the run does not continue bit for bit")
    if run.rank > 0:  # the checkpoint holds rank 0's RNG; the other ranks need noise of their own
        torch.manual_seed(run.args.seed + run.rank + 7919 * ckpt["epoch"])
    elif os.path.exists(log := os.path.join(run.args.outf, "log.csv")):
        with open(log) as f:  # rows logged past the checkpoint (a crash mid-epoch) are written again
            lines = f.readlines()  # none: the run stopped while creating the file
        kept = lines[:1] + [r for r in lines[1:] if int(r.split(",")[0]) <= run.step]  # the step comes first
        write_atomic(log, lambda f: f.write("".join(kept).encode()))  # never deleted first
    print(f"resumed from epoch {ckpt['epoch']}, step {ckpt['step']}")

MAY_CHANGE = ("dataroot", "epochs", "outf", "cuda", "amp", "compile", "workers", "log_every")
MACHINE = ("cuda", "amp", "compile", "workers", "log_every")  # this session's, as typed or by default
SAMPLING_ONLY = ("resume", "sample", "ckpt", "n", "npz", "out", "recon_grid", "interp", "steps", "walk",
                 "attribute")

def resumed_args(args, ckpt, typed):
    """The checkpoint's flags, but MAY_CHANGE's as typed and MACHINE's always from this command line."""
    differ = [k for k in vars(args) if k in set(typed) - set(MAY_CHANGE + SAMPLING_ONLY)
              and getattr(args, k) != ckpt["args"].get(k, getattr(args, k))]
    if differ:
        flags = ", ".join("--" + k.replace("_", "-") for k in differ)
        fail(f"--resume keeps the checkpoint's training flags; {flags} differ from it (only --dataroot, "
             "--epochs, --outf, --cuda, --amp, --compile, --workers, --log-every may change): drop them, "
             "or start a new run with another --outf")
    changed = {k: getattr(args, k) for k in MAY_CHANGE if k in typed or k in MACHINE}
    args = argparse.Namespace(**{**ckpt["args"], **changed, "outf": args.outf, "resume": True})
    if ckpt["epoch"] >= args.epochs:
        fail(f"the checkpoint has already trained {ckpt['epoch']} epochs; give --epochs larger than "
             f"{ckpt['epoch']} to train more")
    return args

def load_checkpoint(path):
    """A training checkpoint of this script, or one line saying what the file is instead."""
    if not os.path.isfile(path):
        fail(f"no checkpoint at {path}; train first or point --ckpt at a run's ckpt.pt")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{path} is not a readable checkpoint ({type(e).__name__})")
    other = (ckpt.get("script") if isinstance(ckpt, dict) else None) or "another program"
    if other != SCRIPT:
        fail(f"{path} was written by {other}.py, not {SCRIPT}.py; use that script")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        fail(f"{path} is not a {SCRIPT}.py training checkpoint (it lacks {', '.join(missing)}); "
             f"use DIR/ckpt.pt of a {SCRIPT}.py run")
    return ckpt

# ----------------------------------------------------------------------------- logs and pictures
def end_of_epoch_files(run, fixed_z):
    """Rank 0's BN statistics to all; then rank 0 writes samples, reconstructions, ckpt.pt, curves.png."""
    nets = nn.ModuleDict(run.nets)
    for buf in (buf for buf in nets.buffers() if run.world > 1):  # BN's running statistics are per rank
        dist.broadcast(buf, 0)
    if run.rank > 0:
        return
    outf = run.args.outf
    if not all(torch.isfinite(p).all() for p in nets.parameters()):
        diverged(run, f"the weights became NaN/inf in epoch {run.epoch}")
    nrow = min(8, len(run.images))
    x = get_batch(run, torch.arange(min(32, len(run.images)) // nrow * nrow, device=run.images.device))
    nets.eval()  # BN with its running statistics for pictures
    with torch.no_grad():
        save_grid(nets["Dec"](fixed_z), os.path.join(outf, f"samples_e{run.epoch:03d}.png"))
        save_grid(pair_rows(x, nets["Dec"](posterior(nets["E"], x)[0]), nrow),
                  os.path.join(outf, f"recon_e{run.epoch:03d}.png"), nrow)
    nets.train()
    write_atomic(os.path.join(outf, "ckpt.pt"), lambda f: torch.save(checkpoint(run), f))
    plot_curves(os.path.join(outf, "log.csv"), os.path.join(outf, "curves.png"))

def diverged(run, what):
    """A NaN stops training: the last good checkpoint is kept; with none yet, the run's files go."""
    path = os.path.join(run.args.outf, "ckpt.pt")
    kept = f"the last good checkpoint {path} is kept"
    if not os.path.exists(path):
        forget_log(run)
        kept = "no checkpoint was written yet; start again"
    fail(f"{what}; training stopped: {kept} (try a lower --lr)")

def forget_log(run):
    """A run with no checkpoint yet leaves no log.csv: nothing to resume, and it would refuse a restart."""
    log = os.path.join(run.args.outf, "log.csv")
    if run.rank == 0 and os.path.exists(log):
        os.remove(log)

def log_row(run, epoch, it, steps, means):
    """A log.csv row (rank 0 appends it) and a progress line; NaN/inf losses stop the run."""
    args, now = run.args, time.time()
    row = {"step": run.step, "epoch": epoch, **{k: float(v) for k, v in means.items()},
           "lr": run.opts["E"].param_groups[0]["lr"]}
    if not all(math.isfinite(v) for v in row.values()):
        diverged(run, f"the losses became NaN/inf at step {run.step}")
    if run.rank > 0:
        return
    log = os.path.join(args.outf, "log.csv")
    cells = [f"{v:.6g}" if isinstance(v, float) else str(v) for v in row.values()]
    with open(log, "a") as f:  # one short line appended; a trim goes through write_atomic
        header = "" if f.tell() else ",".join(row) + "\n"  # for a new file, or one its run left empty
        f.write(header + ",".join(cells) + "\n")
    done = (run.step - 1) % args.log_every + 1  # steps since the last row
    rate = done * args.batch_size * run.world / max(now - run.logged_at, 1e-9)
    eta = ((args.epochs - epoch) * steps + steps - it) * args.batch_size * run.world / rate / 60
    run.logged_at = now
    gan = (f" D {row['err_real'] + row['err_fake']:.2f} G {row['gan_g']:.2f} "
           f"D(x) {row['d_x']:.2f} D(G(z)) {row['d_gz']:.2f}") if "d_x" in row else ""
    print(f"[e {epoch}/{args.epochs} it {it}/{steps}] KL {row['kl']:.1f} "
          f"rec {row['recon']:.4g}{gan} | {rate:.0f} img/s | ETA {eta:.0f}m")

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
        lo, span = min(vals), (max(vals) - min(vals)) or 1.0
        draw.line([(5 + j * (w - 10) / (len(vals) - 1), (i + 1) * h - 5 - (v - lo) / span * (h - 25))
                   for j, v in enumerate(vals)], fill=(31, 119, 180))
        draw.text((5, i * h + 3), f"{k}: {lo:.3g} .. {lo + span:.3g}", fill="black")
    write_atomic(png_path, lambda f: img.save(f, "PNG"))

def to_uint8(x):
    """[-1, 1] float N x C x H x W -> uint8 N x H x W x C."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()

def grid_image(images, nrow=8, pad=2):
    """Float images in [-1, 1] (N x C x H x W) or uint8 ones (N x H x W x C) -> one grid picture."""
    x = images if isinstance(images, np.ndarray) else to_uint8(images)
    n, h, w, c = x.shape
    grid = np.full((-(-n // nrow) * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        top, left = pad + i // nrow * (h + pad), pad + i % nrow * (w + pad)
        grid[top:top + h, left:left + w] = x[i]
    return Image.fromarray(grid.squeeze(-1) if c == 1 else grid)

def save_grid(images, path, nrow=8):
    grid = grid_image(images, nrow)
    write_atomic(path, lambda f: grid.save(f, "PNG"))

def save_gif(frames, path):
    write_atomic(path, lambda f: frames[0].save(f, "GIF", save_all=True, append_images=frames[1:],
                                                duration=80, loop=0))

def pair_rows(a, b, nrow=8):
    """Each row of `a` over the same row of `b`: images over their reconstructions in an 8-column grid."""
    rows = [a.reshape(-1, nrow, *a.shape[1:]), b.reshape(-1, nrow, *b.shape[1:])]  # R x nrow x C x H x W
    return torch.stack(rows, 1).flatten(0, 2)

def sample_prior(Dec, nz, image, n, stem, device, chunk=500):
    """n prior samples, uint8 N x H x W x C, in chunks, once they and their grid fit in memory and on disk."""
    c, size = image  # the checkpoint's image shape
    need = 2 * n * c * size * size  # the array and the grid, in bytes
    free_disk = shutil.disk_usage(os.path.dirname(os.path.abspath(stem))).free
    free_mem = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > free_mem or need > free_disk:
        fail(f"--n {n} asks for {need / 2 ** 30:.2f} GB of samples and their grid; free memory "
             f"{free_mem / 2 ** 30:.2f} GB, free disk {free_disk / 2 ** 30:.2f} GB: lower --n")
    x = np.empty((n, size, size, c), np.uint8)
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        x[i:i + m] = to_uint8(decode(Dec, torch.randn(m, nz, device=device)))
    return x

# ----------------------------------------------------------------------------- device and data parallel
@dataclass
class Forward:
    """The networks as the method's forward pass calls them, set up in one place (`prepare_forward`)."""
    E: object  # the encoder: compiled under --compile, in bf16 autocast under --amp on CUDA, fp32 out
    Dec: object  # the decoder, the same way
    D: object = None  # the discriminator, the same way (none for a plain VAE)
    Dfeat: object = None  # D up to Dis_l: D's own first layers, D[0], not a copy
    batch_mean: object = None  # tensors -> floats, their mean over every data-parallel rank's share

def prepare_forward(nets, opts, args, world):
    """Wraps each network for `forward_losses`; under torchrun each optimiser first averages its gradients."""
    parts = dict(nets)
    if "D" in nets:
        parts["Dfeat"] = nets["D"][0]
    if world > 1:
        for opt in opts.values():
            opt.register_step_pre_hook(average_grads)  # DDP's hooks by hand: autograd.grad does not fire them
    if args.compile:
        parts = {k: torch.compile(m, dynamic=False) for k, m in parts.items()}
    calls = {k: functools.partial(autocast_call, m, args.amp and args.cuda) for k, m in parts.items()}
    return Forward(**calls, batch_mean=global_mean)

def autocast_call(module, amp, x):
    with torch.autocast(x.device.type, torch.bfloat16, enabled=amp):
        return module(x).float()

def pick_device(args, local_rank=0):
    if args.cuda and not torch.cuda.is_available():
        fail("--cuda was given but PyTorch sees no CUDA GPU; drop --cuda to run on the CPU")
    if args.amp and not args.cuda:
        print("note: --amp (bf16 autocast) applies on CUDA only; the CPU trains in fp32")
    torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest kernels
    return torch.device("cuda", local_rank) if args.cuda else torch.device("cpu")

def global_mean(*values):
    """Average scalars over data-parallel ranks so every rank's rule takes the same branch."""
    t = torch.stack([v.detach().float() for v in values])
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()

def average_grads(opt, *_):
    """One all-reduce of the optimiser's gradients, then their mean over the ranks."""
    grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))

# ----------------------------------------------------------------------------- command line
# Every numeric flag: name, type, default, valid range ("(" or ")" leaves that end out, "[" or "]" takes it
# in), help. `get_args` checks them before anything is allocated; NaN and inf lie outside every range.
NUMBERS = [
    ("--image-size", int, None, "[16, 1024]", "the native size unless given; 64 for folder"),
    ("--limit", int, None, "[1, inf)", "use only the first N training images"),
    ("--nz", int, 128, "[1, 4096]", "latent size"),
    ("--width", int, 64, "[2, 1024]", "base width: encoder 64-128-256-1024, D 32-128-256-256-512"),
    ("--gamma", float, None, "(0, inf)", "decoder's reconstruction weight: disl 1e-6 (64 px) or 1e-5, "
     "pixel 2e-4; plain VAE: 1/sigma^2, 1"),
    ("--equilibrium", float, 0.68, "(0, inf)", "the rule's target for D's costs (~ ln 2)"),
    ("--margin", float, 0.35, "(-inf, inf)", "the rule's margin; negative turns the rule off"),
    ("--epochs", int, 25, "[1, 1000000]", "25 epochs of CelebA ~ the paper's 62,500 steps"),
    ("--batch-size", int, 64, "[2, 1000000]", "at least 2 (batch norm)"),
    ("--lr", float, 0.025 / 64, "(0, inf)", "RMSProp start (the code: 0.025 / batch)"),
    ("--lr-end", float, 1e-5 / 64, "[0, inf)", "RMSProp end of the annealing"),
    ("--lr-power", float, 0.75, "(0, inf)", "lr = lr0 - (e/E)^power (lr0 - lr_end)"),
    ("--weight-decay", float, 1e-5, "[0, inf)", "on conv/linear weights, paper units"),
    ("--seed", int, 1, "[0, 2147483647]", "everything is seeded from it"),
    ("--log-every", int, 100, "[1, inf)", "steps between progress lines / log rows"),
    ("--workers", int, 4, "[1, 1024]", "threads decoding a folder of images"),
    ("--n", int, 64, "[1, inf)", "number of samples (checked against free memory and disk)"),
    ("--steps", int, 10, "[1, 10000]", "interpolation steps"),
    ("--walk", int, 0, "[0, 1000000]", "frames of an animated GIF latent walk"),
    ("--attribute", int, None, "[0, inf)", "class K: add mean z of K minus mean z of the rest")]

def make_parser():
    p = argparse.ArgumentParser(description="VAE/GAN (Larsen et al. 2016)")
    a = p.add_argument
    a("--dataset", choices=["cifar10", "mnist", "fashion-mnist", "folder", "shapes"])
    a("--dataroot", default="./data", help="where the data lives or is downloaded to")
    a("--channels", type=int, choices=[1, 3], help="force greyscale or RGB")
    a("--recon", choices=["disl", "pixel"], default="disl", help="reconstruction error on Dis_l or pixels")
    a("--no-gan", action="store_true", help="no discriminator: with --recon pixel, a plain VAE")
    a("--fake-recon", action=argparse.BooleanOptionalAction, default=True,
      help="D also sees reconstructions as fakes (Alg. 1); --no-fake-recon: prior samples only")
    a("--nonsat", action="store_true", help="decoder minimises -log D(G(z)), not log(1 - D(G(z)))")
    a("--outf", help="output folder (default out/vaegan-DATASET)")
    a("--resume", action="store_true", help="continue from OUTF/ckpt.pt")
    a("--cuda", action="store_true")
    a("--amp", action="store_true", help="bf16 autocast (CUDA)")
    a("--compile", action="store_true", help="torch.compile the networks")
    a("--sample", action="store_true", help="sample from --ckpt instead of training")
    a("--ckpt")
    a("--npz", help="also write the samples to this .npz")
    a("--out", help="grid PNG (default: beside the checkpoint)")
    a("--recon-grid", action="store_true", help="test images (odd rows) over their reconstructions")
    a("--interp", choices=["lerp", "slerp"], help="between two encoded test images")
    for flag, kind, default, _, text in NUMBERS:
        a(flag, type=kind, default=default, help=text)
    return p

def get_args(argv=None, typed_only=False):
    """The flags; with typed_only, the set of those typed (no defaults), to tell what --resume may take."""
    p = make_parser()
    if typed_only:
        for action in p._actions:
            action.default = argparse.SUPPRESS
        return set(vars(p.parse_args(argv)))
    args = p.parse_args(argv)
    if not (args.sample or args.dataset or args.resume and args.outf) or (args.sample and not args.ckpt):
        p.error("give --dataset to train, --resume --outf DIR to continue, or --sample --ckpt DIR/ckpt.pt")
    for flag, _, _, bounds, _ in NUMBERS:  # NUMBERS' ranges; NaN fails every comparison, so it is refused
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is None:
            continue
        lo, hi = (float(end) for end in bounds[1:-1].split(","))
        above = lo < value if bounds[0] == "(" else lo <= value
        below = value < hi if bounds[-1] == ")" else value <= hi
        if not (above and below):
            fail(f"{flag} {value} is outside its valid range {bounds}")
    if args.dataset == "shapes" and (args.image_size or 0) > SHAPES_MAX_SIZE:
        fail(f"--image-size {args.image_size} is too large for shapes (at most {SHAPES_MAX_SIZE})")
    if args.dataset:  # training: the native size unless given, then gamma for that size
        args.outf = args.outf or os.path.join("out", f"{SCRIPT}-{args.dataset}")
        args.image_size = args.image_size or NATIVE_SIZE[args.dataset]
        args.gamma = args.gamma or default_gamma(args.recon, args.no_gan, args.image_size)
    return args

def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = get_args(argv)
    run, lock, world = None, None, int(os.environ.get("WORLD_SIZE", 1))
    try:
        if args.sample:
            for path in (p for p in (args.out, args.npz) if p):
                prepare_output(os.path.dirname(os.path.abspath(path)))
            return sample(args)
        ckpt = None
        if args.resume:
            path = os.path.join(args.outf, "ckpt.pt")
            if not os.path.exists(path):
                fail(f"{args.outf} holds no checkpoint (ckpt.pt): nothing to resume; run without --resume")
            ckpt = load_checkpoint(path)
            args = resumed_args(args, ckpt, get_args(argv, typed_only=True))
        rank = int(os.environ.get("RANK", 0))
        device = pick_device(args, int(os.environ.get("LOCAL_RANK", 0)))
        if world > 1:  # launched by torchrun: one process per GPU (or CPU worker)
            if device.type == "cuda":
                torch.cuda.set_device(device)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        lock = start_folder(args, ckpt) if rank == 0 else None
        run = setup_run(args, device, load_dataset(args, "train"), rank, world)
        if ckpt:
            restore(run, ckpt)
        train(run)
        if world > 1:  # every rank done before any tears Gloo/NCCL down, or a peer may abort mid-exit
            dist.barrier()
        return run
    except KeyboardInterrupt:
        print(stopped(args, run, argv), file=sys.stderr)
        raise SystemExit(130)
    finally:
        if lock:
            os.remove(lock)
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()

def stopped(args, run, argv):
    """Ctrl-C's one line: where it stopped, the checkpoint kept, the command that goes on."""
    if args.sample:
        return "stopped by Ctrl-C while sampling; run the same command again"
    where = f"stopped by Ctrl-C at step {run.step} (epoch {run.epoch + 1})" if run else "stopped by Ctrl-C"
    if os.path.exists(path := os.path.join(args.outf, "ckpt.pt")):
        epoch = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"]
        return f"{where}; {path} (epoch {epoch}) is kept; continue with: python3 vaegan.py --resume --outf " \
               f"{shlex.quote(args.outf)}"
    if run:
        forget_log(run)
    return f"{where}; no checkpoint was written yet; start again with: python3 vaegan.py {shlex.join(argv)}"

if __name__ == "__main__":
    main()
