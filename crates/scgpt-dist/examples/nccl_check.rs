//! World-size-1 NCCL check for `launch/gpu_selftest.sh`: connects rank 0 of 1 through the NCCL
//! backend (TCP rendezvous for the unique id, as a real job), all-reduces a whole-human-sized
//! gradient buffer, checks the mean is the input and prints the time per all-reduce.
//!
//!   cargo run --release -p scgpt-dist --features nccl --example nccl_check -- [floats] [reps]

use std::time::{Duration, Instant};

use scgpt_dist::{connect, RankInfo};

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("numbers")).collect();
    let n = *args.first().unwrap_or(&51_330_049);
    let reps = *args.get(1).unwrap_or(&5);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let port = listener.local_addr().expect("port").port();
    drop(listener);
    let info = RankInfo { master_port: port, ..RankInfo::single() };
    let mut c = match connect(&info, "nccl", Duration::from_secs(60)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("nccl_check: FAIL: {e}");
            std::process::exit(1);
        }
    };
    let want: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 0.5).collect();
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let mut buf = want.clone();
        let t = Instant::now();
        c.all_reduce_mean(&mut buf).expect("all-reduce");
        best = best.min(t.elapsed().as_secs_f64());
        if buf != want {
            eprintln!("nccl_check: FAIL: the world-1 mean differs from the input");
            std::process::exit(1);
        }
    }
    println!(
        "nccl_check: PASS: world 1, {n} floats ({:.0} MB), best {best:.4} s per all-reduce (host buffer in and out)",
        n as f64 * 4.0 / 1e6
    );
}
