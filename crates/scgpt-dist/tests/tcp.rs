//! The TCP backend with real sockets: ranks are threads on loopback. Every group binds its
//! own port 0, so tests can run in parallel.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use scgpt_dist::{connect, Collective, DistError, RankInfo, Single, Tcp, TcpOptions};

fn opts(timeout_ms: u64, chunk_bytes: usize) -> TcpOptions {
    let mut o = TcpOptions::with_timeout(Duration::from_millis(timeout_ms));
    o.chunk_bytes = chunk_bytes;
    o
}

fn bind() -> (TcpListener, u16) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    (l, port)
}

/// A port that was free a moment ago, for code paths that bind by themselves.
fn free_port() -> u16 {
    bind().1
}

/// Run `body` on `world` threads, one per rank, over a fresh group; results in rank order.
/// `skip` ranks are never started.
fn group_with<R: Send + 'static>(
    world: usize,
    o: TcpOptions,
    skip: &[usize],
    body: impl Fn(usize, Result<Tcp, DistError>) -> R + Send + Sync + 'static,
) -> Vec<Option<R>> {
    let (listener, port) = bind();
    let body = Arc::new(body);
    let mut listener = Some(listener);
    let handles: Vec<_> = (0..world)
        .map(|r| {
            if skip.contains(&r) {
                return None;
            }
            let (body, o) = (body.clone(), o.clone());
            let l = if r == 0 { listener.take() } else { None };
            Some(thread::spawn(move || {
                let tcp = match l {
                    Some(l) => Tcp::serve(l, world, &o),
                    None => Tcp::join("127.0.0.1", port, r, world, &o),
                };
                body(r, tcp)
            }))
        })
        .collect();
    handles.into_iter().map(|h| h.map(|h| h.join().expect("rank thread panicked"))).collect()
}

fn group<R: Send + 'static>(world: usize, o: TcpOptions, body: impl Fn(usize, Tcp) -> R + Send + Sync + 'static) -> Vec<R> {
    group_with(world, o, &[], move |r, tcp| body(r, tcp.expect("rendezvous"))).into_iter().map(Option::unwrap).collect()
}

/// Deterministic values of varied sign and magnitude (splitmix64).
fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ n as u64;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            let u = (z >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
            let scale = 10f64.powi((z % 7) as i32 - 3);
            ((u * 2.0 - 1.0) * scale) as f32
        })
        .collect()
}

fn check_mean(world: usize, o: TcpOptions, lens: &[usize]) {
    let lens_owned = lens.to_vec();
    let results = group(world, o, move |r, mut c| {
        assert_eq!((c.rank(), c.world()), (r, world));
        lens_owned
            .iter()
            .map(|&n| {
                let mut buf = values(r as u64 + 1, n);
                c.all_reduce_mean(&mut buf).unwrap();
                buf
            })
            .collect::<Vec<_>>()
    });
    for (k, &n) in lens.iter().enumerate() {
        let inputs: Vec<Vec<f32>> = (0..world).map(|r| values(r as u64 + 1, n)).collect();
        for i in 0..n {
            let exact = inputs.iter().map(|v| v[i] as f64).sum::<f64>() / world as f64;
            let got = results[0][k][i] as f64;
            assert!((got - exact).abs() <= 1e-6 * exact.abs().max(1e-30), "len {n} elem {i}: {got} vs {exact}");
            for (r, res) in results.iter().enumerate().skip(1) {
                assert_eq!(res[k][i].to_bits(), results[0][k][i].to_bits(), "rank {r} len {n} elem {i}");
            }
        }
    }
}

#[test]
fn all_reduce_mean_two_ranks() {
    // 4 KiB chunks = 1024 f32: 2500 spans three chunks, the last partial; 1 << 20 + 3 f32
    // is over one default 4 MiB chunk.
    check_mean(2, opts(5000, 4096), &[0, 1, 7, 1024, 2500, 10_000]);
    check_mean(2, opts(5000, scgpt_dist::DEFAULT_CHUNK_BYTES), &[(1 << 20) + 3, 5]);
}

#[test]
fn all_reduce_mean_four_ranks() {
    check_mean(4, opts(5000, 4096), &[0, 3, 1023, 1025, 4099, 20_000]);
    check_mean(4, opts(5000, scgpt_dist::DEFAULT_CHUNK_BYTES), &[(1 << 20) + 17]);
}

#[test]
fn all_reduce_sum_f64_is_exact_and_identical() {
    let res = group(3, opts(5000, 64), |r, mut c| {
        // 20 f64 with 64-byte chunks: several chunks.
        let mut buf: Vec<f64> = (0..20).map(|i| (r * 100 + i) as f64 + 0.25).collect();
        c.all_reduce_sum_f64(&mut buf).unwrap();
        let mut empty: [f64; 0] = [];
        c.all_reduce_sum_f64(&mut empty).unwrap();
        buf
    });
    for (r, got) in res.iter().enumerate() {
        for (i, x) in got.iter().enumerate() {
            let want = (0..3).map(|q| (q * 100 + i) as f64 + 0.25).sum::<f64>();
            assert_eq!(x.to_bits(), want.to_bits(), "rank {r} elem {i}");
        }
    }
}

#[test]
fn broadcast_copies_rank_0() {
    let res = group(3, opts(5000, 4096), |r, mut c| {
        let mut a = if r == 0 { values(42, 3000) } else { vec![f32::NAN; 3000] };
        c.broadcast(&mut a).unwrap();
        let mut b = if r == 0 { vec![7.0f32] } else { vec![0.0] };
        c.broadcast(&mut b).unwrap();
        let mut e: [f32; 0] = [];
        c.broadcast(&mut e).unwrap();
        (a, b)
    });
    let want = values(42, 3000);
    for (r, (a, b)) in res.iter().enumerate() {
        assert!(a.iter().zip(&want).all(|(x, y)| x.to_bits() == y.to_bits()), "rank {r}");
        assert_eq!(b, &[7.0], "rank {r}");
    }
}

#[test]
fn all_gather_is_rank_ordered() {
    let world = 4;
    let res = group(world, opts(5000, 4096), |r, mut c| {
        let local: Vec<f32> = (0..1500).map(|i| (r * 10_000 + i) as f32).collect();
        let big = c.all_gather(&local).unwrap();
        let small = c.all_gather(&[r as f32]).unwrap();
        let empty = c.all_gather(&[]).unwrap();
        (big, small, empty)
    });
    let want: Vec<f32> = (0..world).flat_map(|r| (0..1500).map(move |i| (r * 10_000 + i) as f32)).collect();
    for (r, (big, small, empty)) in res.iter().enumerate() {
        assert_eq!(big, &want, "rank {r}");
        assert_eq!(small, &[0.0, 1.0, 2.0, 3.0], "rank {r}");
        assert!(empty.is_empty());
    }
}

/// Buffers far beyond the kernel's socket buffers, so any ordering in which two sides both
/// wait to write would deadlock here instead of in a training run.
#[test]
fn large_buffers_do_not_deadlock() {
    let n = 3 * (1 << 20) + 5; // 12 MiB of f32: four default chunks
    let res = group(3, opts(10_000, scgpt_dist::DEFAULT_CHUNK_BYTES), move |r, mut c| {
        let mut b = if r == 0 { values(9, n) } else { vec![0.0; n] };
        c.broadcast(&mut b).unwrap();
        let g = c.all_gather(&b[..n / 3]).unwrap();
        let mut m = vec![r as f32; n];
        c.all_reduce_mean(&mut m).unwrap();
        (b == values(9, n), g.len(), g[..n / 3] == g[2 * (n / 3)..], m.iter().all(|&x| x == 1.0))
    });
    for (r, got) in res.iter().enumerate() {
        assert_eq!(*got, (true, 3 * (n / 3), true, true), "rank {r}");
    }
}

#[test]
fn barrier_waits_for_everyone() {
    let times = Arc::new(Mutex::new(Vec::new()));
    let t = times.clone();
    group(4, opts(5000, 4096), move |r, mut c| {
        thread::sleep(Duration::from_millis(60 * r as u64));
        let enter = Instant::now();
        c.barrier().unwrap();
        t.lock().unwrap().push((enter, Instant::now()));
    });
    let times = times.lock().unwrap();
    let last_enter = times.iter().map(|t| t.0).max().unwrap();
    let first_exit = times.iter().map(|t| t.1).min().unwrap();
    assert!(first_exit >= last_enter, "a rank left the barrier before the last one entered");
}

#[test]
fn long_mixed_sequence_stays_in_step_and_is_accounted() {
    let res = group(3, opts(5000, 512), |r, mut c| {
        let mut total = 0f64;
        for step in 0..30 {
            let n = (step * 37) % 400;
            let mut g = vec![(r + step) as f32; n];
            c.all_reduce_mean(&mut g).unwrap();
            if n > 0 {
                assert_eq!(g[n - 1], (1 + step) as f32); // mean of step, step+1, step+2
            }
            let mut m = [r as f64, 1.0];
            c.all_reduce_sum_f64(&mut m).unwrap();
            total += m[0] + m[1];
            if step % 7 == 0 {
                c.barrier().unwrap();
            }
        }
        (total, c.stats())
    });
    for (r, (total, stats)) in res.iter().enumerate() {
        assert_eq!(*total, 30.0 * (3.0 + 3.0), "rank {r}");
        assert_eq!(stats.calls, 30 + 30 + 5, "rank {r}");
        assert!(stats.bytes_sent > 0 && stats.bytes_received > 0 && stats.seconds > 0.0);
        let zero = stats.since(stats);
        assert_eq!((zero.calls, zero.bytes_sent), (0, 0));
    }
    // Rank 0 relays everything, so it moves more bytes than any peer.
    assert!(res[0].1.bytes_sent > res[1].1.bytes_sent);
}

fn assert_quick(start: Instant, max: Duration, what: &str) {
    let el = start.elapsed();
    assert!(el < max, "{what} took {el:?}, expected under {max:?}");
}

#[test]
fn dead_peer_is_named_on_every_rank() {
    let res = group(3, opts(2000, 4096), |r, mut c| {
        let mut buf = vec![1.0f32; 5000];
        c.all_reduce_mean(&mut buf).unwrap();
        if r == 2 {
            drop(c); // the process "dies" between two steps
            return None;
        }
        let t0 = Instant::now();
        let err = c.all_reduce_mean(&mut buf).unwrap_err();
        let el = t0.elapsed();
        let again = c.barrier().unwrap_err();
        Some((err, el, again))
    });
    for (r, item) in res.into_iter().enumerate().take(2) {
        let (err, el, again) = item.unwrap();
        let msg = err.to_string();
        assert_eq!(err.rank(), Some(2), "rank {r}: {msg}");
        assert!(msg.contains("rank 2") && msg.contains("all_reduce_mean"), "rank {r}: {msg}");
        assert!(msg.contains("closed its connection"), "rank {r}: {msg}");
        if r == 1 {
            assert!(msg.contains("reported by rank 0"), "{msg}");
        }
        assert!(el < Duration::from_secs(1), "rank {r} needed {el:?} to notice a closed socket");
        assert!(matches!(again, DistError::Poisoned(_)), "rank {r}: {again}");
    }
}

#[test]
fn silent_peer_times_out_and_is_named() {
    let res = group(3, opts(1000, 4096), |r, mut c| {
        if r == 2 {
            // Alive and connected, but never joins the collective.
            thread::sleep(Duration::from_millis(2000));
            return None;
        }
        let t0 = Instant::now();
        let err = c.all_reduce_mean(&mut [1.0, 2.0]).unwrap_err();
        Some((err, t0.elapsed()))
    });
    for (r, item) in res.into_iter().enumerate().take(2) {
        let (err, el) = item.unwrap();
        let msg = err.to_string();
        assert_eq!(err.rank(), Some(2), "rank {r}: {msg}");
        assert!(msg.contains("rank 2 did not answer all_reduce_mean within 1 s"), "rank {r}: {msg}");
        assert!(el >= Duration::from_millis(900), "rank {r} gave up early: {el:?}");
        // Peers wait 2.5 s themselves: rank 0's diagnosis must arrive first.
        assert!(el < Duration::from_millis(2300), "rank {r} took {el:?}");
    }
}

#[test]
fn rank_that_never_connects_is_named() {
    let t0 = Instant::now();
    let res = group_with(3, opts(1500, 4096), &[2], |_r, tcp| (tcp.map(|_| ()), Instant::now()));
    for (r, item) in res.into_iter().enumerate().take(2) {
        let (result, done) = item.unwrap();
        let err = result.unwrap_err();
        let msg = err.to_string();
        assert_eq!(err.rank(), Some(2), "rank {r}: {msg}");
        assert!(msg.contains("rank 2 never connected") && msg.contains("1.5 s"), "rank {r}: {msg}");
        let el = done - t0;
        assert!(el >= Duration::from_millis(1400) && el < Duration::from_secs(3), "rank {r}: {el:?}");
    }
}

#[test]
fn dead_root_is_named() {
    let res = group(3, opts(2000, 4096), |r, mut c| {
        c.barrier().unwrap();
        if r == 0 {
            return None;
        }
        thread::sleep(Duration::from_millis(100)); // let rank 0's sockets close
        let t0 = Instant::now();
        let err = c.all_reduce_mean(&mut vec![0.5; 3000]).unwrap_err();
        Some((err, t0.elapsed()))
    });
    for (r, item) in res.into_iter().enumerate().skip(1) {
        let (err, el) = item.unwrap();
        let msg = err.to_string();
        assert_eq!(err.rank(), Some(0), "rank {r}: {msg}");
        assert!(msg.starts_with("rank 0 at 127.0.0.1:") && msg.contains("all_reduce_mean"), "{msg}");
        assert!(el < Duration::from_secs(1), "rank {r}: {el:?}");
    }
}

#[test]
fn silent_root_times_out() {
    let res = group(2, opts(300, 4096), |r, mut c| {
        if r == 0 {
            thread::sleep(Duration::from_millis(2200));
            return None;
        }
        let t0 = Instant::now();
        let err = c.barrier().unwrap_err();
        Some((err, t0.elapsed()))
    });
    let (err, el) = res[1].as_ref().unwrap();
    let msg = err.to_string();
    assert_eq!(err.rank(), Some(0), "{msg}");
    assert!(msg.contains("did not answer barrier"), "{msg}");
    // Peer timeout = 0.3 s * 1.5 + 1 s.
    assert!(*el >= Duration::from_millis(1400) && *el < Duration::from_secs(2), "{el:?}");
}

#[test]
fn missing_root_fails_after_connect_timeout() {
    let port = free_port();
    let t0 = Instant::now();
    let err = Tcp::join("127.0.0.1", port, 1, 2, &opts(1000, 4096)).unwrap_err();
    let msg = err.to_string();
    assert_eq!(err.rank(), Some(0), "{msg}");
    assert!(msg.contains("could not reach rank 0") && msg.contains("MASTER_PORT"), "{msg}");
    let el = t0.elapsed();
    assert!(el >= Duration::from_millis(950) && el < Duration::from_millis(2500), "{el:?}");
}

#[test]
fn peers_may_start_before_root() {
    let port = free_port();
    let o = opts(5000, 4096);
    let o2 = o.clone();
    let peer = thread::spawn(move || {
        let mut c = Tcp::join("127.0.0.1", port, 1, 2, &o2).unwrap();
        let mut b = vec![3.0f32];
        c.all_reduce_mean(&mut b).unwrap();
        b
    });
    thread::sleep(Duration::from_millis(400));
    let info = RankInfo { rank: 0, world: 2, local_rank: 0, master_addr: "127.0.0.1".into(), master_port: port };
    let mut c = Tcp::connect(&info, &o).unwrap();
    let mut b = vec![1.0f32];
    c.all_reduce_mean(&mut b).unwrap();
    assert_eq!(b, [2.0]);
    assert_eq!(peer.join().unwrap(), [2.0]);
}

#[test]
fn world_size_disagreement_fails_the_handshake() {
    let (listener, port) = bind();
    let o = opts(2000, 4096);
    let o2 = o.clone();
    let peer = thread::spawn(move || Tcp::join("127.0.0.1", port, 1, 3, &o2).map(|_| ()));
    let t0 = Instant::now();
    let root = Tcp::serve(listener, 2, &o).map(|_| ());
    let root_err = root.unwrap_err();
    assert_quick(t0, Duration::from_secs(1), "rank 0's handshake check");
    let peer_err = peer.join().unwrap().unwrap_err();
    for e in [&root_err, &peer_err] {
        let msg = e.to_string();
        assert!(matches!(e, DistError::Protocol(_)), "{e:?}");
        assert!(msg.contains("world size of 3") && msg.contains("rank 0 with 2"), "{msg}");
    }
}

#[test]
fn duplicate_rank_fails_the_handshake() {
    let (listener, port) = bind();
    let o = opts(2000, 4096);
    let joins: Vec<_> = (0..2)
        .map(|_| {
            let o = o.clone();
            thread::spawn(move || Tcp::join("127.0.0.1", port, 1, 3, &o).map(|_| ()))
        })
        .collect();
    let err = Tcp::serve(listener, 3, &o).unwrap_err();
    assert!(err.to_string().contains("two processes claim rank 1"), "{err}");
    for j in joins {
        let e = j.join().unwrap().unwrap_err();
        assert!(e.to_string().contains("two processes claim rank 1"), "{e}");
    }
}

#[test]
fn stray_connections_are_ignored() {
    let (listener, port) = bind();
    let o = opts(3000, 4096);
    // A health check that sends garbage, and one that connects and says nothing.
    let mut junk = TcpStream::connect(("127.0.0.1", port)).unwrap();
    junk.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let _mute = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let o2 = o.clone();
    let peer = thread::spawn(move || {
        let mut c = Tcp::join("127.0.0.1", port, 1, 2, &o2).unwrap();
        c.all_gather(&[1.0]).unwrap()
    });
    let mut c = Tcp::serve(listener, 2, &o).unwrap();
    assert_eq!(c.all_gather(&[0.0]).unwrap(), [0.0, 1.0]);
    assert_eq!(peer.join().unwrap(), [0.0, 1.0]);
}

#[test]
fn mismatched_collectives_are_detected() {
    let res = group(2, opts(2000, 4096), |r, mut c| {
        let mut buf = vec![0f32; 10];
        if r == 0 {
            c.all_reduce_mean(&mut buf).unwrap_err()
        } else {
            c.broadcast(&mut buf).unwrap_err()
        }
    });
    for e in &res {
        let msg = e.to_string();
        assert!(matches!(e, DistError::Protocol(_)), "{e:?}");
        assert!(msg.contains("rank 1 called broadcast") && msg.contains("rank 0 called all_reduce_mean"), "{msg}");
    }
    let res = group(2, opts(2000, 4096), |r, mut c| {
        let mut buf = vec![0f32; 10 + r];
        c.all_reduce_mean(&mut buf).unwrap_err()
    });
    for e in &res {
        assert!(e.to_string().contains("11 elements") && e.to_string().contains("10 elements"), "{e}");
    }
}

#[test]
fn connect_by_backend_name() {
    let one = RankInfo::single();
    let t = Duration::from_secs(5);
    for name in ["single", "auto", "TCP"] {
        let mut c = connect(&one, name, t).unwrap();
        assert_eq!((c.rank(), c.world()), (0, 1));
        let mut b = [4.0f32, 5.0];
        c.all_reduce_mean(&mut b).unwrap();
        assert_eq!(b, [4.0, 5.0]);
        assert_eq!(c.all_gather(&[1.0]).unwrap(), [1.0]);
        c.barrier().unwrap();
    }
    assert_eq!(connect(&one, "auto", t).unwrap().backend(), "single");

    let port = free_port();
    let infos: Vec<RankInfo> =
        (0..2).map(|rank| RankInfo { rank, world: 2, local_rank: rank, master_addr: "127.0.0.1".into(), master_port: port }).collect();
    let e = connect(&infos[1], "single", t).err().unwrap().to_string();
    assert!(e.contains("world of 2"), "{e}");
    let e = connect(&infos[1], "mpi", t).err().unwrap().to_string();
    assert!(e.contains("\"mpi\"") && e.contains("tcp"), "{e}");
    #[cfg(not(feature = "nccl"))]
    {
        let e = connect(&infos[1], "nccl", t).err().unwrap().to_string();
        assert!(e.contains("--features nccl"), "{e}");
    }

    let handles: Vec<_> = infos
        .into_iter()
        .map(|info| {
            thread::spawn(move || {
                let mut c = connect(&info, "auto", Duration::from_secs(5)).unwrap();
                assert_eq!(c.backend(), "tcp");
                let mut b = vec![info.rank as f32 * 2.0; 3];
                c.all_reduce_mean(&mut b).unwrap();
                b
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), [1.0; 3]);
    }
}

#[test]
fn single_is_the_identity() {
    let mut s = Single::new();
    let mut b = [1.5f32, -2.0];
    s.all_reduce_mean(&mut b).unwrap();
    s.broadcast(&mut b).unwrap();
    let mut m = [3.0f64];
    s.all_reduce_sum_f64(&mut m).unwrap();
    assert_eq!((b, m), ([1.5, -2.0], [3.0]));
    assert_eq!(s.all_gather(&b).unwrap(), b);
    s.barrier().unwrap();
    assert_eq!(s.stats().calls, 5);
    assert_eq!(s.stats().bytes_sent, 0);
}
