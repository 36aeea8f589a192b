//! The NCCL backend as far as one process can take it: on a machine without the libraries it
//! must fail with an actionable error (never a panic); with one GPU, a world of 1 runs every
//! operation through NCCL.
#![cfg(feature = "nccl")]

use std::time::Duration;

use scgpt_dist::{connect, DistError, RankInfo};

#[test]
fn nccl_world_of_one_runs_or_explains() {
    match connect(&RankInfo::single(), "nccl", Duration::from_secs(10)) {
        Ok(mut c) => {
            assert_eq!((c.backend(), c.rank(), c.world()), ("nccl", 0, 1));
            let mut b = vec![1.5f32, -2.0, 3.25];
            c.all_reduce_mean(&mut b).unwrap();
            assert_eq!(b, [1.5, -2.0, 3.25]);
            c.broadcast(&mut b).unwrap();
            assert_eq!(c.all_gather(&b).unwrap(), b);
            let mut m = [2.0f64];
            c.all_reduce_sum_f64(&mut m).unwrap();
            assert_eq!(m, [2.0]);
            c.barrier().unwrap();
            assert!(c.stats().calls >= 5);
        }
        Err(e @ DistError::Backend(_)) => {
            let msg = e.to_string();
            eprintln!("nccl unavailable here: {msg}");
            assert!(msg.contains("libcuda") || msg.contains("libnccl"), "{msg}");
        }
        Err(e) => panic!("unexpected error kind: {e:?}"),
    }
}
