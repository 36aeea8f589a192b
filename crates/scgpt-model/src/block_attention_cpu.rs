//! The blockwise training attention on Flex (f32) as one fused kernel per (cell, head): the
//! generic path of `block_attention.rs` runs each block as a dozen separate tensor operations
//! over `[B, H, rows, Lk]`; here each task keeps one block's scores in a per-thread buffer,
//! uses `gemm` for the four products and fuses bias, softmax, dropout and the backward's
//! elementwise terms into single passes. Same mathematics, same dropout mask (`mask_draw`), same
//! saved state (output and log-sum-exp); tests compare both paths with the explicit attention.

use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::TensorData;
use burn_flex::FlexTensor;
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use crate::block_attention::{hash32_row, keep_threshold, mask_column, BlockSpec};

static FUSED: AtomicBool = AtomicBool::new(true);

/// Whether Flex takes the fused kernel (default) or the generic tensor-operation path, which
/// GPU backends run; tests switch it to check both on the CPU.
pub fn set_fused(on: bool) {
    FUSED.store(on, Ordering::SeqCst);
}

pub(crate) fn fused() -> bool {
    FUSED.load(Ordering::SeqCst)
}

fn host(t: FlexTensor) -> (Vec<usize>, Vec<f32>) {
    let data = t.into_data();
    let shape = data.shape().to_vec();
    (shape, data.convert::<f32>().try_into_vec::<f32>().expect("f32 data"))
}

fn flex(values: Vec<f32>, shape: [usize; 4]) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// The tensors of one call on the host, row-major.
pub(crate) struct HostInputs {
    b: usize,
    h: usize,
    lq: usize,
    lk: usize,
    dh: usize,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    k_self: Vec<f32>,
    v_self: Vec<f32>,
    key_bias: Vec<f32>,
    self_bias: Vec<f32>,
}

impl HostInputs {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        q: FlexTensor,
        k: FlexTensor,
        v: FlexTensor,
        k_self: FlexTensor,
        v_self: FlexTensor,
        key_bias: FlexTensor,
        self_bias: FlexTensor,
    ) -> Self {
        let (qs, q) = host(q);
        let (ks, k) = host(k);
        Self {
            b: qs[0],
            h: qs[1],
            lq: qs[2],
            lk: ks[2],
            dh: qs[3],
            q,
            k,
            v: host(v).1,
            k_self: host(k_self).1,
            v_self: host(v_self).1,
            key_bias: host(key_bias).1,
            self_bias: host(self_bias).1,
        }
    }
}

/// One (cell, head) task's views.
struct Head<'a> {
    x: &'a HostInputs,
    spec: &'a BlockSpec,
    bh: usize,
}

impl Head<'_> {
    fn cell(&self) -> usize {
        self.bh / self.x.h
    }
    fn q(&self) -> &[f32] {
        let n = self.x.lq * self.x.dh;
        &self.x.q[self.bh * n..(self.bh + 1) * n]
    }
    fn k(&self) -> &[f32] {
        let n = self.x.lk * self.x.dh;
        &self.x.k[self.bh * n..(self.bh + 1) * n]
    }
    fn v(&self) -> &[f32] {
        let n = self.x.lk * self.x.dh;
        &self.x.v[self.bh * n..(self.bh + 1) * n]
    }
    /// Row `i` of this head in a `[B, H, Lq, dh]` buffer (q, the own keys and values).
    fn own_row(&self, i: usize) -> std::ops::Range<usize> {
        let dh = self.x.dh;
        let at = (self.bh * self.x.lq + i) * dh;
        at..at + dh
    }
    /// Columns of the score rows: the keys, then the own key.
    fn cols(&self) -> usize {
        self.x.lk + self.spec.has_self as usize
    }

    /// Scores of rows `r0..r0 + n` into `s` (`n × cols`), scaled and biased.
    fn scores(&self, r0: usize, n: usize, s: &mut [f32]) {
        let (lk, dh, cols) = (self.x.lk, self.x.dh, self.cols());
        let q = self.q()[r0 * dh..].as_ptr();
        let k = self.k().as_ptr();
        // SAFETY: q holds n rows of dh from r0, k holds lk rows of dh, s holds n rows of cols.
        unsafe {
            gemm(
                n,
                lk,
                dh,
                s.as_mut_ptr(),
                1,
                cols as isize,
                false,
                q,
                1,
                dh as isize,
                k,
                dh as isize,
                1,
                0.0,
                self.spec.scale as f32,
                false,
                false,
                false,
                Parallelism::None,
            );
        }
        let kb = &self.x.key_bias[self.cell() * lk..(self.cell() + 1) * lk];
        for (i, row) in s.chunks_exact_mut(cols).take(n).enumerate() {
            for (x, b) in row[..lk].iter_mut().zip(kb) {
                *x += b;
            }
            if self.spec.has_self {
                let r = self.own_row(r0 + i);
                let dot: f32 = self.x.q[r.clone()].iter().zip(&self.x.k_self[r]).map(|(a, b)| a * b).sum();
                row[lk] = dot * self.spec.scale as f32 + self.x.self_bias[self.cell() * self.x.lq + r0 + i];
            }
        }
    }

    /// Multiplies row `i`'s weights by its dropout mask (`1/keep` or 0).
    fn drop_row(&self, i: usize, row: &mut [f32]) {
        if self.spec.dropout <= 0.0 {
            return;
        }
        let keep = 1.0 - self.spec.dropout;
        let threshold = keep_threshold(keep);
        let scale = (1.0 / keep) as f32;
        let a = hash32_row(self.spec.seed, (self.bh * self.x.lq + i) as u64);
        for (j, w) in row.iter_mut().enumerate() {
            *w *= if mask_column(self.spec.seed, a, j as u64) < threshold { scale } else { 0.0 };
        }
    }
}

/// Forward: the output `[B, H, Lq, dh]` and the log-sum-exp `[B, H, Lq, 1]`.
pub(crate) fn forward(x: &HostInputs, spec: &BlockSpec) -> (FlexTensor, FlexTensor) {
    let (lq, dh) = (x.lq, x.dh);
    let rows = spec.block_rows.max(1).min(lq.max(1));
    let mut out = vec![0f32; x.b * x.h * lq * dh];
    let mut lse = vec![0f32; x.b * x.h * lq];
    out.par_chunks_mut(lq * dh).zip(lse.par_chunks_mut(lq)).enumerate().for_each_init(
        || vec![0f32; rows * (x.lk + 1)],
        |s, (bh, (o, l))| {
            let head = Head { x, spec, bh };
            let cols = head.cols();
            for r0 in (0..lq).step_by(rows) {
                let n = rows.min(lq - r0);
                head.scores(r0, n, s);
                for i in 0..n {
                    let row = &mut s[i * cols..(i + 1) * cols];
                    l[r0 + i] = crate::cpu_attention::softmax_row_lse(row);
                    head.drop_row(r0 + i, row);
                }
                // O = P·V over the keys, then the own value.
                // SAFETY: s holds n rows of cols, v holds lk rows of dh, o holds lq rows of dh.
                unsafe {
                    gemm(
                        n,
                        dh,
                        x.lk,
                        o[r0 * dh..].as_mut_ptr(),
                        1,
                        dh as isize,
                        false,
                        s.as_ptr(),
                        1,
                        cols as isize,
                        head.v().as_ptr(),
                        1,
                        dh as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
                if spec.has_self {
                    for i in 0..n {
                        let w = s[i * cols + x.lk];
                        let r = head.own_row(r0 + i);
                        for (a, b) in o[(r0 + i) * dh..(r0 + i + 1) * dh].iter_mut().zip(&x.v_self[r]) {
                            *a += w * b;
                        }
                    }
                }
            }
        },
    );
    (flex(out, [x.b, x.h, lq, dh]), flex(lse, [x.b, x.h, lq, 1]))
}

/// Backward from the saved output and log-sum-exp: (dq, dk, dv, dk_self, dv_self), the last two
/// `[1, 1, 1, 1]` zeros without an own key.
pub(crate) fn backward(x: &HostInputs, spec: &BlockSpec, out: FlexTensor, lse: FlexTensor, grad: FlexTensor) -> [FlexTensor; 5] {
    let (lq, lk, dh) = (x.lq, x.lk, x.dh);
    let (_, out) = host(out);
    let (_, lse) = host(lse);
    let (_, grad) = host(grad);
    let rows = spec.block_rows.max(1).min(lq.max(1));
    let bhs = x.b * x.h;
    let own = if spec.has_self { lq * dh } else { 0 };
    let mut dq = vec![0f32; bhs * lq * dh];
    let mut dk = vec![0f32; bhs * lk * dh];
    let mut dv = vec![0f32; bhs * lk * dh];
    let mut dks = vec![0f32; bhs * own];
    let mut dvs = vec![0f32; bhs * own];
    let own_chunk = own.max(1);
    let mut dks_chunks: Vec<&mut [f32]> =
        if own > 0 { dks.chunks_mut(own_chunk).collect() } else { (0..bhs).map(|_| &mut [][..]).collect() };
    let mut dvs_chunks: Vec<&mut [f32]> =
        if own > 0 { dvs.chunks_mut(own_chunk).collect() } else { (0..bhs).map(|_| &mut [][..]).collect() };
    dq.par_chunks_mut(lq * dh)
        .zip(dk.par_chunks_mut(lk * dh))
        .zip(dv.par_chunks_mut(lk * dh))
        .zip(dks_chunks.par_iter_mut())
        .zip(dvs_chunks.par_iter_mut())
        .enumerate()
        .for_each_init(
            || (vec![0f32; rows * (lk + 1)], vec![0f32; rows * (lk + 1)]),
            |(p, dp), (bh, ((((dq, dk), dv), dks), dvs))| {
                let head = Head { x, spec, bh };
                let cols = head.cols();
                let base = bh * lq;
                for r0 in (0..lq).step_by(rows) {
                    let n = rows.min(lq - r0);
                    // P from the saved log-sum-exp; then the dropped weights in dp.
                    head.scores(r0, n, p);
                    for i in 0..n {
                        let l = lse[base + r0 + i];
                        let (prow, drow) = (&mut p[i * cols..(i + 1) * cols], &mut dp[i * cols..(i + 1) * cols]);
                        crate::cpu_attention::exp_from_lse(prow, drow, l);
                        head.drop_row(r0 + i, drow);
                    }
                    let g = &grad[(base + r0) * dh..(base + r0 + n) * dh];
                    // SAFETY: dv holds lk rows of dh, dp n rows of `cols` ≥ lk, g n rows of dh;
                    // the buffers are this task's own.
                    unsafe {
                        // dV += (P∘M)ᵀ · dO
                        gemm(
                            lk,
                            dh,
                            n,
                            dv.as_mut_ptr(),
                            1,
                            dh as isize,
                            true,
                            dp.as_ptr(),
                            cols as isize,
                            1,
                            g.as_ptr(),
                            1,
                            dh as isize,
                            1.0,
                            1.0,
                            false,
                            false,
                            false,
                            Parallelism::None,
                        );
                    }
                    if spec.has_self {
                        for i in 0..n {
                            let w = dp[i * cols + lk];
                            for (a, b) in dvs[(r0 + i) * dh..(r0 + i + 1) * dh].iter_mut().zip(&g[i * dh..(i + 1) * dh]) {
                                *a = w * b;
                            }
                        }
                    }
                    // d(dropped weights) = dO · Vᵀ (and the own value's column), into dp.
                    // SAFETY: dp holds n rows of `cols` ≥ lk floats, g n rows of dh, and the
                    // head's values lk rows of dh; the buffers are this thread's own.
                    unsafe {
                        gemm(
                            n,
                            lk,
                            dh,
                            dp.as_mut_ptr(),
                            1,
                            cols as isize,
                            false,
                            g.as_ptr(),
                            1,
                            dh as isize,
                            head.v().as_ptr(),
                            dh as isize,
                            1,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            Parallelism::None,
                        );
                    }
                    for i in 0..n {
                        let gi = &g[i * dh..(i + 1) * dh];
                        let drow = &mut dp[i * cols..(i + 1) * cols];
                        if spec.has_self {
                            let r = head.own_row(r0 + i);
                            drow[lk] = gi.iter().zip(&x.v_self[r]).map(|(a, b)| a * b).sum();
                        }
                        // dP = d(dropped)∘M, then dS = P∘(dP − Σ dO∘O)·scale, into p.
                        head.drop_row(r0 + i, drow);
                        let o = &out[(base + r0 + i) * dh..(base + r0 + i + 1) * dh];
                        let row_dot: f32 = gi.iter().zip(o).map(|(a, b)| a * b).sum();
                        let prow = &mut p[i * cols..(i + 1) * cols];
                        for (w, d) in prow.iter_mut().zip(drow.iter()) {
                            *w = *w * (d - row_dot) * spec.scale as f32;
                        }
                    }
                    // SAFETY: p holds n rows of `cols` ≥ lk floats; dq from row r0 and q from
                    // row r0 hold n rows of dh, dk and k lk rows of dh; this (cell, head)'s
                    // gradient blocks are written by this task alone.
                    unsafe {
                        // dQ = dS · K ; dK += dSᵀ · Q
                        gemm(
                            n,
                            dh,
                            lk,
                            dq[r0 * dh..].as_mut_ptr(),
                            1,
                            dh as isize,
                            false,
                            p.as_ptr(),
                            1,
                            cols as isize,
                            head.k().as_ptr(),
                            1,
                            dh as isize,
                            0.0,
                            1.0,
                            false,
                            false,
                            false,
                            Parallelism::None,
                        );
                        gemm(
                            lk,
                            dh,
                            n,
                            dk.as_mut_ptr(),
                            1,
                            dh as isize,
                            true,
                            p.as_ptr(),
                            cols as isize,
                            1,
                            head.q()[r0 * dh..].as_ptr(),
                            1,
                            dh as isize,
                            1.0,
                            1.0,
                            false,
                            false,
                            false,
                            Parallelism::None,
                        );
                    }
                    if spec.has_self {
                        for i in 0..n {
                            let ds = p[i * cols + lk];
                            let r = head.own_row(r0 + i);
                            let qi = &head.q()[(r0 + i) * dh..(r0 + i + 1) * dh];
                            for ((dqa, ksb), (dka, qa)) in dq[(r0 + i) * dh..(r0 + i + 1) * dh]
                                .iter_mut()
                                .zip(&x.k_self[r])
                                .zip(dks[(r0 + i) * dh..(r0 + i + 1) * dh].iter_mut().zip(qi))
                            {
                                *dqa += ds * ksb;
                                *dka = ds * qa;
                            }
                        }
                    }
                }
            },
        );
    drop(dks_chunks);
    drop(dvs_chunks);
    let own_shape = if spec.has_self { [x.b, x.h, lq, dh] } else { [1, 1, 1, 1] };
    let (dks, dvs) = if spec.has_self { (dks, dvs) } else { (vec![0.0], vec![0.0]) };
    [flex(dq, [x.b, x.h, lq, dh]), flex(dk, [x.b, x.h, lk, dh]), flex(dv, [x.b, x.h, lk, dh]), flex(dks, own_shape), flex(dvs, own_shape)]
}
