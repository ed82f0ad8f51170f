"""Tests for gan.py, lapgan.py and vaegan.py: CPU only, no network, seconds each.

    python3 -m pytest -q test_gans.py
"""
import argparse, contextlib, copy, csv, errno, gzip, hashlib, io, math, os, pickle, re, shutil, socket, struct, subprocess, sys
import tarfile, warnings
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gan  # noqa: E402
import lapgan  # noqa: E402
import vaegan  # noqa: E402

torch.set_num_threads(1)  # small nets: one thread is as fast, and the suite shares a 2-core machine


@pytest.fixture(autouse=True)
def seeded():
    """Every test starts from the same random state, whatever ran before it (file order or reversed)."""
    import random
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


# ----------------------------------------------------------------------------- shared helpers
def write_cifar_tarball(root, n_per_batch=6, seed=0, protocol=2):
    """A CIFAR-10 python tarball in the official layout: pickled dicts with bytes keys. The official
    files are Python 2 pickles; protocol 3 or later holds bytes without calls (protocol 2 under Python 3
    adds _codecs.encode, which a restricted unpickler refuses)."""
    rng = np.random.default_rng(seed)
    batches = {}
    with tarfile.open(os.path.join(root, "cifar-10-python.tar.gz"), "w:gz") as tar:
        def add(name, obj):
            data = pickle.dumps(obj, protocol=protocol)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            x = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
            y = rng.integers(0, 10, n_per_batch).tolist()
            batches[name] = (x, y)
            add(name, {b"batch_label": name.encode(), b"data": x, b"labels": y})
        add("batches.meta", {b"label_names": [c.encode() for c in ["airplane", "automobile", "bird", "cat",
                             "deer", "dog", "frog", "horse", "ship", "truck"]]})
    return batches


def write_idx(path, array):
    """IDX: two zero bytes, type 0x08 (uint8), rank, big-endian int32 sizes, then the data."""
    header = b"\0\0\x08" + bytes([array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_mnist(root, n_train=40, n_test=20, seed=0):
    rng = np.random.default_rng(seed)
    data = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x, y = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        write_idx(os.path.join(root, f"{split}-images-idx3-ubyte.gz"), x)
        write_idx(os.path.join(root, f"{split}-labels-idx1-ubyte.gz"), y)
        data[split] = (x, y)
    return data


def read_log(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def run_cli(script, *args, timeout=300):
    """The script as a user runs it, in a subprocess."""
    return subprocess.run([sys.executable, os.path.join(HERE, script), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=HERE)


@contextlib.contextmanager
def small_tmpfs(path, size="1m", options=""):
    """A real, small filesystem mounted at path (root only); the test is skipped where it cannot be made."""
    os.makedirs(path, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}{options}", "tmpfs", str(path)],
                       capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield str(path)
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TINY = ["--dataset", "shapes", "--limit", "128", "--batch-size", "16", "--ngf", "16", "--ndf", "16",
        "--nz", "16", "--log-every", "4"]


# ----------------------------------------------------------------------------- gan.py: networks
def dcgan_expected_params(nz, ngf, ndf, nc, s0, n):
    """Count DCGAN weights layer by layer from the paper's recipe, independently of gan.py."""
    gw = [ngf * 2 ** i for i in reversed(range(n))]
    g = nz * gw[0] * s0 * s0 + 2 * gw[0]
    g += sum(a * b * 16 + 2 * b for a, b in zip(gw, gw[1:])) + gw[-1] * nc * 16
    dw = [ndf * 2 ** i for i in range(n)]
    d = nc * dw[0] * 16 + sum(a * b * 16 + 2 * b for a, b in zip(dw, dw[1:])) + dw[-1] * s0 * s0
    return g, d


def build(arch, size, nc=3, ncls=0, **kw):
    args = gan.get_args(["--dataset", "shapes", "--arch", arch, "--image-size", str(size),
                         *sum(([f"--{k}", str(v)] for k, v in kw.items()), [])])
    return gan.build_nets(args, nc, ncls)


def test_pytorch_examples_dcgan_counts():
    G, D = build("dcgan", 64, ngf=64, ndf=64, nz=100)
    assert gan.count_params(G) == 3_576_704 and gan.count_params(D) == 2_765_568


@pytest.mark.parametrize("size,s0,n", [(28, 7, 2), (32, 4, 3), (64, 4, 4), (128, 4, 5)])
@pytest.mark.parametrize("nc", [1, 3])
def test_dcgan_shapes_and_counts_every_size(size, s0, n, nc):
    G, D = build("dcgan", size, nc=nc, ngf=8, ndf=8, nz=10)
    assert (gan.count_params(G), gan.count_params(D)) == dcgan_expected_params(10, 8, 8, nc, s0, n)
    x = G(torch.randn(3, 10))
    assert x.shape == (3, nc, size, size) and x.abs().max() <= 1
    assert D(x).shape == (3,)


@pytest.mark.parametrize("size", [28, 32, 64])
def test_upsample_arch_shapes_and_conditioning(size):
    G, D = build("upsample", size, nc=3, ncls=4, ngf=8, ndf=16, nz=10)
    y = torch.tensor([0, 3])
    x = G(torch.randn(2, 10), y)
    assert x.shape == (2, 3, size, size) and D(x, y).shape == (2,)
    # the label really enters D: same image, different class, different logit
    D.eval()
    assert not torch.allclose(D(x, torch.tensor([0, 0])), D(x, torch.tensor([1, 1])))


def test_unsupported_image_size_is_a_clear_error():
    with pytest.raises(SystemExit, match="--image-size 30"):
        build("dcgan", 30)


def test_param_ratio_warning(capsys):
    G, D = build("dcgan", 32, ngf=8, ndf=64)
    gan.report_ratio(G, D)
    assert "warning" in capsys.readouterr().out
    G, D = build("dcgan", 32, ngf=64, ndf=32)
    gan.report_ratio(G, D)
    assert "warning" not in capsys.readouterr().out


# ----------------------------------------------------------------------------- gan.py: balancing
@pytest.mark.parametrize("err_real,err_fake,expected", [
    (0.5, 0.5, (True, True)),     # balanced: both learn
    (0.2, 0.5, (False, True)),    # D already right on reals: D rests
    (0.5, 0.1, (False, True)),    # ... or on fakes
    (0.8, 0.5, (True, False)),    # D fooled on reals: G rests
    (0.5, 0.75, (True, False)),
    (0.1, 0.9, (True, True)),     # both would rest: both learn
])
def test_margin_rule(err_real, err_fake, expected):
    assert gan.margin_rule(err_real, err_fake, 0.3) == expected


def test_l2_rule_steps_and_floor():
    assert gan.l2_rule(0.0, 1.5) == pytest.approx(1e-5)
    assert gan.l2_rule(3e-5, 1.0) == 3e-5
    assert gan.l2_rule(3e-5, 0.5) == pytest.approx(2e-5)
    assert gan.l2_rule(0.0, 0.5) == 0.0


def test_swap_real_batch_composition():
    real, fake = torch.zeros(10, 1, 2, 2), torch.ones(10, 1, 2, 2)
    yr, yf = torch.zeros(10, dtype=torch.long), torch.ones(10, dtype=torch.long)
    x, y = gan.swap_real(real, yr, fake, yf, 0.2)
    assert x.shape == real.shape and x[:2].eq(1).all() and x[2:].eq(0).all()
    assert y.tolist() == [1, 1] + [0] * 8
    x, y = gan.swap_real(real, yr, fake, yf, 0.0)
    assert x is real


# ----------------------------------------------------------------------------- gan.py: latent maths
def test_lerp_and_slerp_endpoints_and_norms():
    torch.manual_seed(0)
    a, b = torch.randn(50), torch.randn(50)
    b = b / b.norm() * a.norm()
    t = torch.linspace(0, 1, 7)
    for f in (gan.lerp, gan.slerp):
        p = f(a, b, t)
        assert torch.allclose(p[0], a, atol=1e-5) and torch.allclose(p[-1], b, atol=1e-5)
    # equal-norm endpoints: slerp stays on the sphere, lerp cuts inside it
    assert torch.allclose(gan.slerp(a, b, t).norm(dim=1), a.norm().expand(7), rtol=1e-5)
    assert gan.lerp(a, b, t).norm(dim=1)[3] < a.norm() * 0.95


@pytest.mark.parametrize("slerp", [gan.slerp, vaegan.slerp], ids=["gan", "vaegan"])
def test_slerp_antipodal_and_parallel(slerp):
    # float32 cosines of a vector with itself round to 0.99999994, and acos of that is 3e-4: try many vectors
    for seed in range(40):
        a = torch.randn(20, generator=torch.Generator().manual_seed(seed))
        p = slerp(a, -a, torch.linspace(0, 1, 5))
        assert torch.isfinite(p).all()
        assert torch.allclose(p[-1], -a, atol=1e-5)
        assert torch.allclose(p.norm(dim=1), a.norm().expand(5), rtol=1e-5)
        assert abs(p[2] @ a) < 1e-3 * a.norm() ** 2  # halfway: orthogonal to both ends, never the origin
        assert torch.allclose(slerp(a, a, torch.linspace(0, 1, 3)), a.expand(3, -1), atol=1e-6)
        b = 2 * a  # parallel with another norm: the path stays on the ray and its norm goes linearly
        q = slerp(a, b, torch.linspace(0, 1, 5))
        assert torch.allclose(q[-1], b, atol=1e-5)
        assert torch.allclose(q.norm(dim=1), a.norm() * torch.linspace(1, 2, 5), rtol=1e-5)


@pytest.mark.parametrize("slerp", [gan.slerp, vaegan.slerp], ids=["gan", "vaegan"])
def test_slerp_direction_and_norm_against_closed_form(slerp):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(30, generator=g), 3 * torch.randn(30, generator=g)
    t = torch.linspace(0, 1, 9)
    p = slerp(a, b, t)
    ua, ub = a / a.norm(), b / b.norm()
    omega = torch.acos(ua @ ub)
    # the textbook form (Shoemake 1985) for the direction; the norm goes linearly from |a| to |b|
    direction = torch.sin((1 - t) * omega)[:, None] * ua + torch.sin(t * omega)[:, None] * ub
    direction = direction / torch.sin(omega)
    assert torch.allclose(p / p.norm(dim=1, keepdim=True), direction, atol=1e-5)
    assert torch.allclose(p.norm(dim=1), a.norm() + (b.norm() - a.norm()) * t, rtol=1e-5)


def test_parzen_matches_closed_form_and_ranks():
    x, s = torch.tensor([[0.2, 0.4]]), torch.tensor([[0.0, 0.0]])
    sigma = 0.5
    expected = -(0.2 ** 2 + 0.4 ** 2) / (2 * sigma ** 2) - math.log(2 * math.pi * sigma ** 2)
    assert gan.parzen_log_likelihood(s, x, sigma).item() == pytest.approx(expected, rel=1e-6)
    torch.manual_seed(0)
    samples = torch.rand(200, 16) * 0.2
    near, far = torch.rand(50, 16) * 0.2, torch.rand(50, 16) * 0.2 + 0.8
    sigma, m_near, se = gan.parzen_eval(samples, near[:25], near[25:])
    _, m_far, _ = gan.parzen_eval(samples, near[:25], far[25:])
    assert m_near > m_far and se > 0


def test_nearest_neighbours_finds_the_copy():
    train = torch.randint(0, 256, (100, 3, 8, 8), dtype=torch.uint8)
    pick = torch.tensor([5, 77, 0])
    assert gan.nearest_neighbours(train[pick].float() + 0.3, train, chunk=16).tolist() == pick.tolist()


# ----------------------------------------------------------------------------- gan.py: data
def gan_trust_cifar(monkeypatch, root):
    """Make gan.py accept the fake CIFAR-10 under root: its md5s in place of the official ones."""
    md5 = {}
    tar = os.path.join(root, "cifar-10-python.tar.gz")
    if os.path.exists(tar):
        md5["cifar-10-python.tar.gz"] = gan.md5_of(open(tar, "rb").read())
        with tarfile.open(tar) as t:
            md5.update({os.path.basename(m.name): gan.md5_of(t.extractfile(m).read()) for m in t.getmembers()
                        if m.isfile()})
    folder = os.path.join(root, "cifar-10-batches-py")
    if os.path.isdir(folder):
        md5.update({n: gan.md5_of(open(os.path.join(folder, n), "rb").read()) for n in os.listdir(folder)})
    monkeypatch.setattr(gan, "CIFAR_MD5", {k: v for k, v in md5.items() if k in gan.CIFAR_MD5})


def test_cifar10_reader_official_tarball(tmp_path, monkeypatch):
    batches = write_cifar_tarball(tmp_path, protocol=4)
    gan_trust_cifar(monkeypatch, tmp_path)
    x, y, classes = gan.read_cifar10(str(tmp_path), "train")
    assert x.shape == (30, 3, 32, 32) and x.dtype == torch.uint8 and classes[9] == "truck"
    first = batches["data_batch_1"][0][0]
    assert np.array_equal(x[0, 0].numpy().ravel(), first[:1024]) and np.array_equal(x[0, 2].numpy().ravel(), first[2048:])
    assert y[6:12].tolist() == batches["data_batch_2"][1]
    xt, yt, _ = gan.read_cifar10(str(tmp_path), "test")
    assert xt.shape == (6, 3, 32, 32) and yt.tolist() == batches["test_batch"][1]


def test_idx_reader_and_mnist_layout(tmp_path):
    data = write_mnist(tmp_path)
    x, y, classes = gan.load_mnist(str(tmp_path), "fashion-mnist", "train")
    assert x.shape == (40, 1, 28, 28) and np.array_equal(x[:, 0].numpy(), data["train"][0])
    assert y.tolist() == data["train"][1].tolist() and classes[9] == "Ankle boot"
    xt, _, _ = gan.load_mnist(str(tmp_path), "mnist", "test")
    assert xt.shape == (20, 1, 28, 28)


def test_missing_data_offline_names_the_files(tmp_path, monkeypatch):
    def no_network(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(gan.urllib.request, "urlopen", no_network)
    monkeypatch.setattr(gan, "SYSTEM_DATA", str(tmp_path / "system"))
    with pytest.raises(SystemExit, match="train-images-idx3-ubyte.gz"):
        gan.load_mnist(str(tmp_path), "mnist", "train")
    with pytest.raises(SystemExit, match="cifar-10-python.tar.gz"):
        gan.read_cifar10(str(tmp_path), "train")


def make_image_folder(root, n=6):
    rng = np.random.default_rng(0)
    for cls, ext in (("cats", "png"), ("dogs", "jpg")):
        os.makedirs(os.path.join(root, cls))
        for i in range(n):
            arr = rng.integers(0, 256, (40 + 4 * i, 50, 3), dtype=np.uint8)
            Image.fromarray(arr).save(os.path.join(root, cls, f"{i}.{ext}"))


def test_folder_loader_labels_crop_and_cache(tmp_path):
    make_image_folder(tmp_path)
    x, y, classes = gan.load_folder(str(tmp_path), 32, None, 2)
    assert classes == ["cats", "dogs"] and x.shape == (12, 3, 32, 32) and y.tolist() == [0] * 6 + [1] * 6
    assert len(list(tmp_path.glob(".cache-32px-*.npz"))) == 1
    x2, y2, _ = gan.load_folder(str(tmp_path), 32, None, 2)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    xg, _, _ = gan.load_folder(str(tmp_path), 16, 1, 2)
    assert xg.shape == (12, 1, 16, 16)


def test_folder_loader_errors(tmp_path):
    with pytest.raises(SystemExit, match="no images"):
        gan.load_folder(str(tmp_path), 32, None, 1)
    with pytest.raises(SystemExit, match="not a folder"):
        gan.load_folder(str(tmp_path / "nope"), 32, None, 1)
    make_image_folder(tmp_path, 2)
    (tmp_path / "cats" / "broken.png").write_bytes(b"definitely not a png")
    with pytest.raises(SystemExit, match="broken.png"):
        gan.load_folder(str(tmp_path), 32, None, 1)


def write_transparent_icons(root):
    """Four 8 px icons as icon sets store them: an opaque square of (200, 100, 50), a half-transparent
    corner, and transparent pixels holding white in one file, black in another; a palette PNG and a grey
    one with alpha beside them."""
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 255  # white under full transparency
    rgba[2:6, 2:6] = (200, 100, 50, 255)
    rgba[0, 0] = (200, 100, 50, 128)
    Image.fromarray(rgba, "RGBA").save(root / "c_white.png")
    rgba[rgba[..., 3] == 0] = 0  # the same icon, black under full transparency
    Image.fromarray(rgba, "RGBA").save(root / "d_black.png")
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([255, 255, 255, 10, 200, 30] + [0] * 762)
    pal.putpixel((3, 3), 1)
    pal.save(root / "b_palette.png", transparency=b"\x00\xff")  # index 0 transparent (bytes: Pillow warns)
    grey = np.stack([np.full((8, 8), 255, np.uint8), np.zeros((8, 8), np.uint8)], -1)
    grey[3, 3] = (90, 255)
    Image.fromarray(grey, "LA").save(root / "a_grey.png")


@pytest.mark.parametrize("script", [gan, lapgan, vaegan], ids=lambda m: m.__name__)
def test_folder_images_with_transparency_are_drawn_over_black(tmp_path, script, monkeypatch):
    write_transparent_icons(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's warning on a palette's transparency, had it been dropped
        x, _, _ = script.load_folder(str(tmp_path), 8, None, 1)
    grey, pal, white, black = x  # sorted by name; the greys joined as RGB
    assert torch.equal(white, black)  # what a transparent pixel happens to store no longer shows
    assert white[:, 7, 7].tolist() == [0, 0, 0] and white[:, 3, 3].tolist() == [200, 100, 50]
    assert white[:, 0, 0].tolist() == [round(c * 128 / 255) for c in (200, 100, 50)]  # half over black
    assert pal[:, 0, 0].tolist() == [0, 0, 0] and pal[:, 3, 3].tolist() == [10, 200, 30]
    assert grey[:, 0, 0].tolist() == [0, 0, 0] and grey[:, 3, 3].tolist() == [90, 90, 90]
    # a cache written by the decoder before this one is not reused
    monkeypatch.setattr(script, "DECODER", 1)
    script.load_folder(str(tmp_path), 8, None, 1)
    assert len(list(tmp_path.glob(".cache-8px-*.npz"))) == 2


def test_shapes_dataset_is_deterministic_and_labelled():
    x, y, classes = gan.make_shapes(60, 32, 0)
    x2, _, _ = gan.make_shapes(60, 32, 0)
    assert torch.equal(x, x2) and x.shape == (60, 3, 32, 32) and set(y.tolist()) == set(range(len(classes)))
    # the shape is brighter than the background: real structure to learn
    assert (x.float().amax((1, 2, 3)) - x.float().amin((1, 2, 3))).min() > 50


# ----------------------------------------------------------------------------- gan.py: command line
def test_train_resume_is_exact_and_sampling_formats(tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    gan.main(TINY + ["--conditional", "--epochs", "2", "--outf", full])
    gan.main(TINY + ["--conditional", "--epochs", "1", "--outf", part])
    assert not os.path.exists(os.path.join(part, "ckpt.pt.tmp"))
    with open(os.path.join(part, "log.csv"), "a") as f:  # a crash mid-epoch 2 had logged a row
        f.write("12,2,9,9,9,9,9,9,1,1,0\n")
    gan.main(TINY + ["--conditional", "--epochs", "2", "--outf", part, "--resume"])
    assert read_log(os.path.join(full, "log.csv")) == read_log(os.path.join(part, "log.csv"))
    a = torch.load(os.path.join(full, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(part, "ckpt.pt"), weights_only=True)
    assert a["step"] == b["step"] == 16 and all(torch.equal(a["G"][k], b["G"][k]) for k in a["G"])
    for f in ("samples_e001.png", "samples_e002.png", "curves.png", "dhist.png", "log.csv"):
        assert os.path.exists(os.path.join(full, f)), f
    npz = str(tmp_path / "s.npz")
    gan.main(["--sample", "--ckpt", os.path.join(full, "ckpt.pt"), "--n", "12", "--label", "2", "--npz", npz,
              "--interp", "slerp", "--steps", "5", "--nn", "--class-grid", "--eval", "--eval-samples", "200"])
    z = np.load(npz)
    assert z["images"].dtype == np.uint8 and z["images"].shape == (12, 32, 32, 3)
    assert z["labels"].dtype == np.int64 and (z["labels"] == 2).all()
    w, h = Image.open(os.path.join(full, "samples_slerp.png")).size
    assert (w, h) == (2 + 5 * 34, 2 + 8 * 34)  # 8 interpolations of 5 steps
    assert Image.open(os.path.join(full, "samples_nn.png")).size == (2 + 8 * 34, 2 + 8 * 34)
    assert Image.open(os.path.join(full, "samples_classes.png")).size[1] == 2 + 6 * 34  # one row per class


def test_balancing_rules_are_logged(tmp_path):
    gan.main(TINY + ["--epochs", "1", "--balance", "margin", "--d-pretrain", "3", "--swap-real", "0.25",
                     "--swap-epochs", "1", "--outf", str(tmp_path / "m")])
    rows = read_log(str(tmp_path / "m" / "log.csv"))
    assert {"upd_d", "upd_g", "l2", "d_x", "d_gz"} <= set(rows[0]) and int(rows[-1]["step"]) == 8
    assert all(float(r["upd_d"]) + float(r["upd_g"]) >= 1 for r in rows)  # never both skipped
    gan.main(TINY + ["--epochs", "1", "--balance", "l2", "--optimizer", "rmsprop", "--lr", "1e-3",
                     "--outf", str(tmp_path / "l2")])
    rows = read_log(str(tmp_path / "l2" / "log.csv"))
    assert all(float(r["l2"]) >= 0 for r in rows) and any(float(r["l2"]) > 0 for r in rows)


def test_nan_stops_training_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    outf = str(tmp_path / "nan")
    gan.main(TINY + ["--epochs", "1", "--outf", outf])
    before = open(os.path.join(outf, "ckpt.pt"), "rb").read()
    real_step = gan.train_step

    def poisoned(*a, **k):
        out = real_step(*a, **k)
        out["err_g"] = out["err_g"] * float("nan")
        return out
    monkeypatch.setattr(gan, "train_step", poisoned)
    with pytest.raises(SystemExit, match="NaN") as e:
        gan.main(TINY + ["--epochs", "2", "--outf", outf, "--resume"])
    assert f"checkpoint {os.path.join(outf, 'ckpt.pt')} is kept" in str(e.value)
    assert open(os.path.join(outf, "ckpt.pt"), "rb").read() == before


def test_a_nan_before_the_first_checkpoint_says_so_and_leaves_a_folder_that_starts_again(tmp_path, monkeypatch):
    """lapgan and vaegan diverge for real at --lr 10; gan's nets (BN, tanh) do not, so its loss is poisoned."""
    real_step = gan.train_step

    def poisoned(*a, **k):
        out = real_step(*a, **k)
        out["err_g"] = out["err_g"] * float("nan")
        return out
    runs = [(gan, TINY + ["--epochs", "1"], []),
            (lapgan, LAPGAN_TINY + ["--epochs", "1"], ["--lr", "10"]),
            (vaegan, VAEGAN_TINY + ["--limit", "64", "--epochs", "1"], ["--lr", "10"])]
    for script, flags, diverging in runs:
        outf = str(tmp_path / script.__name__)
        torch.manual_seed(0)
        with monkeypatch.context() as m:
            if script is gan:
                m.setattr(gan, "train_step", poisoned)
            with pytest.raises(SystemExit, match="NaN") as e:
                script.main(flags + diverging + ["--outf", outf])
        assert "no checkpoint was written yet" in str(e.value) and "is kept" not in str(e.value)
        assert not os.path.exists(os.path.join(outf, "log.csv"))  # nothing to resume, nothing that refuses
        script.main(flags + ["--outf", outf])  # the same folder starts again
        assert os.path.exists(os.path.join(outf, "ckpt.pt"))


def test_bad_inputs_give_one_line_errors(tmp_path):
    r = run_cli("gan.py", "--dataset", "shapes", "--cuda", "--outf", str(tmp_path / "c"))
    if not torch.cuda.is_available():
        assert r.returncode != 0 and r.stderr.strip().splitlines() == [
            "error: --cuda was given but PyTorch sees no CUDA GPU; drop --cuda to run on the CPU"]
    torch.save({"script": "vaegan", "args": {}}, tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="vaegan.py, not gan.py"):
        gan.main(["--sample", "--ckpt", str(tmp_path / "other.pt")])
    with pytest.raises(SystemExit, match="no checkpoint"):
        gan.main(TINY + ["--resume", "--outf", str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match="no images"):
        gan.main(["--dataset", "folder", "--dataroot", str(tmp_path), "--outf", str(tmp_path / "o")])


def _ddp_worker(rank, port, outf, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    writes = []
    for name in ("write_atomic", "append_log"):  # every file a run writes goes through one of them
        real = getattr(gan, name)
        setattr(gan, name, lambda *a, _real=real, _name=name, **k: (writes.append(_name), _real(*a, **k))[1])
    G, D = gan.main(TINY + ["--epochs", "1", "--balance", "margin", "--outf", outf])
    torch.save({"G": G.state_dict(), "D": D.state_dict(), "writes": writes,
                "torn_down": not torch.distributed.is_initialized()}, f"{result}{rank}.pt")


def test_torchrun_style_data_parallel_two_ranks(tmp_path):
    outf, result = str(tmp_path / "ddp"), str(tmp_path / "rank")
    torch.multiprocessing.spawn(_ddp_worker, args=(free_port(), outf, result), nprocs=2)
    r0, r1 = (torch.load(f"{result}{r}.pt", weights_only=True) for r in (0, 1))
    assert r1["writes"] == [] and "write_atomic" in r0["writes"]
    assert r0["torn_down"] and r1["torn_down"]  # main leaves no process group behind for exit to tear down
    for net in ("G", "D"):
        assert all(torch.equal(r0[net][k], r1[net][k]) for k in r0[net]), net
    assert read_log(os.path.join(outf, "log.csv"))[-1]["step"] == "4"  # 128 images / (2 ranks x 16)


# ----------------------------------------------------------------------------- gan.py: the method against the papers
def gan_tiny_run(*extra, n=32):
    """A run on n built-in shapes at 32x32, single process on the CPU, as training sets it up."""
    args = gan.get_args(TINY + list(extra))
    torch.manual_seed(args.seed)  # the same weights for the same flags
    return gan.setup_run(args, torch.device("cpu"), gan.make_shapes(n, 32, 0))


def gan_step_grads(run, coef, seed=3):
    """One train_step with SGD at lr 0 (so nothing moves): D's and G's gradients, and the batch used."""
    run.opt_G, run.opt_D = (torch.optim.SGD(net.parameters(), lr=0.0) for net in (run.G, run.D))
    run.l2 = coef
    x, y = gan.get_batch(run, torch.arange(16))
    torch.manual_seed(seed)
    gan.train_step(run, x, y, 0.0)
    grads = {k: [p.grad.clone() for p in getattr(run, k).parameters()] for k in ("G", "D")}
    return grads, x


@pytest.mark.parametrize("balance,half", [("none", 1.0), ("l2", 0.5)])
def test_gan_step_gradients_match_the_losses_of_the_paper(balance, half):
    run = gan_tiny_run("--balance", balance)
    G0, D0 = copy.deepcopy(run.G), copy.deepcopy(run.D)
    coef = 0.03
    grads, x = gan_step_grads(run, coef)
    torch.manual_seed(3)
    z = torch.randn(16, run.args.nz)
    # D: BCE on reals (target 1) and detached fakes (target 0); under the L2 rule the mean of the two (the
    # faces code's BCE over the mixed batch) plus coef/2 |theta_D|^2 on D's weights only
    fake = G0(z)
    logit_real, logit_fake = D0(x), D0(fake.detach())
    loss_d = -(F.logsigmoid(logit_real).mean() + F.logsigmoid(-logit_fake).mean()) * half
    loss_d = loss_d + coef / 2 * sum(p.pow(2).sum() for p in D0.parameters())
    want_d = torch.autograd.grad(loss_d, list(D0.parameters()))
    for g, w in zip(grads["D"], want_d):
        assert torch.allclose(g, w, atol=1e-6, rtol=1e-4)
    # G: the non-saturating loss -log D(G(z)) (Goodfellow et al. Sec. 3), not log(1 - D(G(z)))
    loss_g = -F.logsigmoid(D0(G0(z))).mean()
    want_g = torch.autograd.grad(loss_g, list(G0.parameters()))
    for g, w in zip(grads["G"], want_g):
        assert torch.allclose(g, w, atol=1e-6, rtol=1e-4)


def test_gan_l2_rule_halves_the_d_step_and_penalises_d_only():
    plain, _ = gan_step_grads(gan_tiny_run("--balance", "none"), 0.0)
    l2, _ = gan_step_grads(gan_tiny_run("--balance", "l2"), 0.0)
    for a, b in zip(plain["D"], l2["D"]):  # the same nets and batch: the ratio is exactly 1/2
        assert torch.allclose(b, a / 2, atol=1e-7, rtol=1e-5)
    run = gan_tiny_run("--balance", "l2")
    with_coef, _ = gan_step_grads(run, 0.5)
    for p, a, b in zip(run.D.parameters(), l2["D"], with_coef["D"]):
        assert torch.allclose(b - a, 0.5 * p.detach(), atol=1e-5)  # d/dW of coef/2 |W|^2 is coef W


def test_gan_resume_keeps_the_l2_coefficient_and_counters(tmp_path):
    run = gan_tiny_run("--balance", "l2", "--outf", str(tmp_path))
    run.l2, run.step, run.epoch, run.dhist = 3e-5, 7, 1, [torch.ones(2, 20)]
    ckpt = gan.checkpoint(run)
    other = gan_tiny_run("--balance", "l2", "--outf", str(tmp_path))
    gan.restore(other, ckpt)
    assert other.l2 == 3e-5 and other.step == 7 and other.epoch == 1
    assert torch.equal(torch.stack(other.dhist), torch.ones(1, 2, 20))


def test_gan_parzen_weights_each_sample_by_one_over_n():
    x, samples, sigma = torch.tensor([[0.3, 0.1]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]]), 0.4
    dens = [math.exp(-((x[0] - m) ** 2).sum().item() / (2 * sigma ** 2)) / (2 * math.pi * sigma ** 2)
            for m in samples]
    expected = math.log(sum(dens) / len(dens))  # the mixture's density: the mean of the kernels
    assert gan.parzen_log_likelihood(samples, x, sigma).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("arch", ["dcgan", "upsample"])
def test_gan_batch_norm_scales_start_near_one(arch):
    G, D = build(arch, 32, ngf=32, ndf=32, nz=10)
    scales = torch.cat([m.weight.detach() for m in list(G.modules()) + list(D.modules())
                        if isinstance(m, nn.BatchNorm2d)])
    assert abs(scales.mean().item() - 1) < 0.01 and scales.std().item() < 0.03  # DCGAN Sec. 4: N(1, 0.02)
    if arch == "dcgan":
        convs = torch.cat([m.weight.detach().flatten() for m in G.modules() if isinstance(m, nn.ConvTranspose2d)])
        assert abs(convs.std().item() - 0.02) < 0.002 and abs(convs.mean().item()) < 0.001


def test_gan_upsample_takes_the_faces_code_defaults_and_schedule():
    a = gan.get_args(["--dataset", "shapes", "--arch", "upsample"])
    assert (a.nz, a.lr, a.optimizer, a.balance) == (512, 1e-3, "rmsprop", "margin")
    a = gan.get_args(["--dataset", "shapes", "--arch", "upsample", "--nz", "64", "--lr", "5e-4", "--balance", "l2"])
    assert (a.nz, a.lr, a.optimizer, a.balance) == (64, 5e-4, "rmsprop", "l2")
    a = gan.get_args(["--dataset", "shapes"])
    assert (a.nz, a.lr, a.optimizer, a.balance) == (100, 2e-4, "adam", "none")
    lr = 1e-3  # lfw_adverserial.lua: lr/50 for 10 updates, lr/5 until 30; train_lfw.lua: 0.99 per epoch
    assert [gan.faces_lr(lr, s, 1) for s in (0, 9, 10, 29, 30, 500)] == [lr / 50] * 2 + [lr / 5] * 2 + [lr] * 2
    assert gan.faces_lr(lr, 100, 4) == pytest.approx(lr * 0.99 ** 3) and gan.faces_lr(lr, 100, 2000) == 1e-6
    run = gan_tiny_run("--arch", "upsample", "--lr", "1e-3")
    for step, want in ((0, lr / 50), (12, lr / 5), (40, lr)):
        run.step = step
        gan.train_step(run, *gan.get_batch(run, torch.arange(16)), 0.0)
        assert all(g["lr"] == pytest.approx(want) for o in (run.opt_G, run.opt_D) for g in o.param_groups)


def test_gan_bn_d_and_dropout_g_for_the_upsample_arch():
    G, D = build("upsample", 64, ngf=8, ndf=16, nz=10)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in D.modules())  # the faces code's D has none
    G, D = gan.build_nets(gan.get_args(["--dataset", "shapes", "--arch", "upsample", "--image-size", "64",
                                        "--ngf", "8", "--ndf", "16", "--nz", "10", "--bn-d", "--dropout-g", "0.3"]), 3, 0)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in D.modules()) == 2  # 3 conv blocks, none on the input
    drops = [m for m in G.modules() if type(m) is nn.Dropout]
    assert len(drops) == 3 and all(m.p == 0.3 for m in drops)
    G.train()
    z = torch.randn(4, 10)
    assert not torch.equal(G(z), G(z))  # dropout is live in training
    with pytest.raises(SystemExit):
        gan.get_args(["--dataset", "shapes", "--bn-d"])


# ----------------------------------------------------------------------------- gan.py: bad input and faults
def gan_one_line_error(*fragments, call):
    """call() stops with one line, 'error: ...', holding every fragment."""
    with pytest.raises(SystemExit) as e:
        call()
    msg = str(e.value)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_gan_cifar_checksums_and_restricted_unpickler(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_cifar_tarball(tmp_path, protocol=4)
    gan_one_line_error("cifar-10-python.tar.gz does not match the official CIFAR-10 checksum", "delete it",
                       call=lambda: gan.read_cifar10(str(tmp_path), "train"))
    # a crafted batch whose md5 matches (patched): the unpickler still refuses to call os.system
    evil = tmp_path / "evil"
    os.makedirs(evil / "cifar-10-batches-py")
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["batches.meta"]:
        (evil / "cifar-10-batches-py" / name).write_bytes(pickle.dumps({b"data": RunsCode()}, protocol=4))
    with tarfile.open(evil / "cifar-10-python.tar.gz", "w:gz") as t:
        t.add(evil / "cifar-10-batches-py", "cifar-10-batches-py")
    for layout in ("folder", "tarball"):
        if layout == "tarball":
            shutil.rmtree(evil / "cifar-10-batches-py")
        gan_trust_cifar(monkeypatch, evil)
        gan_one_line_error("is not an official CIFAR-10 batch", "system is not in an official batch",
                           call=lambda: gan.read_cifar10(str(evil), "train"))
        assert not (tmp_path / "PWNED").exists()
    # the extracted folder: each batch file is checked
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz") as t:
        t.extractall(tmp_path / "x", filter="data")
    gan_trust_cifar(monkeypatch, tmp_path / "x")
    x, y, classes = gan.read_cifar10(str(tmp_path / "x"), "train")
    assert x.shape == (30, 3, 32, 32) and classes[0] == "airplane"
    with open(tmp_path / "x" / "cifar-10-batches-py" / "data_batch_3", "ab") as f:
        f.write(b"!")
    gan_one_line_error("data_batch_3 does not match the official CIFAR-10 checksum",
                       call=lambda: gan.read_cifar10(str(tmp_path / "x"), "train"))
    # a truncated tarball (its md5 patched to match): damaged, not a traceback
    tar = tmp_path / "cifar-10-python.tar.gz"
    tar.write_bytes(tar.read_bytes()[:300])
    monkeypatch.setattr(gan, "CIFAR_MD5", {**gan.CIFAR_MD5, "cifar-10-python.tar.gz": gan.md5_of(tar.read_bytes())})
    gan_one_line_error("cifar-10-python.tar.gz is damaged", "delete it to download it again, or replace it",
                       call=lambda: gan.read_cifar10(str(tmp_path), "train"))


def test_gan_idx_reader_raw_and_damaged_files(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (5, 28, 28))
    write_idx(tmp_path / "a.gz", x)
    raw = gzip.decompress((tmp_path / "a.gz").read_bytes())
    (tmp_path / "a").write_bytes(raw)
    assert np.array_equal(gan.read_idx(str(tmp_path / "a")), x)  # uncompressed, as some packages ship it
    (tmp_path / "cut.gz").write_bytes((tmp_path / "a.gz").read_bytes()[:-30])
    gan_one_line_error("cut.gz is damaged", "delete it to download it again, or replace it",
                       call=lambda: gan.read_idx(str(tmp_path / "cut.gz")))
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(raw[:-28 * 28])  # four images where the header says five
    gan_one_line_error("short.gz is damaged", "fewer items", call=lambda: gan.read_idx(str(tmp_path / "short.gz")))


def test_gan_16_bit_png_and_unreadable_subfolder(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "a")
    grey16 = np.array([[0, 257 * 100], [40000, 65535]] * 2, np.uint16).reshape(4, 2).repeat(2, 1)
    Image.fromarray(grey16).save(tmp_path / "a" / "deep.png")
    assert Image.open(tmp_path / "a" / "deep.png").mode in ("I;16", "I")
    out = gan.decode_image(str(tmp_path / "a" / "deep.png"), 4, None)
    assert out.dtype == np.uint8 and np.array_equal(out, (grey16.astype(np.int64) >> 8).astype(np.uint8))
    os.makedirs(tmp_path / "b")
    real_scandir = os.scandir

    def locked(path):
        if os.path.basename(os.fspath(path)) == "b":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", locked)
    gan_one_line_error(f"cannot read {tmp_path / 'b'} (Permission denied)", "fix its permissions",
                       call=lambda: gan.load_folder(str(tmp_path), 8, None, 1))


def test_gan_folder_cache_is_atomic_and_a_damaged_one_is_rebuilt(tmp_path):
    make_image_folder(tmp_path, 2)
    x, y, _ = gan.load_folder(str(tmp_path), 16, None, 1)
    (cache,) = tmp_path.glob(".cache-*.npz")
    cache.write_bytes(cache.read_bytes()[:100])  # a crash or a full disk cut it short
    x2, y2, _ = gan.load_folder(str(tmp_path), 16, None, 1)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not list(tmp_path.glob("*.tmp")) and np.load(cache)["x"].shape == (4, 3, 16, 16)


def test_gan_full_disk_keeps_the_last_checkpoint(tmp_path):
    """A real full disk (a 1 MB tmpfs): torch.save raises RuntimeError there, not OSError; one line, the
    previous file kept, no .tmp left behind."""
    with small_tmpfs(tmp_path / "disk") as disk:
        path = os.path.join(disk, "ckpt.pt")
        gan.write_atomic(path, lambda f: torch.save({"script": "gan", "w": torch.zeros(1000)}, f))
        before = open(path, "rb").read()
        big = {"script": "gan", "w": torch.zeros(300_000)}  # 1.2 MB: more than the disk holds
        gan_one_line_error(f"no space left on device writing {path}; the previous file is kept",
                           call=lambda: gan.write_atomic(path, lambda f: torch.save(big, f)))
        assert open(path, "rb").read() == before and os.listdir(disk) == ["ckpt.pt"]


@pytest.mark.parametrize("flags,fragment", [
    (["--image-size", "0"], "--image-size 0 is out of range"), (["--image-size", "-8"], "--image-size -8"),
    (["--image-size", "5000"], "it must lie in [1, 1024]"), (["--epochs", "0"], "--epochs 0 is out of range"),
    (["--batch-size", "1"], "--batch-size 1 is out of range"), (["--log-every", "0"], "--log-every 0"),
    (["--n", "0"], "--n 0 is out of range"),
], ids=["size0", "size-neg", "size-huge", "epochs0", "batch1", "log0", "n0"])
def test_gan_numbers_and_paths_checked_after_parsing(tmp_path, flags, fragment):
    (tmp_path / "f").write_text("x")
    flags = [str(tmp_path / "f") if v == "__FILE__" else v for v in flags]
    gan_one_line_error(fragment, call=lambda: gan.get_args(["--dataset", "shapes"] + flags))


def test_gan_run_folder_resume_flags_label_and_too_little_data(tmp_path):
    outf = str(tmp_path / "run")
    gan.main(TINY + ["--epochs", "1", "--outf", outf])
    gan_one_line_error(f"{outf} already holds a run; add --resume to continue it, or choose another --outf",
                       call=lambda: gan.main(TINY + ["--epochs", "1", "--outf", outf]))
    gan_one_line_error("--lr, --batch-size differ from it", "(only --dataroot, --epochs, --outf, --cuda, --amp, "
                       "--compile, --workers, --log-every may change): drop them",
                       call=lambda: gan.main(["--resume", "--outf", outf, "--epochs", "2", "--lr", "1e-3",
                                              "--batch-size", "8"]))
    gan_one_line_error("the checkpoint has already trained 1 epochs; give --epochs larger than 1",
                       call=lambda: gan.main(TINY + ["--epochs", "1", "--outf", outf, "--resume"]))
    before = read_log(os.path.join(outf, "log.csv"))
    gan.main(["--resume", "--outf", outf, "--epochs", "2", "--dataroot", str(tmp_path / "moved"), "--workers", "1"])
    ckpt = torch.load(os.path.join(outf, "ckpt.pt"), weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["args"]["dataroot"] == str(tmp_path / "moved")
    assert ckpt["args"]["batch_size"] == 16 and read_log(os.path.join(outf, "log.csv"))[:len(before)] == before
    gan_one_line_error("was trained without --conditional; drop --label",
                       call=lambda: gan.main(["--sample", "--ckpt", os.path.join(outf, "ckpt.pt"), "--label", "1"]))
    gan_one_line_error("only 10 training images, fewer than one batch of --batch-size 16; lower --batch-size",
                       call=lambda: gan.main(TINY + ["--limit", "10", "--outf", str(tmp_path / "few")]))


def test_gan_resume_alone_takes_the_checkpoints_data_and_length_and_this_machines_flags(tmp_path):
    data, outf = str(tmp_path / "data"), str(tmp_path / "run")
    make_image_folder(data, n=20)
    tiny = ["--dataset", "folder", "--image-size", "32", "--batch-size", "8", "--ngf", "8", "--ndf", "8",
            "--nz", "8", "--dataroot", data, "--outf", outf]
    gan.main(tiny + ["--epochs", "1"])
    ck = torch.load(os.path.join(outf, "ckpt.pt"), weights_only=True)
    # as if interrupted after epoch 1 of 2, on a machine with a GPU
    ck["args"].update(epochs=2, cuda=True, amp=True)
    torch.save(ck, os.path.join(outf, "ckpt.pt"))
    gan.main(["--resume", "--outf", outf])  # here: no ./data, no GPU, nothing typed but the folder
    ckpt = torch.load(os.path.join(outf, "ckpt.pt"), weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["args"]["dataroot"] == data and ckpt["args"]["epochs"] == 2
    assert ckpt["args"]["cuda"] is False and ckpt["args"]["amp"] is False


def test_gan_setup_run_and_train_step_on_random_data_change_the_weights():
    args = gan.get_args(["--dataset", "shapes", "--batch-size", "8", "--ngf", "8", "--ndf", "8", "--nz", "8"])
    data = (torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8), None, [])
    run = gan.setup_run(args, torch.device("cpu"), data)
    before = {k: [p.detach().clone() for p in getattr(run, k).parameters()] for k in ("G", "D")}
    out = gan.train_step(run, *gan.get_batch(run, torch.arange(8)))
    assert math.isfinite(out["err_d"].item()) and math.isfinite(out["err_g"].item())
    for k in ("G", "D"):
        assert all(not torch.equal(a, b) for a, b in zip(before[k], getattr(run, k).parameters())), k

# ----------------------------------------------------------------------------- lapgan.py: the pyramid
def lap_np_area(x, n_out):
    """Independent area resampling along the last axis: the mean of the piecewise-constant signal over
    [i r, (i + 1) r), from its running integral (linear between whole pixels)."""
    n_in = x.shape[-1]
    r = n_in / n_out
    rows = x.reshape(-1, n_in).astype(np.float64)
    integral = np.concatenate([np.zeros((len(rows), 1)), np.cumsum(rows, 1)], 1)
    at_edges = np.stack([np.interp(np.arange(n_out + 1) * r, np.arange(n_in + 1), c) for c in integral])
    return (np.diff(at_edges, axis=1) / r).reshape(*x.shape[:-1], n_out)


def lap_np_down(img, n):
    return lap_np_area(lap_np_area(img, n).swapaxes(-1, -2), n).swapaxes(-1, -2)


def lap_np_up(img, n):
    """Independent bilinear enlargement with the corners aligned: output i samples i (n_in - 1) / (n - 1)."""
    def along_last(x):
        n_in = x.shape[-1]
        pos = np.arange(n) * (n_in - 1) / (n - 1)
        return np.stack([np.interp(pos, np.arange(n_in), row) for row in x.reshape(-1, n_in)]).reshape(*x.shape[:-1], n)
    return along_last(along_last(img).swapaxes(-1, -2)).swapaxes(-1, -2)


@pytest.mark.parametrize("sizes", [[28, 14, 8], [28, 14, 7], [64, 32, 16, 8, 4]])
def test_lapgan_pyramid_round_trip_is_exact(sizes):
    """sizes[k] is the size of the paper's I_k, finest first; L = [h_0, ..., h_{K-1}, I_K]."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, sizes[0], sizes[0])
    L = lapgan.laplacian_pyramid(x, sizes)
    assert [t.shape[-1] for t in L] == sizes and L[-1].shape == (2, 3, sizes[-1], sizes[-1])
    assert all(h.abs().max() > 0.1 for h in L[:-1])  # real detail in every residual
    assert (lapgan.reconstruct(L) - x).abs().max() < 1e-5
    # the base is the area-resampled image (independent NumPy reference)
    assert np.abs(L[-1].numpy() - lap_np_down(x.numpy(), sizes[-1])).max() < 1e-5
    # partial reconstructions give the coarser levels of the pyramid: reconstruct(L[k:]) is I_k
    for k in range(1, len(sizes)):
        assert np.abs(lapgan.reconstruct(L[k:]).numpy() - lap_np_down(x.numpy(), sizes[k])).max() < 1e-5


def test_lapgan_down_is_area_resampling_and_up_is_bilinear_aligned():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(lapgan.down(x, 16), F.avg_pool2d(x, 2), atol=1e-6)
    assert torch.allclose(lapgan.down(lapgan.down(x, 16), 8), F.avg_pool2d(x, 4), atol=1e-6)
    for n_in, n_out in [(32, 28), (14, 8), (28, 7), (28, 14)]:
        xi = x[..., :n_in, :n_in]
        d = lapgan.down(xi, n_out)
        assert d.shape[-2:] == (n_out, n_out)
        assert np.abs(d.numpy() - lap_np_down(xi.numpy(), n_out)).max() < 1e-5, (n_in, n_out)
        assert torch.allclose(d.mean((2, 3)), xi.mean((2, 3)), atol=1e-5)  # area resampling keeps the mean
    for n_in, n_out in [(8, 14), (7, 14), (14, 28), (4, 8), (32, 64)]:
        xi = x[..., :n_in, :n_in]
        u = lapgan.up(xi, n_out)
        assert np.abs(u.numpy() - lap_np_up(xi.numpy(), n_out)).max() < 1e-5, (n_in, n_out)
        assert torch.equal(u[..., 0, 0], xi[..., 0, 0]) and torch.equal(u[..., -1, -1], xi[..., -1, -1])
    # per-channel normalisation commutes with both (the script normalises before the pyramid)
    m, s = torch.tensor([0.2, 0.5, 0.7]).view(1, 3, 1, 1), torch.tensor([0.3, 0.1, 2.0]).view(1, 3, 1, 1)
    assert torch.allclose(lapgan.down((x - m) / s, 14), (lapgan.down(x, 14) - m) / s, atol=1e-5)
    assert torch.allclose(lapgan.up((x - m) / s, 40), (lapgan.up(x, 40) - m) / s, atol=1e-5)


# ----------------------------------------------------------------------------- lapgan.py: networks
LAPGAN_NET_CASES = [("cifar10", 32, 3, [8, 14, 28]), ("mnist", 28, 1, [7, 14, 28]),
                    ("fashion-mnist", 28, 1, [7, 14, 28]), ("folder", 64, 3, [4, 8, 16, 32, 64]),
                    ("shapes", 32, 3, [8, 16, 32])]


@pytest.mark.parametrize("dataset,size,nc,sizes", LAPGAN_NET_CASES)
@pytest.mark.parametrize("ncls", [0, 10])
def test_lapgan_every_level_net_shapes(dataset, size, nc, sizes, ncls):
    args = lapgan.get_args(["--dataset", dataset, "--width-g", "16", "--width-d", "8"])
    sizes = sizes[::-1]  # the paper's order: sizes[k] is the size of I_k, I_0 the full image
    assert lapgan.pyramid_sizes(args, size) == sizes
    torch.manual_seed(0)
    n, y, K = 3, torch.tensor([0, 9, 4]) if ncls else None, len(sizes) - 1
    for k, f in enumerate(sizes):
        G, D = lapgan.build_level(vars(args), k, sizes, nc, ncls)
        if k == K:
            z = lapgan.noise(lapgan.noise_shape(k, sizes, n, args.nz), "cpu")
            assert z.shape == (n, 100) and z.min() >= -1 and z.max() <= 1
            out = G([z], y)
        else:
            coarse = lapgan.up(torch.randn(n, nc, sizes[k + 1], sizes[k + 1]), f)
            out = G([lapgan.noise(lapgan.noise_shape(k, sizes, n, args.nz), "cpu"), coarse], y)
        assert out.shape == (n, nc, f, f), (k, f)
        assert D([out], y).shape == (n,), (k, f)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_lapgan_dropout_d_sets_every_d_dropout(k):
    sizes, x = [28, 14, 7], torch.randn(4, 1, [28, 14, 7][k], [28, 14, 7][k])
    rates = {}
    for flags in ([], ["--dropout-d", "0"], ["--dropout-d", "0.2"]):
        targs = vars(lapgan.get_args(["--dataset", "mnist", "--width-g", "8", "--width-d", "8"] + flags))
        D = lapgan.build_level(targs, k, sizes, 1, 0)[1].train()
        rates[tuple(flags)] = sorted({m.p for m in D.modules() if isinstance(m, nn.Dropout)})
        if flags == ["--dropout-d", "0"]:  # no dropout: D's training-mode output is deterministic
            assert torch.equal(D([x]), D([x]))
    assert rates == {(): [0.5], ("--dropout-d", "0"): [0.0], ("--dropout-d", "0.2"): [0.2]}
    # a checkpoint from before the flag loads with the paper's 0.5
    old = {"args": {n: v for n, v in targs.items() if n != "dropout_d"}, "sizes": sizes[::-1], "levels": {},
           "balance": {"best": {}}}
    old = {**lapgan.ADDED, **lapgan.paper_levels(old)["args"]}  # what load_checkpoint gives
    assert {m.p for m in lapgan.build_level(old, k, sizes, 1, 0)[1].modules() if isinstance(m, nn.Dropout)} == {0.5}


def test_lapgan_large_lsun_nets_shapes():
    args = vars(lapgan.get_args(["--dataset", "folder", "--model", "large"]))
    sizes = [64, 32, 16, 8, 4]
    torch.manual_seed(0)
    for ncls, levels in ((0, range(0, 4)), (3, [0])):  # every level above the base
        y = torch.tensor([0, 2]) if ncls else None
        for k in levels:
            G, D = lapgan.build_level(args, k, sizes, 3, ncls)
            assert any(isinstance(m, lapgan.PairL2Pool) for m in G.modules())
            G.eval()
            c = torch.randn(2, 3, sizes[k], sizes[k])
            with torch.no_grad():
                out = G([lapgan.noise((2, 1, sizes[k], sizes[k]), "cpu"), c], y)
                assert out.shape == (2, 3, sizes[k], sizes[k]) and D([out + c], y).shape == (2,)


def lap_tiny_run(extra=(), n=16, size=32, nc=3, ncls=6):
    args = lapgan.get_args(["--dataset", "shapes", "--batch-size", "8", "--width-g", "8", "--width-d", "8",
                            "--nz", "8", *extra])
    g = torch.Generator().manual_seed(0)
    data = (torch.randint(0, 256, (n, nc, size, size), generator=g, dtype=torch.uint8), torch.arange(n) % ncls,
            [str(i) for i in range(ncls)])
    with contextlib.redirect_stdout(io.StringIO()):
        return lapgan.setup_run(args, torch.device("cpu"), data)


@pytest.mark.parametrize("k", [0, 1, 2])
def test_lapgan_d_judges_coarse_plus_residual(k):
    """D_k's fakes are G_k's residual added to the upsampled coarse image (the whole fine image); its reals
    are the fine real images, judged in a pass of their own; G_k is conditioned on other real images' coarse
    images, with their labels."""
    run = lap_tiny_run(["--conditional"])
    lv, calls = run.levels[k], {"G": [], "D": [], "DG": []}

    def record(name, net):
        def call(xs, y=None):
            out = net(xs, y)
            calls[name].append(([t.detach().clone() for t in xs], y, out.detach().clone()))
            return out
        return call
    lv.G_fwd, lv.D_fwd, lv.D_fwd_for_G = (record(n, f) for n, f in (("G", lv.G_fwd), ("D", lv.D_fwd),
                                                                      ("DG", lv.D_fwd_for_G)))
    torch.manual_seed(1)
    x, y = lapgan.get_batch(run, torch.randperm(16))
    lapgan.level_step(lv, x, y, run.sizes, run.args.nz, run.balance)
    h, B = 4, 8
    fine, coarse = lapgan.down(x, run.sizes[k]), lapgan.condition(x, run.sizes, k)
    assert [len(calls[n]) for n in ("G", "D", "DG")] == [1, 2, 1]  # D_k: the reals, then the fakes
    (g_in, g_y, g_out), = calls["G"]
    (real_in, real_y, _), (fake_in, fake_y, _) = calls["D"]
    (dg_in, dg_y, _), = calls["DG"]
    assert [len(real_in), len(fake_in), len(dg_in)] == [1, 1, 1]
    assert g_out.shape == (B + h, 3, run.sizes[k], run.sizes[k])
    assert torch.equal(real_y, y[:h]) and torch.equal(fake_y, y[h:B])
    assert torch.equal(g_y, y[h:]) and torch.equal(dg_y, y[B:])
    if k == 2:  # the base, I_2
        assert len(g_in) == 1 and g_in[0].shape == (B + h, 8) and coarse is None
        assert torch.equal(fake_in[0], g_out[:h]) and torch.equal(dg_in[0], g_out[h:])
    else:
        assert len(g_in) == 2 and torch.equal(g_in[1], coarse[h:])
        assert torch.allclose(fake_in[0], g_out[:h] + coarse[h:B], atol=1e-6)
        assert torch.allclose(dg_in[0], g_out[h:] + coarse[B:], atol=1e-6)
        # neither the coarse image alone nor the residual alone
        assert (fake_in[0] - coarse[h:B]).abs().max() > 1e-3 and (fake_in[0] - g_out[:h]).abs().max() > 1e-3
        # the reals are the same sum for real images: l_k + the pyramid's true h_k = I_k - u(I_{k+1})
        h_k = lapgan.laplacian_pyramid(x[:h], run.sizes[k:])[0]
        assert torch.allclose(real_in[0], coarse[:h] + h_k, atol=1e-5)
    assert torch.allclose(real_in[0], fine[:h], atol=1e-6)


# ----------------------------------------------------------------------------- lapgan.py: schedule, balancing
def test_lapgan_sgd_schedule_and_dampened_momentum():
    for k in (0, 1, 10, 374, 375, 376, 5000):  # after k epochs
        lr, m = lapgan.sgd_schedule(k + 1, 0.02, 0.5)
        assert lr == pytest.approx(0.02 / (1 + 4e-5) ** k, rel=1e-12)
        assert m == pytest.approx(min(0.5 + 0.0008 * k, 0.8), abs=1e-12) and m <= 0.8
    assert lapgan.sgd_schedule(1, 0.02, 0.5) == (0.02, 0.5) and lapgan.sgd_schedule(5000, 0.02, 0.5)[1] == 0.8
    # Torch's dampened momentum: buf = m buf + (1 - m) grad (the first step takes the gradient as it is)
    p = torch.zeros(3, requires_grad=True)
    opt = torch.optim.SGD([p], lr=1.0)
    lapgan.set_sgd(opt, 0.1, 0.6)
    assert opt.param_groups[0]["dampening"] == opt.param_groups[0]["momentum"] == 0.6
    g1, g2 = torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 1.0, -1.0])
    p.grad = g1.clone()
    opt.step()
    p.grad = g2.clone()
    opt.step()
    buf = 0.6 * g1 + 0.4 * g2
    assert torch.allclose(p.detach(), -0.1 * g1 - 0.1 * buf, atol=1e-7)


@pytest.mark.parametrize("err_real,err_fake,expected", [
    (0.5, 0.5, (False, True)),    # balanced: G only
    (0.1, 0.05, (False, True)),
    (0.2, 0.5, (False, True)),    # fake error exactly 0.3 above: not more than the margin, G only
    (0.2, 0.51, (True, False)),   # more than 0.3 above: D only
    (0.6, 0.95, (True, False)),
    (0.7, 0.5, (False, True)),    # real error exactly 0.7: not above
    (0.75, 0.5, (True, True)),    # real error above 0.7: D as well
    (0.75, 1.2, (True, False)),
])
def test_lapgan_balance_rule_truth_table(err_real, err_fake, expected):
    assert lapgan.balance_rule(err_real, err_fake) == expected


def test_lapgan_balance_rule_decides_which_net_steps(monkeypatch):
    run = lap_tiny_run(["--balance"])
    level = run.levels[1]
    lv = {"G": level.G, "D": level.D}
    with torch.no_grad():
        lv["D"].body[-2].bias.fill_(5.0)  # D says "real" to everything: tiny real error, large fake error
    seen = []
    for decision in ((False, True), (True, False), (True, True)):
        monkeypatch.setattr(lapgan, "balance_rule", lambda r, f, d=decision: (seen.append((r, f)), d)[1])
        g0 = [p.detach().clone() for p in lv["G"].parameters()]
        d0 = [p.detach().clone() for p in lv["D"].parameters()]
        x, y = lapgan.get_batch(run, torch.randperm(16))
        out = {f"{n}1": v for n, v in lapgan.level_step(level, x, y, run.sizes, run.args.nz, run.balance).items()}
        g_moved = any(not torch.equal(a, b) for a, b in zip(g0, lv["G"].parameters()))
        d_moved = any(not torch.equal(a, b) for a, b in zip(d0, lv["D"].parameters()))
        assert (d_moved, g_moved) == decision and (out["upd_d1"], out["upd_g1"]) == tuple(map(float, decision))
        assert seen[-1][0] + seen[-1][1] == pytest.approx(2 * out["err_d1"].item(), rel=1e-5)
    assert seen[0][0] < 0.1 < 1 < seen[0][1]  # called as (error on reals, error on fakes)


# ----------------------------------------------------------------------------- lapgan.py: evaluation
def test_lapgan_parzen_closed_form():
    d2, dim, sigma = torch.tensor([[0.3, 1.2]], dtype=torch.float64), 4, 0.5
    expected = math.log((math.exp(-0.3 / 0.5) + math.exp(-1.2 / 0.5)) / 2) - dim / 2 * math.log(2 * math.pi * 0.25)
    assert lapgan.parzen_ll(d2, dim, sigma).item() == pytest.approx(expected, rel=1e-9)


# ----------------------------------------------------------------------------- lapgan.py: data
def lap_patch_cifar_md5(monkeypatch, root):
    """Fake CIFAR-10 files have their own checksums: put them in the script's table."""
    table = {}
    with tarfile.open(os.path.join(root, "cifar-10-python.tar.gz")) as tar:
        for m in tar.getmembers():
            table[os.path.basename(m.name)] = hashlib.md5(tar.extractfile(m).read()).hexdigest()
    with open(os.path.join(root, "cifar-10-python.tar.gz"), "rb") as f:
        table["cifar-10-python.tar.gz"] = hashlib.md5(f.read()).hexdigest()
    monkeypatch.setattr(lapgan, "CIFAR_MD5", table)


def test_lapgan_cifar10_reader_and_crops(tmp_path, monkeypatch):
    batches = write_cifar_tarball(tmp_path, protocol=4)
    lap_patch_cifar_md5(monkeypatch, tmp_path)
    x, y, classes = lapgan.read_cifar10(str(tmp_path), "train")
    assert x.shape == (30, 3, 32, 32) and x.dtype == torch.uint8 and classes[0] == "airplane" and classes[9] == "truck"
    first = batches["data_batch_1"][0][0]
    assert np.array_equal(x[0, 0].numpy().ravel(), first[:1024])
    assert np.array_equal(x[0, 2].numpy().ravel(), first[2048:])
    assert y[6:12].tolist() == batches["data_batch_2"][1] and y.dtype == torch.int64
    xt, yt, _ = lapgan.read_cifar10(str(tmp_path), "test")
    assert xt.shape == (6, 3, 32, 32) and yt.tolist() == batches["test_batch"][1]
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz") as tar:  # the extracted folder reads the same
        tar.extractall(tmp_path / "ex")
    assert torch.equal(lapgan.read_cifar10(str(tmp_path / "ex"), "train")[0], x)
    # Sec. 4: 28 x 28 crops of the 32 x 32 images, centred when not training, random windows in training
    run = lapgan.Run([28, 14, 8], 0, torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1), images=x, labels=y)
    c, _ = lapgan.get_batch(run, torch.arange(30), train=False)
    assert torch.equal(c, x[..., 2:30, 2:30].float() / 255)
    c, _ = lapgan.get_batch(run, torch.arange(30), train=True)
    windows = [(a, b) for a in range(5) for b in range(5)]
    assert all(any(torch.equal(c[i], x[i, :, a:a + 28, b:b + 28].float() / 255) for a, b in windows) for i in range(30))


def test_lapgan_idx_reader_and_mnist_layout(tmp_path):
    data = write_mnist(tmp_path)
    x, y, classes = lapgan.load_mnist(str(tmp_path), "mnist", "train")
    assert x.shape == (40, 1, 28, 28) and x.dtype == torch.uint8 and np.array_equal(x[:, 0].numpy(), data["train"][0])
    assert y.tolist() == data["train"][1].tolist() and classes[3] == "3"
    # DATAROOT/NAME with uncompressed files works too
    os.makedirs(tmp_path / "fm" / "fashion-mnist")
    for name in lapgan.IDX_FILES:
        with gzip.open(tmp_path / name) as src, open(tmp_path / "fm" / "fashion-mnist" / name[:-3], "wb") as dst:
            dst.write(src.read())
    xt, yt, classes = lapgan.load_mnist(str(tmp_path / "fm"), "fashion-mnist", "test")
    assert np.array_equal(xt[:, 0].numpy(), data["t10k"][0]) and yt.tolist() == data["t10k"][1].tolist()
    assert classes[9] == "Ankle boot"
    # a non-uint8 IDX file (type 0x0D, float) is refused with a one-line error
    with open(tmp_path / "float.idx", "wb") as f:
        f.write(b"\0\0\x0d\x01" + struct.pack(">i", 2) + struct.pack(">2f", 1.0, 2.0))
    with pytest.raises(SystemExit, match="not a uint8 IDX file"):
        lapgan.read_idx(str(tmp_path / "float.idx"))


def test_lapgan_shapes_limit_is_a_prefix():
    x, y, classes = lapgan.make_shapes(1200, 32, 0)
    for n in (16, 1000, 1100):
        xs, ys, _ = lapgan.make_shapes(n, 32, 0)
        assert torch.equal(xs, x[:n]) and torch.equal(ys, y[:n]), n
    assert len(classes) == 6 and set(y.tolist()) == set(range(6))


# ----------------------------------------------------------------------------- lapgan.py: command line
LAPGAN_TINY = ["--dataset", "shapes", "--limit", "16", "--batch-size", "8", "--width-g", "8", "--width-d", "8",
               "--nz", "8", "--log-every", "2", "--select", "4", "--conditional"]


@pytest.fixture(scope="module")
def lapgan_runs(tmp_path_factory):
    """Trained once for the tests below: 2 epochs straight; 1 epoch, a crash, resumed to 2; and a
    2-level 16 px model with another noise size to chain from."""
    root = tmp_path_factory.mktemp("lapgan")
    full, part, a = str(root / "full"), str(root / "part"), str(root / "a")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        lapgan.main(LAPGAN_TINY + ["--epochs", "2", "--outf", full])
        lapgan.main(LAPGAN_TINY + ["--epochs", "1", "--outf", part])
        shutil.copy(os.path.join(part, "ckpt.pt"), root / "e1.pt")
        rows = read_log(os.path.join(part, "log.csv"))
        with open(os.path.join(part, "log.csv"), "a", newline="") as f:  # a crash mid-epoch 2 had logged a row
            csv.DictWriter(f, list(rows[-1])).writerow({**rows[-1], "step": "6", "epoch": "2", "err_d": "9"})
        sel = read_log(os.path.join(part, "select.csv"))
        with open(os.path.join(part, "select.csv"), "a", newline="") as f:  # and its model-selection row
            csv.DictWriter(f, list(sel[-1])).writerow({**sel[-1], "epoch": "2", "dist0": "9"})
        lapgan.main(LAPGAN_TINY + ["--epochs", "2", "--outf", part, "--resume"])
        lapgan.main(["--dataset", "shapes", "--image-size", "16", "--levels", "8,16", "--limit", "16",
                     "--batch-size", "8", "--width-g", "8", "--width-d", "8", "--nz", "5", "--select", "0",
                     "--conditional", "--epochs", "1", "--outf", a])
    return {"root": root, "full": full, "part": part, "a": a, "e1": str(root / "e1.pt"), "stdout": out.getvalue()}


def test_lapgan_train_resume_is_exact(lapgan_runs):
    full, part = lapgan_runs["full"], lapgan_runs["part"]
    assert "resumed from epoch 1, step 4" in lapgan_runs["stdout"]
    assert not os.path.exists(os.path.join(part, "ckpt.pt.tmp"))
    log = read_log(os.path.join(full, "log.csv"))
    assert [int(r["step"]) for r in log] == [2, 4, 6, 8]  # 16 images, 4 real per step, 2 epochs
    assert {"err_d0", "err_g2", "d_x1", "d_gz2", "upd_d0", "upd_g2", "lr", "momentum"} <= set(log[0])
    assert read_log(os.path.join(part, "log.csv")) == log  # the crashed row replaced, same losses
    a, b = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (full, part))
    assert a["script"] == "lapgan" and a["step"] == b["step"] == 8 and a["epoch"] == b["epoch"] == 2
    assert sorted(a["levels"]) == [0, 1, 2] and a["sizes"] == [32, 16, 8] and a["paper_levels"]
    for k in range(3):
        for net in ("G", "D"):
            sa, sb = a["levels"][k][net], b["levels"][k][net]
            assert all(torch.equal(sa[n], sb[n]) for n in sa), (k, net)
    for f in ("samples_e001.png", "samples_e002.png", "curves.png", "select.csv", "best.pt"):
        assert os.path.exists(os.path.join(full, f)), f
    # the sample sheet: 6 classes x 3 samples, each at its 3 levels
    assert Image.open(os.path.join(full, "samples_e002.png")).size == (2 + 9 * 34, 2 + 6 * 34)


def test_lapgan_schedule_reaches_the_optimisers(lapgan_runs):
    log = read_log(os.path.join(lapgan_runs["full"], "log.csv"))
    for r in log:
        e = int(r["epoch"])
        assert float(r["lr"]) == pytest.approx(0.02 / (1 + 4e-5) ** (e - 1), rel=1e-5)
        assert float(r["momentum"]) == pytest.approx(0.5 + 0.0008 * (e - 1), rel=1e-6)
    ck = torch.load(os.path.join(lapgan_runs["full"], "ckpt.pt"), weights_only=True)
    for k in range(3):
        for opt in ("optG", "optD"):
            g = ck["levels"][k][opt]["param_groups"][0]
            assert g["lr"] == pytest.approx(0.02 / (1 + 4e-5), rel=1e-12)
            assert g["momentum"] == g["dampening"] == pytest.approx(0.5008, rel=1e-12)


@pytest.mark.parametrize("optim", ["sgd", "adam"])
def test_lapgan_lr_g_and_lr_d_are_the_nets_rates_under_the_same_schedule(tmp_path, optim):
    outf = str(tmp_path / "r")
    rates = ["--lr", "0.01", "--lr-g", "0.02", "--lr-d", "0.04"]
    lapgan.main(LAPGAN_TINY + ["--optim", optim, *rates, "--epochs", "2", "--outf", outf])
    ck = torch.load(os.path.join(outf, "ckpt.pt"), weights_only=True)
    decay = 1 / (1 + 4e-5) if optim == "sgd" else 1.0  # epoch 2 of the paper's schedule; Adam keeps its rate
    for k in range(3):
        g, d = (ck["levels"][k][opt]["param_groups"][0]["lr"] for opt in ("optG", "optD"))
        assert g == pytest.approx(0.02 * decay, rel=1e-12) and d == pytest.approx(0.04 * decay, rel=1e-12)
    for flags, fragment in ((["--lr-d", "0"], "--lr-d 0.0 is out of range; it must lie in (0, 10]"),
                            (["--lr", "-1"], "--lr -1.0 is out of range"),
                            (["--dropout-d", "1"], "--dropout-d 1.0 is out of range; it must lie in [0, 1)")):
        with pytest.raises(SystemExit) as e:
            lapgan.main(LAPGAN_TINY + flags + ["--outf", str(tmp_path / "bad")])
        lap_one_line_error(e, fragment)


def test_lapgan_model_selection_writes_best(lapgan_runs):
    full = lapgan_runs["full"]
    sel = read_log(os.path.join(full, "select.csv"))
    assert [r["epoch"] for r in sel] == ["1", "2"] and all(float(r[f"dist{k}"]) > 0 for r in sel for k in range(3))
    best = torch.load(os.path.join(full, "best.pt"), weights_only=True)
    assert best["script"] == "lapgan" and sorted(best["levels"]) == [0, 1, 2]
    by_epoch = {1: torch.load(lapgan_runs["e1"], weights_only=True),
                2: torch.load(os.path.join(full, "ckpt.pt"), weights_only=True)}
    for k in range(3):  # each level keeps the weights of its own best epoch (lowest distance)
        e = min((1, 2), key=lambda e: float(sel[e - 1][f"dist{k}"]))
        want = by_epoch[e]["levels"][k]["G"]
        assert all(torch.equal(best["levels"][k]["G"][n], want[n]) for n in want), k
    # the score: per image, the smallest L2 distance of 128 samples to the true fine image; a G that adds
    # nothing scores the norm of the true residual
    x = torch.randn(5, 3, 32, 32)
    zero = lambda xs, y: torch.zeros_like(xs[1])
    score = lapgan.selection_score(zero, 0, x, None, [32, 16, 8], 8, torch.Generator().manual_seed(0))
    residual = lapgan.laplacian_pyramid(x, [32, 16])[0]  # h_0
    assert score == pytest.approx(residual.flatten(1).norm(dim=1).mean().item(), rel=1e-5)


def test_lapgan_sample_formats_upscale_resample_chain(lapgan_runs):
    root, full, a = lapgan_runs["root"], lapgan_runs["full"], lapgan_runs["a"]
    ckpt = os.path.join(full, "ckpt.pt")
    npz, stem = str(root / "s.npz"), str(root / "s")
    with contextlib.redirect_stdout(io.StringIO()):
        lapgan.main(["--sample", "--ckpt", ckpt, "--n", "6", "--label", "2", "--npz", npz, "--upscale", "2",
                     "--resample", "3", "--out", stem + ".png"])
    z = np.load(npz)
    assert sorted(z.files) == ["images", "labels"]
    assert z["images"].dtype == np.uint8 and z["images"].shape == (6, 32, 32, 3)
    assert z["labels"].dtype == np.int64 and z["labels"].tolist() == [2] * 6
    sheet = np.asarray(Image.open(stem + ".png"))
    assert sheet.shape == (2 + 2 * 34, 2 + 12 * 34, 3)  # 6 samples x 3 levels, 4 samples per row
    tile = lambda im, r, q, s=32: im[2 + r * (s + 2):2 + r * (s + 2) + s, 2 + q * (s + 2):2 + q * (s + 2) + s]
    assert np.array_equal(tile(sheet, 0, 2), z["images"][0]) and np.array_equal(tile(sheet, 1, 5), z["images"][5])
    lvl0, lvl1 = tile(sheet, 0, 0), tile(sheet, 0, 1)  # coarse levels enlarged: 4 x 4 and 2 x 2 blocks
    assert np.array_equal(lvl0, np.repeat(np.repeat(lvl0[::4, ::4], 4, 0), 4, 1))
    assert np.array_equal(lvl1, np.repeat(np.repeat(lvl1[::2, ::2], 2, 0), 2, 1))
    # --upscale 2: the 16 -> 32 G run twice more, 32 -> 64 -> 128; 8 images, 4 per row
    assert Image.open(stem + "_upscale.png").size == (2 + 4 * 130, 2 + 2 * 130)
    # --resample 3: per row a real test image, its coarse image, 3 samples from it; 8 rows
    rs = np.asarray(Image.open(stem + "_resample.png"))
    assert rs.shape == (2 + 8 * 34, 2 + 5 * 34, 3)
    real = lapgan.make_shapes(2000, 32, 1)[0][:8].permute(0, 2, 3, 1).numpy().astype(int)
    assert all(np.abs(tile(rs, r, 0).astype(int) - real[r]).max() <= 1 for r in range(8))
    # --chain: the 8 and 16 px levels from the 16 px model a (its own noise size), level 0 (32 px) from the
    # 32 px one (--switch 0: B draws level 0 alone)
    cnpz, cstem = str(root / "c.npz"), str(root / "c")
    with contextlib.redirect_stdout(io.StringIO()):
        lapgan.main(["--sample", "--chain", os.path.join(a, "ckpt.pt"), ckpt, "--switch", "0", "--n", "4",
                     "--label", "1", "--npz", cnpz, "--out", cstem + ".png", "--seed", "3"])
        lapgan.main(["--sample", "--ckpt", os.path.join(a, "ckpt.pt"), "--n", "4", "--label", "1",
                     "--npz", str(root / "a.npz"), "--out", str(root / "a.png"), "--seed", "3"])
    cz = np.load(cnpz)
    assert cz["images"].shape == (4, 32, 32, 3) and cz["labels"].tolist() == [1] * 4
    chain_sheet = np.asarray(Image.open(cstem + ".png"))
    assert chain_sheet.shape == (2 + 34, 2 + 12 * 34, 3)
    own = np.load(str(root / "a.npz"))["images"].astype(int)  # a's own 16 px samples, same seed
    for i in range(4):
        assert np.abs(tile(chain_sheet, 0, 3 * i + 1)[::2, ::2].astype(int) - own[i]).max() <= 2


def test_lapgan_level_trained_alone_joins_the_pyramid(lapgan_runs, tmp_path):
    """--level K trains one level by itself (on another GPU or machine); --sample --ckpt A B joins the
    levels of several runs, later checkpoints replacing earlier ones' levels."""
    full, alone = os.path.join(lapgan_runs["full"], "ckpt.pt"), str(tmp_path / "l1")
    with contextlib.redirect_stdout(io.StringIO()):
        lapgan.main(LAPGAN_TINY + ["--epochs", "1", "--level", "1", "--outf", alone])
    ck = torch.load(os.path.join(alone, "ckpt.pt"), weights_only=True)
    assert list(ck["levels"]) == [1]
    row = read_log(os.path.join(alone, "log.csv"))[-1]
    assert "err_d1" in row and "err_d0" not in row and "err_d2" not in row

    def images(*ckpts):
        npz = str(tmp_path / f"s{len(os.listdir(tmp_path))}.npz")
        with contextlib.redirect_stdout(io.StringIO()):
            lapgan.main(["--sample", "--ckpt", *ckpts, "--n", "4", "--label", "0", "--npz", npz,
                         "--out", str(tmp_path / "s.png")])
        return np.load(npz)["images"]
    only_full = images(full)
    assert np.array_equal(images(os.path.join(alone, "ckpt.pt"), full), only_full)  # full's level 1 wins
    assert not np.array_equal(images(full, os.path.join(alone, "ckpt.pt")), only_full)  # the lone level 1
    with pytest.raises(SystemExit, match="level 0 is in none of"):
        lapgan.main(["--sample", "--ckpt", os.path.join(alone, "ckpt.pt")])


def test_lapgan_parzen_ranks_real_above_noise(lapgan_runs, tmp_path):
    torch.manual_seed(0)
    Gs, ck = lapgan.load_levels([os.path.join(lapgan_runs["full"], "ckpt.pt")])
    Gs = [Gs[k] for k in range(3)]
    test_x, test_y, _ = lapgan.make_shapes(40, 32, 1)
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=g)
    args = argparse.Namespace(eval_images=20, eval_samples=300, eval_cond=8)
    scores = {}
    for name, images in (("real", test_x), ("noise", torch.cat([test_x[:20], noise]))):
        run = lapgan.Run(ck["sizes"], 6, ck["mean"], ck["std"], images=images, labels=test_y,
                         args=argparse.Namespace(**ck["args"]))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            lapgan.evaluate(args, Gs, run, str(tmp_path / name))
        m = re.search(r"Parzen log-likelihood: (\S+) \+- (\S+) nats on 20 test images \(level 2 (\S+) .*"
                      r"level 1 (\S+) .*level 0 (\S+) ", out.getvalue())
        assert m, out.getvalue()
        total, se, *levels = map(float, m.groups())
        assert math.isfinite(total) and se > 0 and total == pytest.approx(sum(levels), abs=0.2)
        scores[name] = (total, levels)
    assert scores["real"][0] > scores["noise"][0]
    assert all(r > n for r, n in zip(scores["real"][1], scores["noise"][1]))  # and at every level
    assert Image.open(tmp_path / "real_nn.png").size == (2 + 8 * 34, 2 + 8 * 34)  # 32 samples beside neighbours


def lap_one_line_error(excinfo, *fragments):
    msg = excinfo.value.code
    assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg, msg
    assert all(f in msg for f in fragments), msg


def test_lapgan_bad_inputs_give_one_line_errors(lapgan_runs, tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    r = run_cli("lapgan.py", "--dataset", "shapes", "--limit", "16", "--levels", "8,x", "--outf", str(tmp_path / "o"))
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        "error: --levels '8,x' is not a comma-separated list of sizes; use e.g. --levels 8,14,28"]
    torch.save({"script": "gan", "args": {}}, tmp_path / "gan.pt")
    r = run_cli("lapgan.py", "--sample", "--ckpt", str(tmp_path / "gan.pt"))
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'gan.pt'} was written by gan.py, not lapgan.py; use that script"]
    small = LAPGAN_TINY[:6] + ["--outf", str(tmp_path / "o")]
    for levels in ("16,8,32", "8,16,64", "32", "1,16,32"):
        with pytest.raises(SystemExit) as e:
            lapgan.main(small + ["--levels", levels])
        lap_one_line_error(e, f"--levels {levels} must be", "e.g. --levels 8,16,32")
    with pytest.raises(SystemExit) as e:
        lapgan.main(small + ["--level", "3"])
    lap_one_line_error(e, "--level 3 is out of range", "0..2")
    with pytest.raises(SystemExit) as e:
        lapgan.main(small + ["--resume"])
    lap_one_line_error(e, "nothing to resume", "holds no checkpoint (ckpt.pt); run without --resume")
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    with pytest.raises(SystemExit) as e:
        lapgan.main(["--sample", "--ckpt", str(tmp_path / "junk.pt")])
    lap_one_line_error(e, "is not a readable checkpoint")
    # --chain A B: B's first level must take A's images (size, channels, classes)
    a, b = os.path.join(lapgan_runs["a"], "ckpt.pt"), os.path.join(lapgan_runs["full"], "ckpt.pt")
    ck = torch.load(a, weights_only=True)
    bad = {"size": {**ck, "sizes": [12, 8]}, "channels": {**ck, "args": {**ck["args"], "nc": 1}},
           "classes": {**ck, "args": {**ck["args"], "conditional": False}}}
    for name, obj in bad.items():
        torch.save(obj, tmp_path / f"{name}.pt")
        with pytest.raises(SystemExit) as e:
            lapgan.main(["--sample", "--chain", str(tmp_path / f"{name}.pt"), b, "--switch", "0"])
        lap_one_line_error(e, "do not fit at level 0")
    with pytest.raises(SystemExit) as e:  # B's base K = 2 is always A's
        lapgan.main(["--sample", "--chain", a, b, "--switch", "2"])
    lap_one_line_error(e, "--switch 2 is out of range")


# ----------------------------------------------------------------------------- lapgan.py: the method against closed forms
def test_lapgan_noise_is_uniform_on_minus_one_one():
    g = torch.Generator().manual_seed(0)
    sizes = [32, 16, 8]
    for k, shape in ((2, (4000, 100)), (0, (40, 1, 32, 32))):  # z_K at the base: a vector; z_k: a plane
        assert lapgan.noise_shape(k, sizes, shape[0], 100) == shape
        z = lapgan.noise(shape, "cpu", g)
        assert z.shape == shape and z.min() >= -1 and z.max() <= 1
        assert z.min() < -0.99 and z.max() > 0.99 and abs(z.mean().item()) < 0.02  # not [0, 1]
        assert z.var().item() == pytest.approx(1 / 3, rel=0.03)  # the variance of U(-1, 1)


def test_lapgan_sample_chain_adds_each_residual_to_the_upsampled_image():
    """Fig. 1: I_K = G_K(z_K), then I_k = u(I_{k+1}) + G_k(z_k, u(I_{k+1})) down to I_0; stub generators with
    known outputs, checked against the independent NumPy bilinear enlargement."""
    torch.manual_seed(0)
    sizes, n = [12, 7, 4], 3
    base, res = torch.randn(n, 2, 4, 4), [torch.randn(n, 2, s, s) for s in sizes[:2]]
    seen = []

    def stub(k):
        def G(xs, y):
            seen.append((k, xs[-1].clone() if k < 2 else None))
            return base if k == 2 else res[k]
        return G
    out = lapgan.sample_chain([stub(k) for k in range(3)], sizes, n, 5, None, "cpu")
    expect = [None, None, base.numpy()]  # I_2 = G_2(z_2), then I_1, then I_0
    for k in (1, 0):
        expect[k] = lap_np_up(expect[k + 1], sizes[k]) + res[k].numpy()
    assert [o.shape[-1] for o in out] == sizes and [k for k, _ in seen] == [2, 1, 0]
    assert all(np.abs(o.numpy() - e).max() < 1e-5 for o, e in zip(out, expect))
    # each G_k is conditioned on the upsampled image of the coarser level, u(I_{k+1})
    assert np.abs(seen[2][1].numpy() - lap_np_up(expect[1], 12)).max() < 1e-5
    assert np.abs(seen[1][1].numpy() - lap_np_up(expect[2], 7)).max() < 1e-5
    # one link of the chain alone (--chain, bench/levels.py): I_0 from a given I_1
    again = lapgan.sample_level(stub(0), out[1], 12)
    assert torch.allclose(again, out[0], atol=1e-6)


def test_lapgan_one_step_gradients_match_the_papers_losses():
    """D_k: BCE(D(real), 1) and BCE(D(coarse + G residual), 0), each averaged, then halved; G_k: the
    non-saturating BCE(D(coarse + G residual), 1) through the D just updated. The first SGD step moves each
    weight by -lr times its gradient, compared with gradients computed here from the recorded inputs."""
    for k in (2, 1):  # the base, then a level above it
        run = lap_tiny_run(["--conditional", "--lr", "0.05"])
        lv, calls = run.levels[k], {"G": [], "D": []}
        lv.D.eval()  # no dropout: the same function here and in the step
        D0, G0 = copy.deepcopy(lv.D), copy.deepcopy(lv.G)

        def record(name, net):
            def call(xs, y=None):
                calls[name].append(([t.detach().clone() for t in xs], y))
                return net(xs, y)
            return call
        lv.G_fwd, lv.D_fwd = record("G", lv.G_fwd), record("D", lv.D_fwd)
        x, y = lapgan.get_batch(run, torch.randperm(16))
        lapgan.level_step(lv, x, y, run.sizes, run.args.nz, run.balance)
        h = 4
        (real_in, real_y), (fake_in, fake_y) = calls["D"]  # the reals' pass, then the fakes'
        logit_real, logit_fake = D0(real_in, real_y), D0(fake_in, fake_y)
        loss_d = (F.softplus(-logit_real).mean() + F.softplus(logit_fake).mean()) / 2
        grads = torch.autograd.grad(loss_d, list(D0.parameters()))
        for p0, p1, g in zip(D0.parameters(), lv.D.parameters(), grads):
            assert torch.allclose((p0 - p1) / 0.05, g, atol=1e-5), k
        (g_in, g_y), = calls["G"]
        made = G0(g_in, g_y)[h:] + (g_in[1][h:] if k < 2 else 0)
        D1 = copy.deepcopy(lv.D)
        loss_g = F.softplus(-D1([made], y[8:])).mean()
        grads = torch.autograd.grad(loss_g, list(G0.parameters()))
        for p0, p1, g in zip(G0.parameters(), lv.G.parameters(), grads):
            assert torch.allclose((p0 - p1) / 0.05, g, atol=1e-5), k


def test_lapgan_selection_takes_the_smallest_distance_per_image():
    """approxParzen: per validation image the minimum over its samples of ||coarse + G residual - fine||,
    then the mean over images; samples that differ, so the minimum is not the mean."""
    torch.manual_seed(0)
    x, sizes, outs = torch.randn(4, 3, 16, 16), [16, 8, 4], []

    def G(xs, y):
        out = xs[0].expand(-1, 3, -1, -1) * 0.7  # samples that vary with the noise plane
        outs.append((xs[1].clone(), out.clone()))
        return out
    score = lapgan.selection_score(G, 0, x, None, sizes, 5, torch.Generator().manual_seed(0), n=16)
    fine = x
    per_image = [((c + o) - fine[i:i + 1]).flatten(1).norm(dim=1) for i, (c, o) in enumerate(outs)]
    assert all(d.max() - d.min() > 0.1 for d in per_image)
    assert score == pytest.approx(torch.stack([d.min() for d in per_image]).mean().item(), rel=1e-5)
    assert all(torch.allclose(c[0], lapgan.up(lapgan.down(x[i:i + 1], 8), 16)[0], atol=1e-6)
               for i, (c, _) in enumerate(outs))


def test_lapgan_parzen_is_a_mean_over_samples():
    """log (1/N) sum_j N(x; s_j, sigma^2 I): N identical samples give the single Gaussian's density, whatever N."""
    for n in (1, 5, 50):
        d2 = torch.full((2, n), 0.8, dtype=torch.float64)
        one = -0.8 / (2 * 0.3 ** 2) - 6 / 2 * math.log(2 * math.pi * 0.3 ** 2)
        assert lapgan.parzen_ll(d2, 6, 0.3).tolist() == pytest.approx([one, one], rel=1e-9)


def test_lapgan_conditional_base_is_scored_with_the_images_own_class():
    """log p(I | y): the base level's samples are drawn with each test image's label, as at the residual
    levels; a stub G_0 that draws one fixed image per class gives distances in closed form."""
    torch.manual_seed(0)
    protos, labels_seen = torch.randn(3, 2, 4, 4), []

    def G0(xs, y):
        labels_seen.append(y.clone())
        return protos[y]
    base, y = torch.randn(7, 2, 4, 4), torch.tensor([0, 2, 2, 1, 0, 2, 1])
    pix = lambda t: (t * 0.5 + 0.2).flatten(1).double()
    d2 = lapgan.base_d2(G0, base, y, 5, 30, pix)
    assert d2.shape == (7, 30)
    want = ((base - protos[y]) * 0.5).flatten(1).pow(2).sum(1).double()
    assert torch.allclose(d2, want[:, None].expand(7, 30), rtol=1e-6)
    assert sorted(torch.cat(labels_seen).unique().tolist()) == [0, 1, 2]
    # unconditional: every image against the same samples
    d2u = lapgan.base_d2(lambda xs, y: xs[0][:, :32].view(-1, 2, 4, 4), base, None, 32, 6, pix)
    assert d2u.shape == (7, 6) and d2u.std(0).max() > 0


def test_lapgan_chain_converts_between_normalisations(lapgan_runs, tmp_path):
    """--chain A B with A = the model re-expressed under another normalisation (its G_0's last layer mapped
    so that it draws the same pixels) and B = the model itself: the chain must draw the model's own pixels."""
    path = os.path.join(lapgan_runs["full"], "ckpt.pt")
    ck = torch.load(path, weights_only=True)
    mu, sd = ck["mean"].flatten(), ck["std"].flatten()
    mu2, sd2 = torch.tensor([0.9, 0.1, 0.4]), torch.tensor([0.05, 0.6, 0.3])
    g0 = {k: v.clone() for k, v in ck["levels"][2]["G"].items()}  # G_2, the base
    per = g0["body.4.bias"].numel() // 3  # output units per channel: C x s x s, channel first
    scale, shift = (sd / sd2).repeat_interleave(per), ((mu - mu2) / sd2).repeat_interleave(per)
    g0["body.4.weight"] *= scale[:, None]
    g0["body.4.bias"] = g0["body.4.bias"] * scale + shift
    other = {**ck, "mean": mu2.view(1, 3, 1, 1), "std": sd2.view(1, 3, 1, 1),
             "levels": {2: {**ck["levels"][2], "G": g0}}}
    torch.save(other, tmp_path / "other.pt")
    outs = {}
    for name, src in (("own", ["--ckpt", path]), ("chain", ["--chain", str(tmp_path / "other.pt"), path])):
        with contextlib.redirect_stdout(io.StringIO()):
            lapgan.main(["--sample", *src, "--n", "6", "--npz", str(tmp_path / f"{name}.npz"),
                         "--out", str(tmp_path / f"{name}.png"), "--seed", "4"])
        outs[name] = (np.load(tmp_path / f"{name}.npz")["images"].astype(int),
                      np.asarray(Image.open(tmp_path / f"{name}.png")).astype(int))
    assert outs["own"][0].std() > 5  # real pictures, not a constant
    assert np.abs(outs["own"][0] - outs["chain"][0]).max() <= 1
    assert np.abs(outs["own"][1] - outs["chain"][1]).max() <= 1  # every level of the sheet too


def test_lapgan_large_model_takes_the_lsun_codes_lr_and_momentum():
    large = lapgan.get_args(["--dataset", "folder", "--model", "large"])
    small = lapgan.get_args(["--dataset", "folder"])
    assert (large.lr, large.momentum) == (0.01, 0.0) and (small.lr, small.momentum) == (0.02, 0.5)
    typed = lapgan.get_args(["--dataset", "folder", "--model", "large", "--lr", "0.003", "--momentum", "0.2"])
    assert (typed.lr, typed.momentum) == (0.003, 0.2)
    with pytest.raises(SystemExit) as e:  # --eval scores one model's pyramid, not a chain of two
        lapgan.get_args(["--sample", "--chain", "a.pt", "b.pt", "--eval"])
    lap_one_line_error(e, "--eval scores one model's pyramid; drop --chain")


def test_lapgan_folder_reader_labels_crop_and_cache(tmp_path):
    make_image_folder(tmp_path)
    x, y, classes = lapgan.load_folder(str(tmp_path), 32, None, 2)
    assert classes == ["cats", "dogs"] and x.shape == (12, 3, 32, 32) and y.tolist() == [0] * 6 + [1] * 6
    # resize the shorter side to 32, then centre-crop: the first cat is 40 x 50 (h x w)
    im = Image.open(tmp_path / "cats" / "0.png")
    w = round(50 * 32 / 40)
    ref = np.asarray(im.resize((w, 32), Image.BICUBIC))[:, (w - 32) // 2:(w - 32) // 2 + 32]
    assert np.array_equal(x[0].permute(1, 2, 0).numpy(), ref)
    assert len(list(tmp_path.glob(".cache-32px-*.npz"))) == 1
    x2, y2, _ = lapgan.load_folder(str(tmp_path), 32, None, 2)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    xg, _, _ = lapgan.load_folder(str(tmp_path), 16, 1, 2)
    assert xg.shape == (12, 1, 16, 16) and xg.dtype == torch.uint8
    os.makedirs(tmp_path / "empty")
    with pytest.raises(SystemExit, match="no images"):
        lapgan.load_folder(str(tmp_path / "empty"), 32, None, 1)
    (tmp_path / "dogs" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit, match="broken.png"):
        lapgan.load_folder(str(tmp_path), 32, None, 1)



def test_lapgan_setup_run_and_train_step_change_the_weights():
    """The entry points a benchmark uses: setup_run on in-memory data, then train_step (one real step)."""
    args = lapgan.get_args(["--dataset", "shapes", "--batch-size", "8", "--width-g", "8", "--width-d", "8",
                            "--nz", "8"])
    g = torch.Generator().manual_seed(0)
    data = (torch.randint(0, 256, (32, 3, 32, 32), generator=g, dtype=torch.uint8), None, ["a"])
    with contextlib.redirect_stdout(io.StringIO()):
        run = lapgan.setup_run(args, torch.device("cpu"), data)
    assert sorted(run.levels) == [0, 1, 2] and sorted(run.nets) == ["D0", "D1", "D2", "G0", "G1", "G2"]
    before = {k: [p.detach().clone() for p in n.parameters()] for k, n in run.nets.items()}
    stats = lapgan.train_step(run, torch.randint(32, (16,)))
    assert {"err_d0", "err_g2", "d_x1", "upd_g0"} <= set(stats) and all(math.isfinite(float(v)) for v in stats.values())
    for k, net in run.nets.items():
        assert any(not torch.equal(a, b) for a, b in zip(before[k], net.parameters())), k


# ----------------------------------------------------------------------------- lapgan.py: bad data, bad flags, faults
class LapCrafted:
    """A pickle that would run a shell command when loaded by a plain unpickler."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def lap_write_tar(root, members):
    with tarfile.open(os.path.join(root, "cifar-10-python.tar.gz"), "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_lapgan_cifar_checksums_and_restricted_unpickler(tmp_path, monkeypatch):
    write_cifar_tarball(tmp_path, protocol=4)
    with pytest.raises(SystemExit) as e:  # the fake tarball is not the official file
        lapgan.read_cifar10(str(tmp_path), "train")
    lap_one_line_error(e, "cifar-10-python.tar.gz does not match the official CIFAR-10 checksum; delete it")
    # a crafted batch with a matching (patched) checksum is still refused by the unpickler
    crafted, marker = tmp_path / "crafted", tmp_path / "ran"
    os.makedirs(crafted)
    lap_write_tar(crafted, {n: pickle.dumps(LapCrafted(str(marker)), protocol=2)
                            for n in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]})
    lap_patch_cifar_md5(monkeypatch, crafted)
    with pytest.raises(SystemExit) as e:
        lapgan.read_cifar10(str(crafted), "train")
    lap_one_line_error(e, "is damaged", "posix.system is not allowed")
    assert not marker.exists()
    # the extracted folder: each batch file is checked
    lap_patch_cifar_md5(monkeypatch, tmp_path)
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz") as tar:
        tar.extractall(tmp_path / "ex")
    assert lapgan.read_cifar10(str(tmp_path / "ex"), "test")[0].shape == (6, 3, 32, 32)
    with open(tmp_path / "ex" / "cifar-10-batches-py" / "data_batch_3", "ab") as f:
        f.write(b"x")
    with pytest.raises(SystemExit) as e:
        lapgan.read_cifar10(str(tmp_path / "ex"), "train")
    lap_one_line_error(e, "data_batch_3 does not match the official CIFAR-10 checksum")
    # a truncated tarball (checksum patched to match): damaged, one line
    data = (tmp_path / "cifar-10-python.tar.gz").read_bytes()
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(data[:len(data) // 2])
    monkeypatch.setitem(lapgan.CIFAR_MD5, "cifar-10-python.tar.gz", hashlib.md5(data[:len(data) // 2]).hexdigest())
    with pytest.raises(SystemExit) as e:
        lapgan.read_cifar10(str(tmp_path), "train")
    lap_one_line_error(e, "cifar-10-python.tar.gz is damaged", "delete it to download it again, or replace it")


def test_lapgan_damaged_idx_files(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(SystemExit) as e:
        lapgan.load_mnist(str(tmp_path), "mnist", "train")
    lap_one_line_error(e, "train-images-idx3-ubyte.gz is damaged", "delete it to download it again, or replace it")
    with gzip.open(path, "wb") as f:  # the header says 40 images, the file holds 39
        f.write(gzip.decompress(data)[:-28 * 28])
    with pytest.raises(SystemExit) as e:
        lapgan.load_mnist(str(tmp_path), "mnist", "train")
    lap_one_line_error(e, "train-images-idx3-ubyte.gz is damaged", "header says 31360")


def test_lapgan_folder_16_bit_unreadable_and_cache(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "a")
    os.makedirs(tmp_path / "b")
    grey16 = np.full((20, 20), 40000, np.uint16)
    grey16[:10] = 1000
    Image.fromarray(grey16).save(tmp_path / "a" / "deep.png")
    assert Image.open(tmp_path / "a" / "deep.png").mode.startswith("I")
    Image.fromarray(np.full((20, 20), 90, np.uint8)).save(tmp_path / "b" / "flat.png")
    x, y, _ = lapgan.load_folder(str(tmp_path), 20, None, 1)
    assert x.shape == (2, 1, 20, 20)  # 16 bits scaled by their range, 0..65535 -> 0..255
    assert x[0, 0, 15, 5].item() == round(40000 / 257) and x[0, 0, 2, 5].item() == round(1000 / 257)
    # a truncated cache is decoded again and rewritten, without a traceback
    cache = next(tmp_path.glob(".cache-*.npz"))
    cache.write_bytes(cache.read_bytes()[:100])
    x2, _, _ = lapgan.load_folder(str(tmp_path), 20, None, 1)
    assert torch.equal(x, x2) and np.load(cache)["x"].shape == (2, 1, 20, 20)
    assert not list(tmp_path.glob("*.tmp"))
    # an unreadable sub-folder stops the run instead of losing a class
    real = os.scandir

    def scandir(path="."):
        if str(path).endswith(os.sep + "b"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path)
    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(SystemExit) as e:
        lapgan.load_folder(str(tmp_path), 16, None, 1)
    lap_one_line_error(e, f"cannot read {tmp_path / 'b'} (Permission denied); fix its permissions or move it out")


def test_lapgan_checkpoint_write_interrupted_or_into_a_missing_folder(tmp_path):
    """A write stopped half way (Ctrl-C inside torch.save's stream) keeps the previous file and no .tmp; a
    folder that is gone is one line."""
    path = str(tmp_path / "ckpt.pt")
    lapgan.write_atomic(path, lambda f: torch.save({"script": "lapgan", "w": torch.arange(5)}, f))
    before = open(path, "rb").read()

    def stopped(f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        lapgan.write_atomic(path, stopped)
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["ckpt.pt"]
    gone = str(tmp_path / "gone" / "ckpt.pt")
    with pytest.raises(SystemExit) as e:
        lapgan.write_atomic(gone, lambda f: torch.save({}, f))
    lap_one_line_error(e, f"could not write {gone} (No such file or directory); the previous file is kept")


@pytest.mark.parametrize("flags,words", [
    (["--image-size", "0"], "--image-size 0 is out of range; it must lie in [1, 1024]"),
    (["--image-size", "-4"], "--image-size -4 is out of range; it must lie in [1, 1024]"),
    (["--image-size", "5000"], "--image-size 5000 is out of range; it must lie in [1, 1024]"),
    (["--epochs", "0"], "--epochs 0 is out of range"),
    (["--batch-size", "1"], "--batch-size 1 is out of range"),
    (["--log-every", "0"], "--log-every 0 is out of range"),
    (["--n", "0"], "--n 0 is out of range"),
], ids=["size0", "size-4", "size5000", "epochs0", "batch1", "log0", "n0"])
def test_lapgan_numbers_checked_after_parsing(flags, words):
    with pytest.raises(SystemExit) as e:
        lapgan.get_args(["--dataset", "shapes", *flags])
    lap_one_line_error(e, words)


def test_lapgan_run_level_checks(lapgan_runs, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as e:
        lapgan.main(["--dataset", "shapes", "--outf", str(tmp_path / "file")])
    lap_one_line_error(e, f"cannot write into {tmp_path / 'file'} (it is a file)")
    with pytest.raises(SystemExit) as e:  # too little data
        lapgan.main(["--dataset", "shapes", "--limit", "6", "--batch-size", "8", "--outf", str(tmp_path / "o")])
    lap_one_line_error(e, "only 6 training images, fewer than one batch of --batch-size 8; lower --batch-size")
    with pytest.raises(SystemExit) as e:
        lapgan.main(LAPGAN_TINY + ["--batch-size", "7", "--outf", str(tmp_path / "o")])
    lap_one_line_error(e, "--batch-size 7 must be even")
    full = lapgan_runs["full"]
    with pytest.raises(SystemExit) as e:  # a fresh run into a run's folder
        lapgan.main(LAPGAN_TINY + ["--epochs", "3", "--outf", full])
    lap_one_line_error(e, f"{full} already holds a run; add --resume to continue it, or choose another --outf")
    with pytest.raises(SystemExit) as e:
        lapgan.main(LAPGAN_TINY + ["--epochs", "3", "--outf", full, "--resume", "--lr", "0.01", "--batch-size", "4"])
    lap_one_line_error(e, "--resume keeps the checkpoint's training flags; --batch-size, --lr differ from it (only "
                       "--dataroot, --epochs, --outf, --cuda, --amp, --compile, --workers, --log-every may change)")
    with pytest.raises(SystemExit) as e:
        lapgan.main(["--outf", full, "--resume", "--dataset", "shapes", "--epochs", "2"])
    lap_one_line_error(e, "the checkpoint has already trained 2 epochs; give --epochs larger than 2")
    # the flags a resume may change come from the command line, the others from the checkpoint
    argv = ["--dataset", "shapes", "--outf", full, "--resume", "--epochs", "5", "--dataroot", "/elsewhere",
            "--log-every", "1", "--n", "3"]
    args, ck = lapgan.resume_args(lapgan.get_args(argv), lapgan.typed_flags(argv))
    assert (args.epochs, args.dataroot, args.log_every, args.outf) == (5, "/elsewhere", 1, full)
    assert (args.batch_size, args.nz, args.conditional, args.lr) == (8, 8, True, 0.02) and ck["epoch"] == 2
    # the pyramid does not fit the images: the suggestion fits
    with pytest.raises(SystemExit) as e:
        lapgan.pyramid_sizes(lapgan.get_args(["--dataset", "shapes"]), 16)
    lap_one_line_error(e, "the shapes pyramid [8, 16, 32] must be", "use e.g. --levels 4,8,16")
    assert lapgan.pyramid_sizes(lapgan.get_args(["--dataset", "shapes", "--levels", "4,8,16"]), 16) == [16, 8, 4]
    with pytest.raises(SystemExit) as e:
        lapgan.pyramid_sizes(lapgan.get_args(["--dataset", "folder", "--levels", "4,8"]), 6)
    lap_one_line_error(e, "use e.g. --levels 3,6")


def test_lapgan_label_on_an_unconditional_model(tmp_path):
    outf = str(tmp_path / "u")
    with contextlib.redirect_stdout(io.StringIO()):
        lapgan.main(["--dataset", "shapes", "--image-size", "16", "--levels", "8,16", "--limit", "16",
                     "--batch-size", "8", "--width-g", "8", "--width-d", "8", "--nz", "5", "--select", "0",
                     "--epochs", "1", "--outf", outf])
    with pytest.raises(SystemExit) as e:
        lapgan.main(["--sample", "--ckpt", os.path.join(outf, "ckpt.pt"), "--label", "1"])
    lap_one_line_error(e, "ckpt.pt was trained without --conditional; drop --label")


def test_lapgan_resume_trims_select_csv_and_guards_best(lapgan_runs, tmp_path):
    """After a crash between the model-selection row and the checkpoint, select.csv holds a row past the
    checkpoint: the resumed run drops it and writes it again. A damaged best.pt is one clean line."""
    sel = read_log(os.path.join(lapgan_runs["part"], "select.csv"))
    assert [r["epoch"] for r in sel] == ["1", "2"]
    assert sel == read_log(os.path.join(lapgan_runs["full"], "select.csv"))
    outf = tmp_path / "r"
    os.makedirs(outf)
    ck = torch.load(lapgan_runs["e1"], weights_only=True)
    torch.save({**ck, "balance": {"best": {}}}, outf / "ckpt.pt")  # every level will look better
    (outf / "best.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()):
        lapgan.main(LAPGAN_TINY + ["--epochs", "2", "--outf", str(outf), "--resume"])
    lap_one_line_error(e, "best.pt is not a readable checkpoint")


def lap_mnist_run(tmp_path):
    """A 1-epoch MNIST run from --dataroot DATA, its checkpoint marked as started with --epochs 2 (as if
    interrupted after epoch 1). -> (data folder, output folder)."""
    data, outf = str(tmp_path / "data"), str(tmp_path / "run")
    os.makedirs(data)
    write_mnist(data)
    with contextlib.redirect_stdout(io.StringIO()):
        lapgan.main(["--dataset", "mnist", "--dataroot", data, "--limit", "16", "--batch-size", "8", "--width-g",
                     "4", "--width-d", "4", "--nz", "4", "--select", "0", "--epochs", "1", "--outf", outf])
    ck = torch.load(os.path.join(outf, "ckpt.pt"), weights_only=True)
    torch.save({**ck, "args": {**ck["args"], "epochs": 2}}, os.path.join(outf, "ckpt.pt"))
    return data, outf


def test_lapgan_resume_alone_takes_the_checkpoints_dataroot_and_epochs(tmp_path, monkeypatch):
    data, outf = lap_mnist_run(tmp_path)
    monkeypatch.chdir(tmp_path)  # no ./data here: only the checkpoint's --dataroot holds the files
    with contextlib.redirect_stdout(io.StringIO()):
        run = lapgan.main(["--resume", "--outf", outf])
    assert (run.args.dataroot, run.args.epochs, run.epoch) == (data, 2, 2)
    assert [r["epoch"] for r in read_log(os.path.join(outf, "log.csv"))][-1] == "2"


def test_lapgan_resume_of_a_gpu_run_on_a_cpu(tmp_path):
    """The machine's flags (--cuda, --amp, --compile, ...) are this command line's, never the checkpoint's."""
    data, outf = lap_mnist_run(tmp_path)
    ck = torch.load(os.path.join(outf, "ckpt.pt"), weights_only=True)
    torch.save({**ck, "args": {**ck["args"], "cuda": True, "amp": True, "log_every": 7}},
               os.path.join(outf, "ckpt.pt"))
    with contextlib.redirect_stdout(io.StringIO()):
        run = lapgan.main(["--resume", "--outf", outf])
    assert (run.args.cuda, run.args.amp, run.args.log_every, run.epoch) == (False, False, 100, 2)


def test_lapgan_resume_typed_dataroot_overrides_the_checkpoints(tmp_path):
    data, outf = lap_mnist_run(tmp_path)
    moved = str(tmp_path / "moved")
    shutil.move(data, moved)  # the checkpoint's folder is gone: the typed one must be read
    with contextlib.redirect_stdout(io.StringIO()):
        run = lapgan.main(["--resume", "--outf", outf, "--dataroot", moved, "--epochs", "3"])
    assert (run.args.dataroot, run.args.epochs, run.epoch) == (moved, 3, 3)



# ----------------------------------------------------------------------------- vaegan.py
def vaegan_cli(*args, timeout=120):
    """vaegan.py as a user runs it, in a subprocess limited to one thread."""
    return subprocess.run([sys.executable, os.path.join(HERE, "vaegan.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1"})


VAEGAN_TINY = ["--dataset", "shapes", "--image-size", "16", "--width", "8", "--nz", "6", "--batch-size", "8"]


def vaegan_run(*extra, n=32):
    """A training run (networks, optimisers, data) on tiny shapes, as train() sets it up."""
    args = vaegan.get_args(VAEGAN_TINY + list(extra))
    return vaegan.setup_run(args, torch.device("cpu"), vaegan.make_shapes(n, 16, 0))


class RecordingOptimizer:
    """Stands in for an optimiser: records the .grad each parameter holds when step() is called."""
    def __init__(self, name, params, log):
        self.name, self.params, self.log = name, list(params), log

    def step(self):
        self.log[self.name] = [p.grad.clone() for p in self.params]


# ----------------------------------------------------------------------------- vaegan.py: networks
@pytest.mark.parametrize("size", [28, 32, 64])
@pytest.mark.parametrize("nc", [1, 3])
def test_vaegan_shapes_bias_and_bn_momentum(size, nc):
    w, nz, B = 8, 10, 3
    args = vaegan.get_args(["--dataset", "shapes", "--image-size", str(size), "--width", str(w), "--nz", str(nz)])
    nets = vaegan.build_nets(args, nc, size)
    assert set(nets) == {"E", "Dec", "D"}
    x = torch.rand(B, nc, size, size) * 2 - 1
    mu, logvar = vaegan.posterior(nets["E"], x)
    assert mu.shape == logvar.shape == (B, nz)
    out = nets["Dec"](mu)
    assert out.shape == (B, nc, size, size) and out.abs().max() <= 1  # tanh
    # Dis_l: the code's CelebA model (64 px) took D's 4th conv, its CIFAR model (32 px) the 3rd: 8 x 8 both
    depth, s = (4, size // 8) if size >= 64 else (3, -(-size // 4))  # 28 -> 7, 32 -> 8, 64 -> 8
    feats = nets["D"][0](x)
    assert feats.shape == (B, 4 * w, s, s) and isinstance(nets["D"][0][-1], nn.Conv2d)
    assert sum(isinstance(m, nn.Conv2d) for m in nets["D"][0]) == depth
    assert args.gamma == (1e-6 if size >= 64 else 1e-5)  # the code's w for that layer
    assert nets["D"](x).shape == (B,)  # one logit per image
    assert torch.allclose(nets["D"][1](feats), nets["D"](x))  # D is Dis_l then the rest
    for name, net in nets.items():
        layers = [m for m in net.modules() if not isinstance(m, nn.Sequential)]
        bns = [m for m in layers if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
        assert bns and all(m.momentum == 0.1 for m in bns), name
        # BN starts as the identity on normalised units (scale 1, shift 0), as deeppy's and PyTorch's
        assert all(torch.equal(m.weight, torch.ones_like(m.weight)) and not m.bias.any() for m in bns), name
        for a, b in zip(layers, layers[1:]):
            if isinstance(a, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
                before_bn = isinstance(b, (nn.BatchNorm1d, nn.BatchNorm2d))
                assert (a.bias is None) == before_bn, (name, a)  # bias exactly where no BN follows
        assert isinstance(layers[-1], (nn.Tanh, nn.Flatten, nn.Linear)), name
    # the last layers keep their bias: encoder head, decoder output conv, D's logit
    assert nets["E"][-1].bias is not None and nets["Dec"][-2].bias is not None
    assert nets["D"][1][-2].bias is not None


def test_vaegan_unsupported_size_and_disl_without_d_are_clear_errors():
    with pytest.raises(SystemExit, match="--image-size 30"):
        vaegan.build_nets(vaegan.get_args(["--dataset", "shapes", "--image-size", "30"]), 3, 30)
    with pytest.raises(SystemExit, match="--recon disl needs"):
        vaegan.build_nets(vaegan.get_args(["--dataset", "shapes", "--image-size", "32", "--no-gan"]), 3, 32)
    nets = vaegan.build_nets(vaegan.get_args(["--dataset", "shapes", "--image-size", "32", "--no-gan",
                                              "--recon", "pixel"]), 3, 32)
    assert set(nets) == {"E", "Dec"}


# ----------------------------------------------------------------------------- vaegan.py: routing of the losses
def reference_losses(nets, args, x, seed):
    """The VAE/GAN losses written out independently of vaegan.py, with the same noise (same seed, same
    order of draws: the posterior's eps, then the prior's z) and the same batching for BatchNorm."""
    E, Dec, D = nets["E"], nets["Dec"], nets["D"]
    B, nz = x.shape[0], args.nz
    torch.manual_seed(seed)
    h = E(x)
    mu, logvar = h[:, :nz], h[:, nz:]
    eps, z_prior = torch.randn_like(mu), torch.randn_like(mu)
    z = mu + torch.exp(logvar / 2) * eps
    decoded = Dec(torch.cat([z, z_prior]))
    x_tilde, x_p = decoded[:B], decoded[B:]
    kl = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(1).mean()
    if args.recon == "disl":
        f = D[0](torch.cat([x_tilde, x]))
        recon = 0.5 * ((f[:B] - f[B:].detach()) ** 2).sum((1, 2, 3)).mean()
    else:
        recon = 0.5 * ((x_tilde - x) ** 2).sum((1, 2, 3)).mean()
    logits = D(torch.cat([x, torch.cat([x_tilde, x_p]) if args.fake_recon else x_p]))
    real, fake = logits[:B], logits[B:]
    gan_d = 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())  # BCE: reals 1, fakes 0
    gan_g = (F.softplus(-fake).sum() if args.nonsat else -F.softplus(fake).sum()) / B
    return {"kl": kl, "recon": recon, "gan_d": gan_d, "gan_g": gan_g}


def reference_grads(nets, args, x, seed, combine):
    """Plain autograd: one fresh forward pass, backward() of one scalar, every network's .grad."""
    for n in nets.values():
        n.zero_grad(set_to_none=False)
    combine(reference_losses(nets, args, x, seed)).backward()
    return {k: [p.grad.clone() for p in n.parameters()] for k, n in nets.items()}


def grad_distance(a, b):
    """|a - b| / |b| over all of one network's parameters."""
    a, b = torch.cat([g.flatten() for g in a]), torch.cat([g.flatten() for g in b])
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("extra", [["--no-fake-recon"], ["--recon", "pixel", "--nonsat"]])
def test_vaegan_routing_table_numerically(extra):
    run = vaegan_run("--gamma", "0.5", "--margin", "-1", *extra)  # no rule: every network steps
    args, nets = run.args, run.nets
    assert args.fake_recon == ("--no-fake-recon" not in extra)  # Alg. 1's reconstructions as fakes: default
    stepped = {}
    run.opts = {k: RecordingOptimizer(k, n.parameters(), stepped) for k, n in nets.items()}
    x = vaegan.get_batch(run, torch.arange(8))
    torch.manual_seed(1234)
    out = vaegan.train_step(run, x)
    assert set(stepped) == {"E", "Dec", "D"}
    ref = reference_losses(nets, args, x, 1234)
    for k in ("kl", "recon", "gan_d", "gan_g"):
        assert out[k].item() == pytest.approx(ref[k].item(), rel=1e-5, abs=1e-6), k
    rows = {"E": lambda L: L["kl"] + L["recon"],
            "Dec": lambda L: args.gamma * L["recon"] + L["gan_g"],
            "D": lambda L: L["gan_d"]}
    for k, combine in rows.items():
        expected = reference_grads(nets, args, x, 1234, combine)[k]
        assert grad_distance(stepped[k], expected) < 1e-5, k  # float32 noise: ~3e-7
    # the test can fail: the terms each network must not see do move it (the encoder's GAN gradient,
    # with --no-fake-recon, comes only through BatchNorm's shared batch statistics, ~0.7%), so a leak shows
    leaks = {"E": lambda L: L["gan_g"] + L["gan_d"], "Dec": lambda L: L["kl"] + L["gan_d"],
             "D": lambda L: L["gan_g"] + (L["recon"] if args.recon == "disl" else 0)}
    for k, combine in leaks.items():
        leaky = reference_grads(nets, args, x, 1234, lambda L: rows[k](L) + combine(L))[k]
        assert grad_distance(leaky, stepped[k]) > 1e-3, k
    gan_only = reference_grads(nets, args, x, 1234, lambda L: L["gan_g"])["Dec"]
    assert grad_distance(gan_only, stepped["Dec"]) > 1e-2  # gamma * reconstruction matters too


@pytest.mark.parametrize("gamma", [None, 30.0])
def test_vaegan_plain_vae_routing(gamma):
    # gamma = 1 / sigma^2 weighs the pixel error against the KL term in both nets (default 1: sigma 1)
    run = vaegan_run("--recon", "pixel", "--no-gan", *([] if gamma is None else ["--gamma", str(gamma)]))
    assert run.args.gamma == (gamma or 1.0)
    stepped = {}
    run.opts = {k: RecordingOptimizer(k, n.parameters(), stepped) for k, n in run.nets.items()}
    x = vaegan.get_batch(run, torch.arange(8))
    torch.manual_seed(5)
    out = vaegan.train_step(run, x)
    assert set(stepped) == {"E", "Dec"} and "gan_g" not in out
    E, Dec = run.nets["E"], run.nets["Dec"]
    torch.manual_seed(5)
    mu, logvar = E(x).chunk(2, 1)
    z = mu + torch.exp(logvar / 2) * torch.randn_like(mu)  # no prior batch without a GAN
    recon = (gamma or 1.0) * 0.5 * ((Dec(z) - x) ** 2).sum((1, 2, 3)).mean()
    kl = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(1).mean()
    ge = torch.autograd.grad(kl + recon, list(E.parameters()), retain_graph=True)
    gd = torch.autograd.grad(recon, list(Dec.parameters()))
    assert grad_distance(stepped["E"], ge) < 1e-5 and grad_distance(stepped["Dec"], gd) < 1e-5


# ----------------------------------------------------------------------------- vaegan.py: the method's maths
def test_vaegan_reparameterisation_and_kl_closed_form():
    zero = torch.zeros(4, 5)
    assert torch.equal(vaegan.kl_divergence(zero, zero), torch.zeros(4))  # q = p: no divergence
    mu, logvar = torch.tensor([[1.0, 2.0]]), torch.tensor([[math.log(4.0), 0.0]])
    # 1/2 sum(sigma^2 + mu^2 - 1 - log sigma^2) = 1/2 ((4 + 1 - 1 - ln 4) + (1 + 4 - 1 - 0))
    assert vaegan.kl_divergence(mu, logvar).item() == pytest.approx(4 - math.log(2), rel=1e-6)
    torch.manual_seed(0)
    mu, logvar = torch.randn(6, 3), torch.randn(6, 3)
    q, p = torch.distributions.Normal(mu, (logvar / 2).exp()), torch.distributions.Normal(0.0, 1.0)
    assert torch.allclose(vaegan.kl_divergence(mu, logvar), torch.distributions.kl_divergence(q, p).sum(1),
                          rtol=1e-5, atol=1e-6)
    # z = mu + sigma * eps: the right mean and spread, and differentiable in mu and log sigma^2
    mu = torch.tensor([3.0, -1.0], requires_grad=True)
    logvar = torch.tensor([math.log(0.25), math.log(4.0)], requires_grad=True)
    eps = torch.randn(200_000, 2, generator=torch.Generator().manual_seed(0))
    z = vaegan.reparameterise(mu, logvar, eps)
    assert torch.allclose(z.mean(0), torch.tensor([3.0, -1.0]), atol=0.02)
    assert torch.allclose(z.std(0), torch.tensor([0.5, 2.0]), rtol=0.01)
    assert torch.equal(vaegan.reparameterise(mu, logvar, torch.zeros(2)), mu)
    z.sum().backward()
    assert torch.allclose(mu.grad, torch.full((2,), 200_000.0))
    assert torch.allclose(logvar.grad, 0.5 * torch.tensor([0.5, 2.0]) * eps.sum(0), rtol=1e-4)
    # Monte Carlo KL from those samples: mean of log q(z) - log p(z) matches the closed form
    with torch.no_grad():
        q = torch.distributions.Normal(mu, (logvar / 2).exp())
        mc = (q.log_prob(z) - torch.distributions.Normal(0.0, 1.0).log_prob(z)).sum(1).mean()
        assert mc.item() == pytest.approx(vaegan.kl_divergence(mu[None], logvar[None]).item(), rel=0.02)
    a, b = torch.zeros(2, 1, 2, 2), torch.tensor([1.0, 2.0]).view(2, 1, 1, 1).expand(2, 1, 2, 2)
    assert vaegan.recon_error(a, b).tolist() == [2.0, 8.0]  # 1/2 ||a - b||^2 per image


# ----------------------------------------------------------------------------- vaegan.py: equilibrium rule
EQUILIBRIUM_CASES = [  # (D's cost on reals, on fakes, update D, update decoder), target 0.68 +- 0.35
    (0.6, 0.7, True, True),     # balanced: both learn
    (0.2, 0.6, False, True),    # D too good on reals: D rests
    (0.6, 0.1, False, True),    # ... or on fakes
    (1.2, 0.6, True, False),    # D too bad on reals: the decoder rests
    (0.6, 1.1, True, False),    # ... or on fakes
    (0.34, 1.02, True, True),   # just inside both bounds
    (0.32, 0.9, False, True),   # just below 0.33
    (0.5, 1.04, True, False),   # just above 1.03
    (0.2, 1.2, True, True),     # both would rest: both learn
    (0.1, 0.1, False, True),
    (2.0, 3.0, True, False),
]


@pytest.mark.parametrize("err_real,err_fake,upd_d,upd_dec", EQUILIBRIUM_CASES)
def test_vaegan_equilibrium_rule_decisions(err_real, err_fake, upd_d, upd_dec):
    assert vaegan.equilibrium_rule(err_real, err_fake) == (upd_d, upd_dec)
    assert vaegan.equilibrium_rule(err_real, err_fake, 0.68, -1) == (True, True)  # margin < 0: rule off


def test_vaegan_equilibrium_rule_in_the_training_step(monkeypatch):
    args = vaegan.get_args(VAEGAN_TINY)
    assert (args.equilibrium, args.margin) == (0.68, 0.35)
    run = vaegan_run()
    x = vaegan.get_batch(run, torch.arange(8))
    for err_real, err_fake, upd_d, upd_dec in EQUILIBRIUM_CASES[:5] + EQUILIBRIUM_CASES[8:9]:
        run.fwd.batch_mean = lambda *v, r=err_real, f=err_fake: [r, f]  # D's costs as the rule sees them
        stepped = {}
        run.opts = {k: RecordingOptimizer(k, n.parameters(), stepped) for k, n in run.nets.items()}
        out = vaegan.train_step(run, x)
        expected = {"E"} | ({"D"} if upd_d else set()) | ({"Dec"} if upd_dec else set())
        assert set(stepped) == expected, (err_real, err_fake)  # the encoder always steps
        assert (out["upd_d"], out["upd_dec"]) == (float(upd_d), float(upd_dec))
    # with real optimisers: a skipped network keeps its weights, the encoder moves
    run = vaegan_run()
    run.fwd.batch_mean = lambda *v: [0.1, 0.1]  # D too good: D rests
    before = {k: copy.deepcopy(n.state_dict()) for k, n in run.nets.items()}
    vaegan.train_step(run, x)
    changed = {k: any(not torch.equal(before[k][p], v) for p, v in n.named_parameters())
               for k, n in run.nets.items()}
    assert changed == {"E": True, "Dec": True, "D": False}


# ----------------------------------------------------------------------------- vaegan.py: training
def test_vaegan_plain_vae_reconstruction_falls(tmp_path):
    outf = str(tmp_path / "vae")
    vaegan.main(["--dataset", "shapes", "--image-size", "16", "--width", "8", "--nz", "8", "--limit", "512",
                 "--batch-size", "16", "--recon", "pixel", "--no-gan", "--epochs", "2", "--log-every", "4",
                 "--outf", outf])
    rows = read_log(os.path.join(outf, "log.csv"))
    assert len(rows) == 16 and "err_real" not in rows[0] and "upd_d" in rows[0]
    recon = [float(r["recon"]) for r in rows]
    first, last = np.mean(recon[:3]), np.mean(recon[-3:])
    assert last < 0.6 * first, (first, last)
    assert all(math.isfinite(float(r["kl"])) and float(r["kl"]) >= 0 for r in rows)
    ckpt = torch.load(os.path.join(outf, "ckpt.pt"), weights_only=True)
    assert "D" not in ckpt and {"E", "Dec", "optE", "optDec"} <= set(ckpt) and ckpt["step"] == 64


def test_vaegan_train_resume_exact_and_sampling_outputs(tmp_path):
    tiny = VAEGAN_TINY + ["--limit", "64", "--log-every", "3"]  # 8 steps an epoch; rows every 3rd step and at epoch ends
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    vaegan.main(tiny + ["--epochs", "2", "--outf", full])
    vaegan.main(tiny + ["--epochs", "1", "--outf", part])
    assert not os.path.exists(os.path.join(part, "ckpt.pt.tmp"))
    with open(os.path.join(part, "log.csv"), "a") as f:  # a crash mid-epoch 2 had logged a row
        f.write("11,2,9,9,9,9,9,9,9,1,1,0\n")
    vaegan.main(tiny + ["--epochs", "2", "--outf", part, "--resume"])
    log_full, log_part = read_log(os.path.join(full, "log.csv")), read_log(os.path.join(part, "log.csv"))
    assert [r["step"] for r in log_full] == ["3", "6", "8", "9", "12", "15", "16"]
    assert log_full == log_part
    assert {"kl", "recon", "err_real", "err_fake", "gan_g", "d_x", "d_gz", "upd_d", "upd_dec", "lr"} <= set(log_full[0])
    assert float(log_full[-1]["lr"]) < float(log_full[0]["lr"])  # annealed per epoch
    a = torch.load(os.path.join(full, "ckpt.pt"), weights_only=True)
    b = torch.load(os.path.join(part, "ckpt.pt"), weights_only=True)
    assert a["script"] == "vaegan" and a["step"] == b["step"] == 16 and a["epoch"] == 2
    for net in ("E", "Dec", "D"):
        assert all(torch.equal(a[net][k], b[net][k]) for k in a[net]), net
    for f in ("samples_e001.png", "samples_e002.png", "recon_e002.png", "curves.png", "log.csv"):
        assert os.path.exists(os.path.join(full, f)), f
    c = 16 + 2  # one 16-pixel image and its padding in a grid
    assert Image.open(os.path.join(full, "recon_e002.png")).size == (2 + 8 * c, 2 + 8 * c)  # 32 over 32

    stem, npz = str(tmp_path / "s"), str(tmp_path / "s.npz")
    vaegan.main(["--sample", "--ckpt", os.path.join(full, "ckpt.pt"), "--n", "12", "--npz", npz, "--out",
                 stem + ".png", "--recon-grid", "--attribute", "2", "--interp", "slerp", "--steps", "5",
                 "--walk", "4"])
    z = np.load(npz)
    assert z.files == ["images"] and z["images"].dtype == np.uint8 and z["images"].shape == (12, 16, 16, 3)
    grid = np.asarray(Image.open(stem + ".png"))
    assert grid.shape == (2 + 2 * c, 2 + 8 * c, 3)  # 12 samples, 8 a row
    assert np.array_equal(grid[2:18, 2:18], z["images"][0]) and np.array_equal(grid[20:36, 2:18], z["images"][8])
    assert Image.open(stem + "_recon.png").size == (2 + 8 * c, 2 + 8 * c)  # 32 test images over 32 recons
    rec, test = np.load(str(tmp_path / "s_recon.npz")), vaegan.load_dataset(argparse.Namespace(
        **torch.load(os.path.join(full, "ckpt.pt"), weights_only=True)["args"]), "test")
    assert rec["images"].shape == (len(test[0]), 16, 16, 3) and np.array_equal(rec["labels"], test[1].numpy())
    row2 = np.asarray(Image.open(stem + "_recon.png"))[2 + c:18 + c]  # the reconstructions of test[:8]
    assert np.array_equal(row2[:, 2:18], rec["images"][0]) and np.array_equal(row2[:, 2 + c:18 + c], rec["images"][1])
    assert Image.open(stem + "_slerp.png").size == (2 + 5 * c, 2 + 8 * c)  # 8 pairs, 5 steps each
    assert Image.open(stem + "_attr2.png").size == (2 + 8 * c, 2 + 3 * c)  # images, recons, + vector
    gif = Image.open(stem + "_walk.gif")
    assert gif.n_frames == 4 and gif.size == (2 + 4 * c, 2 + 4 * c)  # 16 latents a frame, 4 a row
    with pytest.raises(SystemExit, match="--attribute 6 is out of range"):
        vaegan.main(["--sample", "--ckpt", os.path.join(full, "ckpt.pt"), "--out", stem + "x.png",
                     "--attribute", "6"])


# ----------------------------------------------------------------------------- vaegan.py: bad inputs
def test_vaegan_bad_inputs_give_one_line_errors(tmp_path):
    if not torch.cuda.is_available():
        r = vaegan_cli("--dataset", "shapes", "--cuda", "--outf", str(tmp_path / "c"))
        assert r.returncode != 0 and r.stderr.strip().splitlines() == [
            "error: --cuda was given but PyTorch sees no CUDA GPU; drop --cuda to run on the CPU"]
        assert not os.path.exists(tmp_path / "c")
    other = tmp_path / "other" / "ckpt.pt"
    other.parent.mkdir()
    torch.save({"script": "gan", "args": {}}, other)  # what gan.py writes
    for argv in (["--sample", "--ckpt", str(other)],
                 VAEGAN_TINY + ["--resume", "--outf", str(other.parent)]):
        with pytest.raises(SystemExit) as e:
            vaegan.main(argv)
        msg = str(e.value)
        assert msg == f"error: {other} was written by gan.py, not vaegan.py; use that script"
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(SystemExit, match=r"written by another program\.py, not vaegan\.py"):
        vaegan.main(["--sample", "--ckpt", str(tmp_path / "list.pt")])
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(SystemExit, match="is not a readable checkpoint"):
        vaegan.main(["--sample", "--ckpt", str(tmp_path / "junk.pt")])
    with pytest.raises(SystemExit, match="holds no checkpoint .ckpt.pt.: nothing to resume; run without --resume"):
        vaegan.main(VAEGAN_TINY + ["--resume", "--outf", str(tmp_path / "empty")])


# ----------------------------------------------------------------------------- vaegan.py: against the paper's code
def rmsprop_by_hand(weights, grads, lr, decay):
    """RMSProp (decay 0.9, eps 1e-8) written out, on g + decay[i] * W: the gradient deeppy would take."""
    W, sq = [w.clone() for w in weights], [torch.zeros_like(w) for w in weights]
    for gs in grads:
        for i, g in enumerate(gs):
            g = g + decay[i] * W[i]
            sq[i] = 0.9 * sq[i] + 0.1 * g * g
            W[i] = W[i] - lr * g / (sq[i].sqrt() + 1e-8)
    return W


def test_vaegan_weight_decay_is_deeppys_and_spares_the_latent_head():
    wd, B = 0.5, 8
    run = vaegan_run("--weight-decay", str(wd))
    E, opt = run.nets["E"], run.opts["E"]
    params = list(E.parameters())
    before = [p.detach().clone() for p in params]
    grads = [[torch.randn_like(p) * 1e-2 for p in params] for _ in range(3)]
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    moved = torch.cat([(p.detach() - w).flatten() for p, w in zip(params, before)])
    convs = [m for m in E.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert convs[-1] is E[-1]  # the mu / log sigma^2 layer
    weights = {id(m.weight) for m in convs[:-1]}
    lr = opt.param_groups[0]["lr"]

    def expected(per_weight, head=0.0):
        decay = [per_weight if id(p) in weights else head if p is E[-1].weight else 0.0 for p in params]
        W = rmsprop_by_hand(before, grads, lr, decay)
        return torch.cat([(w - b).flatten() for w, b in zip(W, before)])
    # deeppy adds 2 wd W to the gradient of a batch sum; our losses are batch means, so 2 wd / B
    assert (moved - expected(2 * wd / B)).norm() < 1e-4 * moved.norm()
    for wrong in (expected(wd / B), expected(2 * wd / B, head=2 * wd / B), expected(0.0)):
        assert (moved - wrong).norm() > 1e-3 * moved.norm()


def test_vaegan_pixel_gamma_is_the_faces_codes_weight():
    args = vaegan.get_args(["--dataset", "shapes", "--recon", "pixel"])
    # the faces post's code: the decoder's gradient of 1e-4 sum_i ||x~_i - x_i||^2, its GAN term also summed
    # over the batch; ours: gamma * mean_i 1/2 ||x~_i - x_i||^2 and a batch-mean GAN term, so B x ours
    B, x = 5, torch.randn(5, 3, 4, 4)
    x_tilde = torch.randn(5, 3, 4, 4, requires_grad=True)
    ours = torch.autograd.grad(args.gamma * vaegan.recon_error(x_tilde, x).mean(), x_tilde)[0]
    theirs = torch.autograd.grad(1e-4 * ((x_tilde - x) ** 2).sum(), x_tilde)[0]
    assert torch.allclose(B * ours, theirs, rtol=1e-5)
    assert vaegan.get_args(["--dataset", "shapes", "--recon", "pixel", "--gamma", "0.3"]).gamma == 0.3


def test_vaegan_attribute_vector_points_towards_the_class(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 256, (40, 1, 4, 4), dtype=torch.uint8, generator=g), torch.arange(40) % 4
    monkeypatch.setattr(vaegan, "load_dataset", lambda targs, split: (x, y, list("abcd")))

    class StubEncoder(nn.Module):  # mu = the first 3 pixels, log sigma^2 = 0
        def forward(self, v):
            return torch.cat([v.flatten(1)[:, :3], torch.zeros(len(v), 3)], 1)
    v = vaegan.attribute_vector(StubEncoder(), argparse.Namespace(), 2, torch.device("cpu"))
    mu = x.flatten(1)[:, :3].float() / 127.5 - 1
    # Sec. 5: the mean latent of the images with the attribute minus the mean of those without
    assert torch.allclose(v, mu[y == 2].mean(0) - mu[y != 2].mean(0), atol=1e-6)


def test_vaegan_data_readers(tmp_path, monkeypatch):
    batches = vaegan_cifar(tmp_path, monkeypatch)
    x, y, classes = vaegan.read_cifar10(str(tmp_path), "train")
    first = batches["data_batch_1"][0][0]
    assert x.shape == (30, 3, 32, 32) and x.dtype == torch.uint8 and classes[9] == "truck"
    assert np.array_equal(x[0, 0].numpy().ravel(), first[:1024]) and np.array_equal(x[0, 2].numpy().ravel(), first[2048:])
    assert y[6:12].tolist() == batches["data_batch_2"][1] and y.dtype == torch.int64
    assert vaegan.read_cifar10(str(tmp_path), "test")[1].tolist() == batches["test_batch"][1]
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz") as tar:  # the extracted folder reads the same
        tar.extractall(tmp_path / "ex")
    assert torch.equal(vaegan.read_cifar10(str(tmp_path / "ex"), "train")[0], x)
    os.makedirs(tmp_path / "fashion-mnist")  # DATAROOT/NAME
    data = write_mnist(tmp_path / "fashion-mnist")
    x, y, classes = vaegan.load_mnist(str(tmp_path), "fashion-mnist", "train")
    assert x.shape == (40, 1, 28, 28) and np.array_equal(x[:, 0].numpy(), data["train"][0])
    assert y.tolist() == data["train"][1].tolist() and classes[9] == "Ankle boot"
    assert np.array_equal(vaegan.load_mnist(str(tmp_path), "fashion-mnist", "test")[0][:, 0].numpy(), data["t10k"][0])
    folder = tmp_path / "images"
    make_image_folder(folder, 3)
    x, y, classes = vaegan.load_folder(str(folder), 16, None, 2)
    assert classes == ["cats", "dogs"] and x.shape == (6, 3, 16, 16) and y.tolist() == [0, 0, 0, 1, 1, 1]
    im = np.asarray(Image.open(folder / "cats" / "0.png"))  # 40 x 50: scale the short side to 16, crop the centre
    ref = np.asarray(Image.fromarray(im).resize((20, 16), Image.BICUBIC))[:, 2:18]
    assert np.array_equal(x[0].permute(1, 2, 0).numpy(), ref)
    assert len(list(folder.glob(".cache-16px-*.npz"))) == 1
    assert torch.equal(vaegan.load_folder(str(folder), 16, None, 2)[0], x)  # from the cache


# ----------------------------------------------------------------------------- vaegan.py: bad input and faults
def vaegan_cifar(root, monkeypatch, n_per_batch=6):
    """write_cifar_tarball's batches pickled again as the official ones read (bytes as bytes, protocol 4),
    with vaegan.CIFAR_MD5 patched to the md5s of these fake files."""
    import hashlib
    batches, path = write_cifar_tarball(root, n_per_batch), os.path.join(root, "cifar-10-python.tar.gz")
    with tarfile.open(path) as tar:
        members = [(m.name, pickle.loads(tar.extractfile(m).read(), encoding="bytes")) for m in tar.getmembers()]
    md5 = {}
    with tarfile.open(path, "w:gz") as tar:
        for name, obj in members:
            data = pickle.dumps(obj, protocol=4)
            md5[os.path.basename(name)] = hashlib.md5(data).hexdigest()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with open(path, "rb") as f:
        md5["cifar-10-python.tar.gz"] = hashlib.md5(f.read()).hexdigest()
    monkeypatch.setattr(vaegan, "CIFAR_MD5", md5)
    return batches


def vaegan_error(call, *fragments):
    """call() stops with one line, 'error: ...', holding every fragment."""
    with pytest.raises(SystemExit) as e:
        call()
    msg = e.value.code
    assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg, msg
    assert all(f in msg for f in fragments), msg
    return msg


def test_vaegan_cifar_checksums_and_restricted_unpickler(tmp_path, monkeypatch):
    import hashlib
    vaegan_cifar(tmp_path, monkeypatch)
    tar = str(tmp_path / "cifar-10-python.tar.gz")
    assert vaegan.read_cifar10(str(tmp_path), "test")[0].shape == (6, 3, 32, 32)
    monkeypatch.setattr(vaegan, "CIFAR_MD5", {**vaegan.CIFAR_MD5, "cifar-10-python.tar.gz": "0" * 32})
    vaegan_error(lambda: vaegan.read_cifar10(str(tmp_path), "train"),
                 f"{tar} does not match the official CIFAR-10 checksum; delete it to download it again")
    # a crafted batch whose unpickling would run a command: refused even when its md5 is the expected one
    marker = tmp_path / "ran"

    class Crafted:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    folder = tmp_path / "ex" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Crafted(), b"labels": [0]}, protocol=4))
    md5 = hashlib.md5((folder / "test_batch").read_bytes()).hexdigest()
    monkeypatch.setattr(vaegan, "CIFAR_MD5", {**vaegan.CIFAR_MD5, "test_batch": md5})
    vaegan_error(lambda: vaegan.read_cifar10(str(tmp_path / "ex"), "test"), "is damaged", "system")
    assert not marker.exists()
    (folder / "test_batch").write_bytes(b"another file")  # the extracted folder: each batch file is checked
    vaegan_error(lambda: vaegan.read_cifar10(str(tmp_path / "ex"), "test"),
                 f"{folder / 'test_batch'} does not match the official CIFAR-10 checksum")
    # a truncated tarball (say its md5 were right): damaged, one line
    data = open(tar, "rb").read()
    with open(tar, "wb") as f:
        f.write(data[:len(data) // 2])
    monkeypatch.setattr(vaegan, "CIFAR_MD5", {**vaegan.CIFAR_MD5,
                                              "cifar-10-python.tar.gz": hashlib.md5(data[:len(data) // 2]).hexdigest()})
    vaegan_error(lambda: vaegan.read_cifar10(str(tmp_path), "train"),
                 f"{tar} is damaged (", "); delete it to download it again, or replace it")


def test_vaegan_damaged_idx_files(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])  # a download cut short
    vaegan_error(lambda: vaegan.load_mnist(str(tmp_path), "mnist", "train"), f"{path} is damaged (",
                 "delete it to download it again, or replace it")
    write_idx(path, np.zeros((40, 28, 28)))
    with gzip.open(path) as f:
        raw = f.read()
    with gzip.open(path, "wb") as f:  # the header says 40 images, the file holds 39
        f.write(raw[:-28 * 28])
    vaegan_error(lambda: vaegan.load_mnist(str(tmp_path), "mnist", "train"), f"{path} is damaged (",
                 f"{39 * 28 * 28} bytes of data, its header gives {40 * 28 * 28}")


def test_vaegan_folder_16bit_unreadable_and_cache(tmp_path, monkeypatch):
    root = tmp_path / "grey"
    (root / "a").mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 0x8040, np.uint16)).save(root / "a" / "deep.png")  # 16-bit grey
    assert Image.open(root / "a" / "deep.png").mode.startswith("I")
    x, _, _ = vaegan.load_folder(str(root), 8, None, 1)
    assert x.shape == (1, 1, 8, 8) and (x == 0x80).all()  # 0x8040 >> 8, not clipped to white
    cache = next(root.glob(".cache-*.npz"))
    assert not list(root.glob("*.tmp"))  # written atomically
    cache.write_bytes(cache.read_bytes()[:40])  # truncated by a crash: decoded again, no traceback
    assert torch.equal(vaegan.load_folder(str(root), 8, None, 1)[0], x)
    assert np.load(cache)["x"].shape == (1, 1, 8, 8)  # and written again whole
    (root / "b").mkdir()
    real_scandir = os.scandir

    def scandir(path="."):  # what os.walk meets in a folder it may not read (root ignores chmod)
        if os.path.basename(os.fspath(path)) == "b":
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)
    monkeypatch.setattr(os, "scandir", scandir)
    vaegan_error(lambda: vaegan.load_folder(str(root), 8, None, 1),
                 f"cannot read {root / 'b'} (Permission denied); fix its permissions or move it out of --dataroot")


def test_vaegan_numbers_and_paths_are_checked(tmp_path):
    (tmp_path / "file").write_text("x")
    cases = [(["--epochs", "0"], "--epochs 0 is outside its valid range [1, "),
             (["--image-size", "0"], "--image-size 0 is outside its valid range [16, 1024]"),
             (["--image-size", "-8"], "--image-size -8 is outside"),
             (["--image-size", "100000"], "--image-size 100000 is outside its valid range [16, 1024]"),
             (["--batch-size", "1"], "--batch-size 1 is outside its valid range [2, "),
             (["--log-every", "0"], "--log-every 0 is outside its valid range [1, inf)"),
             (["--outf", str(tmp_path / "file")], f"cannot write into the folder {tmp_path / 'file'} (a file is in the way)")]
    for extra, fragment in cases:
        vaegan_error(lambda: vaegan.main(["--dataset", "shapes"] + extra), fragment)
    ckpt = str(tmp_path / "ckpt.pt")
    vaegan_error(lambda: vaegan.main(["--sample", "--ckpt", ckpt, "--n", "0"]), "--n 0 is outside its valid range [1, inf)")
    vaegan_error(lambda: vaegan.main(["--sample", "--ckpt", ckpt, "--out", str(tmp_path / "file" / "s.png")]),
                 f"cannot write into the folder {tmp_path / 'file'} (a file is in the way)")


def test_vaegan_too_little_data_and_the_32_image_picture(tmp_path):
    vaegan_error(lambda: vaegan.main(VAEGAN_TINY + ["--limit", "7", "--outf", str(tmp_path / "a")]),
                 "only 7 training images, fewer than one batch of --batch-size 8; lower --batch-size or add images")
    outf = str(tmp_path / "b")
    vaegan.main(VAEGAN_TINY + ["--limit", "12", "--batch-size", "4", "--epochs", "1", "--outf", outf])
    c = 16 + 2
    assert Image.open(os.path.join(outf, "recon_e001.png")).size == (2 + 8 * c, 2 + 2 * c)  # 8 over 8


def test_vaegan_fresh_run_and_resume_flags(tmp_path):
    outf = str(tmp_path / "run")
    tiny = VAEGAN_TINY + ["--limit", "16", "--outf", outf]
    vaegan.main(tiny + ["--epochs", "1"])
    vaegan_error(lambda: vaegan.main(tiny + ["--epochs", "2"]),
                 f"error: {outf} already holds a run; add --resume to continue it, or choose another --outf")
    msg = vaegan_error(lambda: vaegan.main(tiny + ["--epochs", "2", "--resume", "--lr", "0.1", "--batch-size", "4"]))
    assert msg == ("error: --resume keeps the checkpoint's training flags; --batch-size, --lr differ from it (only "
                   "--dataroot, --epochs, --outf, --cuda, --amp, --compile, --workers, --log-every may change): "
                   "drop them, or start a new run with another --outf")
    vaegan_error(lambda: vaegan.main(tiny + ["--epochs", "1", "--resume"]),
                 "the checkpoint has already trained 1 epochs; give --epochs larger than 1 to train more")
    # the flags a resume may change come from the command line: here a --dataroot the data moved to
    run = vaegan.main(tiny + ["--epochs", "2", "--resume", "--dataroot", str(tmp_path / "moved"), "--log-every", "1"])
    assert run.args.dataroot == str(tmp_path / "moved") and run.args.log_every == 1
    assert torch.load(os.path.join(outf, "ckpt.pt"), weights_only=True)["epoch"] == 2


def test_vaegan_setup_run_and_train_step_on_random_data():
    """The entry points bench/bench.py uses: a Run on in-memory data, then one real training step."""
    args = vaegan.get_args(VAEGAN_TINY + ["--margin", "-1"])
    g = torch.Generator().manual_seed(0)
    data = (torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8, generator=g), None, [])
    run = vaegan.setup_run(args, torch.device("cpu"), data)
    assert isinstance(run, vaegan.Run) and set(run.nets) == {"E", "Dec", "D"} and run.images.shape == (16, 3, 16, 16)
    before = {k: [p.detach().clone() for p in n.parameters()] for k, n in run.nets.items()}
    out = vaegan.train_step(run, vaegan.get_batch(run, torch.arange(8)))
    assert {"kl", "recon", "gan_d", "gan_g", "upd_d", "upd_dec"} <= set(out)
    for k, n in run.nets.items():  # the rule is off: every network steps
        assert any(not torch.equal(p, b) for p, b in zip(n.parameters(), before[k])), k


def test_vaegan_resume_takes_the_untyped_flags_from_the_checkpoint(tmp_path, monkeypatch):
    """An interrupted run continues with --resume --outf alone: the checkpoint's --dataroot and --epochs."""
    data, moved, outf = str(tmp_path / "data"), str(tmp_path / "moved"), str(tmp_path / "run")
    make_image_folder(data, n=10)  # 18 training images: 2 steps an epoch
    tiny = ["--dataset", "folder", "--image-size", "16", "--width", "8", "--nz", "6", "--batch-size", "8"]
    real_step, steps = vaegan.train_step, []

    def interrupted(run, x):  # a crash in epoch 2, after epoch 1's checkpoint
        steps.append(1)
        if len(steps) == 3:
            raise KeyboardInterrupt
        return real_step(run, x)
    monkeypatch.setattr(vaegan, "train_step", interrupted)
    with pytest.raises(SystemExit) as stop:  # Ctrl-C: one line and exit status 130
        vaegan.main(tiny + ["--dataroot", data, "--epochs", "2", "--outf", outf])
    assert stop.value.code == 130
    monkeypatch.setattr(vaegan, "train_step", real_step)
    run = vaegan.main(["--resume", "--outf", outf])
    assert run.args.dataroot == data and run.args.epochs == 2 and run.epoch == 2
    shutil.move(data, moved)  # a typed --dataroot (and --epochs) overrides the checkpoint's
    run = vaegan.main(["--resume", "--outf", outf, "--dataroot", moved, "--epochs", "3"])
    assert run.args.dataroot == moved and run.epoch == 3
    vaegan_error(lambda: vaegan.main(["--resume", "--outf", outf]),
                 "the checkpoint has already trained 3 epochs; give --epochs larger than 3")


def test_vaegan_resume_of_a_gpu_run_on_a_cpu(tmp_path):
    """The machine's flags (--cuda, --amp, --compile, ...) are this command line's, never the checkpoint's."""
    outf = str(tmp_path / "run")
    vaegan.main(VAEGAN_TINY + ["--limit", "16", "--epochs", "1", "--outf", outf])
    ck = torch.load(os.path.join(outf, "ckpt.pt"), weights_only=True)
    torch.save({**ck, "args": {**ck["args"], "cuda": True, "amp": True, "epochs": 2, "log_every": 7}},
               os.path.join(outf, "ckpt.pt"))
    run = vaegan.main(["--resume", "--outf", outf])
    assert (run.args.cuda, run.args.amp, run.args.log_every, run.epoch) == (False, False, 100, 2)


# ----------------------------------------------------------------------------- lapgan.py and vaegan.py: data parallel
def _ddp_run_worker(rank, port, script, argv, result):
    """One torchrun-style rank of lapgan.py or vaegan.py: train, then save its weights and its file writes."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    mod, writes = {"lapgan": lapgan, "vaegan": vaegan}[script], []
    for name in ("save_checkpoint", "write_atomic", "append_log", "save_grid", "plot_curves"):
        real = getattr(mod, name, None)
        if real is None:  # vaegan.py writes every file through write_atomic
            continue
        setattr(mod, name, lambda *a, _real=real, _name=name, **k: (writes.append(_name), _real(*a, **k))[1])
    # Gloo aborts ("terminate called without an active exception") when one rank tears its group down
    # while the other still talks to it: every teardown waits for both ranks first, even after an error
    destroy = torch.distributed.destroy_process_group

    def barrier_then_destroy(*a, **k):
        torch.distributed.barrier()
        destroy(*a, **k)
    torch.distributed.destroy_process_group = barrier_then_destroy
    try:
        run = mod.main(argv)
        nets = run.nets  # lapgan: "G0", "D0", "G1", ...; vaegan: "E", "Dec", "D"
        torch.save({"nets": {k: n.state_dict() for k, n in nets.items()}, "writes": writes}, f"{result}{rank}.pt")
    finally:
        if torch.distributed.is_initialized():
            destroy()


@pytest.mark.parametrize("script,argv", [
    ("lapgan", LAPGAN_TINY + ["--epochs", "2", "--balance"]),
    ("lapgan", LAPGAN_TINY + ["--epochs", "2", "--bn-d", "1"]),
    ("vaegan", VAEGAN_TINY + ["--limit", "64", "--epochs", "2", "--log-every", "2"])])
def test_data_parallel_two_ranks_lapgan_vaegan(tmp_path, script, argv):
    """Two Gloo ranks: identical weights (and BN statistics) afterwards, and only rank 0 writes files."""
    outf, result = str(tmp_path / "ddp"), str(tmp_path / "rank")
    ctx = torch.multiprocessing.spawn(_ddp_run_worker, args=(free_port(), script, argv + ["--outf", outf], result),
                                      nprocs=2, join=False)
    import time
    try:  # join raises if a rank failed (a SIGABRT included); True once both exited, False while one runs
        deadline = time.time() + 300
        while not ctx.join(timeout=5):
            assert time.time() < deadline, "the ranks did not finish in 5 minutes"
    finally:
        for p in ctx.processes:
            p.kill() if p.is_alive() else p.join()
    assert [p.exitcode for p in ctx.processes] == [0, 0]
    r0, r1 = (torch.load(f"{result}{r}.pt", weights_only=True) for r in (0, 1))
    assert r1["writes"] == [] and {"save_checkpoint", "write_atomic"} & set(r0["writes"])
    for net, state in r0["nets"].items():
        assert all(torch.equal(state[k], r1["nets"][net][k]) for k in state), net
    steps = {"lapgan": 2 * 16 // (2 * 4), "vaegan": 2 * 64 // (2 * 8)}[script]  # epochs x images / (ranks x real per step)
    assert read_log(os.path.join(outf, "log.csv"))[-1]["step"] == str(steps)


# ----------------------------------------------------------------------------- bench/quality.py
sys.path.insert(0, os.path.join(HERE, "bench"))
import json  # noqa: E402
import quality  # noqa: E402


def pattern_images(n, seed):
    """Four easy classes (a bar across, a bar down, a diagonal, a ring), shifted and noisy, as uint8 28 x 28."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:28, :28]
    bases = [(abs(yy - 14) < 3), (abs(xx - 14) < 3), (abs(yy - xx) < 3), (abs(np.hypot(yy - 14, xx - 14) - 8) < 2)]
    labels = np.arange(n) % 4
    imgs = np.stack([np.roll(bases[k] * 200.0, tuple(rng.integers(-3, 4, 2)), (0, 1)) for k in labels])
    return np.clip(imgs + rng.normal(0, 25, imgs.shape), 0, 255).astype(np.uint8), labels


@pytest.fixture(scope="module")
def quality_data(tmp_path_factory):
    """A 4-class dataset in MNIST's IDX layout and its classifier, trained once for the module (a second)."""
    root = tmp_path_factory.mktemp("qdata")
    (x, y), (xt, yt) = pattern_images(400, 0), pattern_images(200, 1)
    for name, arr in zip(quality.IDX_FILES, (x, y, xt, yt)):
        write_idx(str(root / name), arr)
    cache = str(root / "cache")
    torch.manual_seed(0)
    quality.get_classifier("mnist", str(root), cache, epochs=2, log=lambda m: None)
    return str(root), cache, (x, y), (xt, yt)


def quality_of(tmp_path, quality_data, images, labels=None):
    root, cache, _, _ = quality_data
    arrays = {"images": images} if labels is None else {"images": images, "labels": labels}
    np.savez(tmp_path / "s.npz", **arrays)
    return quality.evaluate(str(tmp_path / "s.npz"), "mnist", root, cache, log=lambda m: None)


def test_quality_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    # commuting (diagonal) covariances: |mu1 - mu2|^2 + sum (sqrt a - sqrt b)^2
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert quality.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    # general covariances: Tr (C1 C2)^(1/2) is the sum of the square roots of C1 C2's (real, >= 0) eigenvalues
    m1, m2 = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    c1, c2 = m1 @ m1.T + 0.1 * np.eye(5), m2 @ m2.T + 0.1 * np.eye(5)
    cross = np.sqrt(np.linalg.eigvals(c1 @ c2).real.clip(0)).sum()
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * cross
    assert quality.frechet_distance(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-7)
    assert quality.frechet_distance(mu1, c1, mu1, c1) == pytest.approx(0, abs=1e-7)
    # from samples: the fitted Gaussians' distance approaches the true one
    f1 = rng.multivariate_normal(mu1, c1, 200000)
    f2 = rng.multivariate_normal(mu2, c2, 200000)
    assert quality.fid_from_features(f1, f2) == pytest.approx(expected, rel=0.02)


def test_quality_test_images_score_near_zero_and_noise_high(tmp_path, quality_data):
    _, _, _, (xt, yt) = quality_data
    real = quality_of(tmp_path, quality_data, xt, yt)
    noise = quality_of(tmp_path, quality_data, np.random.default_rng(2).integers(0, 256, xt.shape, dtype=np.uint8))
    assert real["classifier_acc"] > 0.95 and real["class_acc"] > 0.95 and real["coverage"] == 4
    assert noise["fid"] > 20 * max(real["fid"], 1e-3) and "class_acc" not in noise
    wrong = quality_of(tmp_path, quality_data, xt, (yt + 1) % 4)  # the asked class is never the drawn one
    assert wrong["class_acc"] < 0.05
    one_class = quality_of(tmp_path, quality_data, xt[yt == 2])  # a collapsed model: one class only
    assert one_class["coverage"] == 1 and one_class["fid"] > 5 * max(real["fid"], 1e-3)


def test_quality_flags_copies_of_training_images(tmp_path, quality_data):
    _, _, (x, y), (xt, yt) = quality_data
    copies = quality_of(tmp_path, quality_data, x[:200], y[:200])
    new = quality_of(tmp_path, quality_data, xt, yt)
    assert copies["copy_ratio"] < 0.1 and 0.8 < new["copy_ratio"] < 1.25


def test_quality_command_line_and_cache(tmp_path, quality_data, capsys):
    root, cache, _, (xt, yt) = quality_data
    rgb32 = np.repeat(np.pad(xt, ((0, 0), (2, 2), (2, 2)))[..., None], 3, -1)  # colour 32 px: resized and greyed
    np.savez(tmp_path / "s.npz", images=rgb32, labels=yt)
    cached = sorted(os.listdir(cache))
    r = quality.main([str(tmp_path / "s.npz"), "--dataset", "mnist", "--dataroot", root, "--cache", cache])
    out = capsys.readouterr()
    assert sorted(os.listdir(cache)) == cached and "training" not in out.err  # the cached classifier is reused
    last = json.loads(out.out.strip().splitlines()[-1])
    assert set(last) >= {"fid", "class_acc", "coverage", "copy_ratio"} and last == pytest.approx(r)
    assert last["class_acc"] > 0.9
    np.savez(tmp_path / "bad.npz", images=np.zeros((4, 28, 28), np.float32))
    with pytest.raises(SystemExit, match="uint8"):
        quality.main([str(tmp_path / "bad.npz"), "--dataset", "mnist", "--dataroot", root, "--cache", cache])
    with pytest.raises(SystemExit, match="no CIFAR-10 in"):
        quality.main([str(tmp_path / "s.npz"), "--dataset", "cifar10", "--dataroot", str(tmp_path / "none"),
                      "--cache", cache])


# ----------------------------------------------------------------------------- bench/bench.py
import bench as bench_tool  # noqa: E402  (bench/ is on sys.path above)


@pytest.mark.parametrize("argv", [
    ["gan", "--dataset", "shapes", "--image-size", "32", "--ngf", "8", "--ndf", "8", "--batch-size", "8"],
    ["lapgan", "--dataset", "shapes", "--conditional", "--width-g", "8", "--width-d", "8", "--batch-size", "8"],
    ["vaegan", "--dataset", "shapes", "--width", "8", "--batch-size", "8"]], ids=["gan", "lapgan", "vaegan"])
def test_bench_times_the_scripts_own_training_step(argv, capsys, monkeypatch):
    mod, calls = __import__(argv[0]), []
    real_step = mod.train_step

    def counted(run, *a, **kw):
        calls.append(run)
        return real_step(run, *a, **kw)

    monkeypatch.setattr(mod, "train_step", counted)
    rate = bench_tool.main(argv + ["--steps", "3", "--warmup", "2"])
    assert len(calls) == 5 and rate > 0  # 2 warm-up steps, then the 3 timed ones
    row = capsys.readouterr().out.strip().splitlines()[-1]
    assert row.startswith(f"| {argv[0]}.py | 8 | fp32 | CPU | ") and f"bench/bench.py {argv[0]} " in row
    with pytest.raises(SystemExit, match="names the script"):
        bench_tool.main(["nonsense", "--steps", "1"])


# ----------------------------------------------------------------------------- bench/levels.py
def test_levels_starts_the_chain_from_real_test_images(lapgan_runs, tmp_path, monkeypatch):
    import levels as levels_tool
    ckpt = os.path.join(lapgan_runs["full"], "ckpt.pt")
    real_load = lapgan.load_levels

    def zero_residuals(paths):  # every G_k (k < K) draws h_k = 0, so a chain from real I_k is u(I_k) exactly
        Gs, ck = real_load(paths)
        return [lambda xs, y: torch.zeros_like(xs[1]) for _ in Gs[:-1]] + [Gs[-1]], ck

    monkeypatch.setattr(lapgan, "load_levels", zero_residuals)
    out = levels_tool.chains_from_real(ckpt, 20)
    ck = torch.load(ckpt, weights_only=True)
    test = lapgan.load_dataset(argparse.Namespace(**{**ck["args"], "limit": None}), "test")
    x = (test[0][:20].float() / 255 - ck["mean"]) / ck["std"]
    assert sorted(out) == ["from_1", "from_2", "full", "real"] and ck["sizes"] == [32, 16, 8]
    for k in (1, 2):  # from the real I_1 (16 px) and from the real base I_2 (8 px)
        images, labels = out[f"from_{k}"]
        want = lapgan.down(x, ck["sizes"][k])
        for finer in reversed(ck["sizes"][:k]):  # u(.) one level at a time, as the chain does
            want = lapgan.up(want, finer)
        want = lapgan.to_uint8(lapgan.to_display(want, ck["mean"], ck["std"]))
        assert np.abs(images.astype(int) - want.astype(int)).max() <= 1, k  # rounding only
        assert images.shape == (20, 32, 32, 3) and np.array_equal(labels, test[1][:20].numpy())
    assert not np.array_equal(out["full"][0], out["from_2"][0])  # the full chain draws its own base
    monkeypatch.setattr(lapgan, "load_levels", real_load)
    levels_tool.main([ckpt, "--out", str(tmp_path / "lv"), "--n", "8"])
    assert sorted(os.listdir(tmp_path / "lv")) == ["from_1.npz", "from_2.npz", "full.npz", "real.npz"]
    assert np.load(tmp_path / "lv" / "full.npz")["images"].shape == (8, 32, 32, 3)


# ----------------------------------------------------------------------------- README.md's commands
def test_every_readme_command_parses_with_its_scripts_flags():
    import shlex
    text = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "README.md")).read()
    modules, seen = {"gan.py": gan, "lapgan.py": lapgan, "vaegan.py": vaegan}, []
    for line in text.splitlines():
        for cmd in re.findall(r"python3 (?:-m pip install[^&]*&& python3 )?((?:gan|lapgan|vaegan)\.py [^|`#]*)", line):
            words = shlex.split(cmd)
            parser = modules[words[0]].make_parser()
            parser.exit = parser.error = lambda *a, **k: pytest.fail(f"README: {cmd!r} does not parse: {a}")
            parser.parse_args(words[1:])
            seen.append(words[0])
    assert {"gan.py", "lapgan.py", "vaegan.py"} <= set(seen) and len(seen) >= 10
    with pytest.raises(BaseException):  # the check itself fails on a flag the script lacks
        bad = lapgan.make_parser()
        bad.exit = bad.error = lambda *a, **k: pytest.fail("does not parse")
        bad.parse_args(["--dataset", "mnist", "--no-such-flag"])


# ---- bench/quality.py: bad samples, labels, cache folders and flags
import tempfile  # noqa: E402


@pytest.mark.parametrize("images,labels,words", [
    (np.zeros((6, 1, 28, 28), np.uint8), None, "np.transpose(images, (0, 2, 3, 1))"),  # N x C x H x W
    (np.zeros((6, 3, 32, 32), np.uint8), None, "np.transpose(images, (0, 2, 3, 1))"),
    (np.zeros((6, 28, 28, 2), np.uint8), None, "N x H x W x C (C = 1 or 3)"),
    (np.zeros((6, 28), np.uint8), None, "has shape (6, 28)"),
    (np.zeros((1, 28, 28), np.uint8), None, "N >= 2"),
    (np.zeros((6, 28, 28), np.float32), None, "are float32; they must be uint8"),
    (np.zeros((6, 28, 28), np.int64), None, "are int64; they must be uint8"),
    (np.zeros((6, 28, 28), np.uint8), np.arange(8), "holds 6 images but 8 labels"),
    (np.zeros((6, 28, 28), np.uint8), np.arange(4), "holds 6 images but 4 labels"),
    (np.zeros((6, 28, 28), np.uint8), np.zeros(6, np.float32), "one class index"),
    (np.zeros((6, 28, 28), np.uint8), np.zeros((6, 1), np.int64), "one class index"),
    (np.zeros((6, 28, 28), np.uint8), -np.ones(6, np.int64), "one class index")],
    ids=["n1hw", "n3hw", "two-channels", "rank2", "one-image", "float", "int64", "more-labels",
         "fewer-labels", "float-labels", "2d-labels", "negative-labels"])
def test_quality_refuses_bad_samples_in_one_line_before_any_training(tmp_path, images, labels, words):
    arrays = {"images": images} if labels is None else {"images": images, "labels": labels}
    np.savez(tmp_path / "s.npz", **arrays)
    argv = [str(tmp_path / "s.npz"), "--dataset", "mnist", "--dataroot", str(tmp_path / "no-data"), "--cache",
            str(tmp_path / "cache")]
    with pytest.raises(SystemExit) as e:  # before the data is looked for: there is none in no-data
        quality.main(argv)
    assert str(e.value).startswith("error: ") and words in str(e.value) and "\n" not in str(e.value)
    assert os.listdir(tmp_path / "cache") == []  # nothing trained, nothing cached


def test_quality_accepts_nhwc_and_nhw_and_refuses_labels_beyond_the_classes(tmp_path, quality_data):
    x = np.arange(2 * 5 * 4, dtype=np.uint8).reshape(2, 5, 4)
    for given in (x, x[..., None], np.repeat(x[..., None], 3, -1)):
        checked, _ = quality.checked_samples(given, None, "s.npz")
        assert checked.shape[:3] == (2, 5, 4) and checked.shape[3] in (1, 3)
        assert np.array_equal(checked[..., 0], x)
    chw = quality.as_nchw(quality.checked_samples(x, None, "s.npz")[0], 1, 5)
    assert chw.shape == (2, 1, 5, 5)
    _, _, _, (xt, yt) = quality_data
    with pytest.raises(SystemExit, match=r"go up to 4, but mnist has classes 0..3"):
        quality_of(tmp_path, quality_data, xt[:10], np.full(10, 4))


def test_quality_numeric_flags_out_of_range_are_one_line(tmp_path, capsys):
    np.savez(tmp_path / "s.npz", images=np.zeros((4, 28, 28), np.uint8))
    for name, ok, need in quality.NUMBER_CHECKS:  # every numeric flag in the table, NaN included
        assert not ok(float("nan"))
        for value in ("0", "-3"):
            assert not ok(int(value))
            with pytest.raises(SystemExit) as e:
                quality.main([str(tmp_path / "s.npz"), "--dataset", "mnist", f"--{name}", value, "--cache",
                              str(tmp_path / "c")])
            assert str(e.value) == f"error: --{name} {value} is out of range; it must be {need}"
    with pytest.raises(SystemExit) as e:  # argparse's own line for a number that is not an int
        quality.main([str(tmp_path / "s.npz"), "--dataset", "mnist", "--epochs", "nan"])
    assert e.value.code == 2 and "invalid int value: 'nan'" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "c")  # refused before the cache folder was made


def test_quality_home_not_a_folder_caches_in_the_temporary_directory(tmp_path, quality_data, monkeypatch,
                                                                     capsys):
    root, _, _, (xt, yt) = quality_data
    np.savez(tmp_path / "s.npz", images=xt[:20], labels=yt[:20])
    (tmp_path / "home").write_text("a file, not a folder")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # a real HOME that is a file
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    r = quality.main([str(tmp_path / "s.npz"), "--dataset", "mnist", "--dataroot", root, "--epochs", "1"])
    out = capsys.readouterr()
    assert "note: cannot use" in out.err and json.loads(out.out.splitlines()[-1]) == pytest.approx(r)
    assert [f for f in os.listdir(tmp_path / "tmp" / "gans-quality") if f.endswith(".pt")]
    with pytest.raises(SystemExit, match=r"^error: --cache .* cannot be made"):  # typed: no fallback
        quality.main([str(tmp_path / "s.npz"), "--dataset", "mnist", "--dataroot", root, "--cache",
                      str(tmp_path / "home" / "cache")])

# ---- bench/gpu.py
import time  # noqa: E402
import gpu as gpu_tool  # noqa: E402  (bench/ is on sys.path above)


@pytest.fixture(scope="module")
def gpu_dry_run(tmp_path_factory):
    """bench/gpu.py --dry-run as a user runs it, once for the module: (its folder, the finished process)."""
    out = tmp_path_factory.mktemp("gpu-dry")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, os.path.join(HERE, "bench", "gpu.py"), "--out", str(out), "--dry-run",
           "--peak-tflops", "0.5"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=HERE, env=env)
    return out, proc


def table_rows(text, first_cell):
    """The cells of the markdown rows whose first cell starts with first_cell."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith(f"| {first_cell}")]


def test_gpu_dry_run_writes_every_part_of_the_report(gpu_dry_run):
    out, proc = gpu_dry_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = open(out / "report.md").read()
    assert "Traceback" not in proc.stdout + proc.stderr and "DRY RUN" in report
    for script, batch in (("gan.py", "8"), ("lapgan.py", "8"), ("vaegan.py", "16")):  # speed: bench.py runs
        (row,) = table_rows(report, script)
        assert row[1:4] == [batch, "fp32", "CPU"] and float(row[4]) > 0 and float(row[5]) > 0, row
        assert row[6] == "n/a" and f"--batch-size {batch}" in row[7]  # no CUDA memory on the CPU
        assert float(row[4]) == pytest.approx(int(batch) / float(row[5]) * 1000, rel=0.02)
    assert "Skipped: no --examples DIR" in report  # compare: no checkout of pytorch/examples given
    for step in ("DCGAN", "LAPGAN"):  # profile: ten operators each, sorted by time
        table = report.split(f"One {step} step")[1].split("\n\n")[1]
        times = [float(r[2]) for r in table_rows(table, "`")]
        assert len(times) == 10 and times == sorted(times, reverse=True)
    mfu = [r for r in table_rows(report, "") if len(r) == 6 and r[5].endswith("%")]
    assert {(r[0], r[1]) for r in mfu} == {("8", "fp32"), ("8", "amp"), ("16", "fp32"), ("16", "amp")}
    for batch, _, gflop, ms, tflops, share in mfu:  # FLOPs over step time over the 0.5 TFLOP/s given
        assert float(tflops) == pytest.approx(float(gflop) / float(ms), rel=0.05, abs=2e-3)
        assert float(share[:-1]) == pytest.approx(float(tflops) / 0.5 * 100, rel=0.05, abs=0.2)
    assert [float(r[2]) for r in mfu if r[0] == "16"][0] == pytest.approx(  # twice the batch, twice the FLOPs
        2 * [float(r[2]) for r in mfu if r[0] == "8"][0], rel=0.05)
    summary = report.split("## Summary")[1]
    assert len(table_rows(summary, "")) == 6 and proc.stdout.rstrip().endswith("report.md")


def test_gpu_dry_run_trains_lapgan_on_the_generated_cifar10_it_alone_trusts(gpu_dry_run, tmp_path):
    out, proc = gpu_dry_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = table_rows(open(out / "report.md").read(), "fp32 | CPU")
    assert row[2] == "10" and row[6] == "ok", row  # 80 images, 8 real per step: read by lapgan.py's reader
    first, steady = (float(row[i].split(" s")[0]) for i in (3, 4))
    assert float(row[5].split()[0]) == pytest.approx((first + 24 * steady) / 60, abs=0.08)  # rounding
    assert os.path.exists(out / "lapgan-fp32" / "ckpt.pt")
    # the same file, given to lapgan.py as a user runs it: refused, with one line
    r = run_cli("lapgan.py", "--dataset", "cifar10", "--dataroot", str(out / "data"), "--outf",
                str(tmp_path / "o"))
    assert r.returncode != 0 and "official CIFAR-10 checksum" in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(tmp_path / "o" / "ckpt.pt")


def test_gpu_generated_cifar10_has_the_official_layout_and_the_trust_stays_in_its_process(tmp_path):
    official = dict(lapgan.CIFAR_MD5)
    sums = gpu_tool.write_cifar(str(tmp_path), 50, 20)
    tar_path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tar_path) as t:
        blobs = {m.name: t.extractfile(m).read() for m in t}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]
    assert sorted(blobs) == sorted(f"cifar-10-batches-py/{n}" for n in names)
    for n in names[:6]:
        d = lapgan.BatchUnpickler(io.BytesIO(blobs[f"cifar-10-batches-py/{n}"]), encoding="bytes").load()
        assert d[b"data"].dtype == np.uint8 and d[b"data"].shape == (20 if n == "test_batch" else 10, 3072)
        assert len(d[b"labels"]) == len(d[b"data"]) and set(d[b"labels"]) <= set(range(10))
        assert sums[n] == hashlib.md5(blobs[f"cifar-10-batches-py/{n}"]).hexdigest()
    assert sums["cifar-10-python.tar.gz"] == hashlib.md5(open(tar_path, "rb").read()).hexdigest()
    assert lapgan.CIFAR_MD5 == official  # writing (and importing gpu.py) trusted nothing here
    with pytest.raises(SystemExit, match="official CIFAR-10 checksum"):
        lapgan.read_cifar10(str(tmp_path), "train")


def test_gpu_time_limit_ends_a_run_and_everything_it_started(tmp_path):
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
            "time.sleep(60)']); print(p.pid, flush=True); time.sleep(60)")
    ran = gpu_tool.run_child([sys.executable, "-c", code], 3, str(tmp_path / "log"))
    assert ran.rc is None and ran.seconds < 15 and gpu_tool.outcome(ran, 3).startswith("stopped")
    grandchild = int(ran.lines[0][1])
    time.sleep(0.5)
    try:  # the process the run started is gone too (or a zombie that nothing reaps: dead all the same)
        state = open(f"/proc/{grandchild}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z"), state
    assert "exit status None" in open(tmp_path / "log").read()
    late = gpu_tool.run_child([sys.executable, "-c", "open('started', 'w')"], 0.5, str(tmp_path / "late"))
    assert gpu_tool.outcome(late, 0.5).startswith("not started")
    assert not os.path.exists(os.path.join(HERE, "started"))


def test_gpu_speed_order_and_experiments():
    plan = gpu_tool.Plan("o", dry=False, device=["--cuda"], batches=(64, 1024), steps=(50, 20),
                         modes=[[], ["--amp"], ["--amp", "--compile"]], lapgan_modes=[[]], cifar=(1, 1),
                         epochs=1, extra={}, lapgan_extra=[], limits={})
    rows = gpu_tool.speed_configs(plan, ["cuda-graphs", "merge-steps"])
    assert len(rows) == 3 * 3 * 2 + 3 + 1
    modes = [tuple(flags) for _, flags, _ in rows[:18]]
    assert modes == sorted(modes, key=len)  # fp32 first, compiling last: a slow compile starves nothing
    graphs = ["--amp", "--compile", "--cuda-graphs"]
    assert rows[18:21] == [(n, graphs, 64) for n in ("gan", "lapgan", "vaegan")]
    assert rows[21] == ("lapgan", ["--amp", "--merge-steps"], 64)
    cmd = gpu_tool.bench_command(plan, "gan", ["--amp"], 1024)
    assert cmd[-4:] == ["--batch-size", "1024", "--steps", "20"] and "--cuda" in cmd


def test_gpu_flop_count_is_forward_and_backward():
    B, I, O = 4, 8, 3  # a linear layer: 2BIO forward, 2BIO for each of the input's and the weight's gradients
    x, lin = torch.randn(B, I, requires_grad=True), nn.Linear(I, O)
    assert gpu_tool.step_flops(lambda: lin(x).sum().backward()) == 6 * B * I * O


def test_bench_merged_lapgan_g_step_equals_the_per_level_steps():
    args = lapgan.get_args(["--dataset", "shapes", "--width-g", "8", "--width-d", "8", "--batch-size", "8"])
    weights = []
    for merge in (False, True):
        torch.manual_seed(0)
        run = lapgan.setup_run(args, torch.device("cpu"), bench_tool.random_data(args, 64))
        before = torch.cat([p.detach().flatten().clone() for p in run.levels[2].G.parameters()])
        ours = argparse.Namespace(channels_last=False, fused_opt=False, merge_steps=merge)
        step = bench_tool.step_function("lapgan", lapgan, run)
        extra = bench_tool.tune("lapgan", run, "cpu", ours)
        torch.manual_seed(1)
        for _ in range(2):  # two steps: momentum carries over in both
            step()
            extra()
        after = torch.cat([p.detach().flatten() for p in run.levels[2].G.parameters()])
        assert not torch.equal(before, after)  # G_2 did learn
        every = [p for net in run.nets.values() for p in net.parameters()]
        weights.append(torch.cat([p.detach().flatten() for p in every]))
    assert torch.allclose(weights[0], weights[1], atol=1e-6)
    with pytest.raises(SystemExit, match="lapgan's levels only"):
        bench_tool.main(["gan", "--dataset", "shapes", "--merge-steps", "--steps", "1"])


# ---- reliability: gan.py (each cause handled once: main, write_atomic, prepare_output, lock_run, decode_image,
# list_images, check_split, NUMBERS, load_sampler, load_checkpoint)
import shlex, signal, time  # noqa: E402
GAN_SMALL = ["--dataset", "shapes", "--image-size", "16", "--limit", "128", "--batch-size", "16", "--ngf", "8",
             "--ndf", "8", "--nz", "8", "--log-every", "2", "--workers", "1"]


def default_sigint():
    """In a child before it starts: Ctrl-C's default action, also where the suite runs in the background
    (a background job ignores SIGINT, its children inherit that, and Python then installs no handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def gan_start(*argv):
    """gan.py in a real subprocess (its own process group is not needed: signals go to its pid)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, os.path.join(HERE, "gan.py"), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=HERE, env=env, preexec_fn=default_sigint)


def wait_for(path, proc, timeout=120):
    """Poll until path exists (or the process ends): the moment to send a signal."""
    t0 = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.002)


def sigint_line(proc, path):
    """A real SIGINT (Ctrl-C) once PATH exists -> the one line the script printed; exit status 130."""
    wait_for(path, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and len(err.strip().splitlines()) == 1, err
    return err.strip()


def gan_final(outf):
    ck = torch.load(os.path.join(outf, "ckpt.pt"), weights_only=True)
    return ck, read_log(os.path.join(outf, "log.csv"))


def test_gan_sigint_keeps_the_checkpoint_and_resume_continues_exactly(tmp_path):
    """Ctrl-C (a real SIGINT) mid-epoch 2: one line, status 130, ckpt.pt of epoch 1 kept, no .tmp; the
    printed command continues the run to exactly the weights and log of an uninterrupted run."""
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    proc = gan_start(*GAN_SMALL, "--epochs", "3", "--outf", cut)
    line = sigint_line(proc, os.path.join(cut, "ckpt.pt"))
    assert line.startswith("interrupted at step") and f"{cut}/ckpt.pt (epoch" in line, line
    assert line.endswith(f"to continue: python3 gan.py --resume --outf {cut} --workers 1 --log-every 2"), line
    assert not [f for f in os.listdir(cut) if f.endswith(".tmp") or f == ".lock"]
    gan.main(shlex.split(line.split("to continue: python3 gan.py ")[1]))
    gan.main(GAN_SMALL + ["--epochs", "3", "--outf", full])
    (a, log_a), (b, log_b) = gan_final(full), gan_final(cut)
    assert log_a == log_b and a["step"] == b["step"] == 24
    for net in ("G", "D"):
        assert all(torch.equal(a[net][k], b[net][k]) for k in a[net]), net


def test_gan_sigint_before_any_checkpoint_then_the_same_command_starts_again(tmp_path):
    """Ctrl-C in epoch 1: nothing to resume, so the run takes its log.csv away with it and the same command
    is not refused; --resume there says there is nothing to resume."""
    outf = str(tmp_path / "run")
    argv = GAN_SMALL + ["--limit", "640", "--epochs", "1", "--outf", outf]
    proc = gan_start(*argv)
    err = sigint_line(proc, os.path.join(outf, "log.csv"))
    assert "no checkpoint was written yet; to start again: python3 gan.py --dataset shapes" in err
    assert not os.path.exists(os.path.join(outf, "ckpt.pt"))
    assert not os.path.exists(os.path.join(outf, "log.csv"))
    gan_one_line_error(f"nothing to resume: {outf} holds no checkpoint (ckpt.pt); run without --resume",
                       call=lambda: gan.main(["--resume", "--outf", outf]))
    gan.main(argv)  # the same command, as printed
    rows = read_log(os.path.join(outf, "log.csv"))
    assert [int(r["step"]) for r in rows] == list(range(2, 41, 2))  # one run's rows, none left from before


def kill_when(path, proc, min_size=1):
    """SIGKILL proc the moment path exists with at least min_size bytes: mid-write."""
    t0 = time.time()
    while not (os.path.exists(path) and os.path.getsize(path) >= min_size):
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < 120
    proc.kill()
    proc.wait()


def test_gan_sigkill_during_a_checkpoint_write_keeps_the_previous_one(tmp_path):
    """A real SIGKILL while a wide model's checkpoint is a quarter written: the previous one is whole and
    loads, and --resume from it still continues exactly (the stale .tmp is simply written over)."""
    wide = GAN_SMALL + ["--ngf", "256", "--limit", "32", "--log-every", "1"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    gan.main(wide + ["--epochs", "1", "--outf", cut])
    ckpt = os.path.join(cut, "ckpt.pt")
    before = open(ckpt, "rb").read()
    proc = gan_start(*wide, "--epochs", "3", "--outf", cut, "--resume")
    kill_when(ckpt + ".tmp", proc, min_size=len(before) // 4)
    assert open(ckpt, "rb").read() == before and torch.load(ckpt, weights_only=True)["epoch"] == 1
    gan.main(["--resume", "--outf", cut, "--epochs", "2", "--log-every", "1"])  # the dead run's lock: stale
    gan.main(wide + ["--epochs", "2", "--outf", full])
    (a, log_a), (b, log_b) = gan_final(full), gan_final(cut)
    assert log_a == log_b and all(torch.equal(a["G"][k], b["G"][k]) for k in a["G"])


def test_gan_sigkill_during_a_log_trim_keeps_the_log(tmp_path):
    """--resume rewrites log.csv without the rows past the checkpoint; a real SIGKILL while a long log is
    rewritten leaves it as it was (never deleted first), and the next --resume trims it and goes on."""
    outf = str(tmp_path / "run")
    gan.main(GAN_SMALL + ["--limit", "32", "--epochs", "1", "--outf", outf])
    log, ckpt = os.path.join(outf, "log.csv"), os.path.join(outf, "ckpt.pt")
    rows = read_log(log)
    long_log = open(log).read() + "".join(f"{s},9,1,1,1,1,0.5,0.5,1,1,0\n" for s in range(3, 600_000))
    with open(log, "w") as f:
        f.write(long_log)
    real = torch.load(ckpt, weights_only=True)
    torch.save({**real, "step": 10 ** 6}, ckpt)  # keeps every row: the trim writes the whole long log
    proc = gan_start("--resume", "--outf", outf, "--epochs", "2")
    kill_when(log + ".tmp", proc, min_size=len(long_log) // 4)
    assert open(log).read() == long_log
    torch.save(real, ckpt)
    gan.main(["--resume", "--outf", outf, "--epochs", "2"])
    again = read_log(log)
    assert again[:len(rows)] == rows and [int(r["step"]) for r in again] == [2, 4]


def test_gan_sigkill_during_a_cache_write_leaves_no_torn_cache(tmp_path):
    """A real SIGKILL while a big decode cache is written: no torn .npz under the cache's name, the older
    cache still loads, and the next read decodes the same images again."""
    data = tmp_path / "data"
    make_image_folder(data, n=2)
    x_small, _, _ = gan.load_folder(str(data), 16, None, 1)
    (old,) = data.glob(".cache-*.npz")
    old_bytes = old.read_bytes()
    for i in range(300):
        Image.fromarray(np.full((48, 48, 3), i % 256, np.uint8)).save(data / "cats" / f"more{i:03d}.png")
    code = f"import gan; gan.load_folder({str(data)!r}, 192, None, 1)"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=HERE, stdout=subprocess.DEVNULL)
    t0 = time.time()
    while not any(p.name.endswith(".npz.tmp") and p.stat().st_size > 1 << 20 for p in data.iterdir()):
        assert proc.poll() is None and time.time() - t0 < 120
    proc.kill()
    proc.wait()
    assert sorted(p.name for p in data.glob(".cache-*.npz")) == [old.name] and old.read_bytes() == old_bytes
    x, _, _ = gan.load_folder(str(data), 192, None, 1)
    assert x.shape == (304, 3, 192, 192) and x[2].float().std() == 0  # more000.png: one flat grey


def test_gan_two_real_processes_race_for_one_outf(tmp_path):
    """Two runs started at once into one --outf: one trains, the other is refused with the first's pid;
    a lock left by a dead process is stale and taken over."""
    outf = str(tmp_path / "run")
    procs = [gan_start(*GAN_SMALL, "--epochs", "1", "--outf", outf) for _ in range(2)]
    results = [(p.pid, p.wait(timeout=300), p.communicate()[1]) for p in procs]
    ok = [r for r in results if r[1] == 0]
    refused = [r for r in results if r[1] != 0]
    assert len(ok) == 1 and len(refused) == 1, results
    assert refused[0][2].strip() == (f"error: {outf} is in use by another run (process {ok[0][0]}); wait for "
                                     "it to end, or choose another --outf")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "run2").mkdir()
    (tmp_path / "run2" / ".lock").write_text(str(dead.pid))
    gan.main(GAN_SMALL + ["--epochs", "1", "--outf", str(tmp_path / "run2")])
    assert not (tmp_path / "run2" / ".lock").exists() and (tmp_path / "run2" / "ckpt.pt").exists()


def test_gan_output_folders_are_prepared_or_refused_in_one_line(tmp_path):
    """--outf whose parent is a file, that is a file, whose name is too long, on a read-only disk; --npz and
    --out into folders that do not exist yet (created)."""
    (tmp_path / "file").write_text("x")
    for outf, why in ((tmp_path / "file" / "run", "a folder on its path is a file"),
                      (tmp_path / "file", "it is a file"), (tmp_path / ("x" * 300), "File name too long")):
        gan_one_line_error(f"cannot write into {outf} ({why}); give another folder",
                           call=lambda: gan.main(GAN_SMALL + ["--outf", str(outf)]))
    with small_tmpfs(tmp_path / "ro", options=",ro") as ro:
        gan_one_line_error(f"cannot write into {ro}/run (Read-only file system)",
                           call=lambda: gan.main(GAN_SMALL + ["--outf", f"{ro}/run"]))
    outf = str(tmp_path / "r")
    gan.main(GAN_SMALL + ["--epochs", "1", "--outf", outf])
    npz, out = tmp_path / "new" / "deeper" / "s.npz", tmp_path / "other" / "g.png"
    gan.main(["--sample", "--ckpt", f"{outf}/ckpt.pt", "--n", "5", "--npz", str(npz), "--out", str(out)])
    assert np.load(npz)["images"].shape == (5, 16, 16, 3) and Image.open(out).size == (2 + 8 * 18, 2 + 18)


def test_gan_full_disk_while_training_is_one_line_and_keeps_no_tmp(tmp_path):
    """A run whose checkpoint does not fit on a real 1 MB filesystem: one line, no .tmp left."""
    with small_tmpfs(tmp_path / "disk") as disk:
        msg = gan_one_line_error("no space left on device writing", "ckpt.pt; the previous file is kept",
                                 call=lambda: gan.main(GAN_SMALL + ["--ngf", "64", "--epochs", "1",
                                                                    "--outf", f"{disk}/run"]))
        assert not [f for f in os.listdir(f"{disk}/run") if f.endswith(".tmp") or f == ".lock"], msg


def test_gan_every_numeric_flag_is_checked_against_its_interval_before_allocating():
    """Walk the table: a value just outside each end of each interval, and NaN and inf for float flags."""
    assert {"lr", "beta1", "margin", "nz", "ngf", "ndf", "limit", "n", "label", "image_size"} <= set(gan.NUMBERS)
    for name, (kind, _, interval, _) in gan.NUMBERS.items():
        flag = "--" + name.replace("_", "-")
        lo, hi = (float(s) for s in interval[1:-1].split(","))
        bad = [lo if interval[0] == "(" else lo - (1 if kind is int else 1e-3)]
        if math.isfinite(hi):
            bad.append(hi if interval[-1] == ")" else hi + (1 if kind is int else 1e-3))
        bad += ["nan", "inf", "-inf"] if kind is float else []
        for v in bad:
            v = str(int(v)) if kind is int else str(v)
            gan_one_line_error(f"{flag} {v if kind is int else float(v)} is out of range; it must lie in "
                               f"{interval}", call=lambda: gan.get_args(["--dataset", "shapes", f"{flag}={v}"]))
    gan_one_line_error("--limit 0 is out of range", call=lambda: gan.get_args(["--dataset", "shapes",
                                                                               "--limit", "0"]))
    gan_one_line_error("--image-size 1000 is too large for shapes; at most 128",
                       call=lambda: gan.get_args(["--dataset", "shapes", "--image-size", "1000"]))


def test_gan_sampling_checks_room_before_drawing_and_draws_in_chunks(tmp_path, monkeypatch):
    outf = str(tmp_path / "r")
    gan.main(GAN_SMALL + ["--epochs", "1", "--outf", outf])
    gan_one_line_error("--n 100000000 needs about", "GB", "more than is free; lower --n",
                       call=lambda: gan.main(["--sample", "--ckpt", f"{outf}/ckpt.pt", "--n", "100000000"]))
    seen = []
    real = gan.generate
    monkeypatch.setattr(gan, "generate", lambda G, z, *a, **k: (seen.append(len(z)), real(G, z, *a, **k))[1])
    gan.main(["--sample", "--ckpt", f"{outf}/ckpt.pt", "--n", "1200", "--npz", str(tmp_path / "s.npz")])
    assert seen == [500, 500, 200] and np.load(tmp_path / "s.npz")["images"].shape == (1200, 16, 16, 3)


def test_gan_checkpoint_checks_other_scripts_files_and_a_changed_number_of_ranks(tmp_path, capsys):
    outf = str(tmp_path / "r")
    gan.main(GAN_SMALL + ["--epochs", "1", "--outf", outf])
    path = os.path.join(outf, "ckpt.pt")
    ck = torch.load(path, weights_only=True)
    torch.save({k: v for k, v in ck.items() if k not in ("optG", "optD")}, path)  # e.g. G and D only
    gan_one_line_error(f"{path} is not a gan.py training checkpoint (it lacks optG, optD); use DIR/ckpt.pt",
                       call=lambda: gan.main(["--resume", "--outf", outf, "--epochs", "2"]))
    torch.save({"script": "lapgan", "args": {}}, path)
    gan_one_line_error(f"{path} was written by lapgan.py, not gan.py",
                       call=lambda: gan.main(["--resume", "--outf", outf, "--epochs", "2"]))
    torch.save({**ck, "world": 2}, path)
    capsys.readouterr()
    gan.main(["--resume", "--outf", outf, "--epochs", "2"])
    assert "note: trained on 2 processes, resumed on 1: each one's share of the data changes" in \
        capsys.readouterr().out


def test_gan_dataset_files_are_checked_after_each_reader(tmp_path, monkeypatch):
    """Wrong rank, fewer labels than images, labels outside the classes: one line naming the file."""
    rng = np.random.default_rng(0)
    cases = [(rng.integers(0, 256, (6, 28 * 28)), rng.integers(0, 10, 6), "not N x H x W images"),
             (rng.integers(0, 256, (6, 28, 28)), rng.integers(0, 10, 5), "holds 6 images but 5 labels"),
             (rng.integers(0, 256, (6, 28, 28)), np.array([0, 1, 2, 3, 4, 12]), "labels 0..12, outside the 10")]
    for x, y, words in cases:
        write_idx(tmp_path / "train-images-idx3-ubyte.gz", x)
        write_idx(tmp_path / "train-labels-idx1-ubyte.gz", y)
        monkeypatch.setattr(gan, "IDX_MD5", {"mnist": [gan.md5_of((tmp_path / f).read_bytes()) for f in
                                                       ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")] * 2})
        gan_one_line_error(words, "train-images-idx3-ubyte.gz", call=lambda: gan.load_mnist(str(tmp_path), "mnist",
                                                                                            "train"))
    cifar = tmp_path / "c"
    cifar.mkdir()
    batches = write_cifar_tarball(cifar, protocol=4)
    with tarfile.open(cifar / "cifar-10-python.tar.gz") as t:
        t.extractall(cifar, filter="data")
    x, y = batches["data_batch_2"]
    with open(cifar / "cifar-10-batches-py" / "data_batch_2", "wb") as f:
        pickle.dump({b"data": x, b"labels": y[:-1] + [10]}, f, protocol=4)
    gan_trust_cifar(monkeypatch, cifar)
    gan_one_line_error("cifar-10-batches-py holds labels", "outside the 10 classes 0..9",
                       call=lambda: gan.read_cifar10(str(cifar), "train"))


def test_gan_image_modes_exif_and_float_tiffs_decode_to_their_pixels(tmp_path):
    """One decode_image: EXIF orientation applied; every Pillow mode mapped to 8 bits by its range."""
    arr = np.arange(8 * 12 * 3, dtype=np.uint8).reshape(8, 12, 3) * 2  # 8 rows, 12 columns, distinct
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    Image.fromarray(arr).save(tmp_path / "turned.png", exif=exif)
    out = gan.decode_image(str(tmp_path / "turned.png"), 8, None)
    assert np.array_equal(out, np.rot90(arr, -1)[2:10])  # 12 x 8 once turned; the centre 8 rows
    Image.fromarray(arr).save(tmp_path / "turned.jpg", exif=exif, quality=100)
    assert gan.decode_image(str(tmp_path / "turned.jpg"), 8, None).shape == (8, 8, 3)
    grey = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    for values, want in ((grey, grey * 255), (grey * 1000 - 200, grey * 255)):  # in [0, 1]; beyond: min..max
        Image.fromarray(values, "F").save(tmp_path / "f.tif")
        assert Image.open(tmp_path / "f.tif").mode == "F"
        assert np.abs(gan.decode_image(str(tmp_path / "f.tif"), 8, None) - want).max() <= 0.5 + 1e-6
    rgb = Image.fromarray(arr[:, :8])
    wide = {"I;16": Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257),  # 16 bits, full range
            "I": Image.fromarray(np.asarray(rgb.convert("L")).astype(np.int32) * 257),
            "F": Image.fromarray(np.asarray(rgb.convert("L")).astype(np.float32) / 255)}
    for mode in ("1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr", "I;16", "I", "F", "HSV", "RGBX", "PA"):
        im = wide[mode] if mode in wide else rgb.convert(mode)
        assert im.mode == mode
        name = tmp_path / f"m_{mode.replace(';', '')}.{'tif' if mode in ('I;16', 'I', 'F', 'CMYK', 'YCbCr') else 'png'}"
        try:
            im.save(name)
        except (OSError, KeyError, ValueError):
            continue  # Pillow cannot write this mode to a file; nothing to read then
        out = gan.decode_image(str(name), 8, None)
        assert out.dtype == np.uint8 and out.max() > 100, (mode, out.max())  # not truncated to black
    Image.new("LAB", (8, 8)).save(tmp_path / "lab.tif")
    gan_one_line_error("lab.tif has the Pillow mode LAB", "save it as 8-bit RGB or grey",
                       call=lambda: gan.decode_image(str(tmp_path / "lab.tif"), 8, None))


def test_gan_folder_walk_hidden_symlinks_nested_cache_key_and_outf(tmp_path, capsys):
    root = tmp_path / "data"
    make_image_folder(root, n=2)
    os.makedirs(root / "cats" / "kittens" / "tiny")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "cats" / "kittens" / "tiny" / "k.png")
    os.makedirs(root / ".thumbs")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / ".thumbs" / "t.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "dogs" / ".hidden.png")
    os.symlink(root, root / "loop")  # a folder linking to its parent: a loop
    os.symlink(root / "gone.png", root / "dogs" / "dangling.png")
    os.makedirs(root / "run" / "pics")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "run" / "pics" / "samples_e001.png")
    x, y, classes = gan.load_folder(str(root), 8, None, 1, outf=str(root / "run"))
    out = capsys.readouterr().out
    assert classes == ["cats", "dogs"] and len(x) == 5 and y.tolist() == [0, 0, 0, 1, 1]
    assert "classes (its top-level folders): cats, dogs" in out and f"skipping {root / 'loop'}" in out
    assert f"skipping {root / 'dogs' / 'dangling.png'} (a link to nothing)" in out
    assert f"skipping {root / 'run'}" in out
    # a file replaced with its modification time kept, but a different size, is decoded again
    f = root / "dogs" / "0.jpg"
    st = f.stat()
    Image.fromarray(np.full((40, 50, 3), 255, np.uint8)).save(f, format="JPEG", quality=50)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size != st.st_size
    x2, _, _ = gan.load_folder(str(root), 8, None, 1, outf=str(root / "run"))
    assert x2[3].min() > 240 and not torch.equal(x, x2)


# ---- gan.py: the method at its boundaries (conditional labels, schedule switches, pixel layout)
def test_gan_conditional_d_judges_fakes_under_the_labels_g_drew_them_for():
    """Mirza & Osindero 2014, Sec. 3 (Eq. 2): D(x|y) and G(z|y) share y, so D judges each fake with the class G
    drew it for, and reals with their own labels. Here every real label differs from its fake's: judging
    fakes under the real batch's labels (or reals under G's) gives other gradients."""
    run = gan_tiny_run("--conditional")
    G0, D0 = copy.deepcopy(run.G), copy.deepcopy(run.D)
    run.opt_G, run.opt_D = (torch.optim.SGD(net.parameters(), lr=0.0) for net in (run.G, run.D))
    x, _ = gan.get_batch(run, torch.arange(16))
    torch.manual_seed(3)
    z = torch.randn(16, run.args.nz)
    y_fake = torch.randint(run.ncls, (16,))  # as train_step draws them, after z
    y_real = (y_fake + 1) % run.ncls
    torch.manual_seed(3)
    gan.train_step(run, x, y_real, 0.0)
    fake = G0(z, y_fake)
    loss_d = -(F.logsigmoid(D0(x, y_real)).mean() + F.logsigmoid(-D0(fake.detach(), y_fake)).mean())
    for p, w in zip(run.D.parameters(), torch.autograd.grad(loss_d, list(D0.parameters()))):
        assert torch.allclose(p.grad, w, atol=1e-6, rtol=1e-4)
    loss_g = -F.logsigmoid(D0(fake, y_fake)).mean()
    for p, w in zip(run.G.parameters(), torch.autograd.grad(loss_g, list(G0.parameters()))):
        assert torch.allclose(p.grad, w, atol=1e-6, rtol=1e-4)


def gan_recorded_steps(tmp_path, monkeypatch, *flags):
    """(d_only, swap_frac) of every train_step a real run makes: 8 steps per epoch (128 images, 16 a batch)."""
    calls, real = [], gan.train_step

    def record(run, x, y, swap_frac=0.0, d_only=False):
        calls.append((d_only, swap_frac))
        return real(run, x, y, swap_frac, d_only)
    monkeypatch.setattr(gan, "train_step", record)
    gan.main(GAN_SMALL + ["--outf", str(tmp_path / "-".join(flags)), *flags])
    return calls


@pytest.mark.parametrize("k,expected", [(0, 0), (1, 1), (7, 7), (8, 8), (9, 8)])
def test_gan_d_pretrain_steps_d_alone_for_exactly_k_steps_then_the_game(tmp_path, monkeypatch, k, expected):
    """The faces post (and skaae/torch-gan's pre-training loop): --d-pretrain K steps of D alone before the
    game, within one pass of the data (8 batches here), then every step plays both; once per run."""
    calls = gan_recorded_steps(tmp_path, monkeypatch, "--epochs", "1", "--d-pretrain", str(k))
    assert [d for d, _ in calls] == [True] * expected + [False] * 8


def test_gan_a_d_only_step_leaves_g_as_it_was():
    run = gan_tiny_run()
    G0, D0 = [p.detach().clone() for p in run.G.parameters()], [p.detach().clone() for p in run.D.parameters()]
    gan.train_step(run, *gan.get_batch(run, torch.arange(16)), d_only=True)
    assert all(torch.equal(a, b) for a, b in zip(G0, run.G.parameters()))
    assert all(not torch.equal(a, b) for a, b in zip(D0, run.D.parameters()))


@pytest.mark.parametrize("e", [0, 1, 2])
def test_gan_swap_epochs_swaps_reals_in_exactly_the_first_e_epochs(tmp_path, monkeypatch, e):
    """The faces post's swap of reals for fakes, early on only: --swap-epochs E swaps in epochs 1..E (counted
    from 1, as train_lfw.lua counts epochs) and never after; checked on either side of the boundary."""
    calls = gan_recorded_steps(tmp_path, monkeypatch, "--epochs", "3", "--swap-epochs", str(e),
                               "--swap-real", "0.25")
    assert [s for _, s in calls] == [0.25] * 8 * e + [0.0] * 8 * (3 - e)
    args = gan.get_args(["--dataset", "shapes", "--swap-epochs", str(e), "--swap-real", "0.5"])
    assert [gan.swap_fraction(args, epoch) for epoch in range(1, e + 3)] == [0.5] * e + [0.0] * 2


def test_gan_faces_lr_at_its_step_and_epoch_boundaries():
    """lfw_adverserial.lua: lr/50 while fewer than 10 updates, lr/5 while fewer than 30; train_lfw.lua: times
    0.99 per finished epoch (none in the first), never below 1e-6. Each switch on either side."""
    lr = 1e-3
    assert [gan.faces_lr(lr, s, 1) for s in (9, 10, 11, 29, 30, 31)] == [lr / 50] + [lr / 5] * 3 + [lr] * 2
    assert gan.faces_lr(lr, 30, 1) == lr and gan.faces_lr(lr, 30, 2) == pytest.approx(lr * 0.99)
    floor = 1 + math.ceil(math.log(1e-6 / lr) / math.log(0.99))  # the first epoch that would fall below 1e-6
    assert gan.faces_lr(lr, 30, floor - 1) > 1e-6 and gan.faces_lr(lr, 30, floor) == 1e-6
    assert gan.faces_lr(lr, 0, floor) == 1e-6 / 50  # the warm-up divides the decayed rate
    run = gan_tiny_run("--arch", "upsample", "--lr", "1e-3")
    run.epoch, run.step = 1, 40  # in epoch 2: one decay
    gan.train_step(run, *gan.get_batch(run, torch.arange(16)), 0.0)
    assert all(g["lr"] == pytest.approx(lr * 0.99) for o in (run.opt_G, run.opt_D) for g in o.param_groups)


@pytest.mark.parametrize("err_real,err_fake,expected", [
    (0.25, 0.5, (True, True)), (0.25 - 1e-9, 0.5, (False, True)), (0.5, 0.25, (True, True)),
    (0.5, 0.25 - 1e-9, (False, True)), (0.75, 0.5, (True, True)), (0.75 + 1e-9, 0.5, (True, False)),
    (0.5, 0.75, (True, True)), (0.5, 0.75 + 1e-9, (True, False)),
])
def test_gan_margin_rule_at_its_thresholds(err_real, err_fake, expected):
    """The faces post's rule (train_lfw.lua): D rests when an error is below the margin, G when one is above
    1 - margin; exactly at a threshold both still learn (strict inequalities)."""
    assert gan.margin_rule(err_real, err_fake, 0.25) == expected


def test_gan_l2_rule_at_its_thresholds():
    """The faces post's adaptive L2 (skaae/torch-gan): up by 1e-5 when G's error is above 1.3, down when below
    0.9, unchanged at and between them, never below 0."""
    c = 3e-5
    assert gan.l2_rule(c, 1.3) == c and gan.l2_rule(c, 1.3 + 1e-9) == pytest.approx(c + 1e-5)
    assert gan.l2_rule(c, 0.9) == c and gan.l2_rule(c, 0.9 - 1e-9) == pytest.approx(c - 1e-5)
    assert gan.l2_rule(c, 1.0) == c and gan.l2_rule(4e-6, 0.5) == 0.0


def test_gan_folder_reader_keeps_rows_columns_and_channels_in_place(tmp_path):
    """DCGAN's LSUN/CelebA preprocessing: shorter side to the size, then a centre crop, images as C x H x W.
    Every pixel of these images differs, so a transposed, mirrored or channel-swapped layout cannot pass."""
    r, c, ch = np.meshgrid(np.arange(8), np.arange(12), np.arange(3), indexing="ij")
    wide = (r * 30 + c * 2 + ch * 71 % 256).astype(np.uint8)  # 8 rows, 12 columns, 3 channels
    tall = np.ascontiguousarray(wide.transpose(1, 0, 2)[:, ::-1, ::-1])  # 12 rows, 8 columns, BGR
    os.makedirs(tmp_path / "a")
    os.makedirs(tmp_path / "b")
    Image.fromarray(wide).save(tmp_path / "a" / "wide.png")
    Image.fromarray(tall).save(tmp_path / "b" / "tall.png")
    for _ in range(2):  # decoded, then from the cache
        x, y, classes = gan.load_folder(str(tmp_path), 8, None, 1)
        assert x.shape == (2, 3, 8, 8) and y.tolist() == [0, 1] and classes == ["a", "b"]
        assert np.array_equal(x[0].numpy(), wide[:, 2:10].transpose(2, 0, 1))  # the centre 8 of 12 columns
        assert np.array_equal(x[1].numpy(), tall[2:10].transpose(2, 0, 1))  # the centre 8 of 12 rows


# ---- reliability: vaegan.py (interrupts, output folders, image folders, dataset files, numbers, checkpoints)
VAE_SMALL = ["--dataset", "shapes", "--image-size", "16", "--width", "8", "--nz", "6", "--batch-size", "8",
             "--log-every", "1"]


def vae_popen(*args, driver=None):
    """vaegan.py in a real subprocess with one thread (or a driver script that imports it)."""
    cmd = [sys.executable, "-c", driver, *args] if driver else [sys.executable, os.path.join(HERE, "vaegan.py"), *args]
    return subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": HERE},
                            preexec_fn=default_sigint)


def wait_until(predicate, proc, timeout=120):
    import time
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.005)


def vae_weights(outf):
    ck = torch.load(os.path.join(outf, "ckpt.pt"), weights_only=True)
    return ck, {k: ck[k] for k in ("E", "Dec", "D")}


def same_weights(a, b):
    return all(torch.equal(a[n][k], b[n][k]) for n in a for k in a[n])


def test_vaegan_ctrl_c_is_one_line_and_resume_continues_exactly(tmp_path):
    """A real SIGINT to a real training process: one line, status 130, the command that continues; then
    --resume ends where an uninterrupted run ends, weights and log rows alike."""
    import signal
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run = VAE_SMALL + ["--limit", "32", "--epochs", "4"]
    vaegan.main(run + ["--outf", full])  # one thread here and there: the same arithmetic
    p = vae_popen(*run, "--outf", part)
    wait_until(lambda: os.path.exists(os.path.join(part, "ckpt.pt")), p)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130 and len(err.strip().splitlines()) == 1, err
    assert "stopped by Ctrl-C at step" in err and f"continue with: python3 vaegan.py --resume --outf {part}" in err
    assert not [f for f in os.listdir(part) if f.endswith(".tmp") or f == ".lock"]
    vaegan.main(["--resume", "--outf", part, "--log-every", "1"])  # --log-every is a machine flag
    (a, wa), (b, wb) = vae_weights(full), vae_weights(part)
    assert a["step"] == b["step"] == 16 and same_weights(wa, wb)
    assert read_log(os.path.join(full, "log.csv")) == read_log(os.path.join(part, "log.csv"))


def test_vaegan_ctrl_c_before_the_first_checkpoint_says_start_again(tmp_path):
    import signal
    outf = str(tmp_path / "run")
    argv = VAE_SMALL + ["--limit", "1000", "--epochs", "1", "--outf", outf]
    p = vae_popen(*argv)
    wait_until(lambda: os.path.exists(os.path.join(outf, "log.csv")), p)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and len(err.strip().splitlines()) == 1, err
    assert "no checkpoint was written yet; start again with: python3 vaegan.py --dataset shapes" in err
    assert not os.path.exists(os.path.join(outf, "ckpt.pt"))
    assert not os.path.exists(os.path.join(outf, "log.csv"))  # the run's own rows: nothing to resume
    vaegan_error(lambda: vaegan.main(["--resume", "--outf", outf]), "nothing to resume; run without --resume")
    run = vaegan.main(VAE_SMALL + ["--limit", "16", "--epochs", "1", "--outf", outf])  # the same folder
    assert run.step == 2 and [r["step"] for r in read_log(os.path.join(outf, "log.csv"))] == ["1", "2"]


def killed_before_checkpoint(start, outf):
    """A real run into outf, SIGKILLed once its log.csv has rows and before any checkpoint."""
    proc = start()
    kill_when(os.path.join(outf, "log.csv"), proc, min_size=40)
    assert not os.path.exists(os.path.join(outf, "ckpt.pt"))
    return open(os.path.join(outf, "log.csv"), "rb").read()


def test_a_fresh_run_refuses_a_folder_whose_killed_run_left_only_its_log(tmp_path):
    """CONVENTIONS: a fresh run refuses an --outf holding ckpt.pt or log.csv. A run killed before its first
    checkpoint leaves a log.csv: each script refuses in one line naming it, changes nothing there, and runs
    once it is deleted."""
    gan_out, lap_out, vae_out = (str(tmp_path / name) for name in ("gan", "lap", "vae"))
    gan_argv = GAN_SMALL + ["--limit", "640", "--epochs", "1", "--outf", gan_out]
    lap_argv = LAPGAN_TINY + ["--limit", "160", "--select", "0", "--epochs", "1", "--outf", lap_out]
    vae_argv = VAE_SMALL + ["--limit", "1000", "--epochs", "1", "--outf", vae_out]
    cases = [(gan_out, lambda: gan_start(*gan_argv), lambda: gan.main(gan_argv)),
             (lap_out, lambda: lap_start(*lap_argv), lambda: lapgan.main(lap_argv)),
             (vae_out, lambda: vae_popen(*vae_argv), lambda: vaegan.main(vae_argv))]
    for outf, start, again in cases:
        log = os.path.join(outf, "log.csv")
        before = killed_before_checkpoint(start, outf)
        with pytest.raises(SystemExit) as e:
            again()
        msg = e.value.code
        assert isinstance(msg, str) and msg.startswith("error: ") and "\n" not in msg, msg
        assert f"{outf} already holds a run's log.csv" in msg and "choose another --outf" in msg, msg
        assert open(log, "rb").read() == before and not os.path.exists(os.path.join(outf, ".lock"))
        os.remove(log)
        with contextlib.redirect_stdout(io.StringIO()):
            again()
        assert os.path.exists(os.path.join(outf, "ckpt.pt"))


def test_a_lock_that_points_nowhere_or_names_an_impossible_process_is_taken_over(tmp_path):
    """A .lock that is a dangling link (its file gone, as when its run ends between the check and the read)
    or holds a process id no system can have is stale: each script takes the lock instead of a traceback."""
    for script in (gan, lapgan, vaegan):
        for kind in ("dangling", "huge"):
            outf = tmp_path / f"{script.__name__}-{kind}"
            outf.mkdir()
            lock = outf / ".lock"
            if kind == "dangling":
                os.symlink(tmp_path / "nowhere", lock)
            else:
                lock.write_text("9" * 30)
            path = script.lock_run(str(outf))
            assert path == str(lock) and not os.path.islink(path), (script.__name__, kind)
            assert open(path).read() == str(os.getpid()), (script.__name__, kind)


def test_resume_over_an_emptied_log_starts_it_again_with_its_header(tmp_path):
    """A run whose log.csv was left empty (0 bytes) resumes: the log gets its header back and the resumed
    rows, no traceback."""
    cases = [(gan, GAN_SMALL + ["--limit", "32"]),
             (lapgan, LAPGAN_TINY + ["--select", "0"]),
             (vaegan, VAE_SMALL + ["--limit", "16"])]
    for script, argv in cases:
        outf = str(tmp_path / script.__name__)
        log = os.path.join(outf, "log.csv")
        with contextlib.redirect_stdout(io.StringIO()):
            script.main(argv + ["--epochs", "1", "--outf", outf])
            open(log, "w").close()
            script.main(["--resume", "--outf", outf, "--epochs", "2"])
        rows = read_log(log)
        assert rows and "step" in rows[0] and all(r["epoch"] == "2" for r in rows), script.__name__


KILL_DRIVER = """
import os, sys, time, vaegan
real = vaegan.write_atomic
def paused(path, write):  # the write under way, not yet renamed: where a SIGKILL is to land
    def slow(f):
        write(f)
        if path.endswith(sys.argv[1]):
            f.flush()
            print("WRITING", flush=True)
            time.sleep(120)
    return real(path, slow)
vaegan.write_atomic = paused
vaegan.main(sys.argv[2:])
"""


def kill_while_writing(name, *argv, driver=None):
    """A real process killed (SIGKILL) while it writes the file ending in `name`."""
    p = vae_popen(name, *argv, driver=driver or KILL_DRIVER)
    lines = iter(p.stdout.readline, "")
    assert any(line.strip() == "WRITING" for line in lines), p.communicate()
    p.kill()
    p.communicate(timeout=60)


def test_vaegan_sigkill_during_checkpoint_and_log_trim_loses_nothing(tmp_path):
    """SIGKILL while a wide model's checkpoint is written, then while --resume trims log.csv: the previous
    files stay whole and load, and the run still ends exactly where an uninterrupted one does."""
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run = VAE_SMALL[:4] + ["--width", "32"] + VAE_SMALL[6:] + ["--limit", "16"]  # ~4 MB checkpoints
    vaegan.main(run + ["--epochs", "2", "--outf", full])
    vaegan.main(run + ["--epochs", "1", "--outf", part])
    before = open(os.path.join(part, "ckpt.pt"), "rb").read()
    kill_while_writing("ckpt.pt", "--resume", "--outf", part, "--epochs", "2", "--log-every", "1")
    assert open(os.path.join(part, "ckpt.pt"), "rb").read() == before  # epoch 1's, whole
    assert vae_weights(part)[0]["epoch"] == 1
    log_before = open(os.path.join(part, "log.csv")).read()
    assert len(read_log(os.path.join(part, "log.csv"))) == 4  # epoch 2's rows, past the checkpoint
    os.remove(os.path.join(part, ".lock"))  # the killed process could not release it; its pid is gone anyway
    kill_while_writing("log.csv", "--resume", "--outf", part, "--epochs", "2")
    assert open(os.path.join(part, "log.csv")).read() == log_before  # the trim never deletes first
    vaegan.main(["--resume", "--outf", part, "--epochs", "2", "--log-every", "1"])
    assert same_weights(vae_weights(full)[1], vae_weights(part)[1])
    assert read_log(os.path.join(full, "log.csv")) == read_log(os.path.join(part, "log.csv"))


def test_vaegan_sigkill_during_the_cache_write_keeps_the_folder_readable(tmp_path):
    root = tmp_path / "data"
    make_image_folder(root, n=3)
    driver = KILL_DRIVER.replace("vaegan.main(sys.argv[2:])", "vaegan.load_folder(sys.argv[2], 16, None, 1)")
    kill_while_writing(".npz", str(root), driver=driver)
    assert not list(root.glob(".cache-*.npz"))  # no half-written cache under the final name
    x, y, classes = vaegan.load_folder(str(root), 16, None, 1)
    assert x.shape == (6, 3, 16, 16) and classes == ["cats", "dogs"]
    assert torch.equal(torch.from_numpy(np.load(next(root.glob(".cache-*.npz")))["x"]), x)


def test_vaegan_two_processes_race_for_one_outf(tmp_path):
    outf = str(tmp_path / "run")
    argv = VAE_SMALL + ["--limit", "32", "--epochs", "3", "--outf", outf]
    procs = [vae_popen(*argv), vae_popen(*argv)]
    results = [(p.wait(timeout=300), p.communicate()[1], p.pid) for p in procs]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 1], results
    (_, err, _), = [r for r in results if r[0] == 1]
    (_, _, winner), = [r for r in results if r[0] == 0]
    assert err.strip().splitlines() == [err.strip()] and f"is in use by another run (process {winner})" in err
    assert vae_weights(outf)[0]["epoch"] == 3 and not os.path.exists(os.path.join(outf, ".lock"))
    # a lock left by a process that is gone is taken over
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "stale").mkdir()
    (tmp_path / "stale" / ".lock").write_text(str(dead.pid))
    run = vaegan.main(VAE_SMALL + ["--limit", "16", "--epochs", "1", "--outf", str(tmp_path / "stale")])
    assert run.epoch == 1 and not (tmp_path / "stale" / ".lock").exists()


def test_vaegan_output_folders_that_cannot_be(tmp_path):
    (tmp_path / "file").write_text("x")
    for outf, why in [(tmp_path / "file", "a file is in the way"), (tmp_path / "file" / "sub", "a file is in the way"),
                      (tmp_path / ("n" * 300), "File name too long")]:
        vaegan_error(lambda: vaegan.main(VAE_SMALL + ["--outf", str(outf)]), f"cannot write into the folder", why)
    outf = str(tmp_path / "run")
    vaegan.main(VAE_SMALL + ["--limit", "16", "--epochs", "1", "--outf", outf])
    new = tmp_path / "new" / "deep"  # --npz and --out into folders that do not exist yet: created
    vaegan.main(["--sample", "--ckpt", os.path.join(outf, "ckpt.pt"), "--n", "3", "--npz", str(new / "s.npz"),
                 "--out", str(new / "g.png")])
    assert np.load(new / "s.npz")["images"].shape == (3, 16, 16, 3) and (new / "g.png").exists()
    vaegan_error(lambda: vaegan.main(["--sample", "--ckpt", os.path.join(outf, "ckpt.pt"), "--n", "100000000"]),
                 "--n 100000000 asks for", "lower --n")


def tmpfs(path, size="1m"):
    """A real small filesystem (root only); None with the reason when it cannot be made."""
    if os.geteuid() != 0:
        return "not root: cannot mount a tmpfs"
    os.makedirs(path)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return None if r.returncode == 0 else f"mount failed: {r.stderr.decode().strip()}"


def test_vaegan_a_real_full_disk_keeps_the_last_checkpoint(tmp_path):
    disk = tmp_path / "disk"
    why = tmpfs(disk)
    if why:
        pytest.skip(why)
    try:
        path = str(disk / "ckpt.pt")
        vaegan.write_atomic(path, lambda f: torch.save({"script": "vaegan", "step": 1}, f))
        before = open(path, "rb").read()
        big = {"w": torch.zeros(2 ** 19)}  # 2 MB: more than the disk holds
        vaegan_error(lambda: vaegan.write_atomic(path, lambda f: torch.save(big, f)),
                     f"could not write {path} (no space left on device); any previous ckpt.pt is kept")
        assert open(path, "rb").read() == before and os.listdir(disk) == ["ckpt.pt"]
        outf = str(tmp_path / "run")  # sampling: the output's size is checked against the free disk first
        vaegan.main(VAE_SMALL + ["--limit", "16", "--epochs", "1", "--outf", outf])
        vaegan_error(lambda: vaegan.main(["--sample", "--ckpt", os.path.join(outf, "ckpt.pt"), "--n", "4096",
                                          "--out", str(disk / "s.png")]), "free disk", "lower --n")
        assert os.listdir(disk) == ["ckpt.pt"]
    finally:
        subprocess.run(["umount", str(disk)])


def test_vaegan_every_numeric_flag_refuses_values_outside_its_range():
    """Walks the table: one value past each finite end, inf past an open end, and NaN for every float."""
    tried = 0
    for flag, kind, _, bounds, _ in vaegan.NUMBERS:
        lo, hi = (float(v) for v in bounds[1:-1].split(","))
        bad = [] if kind is int else ["nan", "inf", "-inf"]
        if math.isfinite(lo):
            bad.append(str(kind(lo) if bounds[0] == "(" else kind(lo - 1)))
        if math.isfinite(hi):
            bad.append(str(kind(hi) if bounds[-1] == ")" else kind(hi + 1)))
        for value in bad:
            vaegan_error(lambda: vaegan.get_args(["--dataset", "shapes", f"{flag}={value}"]), f"{flag} ",
                         f"is outside its valid range {bounds}")
            tried += 1
    assert tried >= 30 and {"--gamma", "--nz", "--width", "--limit", "--lr", "--n"} <= {r[0] for r in vaegan.NUMBERS}
    vaegan_error(lambda: vaegan.get_args(["--dataset", "shapes", "--image-size", "512"]), "too large for shapes")


def test_vaegan_folder_reader_pixel_layout_is_rows_columns_channels(tmp_path):
    """An asymmetric image (24 columns, 16 rows, three different channels) comes back N x C x H x W with
    every pixel where it was: no transposed, mirrored or channel-swapped layout passes."""
    r, c = np.meshgrid(np.arange(16), np.arange(24), indexing="ij")
    img = np.stack([r * 15, c * 10, 255 - (r * 7 + c * 3)], -1).astype(np.uint8)  # 16 x 24 x 3
    (tmp_path / "a").mkdir()
    Image.fromarray(img).save(tmp_path / "a" / "img.png")
    x, _, _ = vaegan.load_folder(str(tmp_path), 16, None, 1)  # scale 1, centre crop: columns 4..19
    assert x.shape == (1, 3, 16, 16)
    assert np.array_equal(x[0].numpy(), img[:, 4:20].transpose(2, 0, 1))
    assert x[0, 0, 15, 0] == 15 * 15 and x[0, 1, 0, 15] == 19 * 10 and x[0, 2, 0, 0] == 255 - 4 * 3


def test_vaegan_exif_orientation_and_every_pillow_mode(tmp_path):
    # a JPEG stored red above blue, with EXIF orientation 6 (shown turned 90 degrees clockwise): red right
    stored = np.zeros((32, 32, 3), np.uint8)
    stored[:16, :, 0], stored[16:, :, 2] = 255, 255
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "turned.jpg", exif=exif, quality=95)
    im = vaegan.decode_image(str(tmp_path / "turned.jpg"), 32, None).astype(int)
    assert im[:, 20:, 0].mean() > 200 and im[:, :12, 2].mean() > 200 and im[:, :12, 0].mean() < 50
    # a float TIFF (mode F) in [0, 1]: scaled to 0..255, not truncated to black
    ramp = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    Image.fromarray(ramp, "F").save(tmp_path / "float.tif")
    assert Image.open(tmp_path / "float.tif").mode == "F"
    assert np.array_equal(vaegan.decode_image(str(tmp_path / "float.tif"), 16, None), (ramp * 255.0).round())
    big = (np.arange(256, dtype=np.int32).reshape(16, 16) * 200)  # a 32-bit integer image up to 51000
    Image.fromarray(big, "I").save(tmp_path / "int.tif")
    assert np.array_equal(vaegan.decode_image(str(tmp_path / "int.tif"), 16, None), (big / 65535 * 255).round())
    for mode, ext, channels in [("1", "png", 1), ("L", "png", 1), ("LA", "png", 1), ("P", "png", 3),
                                ("RGB", "png", 3), ("RGBA", "png", 3), ("CMYK", "tif", 3)]:
        path = tmp_path / f"{mode}.{ext}"
        Image.new(mode, (16, 16), 1).save(path)
        assert Image.open(path).mode == mode
        im = vaegan.decode_image(str(path), 16, None)
        assert im.dtype == np.uint8 and im.shape == ((16, 16) if channels == 1 else (16, 16, 3)), mode
    assert vaegan.eight_bit(Image.new("YCbCr", (4, 4)), "y.jpg").convert("RGB").mode == "RGB"
    vaegan_error(lambda: vaegan.eight_bit(Image.new("HSV", (4, 4)), "x.tif"), "x.tif has the image mode HSV")


def test_vaegan_folder_walk_links_hidden_nested_cache_and_outf(tmp_path, capsys):
    root = tmp_path / "data"
    for d in ("a/nested", "b", ".thumbs", "b/out"):
        (root / d).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for p in ("a/1.png", "a/nested/2.png", "b/3.png", ".thumbs/4.png", "b/.hidden.png", "b/out/5.png"):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / p)
    os.symlink(root, root / "b" / "loop")  # a folder link back to the top: not followed
    os.symlink(root / "missing.png", root / "a" / "dangling.png")
    x, y, classes = vaegan.load_folder(str(root), 8, None, 1, str(root / "b" / "out"))
    out = capsys.readouterr().out
    assert classes == ["a", "b"] and y.tolist() == [0, 0, 1] and "2 classes: a, b" in out
    assert "skipping" in out and "dangling.png" in out and str(root / "b" / "out") in out
    # replaced with the same modification time but another size: decoded again, not served from the cache
    st = os.stat(root / "b" / "3.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "b" / "3.png")
    os.utime(root / "b" / "3.png", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(root / "b" / "3.png").st_size != st.st_size
    assert (vaegan.load_folder(str(root), 8, None, 1, str(root / "b" / "out"))[0][2] == 0).all()


def test_vaegan_dataset_file_checks(tmp_path, monkeypatch):
    import hashlib
    batches = vaegan_cifar(tmp_path, monkeypatch)
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz") as tar:
        tar.extractall(tmp_path / "ex")
    folder = tmp_path / "ex" / "cifar-10-batches-py"
    os.remove(folder / "data_batch_3")
    vaegan_error(lambda: vaegan.read_cifar10(str(tmp_path / "ex"), "train"), f"{folder} lacks data_batch_3")
    data, labels = batches["test_batch"]
    blob = pickle.dumps({b"data": data, b"labels": [10] + list(labels[1:])}, protocol=4)
    (folder / "test_batch").write_bytes(blob)
    monkeypatch.setattr(vaegan, "CIFAR_MD5", {**vaegan.CIFAR_MD5, "test_batch": hashlib.md5(blob).hexdigest()})
    vaegan_error(lambda: vaegan.read_cifar10(str(tmp_path / "ex"), "test"), "label 10, outside the classes 0..9")
    (tmp_path / "m").mkdir()
    write_mnist(tmp_path / "m")
    write_idx(tmp_path / "m" / "train-images-idx3-ubyte.gz", np.zeros((40, 784)))  # rank 2
    vaegan_error(lambda: vaegan.load_mnist(str(tmp_path / "m"), "mnist", "train"), "train-images-idx3-ubyte.gz",
                 "images of rank 3")
    write_mnist(tmp_path / "m")
    write_idx(tmp_path / "m" / "train-labels-idx1-ubyte.gz", np.zeros(39))  # one label short
    vaegan_error(lambda: vaegan.load_mnist(str(tmp_path / "m"), "mnist", "train"), "40 images but 39 labels")


def test_vaegan_checkpoint_of_another_kind_and_a_changed_number_of_ranks(tmp_path, capsys):
    outf = str(tmp_path / "run")
    vaegan.main(VAE_SMALL + ["--limit", "16", "--epochs", "1", "--outf", outf])
    path = os.path.join(outf, "ckpt.pt")
    ck = torch.load(path, weights_only=True)
    torch.save({k: ck[k] for k in ("script", "args", "image", "E", "Dec")}, tmp_path / "weights.pt")
    vaegan_error(lambda: vaegan.main(["--sample", "--ckpt", str(tmp_path / "weights.pt")]),
                 "is not a vaegan.py training checkpoint (it lacks optE", "use DIR/ckpt.pt")
    torch.save({**ck, "world": 2}, path)
    run = vaegan.main(["--resume", "--outf", outf, "--epochs", "2"])
    assert run.epoch == 2 and "trained on 2 processes, resumed on 1" in capsys.readouterr().out


# ---- web/ browser page
import base64, json  # noqa: E402
CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here: apt-get install chromium")


class Chromium:
    """A real headless Chromium driven over --remote-debugging-pipe: DevTools protocol messages, JSON ended
    by a NUL byte, on its fds 3 and 4; no driver to install. --dump-dom and --screenshot do not wait for a
    busy Web Worker, so the tests poll the page's own signs of progress instead."""

    def __init__(self, url, size=(1000, 800)):
        import fcntl, tempfile
        self.profile = tempfile.mkdtemp()
        a, to_chromium = os.pipe()
        self.inp, b = os.pipe()
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (a, b)]  # bash moves them to fds 3 and 4
        os.close(a)
        os.close(b)
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={self.profile}", f"--window-size={size[0]},{size[1]}",
                 "--remote-debugging-pipe", "about:blank"]
        shell = f'exec "$0" "$@" 3<&{ends[0]} 4>&{ends[1]}'
        self.proc = subprocess.Popen(["bash", "-c", shell, CHROMIUM, *flags], pass_fds=ends,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for fd in ends:  # Chromium holds them now
            os.close(fd)
        self.out, self.buf, self.n, self.events = os.fdopen(to_chromium, "wb"), b"", 0, []
        try:
            self.open(url)
        except BaseException:
            self.close()
            raise

    def open(self, url):
        targets = self.send("Target.getTargets")["targetInfos"]
        page = next(t["targetId"] for t in targets if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", targetId=page, flatten=True)["sessionId"]
        self.send("Page.enable", self.session)
        self.send("Page.navigate", self.session, url=url)
        while "Page.loadEventFired" not in self.events:
            self.events.append(self.read().get("method"))

    def read(self):
        while b"\0" not in self.buf:
            chunk = os.read(self.inp, 1 << 20)
            assert chunk, "Chromium closed the pipe"
            self.buf += chunk
        raw, self.buf = self.buf.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method, session=None, **params):
        self.n += 1
        message = {"id": self.n, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        self.out.write(json.dumps(message).encode() + b"\0")
        self.out.flush()
        while True:
            reply = self.read()
            self.events.append(reply.get("method"))
            if reply.get("id") == self.n:
                assert "error" not in reply, reply
                return reply["result"]

    def eval(self, expr, timeout=60):
        """A JavaScript expression's value in the page, polled every 20 ms until it is truthy."""
        poll = ("new Promise((ok, no) => { const t0 = Date.now(); (function poll() { const v = (%s); "
                "if (v) ok(v); else if (Date.now() - t0 > %d) no('timed out: ' + %s); "
                "else setTimeout(poll, 20); })(); })") % (expr, timeout * 1000, json.dumps(expr))
        r = self.send("Runtime.evaluate", self.session, expression=poll, awaitPromise=True,
                      returnByValue=True)
        assert "exceptionDetails" not in r, r["exceptionDetails"]
        return r["result"].get("value")

    def run(self, statements):
        return self.eval(f"(() => {{ {statements}; return true; }})()")

    def screenshot(self, selector):
        """The element's pixels, as a Pillow image."""
        rect = f"JSON.stringify(document.querySelector('{selector}').getBoundingClientRect())"
        box = json.loads(self.eval(rect))
        clip = {"x": box["x"], "y": box["y"], "width": box["width"], "height": box["height"], "scale": 1}
        png = self.send("Page.captureScreenshot", self.session, clip=clip)["data"]
        return Image.open(io.BytesIO(base64.b64decode(png))).convert("RGB")

    def close(self):
        self.proc.kill()
        self.proc.wait()
        self.out.close()
        os.close(self.inp)
        shutil.rmtree(self.profile, ignore_errors=True)


@contextlib.contextmanager
def chromium(url, **kw):
    browser = Chromium(url, **kw)
    try:
        yield browser
    finally:
        browser.close()


def web_export():
    sys.path.insert(0, os.path.join(HERE, "web"))
    import export
    return export


@pytest.fixture(scope="module")
def web_runs(tmp_path_factory):
    """Tiny trained models: a class-conditional 3-level LAPGAN; a 2-level one from two --level runs; a
    conditional DCGAN and a VAE/GAN (batch norm to fold)."""
    root = tmp_path_factory.mktemp("web")
    lap = ["--dataset", "shapes", "--limit", "32", "--batch-size", "8", "--width-g", "8", "--width-d", "8",
           "--nz", "8", "--select", "0", "--conditional", "--optim", "adam", "--lr", "0.002", "--epochs", "2"]
    small = ["--image-size", "16", "--levels", "8,16", "--nz", "5"]
    with contextlib.redirect_stdout(io.StringIO()):
        lapgan.main(lap + ["--outf", str(root / "lap")])
        for k in (0, 1):
            lapgan.main(lap + small + ["--level", str(k), "--outf", str(root / f"l{k}")])
        gan.main(TINY + ["--conditional", "--epochs", "1", "--outf", str(root / "gan")])
        vaegan.main(["--dataset", "shapes", "--image-size", "16", "--width", "8", "--nz", "8", "--limit",
                     "64", "--batch-size", "16", "--epochs", "1", "--outf", str(root / "vaegan")])
    return root


def page_output(export, paths, out, extra=()):
    """Export with 3 samples of fixed noise, open with ?test=1 -> (page model, every level's numbers)."""
    with contextlib.redirect_stdout(io.StringIO()):
        page = export.main([*map(str, paths), "--out", str(out), "--test-noise", "3", "--seed", "4", *extra])
    with chromium(f"file://{out}?test=1") as browser:
        got = json.loads(browser.eval("document.getElementById('test-output').textContent"))
    return page, got


@needs_chromium
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_web_page_draws_lapgans_chain_as_torch(web_runs, tmp_path, dtype):
    """The page's JavaScript on fixed noise equals lapgan.sample_chain on the same noise, every level, to
    1e-3 in display units: a 3-level model (float32 weights: exactly torch's), and a pyramid joined from
    two --level runs (float16 weights: torch given the same rounded weights)."""
    export = web_export()
    paths = [web_runs / "lap" / "ckpt.pt"]
    if dtype == "float16":
        paths = [web_runs / "l0" / "ckpt.pt", web_runs / "l1" / "ckpt.pt"]
    flags = ["--float32"] if dtype == "float32" else []
    page, got = page_output(export, paths, tmp_path / "p.html", flags)
    chain, ck = export.lapgan_chain([str(p) for p in paths])  # sampling order: G_K first
    Gs, sizes = [G for G, _ in chain[::-1]], [s for _, s in chain[::-1]]  # the paper's: G_0 first
    if dtype == "float16":
        for p in (p for G in Gs for p in G.parameters()):
            p.data = p.data.half().float()
    labels, _ = export.fixed_noise(page, 3, 4)
    gen = torch.Generator().manual_seed(4)  # sample_chain draws from it as export.fixed_noise did
    want = lapgan.sample_chain(Gs, sizes, 3, ck["args"]["nz"], labels, "cpu", gen)[::-1]  # I_K first
    assert len(got) == 3 and all(len(levels) == len(sizes) for levels in got)
    for k, x in enumerate(want):
        js = torch.tensor([levels[k] for levels in got]).view_as(x)
        err = lapgan.to_display(js, ck["mean"], ck["std"]) - lapgan.to_display(x, ck["mean"], ck["std"])
        assert err.abs().max() < 1e-3, (k, err.abs().max())
        assert x.std() > 1e-3  # the images hold something to compare
    assert page.nets[0]["input"] == "flat" and page.nets[1]["input"] == "planes"


@needs_chromium
@pytest.mark.parametrize("script", ["gan", "vaegan"])
def test_web_page_draws_gan_and_vaegan_decoders_as_torch(web_runs, tmp_path, script):
    """DCGAN's G (transposed convs, batch norm folded into them, tanh, the one-hot class) and VAE/GAN's
    decoder (linear and batch norm 1d, output padding) on fixed z ~ N(0, I) equal torch's outputs."""
    export = web_export()
    path = web_runs / script / "ckpt.pt"
    page, got = page_output(export, [path], tmp_path / "p.html", ["--float32"])
    ck = torch.load(path, weights_only=True)
    targs = argparse.Namespace(**ck["args"])
    labels, (z,) = export.fixed_noise(page, 3, 4)
    if script == "gan":
        nc, size = ck["shape"]
        G = gan.build_nets(targs, nc, len(ck["classes"]), size)[0]
        G.load_state_dict(ck["G"])
    else:
        G = vaegan.make_decoder(*ck["image"], targs.nz, targs.width)
        G.load_state_dict(ck["Dec"])
    bns = [m for m in G.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
    assert bns and all((m.running_var - 1).abs().max() > 1e-3 for m in bns)  # trained: folding matters
    with torch.no_grad():
        want = G.eval()(z, labels) if script == "gan" else G.eval()(z)
    js = torch.tensor([levels[0] for levels in got]).view_as(want)
    assert (js - want).abs().max() < 1e-3 and want.std() > 1e-3
    assert (labels is not None) == (script == "gan")


def grid_cells(browser, n):
    """The grid's n canvases as n small uint8 arrays, cut from a screenshot (a 2 px margin dropped)."""
    shot = np.asarray(browser.screenshot("#grid")).astype(int)
    boxes = json.loads(browser.eval("JSON.stringify([...document.querySelectorAll('#grid canvas')].map(c => "
                                    "{ const r = c.getBoundingClientRect(); return [r.x, r.y, r.width]; }))"))
    x0, y0 = boxes[0][:2]
    cells = []
    for x, y, w in boxes:
        top, left = round(y - y0), round(x - x0)
        cells.append(shot[top + 2:top + round(w) - 2, left + 2:left + round(w) - 2])
    assert len(cells) == n
    return np.stack(cells)


@needs_chromium
def test_web_page_fills_grid_with_varied_samples_per_class(web_runs, tmp_path):
    """Screenshots: the grid fills with non-blank samples that differ from one another; the same seed draws
    the same grid again, and another class (?class=K, which the picker shows) draws another grid. The
    picker sets the address; the levels toggle widens every cell; a click redraws from the coarse image."""
    export = web_export()
    out = tmp_path / "page.html"
    with contextlib.redirect_stdout(io.StringIO()):
        export.main([str(web_runs / "lap" / "ckpt.pt"), "--out", str(out)])
    text = out.read_text()
    assert "http:" not in text and "https:" not in text and "src=" not in text  # nothing to fetch
    grids = {}
    for name, query in [("a", "class=0"), ("again", "class=0"), ("b", "class=3")]:
        with chromium(f"file://{out}?seed=7&keep=0&n=12&{query}") as browser:
            assert browser.eval("Number(document.body.dataset.drawn) >= 12")
            assert browser.eval("document.getElementById('class').value") == query[-1]
            grids[name] = grid_cells(browser, 12)
            if name == "b":
                page_controls(browser)
    cells = grids["a"]
    assert cells.std(axis=(1, 2)).min() > 2, "a blank cell"  # each sample holds an image, not one colour
    pairs = [np.abs(cells[i] - cells[j]).mean() for i in range(12) for j in range(i)]
    assert min(pairs) > 0.25 and np.median(pairs) > 1, "samples alike"  # no sample drawn twice
    assert np.array_equal(grids["a"], grids["again"])  # the same seed and class: the same samples
    changed = (grids["a"] != grids["b"]).any(axis=-1)  # another class: other samples from the same noise
    assert changed.mean() > 0.5 and np.abs(grids["a"] - grids["b"]).mean() > 0.3


def page_controls(browser):
    """The picker, the levels toggle and a click on a sample, used as a reader would."""
    browser.run("const s = document.getElementById('class'); s.value = '4'; "
                "s.dispatchEvent(new Event('change'))")
    assert "class=4" in browser.eval("location.search")
    assert browser.eval("cells.every(c => c.levels && c.y === 4)")  # the grid drawn again, of class 4
    browser.run("document.getElementById('levels').click()")
    assert browser.eval("document.querySelector('#grid canvas').width") == 3 * 32  # base, then 2 levels
    browser.run("document.querySelector('#grid canvas').click()")
    assert browser.eval("document.body.dataset.resampled === '8'")
    same_base = "resampled.every(l => l[0].data.every((v, i) => v === cells[0].levels[0].data[i]))"
    assert browser.eval(same_base)  # Sec. 4.2: the clicked sample's base kept ...
    assert browser.eval("new Set(resampled.map(l => l[2].data[0])).size === 8")  # ... its finer levels new


def test_web_export_refuses_what_it_cannot_convert(tmp_path):
    """A --model large LAPGAN (grouped convs, L2 pooling; from the real command line), a file that is no
    checkpoint, and layers outside the page's set (BN without running statistics): one line each."""
    export = web_export()
    run = lap_tiny_run(["--model", "large", "--level", "1"])
    torch.save(lapgan.checkpoint(run, opts=False), str(tmp_path / "large.pt"))
    r = subprocess.run([sys.executable, os.path.join(HERE, "web", "export.py"), str(tmp_path / "large.pt"),
                        "--out", str(tmp_path / "x.html")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "--model large" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "x.html").exists()
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    with pytest.raises(SystemExit, match=r"^error: .*notes.txt is not a checkpoint of gan.py, lapgan.py"):
        export.main([str(tmp_path / "notes.txt"), "--out", str(tmp_path / "x.html")])
    grouped = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    batch_bn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    elu = nn.Sequential(nn.ELU())
    for body, words in [(grouped, "ungrouped"), (batch_bn, "keeps no running statistics"), (elu, "ELU")]:
        with pytest.raises(SystemExit, match=words):
            export.layer_ops(body, "G")


# ----------------------------------------------------------------------------- lapgan.py: the paper's level numbering
def test_lapgan_pyramid_levels_are_the_papers():
    """Denton et al. 2015, Sec. 2.2: I_0 is the full image, I_{k+1} = d(I_k), and L(I) = [h_0, ..., h_{K-1}, I_K]
    with h_k = I_k - u(I_{k+1}). Built by hand on a 4 x 4 image whose rows, columns and channels all differ:
    d(.) 2:1 averages 2 x 2 blocks; u(.) from 2 px to 4 with the corners aligned samples at 0, 1/3, 2/3, 1."""
    a = torch.tensor([[0., 1, 5, 2], [3, 9, 4, 0], [7, 2, 8, 6], [1, 4, 0, 3]])
    x = torch.stack([a, 2 * a.T])[None]  # 1 x 2 x 4 x 4: the second channel transposed and doubled
    I1 = torch.stack([torch.tensor([[13., 11], [14, 17]]) / 4, 2 * torch.tensor([[13., 14], [11, 17]]) / 4])[None]
    I2 = torch.tensor([55 / 16, 2 * 55 / 16]).view(1, 2, 1, 1)  # the mean of all 16 pixels
    U = torch.tensor([[1., 0], [2 / 3, 1 / 3], [1 / 3, 2 / 3], [0, 1]])  # u(.) from 2 px to 4
    h0 = x - U @ I1 @ U.T
    h1 = I1 - I2  # u(.) of a 1 px image is constant
    L = lapgan.laplacian_pyramid(x, [4, 2, 1])
    assert [t.shape[-1] for t in L] == [4, 2, 1]
    for k, want in enumerate([h0, h1, I2]):
        assert torch.allclose(L[k], want, atol=1e-6), k
    assert (h0[0, 0] - h0[0, 1].T).abs().max() > 0.5  # the channels are not each other's transposes
    assert torch.allclose(lapgan.reconstruct(L), x, atol=1e-6)
    assert torch.allclose(lapgan.reconstruct(L[1:]), I1, atol=1e-6)  # L[k:] is the pyramid of I_k
    assert torch.allclose(lapgan.condition(x, [4, 2, 1], 0), U @ I1 @ U.T, atol=1e-6)  # l_0 = u(I_1)
    assert lapgan.condition(x, [4, 2, 1], 2) is None  # the base has no coarser image


def lap_old_layout(ck):
    """ck in the layout written before levels took the paper's numbering: level 0 the base, sizes coarse to
    fine, no marker, and none of the flags added since (--lr-d, --dropout-d)."""
    K = len(ck["sizes"]) - 1
    old = {n: v for n, v in ck.items() if n != "paper_levels"}
    old["sizes"] = ck["sizes"][::-1]
    old["levels"] = {K - k: v for k, v in ck["levels"].items()}
    old["balance"] = {"best": {K - k: d for k, d in ck["balance"]["best"].items()}}
    old["args"] = {n: v for n, v in ck["args"].items() if n not in ("dropout_d", "lr_d")}
    if old["args"].get("level") is not None:
        old["args"]["level"] = K - old["args"]["level"]
    return old


def lap_old_columns(path, K):
    """A csv log with its level columns numbered from the base (err_d0 the base), as such runs wrote it."""
    with open(path) as f:
        rows = list(csv.reader(f))
    renamed = [re.sub(r"(\D)(\d)$", lambda m: m[1] + str(K - int(m[2])), c) for c in rows[0]]
    assert renamed != rows[0]
    return [renamed] + rows[1:]


def test_lapgan_checkpoints_from_before_the_papers_numbering_load_sample_and_resume(lapgan_runs, tmp_path):
    full = lapgan_runs["full"]
    ck = torch.load(os.path.join(full, "ckpt.pt"), weights_only=True)
    torch.save(lap_old_layout(ck), tmp_path / "old.pt")
    # the conversion itself: levels, sizes, best distances and --level flipped, the new flags' old values
    conv = lapgan.load_checkpoint(str(tmp_path / "old.pt"))
    assert conv["sizes"] == [32, 16, 8] and conv["paper_levels"] and conv["args"]["dropout_d"] == 0.5
    assert all(torch.equal(conv["levels"][2]["G"][n], v) for n, v in ck["levels"][2]["G"].items())
    assert conv["balance"]["best"] == ck["balance"]["best"] and conv["args"]["lr_d"] is None
    alone = lap_old_layout({**ck, "args": {**ck["args"], "level": 2}, "levels": {2: ck["levels"][2]}})
    assert list(alone["levels"]) == [0] and alone["args"]["level"] == 0  # the base was the old level 0
    assert lapgan.paper_levels(alone)["args"]["level"] == 2
    # sampling: the same images from the old layout as from today's
    images = {}
    for name, path in (("new", os.path.join(full, "ckpt.pt")), ("old", str(tmp_path / "old.pt"))):
        with contextlib.redirect_stdout(io.StringIO()):
            lapgan.main(["--sample", "--ckpt", path, "--n", "4", "--label", "1", "--npz", str(tmp_path / f"{name}.npz"),
                         "--out", str(tmp_path / f"{name}.png")])
        images[name] = np.load(tmp_path / f"{name}.npz")["images"]
    assert np.array_equal(images["old"], images["new"]) and images["new"].std() > 0
    # resume: an old run folder after epoch 1 (ckpt.pt, best.pt, log.csv and select.csv numbered from the
    # base, and a log row written after the checkpoint) continues exactly as the uninterrupted run
    outf = tmp_path / "run"
    os.makedirs(outf)
    e1 = torch.load(lapgan_runs["e1"], weights_only=True)
    torch.save(lap_old_layout(e1), outf / "ckpt.pt")
    best1 = {k: {"G": v["G"], "D": v["D"]} for k, v in e1["levels"].items()}  # epoch 1: every level improved
    torch.save(lap_old_layout({**e1, "levels": best1}), outf / "best.pt")
    for name, keep in (("log.csv", 2), ("select.csv", 1)):
        rows = lap_old_columns(os.path.join(full, name), 2)
        with open(outf / name, "w", newline="") as f:
            csv.writer(f).writerows(rows[:1 + keep + 1])  # one row past epoch 1, as after a crash
    with contextlib.redirect_stdout(io.StringIO()):
        lapgan.main(LAPGAN_TINY + ["--epochs", "2", "--outf", str(outf), "--resume"])
    for name in ("log.csv", "select.csv"):
        assert (outf / name).read_text() == open(os.path.join(full, name)).read(), name
    assert torch.load(outf / "ckpt.pt", weights_only=True)["paper_levels"]  # written in today's layout
    for name in ("ckpt.pt", "best.pt"):  # best.pt: rewritten only if a level improved in epoch 2
        a, b = (lapgan.load_checkpoint(os.path.join(d, name)) for d in (full, str(outf)))
        assert b["sizes"] == [32, 16, 8] and sorted(b["levels"]) == [0, 1, 2]
        for k in range(3):
            for net in ("G", "D"):
                assert all(torch.equal(a["levels"][k][net][n], b["levels"][k][net][n]) for n in a["levels"][k][net])


# ----------------------------------------------------------------------------- lapgan.py: model selection, evaluation, D's padding
def lap_coded_images(n, size=32, nc=3):
    """n uint8 images, image i holding the value 10 i in every pixel, so an image tells its own index."""
    return (torch.arange(n) * 10).view(n, 1, 1, 1).expand(n, nc, size, size).to(torch.uint8).contiguous()


def lap_indices(x, run):
    """The index of each normalised image made by lap_coded_images."""
    pixels = (x * run.std + run.mean) * 255
    return (pixels.mean((1, 2, 3)) / 10).round().long().tolist()


def test_lapgan_selection_scores_the_last_test_images_and_eval_the_first(tmp_path, monkeypatch):
    """The cifar/ code selects each level on held-out images; the paper (Sec. 4.1) reports the Parzen estimate
    on test images. Both come from the test split here: selection on its last --select images, --eval on its
    first n_val + --eval-images, so that no model is chosen on the images it is scored on."""
    run = lap_tiny_run(["--select", "5", "--outf", str(tmp_path)])
    test = (lap_coded_images(20), torch.arange(20) % 6, [str(i) for i in range(6)])
    monkeypatch.setattr(lapgan, "load_dataset", lambda args, split: test)
    x, y = lapgan.selection_images(run)
    chosen = lap_indices(x, run)
    assert chosen == [15, 16, 17, 18, 19] and y.tolist() == (torch.arange(15, 20) % 6).tolist()
    scored = []

    def parzen(args, Gs, x, y, run, n_val):
        scored.extend(lap_indices(x, run))
        return {0: torch.zeros(len(x) - n_val)}, {0: 1.0}
    monkeypatch.setattr(lapgan, "parzen_levels", parzen)
    monkeypatch.setattr(lapgan, "nearest_sheet", lambda *a: None)
    run.images, run.labels = test[0], test[1]
    with contextlib.redirect_stdout(io.StringIO()):
        lapgan.evaluate(argparse.Namespace(eval_images=5), [], run, str(tmp_path / "s"))
    assert scored == list(range(15))  # sigma on the first 10 (half the split), scores on the next 5
    assert not set(scored) & set(chosen)


def lap_epoch_run(tmp_path, extra=()):
    """A tiny run with a log.csv (for curves.png) and its model-selection images, for end_of_epoch."""
    run = lap_tiny_run(["--select", "4", "--outf", str(tmp_path), *extra])
    with open(tmp_path / "log.csv", "w") as f:
        f.write("step,epoch,err_d\n1,1,0.5\n")
    x, y = lapgan.get_batch(run, torch.arange(4), False)
    return run, (x, y)


def test_lapgan_selection_noise_is_its_own_and_the_same_every_epoch(tmp_path):
    """The cifar/ code scores each epoch's models on the same fixed noise: here a generator of selection's
    own, seeded from --seed every epoch, so that the scores depend on the weights only, whatever training
    drew, and the training RNG is left exactly where it was (exact resume depends on it)."""
    run, val = lap_epoch_run(tmp_path)
    for seed in (1, 2):
        torch.manual_seed(seed)  # training's random state differs before each epoch's selection
        state = torch.get_rng_state()
        run.epoch += 1
        with contextlib.redirect_stdout(io.StringIO()):
            lapgan.end_of_epoch(run, val)
        assert torch.equal(torch.get_rng_state(), state)
    rows = read_log(tmp_path / "select.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {k: v for k, v in rows[0].items() if k != "epoch"} == {k: v for k, v in rows[1].items() if k != "epoch"}


def test_lapgan_best_pt_keeps_every_levels_best_epoch(tmp_path, monkeypatch):
    """The cifar/ code keeps, for each level, the model of that level's own best epoch (lowest distance,
    a tie keeping the earlier): best.pt must hold every level, not only those that improved last."""
    run, val = lap_epoch_run(tmp_path)
    script = {1: {0: 5.0, 1: 5.0, 2: 5.0}, 2: {0: 4.0, 1: 6.0, 2: 5.0}, 3: {0: 4.5, 1: 3.0, 2: 7.0}}
    monkeypatch.setattr(lapgan, "selection_score", lambda G, k, *a, **kw: script[run.epoch][k])
    weights = {}
    for epoch in (1, 2, 3):
        run.epoch = epoch
        with torch.no_grad():
            for lv in run.levels.values():
                next(lv.G.parameters()).add_(1.0)  # each epoch's weights differ
        weights[epoch] = {k: copy.deepcopy(lv.G.state_dict()) for k, lv in run.levels.items()}
        with contextlib.redirect_stdout(io.StringIO()):
            lapgan.end_of_epoch(run, val)
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    assert sorted(best["levels"]) == [0, 1, 2] and run.best == {0: 4.0, 1: 3.0, 2: 5.0}
    for k, epoch in {0: 2, 1: 3, 2: 1}.items():
        want = weights[epoch][k]
        assert all(torch.equal(best["levels"][k]["G"][n], want[n]) for n in want), (k, epoch)


def test_lapgan_residual_and_base_distances_share_pixel_units():
    """Sec. 4.1 sums the levels' log-likelihoods, each a Parzen window over pixels in [0, 1] (Goodfellow et
    al. 2014): a difference delta between normalised images is delta * std in pixels, at the base and at
    every residual level alike. Stub generators give the squared distances in closed form."""
    torch.manual_seed(0)
    std, mean = torch.tensor([0.5, 0.25]).view(1, 2, 1, 1), torch.tensor([0.3, 0.6]).view(1, 2, 1, 1)
    delta = torch.randn(3, 2, 4, 4)
    want = (delta * std).flatten(1).pow(2).sum(1).double()[:, None].expand(3, 4)
    made = torch.randn(1, 2, 4, 4)
    stub = lambda xs, y: made.expand(len(xs[0]), -1, -1, -1)
    pix = lambda t: (t * std + mean).flatten(1).double()
    d2_base = lapgan.base_d2(stub, made + delta, None, 5, 4, pix)
    d2_res = lapgan.residual_d2(stub, torch.randn(3, 2, 4, 4), made + delta, None, std, 4)
    assert torch.allclose(d2_base, want, rtol=1e-5) and torch.allclose(d2_res, want, rtol=1e-5)


def test_lapgan_parzen_conditions_each_level_on_the_upsampled_coarser_image(monkeypatch):
    """Sec. 4.1: log p(I) = log q_K(I_K) + sum_k log q_k(h_k | l_k) with l_k = u(I_{k+1}), the upsampled
    coarser image, never I_k itself; checked against the independent NumPy pyramid, with each level's
    squared distances in pixel units (generators drawing h~_k = 0 give ||h_k * std||^2)."""
    torch.manual_seed(0)
    sizes, std = [16, 8, 4], torch.tensor([0.5, 0.25]).view(1, 2, 1, 1)
    run = lapgan.Run(sizes, 0, torch.zeros(1, 2, 1, 1), std, args=argparse.Namespace(nz=3))
    x, seen, d2s = torch.randn(6, 2, 16, 16), {}, []

    def stub(k):
        def G(xs, y):
            if k < 2:
                seen.setdefault(k, []).append(xs[1][0].clone())  # the condition of each test image
                return torch.zeros_like(xs[1])
            return torch.zeros(len(xs[0]), 2, 4, 4)
        return G
    real = lapgan.val_test_ll
    monkeypatch.setattr(lapgan, "val_test_ll", lambda d2, n_val, dim: (d2s.append(d2), real(d2, n_val, dim))[1])
    lapgan.parzen_levels(argparse.Namespace(eval_samples=5, eval_cond=4), [stub(k) for k in range(3)], x,
                         torch.zeros(6, dtype=torch.long), run, 3)
    xn = x.numpy()
    for k in (0, 1):
        l_k = lap_np_up(lap_np_down(xn, sizes[k + 1]), sizes[k])  # u(I_{k+1})
        got = torch.stack(seen[k]).numpy()
        assert np.abs(got - l_k).max() < 1e-5, k
        assert np.abs(got - lap_np_down(xn, sizes[k])).max() > 0.1  # not I_k itself
        h_k = lap_np_down(xn, sizes[k]) - l_k
        want = ((h_k * std.numpy()) ** 2).reshape(6, -1).sum(1)
        assert np.allclose(d2s[2 - k][:, 0].numpy(), want, rtol=1e-5), k  # the base's d2 came first


@pytest.mark.parametrize("size,kernels,strides,want", [
    (14, [5, 5], [1, 2], ([0, 0], 3)),     # (14 - 4 - 5) // 2 + 1 = 3 px remain: unpadded, as the code
    (13, [5, 5], [1, 2], ([0, 0], 3)),
    (12, [5, 5], [1, 2], ([2, 2], 6)),     # 2 would remain: padded 'same', (12 - 1) // 2 + 1 = 6
    (15, [3, 5, 7], [1, 1, 1], ([0, 0, 0], 3)),   # the large D: 15 - 2 - 4 - 6 = 3
    (14, [3, 5, 7], [1, 1, 1], ([1, 2, 3], 14)),  # 2 would remain
])
def test_lapgan_d_padding_rule_at_its_boundary(size, kernels, strides, want):
    """Eyescream's D_k convolutions are unpadded (at CIFAR-10's 14 px level conv5, conv5 stride 2 leave
    3 x 3 maps); the script pads 'same' only where fewer than 3 px would remain. Hand arithmetic."""
    assert lapgan.pads(size, kernels, strides) == want
    if kernels == [5, 5]:  # the D built at that size ends in a map of that many pixels
        args = vars(lapgan.get_args(["--dataset", "mnist", "--width-g", "4", "--width-d", "2"]))
        D = lapgan.build_level(args, 0, [size, size // 2], 1, 0)[1]
        linear = [m for m in D.modules() if isinstance(m, nn.Linear)][0]
        assert linear.in_features == 2 * want[1] ** 2 and D([torch.randn(2, 1, size, size)]).shape == (2,)


def test_gpu_projection_of_the_paper_schedule_from_progress_lines():
    lines = [(1.0, "level 0: ..."), (5.0, "[e 1/2 it 5/10] D 0.6"), (7.0, "[e 1/2 it 10/10] D 0.6"),
             (9.0, "[e 2/2 it 5/10] D 0.6"), (12.0, "[e 2/2 it 10/10] D 0.6")]
    # two whole epochs: the first (start-up included) + 24 x the second
    assert gpu_tool.projection(gpu_tool.Ran(0, lines, 12)) == (7.0, 5.0, 7.0 + 24 * 5.0, "epoch 2")
    first, steady, total, how = gpu_tool.projection(gpu_tool.Ran(None, lines[:4], 9))  # stopped in epoch 2
    assert (first, steady, total) == (7.0, 10 * (7.0 - 5.0) / 5, 7.0 + 24 * 4.0) and "steps only" in how
    assert gpu_tool.projection(gpu_tool.Ran(None, lines[:1], 2))[:3] == (None, None, None)


# ---- mutation pass: tests the survivors asked for
def load_mutate():
    """bench/mutate.py as a module (bench/ is a folder of tools, not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("mutate", os.path.join(HERE, "bench", "mutate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_mutation_list_fits_the_scripts():
    """Every entry of bench/mutations.txt names a script, a test selection and a fragment that occurs exactly
    once in that script's method part, so the list cannot rot silently when the code changes."""
    mutate = load_mutate()
    muts = mutate.read_list()
    assert len(muts) >= 30 and {m.script for m in muts} == {"gan.py", "lapgan.py", "vaegan.py"}
    for m in muts:
        assert m.tests and m.what and m.old != m.new, m.number
        assert mutate.problem(m) is None, (m.number, mutate.problem(m))
    broken = mutate.Mutation(0, "gan.py", "x", "test_x", "return", "pass")  # 'return' occurs many times
    assert "not once" in mutate.problem(broken)


def test_gan_dcgan_d_leaks_with_slope_0_2():
    """DCGAN Sec. 4: 'In the LeakyReLU, the slope of the leak was set to 0.2 in all models'; Sec. 3: D uses
    LeakyReLU after every conv but the last, G plain ReLU."""
    for size in (28, 32, 64):
        G, D = build("dcgan", size, ngf=4, ndf=4, nz=5)
        leaks = [m for m in D.modules() if isinstance(m, nn.LeakyReLU)]
        convs = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
        assert len(leaks) == len(convs) - 1 and all(m.negative_slope == 0.2 for m in leaks), size
        assert not any(isinstance(m, nn.LeakyReLU) for m in G.modules())


def rmsprop_first_step(make_optimizer, lr):
    """The first RMSProp step from a zero weight with decay 0.9 and epsilon 1e-8 added to the root: the
    squared average is 0.1 g^2, so the weight moves by -lr g / (sqrt(0.1 g^2) + 1e-8)."""
    net = nn.Linear(3, 1, bias=False)
    opt = make_optimizer(net)
    g = torch.tensor([[0.5, -2.0, 1e-3]])
    with torch.no_grad():
        net.weight.zero_()
    net.weight.grad = g.clone()
    opt.step()
    want = -lr * g / (torch.sqrt(0.1 * g ** 2) + 1e-8)
    return torch.allclose(net.weight.detach(), want, rtol=1e-5, atol=0)


def test_gan_optimisers_are_dcgans_adam_and_the_faces_codes_rmsprop():
    """DCGAN Sec. 4: Adam, lr 0.0002, beta1 0.5 ('the suggested value of 0.9 resulted in training
    oscillation'); the faces code (train_lfw.lua): rmsprop, decay 0.9, epsilon 1e-8."""
    args = gan.get_args(["--dataset", "shapes"])
    adam = gan.make_optimizer(nn.Linear(2, 1), args)
    assert adam.param_groups[0]["betas"] == (0.5, 0.999) and adam.param_groups[0]["lr"] == 2e-4
    args = gan.get_args(["--dataset", "shapes", "--arch", "upsample"])
    assert rmsprop_first_step(lambda net: gan.make_optimizer(net, args), 1e-3)


def test_gan_parzen_sigma_is_the_validation_maximum_likelihood():
    """Goodfellow et al. Sec. 5: sigma is chosen by likelihood on a validation set. One sample at 0 and
    validation points at +-0.3: the Gaussian likelihood is largest at sigma = 0.3. Test points 0 and 0.6
    then score -1/2 log(2 pi 0.09) and 2 less; the mean, and the standard error std / sqrt(2) = 1."""
    f64 = dict(dtype=torch.float64)
    samples, val = torch.zeros(1, 1, **f64), torch.tensor([[0.3], [-0.3]], **f64)
    test = torch.tensor([[0.0], [0.6]], **f64)
    sigma, mean, se = gan.parzen_eval(samples, val, test, sigmas=[0.1, 0.3, 1.0])
    top = -0.5 * math.log(2 * math.pi * 0.09)
    assert sigma == 0.3 and mean == pytest.approx(top - 1, rel=1e-9) and se == pytest.approx(1.0, rel=1e-9)


def test_gan_sweep_moves_one_dimension_from_minus_r_to_r():
    """The faces post's sweeps: each latent repeated k times with one dimension swept linearly over
    [-r, r] and the others fixed, one latent's k images in a row."""
    z = torch.randn(3, 5)
    out = gan.sweep(z.clone(), 2, 1.5, 4).view(3, 4, 5)
    assert torch.allclose(out[:, :, 2], torch.tensor([-1.5, -0.5, 0.5, 1.5]).expand(3, 4))
    keep = [0, 1, 3, 4]
    assert torch.equal(out[:, :, keep], z[:, None, keep].expand(3, 4, 4))


def test_gan_walk_passes_each_key_point_once():
    """DCGAN Sec. 6.1's walks: slerp from key j to key j + 1 in per_key steps; frame j * per_key is key j
    itself and no frame repeats the one before (a leg ends one step short of the next leg's start)."""
    keys = torch.randn(4, 16, 6)
    frames = gan.walk(keys, 24, per_key=8)
    assert frames.shape == (24, 16, 6)
    for j in range(3):
        assert torch.allclose(frames[8 * j], keys[j], atol=1e-5)
    steps = (frames[1:] - frames[:-1]).flatten(1).norm(dim=1)
    assert steps.min() > 1e-3


def test_gan_sampler_repeats_each_class_along_a_row():
    """Mirza & Osindero's class-conditional sampling: one class per row of pictures (interpolations,
    sweeps), so the classes drawn are each repeated, not tiled; uniform over every class."""
    s = gan.Sampler(G=None, nz=4, ncls=3, label=None, device=torch.device("cpu"))
    y = s.y(200, repeat=3).view(200, 3)
    assert torch.equal(y, y[:, :1].expand(200, 3)) and set(y.flatten().tolist()) == {0, 1, 2}
    s.label = 2
    assert s.y(5, repeat=2).tolist() == [2] * 10
    assert gan.Sampler(G=None, nz=4, ncls=0, label=None, device=torch.device("cpu")).y(5) is None


def test_lapgan_d_judges_each_image_under_its_own_class():
    """Class-conditional LAPGAN (Sec. 3.1, Eyescream's conditional CIFAR code): D_k(x | y) judges each
    real image with its own class, each fake with the class G_k drew it for, i.e. the class of the image
    whose l_k conditions it. The batch's three roles get three different classes here."""
    run = lap_tiny_run(["--conditional"])
    y = torch.tensor([0] * 4 + [1] * 4 + [2] * 8)  # reals, the fakes D_k sees, the fakes G_k's step uses
    for k in (2, 0):
        lv, seen = run.levels[k], {}

        def record(name, net):
            def call(xs, y=None):
                seen[name] = seen.get(name, []) + y.tolist()  # D_k: the reals' pass, then the fakes'
                return net(xs, y)
            return call
        lv.G_fwd, lv.D_fwd = record("G", lv.G_fwd), record("D", lv.D_fwd)
        lv.D_fwd_for_G = record("D for G", lv.D_fwd_for_G)
        x, _ = lapgan.get_batch(run, torch.arange(16))
        lapgan.level_step(lv, x, y, run.sizes, run.args.nz)
        assert seen == {"G": [1] * 4 + [2] * 8, "D": [0] * 4 + [1] * 4, "D for G": [2] * 8}, k


def test_lapgan_class_plane_is_a_relu_of_a_linear_map_of_the_class():
    """Eyescream's class-conditional levels (as the module docstring gives them): the one-hot class through
    Linear(classes -> s * s), then ReLU, as one input plane after the first; hand-set weights with negative
    entries so the ReLU shows."""
    cond = lapgan.Conditioned(nn.Identity(), 3, 2, False)
    w = torch.tensor([[1.0, -2.0, 0.5], [-1.0, 3.0, 0.0], [0.2, 0.0, -4.0], [-0.5, -0.5, 2.0]])
    b = torch.tensor([0.1, 0.0, -0.3, 0.4])
    with torch.no_grad():
        cond.embed.weight.copy_(w)
        cond.embed.bias.copy_(b)
    y = torch.tensor([0, 1, 2])
    noise, coarse = torch.randn(3, 1, 2, 2), torch.randn(3, 3, 2, 2)
    out = cond([noise, coarse], y)
    want = torch.stack([(w[:, c] + b).clamp(min=0) for c in y.tolist()]).view(3, 1, 2, 2)
    assert torch.equal(out[:, :1], noise) and torch.equal(out[:, 2:], coarse)  # [noise, class, l_k]
    assert torch.allclose(out[:, 1:2], want)


def test_lapgan_parzen_scores_only_the_images_after_the_validation_ones():
    """Goodfellow et al. Sec. 5, as Sec. 4.1 uses it: sigma by likelihood on validation images, then the test
    images scored. One sample, 1-D: validation squared distances 0.09 give sigma = 10^-0.5 (the grid point
    nearest the maximum at 0.3); the one test image (squared distance 0.25) scores in closed form."""
    d2 = torch.tensor([[0.09], [0.09], [0.25]], dtype=torch.float64)
    ll, sigma = lapgan.val_test_ll(d2, 2, 1)
    assert sigma == pytest.approx(10 ** -0.5) and ll.shape == (1,)
    assert ll.item() == pytest.approx(-0.25 / 0.2 - 0.5 * math.log(2 * math.pi * 0.1), rel=1e-6)


def test_lapgan_parzen_dimension_of_each_level_counts_every_channel(monkeypatch):
    """Sec. 4.1: each level's Parzen window is a Gaussian over all of its numbers, C s_k^2 (the normaliser
    is (2 pi sigma^2)^(C s_k^2 / 2)): with 3 channels and sizes 16, 8, 4, the base (4 px) is 48-dimensional,
    then 192 and 768."""
    sizes = [16, 8, 4]
    mean, std = torch.zeros(1, 3, 1, 1), torch.full((1, 3, 1, 1), 0.5)
    run = lapgan.Run(sizes, 0, mean, std, args=argparse.Namespace(nz=3))

    def stub(k):
        def G(xs, y):
            return torch.zeros_like(xs[1]) if k < 2 else torch.zeros(len(xs[0]), 3, 4, 4)
        return G
    dims, real = [], lapgan.val_test_ll
    record = lambda d2, n_val, dim: (dims.append(dim), real(d2, n_val, dim))[1]
    monkeypatch.setattr(lapgan, "val_test_ll", record)
    lapgan.parzen_levels(argparse.Namespace(eval_samples=5, eval_cond=4), [stub(k) for k in range(3)],
                         torch.randn(6, 3, 16, 16), torch.zeros(6, dtype=torch.long), run, 3)
    assert dims == [48, 192, 768]


def test_lapgan_resample_sheet_draws_each_row_from_its_own_coarse_image(monkeypatch):
    """Sec. 4.2 (Fig. 4): per row one real image, its l_k, then n samples drawn from that same l_k and the
    image's class. A G_k drawing zero residuals makes every sample of a row equal to its l_k."""
    run = lap_tiny_run(["--conditional"])
    grids, labels = [], []
    keep = lambda images, path, nrow: grids.append(images.view(8, nrow, -1))
    monkeypatch.setattr(lapgan, "save_grid", keep)

    def G(xs, y):
        labels.append(y)
        return torch.zeros_like(xs[-1])
    lapgan.resample_sheet(G, 0, run, 3, "unused.png")
    rows = grids[0]
    assert torch.allclose(rows[:, 2:], rows[:, 1:2].expand(8, 3, -1), atol=1e-5)
    assert not torch.allclose(rows[0, 1], rows[1, 1], atol=1e-3)  # the rows' l_k differ
    assert labels[0].view(8, 3).tolist() == [[c] * 3 for c in (torch.arange(8) % 6).tolist()]


def test_lapgan_model_selection_scores_every_g_in_eval_mode(tmp_path, monkeypatch):
    """The cifar/ code's selection on fixed noise scores the weights alone: the Gs are put in eval mode
    (the large model of Sec. 3.2 has batch norm and spatial dropout), and back in training mode after."""
    run, val = lap_epoch_run(tmp_path)
    modes = []
    monkeypatch.setattr(lapgan, "selection_score", lambda G, k, *a, **kw: (modes.append(G.training), 1.0)[1])
    run.epoch = 1
    with contextlib.redirect_stdout(io.StringIO()):
        lapgan.end_of_epoch(run, val)
    assert modes == [False] * 3 and all(lv.G.training for lv in run.levels.values())


def test_vaegan_annealed_lr_starts_at_lr0():
    """The code's GammaAnnealer: lr_e = lr0 - (e / E)^0.75 (lr0 - lr_end) with e counted from 0, so the
    first epoch trains at lr0 and epoch 3 of 4 at lr0 - 0.5^0.75 (lr0 - lr_end)."""
    args = argparse.Namespace(lr=1e-3, lr_end=1e-4, lr_power=0.75, epochs=4)
    assert vaegan.annealed_lr(args, 1) == 1e-3
    assert vaegan.annealed_lr(args, 3) == pytest.approx(1e-3 - 0.5 ** 0.75 * 9e-4, rel=1e-12)
    assert vaegan.get_args(VAEGAN_TINY).lr_power == 0.75


def test_vaegan_rmsprop_decay_is_the_codes():
    """The paper's code: RMSProp with decay 0.9 (epsilon 1e-8 added to the root)."""
    args = vaegan.get_args(VAEGAN_TINY)
    assert rmsprop_first_step(lambda net: vaegan.make_optimizer(net, args), args.lr)


def test_vaegan_equilibrium_rule_at_its_thresholds():
    """The paper's code: D rests when a cost is below 0.68 - 0.35, the decoder when one is above 0.68 + 0.35;
    exactly at a threshold both learn, a hair past it the rule acts (on reals and on fakes alike)."""
    low, high = 0.68 - 0.35, 0.68 + 0.35
    for a, b in ((low, 0.68), (0.68, low), (high, 0.68), (0.68, high)):
        assert vaegan.equilibrium_rule(a, b) == (True, True), (a, b)
    assert vaegan.equilibrium_rule(low - 1e-9, 0.68) == (False, True)
    assert vaegan.equilibrium_rule(0.68, high + 1e-9) == (True, False)


def test_vaegan_encode_gives_the_posterior_means_in_order():
    """Sec. 5's attribute vectors average the images' embeddings, the means mu of q(z | x) (the code's
    embedding), never log sigma^2. A stub encoder: mu = the image's mean value, log sigma^2 = -7."""
    E = lambda x: torch.cat([x.mean((1, 2, 3))[:, None].expand(-1, 2), torch.full((len(x), 2), -7.0)], 1)
    images = (torch.arange(5) * 50).view(5, 1, 1, 1).expand(5, 1, 2, 2).to(torch.uint8)
    mu = vaegan.encode(E, images, batch=2)
    want = (torch.arange(5) * 50 / 127.5 - 1)[:, None].expand(5, 2)
    assert torch.allclose(mu, want)


def test_vaegan_sample_decodes_with_the_running_statistics(tmp_path):
    """--sample draws x = Dec(z), z ~ N(0, I), with batch norm's running statistics (Dec in eval mode, as
    the code's test-time decoder): a single sample is the eval-mode decoder of the seed's first z."""
    run = vaegan_run("--outf", str(tmp_path))
    with torch.no_grad():  # running statistics unlike a batch's own
        for m in run.nets["Dec"].modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    ckpt, npz = str(tmp_path / "ckpt.pt"), str(tmp_path / "s.npz")
    torch.save(vaegan.checkpoint(run), ckpt)
    with contextlib.redirect_stdout(io.StringIO()):
        vaegan.main(["--sample", "--ckpt", ckpt, "--n", "2", "--seed", "3", "--npz", npz,
                     "--out", str(tmp_path / "s.png")])
    Dec = run.nets["Dec"].eval()
    torch.manual_seed(3)
    with torch.no_grad():
        want = ((Dec(torch.randn(2, run.args.nz)) + 1) * 127.5).permute(0, 2, 3, 1).numpy()
    assert np.abs(np.load(npz)["images"].astype(float) - want).max() <= 1.0


def test_vaegan_default_gamma_is_the_codes_weight_per_size():
    """The paper's code: gamma (its w) 1e-6 for the 64 px CelebA model, 1e-5 for the 32 px CIFAR one (smaller
    images follow CIFAR); a plain VAE 1 (sigma 1 on pixels); pixels with the GAN 2e-4 (the faces code's 1e-4
    on a summed squared error, our 1/2 ||.||^2)."""
    gammas = [vaegan.default_gamma("disl", False, s) for s in (16, 28, 32, 63, 64, 128)]
    assert gammas == [1e-5] * 4 + [1e-6] * 2
    assert vaegan.default_gamma("pixel", True, 32) == 1.0 and vaegan.default_gamma("pixel", False, 64) == 2e-4


def test_vaegan_gan_terms_sum_over_every_fake_and_average_over_the_batch():
    """Alg. 1 with the code's batching: D's cost is 1/2 of the mean BCE on reals plus 1/2 of that on fakes;
    the decoder's GAN term sums over all its fakes (reconstructions and prior samples, 2B of them) and
    divides by B. Hand-set logits: reals ln 3, 0; fakes 0, ln 3, -ln 3, 0, so softplus gives ln 2, ln 4,
    ln 4/3, ln 2, summing to ln 64/3."""
    fake = torch.tensor([0.0, math.log(3), -math.log(3), 0.0])
    seen = []

    def D(t):
        seen.append(len(t))
        return torch.cat([torch.tensor([math.log(3), 0.0]), fake])
    x = torch.zeros(2, 1, 4, 4)
    for nonsat in (False, True):
        args = argparse.Namespace(fake_recon=True, nonsat=nonsat)
        out = vaegan.gan_losses(D, args, x, x + 1, x - 1)
        # -log(1 - D) sums to ln 64/3 (saturating, minimised as its negative); -log D sums the same here
        want = math.log(64 / 3) / 2 * (1 if nonsat else -1)
        assert out["gan_g"].item() == pytest.approx(want, rel=1e-6)
        want_d = 0.5 * (math.log(8 / 3) / 2 + math.log(64 / 3) / 4)
        assert out["gan_d"].item() == pytest.approx(want_d, rel=1e-6)
    assert seen == [6, 6]


# ---- reliability: lapgan.py (each cause handled once: main, write_atomic, prepare_output, lock_run,
# decode_image, list_images, check_split, NUMBERS, check_room and draw_chunks, load_checkpoint, restore)
LAP_KILL_DRIVER = KILL_DRIVER.replace("vaegan", "lapgan")


def lap_start(*argv):
    """lapgan.py in a real subprocess, one thread (the same arithmetic as this process's runs), with Ctrl-C's
    default action even where this process runs in the background (which ignores SIGINT)."""
    return subprocess.Popen([sys.executable, os.path.join(HERE, "lapgan.py"), *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=HERE, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            preexec_fn=default_sigint)


def lap_same_run(a, b):
    """Two run folders hold the same weights, log rows and model-selection rows."""
    ca, cb = (torch.load(os.path.join(d, "ckpt.pt"), weights_only=True) for d in (a, b))
    assert ca["step"] == cb["step"] and ca["epoch"] == cb["epoch"]
    for k in ca["levels"]:
        for net in ("G", "D"):
            sa, sb = ca["levels"][k][net], cb["levels"][k][net]
            assert all(torch.equal(sa[n], sb[n]) for n in sa), (k, net)
    for name in ("log.csv", "select.csv"):
        assert read_log(os.path.join(a, name)) == read_log(os.path.join(b, name)), name


def lap_epoch_one(lapgan_runs, outf):
    """A run folder as LAPGAN_TINY leaves it after epoch 1 of 2: lapgan_runs' epoch-1 checkpoint and the
    rows of epoch 1."""
    os.makedirs(outf)
    shutil.copy(lapgan_runs["e1"], os.path.join(outf, "ckpt.pt"))
    for name in ("log.csv", "select.csv"):
        rows = [r for r in read_log(os.path.join(lapgan_runs["full"], name)) if r["epoch"] == "1"]
        with open(os.path.join(outf, name), "w", newline="") as f:
            w = csv.DictWriter(f, list(rows[0]))
            w.writeheader()
            w.writerows(rows)


def test_lapgan_sigint_keeps_the_checkpoint_and_resume_continues_exactly(lapgan_runs, tmp_path):
    """A real SIGINT in epoch 2: one line, status 130, ckpt.pt of epoch 1 kept, no .tmp or lock; the command
    it prints ends the run exactly where the uninterrupted one ended."""
    cut = str(tmp_path / "cut")
    proc = lap_start(*LAPGAN_TINY, "--epochs", "2", "--outf", cut)
    line = sigint_line(proc, os.path.join(cut, "ckpt.pt"))
    assert line.startswith("interrupted at step") and f"{cut}/ckpt.pt (epoch 1) is kept" in line, line
    assert line.endswith(f"to continue: python3 lapgan.py --resume --outf {cut} --log-every 2"), line
    assert not [f for f in os.listdir(cut) if f.endswith(".tmp") or f == ".lock"]
    with contextlib.redirect_stdout(io.StringIO()):
        lapgan.main(shlex.split(line.split("to continue: python3 lapgan.py ")[1]))
    lap_same_run(lapgan_runs["full"], cut)


def test_lapgan_sigint_before_any_checkpoint_then_the_same_command_starts_again(tmp_path):
    outf = str(tmp_path / "run")
    argv = LAPGAN_TINY + ["--limit", "160", "--select", "0", "--epochs", "1", "--outf", outf]
    proc = lap_start(*argv)
    err = sigint_line(proc, os.path.join(outf, "log.csv"))
    assert "no checkpoint was written yet; to start again: python3 lapgan.py --dataset shapes" in err
    assert not os.path.exists(os.path.join(outf, "ckpt.pt"))
    assert not os.path.exists(os.path.join(outf, "log.csv"))  # the run's own rows: nothing to resume
    with pytest.raises(SystemExit) as e:
        lapgan.main(["--resume", "--outf", outf])
    lap_one_line_error(e, f"nothing to resume: {outf} holds no checkpoint (ckpt.pt); run without --resume")
    with contextlib.redirect_stdout(io.StringIO()):
        lapgan.main(shlex.split(err.split("to start again: python3 lapgan.py ")[1]))  # as printed
    assert [int(r["step"]) for r in read_log(os.path.join(outf, "log.csv"))] == list(range(2, 41, 2))


def test_lapgan_sigkill_during_checkpoint_and_log_trim_loses_nothing(lapgan_runs, tmp_path):
    """SIGKILL while ckpt.pt (17 MB) is written, then while --resume rewrites log.csv: the previous files
    stay whole and load, the dead run's lock is stale, and the run ends exactly as the uninterrupted one."""
    part = str(tmp_path / "part")
    lap_epoch_one(lapgan_runs, part)
    ckpt = os.path.join(part, "ckpt.pt")
    before = open(ckpt, "rb").read()
    kill_while_writing("ckpt.pt", "--resume", "--outf", part, "--epochs", "2", "--log-every", "2",
                       driver=LAP_KILL_DRIVER)
    assert open(ckpt, "rb").read() == before and lapgan.load_checkpoint(ckpt, training=True)["epoch"] == 1
    log_before = open(os.path.join(part, "log.csv")).read()
    assert [r["epoch"] for r in read_log(os.path.join(part, "log.csv"))] == ["1", "1", "2", "2"]
    kill_while_writing("log.csv", "--resume", "--outf", part, "--epochs", "2", driver=LAP_KILL_DRIVER)
    assert open(os.path.join(part, "log.csv")).read() == log_before  # the trim never deletes first
    with contextlib.redirect_stdout(io.StringIO()):
        lapgan.main(["--resume", "--outf", part, "--epochs", "2", "--log-every", "2"])
    lap_same_run(lapgan_runs["full"], part)
    assert not [f for f in os.listdir(part) if f.endswith(".tmp") or f == ".lock"]


def test_lapgan_sigkill_during_a_cache_write_keeps_the_older_cache(tmp_path):
    root = tmp_path / "data"
    make_image_folder(root, n=2)
    x_old = lapgan.load_folder(str(root), 16, None, 1)[0]
    (old,) = root.glob(".cache-*.npz")
    old_bytes = old.read_bytes()
    Image.fromarray(np.full((20, 20, 3), 7, np.uint8)).save(root / "cats" / "more.png")
    driver = LAP_KILL_DRIVER.replace("lapgan.main(sys.argv[2:])", "lapgan.load_folder(sys.argv[2], 16, None, 1)")
    kill_while_writing(".npz", str(root), driver=driver)
    assert list(root.glob(".cache-*.npz")) == [old] and old.read_bytes() == old_bytes  # no torn new cache
    x, y, _ = lapgan.load_folder(str(root), 16, None, 1)
    assert len(x) == 5 and torch.equal(x[[0, 1, 3, 4]], x_old) and (x[2] == 7).all()


def test_lapgan_two_real_processes_race_for_one_outf(tmp_path):
    outf = str(tmp_path / "run")
    argv = LAPGAN_TINY + ["--select", "0", "--epochs", "1", "--outf", outf]
    procs = [lap_start(*argv) for _ in range(2)]
    results = [(p.pid, p.wait(timeout=300), p.communicate()[1]) for p in procs]
    ok = [r for r in results if r[1] == 0]
    refused = [r for r in results if r[1] != 0]
    assert len(ok) == 1 and len(refused) == 1, results
    assert refused[0][2].strip() == (f"error: {outf} is in use by another run (process {ok[0][0]}); wait for "
                                     "it to end, or choose another --outf")
    assert torch.load(os.path.join(outf, "ckpt.pt"), weights_only=True)["epoch"] == 1
    assert not os.path.exists(os.path.join(outf, ".lock"))


def test_lapgan_output_folders_are_prepared_or_refused_in_one_line(lapgan_runs, tmp_path):
    (tmp_path / "file").write_text("x")
    for outf, why in ((tmp_path / "file" / "run", "a folder on its path is a file"),
                      (tmp_path / "file", "it is a file"), (tmp_path / ("x" * 300), "File name too long")):
        with pytest.raises(SystemExit) as e:
            lapgan.main(LAPGAN_TINY + ["--outf", str(outf)])
        lap_one_line_error(e, f"cannot write into {outf} ({why}); give another folder")
    with small_tmpfs(tmp_path / "ro", options=",ro") as ro:
        with pytest.raises(SystemExit) as e:
            lapgan.main(LAPGAN_TINY + ["--outf", f"{ro}/run"])
        lap_one_line_error(e, f"cannot write into {ro}/run (Read-only file system)")
    npz, out = tmp_path / "new" / "deeper" / "s.npz", tmp_path / "other" / "g.png"
    ckpt = os.path.join(lapgan_runs["full"], "ckpt.pt")
    with contextlib.redirect_stdout(io.StringIO()):
        lapgan.main(["--sample", "--ckpt", ckpt, "--n", "5", "--npz", str(npz), "--out", str(out)])
    assert np.load(npz)["images"].shape == (5, 32, 32, 3) and out.exists()


def test_lapgan_a_real_full_disk_is_one_line_and_keeps_the_previous_file(lapgan_runs, tmp_path):
    with small_tmpfs(tmp_path / "disk") as disk:
        path = os.path.join(disk, "ckpt.pt")
        lapgan.write_atomic(path, lambda f: torch.save({"script": "lapgan", "step": 1}, f))
        before = open(path, "rb").read()
        with pytest.raises(SystemExit) as e:  # torch.save's RuntimeError on a full disk
            lapgan.write_atomic(path, lambda f: torch.save({"w": torch.zeros(2 ** 19)}, f))
        lap_one_line_error(e, f"no space left on device writing {path}; the previous file is kept")
        assert open(path, "rb").read() == before and os.listdir(disk) == ["ckpt.pt"]
        with pytest.raises(SystemExit) as e, contextlib.redirect_stdout(io.StringIO()):  # a run's 17 MB ckpt.pt
            lapgan.main(LAPGAN_TINY + ["--select", "0", "--epochs", "1", "--outf", f"{disk}/run"])
        lap_one_line_error(e, f"no space left on device writing {disk}/run/ckpt.pt")
        assert not [f for f in os.listdir(f"{disk}/run") if f.endswith(".tmp") or f == ".lock"]
        ckpt = os.path.join(lapgan_runs["full"], "ckpt.pt")
        with pytest.raises(SystemExit) as e:  # sampling: its size checked against the free disk first
            lapgan.main(["--sample", "--ckpt", ckpt, "--n", "4096", "--out", f"{disk}/s.png"])
        lap_one_line_error(e, "--n 4096 needs about", f"GB on {disk}, more than is free; lower --n")


def test_lapgan_every_numeric_flag_is_checked_against_its_interval_before_allocating():
    """Walk the table: a value just outside each finite end of each interval, and NaN and inf for floats."""
    assert {"lr", "lr_g", "lr_d", "momentum", "dropout_d", "nz", "width_g", "width_d", "epochs", "batch_size", "select",
            "limit", "n", "resample", "upscale", "switch", "eval_images", "eval_samples", "eval_cond",
            "image_size", "log_every", "workers", "level", "seed", "label"} <= set(lapgan.NUMBERS)
    tried = 0
    for name, (kind, _, interval, _) in lapgan.NUMBERS.items():
        flag = "--" + name.replace("_", "-")
        lo, hi = (float(s) for s in interval[1:-1].split(","))
        bad = ["nan", "inf", "-inf"] if kind is float else []
        for end, open_end, step in ((lo, interval[0] == "(", -1), (hi, interval[-1] == ")", 1)):
            if math.isfinite(end):
                bad.append(str(kind(end if open_end else end + step * (1 if kind is int else 1e-3))))
        for v in bad:
            with pytest.raises(SystemExit) as e:
                lapgan.get_args(["--dataset", "folder", f"{flag}={v}"])
            lap_one_line_error(e, f"{flag} {kind(float(v)) if kind is float else v} is out of range; it must "
                               f"lie in {interval}")
            tried += 1
    assert tried >= 45
    for argv, words in ((["--limit", "0"], "--limit 0 is out of range"),
                        (["--batch-size", "7"], "--batch-size 7 must be even"),
                        (["--image-size", "1000"], "--image-size 1000 is too large for shapes; at most 128"),
                        (["--select", "1001"], "--select 1001 is more than the 2000 test images of shapes less "
                                               "the --eval-images 1000")):
        with pytest.raises(SystemExit) as e:
            lapgan.get_args(["--dataset", "shapes", *argv])
        lap_one_line_error(e, words)


def test_lapgan_sampling_checks_room_before_drawing_and_draws_in_chunks(lapgan_runs, tmp_path, monkeypatch):
    ckpt = os.path.join(lapgan_runs["full"], "ckpt.pt")
    with pytest.raises(SystemExit) as e:
        lapgan.main(["--sample", "--ckpt", ckpt, "--n", "100000000", "--out", str(tmp_path / "s.png")])
    lap_one_line_error(e, "--n 100000000 needs about", "more than is free; lower --n")
    assert not list(tmp_path.iterdir())
    seen, real = [], lapgan.draw
    monkeypatch.setattr(lapgan, "draw", lambda src, n, y: (seen.append((n, len(y))), real(src, n, y))[1])
    with contextlib.redirect_stdout(io.StringIO()):
        lapgan.main(["--sample", "--ckpt", ckpt, "--n", "1200", "--npz", str(tmp_path / "s.npz"), "--out",
                     str(tmp_path / "s.png")])
    z = np.load(tmp_path / "s.npz")
    assert seen == [(500, 500), (500, 500), (200, 200)] and z["images"].shape == (1200, 32, 32, 3)
    assert Image.open(tmp_path / "s.png").size == (2 + 12 * 34, 2 + 300 * 34)  # 4 samples x 3 levels a row


def test_lapgan_checkpoint_checks_best_pt_other_scripts_and_a_changed_number_of_ranks(lapgan_runs, tmp_path):
    outf = str(tmp_path / "r")
    lap_epoch_one(lapgan_runs, outf)
    path = os.path.join(outf, "ckpt.pt")
    real = open(path, "rb").read()
    shutil.copy(os.path.join(lapgan_runs["full"], "best.pt"), path)  # best.pt where ckpt.pt is expected
    with pytest.raises(SystemExit) as e:
        lapgan.main(["--resume", "--outf", outf, "--epochs", "2"])
    lap_one_line_error(e, f"{path} is not a lapgan.py training checkpoint (it lacks optG, optD); use DIR/ckpt.pt")
    torch.save({"script": "vaegan", "args": {}}, path)
    with pytest.raises(SystemExit) as e:
        lapgan.main(["--resume", "--outf", outf, "--epochs", "2"])
    lap_one_line_error(e, f"{path} was written by vaegan.py, not lapgan.py")
    with open(path, "wb") as f:
        f.write(real)
    torch.save({**torch.load(path, weights_only=True), "world": 2}, path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        lapgan.main(["--resume", "--outf", outf, "--epochs", "2"])
    assert "note: trained on 2 processes, resumed on 1: each one's share of the data changes" in out.getvalue()


def test_lapgan_dataset_files_are_checked_after_each_reader(tmp_path, monkeypatch):
    """Wrong rank, fewer labels than images, labels outside the classes: one line naming the file."""
    rng = np.random.default_rng(0)
    cases = [(rng.integers(0, 256, (6, 28 * 28)), rng.integers(0, 10, 6), "not N x H x W images"),
             (rng.integers(0, 256, (6, 28, 28)), rng.integers(0, 10, 5), "holds 6 images but 5 labels"),
             (rng.integers(0, 256, (6, 28, 28)), np.array([0, 1, 2, 3, 4, 12]), "labels 0..12, outside the 10")]
    for x, y, words in cases:
        write_idx(tmp_path / "train-images-idx3-ubyte.gz", x)
        write_idx(tmp_path / "train-labels-idx1-ubyte.gz", y)
        with pytest.raises(SystemExit) as e:
            lapgan.load_mnist(str(tmp_path), "mnist", "train")
        lap_one_line_error(e, words, "train-images-idx3-ubyte.gz")
    cifar = tmp_path / "c"
    cifar.mkdir()
    x, y = write_cifar_tarball(cifar, protocol=4)["test_batch"]
    with tarfile.open(cifar / "cifar-10-python.tar.gz") as t:
        t.extractall(cifar, filter="data")
    with open(cifar / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": x, b"labels": y[:-1] + [10]}, f, protocol=4)
    lap_patch_cifar_md5(monkeypatch, cifar)
    monkeypatch.setitem(lapgan.CIFAR_MD5, "test_batch",
                        hashlib.md5((cifar / "cifar-10-batches-py" / "test_batch").read_bytes()).hexdigest())
    with pytest.raises(SystemExit) as e:
        lapgan.read_cifar10(str(cifar), "test")
    lap_one_line_error(e, "test_batch holds labels", "outside the 10 classes 0..9")


def test_lapgan_image_modes_exif_and_float_tiffs_decode_to_their_pixels(tmp_path):
    arr = np.arange(8 * 12 * 3, dtype=np.uint8).reshape(8, 12, 3) * 2  # 8 rows, 12 columns, distinct
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    Image.fromarray(arr).save(tmp_path / "turned.png", exif=exif)
    assert np.array_equal(lapgan.decode_image(str(tmp_path / "turned.png"), 8, None), np.rot90(arr, -1)[2:10])
    grey = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    for values in (grey, grey * 1000 - 200):  # in [0, 1]: as they are; beyond: their min..max
        Image.fromarray(values, "F").save(tmp_path / "f.tif")
        assert Image.open(tmp_path / "f.tif").mode == "F"
        assert np.abs(lapgan.decode_image(str(tmp_path / "f.tif"), 8, None) - grey * 255).max() <= 0.5 + 1e-6
    rgb = Image.fromarray(arr[:, :8])
    for mode in ("1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "YCbCr", "I;16", "I"):
        im = rgb.convert(mode) if mode[0] != "I" else Image.fromarray(np.asarray(rgb.convert("L")).astype(
            np.uint16 if mode == "I;16" else np.int32) * 257)
        assert im.mode == mode
        name = tmp_path / f"m_{mode.replace(';', '')}.{'png' if mode in ('1', 'L', 'P', 'RGB', 'RGBA', 'LA') else 'tif'}"
        im.save(name)
        out = lapgan.decode_image(str(name), 8, None)
        assert out.dtype == np.uint8 and out.max() > 100, (mode, out.max())  # not truncated to black
    Image.new("LAB", (8, 8)).save(tmp_path / "lab.tif")
    with pytest.raises(SystemExit) as e:
        lapgan.decode_image(str(tmp_path / "lab.tif"), 8, None)
    lap_one_line_error(e, "lab.tif has the Pillow mode LAB", "save it as 8-bit RGB or grey")


def test_lapgan_folder_walk_hidden_symlinks_nested_cache_key_and_outf(tmp_path, capsys):
    root = tmp_path / "data"
    make_image_folder(root, n=2)
    for p in ("cats/kittens/tiny/k.png", ".thumbs/t.png", "run/pics/samples_e001.png"):
        os.makedirs(root / os.path.dirname(p), exist_ok=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / p)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "dogs" / ".hidden.png")
    os.symlink(root, root / "loop")  # a folder linking to its parent: a loop
    os.symlink(root / "gone.png", root / "dogs" / "dangling.png")
    x, y, classes = lapgan.load_folder(str(root), 8, None, 1, outf=str(root / "run"))
    out = capsys.readouterr().out
    assert classes == ["cats", "dogs"] and len(x) == 5 and y.tolist() == [0, 0, 0, 1, 1]
    assert "classes (its top-level folders): cats, dogs" in out and f"skipping {root / 'loop'}" in out
    assert f"skipping {root / 'dogs' / 'dangling.png'} (a link to nothing)" in out
    assert f"skipping {root / 'run'}" in out
    f = root / "dogs" / "0.jpg"  # replaced with its modification time kept, but another size: decoded again
    st = f.stat()
    Image.fromarray(np.full((40, 50, 3), 255, np.uint8)).save(f, format="JPEG", quality=50)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_size != st.st_size
    assert lapgan.load_folder(str(root), 8, None, 1, outf=str(root / "run"))[0][3].min() > 240


# ----------------------------------------------------------------------------- lapgan.py: per-level budgets and
# the deviations that a short run may add (--level-steps, per-level lists, --ema, --base conv, --bn-g, --recipe)
def test_lapgan_paper_defaults_are_pinned():
    """Without flags, lapgan.py is the paper's CIFAR-10 setting: nothing added switches itself on."""
    args = lapgan.get_args(["--dataset", "cifar10"])
    paper = {"base": "mlp", "bn_g": False, "ema": 0.0, "level_steps": 1, "width_g": 128, "width_d": 64,
             "dropout_d": 0.5, "lr_d": None, "lr_g": None, "lr": 0.02, "momentum": 0.5, "optim": "sgd",
             "batch_size": 128,
             "nz": 100, "model": "small", "balance": False, "recipe": None, "conditional": False, "limit": None,
             "select": 200, "tanh_base": False, "bn_d": 0, "gen_coarse": 0.0, "truncate": None}
    assert {k: getattr(args, k) for k in paper} == paper
    assert lapgan.pyramid_sizes(args, 32) == [28, 14, 8]
    with contextlib.redirect_stdout(io.StringIO()):
        run = lap_tiny_run([], ncls=1)
    assert all(lv.steps == 1 and lv.G_avg is None and lv.sampler is lv.G for lv in run.levels.values())


def test_lapgan_level_steps_give_each_level_its_own_count(monkeypatch):
    """--level-steps 1,1,2: the base (k = 2) takes two optimiser steps per training step, the second on a
    batch of its own; the finer levels one, on the step's batch."""
    run = lap_tiny_run(["--optim", "adam", "--level-steps", "1,1,2"], n=64)
    seen = []
    real_step = lapgan.level_step

    def record(lv, x, y, *rest):
        seen.append((lv.k, x.clone()))
        return real_step(lv, x, y, *rest)
    monkeypatch.setattr(lapgan, "level_step", record)
    lapgan.train_step(run, torch.arange(16))
    assert [k for k, _ in seen] == [2, 2, 1, 0]
    assert torch.equal(seen[0][1], seen[2][1]) and torch.equal(seen[0][1], seen[3][1])
    assert not torch.equal(seen[0][1], seen[1][1])  # the base's second step: other images
    for k, lv in run.levels.items():  # Adam counts its steps
        assert lv.opt_G.state[next(lv.G.parameters())]["step"].item() == (2 if k == 2 else 1)
        assert lv.opt_D.state[next(lv.D.parameters())]["step"].item() == (2 if k == 2 else 1)


def test_lapgan_per_level_lists_reach_each_level():
    """Comma lists, level 0 (the finest) first: widths, D's dropout and G's and D's learning rates per level."""
    flags = ["--base", "conv", "--width-g", "6,10,12", "--width-d", "4,6,8", "--dropout-d", "0,0.25,0.5",
             "--lr-d", "0.1,0.2,0.3", "--lr-g", "0.01,0.02,0.03", "--optim", "sgd", "--lr", "0.05"]
    run = lap_tiny_run(flags)
    lapgan.set_schedule(run, 1)
    rates = zip([0.01, 0.02, 0.03], [0.1, 0.2, 0.3])
    for k, (wg, wd, p, (lr_g, lr_d)) in enumerate(zip([6, 10, 12], [4, 6, 8], [0, 0.25, 0.5], rates)):
        lv = run.levels[k]
        first_g = next(m for m in lv.G.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)))
        assert first_g.out_channels == wg  # at the conv base: the transposed conv
        assert next(m for m in lv.D.modules() if isinstance(m, nn.Conv2d)).out_channels == wd
        assert {m.p for m in lv.D.modules() if isinstance(m, nn.Dropout)} == {p}
        assert lv.opt_D.param_groups[0]["lr"] == pytest.approx(lr_d)
        assert lv.opt_G.param_groups[0]["lr"] == pytest.approx(lr_g)
    with pytest.raises(SystemExit) as e:
        lap_tiny_run(["--level-steps", "1,2"])
    lap_one_line_error(e, "--level-steps gives 2 values for 3 levels", "one per level")
    with pytest.raises(SystemExit) as e:
        lapgan.get_args(["--dataset", "shapes", "--width-d", "8,0,8"])
    lap_one_line_error(e, "--width-d 0 is out of range")


def test_lapgan_ema_is_the_hand_computed_average_and_what_samples(tmp_path):
    """--ema 0.75 after two steps: avg = 0.75 (0.75 p0 + 0.25 p1) + 0.25 p2 of G's weights p0, p1, p2; the
    checkpoint keeps it, --sample draws with it, and a resume continues it exactly."""
    run = lap_tiny_run(["--ema", "0.75", "--optim", "sgd", "--lr", "0.1"], n=32)
    lv = run.levels[0]
    p = [[t.detach().clone() for t in lv.G.parameters()]]
    for i in range(2):
        lapgan.train_step(run, torch.arange(16) + 8 * i)
        p.append([t.detach().clone() for t in lv.G.parameters()])
    for j, avg in enumerate(lv.G_avg.parameters()):
        want = 0.75 * (0.75 * p[0][j] + 0.25 * p[1][j]) + 0.25 * p[2][j]
        assert torch.allclose(avg, want, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(lv.G_avg.parameters(), lv.G.parameters()))
    one = lap_tiny_run(["--ema", "0.5,0,0"])  # a decay per level: the average at level 0 alone
    assert one.levels[0].beta == 0.5 and [one.levels[k].G_avg for k in (1, 2)] == [None, None]
    flags = LAPGAN_TINY + ["--ema", "0.9", "--select", "0"]
    with contextlib.redirect_stdout(io.StringIO()):
        lapgan.main(flags + ["--epochs", "2", "--outf", str(tmp_path / "full")])
        lapgan.main(flags + ["--epochs", "1", "--outf", str(tmp_path / "part")])
        lapgan.main(["--resume", "--outf", str(tmp_path / "part"), "--epochs", "2"])
    full = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)["levels"]
    part = torch.load(tmp_path / "part" / "ckpt.pt", weights_only=True)["levels"]
    for k in full:
        for name in ("G", "G_avg"):
            assert all(torch.equal(full[k][name][t], part[k][name][t]) for t in full[k][name]), (k, name)
        assert any(not torch.equal(full[k]["G"][t], full[k]["G_avg"][t]) for t in full[k]["G"])
    Gs, _ = lapgan.load_levels([str(tmp_path / "full" / "ckpt.pt")])
    for k, G in enumerate(Gs):
        assert all(torch.equal(G.state_dict()[t], full[k]["G_avg"][t]) for t in full[k]["G_avg"])


def test_lapgan_gen_coarse_grows_the_fakes_from_the_coarser_levels_samples(tmp_path):
    """--gen-coarse 1,0,0: every fake at level 0 grows from u(I~_1), the chain of G_2's and G_1's samplers
    (eval mode, the fakes' own labels), not from a real image's l_0; level 1 still sees real coarse images;
    the samplers come back in training mode; --level 0 alone cannot draw I~_1; resume continues exactly."""
    run = lap_tiny_run(["--conditional", "--base", "conv", "--gen-coarse", "1,0,0", "--ema", "0,0.9,0"], n=32)
    assert [run.levels[k].gen_coarse for k in (0, 1, 2)] == [1.0, 0.0, 0.0]
    seen = {0: [], 1: []}
    for k in seen:
        def record(xs, y=None, net=run.levels[k].G, k=k):
            seen[k].append((xs[1].clone(), y.clone()))  # [z, l_k]: the coarse images G_k is given
            return net(xs, y)
        run.levels[k].G_fwd = record
    drawn = []
    real_draw = lapgan.coarser_samples

    def draw(run, k, y):
        state = torch.get_rng_state()
        out = real_draw(run, k, y)
        drawn.append((state, k, y.clone(), out))
        return out
    lapgan.coarser_samples = draw
    try:
        idx = torch.arange(16)
        lapgan.train_step(run, idx)
    finally:
        lapgan.coarser_samples = real_draw
    x, y = lapgan.get_batch(run, idx)
    assert [k for _, k, _, _ in drawn] == [0]  # only level 0 draws
    state, _, y_drawn, I1 = drawn[0]
    l0, y0 = seen[0][0]
    assert torch.equal(y_drawn, y[4:]) and torch.equal(y0, y[4:])  # the fakes' labels, 3B/2 of them
    assert torch.allclose(l0, lapgan.up(I1, 32)) and not torch.allclose(l0, lapgan.condition(x[4:], run.sizes, 0))
    assert torch.allclose(seen[1][0][0], lapgan.condition(x[4:], run.sizes, 1))  # level 1: real l_1
    assert run.levels[1].G.training and run.levels[2].G.training and not run.levels[1].G_avg.training
    torch.set_rng_state(state)  # the same draw by hand (levels 2 and 1 stepped before level 0 drew)
    G2 = copy.deepcopy(run.levels[2].G)
    with torch.no_grad():
        z = lapgan.noise((12, 8), "cpu")
        I1_hand = lapgan.sample_level(run.levels[1].G_avg, G2.eval()([z], y[4:]), 16, y[4:])
        I1_train_bn = lapgan.sample_level(run.levels[1].G_avg, G2.train()([z], y[4:]), 16, y[4:])
    assert torch.allclose(I1_hand, I1) and not torch.allclose(I1_train_bn, I1)  # eval mode, as --sample
    with pytest.raises(SystemExit) as e:
        lap_tiny_run(["--gen-coarse", "0.5", "--level", "0"])
    lap_one_line_error(e, "--gen-coarse draws level 0's coarse images with the coarser levels", "drop --level")
    torch.manual_seed(0)
    mixed = lapgan.mixed_condition(torch.zeros(400, 1, 4, 4), torch.ones(400, 1, 2, 2), 0.25).flatten(1)
    assert (mixed.amax(1) - mixed.amin(1)).max() < 1e-6  # whole rows swapped
    assert 0.15 < mixed[:, 0].mean().item() < 0.35  # about a quarter of them
    flags = LAPGAN_TINY + ["--gen-coarse", "0.5", "--select", "0"]
    with contextlib.redirect_stdout(io.StringIO()):
        lapgan.main(flags + ["--epochs", "2", "--outf", str(tmp_path / "full")])
        lapgan.main(flags + ["--epochs", "1", "--outf", str(tmp_path / "part")])
        lapgan.main(["--resume", "--outf", str(tmp_path / "part"), "--epochs", "2"])
    full = torch.load(tmp_path / "full" / "ckpt.pt", weights_only=True)["levels"][0]["G"]
    part = torch.load(tmp_path / "part" / "ckpt.pt", weights_only=True)["levels"][0]["G"]
    assert all(torch.equal(full[t], part[t]) for t in full)


@pytest.mark.parametrize("sizes,ncls", [([28, 14, 7], 10), ([28, 14], 0), ([32, 16, 8], 3)])
def test_lapgan_conv_base_is_a_dcgan_generator_of_the_stated_shape(sizes, ncls):
    """--base conv: G_K projects z (and the one-hot class) to 2w maps of ceil(s/2) px, batch norm, one
    stride-2 transposed conv to s px, a 5x5 conv to the image; D_K is a conv D with the class plane."""
    args = vars(lapgan.get_args(["--dataset", "shapes", "--base", "conv", "--width-g", "6", "--width-d", "5",
                                 "--nz", "7"]))
    K, nc = len(sizes) - 1, 1
    s, h = sizes[K], (sizes[K] + 1) // 2
    G, D = lapgan.build_level(args, K, sizes, nc, ncls)
    linear = [m for m in G.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(7 + ncls, 2 * 6 * h * h)]
    assert len([m for m in G.modules() if isinstance(m, nn.BatchNorm2d)]) == 2
    assert not [m for m in D.modules() if isinstance(m, (nn.BatchNorm2d, nn.Linear)) and not
                isinstance(m, nn.Linear)]
    convT = next(m for m in G.modules() if isinstance(m, nn.ConvTranspose2d))
    assert (convT.in_channels, convT.out_channels, convT.stride) == (12, 6, (2, 2))
    y = torch.arange(4) % ncls if ncls else None
    out = G.eval()([lapgan.noise((4, 7), "cpu")], y)
    assert out.shape == (4, nc, s, s)
    assert next(m for m in D.modules() if isinstance(m, nn.Conv2d)).in_channels == nc + (1 if ncls else 0)
    assert D([out], y).shape == (4,)


@pytest.mark.parametrize("base", ["mlp", "conv"])
def test_lapgan_tanh_base_bounds_g_k_to_the_pixel_range_in_the_datas_units(base):
    """--tanh-base: G_K's body ends in ToData, ((tanh(a) + 1) / 2 - mean) / std with the training split's
    per-channel mean and std (set when the run is made, copied into --ema's average, kept by checkpoints), so
    every base pixel lies in [0, 1] once the normalisation is undone; the finer G_k are untouched."""
    run = lap_tiny_run(["--base", base, "--tanh-base", "--ema", "0.5", "--conditional"], nc=3)
    K = len(run.sizes) - 1
    G = run.levels[K].G
    last = G.body[-1]
    assert isinstance(last, lapgan.ToData) and isinstance(run.levels[K].G_avg.body[-1], lapgan.ToData)
    assert torch.equal(last.mean, run.mean.view(-1, 1, 1)) and torch.equal(last.std, run.std.view(-1, 1, 1))
    assert torch.equal(run.levels[K].G_avg.body[-1].std, last.std)
    assert not any(isinstance(m, lapgan.ToData) for k in range(K) for m in run.levels[k].G.modules())
    y = torch.arange(6) % run.ncls
    z = lapgan.noise((6, run.args.nz), "cpu") * 50  # large inputs: the output saturates
    G.eval()
    with torch.no_grad():
        a = G.body[:-1](torch.cat([z, F.one_hot(y, run.ncls).float()], 1))
        out = G([z], y)
    assert torch.allclose(out, ((torch.tanh(a) + 1) / 2 - run.mean) / run.std, atol=1e-6)
    pixels = out * run.std + run.mean
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6 and (pixels < 1e-3).any()
    plain = lap_tiny_run(["--base", base])
    assert not any(isinstance(m, lapgan.ToData) for m in plain.levels[K].G.modules())


def test_lapgan_bn_g_puts_batch_norm_after_each_relu_of_g_only():
    sizes = [16, 8]
    plain = lapgan.build_level(vars(lapgan.get_args(["--dataset", "shapes", "--width-g", "4"])), 0, sizes, 3, 0)
    bn = lapgan.build_level(vars(lapgan.get_args(["--dataset", "shapes", "--width-g", "4", "--bn-g"])), 0,
                            sizes, 3, 0)
    kinds = [type(m).__name__ for m in bn[0].body]
    assert kinds == ["Conv2d", "ReLU", "BatchNorm2d", "Conv2d", "ReLU", "BatchNorm2d", "Conv2d"]
    assert not any(m.affine for m in bn[0].modules() if isinstance(m, nn.BatchNorm2d))  # lsun/model.lua's
    assert not any(isinstance(m, nn.BatchNorm2d) for m in [*bn[1].modules(), *plain[0].modules()])
    # without --bn-g the layers keep their places, so checkpoints written before the flag still load
    assert list(plain[0].state_dict()) == [f"body.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")]


@pytest.mark.parametrize("base", ["conv", "mlp"])
def test_lapgan_bn_d_puts_batch_norm_after_the_strided_conv_of_each_conv_d(base):
    """--bn-d: batch norm with a scale and shift (DCGAN's) right after the stride-2 conv of every conv D_k,
    --base conv's D_K included; the MLP base's D_K and every G_k are untouched, and without the flag D_k's
    layers keep their places, so checkpoints written before it still load."""
    sizes = [16, 8, 4]

    def nets(extra):
        args = vars(lapgan.get_args(["--dataset", "shapes", "--base", base, "--width-d", "4", *extra]))
        return [lapgan.build_level(args, k, sizes, 3, 5) for k in range(3)]
    plain, bn = nets([]), nets(["--bn-d", "1"])
    for k in range(3):
        (G, D), (G0, D0) = bn[k], plain[k]
        assert list(G.state_dict()) == list(G0.state_dict())
        norms = [i for i, m in enumerate(D.body) if isinstance(m, nn.BatchNorm2d)]
        if k == 2 and base == "mlp":
            assert norms == []
            continue
        assert norms == [3] and D.body[2].stride == (2, 2) and D.body[3].affine
        assert not D.body[3].track_running_stats  # D judges batches only: no statistics to keep in step
        assert D.body[3].num_features == D.body[2].out_channels
        assert not any(isinstance(m, nn.BatchNorm2d) for m in D0.modules())
        assert list(D0.state_dict()) == [f"body.{i}.{w}" for i in (0, 2, 6) for w in ("weight", "bias")] + \
            ["embed.weight", "embed.bias"]
    # one value per level, level 0 first: --bn-d 0,0,1 puts it in the base's D_K alone
    base_only = nets(["--bn-d", "0,0,1"])
    with_bn = [any(isinstance(m, nn.BatchNorm2d) for m in D.modules()) for _, D in base_only]
    assert with_bn == [False, False, base == "conv"]


def test_lapgan_bn_d_judges_the_real_and_the_drawn_images_in_batches_of_their_own():
    """With --bn-d, D_k's D(x) in a step is D_k on the real half alone, normalised on the reals' own batch
    statistics, not on a batch mixed with drawn images: as G_k's step judges drawn images alone, G_k then
    faces the D_k that was trained."""
    run = lap_tiny_run(["--conditional", "--bn-d", "1", "--dropout-d", "0", "--optim", "adam"])
    lv, h = run.levels[0], 4
    torch.manual_seed(1)
    x, y = lapgan.get_batch(run, torch.randperm(16))
    real = lapgan.down(x[:h], run.sizes[0])
    D = copy.deepcopy(lv.D)
    with torch.no_grad():
        alone = torch.sigmoid(D([real], y[:h])).mean()
        mixed = torch.sigmoid(D([torch.cat([real, real.flip(0) * 0.5])], y[:2 * h])[:h]).mean()
    assert abs(alone - mixed) > 1e-3  # batch statistics matter here, so the check below can fail
    out = lapgan.level_step(lv, x, y, run.sizes, run.args.nz)
    assert torch.allclose(out["d_x"], alone, atol=1e-6)
    assert out["d_x"] != out["d_gz"]


def test_lapgan_bn_d_without_any_conv_d_is_refused():
    with pytest.raises(SystemExit, match="--bn-d .* drop --bn-d or add --base conv"):
        lapgan.get_args(["--dataset", "shapes", "--model", "large", "--bn-d", "0,1,0"])
    assert lapgan.get_args(["--dataset", "shapes", "--model", "large", "--bn-d", "0"]).bn_d == [0]
    assert lapgan.get_args(["--dataset", "shapes", "--model", "large", "--base", "conv", "--bn-d", "1"]).bn_d


@pytest.mark.parametrize("base,k", [("mlp", 2), ("conv", 2), ("mlp", 0)])
def test_lapgan_proj_d_adds_the_class_projection_to_ds_logit(base, k):
    """--proj-d: D_k(x, y) = psi(phi(x)) + <embed(y), phi(x)>, phi(x) the input of D_k's last linear layer."""
    args = vars(lapgan.get_args(["--dataset", "shapes", "--base", base, "--width-d", "4", "--proj-d"]))
    sizes = [16, 8, 4]
    D = lapgan.build_level(args, k, sizes, 3, 5)[1].eval()
    torch.manual_seed(1)
    with torch.no_grad():
        D.project.weight.normal_()
    x, y = torch.randn(6, 3, sizes[k], sizes[k]), torch.tensor([0, 1, 2, 3, 4, 0])
    plain = copy.deepcopy(D)
    plain.project = None  # the same D without the term
    with torch.no_grad():
        want = plain([x], y)
        seen = {}
        D.body[-2].register_forward_hook(lambda m, i, o: seen.update(phi=i[0]))
        got = D([x], y)
        want = want + (D.project.weight[y] * seen["phi"]).sum(1)
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(got, plain([x], y), atol=1e-3)
    args_off = vars(lapgan.get_args(["--dataset", "shapes", "--base", base, "--width-d", "4"]))
    assert lapgan.build_level(args_off, k, sizes, 3, 5)[1].project is None


def test_lapgan_truncate_narrows_the_base_noise_and_sample_takes_the_runs_value(tmp_path):
    """--truncate 0.5 at training is stored; --sample then draws z_K from U[-0.5, 0.5], exactly half of the
    paper's U[-1, 1] draw under the same seed, unless --truncate is typed; a run without it samples U[-1, 1];
    the web page's fixed noise is truncated the same way."""
    outf = str(tmp_path / "r")
    with contextlib.redirect_stdout(io.StringIO()):
        lapgan.main(LAPGAN_TINY + ["--truncate", "0.5", "--epochs", "1", "--outf", outf])
    ckpt = os.path.join(outf, "ckpt.pt")
    cpu = torch.device("cpu")
    src = lapgan.sampling_source(lapgan.get_args(["--sample", "--ckpt", ckpt]), cpu)
    typed = lapgan.sampling_source(lapgan.get_args(["--sample", "--ckpt", ckpt, "--truncate", "1"]), cpu)
    assert (src.truncate, typed.truncate) == (0.5, 1.0)
    seen, finest = [], []
    for s in (src, typed):
        s.Gs[-1].register_forward_pre_hook(lambda m, inputs: seen.append(inputs[0][0]))  # z_K
        torch.manual_seed(3)
        finest.append(lapgan.draw(s, 12, torch.arange(12) % 3)[0])
    assert seen[0].abs().max() <= 0.5 and seen[1].abs().max() > 0.9
    assert torch.equal(seen[0], seen[1] * 0.5)
    assert not torch.allclose(finest[0], finest[1])  # the samples change with it
    ck = torch.load(ckpt, weights_only=False)
    del ck["args"]["truncate"]  # a checkpoint from before the flag
    torch.save(ck, os.path.join(outf, "old.pt"))
    old = lapgan.sampling_source(lapgan.get_args(["--sample", "--ckpt", os.path.join(outf, "old.pt")]), cpu)
    assert old.truncate == 1.0
    export = web_export()
    page = export.load_page([ckpt])
    _, noise = export.fixed_noise(page, 3, 4)
    _, paper = export.fixed_noise(export.load_page([os.path.join(outf, "old.pt")]), 3, 4)
    assert page.truncate == 0.5 and torch.equal(noise[0], paper[0] * 0.5)  # z_K
    assert all(torch.equal(a, b) for a, b in zip(noise[1:], paper[1:]))  # the finer levels' planes
    # the epoch pictures draw as --sample does, and training itself is the same as without the flag
    plain = str(tmp_path / "plain")
    with contextlib.redirect_stdout(io.StringIO()):
        lapgan.main(LAPGAN_TINY + ["--epochs", "1", "--outf", plain])
    Gs_t, _ = lapgan.load_levels([ckpt])
    Gs_p, _ = lapgan.load_levels([os.path.join(plain, "ckpt.pt")])
    for a, b in zip(Gs_t, Gs_p):
        assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))

    def picture(d):
        return np.asarray(Image.open(os.path.join(d, "samples_e001.png")))
    assert not np.array_equal(picture(outf), picture(plain))


@needs_chromium
def test_web_page_draws_the_base_noise_truncated_as_the_run_stored(tmp_path):
    """sampler.js's drawNoise (the page's live samples): z_K from a run with --truncate 0.5 is exactly half
    of the U[-1, 1] draw of the same generator; the finer levels' noise planes are untouched."""
    outf = str(tmp_path / "r")
    with contextlib.redirect_stdout(io.StringIO()):
        lapgan.main(LAPGAN_TINY + ["--truncate", "0.5", "--epochs", "1", "--outf", outf])
        web_export().main([os.path.join(outf, "ckpt.pt"), "--out", str(tmp_path / "p.html")])
    draw = ("(() => { const t = drawNoise(model, generator(5)); "
            "const p = drawNoise({...model, truncate: 1}, generator(5)); "
            "return JSON.stringify({t: t.map(v => Array.from(v)), p: p.map(v => Array.from(v)), "
            "truncate: model.truncate}); })()")
    with chromium(f"file://{tmp_path / 'p.html'}?keep=0&n=1") as browser:
        got = json.loads(browser.eval(draw))
    assert got["truncate"] == 0.5
    z_t, z_p = np.array(got["t"][0]), np.array(got["p"][0])  # z_K, the base's (sampling order: G_K first)
    assert len(z_t) == 8 and np.abs(z_p).max() > 0.5 and np.allclose(z_t, 0.5 * z_p, atol=1e-7)
    assert all(np.array_equal(a, b) for a, b in zip(got["t"][1:], got["p"][1:]))


def test_lapgan_recipe_sets_prints_and_stores_its_flags(tmp_path, capsys):
    args = lapgan.get_args(["--dataset", "fashion-mnist", "--recipe", "cpu", "--epochs", "2"])
    printed = capsys.readouterr().out
    for name, value in lapgan.RECIPES["cpu"].items():
        if name != "epochs":
            assert getattr(args, name) == value, name
            assert lapgan.flag_text(name, value) in printed
    assert args.epochs == 2 and "--epochs" not in printed  # typed flags win
    typed = lapgan.get_args(["--dataset", "fashion-mnist", "--recipe", "cpu", "--batch-size", "8"])
    assert typed.batch_size == 8 and "--batch-size" not in capsys.readouterr().out
    small = ["--limit", "16", "--batch-size", "8", "--width-g", "4", "--width-d", "4", "--nz", "8",
             "--select", "0", "--levels", "8,16", "--image-size", "16"]
    with contextlib.redirect_stdout(io.StringIO()):
        lapgan.main(["--dataset", "shapes", "--recipe", "cpu", *small, "--epochs", "1", "--outf", str(tmp_path)])
        stored = lapgan.load_checkpoint(str(tmp_path / "ckpt.pt"))["args"]
        lapgan.main(["--resume", "--outf", str(tmp_path), "--epochs", "2"])
    assert stored["recipe"] == "cpu" and stored["optim"] == lapgan.RECIPES["cpu"]["optim"]
    assert stored["batch_size"] == 8 and stored["level_steps"] == lapgan.RECIPES["cpu"]["level_steps"]
    assert stored["base"] == lapgan.RECIPES["cpu"]["base"]
    assert lapgan.load_checkpoint(str(tmp_path / "ckpt.pt"))["epoch"] == 2


# ---- web: conv base, --bn-g and --ema models
def page_layer(x, L, W):
    """One layer of export.py's list run by torch's own functions on the page's weights W (a flat float32
    tensor; L's "w", "b", "scale", "shift" are offsets into it, "b" -1 when there is no bias)."""
    def take(at, *shape):
        return W[at:at + math.prod(shape)].view(shape)
    if L["op"] == "linear":
        return F.linear(x, take(L["w"], L["out"], L["in"]), take(L["b"], L["out"]) if L["b"] >= 0 else None)
    if L["op"] in ("conv", "convT"):
        shape = (L["cout"], L["cin"], L["k"], L["k"])
        bias = take(L["b"], L["cout"]) if L["b"] >= 0 else None
        if L["op"] == "conv":
            return F.conv2d(x, take(L["w"], *shape), bias, L["stride"], L["pad"])
        w = take(L["w"], shape[1], shape[0], *shape[2:])  # in x out x k x k
        return F.conv_transpose2d(x, w, bias, L["stride"], L["pad"], L["outpad"])
    if L["op"] == "affine":
        c = x.shape[1]
        return x * take(L["scale"], c).view(1, c, 1, 1) + take(L["shift"], c).view(1, c, 1, 1)
    if L["op"] == "unflatten":
        return x.view(len(x), *L["shape"])
    if L["op"] == "tanh":
        return torch.tanh(x)
    assert L["op"] == "relu", L["op"]
    return F.relu(x)


class PageBody(nn.Module):
    """A network of the page (export.py's layers and weights) as a torch module."""

    def __init__(self, layers, W):
        super().__init__()
        self.layers, self.W = layers, W

    def forward(self, x):
        for L in self.layers:
            x = page_layer(x, L, self.W)
        return x


def page_weights(page, dtype):
    """The page's weights decoded from its base64, as sampler.js decodeWeights does (float16 widened)."""
    raw = base64.b64decode(page.weights.encoded(dtype))
    return torch.from_numpy(np.frombuffer(raw, "<f2" if dtype == "float16" else "<f4").astype(np.float32))


def page_generators(page, dtype):
    """lapgan.Conditioned generators made of the page's layers and weights, the paper's order (G_0 first):
    torch given exactly the numbers the page holds (its folded, rounded weights)."""
    W, ncls, Gs = page_weights(page, dtype), len(page.classes or []), []
    for net in page.nets:
        G = lapgan.Conditioned(PageBody(net["layers"], W), ncls, net["size"], net["input"] == "flat")
        if net["embed"]:
            n = net["size"] ** 2
            G.embed.weight.data = W[net["embed"]["w"]:net["embed"]["w"] + n * ncls].view(n, ncls)
            G.embed.bias.data = W[net["embed"]["b"]:net["embed"]["b"] + n]
        Gs.insert(0, G)
    return Gs


def random_batch_norm(body):
    """Running statistics (and affine weights) far from their initial values, distinct per channel, so that
    a fold into the wrong channels or positions shows."""
    for m in body.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.2, 3)
            if m.affine:
                m.weight.data.uniform_(0.5, 2)
                m.bias.data.uniform_(-1, 1)
    return body.eval()


@pytest.mark.parametrize("size", [5, 6])
def test_web_export_folds_conv_base_and_bn_g_into_exact_ops(size):
    """Without a browser: export.py's ops, run by torch on the exported float32 weights, equal the module's
    output (eval mode, random running statistics) for --base conv's G_K (BN after Linear + Unflatten folded
    into the Linear; BN after the transposed conv folded into it; s odd and even: kernels 3 and 4) and a
    --bn-g G_k (BN after each ReLU: a per-channel scale and shift, since the next conv pads with zeros)."""
    export = web_export()
    base = random_batch_norm(lapgan.conv_base_g(6, 3, 3, size, 4))
    finer = random_batch_norm(lapgan.conv_g(5, 3, 4, bn=True))
    page = export.Page("lapgan", "", "", None, [], [], "uniform")
    export.add_net(page, base, size, "G_K", nz=9)
    export.add_net(page, finer, size, "G_k")
    ops = [[L["op"] for L in net["layers"]] for net in page.nets]
    assert ops[0] == ["linear", "unflatten", "relu", "convT", "relu", "conv"]  # no BN left: both folded
    assert ops[1] == ["conv", "relu", "affine", "conv", "relu", "affine", "conv"]
    W = page_weights(page, "float32")
    x = [torch.rand(4, 9) * 2 - 1, torch.rand(4, 5, size, size) * 2 - 1]
    for net, body, inp in zip(page.nets, [base, finer], x):
        with torch.no_grad():
            want = body(inp)
            no_bn = nn.Sequential(*[m for m in body if not isinstance(m, nn.BatchNorm2d)])(inp)
        got = PageBody(net["layers"], W)(inp)
        assert want.shape[-1] == size and got.shape == want.shape
        assert (got - want).abs().max() < 1e-5 * (1 + want.abs().max())
        assert (no_bn - want).abs().max() > 0.1  # the statistics matter: a wrong fold would show


@pytest.fixture(scope="module")
def web_bn_run(tmp_path_factory):
    """A tiny trained class-conditional LAPGAN with --base conv, --tanh-base, --bn-g and --ema, 5 -> 8 -> 16 px."""
    root = tmp_path_factory.mktemp("webbn")
    flags = ["--dataset", "shapes", "--image-size", "16", "--levels", "5,8,16", "--limit", "16",
             "--batch-size", "8", "--width-g", "4", "--width-d", "4", "--nz", "6", "--select", "0",
             "--conditional", "--optim", "adam", "--lr", "0.01", "--epochs", "1", "--base", "conv", "--bn-g",
             "--ema", "0.9", "--tanh-base", "--outf", str(root)]
    with contextlib.redirect_stdout(io.StringIO()):
        lapgan.main(flags)
    return root / "ckpt.pt"


def chain_display(Gs, page, ck):
    """lapgan.sample_chain of Gs on the page's fixed noise (3 samples, seed 4), base first, in [-1, 1]."""
    labels, _ = web_export().fixed_noise(page, 3, 4)
    gen = torch.Generator().manual_seed(4)  # sample_chain draws from it as export.fixed_noise did
    sizes = [net["size"] for net in page.nets][::-1]
    chain = lapgan.sample_chain(Gs, sizes, 3, ck["args"]["nz"], labels, "cpu", gen)[::-1]
    return [lapgan.to_display(x, ck["mean"], ck["std"]) for x in chain]


def test_web_export_of_conv_base_bn_g_ema_run_is_torchs_average(web_bn_run):
    """Without a browser: torch on the page's float32 ops equals lapgan.sample_chain with the checkpoint's
    generators as --sample loads them, which are --ema's averages (G_avg): the chain of the last trained G
    differs. The run's BN statistics have moved from their initial 0 and 1."""
    export = web_export()
    page = export.load_page([str(web_bn_run)])
    ck = lapgan.load_checkpoint(str(web_bn_run))
    Gs = [G for G, _ in export.lapgan_chain([str(web_bn_run)])[0][::-1]]
    raw = []
    for k, G in enumerate(copy.deepcopy(Gs)):
        G.load_state_dict(ck["levels"][k]["G"])  # the last trained G_k, not the average
        raw.append(G)
        avg = ck["levels"][k]["G_avg"]
        assert all(torch.equal(v, avg[name]) for name, v in Gs[k].state_dict().items())
    bns = [m for G in Gs for m in G.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(bns) == 6 and all((m.running_var - 1).abs().max() > 0.05 for m in bns)
    want, got = chain_display(Gs, page, ck), chain_display(page_generators(page, "float32"), page, ck)
    other = chain_display(raw, page, ck)
    for k, (x, js, g) in enumerate(zip(want, got, other)):
        assert (js - x).abs().max() < 1e-5, k
        assert (g - x).abs().max() > 1e-2, k  # the average draws other images than the last G
    assert [L["op"] for L in page.nets[1]["layers"]].count("affine") == 2


@needs_chromium
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_web_page_draws_conv_base_bn_g_ema_lapgan_as_torch(web_bn_run, tmp_path, dtype):
    """The page's JavaScript on fixed noise equals lapgan.sample_chain, every level, to 1e-3 in display
    units, for a --base conv --bn-g --ema run: float32, the checkpoint's averaged generators themselves;
    float16, torch given the page's rounded (folded) weights, and the generators themselves to 1e-2."""
    export = web_export()
    flags = ["--float32"] if dtype == "float32" else []
    page, got = page_output(export, [web_bn_run], tmp_path / "p.html", flags)
    ck = lapgan.load_checkpoint(str(web_bn_run))
    exact = chain_display([G for G, _ in export.lapgan_chain([str(web_bn_run)])[0][::-1]], page, ck)
    want = exact
    if dtype == "float16":
        want = chain_display(page_generators(page, dtype), page, ck)
    assert len(got) == 3 and all(len(levels) == 3 for levels in got)
    for k, x in enumerate(want):
        js = lapgan.to_display(torch.tensor([levels[k] for levels in got]).view_as(x), ck["mean"], ck["std"])
        assert (js - x).abs().max() < 1e-3, (k, (js - x).abs().max())
        assert (js - exact[k]).abs().max() < 1e-2
        assert x.std() > 1e-3  # the images hold something to compare


# ---- bench: per-level view and nearest-in-features sheet
import levels as levels_tool  # noqa: E402  (bench/ is on sys.path above)


def lap_ckpt_with(run_dir, folder, **flags):
    """A copy of a run's ckpt.pt, with training flags set by hand, alone in `folder` (no log.csv)."""
    ck = torch.load(os.path.join(run_dir, "ckpt.pt"), weights_only=True)
    ck["args"].update(flags)
    os.makedirs(folder, exist_ok=True)
    torch.save(ck, os.path.join(folder, "ckpt.pt"))
    return os.path.join(folder, "ckpt.pt")


def net_size(state):
    """Parameters in a state dict (batch-norm statistics are buffers, not parameters)."""
    return sum(t.numel() for n, t in state.items() if "running_" not in n and "num_batches" not in n)


def test_levels_times_each_levels_real_step_and_weighs_it_by_level_steps(lapgan_runs, tmp_path, monkeypatch,
                                                                         capsys):
    ckpt = lap_ckpt_with(lapgan_runs["full"], tmp_path / "run", level_steps="1,1,3")
    ck = torch.load(ckpt, weights_only=True)
    calls, trained = [], {}
    real_step = lapgan.level_step

    def watched(lv, x, *a, **kw):  # the real step, watched: which level, what batch, which weights
        calls.append((lv.k, tuple(x.shape)))
        saved = ck["levels"][lv.k]["G"]
        trained.setdefault(lv.k, all(torch.equal(t, saved[n]) for n, t in lv.G.state_dict().items()))
        return real_step(lv, x, *a, **kw)

    monkeypatch.setattr(lapgan, "level_step", watched)
    views, real = levels_tool.main([ckpt, "--out", str(tmp_path / "lv"), "--n", "8"])
    out = capsys.readouterr().out
    assert [v.k for v in views] == [2, 1, 0] and [v.updates for v in views] == [3, 1, 1] and real is None
    assert sorted(calls) == sorted([(k, (16, 3, 32, 32)) for k in range(3)] * 5)  # 2 warm-up + 3 timed, 2B
    # every level warms up before any is timed: the process's first steps are charged to no level
    assert [k for k, _ in calls] == [2, 2, 1, 1, 0, 0] + [2] * 3 + [1] * 3 + [0] * 3
    assert trained == {0: True, 1: True, 2: True}  # the checkpoint's own nets, before the first timed step
    for v in views:
        nets = ck["levels"][v.k]
        assert v.d_over_g == pytest.approx(net_size(nets["D"]) / net_size(nets["G"]))
        assert v.seconds > 0 and v.d_x is None and v.d_gz is None  # no log.csv beside this checkpoint
    t = {v.k: v.seconds for v in views}
    assert sum(v.share for v in views) == pytest.approx(1, abs=1e-12)
    assert views[0].share == pytest.approx(3 * t[2] / (3 * t[2] + t[1] + t[0]))
    assert f"| 2 | 8 px | 3 | {views[0].share:.1%} |" in out and "feature FID" not in out
    assert f"note: no {tmp_path / 'run' / 'log.csv'}" in out
    three = views[0].share
    levels_tool.set_shares(views, levels_tool.level_counts({"level_steps": "1,1,1"}, 2))  # the same times
    assert views[0].share == pytest.approx(t[2] / (t[2] + t[1] + t[0])) and views[0].share < three
    assert levels_tool.level_counts({}, 2) == levels_tool.level_counts({"level_steps": None}, 2) == [1, 1, 1]
    assert levels_tool.level_counts({"level_steps": [4, 2, 1]}, 2) == [4, 2, 1]
    for bad in ("1,2", "1,0,1", "1,x,1"):
        with pytest.raises(SystemExit, match=f"level_steps '{bad}' is not one count >= 1 for each of its 3"):
            levels_tool.main([lap_ckpt_with(lapgan_runs["full"], tmp_path / bad, level_steps=bad), "--out",
                              str(tmp_path / "bad")])
    assert not os.path.exists(tmp_path / "bad")  # refused before any file was written
    with pytest.raises(SystemExit, match="--score needs a dataset bench/quality.py knows .* not shapes"):
        levels_tool.main([ckpt, "--out", str(tmp_path / "bad"), "--score"])


def test_levels_reads_each_levels_d_from_the_runs_log(lapgan_runs, tmp_path, capsys):
    ckpt = lap_ckpt_with(lapgan_runs["full"], tmp_path / "run")
    rows = []
    for i in range(8):  # D(x) of level k at row i: 0.5 + 0.05 i + 0.01 k; D(G(z)): 0.4 - 0.05 i + 0.01 k
        row = {"step": 2 * i + 2, "epoch": 1, "d_x": 0.0, "d_gz": 0.0}  # the means over levels: not read
        row.update({f"d_x{k}": round(0.5 + 0.05 * i + 0.01 * k, 4) for k in range(3)})
        row.update({f"d_gz{k}": round(0.4 - 0.05 * i + 0.01 * k, 4) for k in range(2)})  # none for level 2
        rows.append(row)
    with open(tmp_path / "run" / "log.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    views, _ = levels_tool.main([ckpt, "--out", str(tmp_path / "lv"), "--n", "4"])
    out = capsys.readouterr().out
    by_k = {v.k: v for v in views}
    # first row, middle row (the 5th of 8), last row, the mean of the last quarter (rows 7 and 8)
    assert by_k[0].d_x == pytest.approx([0.50, 0.70, 0.85, 0.825])
    assert by_k[2].d_x == pytest.approx([0.52, 0.72, 0.87, 0.845])
    assert by_k[1].d_gz == pytest.approx([0.41, 0.21, 0.06, 0.085])
    assert by_k[2].d_gz is None
    assert "| 0.50, 0.70, 0.85, 0.8" in out and "| 0.52, 0.72, 0.87, 0.8" in out and "| n/a |" in out
    levels_tool.add_d_columns(views, read_log(tmp_path / "run" / "log.csv"), flip=2)  # an old run's log
    assert by_k[0].d_x == pytest.approx([0.52, 0.72, 0.87, 0.845]) and by_k[2].d_gz[0] == pytest.approx(0.4)


def test_levels_score_puts_each_levels_chain_and_its_cost_in_one_table(quality_data, tmp_path, capsys):
    root, cache, _, (xt, yt) = quality_data
    outf, lv = str(tmp_path / "run"), str(tmp_path / "lv")
    with contextlib.redirect_stdout(io.StringIO()):  # a LAPGAN of the quality data, one short epoch
        lapgan.main(["--dataset", "mnist", "--dataroot", root, "--limit", "16", "--batch-size", "8",
                     "--width-g", "8", "--width-d", "8", "--nz", "8", "--select", "0", "--conditional",
                     "--epochs", "1", "--outf", outf])
    capsys.readouterr()
    views, real = levels_tool.main([os.path.join(outf, "ckpt.pt"), "--out", lv, "--n", "40", "--score",
                                    "--cache", cache])
    printed = capsys.readouterr()
    assert "training" not in printed.err  # the cached classifier
    assert [(v.k, v.chain) for v in views] == [(2, "full"), (1, "from_2"), (0, "from_1")]
    stored = np.load(os.path.join(lv, "real.npz"))
    assert np.array_equal(stored["images"][..., 0], xt[:40]) and np.array_equal(stored["labels"], yt[:40])
    scores = {}
    for name in ("full", "from_2", "from_1", "real"):
        path = os.path.join(lv, name + ".npz")
        scores[name] = quality.evaluate(path, "mnist", root, cache, log=lambda m: None)
    for v in views:
        assert v.fid == pytest.approx(scores[v.chain]["fid"]), v.k
        assert v.asked == pytest.approx(scores[v.chain]["class_acc"]), v.k
    assert views[0].fid_added == pytest.approx(scores["full"]["fid"] - scores["from_2"]["fid"])
    assert views[2].fid_added == pytest.approx(scores["from_1"]["fid"] - scores["real"]["fid"])
    assert real == pytest.approx(scores["real"]) and real["class_acc"] > 0.9
    assert real["fid"] < views[0].fid  # real test images against a pyramid trained for four steps
    lines = printed.out.splitlines()
    assert lines[-6].startswith("| level k |") and "| FID added by G_k |" in lines[-6]
    assert lines[-4].startswith("| 2 | 7 px |") and f"| full.npz | {views[0].fid:.1f} |" in lines[-4]
    assert lines[-1].startswith("| real |") and f"| real.npz | {real['fid']:.1f} |" in lines[-1]


def nn_sheet_pairs(png, n, size):
    """The pairs of a --nn-sheet cut out again, one pixel per 3 x 3 block: [(sample, its neighbour)]."""
    sheet = np.asarray(Image.open(png))
    s, pad, per = quality.SHEET_SCALE, quality.SHEET_PAD, quality.SHEET_PER_ROW
    h, w = size * s, 2 * size * s  # a pair: the sample, then its neighbour, no gap
    assert sheet.shape == (pad + -(-n // per) * (h + pad), pad + per * (w + pad))
    pairs = []
    for i in range(n):
        top, left = pad + i // per * (h + pad), pad + i % per * (w + pad)
        cell = sheet[top:top + h, left:left + w]
        small = cell[::s, ::s]
        assert np.array_equal(np.repeat(np.repeat(small, s, 0), s, 1), cell)  # enlarged by nearest neighbour
        pairs.append((small[:, :size], small[:, size:]))
    return pairs


def test_quality_nn_sheet_pairs_samples_with_their_nearest_training_image_in_features(tmp_path, quality_data,
                                                                                     capsys):
    root, cache, (x, y), (xt, yt) = quality_data
    net, state = quality.get_classifier("mnist", root, cache, log=lambda m: None)
    f_train = quality.features_and_logits(net, state, x[:, None])[0]
    argv = ["--dataset", "mnist", "--dataroot", root, "--cache", cache, "--nn-sheet"]
    np.savez(tmp_path / "copies.npz", images=x[:40], labels=y[:40])  # samples that ARE training images
    r = quality.main([str(tmp_path / "copies.npz")] + argv + [str(tmp_path / "copies.png")])
    for i, (sample, neighbour) in enumerate(nn_sheet_pairs(tmp_path / "copies.png", 32, 28)):
        assert np.array_equal(sample, x[i]) and np.array_equal(neighbour, sample), i
    assert r["feature_copy_ratio"] < 0.05 and r["copy_ratio"] < 0.1
    np.savez(tmp_path / "new.npz", images=xt[:40], labels=yt[:40])  # test images: new by construction
    r = quality.main([str(tmp_path / "new.npz")] + argv + [str(tmp_path / "new.png")])
    f_32 = quality.features_and_logits(net, state, xt[:32, None])[0]
    nearest = ((f_32[:, None] - f_train[None]) ** 2).sum(-1).argmin(1)  # in float64, by hand
    pixel_nearest = ((xt[:32, None].astype(float) - x[None].astype(float)) ** 2).sum((-1, -2)).argmin(1)
    for i, (sample, neighbour) in enumerate(nn_sheet_pairs(tmp_path / "new.png", 32, 28)):
        assert np.array_equal(sample, xt[i]) and np.array_equal(neighbour, x[nearest[i]]), i
    assert (nearest != pixel_nearest).any()  # feature space, not pixels

    def lower_median_nearest(f):  # torch's median of an even count is the lower middle value
        d = np.sqrt(((f[:, None] - f_train[None]) ** 2).sum(-1)).min(1)
        return np.sort(d)[(len(d) - 1) // 2]

    f_test = quality.features_and_logits(net, state, xt[:, None])[0]  # all 200 (fewer than 2000: all taken)
    f_new = quality.features_and_logits(net, state, xt[:40, None])[0]
    ratio = lower_median_nearest(f_new) / lower_median_nearest(f_test)
    assert r["feature_copy_ratio"] == pytest.approx(ratio, rel=1e-3)
    assert 0.7 < r["feature_copy_ratio"] < 1.4 and 0.7 < r["copy_ratio"] < 1.4
    out = capsys.readouterr()
    assert "| feature copy ratio |" in out.out and json.loads(out.out.splitlines()[-1]) == pytest.approx(r)
    with pytest.raises(SystemExit, match=r"^error: --nn-sheet .* is in no existing folder"):
        quality.main([str(tmp_path / "new.npz")] + argv[:-3] + ["--cache", str(tmp_path / "c"), "--nn-sheet",
                                                                 str(tmp_path / "no" / "s.png")])
    assert not os.path.exists(tmp_path / "c")  # refused before anything was made


import shapes as shapes_tool  # noqa: E402  (bench/ is on sys.path above)


def test_bench_shapes_passes_the_real_shapes_and_catches_wrong_shapes_and_swirls(tmp_path):
    torch.manual_seed(0)
    x, y, _ = lapgan.make_shapes(600, 32, 1)  # held-out shapes, cropped as --levels 14,28 crops them
    x = shapes_tool.crop(x, 28)
    cache = str(tmp_path / "cache")

    def score(images, labels, name):
        path = tmp_path / f"{name}.npz"
        np.savez(path, images=images.permute(0, 2, 3, 1).numpy(), labels=labels.numpy())
        return shapes_tool.evaluate(str(path), 32, n_train=4000, epochs=4, cache=cache)["samples"]
    real = score(x, y, "real")
    assert real["asked_shape"] >= 0.9 and real["saturated"] == 0 and real["in_boxes"] == 1
    assert real["shape_spread"] < 1e-6 and real["background_spread"] < 1e-6  # one flat colour each
    assert len(os.listdir(cache)) == 1  # the classifier is kept for the next call
    assert score(x, (y + 1) % 6, "asked_another")["asked_shape"] < 0.2
    # swirls: every pixel of the shape a random colour with one channel full and one empty
    shape = (x >= 0.45 * 255).all(1, keepdim=True)
    swirl = torch.zeros_like(x)
    swirl[:, 0] = 255
    swirl = swirl[:, torch.randperm(3)]  # one channel full, the others empty, per image
    noisy = torch.where(shape, (torch.rand(x.shape) * 255).to(torch.uint8).maximum(swirl), x)
    swirls = score(noisy, y, "swirls")
    assert swirls["saturated"] > 0.05 and swirls["shape_spread"] > 0.1 and swirls["in_boxes"] < 0.95
    np.savez(tmp_path / "grey.npz", images=np.zeros((4, 28, 28, 1), np.uint8))
    with pytest.raises(SystemExit) as e:
        shapes_tool.evaluate(str(tmp_path / "grey.npz"), 32, cache=cache)
    assert "4x28x28x1 uint8 images; shapes samples are N x H x W x 3 uint8" in str(e.value)
    for name, arrays, why in [("empty", {"images": np.zeros((0, 28, 28, 3), np.uint8)}, "holds no images"),
                              ("short", {"images": np.zeros((4, 28, 28, 3), np.uint8), "labels": np.zeros(3)},
                               "holds 4 images but labels of shape (3,)")]:
        np.savez(tmp_path / f"{name}.npz", **arrays)
        with pytest.raises(SystemExit, match=re.escape(why)):
            shapes_tool.evaluate(str(tmp_path / f"{name}.npz"), 32, cache=cache)
