//! The blockwise training attention against the explicit path: values and gradients, with and
//! without padding and dropout, for the classic/pcpt attention and the generative stream; and its
//! dropout mask against the counter hash evaluated on the host.

use burn::tensor::{Bool, Device, Distribution, Tensor, TensorData};
use scgpt_model::block_attention::{keep_mask_by_tensor_ops, keep_threshold, mask_draw};
use scgpt_model::burn;
use scgpt_model::layers::{AttentionMode, SelfAttention};

const D: usize = 16;
const HEADS: usize = 4;

fn values<const N: usize>(t: Tensor<N>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec().unwrap()
}

fn assert_close(what: &str, got: Vec<f32>, want: Vec<f32>, rel: f32) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() <= rel * scale, "{what}[{i}]: {g} vs {w} (scale {scale})");
    }
}

/// `[B, L]` padding with the last `pads[b]` tokens of row `b` padded.
fn padding(pads: &[usize], l: usize, device: &Device) -> Tensor<2, Bool> {
    let data: Vec<bool> = pads.iter().flat_map(|&p| (0..l).map(move |i| i >= l - p)).collect();
    Tensor::from_data(TensorData::new(data, [pads.len(), l]), device)
}

/// One attention block with the given dropout, its weights fixed by seed 7.
fn block(p: f64, device: &Device) -> SelfAttention {
    device.seed(7);
    SelfAttention::new(D, HEADS, p, device)
}

/// burn's RNG is global and tests run on parallel threads: one run at a time, so that each run's
/// seeds fix its weights, inputs and dropout draws.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Run {
    outputs: Vec<Vec<f32>>,
    grads: Vec<Vec<f32>>,
}

/// The classic (pcpt) attention under autodiff: output, and gradients of a weighted sum of it
/// with respect to the input and the packed projection.
fn classic(mode: AttentionMode, p: f64, pads: &[usize], l: usize) -> Run {
    classic_on(mode, true, p, pads, l)
}

/// `fused`: Flex's fused kernel, or the generic tensor-operation path GPU backends run.
fn classic_on(mode: AttentionMode, fused: bool, p: f64, pads: &[usize], l: usize) -> Run {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    scgpt_model::block_attention_cpu::set_fused(fused);
    let device = Device::flex().autodiff();
    let att = block(p, &device).with_attention(mode);
    device.seed(11);
    let b = pads.len();
    let x = Tensor::<3>::random([b, l, D], Distribution::Normal(0.0, 1.0), &device).require_grad();
    let probe = Tensor::<3>::random([b, l, D], Distribution::Normal(0.0, 1.0), &device);
    let mask = pads.iter().any(|&p| p > 0).then(|| padding(pads, l, &device));
    device.seed(99); // the dropout draws
    let out = att.forward(x.clone(), mask);
    let grads = (out.clone() * probe).sum().backward();
    Run {
        outputs: vec![values(out)],
        grads: vec![
            values(x.grad(&grads).unwrap()),
            values(att.Wqkv.weight.val().grad(&grads).unwrap()),
            values(att.out_proj.weight.val().grad(&grads).unwrap()),
        ],
    }
}

/// The generative two-stream attention: both contexts and the gradients of both inputs and of
/// `Wqkv` through both streams.
fn generative(mode: AttentionMode, fused: bool, p: f64, pcpt_pads: &[usize], gen_pads: &[usize], lp: usize, lg: usize) -> Run {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    scgpt_model::block_attention_cpu::set_fused(fused);
    let device = Device::flex().autodiff();
    let att = block(p, &device).with_attention(mode);
    device.seed(13);
    let b = pcpt_pads.len();
    let pcpt = Tensor::<3>::random([b, lp, D], Distribution::Normal(0.0, 1.0), &device).require_grad();
    let gen = Tensor::<3>::random([b, lg, D], Distribution::Normal(0.0, 1.0), &device).require_grad();
    let probe_p = Tensor::<3>::random([b, lp, D], Distribution::Normal(0.0, 1.0), &device);
    let probe_g = Tensor::<3>::random([b, lg, D], Distribution::Normal(0.0, 1.0), &device);
    let pm = pcpt_pads.iter().any(|&p| p > 0).then(|| padding(pcpt_pads, lp, &device));
    let gm = gen_pads.iter().any(|&p| p > 0).then(|| padding(gen_pads, lg, &device));
    device.seed(99);
    let (pc, gc) = att.forward_generative(pcpt.clone(), gen.clone(), pm, gm);
    let grads = ((pc.clone() * probe_p).sum() + (gc.clone() * probe_g).sum()).backward();
    Run {
        outputs: vec![values(pc), values(gc)],
        grads: vec![
            values(pcpt.grad(&grads).unwrap()),
            values(gen.grad(&grads).unwrap()),
            values(att.Wqkv.weight.val().grad(&grads).unwrap()),
            values(att.Wqkv.bias.as_ref().unwrap().val().grad(&grads).unwrap()),
        ],
    }
}

fn assert_same(what: &str, got: Run, want: Run, rel: f32) {
    for (i, (g, w)) in got.outputs.into_iter().zip(want.outputs).enumerate() {
        assert_close(&format!("{what} output {i}"), g, w, rel);
    }
    for (i, (g, w)) in got.grads.into_iter().zip(want.grads).enumerate() {
        assert_close(&format!("{what} gradient {i}"), g, w, rel);
    }
}

const BLOCKWISE: AttentionMode = AttentionMode::Blockwise { block_rows: 3 };

#[test]
fn classic_attention_matches_the_explicit_path() {
    // 7 rows in blocks of 3 (a short last block), padded and unpadded batches.
    for pads in [&[0, 0][..], &[0, 3][..], &[2, 5, 0][..]] {
        for p in [0.0, 0.3] {
            for fused in [true, false] {
                let what = format!("pads {pads:?} dropout {p} fused {fused}");
                assert_same(&what, classic_on(BLOCKWISE, fused, p, pads, 7), classic(AttentionMode::Explicit, p, pads, 7), 1e-5);
            }
        }
    }
}

#[test]
fn generative_attention_matches_the_explicit_path() {
    for (pp, gp) in [(&[0, 0][..], &[0, 0][..]), (&[0, 4][..], &[2, 0][..]), (&[3, 1][..], &[1, 5][..])] {
        for p in [0.0, 0.3] {
            for fused in [true, false] {
                let what = format!("pcpt pads {pp:?} gen pads {gp:?} dropout {p} fused {fused}");
                assert_same(
                    &what,
                    generative(BLOCKWISE, fused, p, pp, gp, 9, 5),
                    generative(AttentionMode::Explicit, true, p, pp, gp, 9, 5),
                    1e-5,
                );
            }
        }
    }
}

#[test]
fn dropout_changes_the_output_and_follows_the_seed() {
    // Guards the comparisons above against a dropout that never drops: with p = 0.3 the output
    // differs from p = 0, and the same seed gives the same output.
    let dropped = classic(BLOCKWISE, 0.3, &[0, 2], 7);
    let again = classic(BLOCKWISE, 0.3, &[0, 2], 7);
    let kept = classic(BLOCKWISE, 0.0, &[0, 2], 7);
    assert_eq!(dropped.outputs, again.outputs);
    let differ = dropped.outputs[0].iter().zip(&kept.outputs[0]).filter(|(a, b)| (*a - *b).abs() > 1e-4).count();
    assert!(differ > dropped.outputs[0].len() / 4, "only {differ} values changed under dropout");
}

#[test]
fn keep_mask_is_the_host_hash_and_keeps_the_right_share() {
    use burn::backend::Dispatch;
    use scgpt_model::block_attention::BlockAttentionOps;
    let device = Device::flex();
    let dims = [2, 3, 50, 40];
    let dropout = 0.3;
    let keep = 1.0 - dropout;
    let seed = 0x1234_5678_9ABC_DEF0;
    let like = Tensor::<4>::zeros(dims, &device);
    let mask = Dispatch::attention_keep_mask(like.into_dispatch(), dims, seed, dropout);
    let got = values(Tensor::<4>::from_dispatch(mask));
    // The integer tensor operations GPU backends run give the same mask as Flex's host fill,
    // whole and for a block of rows.
    let one = Tensor::<1>::zeros([1], &device);
    assert_eq!(values(keep_mask_by_tensor_ops(&one, dims, 0..dims[2], seed, keep)), got, "tensor-op mask and host mask differ");
    let [b, h, lq, lk] = dims;
    let rows = 13..37;
    let block = values(keep_mask_by_tensor_ops(&one, dims, rows.clone(), seed, keep));
    let want_block: Vec<f32> =
        (0..b * h).flat_map(|bh| rows.clone().flat_map(move |i| (0..lk).map(move |j| (bh * lq + i) * lk + j))).map(|at| got[at]).collect();
    assert_eq!(block, want_block, "a block of rows is the whole mask's rows");
    let mut want = Vec::new();
    for row in 0..(b * h * lq) as u64 {
        for j in 0..lk as u64 {
            let kept = mask_draw(seed, row, j) < keep_threshold(keep);
            want.push(if kept { (1.0 / keep) as f32 } else { 0.0 });
        }
    }
    assert_eq!(got, want);
    let share = want.iter().filter(|&&x| x > 0.0).count() as f64 / want.len() as f64;
    assert!((share - keep).abs() < 0.03, "kept share {share}");
}
