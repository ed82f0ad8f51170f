"""Which level holds a LAPGAN back: its sampling chain started from real test images at each level.

    python3 bench/levels.py out/lapgan-fashion-mnist/ckpt.pt --out out/levels [--n 10000]

Levels are numbered as in the paper: I_0 is the full image, I_K the base. For k = K, ..., 1 the chain of
Fig. 1 starts from the real test images' I_k = d(x) (k = K: the real base) and the trained G_{k-1}, ..., G_0
draw the finer levels; `full` is the whole chain from noise (what `--sample` draws). Each is written as
OUT/from_k.npz (OUT/full.npz), uint8 images with the test images' own labels (a conditional model is asked
for them), for bench/quality.py. When the chain from real I_k scores much better than the one from real
I_{k+1}, G_k (which draws I_k from I_{k+1}) is what holds samples back.
This file imports lapgan.py; it imports nothing of this.
"""
import argparse, os, sys
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lapgan  # noqa: E402


def chains_from_real(ckpt_path, n, seed=1):
    """-> {name: (uint8 N x H x W x C images, int64 labels)}: `full`, then `from_K` .. `from_1`."""
    Gs, ck = lapgan.load_levels([ckpt_path])
    test = lapgan.load_dataset(argparse.Namespace(**{**ck["args"], "limit": None}), "test")
    sizes, nz = ck["sizes"], ck["args"]["nz"]  # sizes[k]: the size of I_k, finest first
    n = min(n, len(test[0]))
    m = (test[0].shape[-1] - sizes[0]) // 2  # centre crops of the finest size, as evaluation takes them
    x = test[0][:n, :, m:m + sizes[0], m:m + sizes[0]].float() / 255
    x, labels = (x - ck["mean"]) / ck["std"], test[1][:n]
    y = labels if ck["args"]["conditional"] else None
    torch.manual_seed(seed)
    chains = {"full": lapgan.sample_chain(Gs, sizes, n, nz, y, "cpu")[0]}
    for k in reversed(range(1, len(sizes))):
        torch.manual_seed(seed)  # the same noise for every start
        image = lapgan.down(x, sizes[k])  # the real I_k of the test images
        for j in reversed(range(k)):  # G_{k-1}, ..., G_0
            image = lapgan.sample_level(Gs[j], image, sizes[j], y)
        chains[f"from_{k}"] = image
    out = {}
    for name, made in chains.items():
        images = lapgan.to_uint8(lapgan.to_display(made, ck["mean"], ck["std"]))
        out[name] = (images, labels.numpy())
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("ckpt")
    p.add_argument("--out", required=True, help="folder for the .npz files")
    p.add_argument("--n", type=int, default=10000, help="test images (and samples) per chain")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for name, (images, labels) in chains_from_real(args.ckpt, args.n).items():
        np.savez(os.path.join(args.out, name + ".npz"), images=images, labels=labels)
        print(f"wrote {os.path.join(args.out, name + '.npz')} ({len(images)} images)")


if __name__ == "__main__":
    main()
