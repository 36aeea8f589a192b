//! The training loader over shard sets: coverage, split, determinism, exact resume, ranks, weights.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use scgpt_data::loader::{DataPosition, Loader, LoaderConfig, ShardSet};
use scgpt_data::shard::CellColumns;
use scgpt_data::vocab::GeneVocab;
use scgpt_prep::io::shard_writer::write_shard;

/// A shard set of `n` cells in two shards; cell i has gene ids [i % 50] and cell id "<tag>-i".
fn make_set(dir: &Path, tag: &str, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut files = Vec::new();
    for (k, range) in [0..n / 2, n / 2..n].into_iter().enumerate() {
        let mut c = CellColumns::new(0);
        for i in range {
            c.push(&[(i % 50) as i32], &[1.0], &[1], 1.0, &format!("{tag}-{i}"), tag, &[]);
        }
        let name = format!("{tag}.{k:05}.parquet");
        write_shard(&dir.join(&name), &[], &c).unwrap();
        files.push(serde_json::json!({"file": name}));
    }
    std::fs::write(dir.join("manifest.json"), serde_json::json!({"shards": files}).to_string()).unwrap();
    let mut v = GeneVocab::from_tokens((0..50).map(|i| format!("g{i}")));
    v.ensure_specials();
    std::fs::write(dir.join("vocab.json"), v.to_json()).unwrap();
}

fn cfg(batch: usize) -> LoaderConfig {
    LoaderConfig {
        seed: 7,
        batch_size: batch,
        valid_fraction: 0.1,
        shuffle_window: 2,
        rank: 0,
        world: 1,
        prefetch: 2,
        obs_cols: Vec::new(),
        valid_rows: None,
        group_by_obs: None,
    }
}

fn ids(loader: &Loader, start: DataPosition) -> Vec<String> {
    loader.train_epoch(start).flat_map(|b| b.unwrap().cells.cell_ids).collect()
}

#[test]
fn an_epoch_covers_every_training_cell_once_and_the_split_is_disjoint() {
    let t = tempfile::tempdir().unwrap();
    make_set(&t.path().join("a"), "a", 10_000);
    let loader = Loader::new(vec![ShardSet::open(&t.path().join("a"), 1.0).unwrap()], cfg(64)).unwrap();
    let train = ids(&loader, DataPosition::default());
    let valid: Vec<String> = loader.valid().flat_map(|b| b.unwrap().cells.cell_ids).collect();
    let (ts, vs): (BTreeSet<_>, BTreeSet<_>) = (train.iter().cloned().collect(), valid.iter().cloned().collect());
    assert_eq!(ts.len(), train.len(), "no repeats within an epoch");
    assert!(ts.is_disjoint(&vs));
    assert_eq!(ts.len() + vs.len(), 10_000);
    assert!((800..1200).contains(&vs.len()), "about 10% held out: {}", vs.len());
    // Shuffled: not in storage order.
    let sorted = {
        let mut s = train.clone();
        s.sort_by_key(|x| x[2..].parse::<usize>().unwrap());
        s
    };
    assert_ne!(train, sorted);
}

#[test]
fn order_depends_only_on_seed_and_epoch() {
    let t = tempfile::tempdir().unwrap();
    make_set(&t.path().join("a"), "a", 6_000);
    let set = ShardSet::open(&t.path().join("a"), 1.0).unwrap();
    let l1 = Loader::new(vec![set.clone()], cfg(32)).unwrap();
    let l2 = Loader::new(vec![set.clone()], LoaderConfig { prefetch: 7, ..cfg(32) }).unwrap();
    let e0 = ids(&l1, DataPosition::default());
    assert_eq!(e0, ids(&l2, DataPosition::default()));
    assert_ne!(e0, ids(&l1, DataPosition { epoch: 1, cells_done: 0 }));
}

#[test]
fn resuming_at_a_position_continues_with_the_next_unseen_batch() {
    let t = tempfile::tempdir().unwrap();
    make_set(&t.path().join("a"), "a", 6_000);
    let loader = Loader::new(vec![ShardSet::open(&t.path().join("a"), 1.0).unwrap()], cfg(50)).unwrap();
    let all: Vec<_> = loader.train_epoch(DataPosition::default()).map(|b| b.unwrap()).collect();
    let k = 17;
    let resumed: Vec<String> = ids(&loader, all[k - 1].position);
    let tail: Vec<String> = all[k..].iter().flat_map(|b| b.cells.cell_ids.clone()).collect();
    assert_eq!(resumed, tail);
}

#[test]
fn ranks_take_disjoint_batches_that_together_make_the_epoch() {
    let t = tempfile::tempdir().unwrap();
    make_set(&t.path().join("a"), "a", 5_000);
    let set = ShardSet::open(&t.path().join("a"), 1.0).unwrap();
    let one = ids(&Loader::new(vec![set.clone()], cfg(16)).unwrap(), DataPosition::default());
    let mut union = BTreeSet::new();
    let mut total = 0;
    for rank in 0..2 {
        let l = Loader::new(vec![set.clone()], LoaderConfig { rank, world: 2, ..cfg(16) }).unwrap();
        let mine = ids(&l, DataPosition::default());
        total += mine.len();
        union.extend(mine);
    }
    assert_eq!(total, one.len());
    assert_eq!(union, one.into_iter().collect());
}

#[test]
fn set_weights_repeat_or_subsample_blocks() {
    let t = tempfile::tempdir().unwrap();
    make_set(&t.path().join("a"), "a", 8_192);
    make_set(&t.path().join("b"), "b", 8_192);
    let sets = vec![ShardSet::open(&t.path().join("a"), 2.0).unwrap(), ShardSet::open(&t.path().join("b"), 0.5).unwrap()];
    let loader = Loader::new(sets, LoaderConfig { valid_fraction: 0.0, ..cfg(64) }).unwrap();
    let mut per: BTreeMap<String, usize> = BTreeMap::new();
    for id in ids(&loader, DataPosition::default()) {
        *per.entry(id[..1].to_string()).or_default() += 1;
    }
    assert_eq!(per["a"], 2 * 8_192);
    assert_eq!(per["b"], 4_096, "half of b's row groups");
}

#[test]
fn a_missing_shard_is_a_clear_error() {
    let t = tempfile::tempdir().unwrap();
    make_set(&t.path().join("a"), "a", 100);
    std::fs::remove_file(t.path().join("a/a.00001.parquet")).unwrap();
    let err = ShardSet::open(&t.path().join("a"), 1.0).unwrap_err().to_string();
    assert!(err.contains("a.00001.parquet") && err.contains("missing"), "{err}");
}

#[test]
fn obs_columns_travel_with_their_cells() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("l");
    std::fs::create_dir_all(&dir).unwrap();
    let mut c = CellColumns::new(1);
    for i in 0..5_000usize {
        c.push(&[(i % 50) as i32], &[(i % 13) as f32 + 1.0], &[1], 1.0, &format!("l-{i}"), "l", &[format!("type{}", i % 7)]);
    }
    write_shard(&dir.join("l.00000.parquet"), &["label".to_string()], &c).unwrap();
    std::fs::write(dir.join("manifest.json"), serde_json::json!({"shards": [{"file": "l.00000.parquet"}]}).to_string()).unwrap();
    let mut v = GeneVocab::from_tokens((0..50).map(|i| format!("g{i}")));
    v.ensure_specials();
    std::fs::write(dir.join("vocab.json"), v.to_json()).unwrap();
    let set = ShardSet::open(&dir, 1.0).unwrap();
    let loader = Loader::new(vec![set], LoaderConfig { obs_cols: vec!["label".into()], ..cfg(64) }).unwrap();
    let mut seen = 0;
    for b in loader.train_epoch(DataPosition::default()) {
        let b = b.unwrap();
        for (k, id) in b.cells.cell_ids.iter().enumerate() {
            let i: usize = id[2..].parse().unwrap();
            assert_eq!(b.cells.obs[0][k], format!("type{}", i % 7), "label of {id}");
            let (g, e, _) = b.cells.cell(k);
            assert_eq!((g, e), (&[(i % 50) as i32][..], &[(i % 13) as f32 + 1.0][..]), "values of {id}");
            seen += 1;
        }
    }
    assert!(seen > 4_000);
    // A column the shards lack names itself and the fix.
    let set = ShardSet::open(&dir, 1.0).unwrap();
    let loader = Loader::new(vec![set], LoaderConfig { obs_cols: vec!["cell_type".into()], ..cfg(64) }).unwrap();
    let err = format!("{:#}", loader.train_epoch(DataPosition::default()).next().unwrap().unwrap_err());
    assert!(err.contains("cell_type") && err.contains("--obs-cols"), "{err}");
}

/// A one-shard set of `n` cells whose obs column "donor" is `donor{i % 3}`.
fn make_donor_set(dir: &Path, n: usize) -> ShardSet {
    std::fs::create_dir_all(dir).unwrap();
    let mut c = CellColumns::new(1);
    for i in 0..n {
        c.push(&[(i % 50) as i32], &[1.0], &[1], 1.0, &format!("d-{i}"), "d", &[format!("donor{}", i % 3)]);
    }
    write_shard(&dir.join("d.00000.parquet"), &["donor".to_string()], &c).unwrap();
    std::fs::write(dir.join("manifest.json"), serde_json::json!({"shards": [{"file": "d.00000.parquet"}]}).to_string()).unwrap();
    let mut v = GeneVocab::from_tokens((0..50).map(|i| format!("g{i}")));
    v.ensure_specials();
    std::fs::write(dir.join("vocab.json"), v.to_json()).unwrap();
    ShardSet::open(dir, 1.0).unwrap()
}

#[test]
fn grouped_batches_hold_one_obs_value_cover_the_epoch_and_resume_exactly() {
    let t = tempfile::tempdir().unwrap();
    let set = make_donor_set(&t.path().join("d"), 2_000);
    let grouped = LoaderConfig { obs_cols: vec!["donor".into()], group_by_obs: Some(0), shuffle_window: 100, ..cfg(32) };
    let loader = Loader::new(vec![set.clone()], grouped.clone()).unwrap();
    let all: Vec<_> = loader.train_epoch(DataPosition::default()).map(|b| b.unwrap()).collect();
    let mut seen = BTreeSet::new();
    let mut short = 0;
    for b in &all {
        let donors: BTreeSet<&String> = b.cells.obs[0].iter().collect();
        assert_eq!(donors.len(), 1, "one donor per batch: {donors:?}");
        short += usize::from(b.cells.len() < 32);
        for id in &b.cells.cell_ids {
            assert!(seen.insert(id.clone()), "{id} twice");
        }
    }
    let plain = Loader::new(vec![set.clone()], LoaderConfig { obs_cols: vec!["donor".into()], shuffle_window: 100, ..cfg(32) }).unwrap();
    let expected: BTreeSet<String> = plain.train_epoch(DataPosition::default()).flat_map(|b| b.unwrap().cells.cell_ids).collect();
    assert_eq!(seen, expected, "the same training cells as ungrouped batches");
    assert!(short <= 3, "one short batch per donor at most: {short}");
    // The donors' batches are shuffled together, not one donor after another.
    let firsts: Vec<&String> = all.iter().map(|b| &b.cells.obs[0][0]).collect();
    let changes = firsts.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(changes > 10, "donor changes between batches: {changes}");
    // Exact resume from any batch boundary.
    let k = 11;
    let resumed: Vec<String> = ids(&loader, all[k - 1].position);
    let tail: Vec<String> = all[k..].iter().flat_map(|b| b.cells.cell_ids.clone()).collect();
    assert_eq!(resumed, tail);
    // Two ranks deal the same batches between them.
    let rank = |r| Loader::new(vec![set.clone()], LoaderConfig { rank: r, world: 2, ..grouped.clone() }).unwrap();
    let (r0, r1) = (rank(0), rank(1));
    let mut both: Vec<String> = ids(&r0, DataPosition::default());
    both.extend(ids(&r1, DataPosition::default()));
    assert_eq!(both.into_iter().collect::<BTreeSet<_>>(), expected);
}
