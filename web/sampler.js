// web/sampler.js: the generators' forward pass and the LAPGAN sampling chain, in plain JavaScript.
//
// web/export.py inlines this file into the page. The page's own script uses its noise and slerp helpers;
// a Web Worker made from the same text (a Blob URL, since a page opened from file:// may not load a
// worker file) runs the networks, so that drawing never blocks the page. The layers are
// the few that the exported generators use: linear, ReLU, tanh, convolution with zero padding,
// transposed convolution, nearest x2 enlarging (gan.py --arch upsample), a per-channel scale and shift,
// and for LAPGAN the class plane and the bilinear u(.) of the chain. Batch norm is not here: export.py
// folds it into the weights of the layer before it, or, where it follows a ReLU (lapgan.py --bn-g),
// writes it as the scale and shift. Every value is a float32, as in PyTorch.
"use strict";

// A tensor is one image (or vector) of C x H x W floats, row-major as PyTorch stores it; a vector is
// C x 1 x 1. Batches are not needed: the page draws one sample at a time.
function tensor(c, h, w, data) {
  return {c: c, h: h, w: w, data: data || new Float32Array(c * h * w)};
}

// ------------------------------------------------------------------------------------------- the layers
// Each layer reads its weights from W, the one Float32Array of every weight in the page, at the offsets
// export.py wrote into the layer's description (L.w, L.b; L.b is -1 when there is no bias).

function linear(x, L, W) {  // nn.Linear: y = A x + b, A stored out x in
  const y = tensor(L.out, 1, 1), inp = x.data, out = y.data;
  for (let o = 0; o < L.out; o++) {
    let s = L.b >= 0 ? W[L.b + o] : 0;
    const row = L.w + o * L.in;
    for (let i = 0; i < L.in; i++) s += W[row + i] * inp[i];
    out[o] = s;
  }
  return y;
}

function conv2d(x, L, W) {  // nn.Conv2d, zero padding; weights out x in x k x k
  const k = L.k, s = L.stride, p = L.pad, H = x.h, X = x.w;
  const oh = Math.floor((H + 2 * p - k) / s) + 1, ow = Math.floor((X + 2 * p - k) / s) + 1;
  const y = tensor(L.cout, oh, ow), out = y.data, inp = x.data;
  for (let co = 0; co < L.cout; co++) {
    const plane = co * oh * ow;
    out.fill(L.b >= 0 ? W[L.b + co] : 0, plane, plane + oh * ow);
    for (let ci = 0; ci < L.cin; ci++) {
      for (let ky = 0; ky < k; ky++) {
        for (let kx = 0; kx < k; kx++) {
          const w = W[L.w + ((co * L.cin + ci) * k + ky) * k + kx];
          // the output columns whose input column ox s - p + kx lies inside the image (else: padding, 0)
          const x0 = Math.max(0, Math.ceil((p - kx) / s));
          const x1 = Math.min(ow, Math.floor((X - 1 + p - kx) / s) + 1);
          for (let oy = 0; oy < oh; oy++) {
            const iy = oy * s - p + ky;
            if (iy < 0 || iy >= H) continue;
            const src = ci * H * X + iy * X - p + kx, dst = plane + oy * ow;
            for (let ox = x0; ox < x1; ox++) out[dst + ox] += w * inp[src + ox * s];
          }
        }
      }
    }
  }
  return y;
}

// nn.ConvTranspose2d: each input pixel adds its k x k stamp of weights to the output (DCGAN's G doubles its
// size this way); weights in x out x k x k
function convTranspose2d(x, L, W) {
  const k = L.k, s = L.stride, p = L.pad, H = x.h, X = x.w;
  const oh = (H - 1) * s - 2 * p + k + L.outpad, ow = (X - 1) * s - 2 * p + k + L.outpad;
  const y = tensor(L.cout, oh, ow), out = y.data, inp = x.data;
  for (let co = 0; co < L.cout; co++) {
    out.fill(L.b >= 0 ? W[L.b + co] : 0, co * oh * ow, (co + 1) * oh * ow);
  }
  for (let ci = 0; ci < L.cin; ci++) {
    for (let co = 0; co < L.cout; co++) {
      for (let ky = 0; ky < k; ky++) {
        for (let kx = 0; kx < k; kx++) {
          const w = W[L.w + ((ci * L.cout + co) * k + ky) * k + kx];
          // the input columns whose output column ix s - p + kx lies inside the output
          const x0 = Math.max(0, Math.ceil((p - kx) / s));
          const x1 = Math.min(X, Math.floor((ow - 1 + p - kx) / s) + 1);
          for (let iy = 0; iy < H; iy++) {
            const oy = iy * s - p + ky;
            if (oy < 0 || oy >= oh) continue;
            const src = ci * H * X + iy * X, dst = co * oh * ow + oy * ow - p + kx;
            for (let ix = x0; ix < x1; ix++) out[dst + ix * s] += w * inp[src + ix];
          }
        }
      }
    }
  }
  return y;
}

function map(x, f) {  // an elementwise layer
  const y = tensor(x.c, x.h, x.w);
  for (let i = 0; i < y.data.length; i++) y.data[i] = f(x.data[i]);
  return y;
}

// Batch norm after a ReLU, with its running statistics: x scale[c] + shift[c] in every channel c.
function affine(x, L, W) {
  const y = tensor(x.c, x.h, x.w), n = x.h * x.w;
  for (let c = 0; c < x.c; c++) {
    const a = W[L.scale + c], b = W[L.shift + c];
    for (let i = c * n; i < (c + 1) * n; i++) y.data[i] = x.data[i] * a + b;
  }
  return y;
}

function upNearest(x, f) {  // nn.Upsample(scale_factor=f): every pixel repeated f x f times
  const y = tensor(x.c, x.h * f, x.w * f);
  for (let c = 0; c < y.c; c++)
    for (let i = 0; i < y.h; i++)
      for (let j = 0; j < y.w; j++)
        y.data[(c * y.h + i) * y.w + j] = x.data[(c * x.h + Math.floor(i / f)) * x.w + Math.floor(j / f)];
  return y;
}

// u(.) of the pyramid (lapgan.py `up`, Torch's image.scale): bilinear with the corner pixels aligned, so
// output pixel i reads the source at i (n - 1) / (m - 1). The weights are computed as PyTorch does.
function upBilinear(x, m) {
  if (x.h === m) return x;
  const n = x.h, scale = m > 1 ? (n - 1) / (m - 1) : 0, y = tensor(x.c, m, m);
  const i0 = new Int32Array(m), i1 = new Int32Array(m), f = new Float32Array(m);
  for (let i = 0; i < m; i++) {
    const src = Math.fround(scale * i);
    i0[i] = Math.floor(src);
    i1[i] = Math.min(i0[i] + 1, n - 1);
    f[i] = src - i0[i];
  }
  for (let c = 0; c < x.c; c++) {
    const a = x.data.subarray(c * n * n, (c + 1) * n * n), o = c * m * m;
    for (let i = 0; i < m; i++) {
      for (let j = 0; j < m; j++) {
        const top = (1 - f[j]) * a[i0[i] * n + i0[j]] + f[j] * a[i0[i] * n + i1[j]];
        const bottom = (1 - f[j]) * a[i1[i] * n + i0[j]] + f[j] * a[i1[i] * n + i1[j]];
        y.data[o + i * m + j] = (1 - f[i]) * top + f[i] * bottom;
      }
    }
  }
  return y;
}

function concat(parts) {  // torch.cat along the channels; vectors are C x 1 x 1 images
  const y = tensor(parts.reduce((c, t) => c + t.c, 0), parts[0].h, parts[0].w);
  let at = 0;
  for (const t of parts) {
    y.data.set(t.data, at);
    at += t.data.length;
  }
  return y;
}

function add(a, b) {
  const y = tensor(a.c, a.h, a.w);
  for (let i = 0; i < y.data.length; i++) y.data[i] = a.data[i] + b.data[i];
  return y;
}

// One network: its layers in order, as export.py listed them.
function forward(layers, x, W) {
  for (const L of layers) {
    if (L.op === "linear") x = linear(x, L, W);
    else if (L.op === "conv") x = conv2d(x, L, W);
    else if (L.op === "convT") x = convTranspose2d(x, L, W);
    else if (L.op === "relu") x = map(x, v => (v > 0 ? v : 0));
    else if (L.op === "tanh") x = map(x, Math.tanh);
    else if (L.op === "affine") x = affine(x, L, W);
    else if (L.op === "upnearest") x = upNearest(x, L.factor);
    else if (L.op === "unflatten") x = tensor(...L.shape, x.data);  // a view: the same floats
    else throw new Error("unknown layer " + L.op);
  }
  return x;
}

// -------------------------------------------------------------------------------- the class and the input
function oneHot(y, ncls) {  // the class as the one-hot vector fed to G (Mirza & Osindero; Eyescream)
  const v = tensor(ncls, 1, 1);
  v.data[y] = 1;
  return v;
}

// LAPGAN's class plane (lapgan.py Conditioned): Linear(classes -> s s), ReLU, shaped 1 x s x s.
function classPlane(net, y, ncls, W) {
  const L = {in: ncls, out: net.size * net.size, w: net.embed.w, b: net.embed.b};
  const p = map(linear(oneHot(y, ncls), L, W), v => (v > 0 ? v : 0));
  return tensor(1, net.size, net.size, p.data);
}

// ------------------------------------------------------------------------------- Fig. 1: the sampling chain
// In the paper's notation I_0 is the full image and I_K the base: the base generator draws I_K = G_K(z_K)
// from noise, then each level draws a residual, I_k = u(I_{k+1}) + G_k(z_k, u(I_{k+1})), down to I_0.
// Here the networks come in sampling order, base first, so step i refines what step i - 1 drew.
// model: export.py's description; noise: one Float32Array per network (a z vector for the first, a noise
// plane s x s for each finer LAPGAN level); y: the class or -1; kept: levels already drawn (Sec. 4.2:
// keep a coarse image, draw the finer levels again). -> every level's image, coarsest first.
function sampleChain(model, W, noise, y, kept) {
  const ncls = model.classes ? model.classes.length : 0, levels = kept.slice();
  for (let i = levels.length; i < model.nets.length; i++) {
    const net = model.nets[i];
    if (net.input === "flat") {  // the base, G_K(z_K, y) (and DCGAN's G(z, y), the VAE/GAN decoder's)
      const z = tensor(net.nz, 1, 1, noise[i]);
      levels.push(forward(net.layers, ncls ? concat([z, oneHot(y, ncls)]) : z, W));
    } else {  // I_k = u(I_{k+1}) + G_k(z_k, class plane, u(I_{k+1}))
      const coarse = upBilinear(levels[i - 1], net.size);
      const z = tensor(1, net.size, net.size, noise[i]);
      const planes = ncls ? [z, classPlane(net, y, ncls, W), coarse] : [z, coarse];
      levels.push(add(coarse, forward(net.layers, concat(planes), W)));
    }
  }
  return levels;
}

// ---------------------------------------------------------------------------------------------- noise
// A seeded generator (mulberry32), so that ?seed=N draws the same samples on every load.
function generator(seed) {
  let a = seed >>> 0;
  return function () {
    a = (a + 0x6D2B79F5) >>> 0;
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// The inputs of one sample: LAPGAN's noise is uniform on [-1, 1] (Sec. 3), its base's z_K truncated to
// [-t, t] when the run set lapgan.py --truncate t; gan.py's and vaegan.py's z ~ N(0, I) (Box-Muller).
function drawNoise(model, rand) {
  return model.nets.map(net => {
    const v = new Float32Array(net.input === "flat" ? net.nz : net.size * net.size);
    const t = net.input === "flat" ? model.truncate : 1;  // U[-1, 1] truncated to [-t, t] is t U[-1, 1]
    for (let i = 0; i < v.length; i++) {
      v[i] = model.noise === "uniform" ? (rand() * 2 - 1) * t
        : Math.sqrt(-2 * Math.log(1 - rand())) * Math.cos(2 * Math.PI * rand());
    }
    return v;
  });
}

// Spherical interpolation (White 2016), as gan.py's and vaegan.py's slerp: the direction turns along the
// great circle, the norm changes linearly. Gaussian latents live near a sphere; a straight line would
// pass through its unlikely interior.
function slerp(a, b, t) {
  const norm = v => Math.sqrt(v.reduce((s, x) => s + x * x, 0));
  const na = norm(a), nb = norm(b), ua = a.map(x => x / na), ub = b.map(x => x / nb);
  const cos = ua.reduce((s, x, i) => s + x * ub[i], 0), v = ub.map((x, i) => x - cos * ua[i]);
  const sin = norm(v), omega = Math.atan2(sin, cos), r = na + (nb - na) * t;
  if (sin < 1e-5) return a.map((x, i) => x + (b[i] - x) * t);  // (nearly) parallel: the straight line
  return ua.map((x, i) => (x * Math.cos(omega * t) + v[i] / sin * Math.sin(omega * t)) * r);
}

// ------------------------------------------------------------------------------------------ the weights
// The page holds them as base64 of little-endian float16 or float32; float16 is widened here.
function decodeWeights(base64, dtype) {
  const text = atob(base64), bytes = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
  if (dtype === "float32") return new Float32Array(bytes.buffer);
  const half = new Uint16Array(bytes.buffer), out = new Float32Array(half.length);
  for (let i = 0; i < half.length; i++) {
    const h = half[i], sign = h & 0x8000 ? -1 : 1, e = (h >> 10) & 31, m = h & 1023;
    if (e === 0) out[i] = sign * m * Math.pow(2, -24);  // subnormal
    else if (e === 31) out[i] = m ? NaN : sign * Infinity;
    else out[i] = sign * (1 + m / 1024) * Math.pow(2, e - 15);
  }
  return out;
}

// --------------------------------------------------------------------------------------- the worker side
// Messages: {model, weights} once; then {id, noise, y, kept} per sample, answered with {id, levels}.
if (typeof WorkerGlobalScope !== "undefined") {  // in the worker (the page itself only borrows functions)
  let model = null, W = null;
  onmessage = function (e) {
    if (e.data.model) {
      model = e.data.model;
      W = e.data.weights;
      return;
    }
    const job = e.data, t0 = performance.now();
    const kept = job.kept.map(k => tensor(k.c, k.h, k.w, k.data));
    const levels = sampleChain(model, W, job.noise, job.y, kept);
    postMessage({id: job.id, levels: levels, ms: performance.now() - t0});
  };
}
