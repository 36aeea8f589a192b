//! GEARS's condition-level splits (cell-gears 0.0.2 `DataSplitter`, as `PertData.prepare_split`
//! calls it), made with the same numpy draws so a seed gives GEARS's split exactly.
//!
//! `simulation`: T = `int(0.75·|G|)` of the sorted perturbed genes G, drawn by
//! `np.random.choice(replace=False)` after `np.random.seed(seed)`. Train gets the singles of T
//! and, after reseeding, `int(0.75·n)` of the n combos with both genes in T; test gets the rest:
//! `combo_seen2` (those other combos), `combo_seen1`, `combo_seen0` (genes in T) and
//! `unseen_single`. The same procedure with 0.9/0.9 on the training conditions takes out val.
//!
//! Subgroups (the `subgroup` map): a test condition gets GEARS's `test_subgroup` name, a val
//! condition `val_` + its `val_subgroup` name (GEARS computes those against the inner split's
//! genes), a train condition `train`. GEARS appends the control to train; we keep it out of the
//! lists (control cells are always training data) but accept it in a loaded `train`.
//!
//! Lists come out in the order of the conditions given, which is GEARS's `set2conditions` order
//! when they are given in the order of first appearance in `obs["condition"]`. GEARS tells a
//! single from a combo by the substring `ctrl`; we go by the parsed condition (the same for any
//! gene name that does not contain the control label).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};

use super::condition::{Condition, ConditionFormat};
use super::numpy_rng::LegacyRandomState;

/// A split of a screen's conditions into train, val and test (written as `split.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerturbationSplit {
    pub split: String,
    pub seed: u64,
    pub train: Vec<String>,
    pub val: Vec<String>,
    pub test: Vec<String>,
    /// Condition → subgroup (see the module header); may be empty.
    #[serde(default)]
    pub subgroup: BTreeMap<String, String>,
}

/// `PertData.prepare_split(split="simulation")` parameters.
#[derive(Debug, Clone)]
pub struct SimulationOptions {
    pub seed: u64,
    pub train_gene_set_size: f64,
    pub combo_seen2_train_frac: f64,
    /// GEARS hard-codes 0.9 and 0.9 for the val split taken from the training conditions.
    pub val_gene_set_size: f64,
    pub val_combo_seen2_train_frac: f64,
    pub format: ConditionFormat,
}

impl Default for SimulationOptions {
    fn default() -> Self {
        SimulationOptions {
            seed: 1,
            train_gene_set_size: 0.75,
            combo_seen2_train_frac: 0.75,
            val_gene_set_size: 0.9,
            val_combo_seen2_train_frac: 0.9,
            format: ConditionFormat::default(),
        }
    }
}

/// Which GEARS release's `no_test` split to reproduce; they differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NoTestRule {
    /// cell-gears 0.0.2 (what scGPT pins): val = `int(0.1·n_combos)` combos drawn *with*
    /// replacement, so a screen of singles gets an empty val.
    #[default]
    CellGears002,
    /// cell-gears 0.1.x: val = `int(0.1·n)` of all conditions drawn with replacement, in the order
    /// given (GEARS: first appearance in obs).
    CellGears01,
}

#[derive(Debug, Clone)]
pub struct NoTestOptions {
    pub seed: u64,
    pub val_fraction: f64,
    pub rule: NoTestRule,
    pub format: ConditionFormat,
}

impl Default for NoTestOptions {
    fn default() -> Self {
        NoTestOptions { seed: 1, val_fraction: 0.1, rule: NoTestRule::default(), format: ConditionFormat::default() }
    }
}

/// The screen's non-control conditions, unique, in first-appearance order.
struct Perts {
    names: Vec<String>,
    conds: Vec<Condition>,
}

impl Perts {
    fn new(conditions: &[impl AsRef<str>], format: &ConditionFormat) -> Result<Perts> {
        let (mut names, mut conds, mut seen) = (Vec::new(), Vec::new(), HashSet::new());
        for c in conditions {
            let s = c.as_ref();
            if !seen.insert(s.to_string()) {
                continue;
            }
            let cond = format.parse(s)?;
            if !cond.is_control() {
                names.push(s.to_string());
                conds.push(cond);
            }
        }
        ensure!(!names.is_empty(), "the screen has no perturbed condition (only {:?} or nothing)", format.control);
        Ok(Perts { names, conds })
    }
}

fn check_fraction(name: &str, v: f64) -> Result<()> {
    ensure!((0.0..=1.0).contains(&v), "{name} = {v} must be a fraction in [0, 1]");
    Ok(())
}

/// Python's `int(n * frac)`.
fn take(n: usize, frac: f64) -> usize {
    (n as f64 * frac) as usize
}

/// One `get_simulation_split` over the conditions `members` (indices into `p`): the indices
/// it puts in train, and each test condition's subgroup name.
fn simulation_once(
    p: &Perts,
    members: &[usize],
    gene_frac: f64,
    combo_frac: f64,
    seed: u64,
) -> Result<(BTreeSet<usize>, HashMap<usize, &'static str>)> {
    let genes: Vec<&str> = members.iter().flat_map(|&i| p.conds[i].genes()).collect::<BTreeSet<_>>().into_iter().collect();
    let mut rng = LegacyRandomState::new(seed)?;
    let drawn = rng.choice_without_replacement(genes.len(), take(genes.len(), gene_frac))?;
    let seen: HashSet<&str> = drawn.iter().map(|&i| genes[i]).collect();
    let n_seen = |i: usize| p.conds[i].genes().iter().filter(|g| seen.contains(*g)).count();

    let (mut train, mut group) = (BTreeSet::new(), HashMap::new());
    // np.setdiff1d sorts: the combos with both genes seen are drawn from in string order.
    let mut pool: Vec<usize> = Vec::new();
    for &i in members {
        match (&p.conds[i], n_seen(i)) {
            (Condition::Single(_), 1) => {
                train.insert(i);
            }
            (Condition::Single(_), _) => {
                group.insert(i, "unseen_single");
            }
            (Condition::Double(..), 0) => {
                group.insert(i, "combo_seen0");
            }
            (Condition::Double(..), 1) => {
                group.insert(i, "combo_seen1");
            }
            (Condition::Double(..), _) => pool.push(i),
            (Condition::Control, _) => unreachable!("controls are filtered out in Perts::new"),
        }
    }
    pool.sort_by(|&a, &b| p.names[a].cmp(&p.names[b]));
    let mut rng = LegacyRandomState::new(seed)?;
    let chosen = rng.choice_without_replacement(pool.len(), take(pool.len(), combo_frac))?;
    let chosen: HashSet<usize> = chosen.into_iter().map(|k| pool[k]).collect();
    for i in pool {
        if chosen.contains(&i) {
            train.insert(i);
        } else {
            group.insert(i, "combo_seen2");
        }
    }
    Ok((train, group))
}

/// GEARS's `simulation` split of a screen's conditions (any order, repeats allowed: pass
/// `obs["condition"]` as it is to get GEARS's list order).
pub fn simulation_split(conditions: &[impl AsRef<str>], opts: &SimulationOptions) -> Result<PerturbationSplit> {
    check_fraction("train_gene_set_size", opts.train_gene_set_size)?;
    check_fraction("combo_seen2_train_frac", opts.combo_seen2_train_frac)?;
    check_fraction("val_gene_set_size", opts.val_gene_set_size)?;
    check_fraction("val_combo_seen2_train_frac", opts.val_combo_seen2_train_frac)?;
    let p = Perts::new(conditions, &opts.format)?;
    let all: Vec<usize> = (0..p.names.len()).collect();
    let (outer_train, test_group) = simulation_once(&p, &all, opts.train_gene_set_size, opts.combo_seen2_train_frac, opts.seed)?;
    let outer_train: Vec<usize> = outer_train.into_iter().collect();
    let (train, val_group) = simulation_once(&p, &outer_train, opts.val_gene_set_size, opts.val_combo_seen2_train_frac, opts.seed)?;

    let mut split = PerturbationSplit {
        split: "simulation".into(),
        seed: opts.seed,
        train: Vec::new(),
        val: Vec::new(),
        test: Vec::new(),
        subgroup: BTreeMap::new(),
    };
    for (i, name) in p.names.iter().enumerate() {
        let (list, group) = if let Some(g) = test_group.get(&i) {
            (&mut split.test, g.to_string())
        } else if let Some(g) = val_group.get(&i) {
            (&mut split.val, format!("val_{g}"))
        } else {
            debug_assert!(train.contains(&i));
            (&mut split.train, "train".to_string())
        };
        list.push(name.clone());
        split.subgroup.insert(name.clone(), group);
    }
    Ok(split)
}

/// GEARS's `no_test` split: train and val only, no subgroups.
pub fn no_test_split(conditions: &[impl AsRef<str>], opts: &NoTestOptions) -> Result<PerturbationSplit> {
    check_fraction("val_fraction", opts.val_fraction)?;
    let p = Perts::new(conditions, &opts.format)?;
    let singles: Vec<usize> = (0..p.names.len()).filter(|&i| matches!(p.conds[i], Condition::Single(_))).collect();
    let combos: Vec<usize> = (0..p.names.len()).filter(|&i| matches!(p.conds[i], Condition::Double(..))).collect();
    let n_genes = p.conds.iter().flat_map(|c| c.genes()).collect::<BTreeSet<_>>().len();
    let mut rng = LegacyRandomState::new(opts.seed)?;
    // get_split_list first draws test genes that the no_test branch never uses; the draws
    // still move the stream.
    rng.choice_with_replacement(n_genes, take(singles.len(), opts.val_fraction))?;
    let from: Vec<usize> = match opts.rule {
        NoTestRule::CellGears002 => combos,
        NoTestRule::CellGears01 => (0..p.names.len()).collect(),
    };
    let val: HashSet<usize> =
        rng.choice_with_replacement(from.len(), take(from.len(), opts.val_fraction))?.into_iter().map(|k| from[k]).collect();
    let mut split = PerturbationSplit {
        split: "no_test".into(),
        seed: opts.seed,
        train: Vec::new(),
        val: Vec::new(),
        test: Vec::new(),
        subgroup: BTreeMap::new(),
    };
    for (i, name) in p.names.iter().enumerate() {
        if val.contains(&i) { &mut split.val } else { &mut split.train }.push(name.clone());
    }
    Ok(split)
}

impl PerturbationSplit {
    pub fn load(path: &Path) -> Result<PerturbationSplit> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: not a perturbation split; expected {{\"split\", \"seed\", \"train\", \"val\", \"test\", \
                 \"subgroup\"}} with lists of condition strings",
                path.display()
            )
        })
    }

    /// Writes the split as pretty JSON, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let (dir, name) = match (path.parent(), path.file_name().and_then(|n| n.to_str())) {
            (Some(d), Some(n)) => (if d.as_os_str().is_empty() { Path::new(".") } else { d }, n),
            _ => bail!("{}: not a file path for the split", path.display()),
        };
        let mut bytes = serde_json::to_vec_pretty(self)?;
        bytes.push(b'\n');
        crate::write_atomic(dir, name, &bytes)?;
        Ok(())
    }

    /// [`load`](Self::load) then [`validate`](Self::validate) against the screen's conditions.
    pub fn load_for_screen(path: &Path, screen: &[impl AsRef<str>], format: &ConditionFormat) -> Result<PerturbationSplit> {
        let split = Self::load(path)?;
        split.validate(screen, format, &path.display().to_string())?;
        Ok(split)
    }

    /// Checks that every non-control condition of the screen is in exactly one list, that the
    /// lists name only the screen's conditions (the control only in train, as GEARS writes it),
    /// that test is not empty (except for `no_test`) and that subgroup keys are listed conditions.
    /// `origin` names the file in errors.
    pub fn validate(&self, screen: &[impl AsRef<str>], format: &ConditionFormat, origin: &str) -> Result<()> {
        let fix = "make the split again from this screen's conditions, or correct the file";
        let known: HashSet<&str> = screen.iter().map(|c| c.as_ref()).collect();
        let mut placed: HashMap<&str, &str> = HashMap::new();
        for (list, names) in [("train", &self.train), ("val", &self.val), ("test", &self.test)] {
            for c in names {
                let cond = format.parse(c).with_context(|| format!("{origin}: {list} lists a malformed condition"))?;
                if cond.is_control() && list != "train" {
                    bail!("{origin}: the control {c:?} is in {list}; control cells are training data only ({fix})");
                }
                if !known.contains(c.as_str()) {
                    bail!("{origin}: {list} lists {c:?}, which is not a condition of this screen ({fix})");
                }
                if let Some(first) = placed.insert(c.as_str(), list) {
                    bail!("{origin}: {c:?} is listed twice (in {first} and in {list}); each condition belongs to one list ({fix})");
                }
            }
        }
        let mut missing = Vec::new();
        let mut checked = HashSet::new();
        for c in screen {
            let c = c.as_ref();
            if checked.insert(c) && !placed.contains_key(c) && !format.parse(c).context("a condition of the screen")?.is_control() {
                missing.push(c);
            }
        }
        if !missing.is_empty() {
            let shown: Vec<&str> = missing.iter().take(5).copied().collect();
            bail!("{origin}: {} condition(s) of the screen are in none of train/val/test, e.g. {shown:?} ({fix})", missing.len());
        }
        if self.test.is_empty() && self.split != "no_test" {
            bail!(
                "{origin}: the test list is empty (split {:?}); only a \"no_test\" split may have no test conditions ({fix})",
                self.split
            );
        }
        if let Some(k) = self.subgroup.keys().find(|k| !placed.contains_key(k.as_str())) {
            bail!("{origin}: subgroup names {k:?}, which is in none of train/val/test ({fix})");
        }
        Ok(())
    }
}
