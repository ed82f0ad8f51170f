"""Tests for gan.py, lapgan.py and vaegan.py: CPU only, no network, seconds each.

    python -m pytest -q test_gans.py
"""
import csv, gzip, io, math, os, pickle, socket, struct, subprocess, sys, tarfile
import numpy as np
import pytest
import torch
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import gan  # noqa: E402


# ----------------------------------------------------------------------------- shared helpers
def write_cifar_tarball(root, n_per_batch=6, seed=0):
    """A CIFAR-10 python tarball in the official layout: pickled dicts with bytes keys."""
    rng = np.random.default_rng(seed)
    batches = {}
    with tarfile.open(os.path.join(root, "cifar-10-python.tar.gz"), "w:gz") as tar:
        def add(name, obj):
            data = pickle.dumps(obj, protocol=2)
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


def test_slerp_antipodal_and_parallel():
    a = torch.randn(20)
    p = gan.slerp(a, -a, torch.linspace(0, 1, 5))
    assert torch.isfinite(p).all()
    assert torch.allclose(p[-1], -a, atol=1e-5) and torch.allclose(p.norm(dim=1), a.norm().expand(5), rtol=1e-5)
    assert abs(p[2] @ a) < 1e-3 * a.norm() ** 2  # halfway round: orthogonal to both ends
    assert torch.allclose(gan.slerp(a, a, torch.linspace(0, 1, 3)), a.expand(3, -1), atol=1e-6)


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
def test_cifar10_reader_official_tarball(tmp_path):
    batches = write_cifar_tarball(tmp_path)
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
    with pytest.raises(SystemExit, match="NaN"):
        gan.main(TINY + ["--epochs", "2", "--outf", outf, "--resume"])
    assert open(os.path.join(outf, "ckpt.pt"), "rb").read() == before


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


def test_bench_prints_a_table_line(capsys):
    gan.main(["--dataset", "shapes", "--bench", "2", "--batch-size", "8", "--ngf", "8", "--ndf", "8"])
    out = capsys.readouterr().out
    assert "img/s" in out and "| gan.py dcgan 32x32 | batch 8 | fp32 | cpu |" in out


def _ddp_worker(rank, port, outf, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    writes = []
    for name in ("save_checkpoint", "append_log", "save_grid", "plot_curves", "draw_dhist"):
        real = getattr(gan, name)
        setattr(gan, name, lambda *a, _real=real, _name=name, **k: (writes.append(_name), _real(*a, **k))[1])
    G, D = gan.main(TINY + ["--epochs", "1", "--balance", "margin", "--outf", outf])
    torch.save({"G": G.state_dict(), "D": D.state_dict(), "writes": writes}, f"{result}{rank}.pt")


def test_torchrun_style_data_parallel_two_ranks(tmp_path):
    outf, result = str(tmp_path / "ddp"), str(tmp_path / "rank")
    torch.multiprocessing.spawn(_ddp_worker, args=(free_port(), outf, result), nprocs=2)
    r0, r1 = (torch.load(f"{result}{r}.pt", weights_only=True) for r in (0, 1))
    assert r1["writes"] == [] and "save_checkpoint" in r0["writes"]
    for net in ("G", "D"):
        assert all(torch.equal(r0[net][k], r1[net][k]) for k in r0[net]), net
    assert read_log(os.path.join(outf, "log.csv"))[-1]["step"] == "4"  # 128 images / (2 ranks x 16)
