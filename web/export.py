"""One HTML page that draws samples of a trained generator in the browser, as the Eyescream page did.

    python3 web/export.py out/lapgan-fashion-mnist/ckpt.pt --out lapgan.html
    python3 web/export.py out/l0/ckpt.pt out/l1/ckpt.pt out/l2/ckpt.pt --out lapgan.html   # --level K runs
    python3 web/export.py out/gan-fashion-mnist/ckpt.pt --out gan.html

The page is one self-contained file: the generators' weights (base64, float16 unless --float32), their
layers as a small JSON description, and web/sampler.js, a hand-written forward pass, all inlined, so it
works from file:// with no network and no server. A Web Worker draws the samples, so the page stays
responsive. LAPGAN checkpoints (one, or several from --level K runs, joined as lapgan.py --sample joins
them) get the chain of Fig. 1, a class picker (also ?class=K), each sample's levels side by side and,
on a click, Sec. 4.2's resampling from the sample's own coarse image; gan.py and vaegan.py checkpoints
get prior samples and a slerp walk. Batch norm is folded into the layer before it here, or, after a
ReLU (lapgan.py --bn-g), becomes a per-channel scale and shift, as does the data's normalisation after
lapgan.py --tanh-base's tanh, so the page needs only linear, ReLU, tanh, (transposed) convolution, that
scale and shift, nearest x2 and bilinear u(.). A LAPGAN trained with
--ema draws with its averaged generators, as lapgan.py --sample does (lapgan.load_levels).
`--test-noise N` embeds N samples' noise (seeded by --seed) that the page runs when opened with ?test=1,
writing every level's numbers into <pre id="test-output">; the tests compare them with PyTorch.
This file imports the three scripts to read their checkpoints; they import nothing of it.
"""
import argparse, base64, html, json, os, sys
from dataclasses import dataclass, field
import numpy as np
import torch
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import gan  # noqa: E402
import lapgan  # noqa: E402
import vaegan  # noqa: E402


def fail(msg):
    raise SystemExit(f"error: {msg}")


# ----------------------------------------------------------------------------- what the page is given
@dataclass
class Weights:
    """Every weight of the page in one flat float32 array; each layer names its tensors by offset."""
    parts: list = field(default_factory=list)  # float32 numpy arrays, in the order they were added
    size: int = 0                               # floats so far = the offset of the next tensor

    def add(self, t):
        if t is None:
            return -1  # no bias
        a = t.detach().double().numpy().astype(np.float32).ravel()
        self.parts.append(a)
        self.size += a.size
        return self.size - a.size

    def encoded(self, dtype):
        """-> base64 of the little-endian floats, float16 or float32."""
        flat = np.concatenate(self.parts) if self.parts else np.zeros(0, np.float32)
        data = flat.astype("<f2" if dtype == "float16" else "<f4")
        if not np.isfinite(data).all():
            fail("a weight does not fit in float16 (or is not finite); export again with --float32")
        return base64.b64encode(data.tobytes()).decode("ascii")


@dataclass
class Page:
    """The model as the page's JavaScript reads it (web/sampler.js: sampleChain)."""
    script: str        # "lapgan", "gan" or "vaegan"
    title: str         # the page's heading
    about: str         # one sentence under it
    classes: list      # class names of a class-conditional model, else None
    mean: list         # per channel: the page shows (x * std + mean) * 255 (lapgan.py to_display)
    std: list          # (gan.py and vaegan.py: images in [-1, 1], so mean = std = 0.5)
    noise: str         # "uniform" (LAPGAN, Sec. 3: U[-1, 1]) or "normal" (gan.py, vaegan.py: N(0, I))
    nets: list = field(default_factory=list)  # one dict per network, in sampling order (base first)
    truncate: float = 1.0  # LAPGAN's base noise from U[-t, t] (lapgan.py --truncate, as --sample draws)
    weights: Weights = field(default_factory=Weights)

    def description(self, dtype):
        return {"script": self.script, "classes": self.classes, "mean": self.mean, "std": self.std,
                "noise": self.noise, "truncate": self.truncate, "nets": self.nets, "dtype": dtype}


# --------------------------------------------------------------------- layers, batch norm folded or affine
def conv_op(m, where):
    """nn.Conv2d or nn.ConvTranspose2d -> its description, if the page can run it."""
    k, stride, pad = m.kernel_size, m.stride, m.padding
    square = k[0] == k[1] and stride[0] == stride[1] and isinstance(pad, tuple) and pad[0] == pad[1]
    plain = m.groups == 1 and m.dilation == (1, 1) and m.padding_mode == "zeros"
    if not (square and plain):
        fail(f"{where}: the page runs square, ungrouped, zero-padded convolutions only, not {m}; "
             f"export a checkpoint of the default model")
    op = {"op": "conv", "cin": m.in_channels, "cout": m.out_channels, "k": k[0], "stride": stride[0],
          "pad": pad[0], "w": m.weight, "b": m.bias}
    if isinstance(m, nn.ConvTranspose2d):
        op.update(op="convT", outpad=m.output_padding[0])
    return op


def batch_norm(ops, bn, where):
    """Sampling uses BN's running statistics, an affine map per channel, x scale + shift. Fold it into the
    weights and bias of the linear or convolution layer just before it (through an Unflatten after a
    Linear: lapgan.py --base conv), so that the page runs no batch norm there. After a ReLU (lapgan.py
    --bn-g) no fold is exact, since the next convolution pads with zeros after BN: the page scales and
    shifts each channel itself (sampler.js affine)."""
    if bn.running_var is None:
        fail(f"{where}: {bn} keeps no running statistics, so sampling depends on the batch; the page "
             f"draws one sample at a time and cannot run it")
    scale = 1 / torch.sqrt(bn.running_var.double() + bn.eps)
    if bn.affine:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.affine:
        shift = shift + bn.bias.double()
    before = ops[-1]["op"] if ops else None
    if before == "unflatten" and len(ops) > 1 and ops[-2]["op"] == "linear":
        pixels = ops[-1]["shape"][1] * ops[-1]["shape"][2]  # C, H, W: the Linear's outputs channel by channel
        fold(ops[-2], scale.repeat_interleave(pixels), shift.repeat_interleave(pixels))
    elif before in ("linear", "conv", "convT"):
        fold(ops[-1], scale, shift)
    else:
        ops.append({"op": "affine", "scale": scale, "shift": shift})


def fold(op, scale, shift):
    """op's outputs times scale plus shift, as op's own weights and bias: w scale, b scale + shift."""
    bias = torch.zeros_like(scale)
    if op["b"] is not None:
        bias = op["b"].double()
    if op["op"] == "convT":  # its weights are in x out x k x k: the output channels come second
        per_output = scale.view(1, -1, 1, 1)
    else:  # out x in (x k x k)
        per_output = scale.view(-1, *[1] * (op["w"].dim() - 1))
    op["w"] = op["w"].double() * per_output
    op["b"] = bias * scale + shift


def layer_ops(body, where):
    """The layers of an nn.Sequential as the page's list, batch norm folded, dropout dropped (it is the
    identity when sampling). Anything else: one line naming the layer."""
    ops = []
    for m in body.modules():
        if isinstance(m, nn.Sequential):
            continue
        if isinstance(m, nn.Linear):
            ops.append({"op": "linear", "in": m.in_features, "out": m.out_features, "w": m.weight,
                        "b": m.bias})
        elif isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            ops.append(conv_op(m, where))
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            batch_norm(ops, m, where)
        elif isinstance(m, lapgan.ToData):  # lapgan.py --tanh-base: tanh, then the data's normalisation
            ops.append({"op": "tanh"})
            std = m.std.flatten()
            ops.append({"op": "affine", "scale": 0.5 / std, "shift": (0.5 - m.mean.flatten()) / std})
        elif isinstance(m, (nn.ReLU, nn.Tanh)):
            ops.append({"op": "relu" if isinstance(m, nn.ReLU) else "tanh"})
        elif isinstance(m, nn.Unflatten) and m.dim == 1 and len(m.unflattened_size) == 3:
            ops.append({"op": "unflatten", "shape": list(m.unflattened_size)})  # C, H, W
        elif isinstance(m, nn.Upsample) and m.mode == "nearest" and float(m.scale_factor or 0).is_integer():
            ops.append({"op": "upnearest", "factor": int(m.scale_factor)})
        elif not isinstance(m, (nn.Dropout, nn.Dropout2d)):
            fail(f"{where}: the page cannot run the layer {m}; it runs linear, ReLU, tanh, convolutions, "
                 f"batch norm and nearest x2 enlarging")
    return ops


def add_net(page, body, size, where, nz=None, embed=None):
    """One network into the page: its layers with their weights stored, flat input (z, then the one-hot
    class) when nz is given, else LAPGAN's planes (noise, class plane from `embed`, the enlarged coarser
    image)."""
    ops = layer_ops(body, where)
    for op in ops:
        op.update({k: page.weights.add(op[k]) for k in ("w", "b", "scale", "shift") if k in op})
    net = {"size": size, "input": "flat" if nz else "planes", "nz": nz, "layers": ops, "embed": None}
    if embed is not None:
        net["embed"] = {"w": page.weights.add(embed.weight), "b": page.weights.add(embed.bias)}
    page.nets.append(net)


# ----------------------------------------------------------------------------- the three scripts' models
def lapgan_chain(paths):
    """ALL that this file knows of lapgan.py's level order is here. lapgan.load_levels returns the
    generators in the paper's order, G_0 (the finest) to G_K (the base), joining --level K runs, and the
    first checkpoint, whose sizes[k] is the size of I_k. The page runs the chain in sampling order.
    -> ([(G_K, s_K), ..., (G_0, s_0)], checkpoint)."""
    Gs, ck = lapgan.load_levels(paths)
    return list(zip(Gs, ck["sizes"]))[::-1], ck


def lapgan_page(paths):
    """A LAPGAN's generators (one checkpoint, or --level K runs joined) as the page's chain."""
    for path in paths:  # the LSUN model's grouped convs and L2 pooling are not in the page
        if peek(path)["args"].get("model") == "large":
            fail(f"{path} is a lapgan.py --model large checkpoint; the page runs the default --model small")
    chain, ck = lapgan_chain(paths)
    ncls = len(ck["classes"]) if ck["args"]["conditional"] else 0
    sizes = " -> ".join(str(size) for _, size in chain)
    page = Page("lapgan", f"LAPGAN samples, {ck['args']['dataset']} {sizes} px", "",
                ck["classes"] if ncls else None, ck["mean"].flatten().tolist(), ck["std"].flatten().tolist(),
                "uniform")
    page.truncate = ck["args"]["truncate"] or 1.0  # the value the run stored, as --sample takes it
    files = ", ".join(map(os.path.basename, paths))
    page.about = (f"Drawn by your browser from {files} (lapgan.py): the chain of Fig. 1. The base level's "
                  f"generator draws a {chain[0][1]} px image from noise; then each finer level's draws the "
                  f"residual that, added to the enlarged coarser image, makes the next level.")
    for G, size in chain:  # the base takes z and the one-hot class; finer levels take planes
        where = f"{paths[-1]}, the level of {size} px"
        if G.flat:
            add_net(page, G.body, size, where, nz=ck["args"]["nz"])
        else:
            add_net(page, G.body, size, where, embed=G.embed)
    return page


def gan_page(path):
    ck = gan.load_checkpoint(path)
    targs = argparse.Namespace(**ck["args"])
    nc, size = ck.get("shape") or (targs.nc, targs.image_size)  # as gan.py --sample reads them
    ncls = len(ck["classes"]) if targs.conditional else 0
    G = gan.build_nets(targs, nc, ncls, size)[0]
    G.load_state_dict(ck["G"])
    page = Page("gan", f"GAN samples, {targs.dataset} {size} px ({targs.arch})", "",
                ck["classes"] if ncls else None, [0.5] * nc, [0.5] * nc, "normal")
    page.about = (f"Drawn by your browser from {os.path.basename(path)} (gan.py): G maps z ~ N(0, I) to "
                  f"an image; the walk follows slerp (White 2016) between random latents.")
    add_net(page, G.eval().body, size, path, targs.nz)
    return page


def vaegan_page(path):
    ck = vaegan.load_checkpoint(path)
    targs = argparse.Namespace(**ck["args"])
    nc, size = ck["image"]
    Dec = vaegan.make_decoder(nc, size, targs.nz, targs.width)
    Dec.load_state_dict(ck["Dec"])
    page = Page("vaegan", f"VAE/GAN decoder samples, {targs.dataset} {size} px", "", None, [0.5] * nc,
                [0.5] * nc, "normal")
    page.about = (f"Drawn by your browser from {os.path.basename(path)} (vaegan.py): the decoder of "
                  f"z ~ N(0, I), the prior; the walk follows slerp between random latents.")
    add_net(page, Dec.eval(), size, path, targs.nz)
    return page


def peek(path):
    """The checkpoint as a dict of one of the three scripts, or one line saying what it is not."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"{path} is not a checkpoint of gan.py, lapgan.py or vaegan.py ({type(e).__name__}); "
             f"give a run's ckpt.pt")
    if not isinstance(ck, dict) or ck.get("script") not in ("gan", "lapgan", "vaegan"):
        fail(f"{path} is not a checkpoint of gan.py, lapgan.py or vaegan.py; give a run's ckpt.pt")
    return ck


def load_page(paths):
    """The page's model for the checkpoints given: several only for LAPGAN levels trained apart."""
    for path in paths:
        if not os.path.isfile(path):
            fail(f"no checkpoint at {path}; train first or point at a run's ckpt.pt")
    scripts = [peek(path)["script"] for path in paths]
    if len(paths) > 1 and set(scripts) != {"lapgan"}:
        fail("several checkpoints are joined only as the levels of one LAPGAN; give one gan.py or "
             "vaegan.py checkpoint")
    if scripts[0] == "lapgan":
        return lapgan_page(paths)
    with torch.no_grad():
        return gan_page(paths[0]) if scripts[0] == "gan" else vaegan_page(paths[0])


# ----------------------------------------------------------------------------- fixed noise, the HTML
def fixed_noise(page, n, seed):
    """--test-noise: n samples' inputs, drawn as lapgan.sample_chain draws them (one torch.Generator, the
    base's z, then each finer level's plane) or as gan.py / vaegan.py do (z ~ N(0, I)); the classes cycle.
    -> (labels or None, [one n x ... tensor per network])."""
    gen = torch.Generator().manual_seed(seed)
    noise = []
    for net in page.nets:
        side = net["size"]
        shape = (n, net["nz"]) if net["input"] == "flat" else (n, 1, side, side)
        if page.noise == "normal":
            noise.append(torch.randn(shape, generator=gen))
        elif net["input"] == "flat":  # LAPGAN's z_K, truncated as sample_chain truncates it
            noise.append((torch.rand(shape, generator=gen) * 2 - 1) * page.truncate)
        else:
            noise.append(torch.rand(shape, generator=gen) * 2 - 1)
    labels = torch.arange(n) % len(page.classes) if page.classes else None
    return labels, noise


def script_json(obj):
    """JSON safe inside a <script> element: no "</" can end it early."""
    return json.dumps(obj, separators=(",", ":")).replace("<", "\\u003c")


def page_html(page, dtype, test=None):
    """The page: web/page.html with the model, the weights and web/sampler.js put in."""
    with open(os.path.join(HERE, "page.html")) as f:
        text = f.read()
    with open(os.path.join(HERE, "sampler.js")) as f:
        sampler = f.read()
    parts = {"@@MODEL@@": script_json(page.description(dtype)), "@@TEST@@": script_json(test),
             "@@WEIGHTS@@": page.weights.encoded(dtype), "@@SAMPLER@@": sampler,
             "@@TITLE@@": html.escape(page.title), "@@ABOUT@@": html.escape(page.about)}
    for marker, value in parts.items():
        text = text.replace(marker, value)
    return text


def test_inputs(page, n, seed):
    labels, noise = fixed_noise(page, n, seed)
    per_sample = [[t[i].flatten().tolist() for t in noise] for i in range(n)]
    return {"labels": None if labels is None else labels.tolist(), "noise": per_sample}


def main(argv=None):
    p = argparse.ArgumentParser(description="One self-contained HTML page that samples a checkpoint")
    p.add_argument("ckpt", nargs="+", help="a ckpt.pt of gan.py, lapgan.py or vaegan.py (LAPGAN: several)")
    p.add_argument("--out", required=True, help="the HTML file to write")
    p.add_argument("--float32", action="store_true", help="weights as float32 (default float16: half size)")
    p.add_argument("--test-noise", type=int, default=0, help="embed N samples' fixed noise for ?test=1")
    p.add_argument("--seed", type=int, default=1, help="seed of --test-noise")
    args = p.parse_args(argv)
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        fail(f"the folder of --out {args.out} does not exist; create it or choose another path")
    page = load_page(args.ckpt)
    dtype = "float32" if args.float32 else "float16"
    test = test_inputs(page, args.test_noise, args.seed) if args.test_noise else None
    text = page_html(page, dtype, test)
    with open(args.out, "w") as f:
        f.write(text)
    mib = len(text) / 2 ** 20
    print(f"wrote {args.out}: {mib:.1f} MiB, {page.weights.size:,} weights as {dtype}")
    return page


if __name__ == "__main__":
    main()
