"""The built-in coloured shapes: are the samples the asked shapes, in the training images' colours?

    python3 bench/shapes.py SAMPLES.npz [--image-size 32]

SAMPLES.npz is any script's `--sample --npz FILE` of a model trained with `--dataset shapes` (uint8
N x H x W x 3 images, and `labels` for a class-conditional model); --image-size is the size the model was
trained at (the default 32), of which the samples may be a random crop (lapgan.py's `--levels 14,28`).
Each training image is one shape in one flat colour (every channel 0.45 to 1) on one flat background (every
channel 0 to 0.2), so colour is checked without a network, and the shape by a small CNN trained once on the
training split (random crops to the samples' size; cached under ~/.cache/gans-quality). Reported, for the
samples and for the held-out test shapes cropped alike, the reference:

- asked shape: how often the CNN puts a sample in the shape asked for (conditional models), and per shape;
- saturated: the share of pixels whose channels differ by more than 0.6 (none in the training images: the
  "saturated swirls" of a model that draws colours the data never has);
- in boxes: the share of pixels with every channel at most 0.25 (a background) or at least 0.40 (a shape);
- shape spread, background spread: per sample, the standard deviation of the shape's pixels (every channel
  at least 0.40) and of the background's (at most 0.25) about their own mean colour, the median over
  samples; 0 for the training images, whose shapes and backgrounds are each one flat colour.

The last line printed is one JSON object. It imports lapgan.py for the shapes' generator (its copies in
gan.py and vaegan.py draw the same images).
"""
import argparse, json, os, sys
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lapgan  # noqa: E402

DARK, LIGHT, SATURATED = 0.25, 0.40, 0.6  # the training colours' boxes (0 to 0.2, 0.45 to 1), with margins
CACHE = "~/.cache/gans-quality"


def fail(msg):
    raise SystemExit(f"error: {msg}")


def classifier():
    """Three 3x3 convs with pooling, then the mean over the image: any crop size is taken."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 6))


def crop(x, size, gen=None):
    """A random size x size crop of each batch (gen given), else the centre crop."""
    room = x.shape[-1] - size
    if gen is None:
        i = j = room // 2
    else:
        i, j = torch.randint(0, room + 1, (2,), generator=gen).tolist()
    return x[..., i:i + size, j:j + size]


def train_classifier(image_size, crop_size, n_train, epochs):
    """Adam on the training split's random crops; seeded, so one cache file per setting."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    x, y, _ = lapgan.make_shapes(n_train, image_size, 0)
    net = classifier()
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for b in range(0, len(x), 64):
            i = order[b:b + 64]
            loss = F.cross_entropy(net(crop(x[i], crop_size, gen).float() / 255), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval()


def load_classifier(image_size, crop_size, n_train, epochs, cache):
    path = os.path.join(os.path.expanduser(cache), f"shapes-{image_size}px-{crop_size}-{n_train}-{epochs}.pt")
    if os.path.exists(path):
        net = classifier()
        net.load_state_dict(torch.load(path, weights_only=True))
        return net.eval()
    net = train_classifier(image_size, crop_size, n_train, epochs)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(net.state_dict(), path + ".tmp")
    os.replace(path + ".tmp", path)  # a killed run leaves no half-written cache
    return net


def spread(pixels, mask):
    """Per image: the RMS distance of the masked pixels' colours from their mean colour; NaN if none."""
    m = mask[:, None].float()  # N x 1 x H x W
    count = m.sum((2, 3))  # N x 1
    mean = (pixels * m).sum((2, 3)) / count  # N x 3
    sq = ((pixels - mean[..., None, None]) ** 2 * m).sum((2, 3)) / count  # N x 3
    return sq.mean(1).sqrt()  # N


def colour_figures(images):
    """images: uint8 N x 3 x H x W -> the colour figures of the docstring."""
    p = images.float() / 255
    dark = (p <= DARK).all(1)  # N x H x W
    light = (p >= LIGHT).all(1)
    channel_gap = p.max(1).values - p.min(1).values
    return {"saturated": float((channel_gap > SATURATED).float().mean()),
            "in_boxes": float((dark | light).float().mean()),
            "shape_spread": float(spread(p, light).nanmedian()),
            "background_spread": float(spread(p, dark).nanmedian())}


@torch.no_grad()
def asked_shape(net, images, labels):
    """-> (the share in the asked shape, the same per shape)."""
    pred = torch.cat([net(images[b:b + 500].float() / 255).argmax(1) for b in range(0, len(images), 500)])
    right = pred == labels
    per_shape = [float(right[labels == c].float().mean()) for c in range(6)]
    return float(right.float().mean()), per_shape


def read_samples(path):
    try:
        with np.load(path) as z:
            images = z["images"]
            labels = z["labels"] if "labels" in z.files else None
    except (OSError, ValueError, KeyError) as e:
        fail(f"cannot read {path} ({type(e).__name__}); give an npz written by --sample --npz")
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        shape = "x".join(map(str, images.shape))
        fail(f"{path} holds {shape} {images.dtype} images; shapes samples are N x H x W x 3 uint8")
    if not len(images):
        fail(f"{path} holds no images; draw some with --sample --n N --npz FILE")
    if labels is not None and labels.shape != (len(images),):
        got = f"{len(images)} images but labels of shape {labels.shape}"
        fail(f"{path} holds {got}; write it again with --sample --npz")
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


def evaluate(path, image_size=32, n_train=10000, epochs=4, cache=CACHE):
    images, labels = read_samples(path)
    size = images.shape[-1]
    if size > image_size:
        fail(f"the samples are {size} px, more than --image-size {image_size}; give the model's --image-size")
    test_x, test_y, names = lapgan.make_shapes(2000, image_size, 1)
    test_x = crop(test_x, size)
    out = {"n": len(images), "samples": colour_figures(images), "test": colour_figures(test_x)}
    net = load_classifier(image_size, size, n_train, epochs, cache)
    out["test"]["asked_shape"], _ = asked_shape(net, test_x, test_y)
    if labels is not None:
        out["samples"]["asked_shape"], per = asked_shape(net, images, torch.as_tensor(labels))
        out["samples"]["per_shape"] = dict(zip(names, per))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("npz", help="samples of a --dataset shapes model, written by --sample --npz FILE")
    p.add_argument("--image-size", type=int, default=32, help="the model's --image-size (default 32)")
    p.add_argument("--cache", default=CACHE, help=f"where the classifier is kept (default {CACHE})")
    args = p.parse_args(argv)
    if not 8 <= args.image_size <= lapgan.SHAPES_MAX:
        fail(f"--image-size {args.image_size} is out of range; it must lie in [8, {lapgan.SHAPES_MAX}]")
    r = evaluate(args.npz, args.image_size, cache=args.cache)
    print("| images | asked shape | saturated | in boxes | shape spread | background spread |")
    for name in ("samples", "test"):
        f = r[name]
        asked = f"{f['asked_shape']:.1%}" if "asked_shape" in f else "n/a"
        spreads = f"{f['shape_spread']:.3f} | {f['background_spread']:.3f}"
        print(f"| {name} | {asked} | {f['saturated']:.2%} | {f['in_boxes']:.1%} | {spreads} |")
    print(json.dumps(r))
    return r


if __name__ == "__main__":
    main()
