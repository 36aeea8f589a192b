//! TCP all-reduce bandwidth on loopback: `world` ranks as threads average a buffer of `floats`
//! f32 (default 51,330,049: the whole-human model's gradient) `reps` times.
//!
//!   cargo run --release -p scgpt-dist --example allreduce_bench -- [world] [floats] [reps]

use std::net::TcpListener;
use std::time::Instant;

use scgpt_dist::{Collective, Tcp, TcpOptions};

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("numbers")).collect();
    let world = *args.first().unwrap_or(&2);
    let n = *args.get(1).unwrap_or(&51_330_049);
    let reps = *args.get(2).unwrap_or(&3);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let opts = TcpOptions::default();
    let mut handles = Vec::new();
    let o = opts.clone();
    handles.push(std::thread::spawn(move || run(Box::new(Tcp::serve(listener, world, &o).unwrap()), n, reps)));
    for r in 1..world {
        let o = opts.clone();
        handles.push(std::thread::spawn(move || run(Box::new(Tcp::join("127.0.0.1", port, r, world, &o).unwrap()), n, reps)));
    }
    let times: Vec<f64> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let t = times[0];
    let mb = n as f64 * 4.0 / 1e6;
    println!(
        "world {world}, {n} floats ({mb:.0} MB): {:.3} s per all-reduce, {:.0} MB/s of buffer per rank (algorithm bandwidth)",
        t,
        mb / t
    );
}

fn run(mut c: Box<dyn Collective>, n: usize, reps: usize) -> f64 {
    let mut buf: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * (c.rank() + 1) as f32).collect();
    c.barrier().unwrap();
    let mut best = f64::INFINITY;
    for _ in 0..reps {
        let t = Instant::now();
        c.all_reduce_mean(&mut buf).unwrap();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}
