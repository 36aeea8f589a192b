//! The TCP backend: blocking std sockets, star topology through rank 0 (protocol in the
//! crate docs).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::env::{RankInfo, DEFAULT_TIMEOUT, TIMEOUT_ENV};
use crate::wire::{chunk_elems, chunks, decode, encode, Elem, Op};
use crate::{Collective, CommStats, DistError};

/// Bumped whenever the wire format changes, so mixed builds fail at the handshake.
pub const PROTOCOL_VERSION: u16 = 1;
/// Payload bytes per chunk: large enough to amortise syscalls, small enough that rank 0's
/// staging memory stays at a few chunks whatever the model size.
pub const DEFAULT_CHUNK_BYTES: usize = 4 << 20;

const MAGIC: u32 = u32::from_le_bytes(*b"SGPT");
const HELLO_LEN: usize = 4 + 2 + 4 + 4;
const HEADER_LEN: usize = 1 + 8 + 8;
const TAG_DATA: u8 = 0;
const TAG_ABORT: u8 = 1;
const ABORT_RANK: u8 = 0;
const ABORT_PROTOCOL: u8 = 1;
const NO_RANK: u32 = u32::MAX;
// Long enough for a healthy peer's kernel to take a small frame, short enough that a
// failing rank 0 does not stall on each peer it tries to warn.
const ABORT_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Timeouts and chunking of the TCP backend.
#[derive(Debug, Clone)]
pub struct TcpOptions {
    /// Limit on every network wait of rank 0 once the group is up; peers use
    /// [`TcpOptions::peer_timeout`].
    pub timeout: Duration,
    /// How long rank 0 waits for every peer to join, and peers keep retrying to reach rank 0.
    pub connect_timeout: Duration,
    /// Payload bytes per chunk (at least one element is always sent per chunk).
    pub chunk_bytes: usize,
}

impl Default for TcpOptions {
    fn default() -> TcpOptions {
        TcpOptions::with_timeout(DEFAULT_TIMEOUT)
    }
}

impl TcpOptions {
    /// `timeout` for the rendezvous and for every later wait, default chunking.
    pub fn with_timeout(timeout: Duration) -> TcpOptions {
        TcpOptions { timeout, connect_timeout: timeout, chunk_bytes: DEFAULT_CHUNK_BYTES }
    }

    /// [`TcpOptions::with_timeout`] with the timeout from `SCGPT_DIST_TIMEOUT_S`.
    pub fn from_env() -> Result<TcpOptions, DistError> {
        Ok(TcpOptions::with_timeout(crate::env::timeout_from_env()?))
    }

    /// What peers wait for rank 0. Longer than rank 0's own limit: when a third rank goes
    /// silent, rank 0 times out first and its abort (naming that rank) must reach the peers
    /// before their own timer fires and blames rank 0.
    pub fn peer_timeout(&self) -> Duration {
        grace(self.timeout)
    }
}

fn grace(d: Duration) -> Duration {
    d + d / 2 + Duration::from_secs(1)
}

fn fmt_secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

/// Turn a socket failure into a message that blames the remote rank and suggests why.
fn link_err(rank: usize, who: &str, op: &'static str, timeout: Duration, e: &io::Error) -> DistError {
    use io::ErrorKind::*;
    let message = match e.kind() {
        WouldBlock | TimedOut => format!(
            "{who} did not answer {op} within {} (timed out): is it still running? \
             (if it is only slow, raise {TIMEOUT_ENV})",
            fmt_secs(timeout)
        ),
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected => {
            let detail = if e.kind() == UnexpectedEof { "connection closed".to_string() } else { e.to_string() };
            format!(
                "{who} closed its connection during {op} ({detail}): did it crash or exit \
                 early? see that rank's log"
            )
        }
        _ => format!("communication with {who} failed during {op}: {e}"),
    };
    DistError::Rank { rank, op, message }
}

/// One connection and what we know about its far end.
struct Link {
    stream: TcpStream,
    /// Rank at the far end.
    rank: usize,
    /// How errors name the far end ("rank 2", "rank 0 at host:port").
    who: String,
    timeout: Duration,
    sent: u64,
    received: u64,
    /// A write failed part-way, so the far end is no longer at a frame boundary.
    torn: bool,
    /// The handshake as received, kept until rank 0 has checked it.
    hello: [u8; HELLO_LEN],
}

impl Link {
    fn new(stream: TcpStream, rank: usize, who: String, timeout: Duration) -> Link {
        Link { stream, rank, who, timeout, sent: 0, received: 0, torn: false, hello: [0; HELLO_LEN] }
    }

    fn err(&self, op: &'static str, e: &io::Error) -> DistError {
        link_err(self.rank, &self.who, op, self.timeout, e)
    }

    fn read_exact(&mut self, buf: &mut [u8], op: &'static str) -> Result<(), DistError> {
        self.stream.read_exact(buf).map_err(|e| self.err(op, &e))?;
        self.received += buf.len() as u64;
        Ok(())
    }

    fn write_all(&mut self, buf: &[u8], op: &'static str) -> Result<(), DistError> {
        if let Err(e) = self.stream.write_all(buf) {
            self.torn = true;
            return Err(self.err(op, &e));
        }
        self.sent += buf.len() as u64;
        Ok(())
    }

    fn set_timeouts(&mut self, timeout: Duration) -> Result<(), DistError> {
        self.timeout = timeout;
        self.stream
            .set_read_timeout(Some(timeout))
            .and_then(|_| self.stream.set_write_timeout(Some(timeout)))
            .map_err(|e| DistError::Io { context: format!("cannot set socket timeouts for {}", self.who), source: e })
    }

    /// Read one reply frame from rank 0 into `dst`: data, or an abort turned into the error
    /// rank 0 reported.
    fn read_reply<T: Elem>(&mut self, dst: &mut [T], scratch: &mut Vec<u8>, op: &'static str) -> Result<(), DistError> {
        let mut tag = [0u8];
        self.read_exact(&mut tag, op)?;
        match tag[0] {
            TAG_DATA => {
                scratch.clear();
                scratch.resize(dst.len() * T::SIZE, 0);
                self.read_exact(scratch, op)?;
                decode(scratch, dst);
                Ok(())
            }
            TAG_ABORT => Err(self.read_abort(op)),
            other => Err(DistError::Protocol(format!(
                "unexpected byte {other:#04x} from {} during {op}: is MASTER_PORT used by \
                 another program, or are the ranks built from different versions?",
                self.who
            ))),
        }
    }

    fn read_abort(&mut self, op: &'static str) -> DistError {
        let mut head = [0u8; 9];
        if let Err(e) = self.read_exact(&mut head, op) {
            return e;
        }
        let kind = head[0];
        let culprit = u32::from_le_bytes(head[1..5].try_into().expect("4 bytes"));
        let len = u32::from_le_bytes(head[5..9].try_into().expect("4 bytes")) as usize;
        let mut msg = vec![0u8; len.min(1 << 16)];
        if let Err(e) = self.read_exact(&mut msg, op) {
            return e;
        }
        let msg = String::from_utf8_lossy(&msg).into_owned();
        match (kind, culprit) {
            (ABORT_RANK, r) if r != NO_RANK => DistError::Rank { rank: r as usize, op, message: format!("{msg} [reported by rank 0]") },
            _ => DistError::Protocol(format!("{msg} [reported by rank 0]")),
        }
    }

    /// Best effort: tell the far end why the group is going down.
    fn send_abort(&mut self, err: &DistError) {
        let (kind, culprit) = match err.rank() {
            Some(r) => (ABORT_RANK, r as u32),
            None => (ABORT_PROTOCOL, NO_RANK),
        };
        let msg = err.to_string();
        let msg = &msg.as_bytes()[..msg.len().min(1 << 16)];
        let mut frame = vec![TAG_ABORT, kind];
        frame.extend_from_slice(&culprit.to_le_bytes());
        frame.extend_from_slice(&(msg.len() as u32).to_le_bytes());
        frame.extend_from_slice(msg);
        let _ = self.stream.set_write_timeout(Some(ABORT_WRITE_TIMEOUT));
        let _ = self.stream.write_all(&frame);
    }
}

enum Role {
    Root { peers: Vec<Link> },
    Peer { root: Link },
}

/// CPU collectives over TCP; see the crate docs for the protocol.
pub struct Tcp {
    rank: usize,
    world: usize,
    opts: TcpOptions,
    role: Role,
    seq: u64,
    poisoned: Option<String>,
    calls: u64,
    seconds: f64,
    // Reused across calls so a training loop does not reallocate chunk buffers every step.
    bytes_a: Vec<u8>,
    bytes_b: Vec<u8>,
    acc: Vec<f64>,
}

impl std::fmt::Debug for Tcp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tcp")
            .field("rank", &self.rank)
            .field("world", &self.world)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

impl Tcp {
    /// Rendezvous described by `info`: rank 0 listens on `master_port` on every interface,
    /// the others join `master_addr:master_port`. A world of 1 needs no network.
    pub fn connect(info: &RankInfo, opts: &TcpOptions) -> Result<Tcp, DistError> {
        if info.world == 0 || info.rank >= info.world {
            return Err(DistError::Config(format!(
                "rank {} does not fit a world of {}: ranks are numbered 0..world-1",
                info.rank, info.world
            )));
        }
        if info.world == 1 {
            return Ok(Tcp::new(0, 1, opts, Role::Root { peers: Vec::new() }));
        }
        if info.rank == 0 {
            let bind = bind_addr(&info.master_addr, info.master_port);
            let listener = TcpListener::bind(bind).map_err(|e| DistError::Io {
                context: format!(
                    "rank 0 cannot listen on {bind} (MASTER_PORT={}): if another job uses \
                     that port, choose a different MASTER_PORT",
                    info.master_port
                ),
                source: e,
            })?;
            Tcp::serve(listener, info.world, opts)
        } else {
            Tcp::join(&info.master_addr, info.master_port, info.rank, info.world, opts)
        }
    }

    /// Rank 0's side of the rendezvous on an already bound listener (lets callers and tests
    /// bind port 0 and hand out the port without a race).
    pub fn serve(listener: TcpListener, world: usize, opts: &TcpOptions) -> Result<Tcp, DistError> {
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        let io_err = |context: &str, e| DistError::Io { context: context.to_string(), source: e };
        // Non-blocking accept lets rank 0 notice the connect deadline while nobody knocks.
        listener.set_nonblocking(true).map_err(|e| io_err("cannot configure the rendezvous listener", e))?;
        let deadline = Instant::now() + opts.connect_timeout;
        let mut slots: Vec<Option<Link>> = (0..world).map(|_| None).collect();
        let mut joined = 1;
        let fail = |slots: &mut Vec<Option<Link>>, err: DistError| {
            for link in slots.iter_mut().flatten() {
                link.send_abort(&err);
                let _ = link.stream.shutdown(Shutdown::Write);
            }
            Err(err)
        };
        // Handshakes are read on helper threads: a connection that opens but never speaks
        // (a health check, a half-started rank) must not hold up the others' rendezvous.
        let (tx, rx) = mpsc::channel::<(Option<Link>, SocketAddr)>();
        while joined < world {
            let mut progressed = false;
            match listener.accept() {
                Ok((stream, addr)) => {
                    progressed = true;
                    let tx = tx.clone();
                    let wait = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(200));
                    thread::spawn(move || {
                        let _ = tx.send((read_hello(stream, addr, wait), addr));
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return fail(&mut slots, io_err("rank 0 failed to accept connections", e)),
            }
            while let Ok((link, addr)) = rx.try_recv() {
                progressed = true;
                let Some(link) = link else { continue };
                let mut link = match check_hello(link, addr, world) {
                    Ok(Some(link)) => link,
                    Ok(None) => continue,
                    Err(err) => return fail(&mut slots, err),
                };
                let r = link.rank;
                if slots[r].is_some() {
                    let err = DistError::Protocol(format!(
                        "two processes claim rank {r} (the second from {addr}): check that \
                         RANK / SLURM_PROCID differ on every process"
                    ));
                    link.send_abort(&err);
                    return fail(&mut slots, err);
                }
                slots[r] = Some(link);
                joined += 1;
                if joined == world {
                    break;
                }
            }
            if joined < world {
                if Instant::now() >= deadline {
                    let missing: Vec<String> = (1..world).filter(|&r| slots[r].is_none()).map(|r| r.to_string()).collect();
                    let first = missing[0].parse().expect("rank number");
                    let err = DistError::Rank {
                        rank: first,
                        op: "connect",
                        message: format!(
                            "rank{} {} never connected to rank 0 (port {port}) within {}: are \
                             they running, with the same MASTER_ADDR/MASTER_PORT and world size \
                             ({world})?",
                            if missing.len() > 1 { "s" } else { "" },
                            missing.join(", "),
                            fmt_secs(opts.connect_timeout)
                        ),
                    };
                    return fail(&mut slots, err);
                }
                if !progressed {
                    thread::sleep(Duration::from_millis(5));
                }
            }
        }
        let mut peers: Vec<Link> = slots.into_iter().flatten().collect();
        let mut welcome = vec![TAG_DATA];
        welcome.extend_from_slice(&MAGIC.to_le_bytes());
        welcome.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        for i in 0..peers.len() {
            let res = peers[i].set_timeouts(opts.timeout).and_then(|_| peers[i].write_all(&welcome, "connect"));
            if let Err(err) = res {
                for (j, link) in peers.iter_mut().enumerate() {
                    if j != i {
                        link.send_abort(&err);
                    }
                    let _ = link.stream.shutdown(Shutdown::Write);
                }
                return Err(err);
            }
        }
        Ok(Tcp::new(0, world, opts, Role::Root { peers }))
    }

    /// A peer's side of the rendezvous: keep trying to reach rank 0 until the connect
    /// timeout (rank 0 may start later), introduce ourselves, wait for everyone to arrive.
    pub fn join(master_addr: &str, master_port: u16, rank: usize, world: usize, opts: &TcpOptions) -> Result<Tcp, DistError> {
        if rank == 0 || rank >= world {
            return Err(DistError::Config(format!("Tcp::join is for ranks 1..{world}, not rank {rank} (rank 0 serves)")));
        }
        let start = Instant::now();
        let deadline = start + opts.connect_timeout;
        let who = format!("rank 0 at {master_addr}:{master_port}");
        let mut delay = Duration::from_millis(20);
        let mut last_err = String::from("no address to try");
        let stream = 'retry: loop {
            match (master_addr, master_port).to_socket_addrs() {
                Ok(addrs) => {
                    for a in addrs {
                        let left = deadline.saturating_duration_since(Instant::now());
                        let wait = left.clamp(Duration::from_millis(50), Duration::from_secs(5));
                        match TcpStream::connect_timeout(&a, wait) {
                            Ok(s) => break 'retry s,
                            Err(e) => last_err = format!("{a}: {e}"),
                        }
                    }
                }
                Err(e) => last_err = format!("cannot resolve {master_addr:?}: {e}"),
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(DistError::Rank {
                    rank: 0,
                    op: "connect",
                    message: format!(
                        "rank {rank} could not reach {who} within {} (last error: {last_err}): \
                         is rank 0 running, and do all ranks use the same MASTER_ADDR and \
                         MASTER_PORT?",
                        fmt_secs(opts.connect_timeout)
                    ),
                });
            }
            thread::sleep(delay.min(deadline - now));
            delay = (delay * 2).min(Duration::from_secs(1));
        };
        stream.set_nodelay(true).map_err(|e| DistError::Io { context: "cannot set TCP_NODELAY".into(), source: e })?;
        // Rank 0 may wait up to its connect timeout for the last peer before answering.
        let mut link = Link::new(stream, 0, who, grace(opts.connect_timeout));
        link.set_timeouts(grace(opts.connect_timeout))?;
        let mut hello = Vec::with_capacity(HELLO_LEN);
        hello.extend_from_slice(&MAGIC.to_le_bytes());
        hello.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        hello.extend_from_slice(&(rank as u32).to_le_bytes());
        hello.extend_from_slice(&(world as u32).to_le_bytes());
        let fail = |link: &mut Link, err: DistError| {
            let _ = link.stream.shutdown(Shutdown::Both);
            Err(err)
        };
        if let Err(err) = link.write_all(&hello, "connect") {
            return fail(&mut link, err);
        }
        let mut welcome = [0u8; 6];
        if let Err(err) = link.read_reply::<u8>(&mut welcome, &mut Vec::new(), "connect") {
            return fail(&mut link, err);
        }
        let magic = u32::from_le_bytes(welcome[0..4].try_into().expect("4 bytes"));
        let version = u16::from_le_bytes(welcome[4..6].try_into().expect("2 bytes"));
        if magic != MAGIC || version != PROTOCOL_VERSION {
            let err = DistError::Protocol(format!(
                "{} answered with an unexpected greeting (magic {magic:#010x}, version \
                 {version}; expected {MAGIC:#010x}, {PROTOCOL_VERSION}): is MASTER_PORT used \
                 by another program?",
                link.who
            ));
            return fail(&mut link, err);
        }
        link.set_timeouts(opts.peer_timeout())?;
        Ok(Tcp::new(rank, world, opts, Role::Peer { root: link }))
    }

    fn new(rank: usize, world: usize, opts: &TcpOptions, role: Role) -> Tcp {
        Tcp {
            rank,
            world,
            opts: opts.clone(),
            role,
            seq: 0,
            poisoned: None,
            calls: 0,
            seconds: 0.0,
            bytes_a: Vec::new(),
            bytes_b: Vec::new(),
            acc: Vec::new(),
        }
    }

    /// Rank 0's bytes copied to every rank (e.g. the NCCL unique id).
    pub fn broadcast_bytes(&mut self, buf: &mut [u8]) -> Result<(), DistError> {
        self.run(|t| t.bcast(Op::BroadcastBytes, buf))
    }

    /// Whether an earlier failure made the group unusable.
    pub fn is_poisoned(&self) -> bool {
        self.poisoned.is_some()
    }

    /// Bookkeeping shared by every collective: refuse after a failure, number the call,
    /// time it, and on error take the group down so no rank waits for a dead one.
    fn run<R>(&mut self, f: impl FnOnce(&mut Tcp) -> Result<R, DistError>) -> Result<R, DistError> {
        if let Some(p) = &self.poisoned {
            return Err(DistError::Poisoned(p.clone()));
        }
        let t0 = Instant::now();
        self.seq += 1;
        let r = f(self);
        self.calls += 1;
        self.seconds += t0.elapsed().as_secs_f64();
        if let Err(e) = &r {
            self.poison(e);
        }
        r
    }

    fn poison(&mut self, err: &DistError) {
        self.poisoned = Some(err.to_string());
        match &mut self.role {
            Role::Root { peers } => {
                for link in peers.iter_mut() {
                    if !link.torn {
                        link.send_abort(err);
                    }
                    // Half-close only: a full close with unread input would send a reset
                    // that can overtake the abort frame.
                    let _ = link.stream.shutdown(Shutdown::Write);
                }
            }
            Role::Peer { root } => {
                let _ = root.stream.shutdown(Shutdown::Both);
            }
        }
    }

    fn header(&self, op: Op, len: usize) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0] = op as u8;
        h[1..9].copy_from_slice(&self.seq.to_le_bytes());
        h[9..17].copy_from_slice(&(len as u64).to_le_bytes());
        h
    }

    /// Rank 0: read every peer's request and check it matches our own call.
    fn root_check_headers(peers: &mut [Link], op: Op, seq: u64, len: usize) -> Result<(), DistError> {
        for link in peers.iter_mut() {
            let mut h = [0u8; HEADER_LEN];
            link.read_exact(&mut h, op.name())?;
            let p_op = h[0];
            let p_seq = u64::from_le_bytes(h[1..9].try_into().expect("8 bytes"));
            let p_len = u64::from_le_bytes(h[9..17].try_into().expect("8 bytes"));
            if p_op != op as u8 || p_seq != seq || p_len != len as u64 {
                return Err(DistError::Protocol(format!(
                    "rank {} called {} (collective #{p_seq}, {p_len} elements) while rank 0 \
                     called {} (collective #{seq}, {len} elements): every rank must issue the \
                     same collectives in the same order with the same lengths",
                    link.rank,
                    Op::name_of(p_op),
                    op.name()
                )));
            }
        }
        Ok(())
    }

    /// Reduce `buf` over ranks in place: mean (f32 gradients) or sum (f64 metrics).
    fn reduce<T: Elem>(&mut self, op: Op, buf: &mut [T], mean: bool) -> Result<(), DistError> {
        let per = chunk_elems::<T>(self.opts.chunk_bytes);
        let header = self.header(op, buf.len());
        let (seq, world) = (self.seq, self.world as f64);
        match &mut self.role {
            Role::Root { peers } => {
                Tcp::root_check_headers(peers, op, seq, buf.len())?;
                let (acc, rbytes, sbytes) = (&mut self.acc, &mut self.bytes_a, &mut self.bytes_b);
                for range in chunks(buf.len(), per) {
                    let chunk = &mut buf[range];
                    acc.clear();
                    acc.extend(chunk.iter().map(|x| x.to_f64()));
                    // Fixed summation order (rank 0, 1, 2, ...) in f64 with one final
                    // rounding: deterministic, and the same bits go to every rank.
                    for link in peers.iter_mut() {
                        rbytes.clear();
                        rbytes.resize(chunk.len() * T::SIZE, 0);
                        link.read_exact(rbytes, op.name())?;
                        for (a, b) in acc.iter_mut().zip(rbytes.chunks_exact(T::SIZE)) {
                            *a += T::get(b).to_f64();
                        }
                    }
                    for (x, a) in chunk.iter_mut().zip(acc.iter()) {
                        *x = T::from_f64(if mean { *a / world } else { *a });
                    }
                    sbytes.clear();
                    sbytes.push(TAG_DATA);
                    encode(chunk, sbytes);
                    for link in peers.iter_mut() {
                        link.write_all(sbytes, op.name())?;
                    }
                }
                Ok(())
            }
            Role::Peer { root } => {
                root.write_all(&header, op.name())?;
                if buf.len() <= per {
                    let sbytes = &mut self.bytes_b;
                    sbytes.clear();
                    encode(buf, sbytes);
                    root.write_all(sbytes, op.name())?;
                    return root.read_reply(buf, &mut self.bytes_a, op.name());
                }
                Tcp::peer_reduce_pipelined(root, buf, per, op, &mut self.bytes_a, &mut self.bytes_b)
            }
        }
    }

    /// Send chunks from a helper thread while this thread takes the reduced chunks back, so
    /// uploading chunk k+1 overlaps rank 0 reducing chunk k. Reading and writing concurrently
    /// is also what keeps both directions' socket buffers draining: a peer that sent
    /// everything before reading could deadlock against rank 0 writing replies.
    fn peer_reduce_pipelined<T: Elem>(
        root: &mut Link,
        buf: &mut [T],
        per: usize,
        op: Op,
        rbytes: &mut Vec<u8>,
        wbytes: &mut Vec<u8>,
    ) -> Result<(), DistError> {
        let mut wstream =
            root.stream.try_clone().map_err(|e| DistError::Io { context: "cannot clone the socket to rank 0".into(), source: e })?;
        let n_chunks = chunks(buf.len(), per).count();
        let (write_res, sent, read_res, done) = thread::scope(|s| {
            let (tx, rx) = mpsc::channel::<&mut [T]>();
            let writer = s.spawn(move || {
                let mut sent = 0u64;
                let mut res = Ok(());
                for chunk in buf.chunks_mut(per) {
                    wbytes.clear();
                    encode(chunk, wbytes);
                    if let Err(e) = wstream.write_all(wbytes) {
                        res = Err(e);
                        break;
                    }
                    sent += wbytes.len() as u64;
                    // The chunk moves to the reader only once sent: its reply cannot exist
                    // before, so the reader never overwrites data still to be uploaded.
                    if tx.send(chunk).is_err() {
                        break;
                    }
                }
                (res, sent)
            });
            let mut read_res = Ok(());
            let mut done = 0;
            for chunk in rx.iter() {
                if let Err(e) = root.read_reply(chunk, rbytes, op.name()) {
                    read_res = Err(e);
                    // Unblock the writer, which may be stuck on a full send buffer.
                    let _ = root.stream.shutdown(Shutdown::Both);
                    break;
                }
                done += 1;
            }
            drop(rx);
            let (write_res, sent) = writer.join().expect("chunk writer thread panicked");
            (write_res, sent, read_res, done)
        });
        root.sent += sent;
        read_res?;
        if let Err(e) = write_res {
            root.torn = true;
            return Err(root.err(op.name(), &e));
        }
        debug_assert_eq!(done, n_chunks);
        Ok(())
    }

    /// Rank 0's buffer to everyone.
    fn bcast<T: Elem>(&mut self, op: Op, buf: &mut [T]) -> Result<(), DistError> {
        let per = chunk_elems::<T>(self.opts.chunk_bytes);
        let header = self.header(op, buf.len());
        let seq = self.seq;
        match &mut self.role {
            Role::Root { peers } => {
                Tcp::root_check_headers(peers, op, seq, buf.len())?;
                let sbytes = &mut self.bytes_b;
                for range in chunks(buf.len(), per) {
                    sbytes.clear();
                    sbytes.push(TAG_DATA);
                    encode(&buf[range], sbytes);
                    for link in peers.iter_mut() {
                        link.write_all(sbytes, op.name())?;
                    }
                }
                Ok(())
            }
            Role::Peer { root } => {
                root.write_all(&header, op.name())?;
                for range in chunks(buf.len(), per) {
                    root.read_reply(&mut buf[range], &mut self.bytes_a, op.name())?;
                }
                Ok(())
            }
        }
    }

    /// Every rank's `local`, concatenated in rank order.
    fn gather<T: Elem>(&mut self, op: Op, local: &[T]) -> Result<Vec<T>, DistError> {
        let per = chunk_elems::<T>(self.opts.chunk_bytes);
        let n = local.len();
        let header = self.header(op, n);
        let seq = self.seq;
        let mut out = vec![T::default(); n * self.world];
        match &mut self.role {
            Role::Root { peers } => {
                Tcp::root_check_headers(peers, op, seq, n)?;
                out[..n].copy_from_slice(local);
                let rbytes = &mut self.bytes_a;
                // Peers send everything before reading, and rank 0 reads them one after the
                // other before replying, so nobody waits on a full buffer in a cycle.
                for link in peers.iter_mut() {
                    let base = link.rank * n;
                    for range in chunks(n, per) {
                        rbytes.clear();
                        rbytes.resize(range.len() * T::SIZE, 0);
                        link.read_exact(rbytes, op.name())?;
                        decode(rbytes, &mut out[base + range.start..base + range.end]);
                    }
                }
                let sbytes = &mut self.bytes_b;
                for range in chunks(out.len(), per) {
                    sbytes.clear();
                    sbytes.push(TAG_DATA);
                    encode(&out[range], sbytes);
                    for link in peers.iter_mut() {
                        link.write_all(sbytes, op.name())?;
                    }
                }
            }
            Role::Peer { root } => {
                root.write_all(&header, op.name())?;
                let sbytes = &mut self.bytes_b;
                for range in chunks(n, per) {
                    sbytes.clear();
                    encode(&local[range], sbytes);
                    root.write_all(sbytes, op.name())?;
                }
                for range in chunks(out.len(), per) {
                    root.read_reply(&mut out[range], &mut self.bytes_a, op.name())?;
                }
            }
        }
        Ok(out)
    }
}

/// Read the fixed-size hello of a fresh connection; `None` if it is not readable in time.
fn read_hello(stream: TcpStream, addr: SocketAddr, wait: Duration) -> Option<Link> {
    // Accepted sockets may inherit the listener's non-blocking mode on some platforms.
    stream.set_nonblocking(false).ok()?;
    stream.set_nodelay(true).ok()?;
    let mut link = Link::new(stream, usize::MAX, format!("the process at {addr}"), wait);
    link.set_timeouts(wait).ok()?;
    let mut hello = [0u8; HELLO_LEN];
    link.read_exact(&mut hello, "connect").ok()?;
    link.hello = hello;
    Some(link)
}

/// Validate a hello. `Ok(None)`: not an scgpt rank (drop it and keep listening); `Err`: an
/// scgpt rank that disagrees with us, which dooms the whole group.
fn check_hello(mut link: Link, addr: SocketAddr, world: usize) -> Result<Option<Link>, DistError> {
    let hello = link.hello;
    let magic = u32::from_le_bytes(hello[0..4].try_into().expect("4 bytes"));
    let version = u16::from_le_bytes(hello[4..6].try_into().expect("2 bytes"));
    let rank = u32::from_le_bytes(hello[6..10].try_into().expect("4 bytes")) as usize;
    let their_world = u32::from_le_bytes(hello[10..14].try_into().expect("4 bytes")) as usize;
    if magic != MAGIC {
        return Ok(None);
    }
    let reject = |link: &mut Link, err: DistError| {
        link.send_abort(&err);
        let _ = link.stream.shutdown(Shutdown::Write);
        Err(err)
    };
    if version != PROTOCOL_VERSION {
        let err = DistError::Protocol(format!(
            "rank {rank} (at {addr}) speaks scgpt-dist protocol v{version} but rank 0 speaks \
             v{PROTOCOL_VERSION}: build every rank from the same scgpt version"
        ));
        return reject(&mut link, err);
    }
    if their_world != world {
        let err = DistError::Protocol(format!(
            "rank {rank} (at {addr}) was started with a world size of {their_world} but rank 0 \
             with {world}: every rank needs the same WORLD_SIZE / SLURM_NTASKS"
        ));
        return reject(&mut link, err);
    }
    if rank == 0 || rank >= world {
        let err = DistError::Protocol(format!(
            "the process at {addr} claims rank {rank}, which is rank 0's own or outside \
             0..{world}: check RANK / SLURM_PROCID"
        ));
        return reject(&mut link, err);
    }
    link.rank = rank;
    link.who = format!("rank {rank}");
    Ok(Some(link))
}

/// Listen on every interface of the family `master_addr` resolves to, so that peers can use
/// any name of this host.
fn bind_addr(master_addr: &str, port: u16) -> SocketAddr {
    let v6_only = (master_addr, port)
        .to_socket_addrs()
        .map(|addrs| {
            let addrs: Vec<SocketAddr> = addrs.collect();
            !addrs.is_empty() && addrs.iter().all(|a| a.is_ipv6())
        })
        .unwrap_or(false);
    if v6_only {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port))
    } else {
        SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port))
    }
}

impl Collective for Tcp {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_mean(&mut self, buf: &mut [f32]) -> Result<(), DistError> {
        self.run(|t| t.reduce(Op::AllReduceMean, buf, true))
    }
    fn all_reduce_sum_f64(&mut self, buf: &mut [f64]) -> Result<(), DistError> {
        self.run(|t| t.reduce(Op::AllReduceSumF64, buf, false))
    }
    fn broadcast(&mut self, buf: &mut [f32]) -> Result<(), DistError> {
        self.run(|t| t.bcast(Op::Broadcast, buf))
    }
    fn all_gather(&mut self, local: &[f32]) -> Result<Vec<f32>, DistError> {
        self.run(|t| t.gather(Op::AllGather, local))
    }
    fn barrier(&mut self) -> Result<(), DistError> {
        self.run(|t| t.bcast::<u8>(Op::Barrier, &mut []))
    }
    fn stats(&self) -> CommStats {
        let links: Vec<&Link> = match &self.role {
            Role::Root { peers } => peers.iter().collect(),
            Role::Peer { root } => vec![root],
        };
        CommStats {
            calls: self.calls,
            bytes_sent: links.iter().map(|l| l.sent).sum(),
            bytes_received: links.iter().map(|l| l.received).sum(),
            seconds: self.seconds,
        }
    }
    fn backend(&self) -> &'static str {
        "tcp"
    }
}
