//! Launcher-variable parsing: torchrun, Slurm, single process, and the errors for
//! inconsistent settings.

use std::collections::HashMap;
use std::time::Duration;

use scgpt_dist::{expand_nodelist, timeout_from_env_with, DistError, RankInfo};

fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    move |k| map.get(k).cloned()
}

fn info(pairs: &[(&str, &str)]) -> Result<RankInfo, DistError> {
    RankInfo::from_env_with(vars(pairs))
}

fn config_err(pairs: &[(&str, &str)]) -> String {
    match info(pairs) {
        Err(e @ DistError::Config(_)) => e.to_string(),
        other => panic!("expected a configuration error for {pairs:?}, got {other:?}"),
    }
}

#[test]
fn no_variables_means_single_process() {
    assert_eq!(info(&[]).unwrap(), RankInfo::single());
    let s = RankInfo::single();
    assert_eq!((s.rank, s.world, s.local_rank), (0, 1, 0));
    // Empty values, as left by `export RANK=`, count as unset.
    assert_eq!(info(&[("RANK", ""), ("WORLD_SIZE", " ")]).unwrap(), s);
}

#[test]
fn torchrun_variables() {
    let i = info(&[
        ("RANK", "3"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "10.0.0.5"),
        ("MASTER_PORT", "1234"),
        // torchrun wins over an enclosing Slurm allocation.
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "1"),
    ])
    .unwrap();
    assert_eq!(i, RankInfo { rank: 3, world: 8, local_rank: 1, master_addr: "10.0.0.5".into(), master_port: 1234 });
    assert!(!i.is_root());
}

#[test]
fn torchrun_defaults() {
    let i = info(&[("RANK", "0"), ("WORLD_SIZE", "1")]).unwrap();
    assert_eq!(i.master_addr, "127.0.0.1");
    assert_eq!(i.master_port, 29500);
    let i = info(&[("RANK", "2"), ("WORLD_SIZE", "4"), ("MASTER_ADDR", "host")]).unwrap();
    assert_eq!(i.local_rank, 2, "without LOCAL_RANK the launch is taken as one node");
    assert_eq!(i.master_port, 29500);
}

#[test]
fn torchrun_bad_values() {
    let e = config_err(&[("RANK", "4"), ("WORLD_SIZE", "4"), ("MASTER_ADDR", "h")]);
    assert!(e.contains("RANK=4") && e.contains("WORLD_SIZE=4"), "{e}");
    let e = config_err(&[("RANK", "abc"), ("WORLD_SIZE", "4"), ("MASTER_ADDR", "h")]);
    assert!(e.contains("RANK=\"abc\"") && e.contains("integer"), "{e}");
    let e = config_err(&[("RANK", "-1"), ("WORLD_SIZE", "4"), ("MASTER_ADDR", "h")]);
    assert!(e.contains("RANK=\"-1\""), "{e}");
    let e = config_err(&[("RANK", "0"), ("WORLD_SIZE", "0")]);
    assert!(e.contains("WORLD_SIZE=0"), "{e}");
    let e = config_err(&[("RANK", "1"), ("WORLD_SIZE", "2")]);
    assert!(e.contains("MASTER_ADDR") && e.contains("rank 0"), "{e}");
    let e = config_err(&[("RANK", "1")]);
    assert!(e.contains("WORLD_SIZE is not"), "{e}");
    let e = config_err(&[("WORLD_SIZE", "2")]);
    assert!(e.contains("RANK is not"), "{e}");
    for port in ["0", "70000", "http"] {
        let e = config_err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", port)]);
        assert!(e.contains("MASTER_PORT") && e.contains(port), "{e}");
    }
    let e = config_err(&[("RANK", "0"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("LOCAL_RANK", "5")]);
    assert!(e.contains("LOCAL_RANK=5"), "{e}");
}

#[test]
fn slurm_variables() {
    let i = info(&[
        ("SLURM_PROCID", "5"),
        ("SLURM_NTASKS", "8"),
        ("SLURM_LOCALID", "1"),
        ("SLURM_JOB_NODELIST", "node[01-04,07],gpu3"),
        ("SLURM_JOB_ID", "123456"),
    ])
    .unwrap();
    assert_eq!((i.rank, i.world, i.local_rank), (5, 8, 1));
    assert_eq!(i.master_addr, "node01");
    // 15000 + 123456 % 15000: the same on every task of the job.
    assert_eq!(i.master_port, 18456);

    // The step's node list is where task 0 runs; it beats the job's allocation.
    let i = info(&[
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "2"),
        ("SLURM_JOB_NODELIST", "node[01-04]"),
        ("SLURM_STEP_NODELIST", "node[03-04]"),
    ])
    .unwrap();
    assert_eq!(i.master_addr, "node03");
    assert_eq!(i.master_port, 29500, "no job id, no MASTER_PORT: the default port");
    assert_eq!(i.local_rank, 0);

    // Explicit MASTER_ADDR / MASTER_PORT override the derived values.
    let i = info(&[
        ("SLURM_PROCID", "1"),
        ("SLURM_NTASKS", "2"),
        ("SLURM_JOB_NODELIST", "node[01-04]"),
        ("SLURM_JOB_ID", "99"),
        ("MASTER_ADDR", "login7"),
        ("MASTER_PORT", "4000"),
    ])
    .unwrap();
    assert_eq!((i.master_addr.as_str(), i.master_port), ("login7", 4000));

    // Older Slurm: SLURM_NPROCS and SLURM_NODELIST.
    let i = info(&[("SLURM_PROCID", "1"), ("SLURM_NPROCS", "3"), ("SLURM_NODELIST", "gpu-a100-[3-5]")]).unwrap();
    assert_eq!((i.world, i.master_addr.as_str()), (3, "gpu-a100-3"));

    // A one-task job needs no node list.
    let i = info(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "1")]).unwrap();
    assert_eq!((i.world, i.master_addr.as_str()), (1, "127.0.0.1"));
}

#[test]
fn slurm_nodelist_forms_give_first_host() {
    for (list, first) in [
        ("node[01-04,07],gpu3", "node01"),
        ("gpu3,node[01-04]", "gpu3"),
        ("rack[2-3]-n[08-10]", "rack2-n08"),
        ("n[8-10]", "n8"),
        ("n[007,009]", "n007"),
        ("plain-host.cluster", "plain-host.cluster"),
    ] {
        let i = info(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2"), ("SLURM_JOB_NODELIST", list)]).unwrap();
        assert_eq!(i.master_addr, first, "{list}");
    }
}

#[test]
fn slurm_bad_values() {
    let e = config_err(&[("SLURM_PROCID", "9"), ("SLURM_NTASKS", "4"), ("SLURM_JOB_NODELIST", "n1")]);
    assert!(e.contains("SLURM_PROCID=9") && e.contains("SLURM_NTASKS=4"), "{e}");
    let e = config_err(&[("SLURM_PROCID", "0")]);
    assert!(e.contains("SLURM_NTASKS"), "{e}");
    let e = config_err(&[("SLURM_PROCID", "x"), ("SLURM_NTASKS", "4")]);
    assert!(e.contains("SLURM_PROCID=\"x\""), "{e}");
    let e = config_err(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "4")]);
    assert!(e.contains("MASTER_ADDR") && e.contains("SLURM_JOB_NODELIST"), "{e}");
    let e = config_err(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "4"), ("SLURM_JOB_NODELIST", "node[01-")]);
    assert!(e.contains("SLURM_JOB_NODELIST") && e.contains("MASTER_ADDR"), "{e}");
    let e = config_err(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "4"), ("SLURM_LOCALID", "7"), ("SLURM_JOB_NODELIST", "n1")]);
    assert!(e.contains("SLURM_LOCALID=7"), "{e}");
}

#[test]
fn nodelist_expansion() {
    let hosts = |l: &str| expand_nodelist(l).unwrap();
    assert_eq!(hosts("node[01-04,07],gpu3"), ["node01", "node02", "node03", "node04", "node07", "gpu3"]);
    assert_eq!(hosts("a[1-2]-b[3,5]"), ["a1-b3", "a1-b5", "a2-b3", "a2-b5"]);
    assert_eq!(hosts("n[8-10]"), ["n8", "n9", "n10"]);
    assert_eq!(hosts("n[08-10]"), ["n08", "n09", "n10"]);
    assert_eq!(hosts(" solo "), ["solo"]);
    assert_eq!(hosts("x,y[1]z"), ["x", "y1z"]);
    for bad in ["", "node[", "node]", "n[3-1]", "n[a-b]", "a,,b", "n[[1]]", "n[1,]", "a,"] {
        let e = expand_nodelist(bad).expect_err(bad).to_string();
        assert!(e.contains("cannot be parsed"), "{bad:?}: {e}");
    }
}

#[test]
fn timeout_variable() {
    assert_eq!(timeout_from_env_with(vars(&[])).unwrap(), Duration::from_secs(300));
    assert_eq!(timeout_from_env_with(vars(&[("SCGPT_DIST_TIMEOUT_S", "2.5")])).unwrap(), Duration::from_millis(2500));
    for bad in ["0", "-1", "abc", "inf", "NaN"] {
        let e = timeout_from_env_with(vars(&[("SCGPT_DIST_TIMEOUT_S", bad)])).expect_err(bad).to_string();
        assert!(e.contains("SCGPT_DIST_TIMEOUT_S"), "{e}");
    }
}
