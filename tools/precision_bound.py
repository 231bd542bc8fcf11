"""Lower-bound probe for the fused precision pass (issue 28): what a hand-written AVX2 loop reaches on this CPU.

AdamW on the four GPT-2 blocks' shapes (28.4M params), one thread, one call per tensor like the fused pass, timed
interleaved against torch's fused fp32 AdamW on the same tensors. The kernels are benchmark-only (AVX2 + FMA
intrinsics, x86-64; not shipped): fp32 AdamW (a sanity row: it should match torch's fused kernel), fp32 params with
bf16 moments, bf16 params + Kahan (bf16 moments and compensation, as `bf16 + Kahan`), bf16 params + stochastic
rounding (fastopts' int32 counter hash), and fp32 params with int8 moments (blockwise absmax, bitsandbytes' dynamic
map: decode by an 8-lane gather from the 256-entry map, encode by the same top-bits lookup table + one edge compare
as `fastopts.precision._nearest_code`, both gathers `vpgatherdd`), and int8 moments with a linear map (no table, no
gathers: the floor of any 8-bit state on this CPU, not fastopts' map).

    PYTHONPATH=$PWD .venv/bin/python tools/precision_bound.py [--rounds 5]
"""
import argparse, statistics, time
import torch
from torch.utils.cpp_extension import load_inline

SRC = r"""
#include <torch/extension.h>
#include <immintrin.h>
#include <cstdint>
#include <cmath>

struct H { float lr, b1, b2, eps, wd, bc1, bc2s; };   // bc2s = sqrt(1 - b2^t)
static H hyp(double lr, double b1, double b2, double eps, double wd, int64_t t) {
  return H{(float)lr, (float)b1, (float)b2, (float)eps, (float)wd, (float)(1 - std::pow(b1, t)), (float)std::sqrt(1 - std::pow(b2, t))};
}
// bf16 <-> fp32 on AVX2: widen is a 16-bit shift; narrow is round-to-nearest-even by integer ops
static inline __m256 ld_bf16(const uint16_t* p) {
  __m128i h = _mm_loadu_si128((const __m128i*)p);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
static inline __m256i rne_bits(__m256 x) {   // fp32 bits rounded to nearest even in the top 16 (NaN ignored: a probe)
  __m256i b = _mm256_castps_si256(x);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(b, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
}
static inline void st_bf16_from_hi(uint16_t* p, __m256i hi16) {   // 8 lanes of 16-bit values in the low halves
  __m128i lo = _mm256_castsi256_si128(hi16), up = _mm256_extracti128_si256(hi16, 1);
  _mm_storeu_si128((__m128i*)p, _mm_packus_epi32(lo, up));
}
static inline void st_bf16(uint16_t* p, __m256 x) { st_bf16_from_hi(p, rne_bits(x)); }

// one AdamW element step on registers: returns the new fp32 param
static inline __m256 adamw(__m256 p, __m256 g, __m256& m, __m256& v, const H& h) {
  const __m256 b1 = _mm256_set1_ps(h.b1), b2 = _mm256_set1_ps(h.b2), c1 = _mm256_set1_ps(1 - h.b1), c2 = _mm256_set1_ps(1 - h.b2);
  m = _mm256_fmadd_ps(b1, m, _mm256_mul_ps(c1, g));
  v = _mm256_fmadd_ps(b2, v, _mm256_mul_ps(c2, _mm256_mul_ps(g, g)));
  __m256 den = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(v), _mm256_set1_ps(h.bc2s)), _mm256_set1_ps(h.eps));
  p = _mm256_mul_ps(p, _mm256_set1_ps(1 - h.lr * h.wd));
  return _mm256_fnmadd_ps(_mm256_set1_ps(h.lr / h.bc1), _mm256_div_ps(m, den), p);
}

void adamw_f32(torch::Tensor p, torch::Tensor g, torch::Tensor m, torch::Tensor v, double lr, double b1, double b2, double eps, double wd, int64_t t) {
  H h = hyp(lr, b1, b2, eps, wd, t); int64_t n = p.numel();
  float *P = p.data_ptr<float>(), *G = g.data_ptr<float>(), *M = m.data_ptr<float>(), *V = v.data_ptr<float>();
  for (int64_t i = 0; i < n; i += 8) {   // shapes are multiples of 8
    __m256 mm = _mm256_loadu_ps(M + i), vv = _mm256_loadu_ps(V + i);
    __m256 pp = adamw(_mm256_loadu_ps(P + i), _mm256_loadu_ps(G + i), mm, vv, h);
    _mm256_storeu_ps(P + i, pp); _mm256_storeu_ps(M + i, mm); _mm256_storeu_ps(V + i, vv);
  }
}

void adamw_bf16_state(torch::Tensor p, torch::Tensor g, torch::Tensor m, torch::Tensor v, double lr, double b1, double b2, double eps, double wd, int64_t t) {
  H h = hyp(lr, b1, b2, eps, wd, t); int64_t n = p.numel();
  float *P = p.data_ptr<float>(), *G = g.data_ptr<float>();
  uint16_t *M = (uint16_t*)m.data_ptr(), *V = (uint16_t*)v.data_ptr();
  for (int64_t i = 0; i < n; i += 8) {
    __m256 mm = ld_bf16(M + i), vv = ld_bf16(V + i);
    __m256 pp = adamw(_mm256_loadu_ps(P + i), _mm256_loadu_ps(G + i), mm, vv, h);
    _mm256_storeu_ps(P + i, pp); st_bf16(M + i, mm); st_bf16(V + i, vv);
  }
}

void adamw_bf16_kahan(torch::Tensor p, torch::Tensor g, torch::Tensor m, torch::Tensor v, torch::Tensor c, double lr, double b1, double b2, double eps, double wd, int64_t t) {
  H h = hyp(lr, b1, b2, eps, wd, t); int64_t n = p.numel();
  uint16_t *P = (uint16_t*)p.data_ptr(), *G = (uint16_t*)g.data_ptr(), *M = (uint16_t*)m.data_ptr(), *V = (uint16_t*)v.data_ptr(), *C = (uint16_t*)c.data_ptr();
  for (int64_t i = 0; i < n; i += 8) {
    __m256 mm = ld_bf16(M + i), vv = ld_bf16(V + i), cc = ld_bf16(C + i);
    __m256 w = adamw(ld_bf16(P + i), ld_bf16(G + i), mm, vv, h);
    __m256 tt = _mm256_add_ps(w, cc);
    __m256i pb = rne_bits(tt);
    __m256 pr = _mm256_castsi256_ps(_mm256_slli_epi32(pb, 16));
    st_bf16_from_hi(P + i, pb); st_bf16(C + i, _mm256_sub_ps(tt, pr)); st_bf16(M + i, mm); st_bf16(V + i, vv);
  }
}

static inline __m256i hash32(__m256i x) {   // fastopts.precision._bits32's rounds, 8 lanes
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16)); x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x7FEB352D));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15)); x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x5BD1E995));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 13)); x = _mm256_mullo_epi32(x, _mm256_set1_epi32(0x27D4EB2D));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

void adamw_bf16_sr(torch::Tensor p, torch::Tensor g, torch::Tensor m, torch::Tensor v, int64_t key, double lr, double b1, double b2, double eps, double wd, int64_t t) {
  H h = hyp(lr, b1, b2, eps, wd, t); int64_t n = p.numel();
  uint16_t *P = (uint16_t*)p.data_ptr(), *G = (uint16_t*)g.data_ptr(), *M = (uint16_t*)m.data_ptr(), *V = (uint16_t*)v.data_ptr();
  const __m256i step8 = _mm256_set1_epi32(8 * 0x61C88647), k = _mm256_set1_epi32((int32_t)key);
  __m256i idx = _mm256_add_epi32(_mm256_mullo_epi32(_mm256_setr_epi32(0,1,2,3,4,5,6,7), _mm256_set1_epi32(0x61C88647)), k);
  for (int64_t i = 0; i < n; i += 8, idx = _mm256_add_epi32(idx, step8)) {
    __m256 mm = ld_bf16(M + i), vv = ld_bf16(V + i);
    __m256 w = adamw(ld_bf16(P + i), ld_bf16(G + i), mm, vv, h);
    __m256i noise = _mm256_srli_epi32(hash32(idx), 16);
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_castps_si256(w), noise), 16);
    st_bf16_from_hi(P + i, r); st_bf16(M + i, mm); st_bf16(V + i, vv);
  }
}

// int8 moments: 256-element blocks, codes index the map directly (0..255), absmax per block
static inline __m256 dec8(const uint8_t* c, const float* map, __m256 s) {
  __m256i ix = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)c));
  return _mm256_mul_ps(_mm256_i32gather_ps(map, ix, 4), s);
}
static inline __m256i enc8(__m256 x, const int32_t* lut, const float* edges) {   // x in [-1, 1]: nearest code
  __m256i b = _mm256_castps_si256(x);
  __m256i key = _mm256_xor_si256(b, _mm256_srli_epi32(_mm256_srai_epi32(b, 31), 1));
  key = _mm256_add_epi32(_mm256_srai_epi32(key, 13), _mm256_set1_epi32(1 << 18));
  __m256i cand = _mm256_i32gather_epi32(lut, key, 4);
  __m256 e = _mm256_i32gather_ps(edges, cand, 4);
  return _mm256_sub_epi32(cand, _mm256_castps_si256(_mm256_cmp_ps(e, x, _CMP_LT_OQ)));   // +1 past the edge
}
static inline void st8(uint8_t* c, __m256i ix) {
  __m128i lo = _mm256_castsi256_si128(ix), up = _mm256_extracti128_si256(ix, 1);
  __m128i w = _mm_packus_epi32(lo, up);
  _mm_storel_epi64((__m128i*)c, _mm_packus_epi16(w, w));
}

// int8 moments with a map that needs no table (linear: v = code / 127 * absmax, sqrt-companded for the second
// moment): what any 8-bit state costs once the codes are arithmetic, the floor under the dynamic map's gathers
void adamw_int8_linear(torch::Tensor p, torch::Tensor g, torch::Tensor mc, torch::Tensor ma, torch::Tensor vc, torch::Tensor va,
                       double lr, double b1, double b2, double eps, double wd, int64_t t) {
  H h = hyp(lr, b1, b2, eps, wd, t); int64_t n = p.numel();
  float *P = p.data_ptr<float>(), *G = g.data_ptr<float>(), *MA = ma.data_ptr<float>(), *VA = va.data_ptr<float>();
  int8_t *MC = (int8_t*)mc.data_ptr(); uint8_t *VC = (uint8_t*)vc.data_ptr();
  alignas(32) float mb[256], vb[256];
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t b0 = 0; b0 < n; b0 += 256) {
    __m256 sm = _mm256_set1_ps(MA[b0 / 256] / 127.f), sv = _mm256_set1_ps(std::sqrt(VA[b0 / 256]) / 255.f);
    __m256 am = _mm256_setzero_ps(), av = _mm256_setzero_ps();
    for (int j = 0; j < 256; j += 8) {
      int64_t i = b0 + j;
      __m256 mm = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(MC + i)))), sm);
      __m256 sq = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(VC + i)))), sv);
      __m256 vv = _mm256_mul_ps(sq, sq);
      __m256 pp = adamw(_mm256_loadu_ps(P + i), _mm256_loadu_ps(G + i), mm, vv, h);
      _mm256_storeu_ps(P + i, pp); _mm256_store_ps(mb + j, mm); _mm256_store_ps(vb + j, vv);
      am = _mm256_max_ps(am, _mm256_and_ps(mm, absmask)); av = _mm256_max_ps(av, vv);
    }
    float a[8], c[8], xm = 0, xv = 0;
    _mm256_storeu_ps(a, am); _mm256_storeu_ps(c, av);
    for (int k = 0; k < 8; k++) { xm = std::max(xm, a[k]); xv = std::max(xv, c[k]); }
    MA[b0 / 256] = xm; VA[b0 / 256] = xv;
    __m256 im = _mm256_set1_ps(127.f / (xm > 0 ? xm : 1.f)), iv = _mm256_set1_ps(255.f / std::sqrt(xv > 0 ? xv : 1.f));
    for (int j = 0; j < 256; j += 8) {
      __m256i qm = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_load_ps(mb + j), im));
      __m256i qv = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_sqrt_ps(_mm256_load_ps(vb + j)), iv));
      __m128i wm = _mm_packs_epi32(_mm256_castsi256_si128(qm), _mm256_extracti128_si256(qm, 1));
      __m128i wv = _mm_packus_epi32(_mm256_castsi256_si128(qv), _mm256_extracti128_si256(qv, 1));
      _mm_storel_epi64((__m128i*)(MC + b0 + j), _mm_packs_epi16(wm, wm));
      _mm_storel_epi64((__m128i*)(VC + b0 + j), _mm_packus_epi16(wv, wv));
    }
  }
}

void adamw_int8_state(torch::Tensor p, torch::Tensor g, torch::Tensor mc, torch::Tensor ma, torch::Tensor vc, torch::Tensor va,
                      torch::Tensor smap, torch::Tensor slut, torch::Tensor sedge, torch::Tensor umap, torch::Tensor ulut, torch::Tensor uedge,
                      double lr, double b1, double b2, double eps, double wd, int64_t t) {
  H h = hyp(lr, b1, b2, eps, wd, t); int64_t n = p.numel();
  float *P = p.data_ptr<float>(), *G = g.data_ptr<float>(), *MA = ma.data_ptr<float>(), *VA = va.data_ptr<float>();
  uint8_t *MC = (uint8_t*)mc.data_ptr(), *VC = (uint8_t*)vc.data_ptr();
  const float *SM = smap.data_ptr<float>(), *UM = umap.data_ptr<float>(), *SE = sedge.data_ptr<float>(), *UE = uedge.data_ptr<float>();
  const int32_t *SL = slut.data_ptr<int32_t>(), *UL = ulut.data_ptr<int32_t>();
  alignas(32) float mb[256], vb[256];
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t b0 = 0; b0 < n; b0 += 256) {   // shapes are whole blocks
    __m256 sm = _mm256_set1_ps(MA[b0 / 256]), sv = _mm256_set1_ps(VA[b0 / 256]);
    __m256 am = _mm256_setzero_ps(), av = _mm256_setzero_ps();
    for (int j = 0; j < 256; j += 8) {
      int64_t i = b0 + j;
      __m256 mm = dec8(MC + i, SM, sm), vv = dec8(VC + i, UM, sv);
      __m256 pp = adamw(_mm256_loadu_ps(P + i), _mm256_loadu_ps(G + i), mm, vv, h);
      _mm256_storeu_ps(P + i, pp); _mm256_store_ps(mb + j, mm); _mm256_store_ps(vb + j, vv);
      am = _mm256_max_ps(am, _mm256_and_ps(mm, absmask)); av = _mm256_max_ps(av, _mm256_and_ps(vv, absmask));
    }
    float a[8], c[8], xm = 0, xv = 0;
    _mm256_storeu_ps(a, am); _mm256_storeu_ps(c, av);
    for (int k = 0; k < 8; k++) { xm = std::max(xm, a[k]); xv = std::max(xv, c[k]); }
    MA[b0 / 256] = xm; VA[b0 / 256] = xv;
    __m256 im = _mm256_set1_ps(xm > 0 ? xm : 1.f), iv = _mm256_set1_ps(xv > 0 ? xv : 1.f);
    for (int j = 0; j < 256; j += 8) {
      st8(MC + b0 + j, enc8(_mm256_div_ps(_mm256_load_ps(mb + j), im), SL, SE));
      st8(VC + b0 + j, enc8(_mm256_div_ps(_mm256_load_ps(vb + j), iv), UL, UE));
    }
  }
}
"""

FUNCS = ['adamw_f32', 'adamw_bf16_state', 'adamw_bf16_kahan', 'adamw_bf16_sr', 'adamw_int8_state', 'adamw_int8_linear']
LR, B1, B2, EPS, WD = 1e-3, 0.9, 0.999, 1e-8, 0.01

def build():
    return load_inline('fastopts_precision_bound', cpp_sources=[SRC], functions=FUNCS, extra_cflags=['-O3', '-mavx2', '-mfma'], verbose=False)

def _params(dtype):
    from fastopts.bench.step_rules import make_params
    ps = make_params('gpt2')
    return [p.detach().to(dtype) for p in ps], [p.grad.to(dtype) for p in ps]

def contenders(ext) -> dict:
    "name -> step() closure over its own tensors (GPT-2 shapes)."
    from fastopts.precision import _qmap
    out, t = {}, [0]
    ps, gs = _params(torch.float32)
    tp = [torch.nn.Parameter(p.clone()) for p in ps]
    for q, g in zip(tp, gs): q.grad = g.clone()
    opt = torch.optim.AdamW(tp, lr=LR, betas=(B1, B2), eps=EPS, weight_decay=WD, fused=True)
    out['torch fused AdamW (fp32)'] = opt.step
    def kernel(name, dtype, sdtype, extra=0):
        ps, gs = _params(dtype)
        st = [[torch.zeros_like(p, dtype=sdtype) for _ in range(2 + extra)] for p in ps]
        f, k = getattr(ext, name), [0]
        def step():
            k[0] += 1
            for p, g, s in zip(ps, gs, st):
                if name == 'adamw_bf16_sr': f(p, g, *s, k[0] * 0x9E3779B9 % 2**31, LR, B1, B2, EPS, WD, k[0])
                else: f(p, g, *s, LR, B1, B2, EPS, WD, k[0])
        return step
    out['probe fp32'] = kernel('adamw_f32', torch.float32, torch.float32)
    out['probe fp32, bf16 state'] = kernel('adamw_bf16_state', torch.float32, torch.bfloat16)
    out['probe bf16 + Kahan'] = kernel('adamw_bf16_kahan', torch.bfloat16, torch.bfloat16, extra=1)
    out['probe bf16 + stochastic rounding'] = kernel('adamw_bf16_sr', torch.bfloat16, torch.bfloat16)
    # int8: tensors under 4096 elements keep fp32 moments, as fastopts (QUANT_MIN_NUMEL)
    ps, gs = _params(torch.float32)
    (sm, se, sl), (um, ue, ul) = _qmap(8, True, 'cpu'), _qmap(8, False, 'cpu')
    st = []
    for p in ps:
        if p.numel() >= 4096:
            nb = p.numel() // 256
            st.append((torch.full((p.numel(),), 127, dtype=torch.uint8), torch.zeros(nb), torch.zeros(p.numel(), dtype=torch.uint8), torch.zeros(nb)))
        else: st.append((torch.zeros_like(p), torch.zeros_like(p)))
    def int8_step():
        t[0] += 1
        for p, g, s in zip(ps, gs, st):
            if len(s) == 4: ext.adamw_int8_state(p, g, *s, sm, sl, se.contiguous(), um, ul, ue.contiguous(), LR, B1, B2, EPS, WD, t[0])
            else: ext.adamw_f32(p, g, *s, LR, B1, B2, EPS, WD, t[0])
    out['probe fp32, int8 state'] = int8_step
    def linear_step():
        for p, g, s in zip(ps, gs, st):
            if len(s) == 4: ext.adamw_int8_linear(p, g, s[0].view(torch.int8), s[1], s[2], s[3], LR, B1, B2, EPS, WD, t[0])
            else: ext.adamw_f32(p, g, *s, LR, B1, B2, EPS, WD, t[0])
    out['probe fp32, int8 state, linear map (no gathers)'] = linear_step
    return out

def main(rounds:int=5):
    torch.set_num_threads(1)
    ext = build()
    steps = contenders(ext)
    for f in steps.values(): f(); f()   # warm-up (first touch, state)
    times = {k: [] for k in steps}
    for _ in range(rounds):   # interleaved: each round times every contender once
        for k, f in steps.items():
            t0 = time.perf_counter(); f(); times[k].append(time.perf_counter() - t0)
    ref = statistics.median(times['torch fused AdamW (fp32)'])
    print(f'| kernel | step ms (median of {rounds}) | vs torch fused fp32 |\n|---|---:|---:|')
    for k, ts in times.items(): print(f'| {k} | {1000 * statistics.median(ts):.1f} | {statistics.median(ts) / ref:.2f} |')

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--rounds', type=int, default=5)
    main(ap.parse_args().rounds)
