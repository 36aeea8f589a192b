//! Where this process sits in the job, from the launcher's environment variables.

use std::time::Duration;

use crate::DistError;

/// torchrun's default rendezvous port; used when nothing else names one.
pub const DEFAULT_MASTER_PORT: u16 = 29500;
/// Network wait limit when `SCGPT_DIST_TIMEOUT_S` is unset: generous because a rank may
/// legitimately be slower than the others for a while (data loading, checkpoint writing).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
/// Environment variable overriding [`DEFAULT_TIMEOUT`], in (fractional) seconds.
pub const TIMEOUT_ENV: &str = "SCGPT_DIST_TIMEOUT_S";

// Ports derived from a Slurm job id land in [BASE, BASE + SPAN): above the well-known
// service ports and below Linux's default ephemeral range (32768+), so concurrent jobs
// sharing a node rarely collide with each other or with outgoing connections.
const SLURM_PORT_BASE: u16 = 15000;
const SLURM_PORT_SPAN: u64 = 15000;

/// This process's place in the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankInfo {
    pub rank: usize,
    pub world: usize,
    /// Index among the ranks on this node; selects the GPU.
    pub local_rank: usize,
    /// Host of rank 0, where the rendezvous listens.
    pub master_addr: String,
    pub master_port: u16,
}

impl RankInfo {
    /// A lone process (rank 0 of 1).
    pub fn single() -> RankInfo {
        RankInfo { rank: 0, world: 1, local_rank: 0, master_addr: "127.0.0.1".to_string(), master_port: DEFAULT_MASTER_PORT }
    }

    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// torchrun variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`),
    /// else Slurm's (`SLURM_PROCID`, `SLURM_NTASKS`, `SLURM_LOCALID`, first host of the step's
    /// or job's node list, `MASTER_PORT` or a port derived from `SLURM_JOB_ID`), else a single
    /// process. `MASTER_ADDR`/`MASTER_PORT` override the Slurm-derived values. Empty values
    /// count as unset. `get` looks a variable up (tests inject their own).
    pub fn from_env_with(get: impl Fn(&str) -> Option<String>) -> Result<RankInfo, DistError> {
        let get = |name: &str| get(name).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        if get("RANK").is_some() || get("WORLD_SIZE").is_some() {
            from_torchrun(&get)
        } else if get("SLURM_PROCID").is_some() {
            from_slurm(&get)
        } else {
            Ok(RankInfo::single())
        }
    }

    /// [`RankInfo::from_env_with`] on the process environment.
    pub fn from_env() -> Result<RankInfo, DistError> {
        RankInfo::from_env_with(|name| std::env::var(name).ok())
    }
}

fn from_torchrun(get: &dyn Fn(&str) -> Option<String>) -> Result<RankInfo, DistError> {
    let rank_s = get("RANK").ok_or_else(|| {
        DistError::Config(
            "WORLD_SIZE is set but RANK is not: set RANK to this process's index \
             (0..WORLD_SIZE-1) on every process, or unset WORLD_SIZE for a single-process run"
                .to_string(),
        )
    })?;
    let world_s = get("WORLD_SIZE").ok_or_else(|| {
        DistError::Config(
            "RANK is set but WORLD_SIZE is not: set WORLD_SIZE to the number of processes \
             on every process, or unset RANK for a single-process run"
                .to_string(),
        )
    })?;
    let rank = parse_count("RANK", &rank_s)?;
    let world = parse_world("WORLD_SIZE", &world_s)?;
    check_rank("RANK", rank, "WORLD_SIZE", world)?;
    // Without LOCAL_RANK the launch is most likely a hand-started single node, where the
    // global rank is also the index on the node.
    let local_rank = match get("LOCAL_RANK") {
        Some(v) => parse_count("LOCAL_RANK", &v)?,
        None => rank,
    };
    check_local("LOCAL_RANK", local_rank, world)?;
    let master_addr = match get("MASTER_ADDR") {
        Some(a) => a,
        None if world == 1 => "127.0.0.1".to_string(),
        None => {
            return Err(DistError::Config(format!(
                "MASTER_ADDR is not set but WORLD_SIZE={world}: set MASTER_ADDR to the host \
                 name or IP address of rank 0 (the same value on every rank)"
            )))
        }
    };
    let master_port = match get("MASTER_PORT") {
        Some(p) => parse_port("MASTER_PORT", &p)?,
        None => DEFAULT_MASTER_PORT,
    };
    Ok(RankInfo { rank, world, local_rank, master_addr, master_port })
}

fn from_slurm(get: &dyn Fn(&str) -> Option<String>) -> Result<RankInfo, DistError> {
    let rank = parse_count("SLURM_PROCID", &get("SLURM_PROCID").unwrap_or_default())?;
    let (world_var, world_s) = ["SLURM_NTASKS", "SLURM_NPROCS"].iter().find_map(|v| get(v).map(|s| (*v, s))).ok_or_else(|| {
        DistError::Config(
            "SLURM_PROCID is set but SLURM_NTASKS is not: launch with `srun --ntasks=N` \
                 (or sbatch --ntasks), or set RANK/WORLD_SIZE/MASTER_ADDR yourself"
                .to_string(),
        )
    })?;
    let world = parse_world(world_var, &world_s)?;
    check_rank("SLURM_PROCID", rank, world_var, world)?;
    let local_rank = match get("SLURM_LOCALID") {
        Some(v) => parse_count("SLURM_LOCALID", &v)?,
        None => 0,
    };
    check_local("SLURM_LOCALID", local_rank, world)?;
    let master_addr = if let Some(a) = get("MASTER_ADDR") {
        a
    } else if let Some((var, list)) =
        ["SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST"].iter().find_map(|v| get(v).map(|s| (*v, s)))
    {
        // Task 0 runs on the first node of the step under Slurm's default block distribution;
        // other distributions need MASTER_ADDR.
        first_host(&list)
            .map_err(|e| DistError::Config(format!("{var}={list:?} cannot be parsed ({e}): set MASTER_ADDR to the host of task 0")))?
    } else if world == 1 {
        "127.0.0.1".to_string()
    } else {
        return Err(DistError::Config(format!(
            "{world_var}={world} but neither MASTER_ADDR nor SLURM_JOB_NODELIST is set: \
             set MASTER_ADDR to the host of task 0"
        )));
    };
    let master_port = match (get("MASTER_PORT"), get("SLURM_JOB_ID")) {
        (Some(p), _) => parse_port("MASTER_PORT", &p)?,
        (None, Some(job)) => slurm_port(&job),
        (None, None) => DEFAULT_MASTER_PORT,
    };
    Ok(RankInfo { rank, world, local_rank, master_addr, master_port })
}

/// Every task of a job sees the same job id, so they agree on the port without
/// coordination, while different jobs on one node usually get different ports.
fn slurm_port(job_id: &str) -> u16 {
    let n = job_id.parse::<u64>().unwrap_or_else(|_| {
        // Non-numeric ids (heterogeneous job forms) still need a stable port: FNV-1a.
        job_id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
    });
    SLURM_PORT_BASE + (n % SLURM_PORT_SPAN) as u16
}

fn parse_count(var: &str, v: &str) -> Result<usize, DistError> {
    v.parse::<usize>().map_err(|_| DistError::Config(format!("{var}={v:?} is not a non-negative integer: fix or unset {var}")))
}

fn parse_world(var: &str, v: &str) -> Result<usize, DistError> {
    let w = parse_count(var, v)?;
    if w == 0 {
        return Err(DistError::Config(format!("{var}=0: the number of processes must be at least 1")));
    }
    Ok(w)
}

fn check_rank(rvar: &str, rank: usize, wvar: &str, world: usize) -> Result<(), DistError> {
    if rank >= world {
        return Err(DistError::Config(format!(
            "{rvar}={rank} is not smaller than {wvar}={world}: ranks are numbered \
             0..{wvar}-1, so one of the two variables is wrong"
        )));
    }
    Ok(())
}

fn check_local(var: &str, local: usize, world: usize) -> Result<(), DistError> {
    if local >= world {
        return Err(DistError::Config(format!(
            "{var}={local} is not smaller than the world size {world}: the index of a process \
             on its node cannot exceed the number of processes"
        )));
    }
    Ok(())
}

fn parse_port(var: &str, v: &str) -> Result<u16, DistError> {
    match v.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(DistError::Config(format!(
            "{var}={v:?} is not a TCP port (1-65535): set {var} to a free port, the same on \
             every rank"
        ))),
    }
}

/// The network wait limit from [`TIMEOUT_ENV`], else [`DEFAULT_TIMEOUT`].
pub fn timeout_from_env() -> Result<Duration, DistError> {
    timeout_from_env_with(|name| std::env::var(name).ok())
}

/// [`timeout_from_env`] with an injected lookup.
pub fn timeout_from_env_with(get: impl Fn(&str) -> Option<String>) -> Result<Duration, DistError> {
    let Some(v) = get(TIMEOUT_ENV).map(|v| v.trim().to_string()).filter(|v| !v.is_empty()) else {
        return Ok(DEFAULT_TIMEOUT);
    };
    match v.parse::<f64>() {
        Ok(s) if s.is_finite() && s > 0.0 && s < 1e9 => Ok(Duration::from_secs_f64(s)),
        _ => Err(DistError::Config(format!("{TIMEOUT_ENV}={v:?} is not a positive number of seconds: e.g. {TIMEOUT_ENV}=300"))),
    }
}

/// One part of a host pattern: literal text or a bracketed numeric range list.
enum Part {
    Lit(String),
    /// (first, last, zero-padded width) for each item of `[a-b,c,...]`.
    Ranges(Vec<(u64, u64, usize)>),
}

/// Split a Slurm node list at the commas that are outside brackets and parse each pattern.
fn parse_nodelist(list: &str) -> Result<Vec<Vec<Part>>, String> {
    let list = list.trim();
    if list.is_empty() {
        return Err("empty node list".to_string());
    }
    let mut patterns = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in list.char_indices() {
        match c {
            '[' if depth == 0 => depth = 1,
            '[' => return Err(format!("nested '[' at byte {i}")),
            ']' if depth == 1 => depth = 0,
            ']' => return Err(format!("']' without '[' at byte {i}")),
            ',' if depth == 0 => {
                patterns.push(parse_pattern(&list[start..i])?);
                start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return Err("'[' without ']'".to_string());
    }
    patterns.push(parse_pattern(&list[start..])?);
    Ok(patterns)
}

fn parse_pattern(p: &str) -> Result<Vec<Part>, String> {
    let p = p.trim();
    if p.is_empty() {
        return Err("empty host name (doubled or trailing comma)".to_string());
    }
    let mut parts = Vec::new();
    let mut rest = p;
    while !rest.is_empty() {
        match rest.find('[') {
            Some(0) => {
                // parse_nodelist already checked that brackets are balanced and flat.
                let close = rest.find(']').ok_or("'[' without ']'")?;
                parts.push(Part::Ranges(parse_ranges(&rest[1..close])?));
                rest = &rest[close + 1..];
            }
            Some(i) => {
                parts.push(Part::Lit(rest[..i].to_string()));
                rest = &rest[i..];
            }
            None => {
                parts.push(Part::Lit(rest.to_string()));
                rest = "";
            }
        }
    }
    Ok(parts)
}

fn parse_ranges(body: &str) -> Result<Vec<(u64, u64, usize)>, String> {
    let num = |s: &str| -> Result<u64, String> {
        let s = s.trim();
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("{s:?} in [{body}] is not a number"));
        }
        s.parse::<u64>().map_err(|_| format!("{s:?} in [{body}] is too large"))
    };
    body.split(',')
        .map(|item| {
            let item = item.trim();
            let (a, b) = item.split_once('-').unwrap_or((item, item));
            let (lo, hi) = (num(a)?, num(b)?);
            if lo > hi {
                return Err(format!("range {item:?} runs backwards"));
            }
            Ok((lo, hi, a.trim().len()))
        })
        .collect()
}

fn first_host(list: &str) -> Result<String, String> {
    let patterns = parse_nodelist(list)?;
    Ok(patterns[0]
        .iter()
        .map(|part| match part {
            Part::Lit(s) => s.clone(),
            Part::Ranges(r) => format!("{:0w$}", r[0].0, w = r[0].2),
        })
        .collect())
}

/// Expand a Slurm node list such as `node[01-04,07],gpu3` or `rack[1-2]-n[5,7]` into host
/// names, in Slurm's order. Zero padding follows the written lower bound (`[08-10]` gives
/// `08 09 10`).
pub fn expand_nodelist(list: &str) -> Result<Vec<String>, DistError> {
    let patterns = parse_nodelist(list).map_err(|e| DistError::Config(format!("node list {list:?} cannot be parsed: {e}")))?;
    let mut hosts = Vec::new();
    for parts in &patterns {
        let mut names = vec![String::new()];
        for part in parts {
            names = match part {
                Part::Lit(s) => names.into_iter().map(|n| n + s).collect(),
                Part::Ranges(ranges) => {
                    let mut next = Vec::new();
                    for n in &names {
                        for &(lo, hi, w) in ranges {
                            for k in lo..=hi {
                                next.push(format!("{n}{k:0w$}"));
                            }
                        }
                    }
                    next
                }
            };
        }
        hosts.extend(names);
    }
    Ok(hosts)
}

/// The GPU this rank uses, among the `visible` ones (`None`: unknown, e.g. no
/// `CUDA_VISIBLE_DEVICES` and no driver asked yet). One visible GPU is the rank's own, whatever
/// its local rank (Slurm's `--gpus-per-task=1` gives each task one device while
/// `SLURM_LOCALID` runs 0..N); several are indexed by the local rank (one task sees the node's
/// GPUs, e.g. torchrun); fewer than the local rank needs is an error that says so.
pub fn gpu_ordinal(local_rank: usize, visible: Option<usize>) -> Result<usize, DistError> {
    match visible {
        Some(0) => Err(DistError::Config(
            "no GPU is visible to this rank (CUDA_VISIBLE_DEVICES is empty or names none); check the job's GPU request (e.g. --gpus-per-task=1)".into(),
        )),
        Some(1) => Ok(0),
        Some(n) if local_rank < n => Ok(local_rank),
        Some(n) => Err(DistError::Config(format!(
            "local rank {local_rank} needs GPU {local_rank} but only {n} are visible to it: start at most one rank per visible GPU on each node, or give each rank its own GPU (--gpus-per-task=1)"
        ))),
        None => Ok(local_rank),
    }
}

/// How many GPUs `CUDA_VISIBLE_DEVICES` makes visible (`None` when it is unset): its
/// comma-separated entries (indices or `GPU-…` UUIDs) up to the first invalid one, which is
/// where the CUDA runtime stops reading it too (`-1` hides every GPU).
pub fn visible_gpus(cuda_visible_devices: Option<&str>) -> Option<usize> {
    let v = cuda_visible_devices?;
    Some(
        v.split(',')
            .map(str::trim)
            .take_while(|e| {
                !e.is_empty()
                    && !e.starts_with('-')
                    && (e.chars().all(|c| c.is_ascii_digit()) || e.starts_with("GPU-") || e.starts_with("MIG-"))
            })
            .count(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_ordinal_follows_what_is_visible() {
        // Slurm --gpus-per-task=1: every task sees one GPU, SLURM_LOCALID 0..3.
        for local in 0..4 {
            assert_eq!(gpu_ordinal(local, visible_gpus(Some("2"))).unwrap(), 0);
        }
        assert_eq!(gpu_ordinal(3, visible_gpus(Some("GPU-8f3a2c1e-1111-2222-3333-444455556666"))).unwrap(), 0);
        // One task per node sees all four (torchrun, or Slurm without a per-task binding).
        assert_eq!(visible_gpus(Some("0,1,2,3")), Some(4));
        assert_eq!(gpu_ordinal(2, visible_gpus(Some("0,1,2,3"))).unwrap(), 2);
        // More ranks on a node than visible GPUs, and none visible: errors that say why.
        let e = gpu_ordinal(3, visible_gpus(Some("0,1"))).unwrap_err().to_string();
        assert!(e.contains("local rank 3") && e.contains("only 2"), "{e}");
        for none in ["", "-1", "NoDevFiles"] {
            let e = gpu_ordinal(0, visible_gpus(Some(none))).unwrap_err().to_string();
            assert!(e.contains("no GPU is visible"), "{none:?}: {e}");
        }
        // The runtime reads up to the first invalid entry.
        assert_eq!(visible_gpus(Some("0,1,-1,3")), Some(2));
        // Unset: the local rank, as before.
        assert_eq!(visible_gpus(None), None);
        assert_eq!(gpu_ordinal(5, None).unwrap(), 5);
    }

    #[test]
    fn slurm_port_is_stable_and_in_range() {
        assert_eq!(slurm_port("123456"), slurm_port("123456"));
        for id in ["0", "1", "14999", "15000", "987654321", "het+1"] {
            let p = slurm_port(id);
            assert!((15000..30000).contains(&p), "{id} -> {p}");
        }
        assert_ne!(slurm_port("1000"), slurm_port("1001"));
    }

    #[test]
    fn first_host_matches_expansion() {
        for list in ["node[01-04,07],gpu3", "a[8-10]b", "r[2-3]-n[5,7]", "plain", "x[007]"] {
            assert_eq!(first_host(list).unwrap(), expand_nodelist(list).unwrap()[0]);
        }
    }
}
